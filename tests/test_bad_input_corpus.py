"""A corpus of user mistakes over every command: each ends as one line on stderr naming the file, line, field or
config key at fault, with exit code 2, and leaves every file that was there before untouched (and, unless a case
says otherwise, writes nothing new).

Two tables. ``CASES`` (inputs, configs, paths): each case writes its input files into a fresh folder, runs
``humanalign.cli.main(argv)`` in-process from that folder (so that default output paths land there too), and
compares the hashes of every file before and after. ``{tmp}`` in an argument, a file or an expected fragment is
that folder. These mistakes are caught before any model is loaded or trained. ``RUN_CASES`` (checkpoints, run
locks, for every training command): the same checks on a damaged copy of a real tiny run folder, built once per
module (about a minute for the table on one thread); one SIGTERM case follows it.
Cases already covered by tests/data/test_bad_input.py (bad records in prepare-data) are not repeated.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from humanalign.cli import COMMANDS, main
from humanalign.engine.runlock import LOCK_FILE, RunLock
from humanalign.paths import PROJECT_ROOT

GOOD_RAW = {"prompt": "How do I bake bread?", "response_0": "Mix flour and water, then bake.", "response_1": "No.",
            "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}
PAIR = {"prompt": "How do I bake bread?", "chosen": "Mix flour and water, then bake.", "rejected": "No."}
METRICS = '{"step": 1, "train/loss": 0.9}\n{"step": 2, "train/loss": 0.7}\n'


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _gz_truncated() -> bytes:
    data = gzip.compress(jsonl(*({**GOOD_RAW, "prompt": f"Question {i}?"} for i in range(400))).encode())
    return data[: len(data) // 2]


RAW_GZ_TRUNCATED = _gz_truncated()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (220, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
ON_SYS = Path("/sys").is_dir() and sys.platform.startswith("linux")  # a place nobody may create folders in


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]  # fragments of the one error line
    files: dict[str, str | bytes] = field(default_factory=dict)  # relative path -> content (a folder: ends in /)
    code: int = 2
    new_files_ok: bool = False  # the command may have created files (never changed existing ones)
    needs_sys: bool = False


def case(id: str, argv: str | list[str], *expect: str, files: dict | None = None, **kw) -> Case:
    return Case(id, argv.split() if isinstance(argv, str) else argv, list(expect), files or {}, **kw)


A_FILE = {"afile": "I am a file, not a folder\n"}
TRAIN = ["train sft", "train rm", "train dpo", "train safe-mm-dpo"]
PPO_ARGS = "--reward-fn humanalign.rewards:length_reward"
SCHEMA_ONLY = {  # the smallest valid flags of each command
    **{c: "" for c in COMMANDS},
    "train ppo": PPO_ARGS,
    "train ppo-lag": PPO_ARGS + " --cost-fn humanalign.rewards:length_reward",
}

CASES: list[Case] = [
    # ---------------------------------------------------------------- command line
    case("unknown-command", "trian sft", "unknown command 'trian'"),
    case("train-without-subcommand", "train", "'train' needs one of: sft, rm"),
    case("eval-unknown-subcommand", "eval foo", "'eval' needs one of: rm, arena, ppl"),
    case("positional-argument", "train sft data.jsonl", "unexpected argument 'data.jsonl'"),
    case("set-without-equals", "train dpo --set beta", "--set expects KEY=VALUE, got 'beta'"),
    case("set-empty-key", "train dpo --set =1", "--set expects KEY=VALUE, got '=1'"),
    case("report-unknown-flag", "report run --outptu x", "report: unknown flag --outptu"),
    case("report-no-run", "report", "usage: humanalign report"),
    # ---------------------------------------------------------------- unknown keys, every command
    *[case(f"unknown-key-{c.replace(' ', '-')}", f"{c} {SCHEMA_ONLY[c]} --no-such-key 1", "unknown key 'no_such_key'")
      for c in COMMANDS],
    case("unknown-nested-key", "train sft --set lora.rank=8", "unknown key 'lora.rank'"),
    case("alias-and-name-twice", "train ppo-lag --config {tmp}/c.yaml", "field 'lambda_init' is given twice",
         files={"c.yaml": f"reward_fn: {PPO_ARGS.split()[1]}\ncost_fn: a:b\nlambda_init: 1\nλ_init: 2\n"}),
    # ---------------------------------------------------------------- bad values
    case("inf-learning-rate-flag", "train sft --learning-rate inf", "command line: field 'learning_rate'", "finite number"),
    case("nan-learning-rate-yaml", "train dpo --config {tmp}/dpo.yaml", "dpo.yaml: field 'learning_rate'",
         "finite number", files={"dpo.yaml": "learning_rate: .nan\n"}),
    case("inf-beta-dpo", "train dpo --beta inf", "field 'beta'", "finite number"),
    case("nan-max-grad-norm", "train rm --max-grad-norm nan", "field 'max_grad_norm'", "finite number"),
    case("inf-nested-lora-dropout", "train safe-mm-dpo --set lora.dropout=.inf", "field 'lora.dropout'",
         "finite number"),
    case("nan-nested-in-yaml", "train sft --config {tmp}/sft.yaml", "sft.yaml: field 'lora.dropout'",
         files={"sft.yaml": "lora:\n  enabled: true\n  dropout: .nan\n"}),
    case("inf-kl-coeff-ppo", f"train ppo {PPO_ARGS} --kl-coeff inf", "field 'kl_coeff'", "finite number"),
    case("nan-cost-threshold-ppo-lag", f"{'train ppo-lag'} {SCHEMA_ONLY['train ppo-lag']} --cost-threshold nan",
         "field 'cost_threshold'", "finite number"),
    case("inf-temperature-generate", "generate --temperature inf", "field 'temperature'", "finite number"),
    case("nan-min-reward-distill", "distill --reward-model rm --min-reward nan", "field 'min_reward'",
         "finite number"),
    case("inf-tie-tolerance-arena", "eval arena --tie-tolerance inf", "field 'tie_tolerance'", "finite number"),
    case("nan-train-ratio-prepare", "prepare-data --train-ratio nan", "field 'train_ratio'", "finite number"),
    case("inf-epochs", "train sft --epochs inf", "field 'epochs'", "finite number"),
    case("inf-in-int-field", "tiny-model --hidden-size inf", "field 'hidden_size'"),
    case("string-in-int-field", "train sft --batch-size eight", "field 'batch_size'", "integer"),
    case("negative-learning-rate", "train dpo --learning-rate -1e-5", "field 'learning_rate'", "greater than 0"),
    case("bad-literal", "train sft --mixed-precision fp8", "field 'mixed_precision'"),
    case("explicit-prompt-length-too-long", "train dpo --max-length 128 --max-prompt-length 200",
         "max_prompt_length (200) must be below max_length (128)"),
    case("ppl-prompt-length-too-long", "eval ppl --max-length 64 --max-prompt-length 64",
         "max_prompt_length (64) must be below max_length (64)"),
    case("ppo-no-room-for-answer", f"train ppo {PPO_ARGS} --max-length 100 --max-new-tokens 128",
         "max_new_tokens (128) must fit in max_length (100)"),
    case("ppo-without-reward", "train ppo", "set reward_model_path, reward_fn, or both"),
    case("ppo-lag-without-cost", f"train ppo-lag {PPO_ARGS}", "ppo-lag needs cost_model_path, cost_fn, or both"),
    case("distill-min-reward-without-model", "distill --min-reward 1", "min_reward needs a reward_model"),
    case("ratios-do-not-sum", "prepare-data --train-ratio 0.5", "must sum to 1"),
    case("tiny-heads-do-not-divide", "tiny-model --num-heads 3", "num_heads (3) must divide hidden_size (64)"),
    # ---------------------------------------------------------------- config files
    *[case(f"duplicate-key-{stem}", f"validate {{tmp}}/{stem}.yaml", f"{{tmp}}/{stem}.yaml:3: key 'seed' given twice",
           "first on line 1", files={f"{stem}.yaml": "seed: 1\nlearning_rate: 1.0e-5\nseed: 2\n"})
      for stem in ("sft", "dpo", "rm", "safe_mm_dpo")],
    case("duplicate-nested-key", "train sft --config {tmp}/sft.yaml", "sft.yaml:4: key 'r' given twice",
         files={"sft.yaml": "seed: 1\nlora:\n  r: 8\n  r: 16\n"}),
    case("duplicate-key-in-run-config", "train dpo --config {tmp}/dpo.yaml", "dpo.yaml:2: key 'beta' given twice",
         files={"dpo.yaml": "beta: 0.1\nbeta: 0.5\n"}),
    case("duplicate-key-flow-mapping", "validate {tmp}/sft.yaml", "sft.yaml:1: key 'r' given twice",
         files={"sft.yaml": "lora: {r: 8, r: 16}\n"}),
    case("yaml-syntax-error", "train sft --config {tmp}/sft.yaml", "sft.yaml:2: not valid YAML",
         files={"sft.yaml": "seed: 1\nbad: a: b\nlr: 1\n"}),
    case("yaml-not-a-mapping", "train dpo --config {tmp}/dpo.yaml", "dpo.yaml: a config must be a mapping",
         files={"dpo.yaml": "- seed: 1\n"}),
    case("yaml-not-utf8", "train rm --config {tmp}/rm.yaml", "rm.yaml: not UTF-8 text", files={"rm.yaml": b"seed: \xff\n"}),
    case("config-file-missing", "train sft --config {tmp}/nope.yaml", "nope.yaml: config file not found"),
    case("config-is-a-folder", "train sft --config {tmp}/confs", "confs: is a folder, not a config file",
         files={"confs/": ""}),
    case("validate-missing-file", "validate {tmp}/dpo_missing.yaml", "dpo_missing.yaml: config file not found"),
    case("validate-missing-unknown-stem", "validate {tmp}/whatever.yaml", "whatever.yaml: config file not found"),
    case("validate-unknown-stem", "validate {tmp}/whatever.yaml", "cannot tell which command", "--command NAME",
         files={"whatever.yaml": "seed: 1\n"}),
    case("validate-unknown-command", "validate {tmp}/x.yaml --command trian", "unknown command 'trian'",
         files={"x.yaml": "seed: 1\n"}),
    case("validate-no-file", "validate", "usage: humanalign validate CONFIG"),
    case("validate-inf", "validate {tmp}/ppo_lag.yaml", "ppo_lag.yaml: field 'lambda_lr'", "finite number",
         files={"ppo_lag.yaml": "reward_fn: a:b\ncost_fn: a:b\nlambda_lr: .inf\n"}),
    case("validate-unknown-key", "validate {tmp}/generate.yaml", "generate.yaml: unknown key 'temprature'",
         files={"generate.yaml": "temprature: 0.5\n"}),
    # ---------------------------------------------------------------- output paths, checked before any work
    *[case(f"output-under-a-file-{c.replace(' ', '-')}",
           f"{c} {SCHEMA_ONLY[c]} --{flag} {{tmp}}/afile/out{suffix}",
           f"{{tmp}}/afile/out{suffix} ({flag.replace('-', '_')}): cannot be created: {{tmp}}/afile is a file",
           files=A_FILE)
      for c, flag, suffix in [
          ("prepare-data", "output-dir", ""), ("tiny-model", "output-dir", ""), ("demo", "output-dir", ""),
          ("train sft", "output-dir", ""), ("train rm", "output-dir", ""), ("train dpo", "output-dir", ""),
          ("train safe-mm-dpo", "output-dir", ""), ("train ppo", "output-dir", ""),
          ("train ppo-lag", "output-dir", ""), ("generate", "output", ".jsonl"), ("distill", "output", ".jsonl"),
          ("eval arena", "output-dir", ""), ("eval rm", "output", ".json"), ("eval ppl", "output", ".json"),
          ("export", "output", ""), ("train sft", "logging-dir", ""),
      ]],
    case("output-dir-is-a-file", "train dpo --output-dir {tmp}/afile", "afile (output_dir): is a file, not a folder",
         files=A_FILE),
    case("output-file-is-a-folder", "generate --output {tmp}/outdir", "outdir (output): is a folder, not a file",
         files={"outdir/": ""}),
    case("export-output-is-a-file", "export --output {tmp}/afile", "afile (output): is a file, not a folder",
         files=A_FILE),
    case("output-path-alias-under-file", "distill --output-path {tmp}/afile/d.jsonl", "(output): cannot be created",
         files=A_FILE),
    case("report-output-under-a-file", "report {tmp}/run --output {tmp}/afile/r",
         "{tmp}/afile/r (--output): cannot be created", files={**A_FILE, "run/metrics.jsonl": METRICS}),
    case("output-read-only-train", "train sft --output-dir /sys/humanalign-test/run",
         "/sys/humanalign-test/run (output_dir): cannot write in /sys", needs_sys=True),
    case("output-read-only-prepare", "prepare-data --output-dir /sys/humanalign-test",
         "(output_dir): cannot write in /sys", needs_sys=True),
    case("output-read-only-generate", "generate --output /sys/humanalign-test.jsonl",
         "(output): cannot write in /sys", needs_sys=True),
    case("output-read-only-report", "report {tmp}/run --output /sys/humanalign-report",
         "(--output): cannot write in /sys", files={"run/metrics.jsonl": METRICS}, needs_sys=True),
    # ---------------------------------------------------------------- input data (prepare-data, cheap to reach)
    case("gz-truncated", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw/pku.jsonl.gz:", "gzip data ends early", files={"raw/pku.jsonl.gz": RAW_GZ_TRUNCATED}),
    case("gz-not-gzip", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw/pku.jsonl.gz:1: not a gzip file", files={"raw/pku.jsonl.gz": jsonl(GOOD_RAW).encode()}),
    case("gz-corrupt", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw/pku.jsonl.gz:", "gzip", files={"raw/pku.jsonl.gz": gzip.compress(b"x" * 100)[:10] + b"\x00" * 40}),
    case("json-gz-truncated", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw/pku.json.gz: the gzip data ends early", files={"raw/pku.json.gz": RAW_GZ_TRUNCATED}),
    case("parquet-garbage", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw/pku.parquet: not a readable parquet file", files={"raw/pku.parquet": b"not parquet"}),
    case("no-usable-pairs-names-file", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw: no usable pairs", "identical responses",
         files={"raw/pku.jsonl": jsonl({**GOOD_RAW, "response_1": GOOD_RAW["response_0"]})}),
    case("unsupported-suffix-given-as-file", "prepare-data --input-dir {tmp}/raw.csv --output-dir {tmp}/out",
         "raw.csv: unsupported file type", files={"raw.csv": "a,b\n"}),
    case("json-not-a-list", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw/pku.json: expected a non-empty JSON list", files={"raw/pku.json": "[]"}),
    case("folder-without-data-files", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/raw: no data files", files={"raw/readme.txt": "nothing here\n"}),
    case("existing-outputs-kept", "prepare-data --input-dir {tmp}/raw --output-dir {tmp}/out",
         "{tmp}/out/train/helpful_pairs.jsonl already exists", "--overwrite",
         files={"raw/pku.jsonl": jsonl(GOOD_RAW), "out/train/helpful_pairs.jsonl": jsonl(PAIR)}),
    case("prepare-source-missing-path", "prepare-data --config {tmp}/prepare_data.yaml --output-dir {tmp}/out",
         "{tmp}/gone.jsonl: not found", files={"prepare_data.yaml": "sources:\n  - path: {tmp}/gone.jsonl\n"}),
    # ---------------------------------------------------------------- report
    case("report-missing-run", "report {tmp}/nope", "{tmp}/nope: no such run folder"),
    case("report-no-metrics", "report {tmp}/run", "{tmp}/run: no metrics.jsonl", files={"run/notes.txt": "x\n"}),
    case("report-malformed-line", "report {tmp}/run", "{tmp}/run/metrics.jsonl:2:", "malformed JSON",
         files={"run/metrics.jsonl": '{"step": 1, "a": 1}\n{"step": 2,\n{"step": 3, "a": 2}\n'}),
    case("report-no-numeric-metrics", "report {tmp}/run", "metrics.jsonl: no numeric metrics with a step",
         files={"run/metrics.jsonl": '{"note": "hello"}\n'}),
    case("report-existing-output", "report {tmp}/run --output {tmp}/rep", "{tmp}/rep: already exists",
         "--overwrite", files={"run/metrics.jsonl": METRICS, "rep/report.html": "<p>mine</p>\n"}),
    case("report-logging-dir-missing", "report {tmp}/run", "its metrics were logged to {tmp}/logs",
         "config.resolved.yaml: logging_dir", files={"run/config.resolved.yaml": "logging_dir: {tmp}/logs\n"}),
    # ---------------------------------------------------------------- models and inputs named by the command
    case("generate-missing-model", "generate --model {tmp}/no_model --prompts {tmp}/p.jsonl --output {tmp}/o.jsonl",
         "{tmp}/no_model: model path not found", files={"p.jsonl": jsonl({"prompt": "Hi"})}),
    case("export-missing-model", "export --model {tmp}/no_adapter --output {tmp}/merged",
         "{tmp}/no_adapter: model path not found"),
    *[case(f"missing-train-data-{c.replace(' ', '-')}", f"{c} {SCHEMA_ONLY[c]} --{flag} {{tmp}}/gone.jsonl",
           f"{{tmp}}/gone.jsonl ({key}): not found")
      for c, flag, key in [
          ("train sft", "train-path", "train_path"), ("train dpo", "train-path", "train_path"),
          ("train rm", "train-helpful-path", "train_helpful_path"),
          ("train safe-mm-dpo", "train-helpful-path", "train_helpful_path"),
          ("train ppo", "prompts-path", "prompts_path"), ("train ppo-lag", "train-prompts-path", "prompts_path"),
      ]],
    case("missing-harmless-data-cost-model", "train rm --task harmless --train-harmless-path {tmp}/gone.jsonl",
         "{tmp}/gone.jsonl (train_harmless_path): not found"),
    case("missing-data-folder-default", "train dpo", "data/train/helpful_pairs.jsonl (train_path): not found"),
    case("resume-from-missing-checkpoint", "train sft --train-path {tmp}/p.jsonl --output-dir {tmp}/run "
         "--resume-from-checkpoint {tmp}/nope", "resume_from_checkpoint: {tmp}/nope is not a folder",
         files={"p.jsonl": jsonl({"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"}]})}),
    case("generate-missing-prompts", "generate --model tiny --prompts {tmp}/gone.jsonl --output {tmp}/o.jsonl",
         "{tmp}/gone.jsonl: file not found"),
    case("generate-needs-model", "generate --prompts {tmp}/p.jsonl --output {tmp}/o.jsonl",
         "`humanalign generate` needs --model", files={"p.jsonl": jsonl({"prompt": "Hi"})}),
    case("tiny-model-missing-corpus", "tiny-model --corpus {tmp}/gone.txt --output-dir {tmp}/tm",
         "{tmp}/gone.txt: corpus file not found"),
    case("export-hub-name", "export --model some-org/some-model --output {tmp}/merged",
         "some-org/some-model: export needs a local model or adapter folder"),
    case("eval-ppl-missing-model", "eval ppl --model {tmp}/no_model --data {tmp}/p.jsonl",
         "{tmp}/no_model: model path not found", files={"p.jsonl": jsonl(PAIR)}),
    case("distill-missing-model", "distill --model {tmp}/no_model --prompts {tmp}/p.jsonl --output {tmp}/d.jsonl",
         "{tmp}/no_model: model path not found", files={"p.jsonl": jsonl({"prompt": "Hi"})}),
    case("arena-missing-model", "eval arena --red {tmp}/no_red --blue tiny --reward-model {tmp}/rm --cost-model "
         "{tmp}/cm --prompts {tmp}/p.jsonl --output-dir {tmp}/arena", "{tmp}/no_red: model path not found",
         files={"p.jsonl": jsonl({"prompt": "Hi"})}),
    case("eval-rm-missing-model", "eval rm --model {tmp}/no_rm --data {tmp}/p.jsonl", "{tmp}/no_rm",
         files={"p.jsonl": jsonl(PAIR)}),
    # ---------------------------------------------------------------- prompts with images
    case("generate-prompt-image-missing", "generate --model tiny --prompts {tmp}/p.jsonl --output {tmp}/o.jsonl",
         "{tmp}/p.jsonl:2: field 'images[0]': image 'pics/gone.png' not found",
         files={"p.jsonl": jsonl({"prompt": "Hi"}, {"prompt": "<image>Colour?", "images": ["pics/gone.png"]})}),
    case("generate-prompt-image-unreadable", "generate --model tiny --prompts {tmp}/p.jsonl --output {tmp}/o.jsonl",
         "{tmp}/p.jsonl:1: field 'image': image 'red.png' is not a readable image",
         files={"p.jsonl": jsonl({"question": "Colour?", "image": "red.png"}), "red.png": "not a picture\n"}),
    case("generate-prompt-placeholders", "generate --model tiny --prompts {tmp}/p.jsonl --output {tmp}/o.jsonl",
         "{tmp}/p.jsonl:1: field 'images': 2 '<image>' placeholders but 1 image",
         files={"p.jsonl": jsonl({"prompt": "<image> or <image>?", "images": ["red.png"]}), "red.png": PNG}),
    case("generate-text-model-image-prompts", "generate --model tiny --prompts {tmp}/p.jsonl --output {tmp}/o.jsonl",
         "{tmp}/p.jsonl: 1 of 2 prompts show images, but the model 'tiny' is a text-only model",
         files={"p.jsonl": jsonl({"prompt": "Hi"}, {"query": "Colour?", "images": ["red.png"]}), "red.png": PNG}),
    case("distill-text-model-image-prompts", "distill --model tiny --prompts {tmp}/p.jsonl --output {tmp}/d.jsonl",
         "{tmp}/p.jsonl: 1 of 1 prompts show images, but the model 'tiny' is a text-only model",
         files={"p.jsonl": jsonl({"question": "Colour?", "image": "red.png"}), "red.png": PNG}),
    case("arena-text-model-image-prompts", "eval arena --red tiny --blue tiny --reward-model {tmp}/rm --cost-model "
         "{tmp}/cm --prompts {tmp}/p.jsonl --output-dir {tmp}/arena", "but the red model 'tiny' is a text-only model",
         files={"p.jsonl": jsonl({"prompt": [{"role": "user", "content": [
             {"type": "image", "image": "red.png"}, {"type": "text", "text": "Colour?"}]}]}), "red.png": PNG}),
    case("ppo-image-prompts", f"train ppo {PPO_ARGS} --prompts-path {{tmp}}/p.jsonl --output-dir {{tmp}}/run",
         "{tmp}/p.jsonl:1: field 'images': prompts with images are not taken by PPO and GRPO rollouts",
         "`generate`, `eval arena` and `distill`", files={"p.jsonl": jsonl({"prompt": "Colour?", "images": ["red.png"]}),
                                                      "red.png": PNG}),
]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, tmp_path: Path, monkeypatch, capsys):
    if c.needs_sys and not ON_SYS:
        pytest.skip("needs a Linux /sys (a place no one may create folders in)")
    for rel, content in c.files.items():
        path = tmp_path / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(_fill(content, tmp_path), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for var in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):  # the CLI may set them: undone after
        monkeypatch.delenv(var, raising=False)
    before = _hashes(tmp_path)
    capsys.readouterr()
    code = main([_fill(a, tmp_path) for a in c.argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == c.code, err
    assert len(lines) == 1 and lines[0].startswith("humanalign: error: "), err
    for fragment in c.expect:
        assert _fill(fragment, tmp_path) in lines[0], (fragment, lines[0])
    after = _hashes(tmp_path)
    assert {k: after.get(k) for k in before} == before, "an existing file changed or vanished"
    if not c.new_files_ok:
        assert set(after) == set(before), f"new files: {sorted(set(after) - set(before))}"


def test_the_corpus_covers_every_command():
    words = {" ".join(c.argv[:2]) if " ".join(c.argv[:2]) in COMMANDS else c.argv[0] for c in CASES if c.argv}
    assert set(COMMANDS) | {"report", "validate"} <= words
    assert len(CASES) >= 80


HELP_WORDS = ["report", "validate", "train", "eval", *COMMANDS]


@pytest.mark.parametrize("words", HELP_WORDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_works_for_every_command(words: str, flag: str, capsys):
    assert main([*words.split(), flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: humanalign {words}"), out


# ================================================================================================ run folders
# Mistakes that need a real run folder: damaged checkpoints, a folder held by another run, a stale lock. One
# tiny run per training command (2 steps, a checkpoint after each) is built once per module; every case damages a
# copy of it in its own folder ({tmp}/run), runs the same command line into it and checks, as above, the exit
# code, the error (the last stderr line; the lines before it are the run's own "[name] ..." notes, never a
# traceback) and that no file of the run changed. Signals: tests/engine/test_signals.py (a real `train dpo`).

RUN_COMMON = ("--report-to [none] --progress-bar false --logging-steps 1 --max-steps 2 --save-steps 1 "
              "--eval-steps 1000 --eval-on-start false --seed 0 --max-length 64 --max-prompt-length 32 --batch-size 2 "
              "--overwrite-output-dir false")  # the tiny configs overwrite
RUN_COMMANDS = {  # command -> its flags after the shared ones; {data} is the module's prepared data folder
    "train sft": "--config {configs}/sft_tiny.yaml --train-path {data}/helpful_pairs.jsonl --val-path null",
    "train rm": "--config {configs}/rm_tiny.yaml --train-helpful-path {data}/helpful_pairs.jsonl "
                "--val-helpful-path null",
    "train dpo": "--config {configs}/dpo_tiny.yaml --train-path {data}/helpful_pairs.jsonl --val-path null",
    "train safe-mm-dpo": "--config {configs}/safe_mm_dpo_tiny.yaml --train-helpful-path {data}/helpful_pairs.jsonl "
                         "--train-harmless-path {data}/harmless_pairs.jsonl --val-helpful-path null "
                         "--val-harmless-path null",
    "train ppo": "--actor-model-path tiny --prompts-path {data}/prompts.jsonl --reward-fn keyword_reward "
                 "--rollout-batch-size 2 --max-new-tokens 4",
    "train ppo-lag": "--actor-model-path tiny --prompts-path {data}/prompts.jsonl --reward-fn keyword_reward "
                     "--cost-fn banned_word_cost --rollout-batch-size 2 --max-new-tokens 4",
    # one prompt answered twice per rollout = one optimizer step of 2 sequences: a checkpoint per step
    "train grpo": "--actor-model-path tiny --prompts-path {data}/prompts.jsonl --reward-fn keyword_reward "
                  "--rollout-batch-size 1 --num-generations 2 --max-new-tokens 4",
    "train grpo-lag": "--actor-model-path tiny --prompts-path {data}/prompts.jsonl --reward-fn keyword_reward "
                      "--cost-fn banned_word_cost --rollout-batch-size 1 --num-generations 2 --max-new-tokens 4",
}
CK = "{tmp}/run/checkpoint-2"  # the latest checkpoint of a built run
PREVIOUS = "resume from the previous checkpoint instead: --resume-from-checkpoint {tmp}/run/checkpoint-1"
LOCK_HOLDER = "is in use by another run (pid {pid} on "


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_checkpoints(run: Path) -> None:
    for folder in run.glob("checkpoint-*"):
        shutil.rmtree(folder)


def _stale_lock(run: Path) -> None:  # what a run killed with SIGKILL leaves: the holder's record, no flock
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01 00:00:00 UTC"}))


@dataclass
class RunCase:
    id: str
    command: str  # a key of RUN_COMMANDS
    flags: list[str]  # after the command's own
    expect: list[str]
    damage: Callable[[Path], None] | None = None  # applied to the copied run folder
    hold_lock: bool = False  # the test process holds the folder's lock while the command runs
    gone: tuple[str, ...] = ()  # files (relative to {tmp}) the command may remove: a stale lock it took over


RESUME = ["--resume-from-checkpoint", "latest"]
RUN_CASES: list[RunCase] = []
for _c in RUN_COMMANDS:
    _n = _c.replace("train ", "")
    RUN_CASES += [
        # ------------------------------------------------------------ damaged checkpoints
        RunCase(f"{_n}-model-truncated", _c, RESUME, [f"cannot resume: {CK}/model.safetensors is truncated; {PREVIOUS}"],
                lambda r: _truncate(r / "checkpoint-2" / "model.safetensors")),
        RunCase(f"{_n}-optimizer-missing", _c, RESUME, [f"cannot resume: {CK}/optimizer.bin is missing; {PREVIOUS}"],
                lambda r: (r / "checkpoint-2" / "optimizer.bin").unlink()),
        RunCase(f"{_n}-scheduler-truncated", _c, RESUME,
                [f"cannot resume: {CK}/scheduler.pt is truncated or damaged; {PREVIOUS}"],
                lambda r: _truncate(r / "checkpoint-2" / "scheduler.pt")),
        RunCase(f"{_n}-trainer-state-corrupt", _c, RESUME, [f"{CK}: cannot read trainer_state.json", PREVIOUS],
                lambda r: (r / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2,')),
        RunCase(f"{_n}-checkpoint-not-found", _c, ["--resume-from-checkpoint", "{tmp}/run/checkpoint-9"],
                ["resume_from_checkpoint: {tmp}/run/checkpoint-9 is not a folder"]),
        RunCase(f"{_n}-checkpoint-incomplete", _c, ["--resume-from-checkpoint", CK],
                [f"resume_from_checkpoint: {CK} is not a complete checkpoint (no trainer_state.json)"],
                lambda r: (r / "checkpoint-2" / "trainer_state.json").unlink()),
        RunCase(f"{_n}-latest-without-checkpoint", _c, RESUME,
                ["resume_from_checkpoint: latest: {tmp}/run holds no complete checkpoint to resume",
                 "--overwrite-output-dir"], _drop_checkpoints),
        # ------------------------------------------------------------ another run holds the folder
        *[RunCase(f"{_n}-locked{tag}", _c, flags, [LOCK_HOLDER, "lock file: {tmp}/run/.humanalign.lock"],
                  hold_lock=True)
          for tag, flags in [("", []), ("-overwrite", ["--overwrite-output-dir", "true"]), ("-resume", RESUME)]],
        # a stale lock does not block: the run goes on to the next check (here: no checkpoint to resume)
        RunCase(f"{_n}-stale-lock-taken-over", _c, RESUME, ["holds no complete checkpoint to resume"],
                lambda r: (_drop_checkpoints(r), _stale_lock(r)), gone=("run/" + LOCK_FILE,)),
    ]


@pytest.fixture(scope="module")
def built_runs(tmp_path_factory) -> dict[str, tuple[list[str], Path]]:
    """command -> (its argv without --output-dir, a finished 2-step run folder with checkpoint-1 and -2)."""
    from humanalign.config.base import load_config
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("corpus_runs")
    raw = write_demo_raw(root / "raw", n=80, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "prep"),
                                                   "seed": 0}))
    data = root / "prep" / "train"
    rows = (data / "helpful_pairs.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (data / "prompts.jsonl").write_text(jsonl(*({"prompt": json.loads(r)["prompt"]} for r in rows)), encoding="utf-8")
    built = {}
    for command, flags in RUN_COMMANDS.items():
        argv = [*command.split(), *flags.format(configs=PROJECT_ROOT / "configs", data=data).split(),
                *RUN_COMMON.split()]
        run = root / command.replace(" ", "-")
        assert main([*argv, "--output-dir", str(run)]) == 0, command
        assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}, command
        built[command] = (argv, run)
    return built


@pytest.mark.slow
@pytest.mark.parametrize("c", RUN_CASES, ids=[c.id for c in RUN_CASES])
def test_bad_run_folder(c: RunCase, built_runs, tmp_path: Path, monkeypatch, capsys):
    argv, source = built_runs[c.command]
    run = tmp_path / "run"
    shutil.copytree(source, run)
    if c.damage is not None:
        c.damage(run)
    monkeypatch.chdir(tmp_path)
    held = RunLock.acquire(run) if c.hold_lock else None  # a second open file: a flock of its own, as another run's
    try:
        before = _hashes(tmp_path)
        capsys.readouterr()
        code = main([*argv, "--output-dir", str(run), *(_fill(f, tmp_path) for f in c.flags)])
        err = capsys.readouterr().err
        after = _hashes(tmp_path)
    finally:
        if held is not None:
            held.release()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("humanalign: error: "), err
    assert all(line.startswith("[") for line in lines[:-1]), err  # the run's own notes, no traceback
    for fragment in c.expect:
        assert _fill(fragment, tmp_path).replace("{pid}", str(os.getpid())) in lines[-1], (fragment, lines[-1])
    for rel in c.gone:
        assert rel in before and rel not in after, rel  # taken over, then released with the run
        before.pop(rel)
    assert after == before, "a file of the run changed, vanished or was added"


def test_the_run_corpus_covers_every_training_command():
    assert {c.command for c in RUN_CASES} == {c for c in COMMANDS if c.startswith("train ")}


@pytest.mark.slow
def test_sigterm_stops_a_resumed_sft_run_with_a_checkpoint_and_keeps_the_earlier_ones(built_runs, tmp_path):
    """A signal (the dpo run of tests/engine/test_signals.py, here `train sft` resumed): exit 143, one line
    naming the step and its checkpoint, the checkpoints that were there untouched, the lock released."""
    argv, source = built_runs["train sft"]
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = {k: v for k, v in _hashes(tmp_path).items() if k.startswith("run/checkpoint-")}
    # save_total_limit null: with a checkpoint each step, a slow machine's step 4 would rotate checkpoint-1 out
    # before the signal lands; what this test guards is the signal, not the rotation
    argv = [*argv, "--output-dir", str(run), *RESUME, "--max-steps", "400", "--save-total-limit", "null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "humanalign.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 180
    while '"step": 3' not in (run / "metrics.jsonl").read_text(encoding="utf-8"):  # a step after the resume
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no step after the resume within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("humanalign: stopped by SIGTERM after step "), err[-3000:]
    step = int(last.split(" after step ")[1].split("/")[0])
    assert 3 <= step < 400 and f"checkpoint saved to {run / f'checkpoint-{step}'}; resume with: " in last
    assert json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["step"] == step
    after = _hashes(tmp_path)
    assert {k: after.get(k) for k in before} == before  # checkpoint-1 and -2 as they were
    assert not (run / LOCK_FILE).exists()
