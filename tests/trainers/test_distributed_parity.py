"""Two CPU processes (torchrun, gloo) train like one process with the same global batch: DPO, and the cost model.

`humanalign train dpo` on the tiny model and the demo pairs, 6 steps of 8 pairs: one process with batch_size 8
against `torchrun --nproc_per_node 2` with batch_size 4 per process. The engine gives both runs the same 8 pairs
in every step (tests/engine/test_distributed.py), the loss is a mean over pairs and DDP averages the gradients
over the 2 equal halves, so the per-step losses, the held-out metrics and the final weights agree up to the order
of float sums (gloo's all-reduce). Tolerance 1e-5 on the losses (measured: at most ~1e-6); the weights below.

Both reference modes that run a model during training: a frozen copy (full fine-tuning) and the LoRA policy with
its adapter disabled (the reference forward goes through the DDP-wrapped policy). Both runs compute each pair as
one row with the prompt once (the shared layout of models/logprobs.py), which the log line confirms.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from humanalign.paths import PROJECT_ROOT

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
STEPS = 6
COMMON = ["--max-steps", str(STEPS), "--logging-steps", "1", "--eval-steps", "3", "--save-steps", "6",
          "--report-to", "[none]", "--progress-bar", "false",
          "--eval-on-start", "false", "--lr-scheduler", "constant", "--seed", "3"]
FULL = ["--learning-rate", "5e-3"]
LORA = ["--learning-rate", "3e-2", "--set", "lora.enabled=true", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory) -> Path:
    """The demo pairs (485 train / 59 val) prepared once; the runs train on the 59 val pairs (6 steps of 8)
    and evaluate on the 56 test pairs."""
    from humanalign.config.base import load_config
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("dpo_ddp")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return root / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(prefix: list[str], out: Path, data: Path, batch_size: int, extra: list[str], command: str = "dpo") -> str:
    if command == "dpo":
        what = ["dpo", "--config", str(PROJECT_ROOT / "configs" / "dpo_tiny.yaml"),
                "--train-path", str(data / "val" / "helpful_pairs.jsonl"),
                "--val-path", str(data / "test" / "helpful_pairs.jsonl")]
    else:  # the Harmless cost model
        what = ["rm", "--config", str(PROJECT_ROOT / "configs" / "cost_tiny.yaml"),
                "--set", f"train_harmless_path={data / 'val' / 'harmless_pairs.jsonl'}",
                "--set", f"val_harmless_path={data / 'test' / 'harmless_pairs.jsonl'}"]
    cmd = [*prefix, "-m", "humanalign.cli", "train", *what, "--output-dir", str(out), "--batch-size", str(batch_size),
           *COMMON, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]
    return {m["step"]: m[key] for m in lines if key in m}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "adapter-disabled"])
def test_two_processes_match_one_process(mode, demo_pairs, tmp_path):
    lora = mode == "adapter-disabled"
    extra = LORA if lora else FULL
    one, two = tmp_path / "one", tmp_path / "two"
    log_one = train([sys.executable], one, demo_pairs, 8, extra)
    log_two = train([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port())], two, demo_pairs, 4,
                    extra)
    for log in (log_one, log_two):
        assert f"reference: {mode}" in log and "pair forward: one row per pair" in log
    state = json.loads((two / "checkpoint-6" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["num_processes"] == 2 and state["examples_per_step"] == 8

    a, b = metrics(one, "train/loss"), metrics(two, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a[1] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at the start: ln 2 in both
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert a[STEPS] < a[1] - 0.01  # it trained
    for key in ("train/rewards/margins", "train/logps/chosen"):
        ma, mb = metrics(one, key), metrics(two, key)
        assert max(abs(ma[s] - mb[s]) for s in ma) < 1e-4 * max(1.0, max(abs(v) for v in ma.values())), key
    ea, eb = metrics(one, "eval/loss"), metrics(two, "eval/loss")
    assert sorted(ea) == sorted(eb) == [3, 6] and max(abs(ea[s] - eb[s]) for s in ea) < 1e-5

    # Adam divides each gradient by its own running scale, so a weight whose gradient is round-off sized (the
    # embedding row of a token seen once) moves by a visible fraction of the learning rate either way. Measured
    # (full fine-tuning): 2 of 198,528 weights differ by more than 1e-5 (at most 3.4e-5), 56 by more than 1e-6.
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    wa, wb = load_file(str(one / "final" / name)), load_file(str(two / "final" / name))
    assert wa.keys() == wb.keys() and len(wa) > 0
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diffs.max().item() < 2e-4 and (diffs > 1e-6).float().mean().item() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", ["running", "ema"])
def test_the_cost_model_on_two_processes_matches_one_process(normalizer, demo_pairs, tmp_path):
    """`humanalign train rm --task harmless` (pairwise + sign terms), 6 steps of 8 pairs: the losses and held-out
    metrics agree, and so do the score normaliser's statistics, which each rank updates from the end scores of
    both ranks (gathered), so every rank holds, and the one saved model carries, the single process's numbers."""
    extra = ["--learning-rate", "1e-2", "--set", f"normalizer={normalizer}"]
    one, two = tmp_path / "one", tmp_path / "two"
    train([sys.executable], one, demo_pairs, 8, extra, command="rm")
    train([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port())], two, demo_pairs, 4, extra,
          command="rm")
    state = json.loads((two / "checkpoint-6" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["num_processes"] == 2 and state["examples_per_step"] == 8

    a, b = metrics(one, "train/loss"), metrics(two, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert a[STEPS] < a[1]  # it trained
    for key in ("eval/loss", "eval/accuracy", "eval/sign_accuracy"):
        ea, eb = metrics(one, key), metrics(two, key)
        assert sorted(ea) == sorted(eb) == [3, 6] and max(abs(ea[s] - eb[s]) for s in ea) < 1e-5, key

    def saved_statistics(run: Path) -> dict:
        config = json.loads((run / "final" / "config.json").read_text(encoding="utf-8"))
        return next(v for k, v in config.items() if isinstance(v, dict) and "normalizer" in v)["normalizer"]

    na, nb = saved_statistics(one), saved_statistics(two)
    assert na["kind"] == nb["kind"] == normalizer and na["count"] == nb["count"] == 2 * 8 * STEPS  # both answers
    assert na["mean"] == pytest.approx(nb["mean"], abs=1e-5) and na["var"] == pytest.approx(nb["var"], abs=1e-5)
    assert na["var"] > 0  # the scores moved: a real check, not two zeros
