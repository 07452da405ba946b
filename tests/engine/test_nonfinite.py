"""The NaN/inf guard: a poisoned step is skipped (no NaN reaches the weights); too many in a row stop the run."""

from __future__ import annotations

import json

import pytest
import torch
from engine_toy import read_metrics, run_toy
from safetensors.torch import load_file

from humanalign.errors import UserError


def snapshot(store):
    def on_step(engine, model):
        store[engine.step] = {k: v.detach().clone() for k, v in engine.unwrap(model).state_dict().items()}
    return on_step


def test_a_poisoned_batch_is_skipped_and_weights_stay_finite(tmp_path, capsys):
    weights: dict = {}
    run_toy({"output_dir": str(tmp_path), "max_steps": 6}, poison_steps=(3,), on_step=snapshot(weights))
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 changed nothing
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # training went on
    assert all(torch.isfinite(v).all() for v in weights[6].values())
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "train/lr" in r}
    assert "train/loss" not in rows[3] and rows[3]["train/skipped_nonfinite"] == 1
    assert rows[6]["train/skipped_nonfinite"] == 1
    losses = read_metrics(tmp_path)
    assert sorted(losses) == [1, 2, 4, 5, 6] and all(map(lambda v: v == v, losses.values()))
    assert "step 3: non-finite loss; step skipped (1 in a row, 1 in all)" in capsys.readouterr().err


def test_non_finite_gradients_with_a_finite_loss_are_skipped(tmp_path, capsys):
    weights: dict = {}
    hooks = []

    def on_step(engine, model):
        snapshot(weights)(engine, model)
        if engine.step == 1:  # poison the gradients of step 2 only
            param = engine.unwrap(model).model.layers[0].mlp.down_proj.weight
            hooks.append(param.register_hook(lambda g: g * float("inf")))
        elif engine.step == 2:
            hooks.pop().remove()

    run_toy({"output_dir": str(tmp_path), "max_steps": 3}, on_step=on_step)
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert all(torch.isfinite(v).all() for v in weights[3].values())
    assert "step 2: non-finite gradients; step skipped" in capsys.readouterr().err


def test_stops_after_max_nonfinite_steps_in_a_row(tmp_path):
    with pytest.raises(UserError, match=r"3 steps in a row \(steps 2-4, max_nonfinite_steps = 3\).*checkpoint-3"):
        run_toy({"output_dir": str(tmp_path), "max_steps": 8, "save_steps": 1, "max_nonfinite_steps": 3},
                poison_steps=(2, 3, 4))
    # The run stopped inside step 4, before saving it; the checkpoints of the skipped steps 2 and 3 hold the
    # weights of step 1, untouched and finite.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    first = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(first[k], last[k]) and torch.isfinite(last[k]).all() for k in first)


def test_a_finite_step_resets_the_streak(tmp_path):
    run_toy({"output_dir": str(tmp_path), "max_steps": 7, "max_nonfinite_steps": 3}, poison_steps=(2, 3, 5, 6))
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/lr" in r]
    assert rows[-1]["step"] == 7 and rows[-1]["train/skipped_nonfinite"] == 4


def poison_weights_after(step: int):
    """An optimizer step-post hook that writes an inf into a weight after the update of ``step``."""
    def on_step(engine, model):
        if engine.step == 1:
            def hook(optimizer, args, kwargs):
                if engine.step + 1 == step:  # engine.step counts the finished steps
                    engine.unwrap(model).model.norm.weight.data[0] = float("inf")
            engine.optimizer.optimizer.register_step_post_hook(hook)
    return on_step


@pytest.mark.parametrize("bad_step", [3, 4])
def test_non_finite_weights_are_never_saved(tmp_path, bad_step):
    """Step 3's update goes bad: found at step 4's sync. Step 4's: found before its checkpoint is written."""
    with pytest.raises(UserError, match=rf"^step {bad_step}: the model's weights became non-finite \(NaN/inf\) "
                                        r".*; stopping without saving them .*last good checkpoint: .*checkpoint-2$"):
        run_toy({"output_dir": str(tmp_path), "max_steps": 6, "save_steps": 2}, on_step=poison_weights_after(bad_step))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".tmp-*"))
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
