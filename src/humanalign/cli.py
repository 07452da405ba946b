"""`humanalign <command>`: parse flags, load the command's typed config, call one function.

Every ``--some-flag VALUE`` maps onto the config field ``some_flag`` (a flag with no value means ``true``), so
the CLI and the YAML files speak the same names; ``--set a.b=VALUE`` reaches nested fields. User mistakes end
as one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from humanalign.errors import UserError

# command words -> (config schema, function taking the validated config)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("humanalign.config.data:PrepareDataConfig", "humanalign.data.prepare:run"),
    "tiny-model": ("humanalign.config.models:TinyModelConfig", "humanalign.models.tiny:run"),
    "demo": ("humanalign.config.demo:DemoConfig", "humanalign.demo:run"),
    "train sft": ("humanalign.config.sft:SFTConfig", "humanalign.trainers.sft:run"),
    "train rm": ("humanalign.config.rm:RewardModelConfig", "humanalign.trainers.reward:run"),
    "train dpo": ("humanalign.config.dpo:DPOConfig", "humanalign.trainers.dpo:run"),
    "train safe-mm-dpo": ("humanalign.config.safe_mm_dpo:SafeMMDPOConfig", "humanalign.trainers.safe_mm_dpo:run"),
    "train ppo": ("humanalign.config.ppo:PPOConfig", "humanalign.trainers.ppo:run"),
    "train ppo-lag": ("humanalign.config.ppo:PPOLagConfig", "humanalign.trainers.ppo:run"),
    "train grpo": ("humanalign.config.grpo:GRPOConfig", "humanalign.trainers.grpo:run"),
    "train grpo-lag": ("humanalign.config.grpo:GRPOLagConfig", "humanalign.trainers.grpo:run"),
    "eval rm": ("humanalign.config.evaluation:EvalRMConfig", "humanalign.eval.rm:run"),
    "eval arena": ("humanalign.config.evaluation:ArenaConfig", "humanalign.eval.arena:run"),
    "eval ppl": ("humanalign.config.evaluation:PerplexityConfig", "humanalign.eval.perplexity:run"),
    "generate": ("humanalign.config.evaluation:GenerateConfig", "humanalign.eval.generate:run"),
    "distill": ("humanalign.config.evaluation:DistillConfig", "humanalign.eval.distill:run"),
    "export": ("humanalign.config.evaluation:ExportConfig", "humanalign.models.export:run"),
}

# config file stem prefix -> command, for `humanalign validate FILE` (longest prefix wins)
STEM_TO_COMMAND = {
    "prepare_data": "prepare-data", "tiny_model": "tiny-model", "demo": "demo", "sft": "train sft",
    "rm": "train rm", "reward": "train rm", "cost": "train rm", "dpo": "train dpo", "cpo": "train dpo",
    "orpo": "train dpo", "simpo": "train dpo", "ipo": "train dpo", "safe_mm_dpo": "train safe-mm-dpo",
    "mm_dpo": "train safe-mm-dpo", "safe_dpo": "train safe-mm-dpo", "ppo": "train ppo", "ppo_lag": "train ppo-lag",
    "grpo": "train grpo", "grpo_lag": "train grpo-lag",
    "eval_rm": "eval rm", "arena": "eval arena", "perplexity": "eval ppl", "generate": "generate",
    "distill": "distill", "export": "export",
}


def _import(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_flags(tokens: list[str]) -> tuple[str | None, list[str], dict[str, Any], list[str]]:
    """-> (config path, --set overrides, {field: value} from other flags, positionals)."""
    config: str | None = None
    sets: list[str] = []
    values: dict[str, Any] = {}
    positionals: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            positionals.append(tok)
            i += 1
            continue
        name, eq, inline = tok[2:].partition("=")
        if eq:
            value: Any = inline
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = True
            i += 1
        if name == "config":
            config = str(value)
        elif name == "set":
            sets.append(str(value))
        else:
            values[name.replace("-", "_")] = _parse_value(value) if isinstance(value, str) else value
    return config, sets, values, positionals


def _match_command(argv: list[str]) -> tuple[str, list[str]]:
    for n in (2, 1):
        words = " ".join(argv[:n])
        if words in COMMANDS:
            return words, argv[n:]
    groups = sorted({c.split()[0] for c in COMMANDS if " " in c})
    if argv and argv[0] in groups:
        subs = [c.split()[1] for c in COMMANDS if c.startswith(argv[0] + " ")]
        raise UserError(f"'{argv[0]}' needs one of: {', '.join(subs)}")
    raise UserError(f"unknown command '{' '.join(argv[:1])}' (try `humanalign --help`)")


def _schema_help(command: str) -> str:
    schema = _import(COMMANDS[command][0])
    lines = [f"usage: humanalign {command} [--config FILE] [--set KEY=VALUE ...] [--FIELD VALUE ...]", "", "fields:"]
    for name, field in schema.model_fields.items():
        default = field.default if field.default_factory is None else "(nested)"
        lines.append(f"  --{name.replace('_', '-'):32s} {field.description or ''} [default: {default}]")
    return "\n".join(lines)


def _usage() -> str:
    cmds = "\n".join(f"  {c}" for c in COMMANDS)
    return (
        "usage: humanalign <command> [--config FILE] [--set KEY=VALUE] [--FIELD VALUE ...]\n\n"
        f"commands:\n{cmds}\n  report RUN_DIR [RUN_DIR ...]\n  validate CONFIG [--command NAME]\n\n"
        "`humanalign <command> --help` lists a command's fields."
    )


def infer_command(path: str) -> str:
    stem = Path(path).stem
    best = max((p for p in STEM_TO_COMMAND if stem.startswith(p)), key=len, default=None)
    if best is None:
        raise UserError(f"{path}: cannot tell which command this config is for; pass --command NAME")
    return STEM_TO_COMMAND[best]


def validate(tokens: list[str]) -> int:
    from humanalign.config.base import load_config

    _, sets, values, positionals = parse_flags(tokens)
    if len(positionals) != 1:
        raise UserError("usage: humanalign validate CONFIG [--command NAME] [--set KEY=VALUE]")
    path = positionals[0]
    command = str(values.pop("command", "")) or infer_command(path)
    if command not in COMMANDS:
        raise UserError(f"unknown command '{command}'")
    cfg = load_config(_import(COMMANDS[command][0]), path, sets)
    print(f"# {path}: valid config for `humanalign {command}`")
    print(cfg.to_yaml(), end="")
    return 0


def run_command(argv: list[str]) -> int:
    from humanalign.config.base import load_config

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "validate":
        return validate(argv[1:])
    if argv[0] == "report":
        _, _, values, positionals = parse_flags(argv[1:])
        return int(_import("humanalign.report:run_cli")(positionals, **values) or 0)
    command, rest = _match_command(argv)
    if "--help" in rest or "-h" in rest:
        print(_schema_help(command))
        return 0
    config_path, sets, values, positionals = parse_flags(rest)
    if positionals:
        raise UserError(f"unexpected argument '{positionals[0]}' (flags are --name value)")
    cfg = load_config(_import(COMMANDS[command][0]), config_path, sets, values)
    start = time.time()
    _import(COMMANDS[command][1])(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per torchrun/accelerate process
        print(f"[humanalign] {command} finished in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_command(argv)
    except UserError as err:
        print(f"humanalign: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("humanalign: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `humanalign ... | head`: the reader went away, not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
