"""Ctrl-C and SIGTERM on a real `humanalign train dpo` run: it stops after the current step with a checkpoint,
exits 130 / 143 printing the command that resumes, and that command continues to the uninterrupted losses.
While it runs, a second run into its folder is refused, naming it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from humanalign.cli import main
from humanalign.paths import PROJECT_ROOT

STEPS = 6  # the resumed and the reference runs end here; the signalled run is started for 400
ARGS = ["train", "dpo", "--config", str(PROJECT_ROOT / "configs" / "dpo_tiny.yaml"), "--lr-scheduler", "constant",
        "--eval-on-start", "false", "--logging-steps", "1", "--eval-steps", "1000", "--save-steps", "1000",
        "--report-to", "[none]", "--progress-bar", "false", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    from humanalign.config.base import load_config
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("signals")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return ["--train-path", str(root / "data" / "val" / "helpful_pairs.jsonl"),
            "--val-path", str(root / "data" / "test" / "helpful_pairs.jsonl")]


@pytest.fixture(scope="module")
def reference(data_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([*ARGS, *data_args, "--output-dir", str(out), "--max-steps", str(STEPS)]) == 0
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_a_step_with_a_checkpoint_and_the_printed_command_resumes(
        sig, data_args, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*ARGS, *data_args, "--output-dir", str(run_dir), "--max-steps", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "humanalign.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").is_file() and losses(run_dir)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no logged step within 180 s"
        time.sleep(0.05)

    # a second run into the same folder, even one that asks to resume, is refused: nothing of the first is touched
    assert main([*argv, "--resume-from-checkpoint", "latest"]) == 2
    assert f"is in use by another run (pid {proc.pid} on " in capsys.readouterr().err

    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"humanalign: stopped by {signal.Signals(sig).name} after step "), err[-3000:]
    step = int(last.split(" after step ")[1].split("/")[0])
    assert 1 <= step < STEPS  # the signal came right after the first logged step
    assert f"checkpoint saved to {run_dir / f'checkpoint-{step}'}; resume with: " in last
    command = last.split("; resume with: ")[1]
    assert command == shlex.join([sys.executable, "-m", "humanalign.cli", *argv, "--resume-from-checkpoint", "latest"])
    assert json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["step"] == step
    assert not (run_dir / "final").exists() and not (run_dir / ".humanalign.lock").exists()

    resumed = shlex.split(command)[3:]  # after "python -m humanalign.cli"
    assert main([*resumed, "--max-steps", str(STEPS)]) == 0  # a constant lr: the shorter run is the same run
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in want) < 1e-6
    a, b = load_file(str(run_dir / "final" / "model.safetensors")), load_file(str(reference / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert all(torch.isfinite(v).all() for v in a.values())
