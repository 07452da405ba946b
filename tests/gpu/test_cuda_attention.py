"""Attention kernels on CUDA (issue 16): SDPA by default; FlashAttention-2 when flash_attn is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sdpa_by_default_on_cuda():
    from humanalign.models.load import load_causal_lm

    model = load_causal_lm("tiny", trainable=False)
    if importlib.util.find_spec("flash_attn") is None:
        assert model.config._attn_implementation == "sdpa"
    model.to("cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
def test_flash_attention_2_when_installed():
    from humanalign.models.load import load_causal_lm

    model = load_causal_lm("tiny", trainable=False)  # frozen: bf16 weights on a bf16 GPU, so FlashAttention-2
    assert model.config._attn_implementation == "flash_attention_2"
