"""Two CPU processes (torchrun, gloo) follow the single-process loss curve for the same examples per step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_toy import read_metrics
from safetensors.torch import load_file

TOY = Path(__file__).with_name("engine_toy.py")
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
VALUES = {"max_steps": 10, "eval_steps": 5, "save_steps": 5, "learning_rate": 1e-2}


def launch(prefix: list[str], values: dict, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*prefix, str(TOY), json.dumps(values), *extra], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    launch([sys.executable], {"output_dir": str(single), "batch_size": 4, **VALUES})
    launch([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29517"],
           {"output_dir": str(double), "batch_size": 2, **VALUES})
    state = json.loads((double / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["examples_per_step"] == 4
    assert sorted((double).glob("random_states_*")) == []  # per-rank RNG states live in the checkpoint
    assert (double / "checkpoint-10" / "random_states_1.pkl").is_file()
    a, b = read_metrics(single), read_metrics(double)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    # Same examples per step and token-weighted losses: only the order of float sums differs (gloo all-reduce).
    # Measured: at most 5e-7 apart over 10 steps.
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    ea, eb = read_metrics(single, "eval/loss"), read_metrics(double, "eval/loss")
    assert list(ea) == [5, 10] and max(abs(ea[s] - eb[s]) for s in ea) < 1e-5
    assert read_metrics(double, "eval/examples") == {5: 12.0, 10: 12.0}  # each eval example counted once
    wa = load_file(str(single / "final" / "model.safetensors"))
    wb = load_file(str(double / "final" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    values = {"max_steps": 6, "learning_rate": 1e-2, "batch_size": 2}
    log = launch([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29518"],
                 {"output_dir": str(tmp_path / "two"), **values}, "--poison", "3", "--poison-rank", "1")
    assert "step 3: non-finite loss; step skipped" in log
    # Rank 0's own loss was finite; the flag is reduced across ranks, so both skipped step 3 together and the
    # curve matches one process whose (whole) step-3 loss was NaN.
    launch([sys.executable], {"output_dir": str(tmp_path / "one"), **values, "batch_size": 4}, "--poison", "3")
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 4, 5, 6]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    w = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert all(t.isfinite().all() for t in w.values())


def _worker_pids(launcher: int) -> dict[str, int]:
    """RANK -> pid of torchrun's worker processes (children of the launcher), from /proc."""
    workers = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                workers[rank] = int(pid)
    return workers


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    run_dir = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    values = {"output_dir": str(run_dir), "max_steps": 200, "learning_rate": 1e-2, "batch_size": 2}
    proc = subprocess.Popen([TORCHRUN, "--nproc_per_node", "2", "--master_port", "29519", str(TOY),
                             json.dumps(values), "--sleep", "0.2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").is_file() and read_metrics(run_dir)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(_worker_pids(proc.pid)["1"], signal.SIGTERM)  # rank 1 only, as a node-local notice would
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    line = next(x for x in out.splitlines() if x.startswith("rank 0: stopped by SIGTERM after step "))
    step = int(line.split(" after step ")[1].split("/")[0])
    # both ranks saved the same step (rank 1's RNG file in rank 0's checkpoint folder), and nothing after it
    assert (run_dir / f"checkpoint-{step}" / "random_states_1.pkl").is_file()
    assert json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["step"] == step
    assert max(read_metrics(run_dir)) == step and not (run_dir / ".humanalign.lock").exists()
