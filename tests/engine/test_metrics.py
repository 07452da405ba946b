"""Metric averaging, metrics.jsonl / TensorBoard agreement, and progress lines."""

from __future__ import annotations

import json

import pytest
import torch
from engine_toy import read_metrics, run_toy

from humanalign.engine.metrics import MetricAccumulator, truncate_metrics
from humanalign.engine.progress import Progress


def test_accumulator_weighted_mean_and_discarded_windows():
    acc = MetricAccumulator()
    acc.add({"train/loss": torch.tensor(2.0)}, weight=torch.tensor(1))
    acc.add({"train/loss": 4.0}, weight=3)
    acc.commit()
    acc.add({"train/loss": float("nan")}, weight=5)
    acc.discard()  # a skipped step: its NaN never reaches the average
    assert acc.reduce() == {"train/loss": pytest.approx(3.5)}  # (2*1 + 4*3) / 4
    assert acc.reduce() == {}  # reset after each log
    acc.add({"a": 1.0, "b": 2.0})
    acc.commit()
    doubled = acc.reduce(lambda t: t * 2)  # as if two ranks had the same values: the mean is unchanged
    assert doubled == {"a": 1.0, "b": 2.0}


def test_a_mapped_metric_is_the_map_of_the_weighted_mean(tmp_path):
    """record(then=math.exp): the logged perplexity is exp of the token-weighted NLL over every micro-batch of
    the logged window (here 2 accumulated micro-batches x 2 logged steps), not a mean of per-batch values."""
    import math

    run_toy({"output_dir": str(tmp_path), "max_steps": 4, "logging_steps": 2, "gradient_accumulation_steps": 2,
             "batch_size": 2})
    losses, perplexities = read_metrics(tmp_path, "train/loss"), read_metrics(tmp_path, "train/perplexity")
    assert sorted(perplexities) == [2, 4]
    for step, loss in losses.items():
        assert perplexities[step] == pytest.approx(math.exp(loss), rel=1e-6)


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": s / 10}) + "\n" for s in range(1, 7)) + '{"step": 7, "tr')
    assert truncate_metrics(path, 4) == 3  # steps 5, 6 and the line cut by the kill
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_metrics_jsonl_and_tensorboard_hold_the_same_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_toy({"output_dir": str(tmp_path), "max_steps": 4, "eval_steps": 2, "save_steps": 4})
    losses = read_metrics(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train/lr", "train/grad_norm", "train/epoch", "train/skipped_nonfinite"} <= rows[0].keys()
    assert rows[0]["train/lr"] == pytest.approx(3e-3)  # cosine, step 1 uses the peak
    assert rows[0]["train/epoch"] == pytest.approx(0.1)  # 4 of 40 examples


def test_progress_prints_lines_when_not_on_a_terminal(capsys):
    bar = Progress(total=10, initial=0, enabled=True, desc="sft")
    assert bar.bar is None  # pytest captures stderr: not a TTY
    bar.update(3)
    bar.update(5, {"train/loss": 2.5, "train/lr": 1e-4, "train/epoch": 0.5})
    line = capsys.readouterr().err.strip()
    assert line.startswith("[sft] step 5/10 (50%) | loss 2.5 | lr 1.00e-04")
    assert "step/s" in line and "ETA" in line and "epoch" not in line
    bar.note({"eval/loss": 1.25})
    assert capsys.readouterr().err == ""  # eval metrics join the next line, without a line of their own
    bar.update(6, {"train/loss": 2.0})
    assert "eval/loss 1.25" in capsys.readouterr().err


def test_a_resumed_run_logs_the_same_window_as_an_uninterrupted_one(tmp_path):
    """logging_steps 10, checkpoint at step 8: the step-10 log averages steps 1-10 in both runs (the partial
    window of steps 1-8 travels in the checkpoint)."""
    values = {"max_steps": 10, "logging_steps": 10, "save_steps": 8, "learning_rate": 1e-2}
    run_toy({"output_dir": str(tmp_path / "a"), **values})
    run_toy({"output_dir": str(tmp_path / "b"), **values,
             "resume_from_checkpoint": str(tmp_path / "a" / "checkpoint-8")})
    for key in ("train/loss", "train/perplexity", "train/grad_norm"):
        a, b = read_metrics(tmp_path / "a", key), read_metrics(tmp_path / "b", key)
        assert list(a) == list(b) == [10] and a[10] == b[10], key  # exact: the same float sums
    state = json.loads((tmp_path / "a" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["log_window"]["train/loss"][1] > 0  # token weights of steps 1-8
