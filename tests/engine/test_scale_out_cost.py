"""The harmless cost model (`train rm --task harmless`) under FSDP2, ZeRO-2 and ZeRO-3 against one process.
Setup and tolerances: tests/engine/scale_out.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from scale_out import (
    COST_VARIANTS,
    STEPS,
    assert_same_curve,
    metrics,
    sharded,
    train_cost_model,
)


@pytest.mark.slow
@pytest.mark.parametrize("config, variant", [("fsdp", "full"), ("fsdp", "lora"), ("deepspeed_zero2", "groups"),
                                             ("deepspeed_zero3_offload", "lora"),
                                             ("deepspeed_zero3_offload", "groups")])
def test_sharded_cost_model_matches_one_process_and_saves_a_plain_classifier(config, variant, demo_pairs, tmp_path):
    """`humanalign train rm --task harmless` under FSDP2, ZeRO-2 and ZeRO-3 (full, LoRA, per-group learning
    rates): the same losses, held-out metrics, score statistics and final weights as one process, saved from
    the gathered shards as a plain *ForSequenceClassification folder (a LoRA adapter folded into the gathered
    base weights)."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    extra = COST_VARIANTS[variant]
    if variant == "groups":  # 1e-2 with a 10x head diverges
        extra = [*extra, "--learning-rate", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_cost_model(["python"], one, demo_pairs, 8, *extra)
    log = train_cost_model(sharded(config), two, demo_pairs, 4, *extra)
    assert {"fsdp": "FSDP2", "deepspeed_zero2": "ZeRO-2"}.get(config, "ZeRO-3") in log
    assert "FSDP2-wrapped module" not in log  # no view-tensor warnings
    assert_same_curve(one, two, "train/loss", list(range(1, STEPS + 1)))  # measured: 1.5e-6 (ZeRO-3)
    assert_same_curve(one, two, "eval/loss", [0, 3, 6])
    assert metrics(one, "train/loss")[STEPS] < metrics(one, "train/loss")[1]  # it trained

    from transformers import AutoModelForSequenceClassification

    wa, wb = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and not any("lora" in k for k in wb)
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diffs.max().item() < 1e-4  # measured: 3.1e-5 (ZeRO-3, full), 6e-7 (LoRA)
    model = AutoModelForSequenceClassification.from_pretrained(two / "final")
    state = model.state_dict()
    assert model.config.num_labels == 1 and all(torch.equal(state[k], v) for k, v in wb.items())
    na, nb = (json.loads((d / "final" / "config.json").read_text(encoding="utf-8"))["humanalign_score"]["normalizer"]
              for d in (one, two))
    assert nb["count"] == na["count"] and nb["mean"] == pytest.approx(na["mean"], abs=1e-5)
    assert nb["var"] == pytest.approx(na["var"], abs=1e-5)
