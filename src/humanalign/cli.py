"""`humanalign <command>`: parse flags, load the command's typed config, call one function.

Every ``--some-flag VALUE`` maps onto the config field ``some_flag`` (a flag with no value means ``true``), so
the CLI and the YAML files speak the same names; ``--set a.b=VALUE`` reaches nested fields. User mistakes end
as one line on stderr and exit code 2. The global flag ``--verbose`` lets transformers' own warnings and
progress bars through (kept out by default: token-length warnings, "Loading weights" bars).
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

from humanalign.config.base import load_config
from humanalign.data.io import check_output_path
from humanalign.errors import Interrupted, UserError

# command words -> (config schema, function taking the validated config), as "module:attribute" strings that
# `_import` resolves only for the command that runs: `humanalign --help` and `validate` then import neither
# torch nor a trainer. This lazy dispatch is the one place the CLI imports modules other than at its top.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("humanalign.config.data:PrepareDataConfig", "humanalign.data.prepare:run"),
    "tiny-model": ("humanalign.config.models:TinyModelConfig", "humanalign.models.tiny_vision:run"),
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


REPORT_USAGE = (
    "usage: humanalign report RUN_DIR [RUN_DIR ...] [--output DIR] [--overwrite]\n\n"
    "Draws the metrics of one run (or several, overlaid) into DIR (default: RUN_DIR/report): one PNG per group\n"
    "of metrics, report.html and manifest.json."
)
VALIDATE_USAGE = (
    "usage: humanalign validate CONFIG [--command NAME] [--set KEY=VALUE ...]\n\n"
    "Checks CONFIG against the schema of its command (guessed from the file name, e.g. dpo_*.yaml; --command\n"
    "names it) and prints the resolved config, every default included."
)


def _group_usage(group: str) -> str:
    subs = [c for c in COMMANDS if c.startswith(group + " ")]
    return (f"usage: humanalign {group} <{'|'.join(c.split()[1] for c in subs)}> [--FIELD VALUE ...]\n\ncommands:\n"
            + "\n".join(f"  {c}" for c in subs) + f"\n\n`humanalign {group} NAME --help` lists a command's fields.")


def _wants_help(tokens: list[str]) -> bool:
    return any(t in ("-h", "--help") for t in tokens)


def _usage() -> str:
    cmds = "\n".join(f"  {c}" for c in COMMANDS)
    return (
        "usage: humanalign <command> [--config FILE] [--set KEY=VALUE] [--FIELD VALUE ...]\n\n"
        f"commands:\n{cmds}\n  report RUN_DIR [RUN_DIR ...]\n  validate CONFIG [--command NAME]\n\n"
        "`humanalign <command> --help` lists a command's fields; --verbose (any command) shows transformers'\n"
        "own warnings and progress bars."
    )


def infer_command(path: str) -> str:
    stem = Path(path).stem
    best = max((p for p in STEM_TO_COMMAND if stem.startswith(p)), key=len, default=None)
    if best is None:
        raise UserError(f"{path}: cannot tell which command this config is for; pass --command NAME")
    return STEM_TO_COMMAND[best]


def validate(tokens: list[str]) -> int:
    if _wants_help(tokens):
        print(VALIDATE_USAGE)
        return 0
    _, sets, values, positionals = parse_flags(tokens)
    if len(positionals) != 1:
        raise UserError("usage: humanalign validate CONFIG [--command NAME] [--set KEY=VALUE]")
    path = positionals[0]
    if not Path(path).is_file():
        raise UserError(f"{path}: {'is a folder, not a config file' if Path(path).is_dir() else 'config file not found'}")
    command = str(values.pop("command", "")) or infer_command(path)
    if command not in COMMANDS:
        raise UserError(f"unknown command '{command}'")
    cfg = load_config(_import(COMMANDS[command][0]), path, sets)
    print(f"# {path}: valid config for `humanalign {command}`")
    print(cfg.to_yaml(), end="")
    return 0


def check_paths(cfg: Any) -> None:
    """Before any work: every output path can be created and written, and the inputs every run reads exist."""
    for key, path, kind in cfg.output_targets():
        check_output_path(path, key, kind)
    for key, path in cfg.input_targets():
        if not Path(path).exists():
            raise UserError(f"{path} ({key}): not found")
    if getattr(cfg, "logging_dir", None):  # absolute, so that `humanalign report` finds it from anywhere
        cfg.logging_dir = str(Path(cfg.logging_dir).absolute())


def quiet_transformers(verbose: bool) -> None:
    """transformers' warnings (e.g. "Token indices sequence length is longer than ...") and progress bars
    ("Loading weights", Hub downloads) are not ours to show; --verbose lets them through. Before transformers is
    imported (a fresh process: every command imports it later, if at all) the environment says so, for free."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
        if verbose:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    elif verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def run_command(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "validate":
        return validate(argv[1:])
    if argv[0] == "report":
        if _wants_help(argv[1:]):
            print(REPORT_USAGE)
            return 0
        _, _, values, positionals = parse_flags(argv[1:])
        if values.get("output") not in (None, True):
            check_output_path(str(values["output"]), "--output", "folder")
        return int(_import("humanalign.report:run_cli")(positionals, **values) or 0)
    groups = {c.split()[0] for c in COMMANDS if " " in c}
    if argv[0] in groups and len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(_group_usage(argv[0]))
        return 0
    command, rest = _match_command(argv)
    if _wants_help(rest):
        print(_schema_help(command))
        return 0
    config_path, sets, values, positionals = parse_flags(rest)
    if positionals:
        raise UserError(f"unexpected argument '{positionals[0]}' (flags are --name value)")
    cfg = load_config(_import(COMMANDS[command][0]), config_path, sets, values)
    check_paths(cfg)
    quiet_transformers(verbose)
    start = time.time()
    _import(COMMANDS[command][1])(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per torchrun/accelerate process
        print(f"[humanalign] {command} finished in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


# File-system refusals on a path the user gave (an input we may not read, a disk that filled up): one line
# naming the path, like any other user mistake. Other OSErrors keep their traceback.
PATH_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)
PATH_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_command(argv)
    except UserError as err:
        print(f"humanalign: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as stop:  # a signal stopped training after a checkpoint: the message says how to resume
        if os.environ.get("RANK", "0") == "0":
            print(f"humanalign: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("humanalign: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `humanalign ... | head`: the reader went away, not an error of ours
        sys.stderr.close()
        return 0
    except OSError as err:
        if not (isinstance(err, PATH_ERRORS) or err.errno in PATH_ERRNOS) or err.filename is None:
            raise
        print(f"humanalign: error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2


def leave(code: int | None) -> NoReturn:
    """End the process with ``code``. A worker of a multi-process run (``WORLD_SIZE`` > 1: torchrun, accelerate
    launch) leaves through ``os._exit`` once its output is flushed: with the gloo backend, the worker thread of
    the last collective can still be releasing it when the interpreter finalises, and that release needs the GIL,
    so the process aborts (SIGABRT, "terminate called without an active exception"; seen in ~1 of 20 two-process
    runs under load, core dump: ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``decref_pyobject``).
    Nothing is left to run by then: the engine has closed its loggers, files and process group."""
    code = 0 if code is None else int(code)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written anyway
                pass
        os._exit(code)
    sys.exit(code)


def entry() -> NoReturn:
    """The ``humanalign`` command and ``python -m humanalign.cli``."""
    leave(main())


if __name__ == "__main__":
    entry()
