"""The CUDA tests' harness (tests/gpu/harness.py) on the CPU, so that it cannot rot where no GPU is lent: the CPU
half of a comparison reproduces the pinned curves, sampling through the CPU generator changes nothing on the
CPU, and the default attention kernel is SDPA."""

from __future__ import annotations

import humanalign_gpu_harness as harness  # tests/gpu/conftest.py loads tests/gpu/harness.py
import pytest
import torch


def test_cpu_half_reproduces_the_pinned_dpo_curve(tmp_path):
    """2 steps of DPO (sigmoid) through the harness: tests/trainers/test_pinned_curves.py's first two values."""
    losses = harness.train_losses("dpo-sigmoid", "cpu", tmp_path, steps=2)
    assert losses["train/loss"] == pytest.approx([0.693147, 0.690485], abs=1e-4)


def test_same_sampling_is_the_identity_on_the_cpu():
    probs = torch.softmax(torch.randn(4, 50), dim=-1)
    torch.manual_seed(0)
    plain = torch.multinomial(probs, 1)
    with harness.same_sampling():
        torch.manual_seed(0)
        patched = torch.multinomial(probs, 1)
    assert torch.equal(plain, patched)


def test_cpu_device_hides_cuda():
    with harness.on_device("cpu"):
        assert not torch.cuda.is_available()
        from humanalign.engine.launch import resolve_mixed_precision
        from humanalign.models.load import resolve_dtype

        assert resolve_mixed_precision("auto") == "no" and resolve_dtype("auto") == torch.float32


def test_default_attention_is_sdpa():
    from humanalign.models.load import load_causal_lm

    with harness.on_device("cpu"):
        model = load_causal_lm("tiny", trainable=False)
    assert model.config._attn_implementation == "sdpa"
