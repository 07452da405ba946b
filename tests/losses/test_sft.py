"""SFT losses: the ptx term's mean NLL over labelled tokens, hand-worked and against the per-token log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from humanalign.losses.sft import ptx_loss, sft_loss_sums
from humanalign.models.logprobs import token_logps


def test_ptx_loss_hand_worked():
    # vocabulary of 2, uniform logits: every labelled token costs log 2; one row labels 2 tokens, the other 1
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    assert ptx_loss(logits, labels).item() == pytest.approx(math.log(2), abs=1e-7)
    logits[0, 0] = torch.tensor([0.0, math.log(3)])  # p(token 1 | position 0) = 3/4
    expected = (-math.log(0.75) + 2 * math.log(2)) / 3  # a mean over the 3 labelled tokens, not over rows
    assert ptx_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_ptx_loss_is_the_token_weighted_nll_of_token_logps_exactly():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    labels[2, 5:] = -100
    mask = (labels[:, 1:] != -100).float()
    before = -(token_logps(logits, labels) * mask).sum() / mask.sum().clamp(min=1)  # the formula it replaced
    assert torch.equal(ptx_loss(logits, labels), before)
    sums, counts = sft_loss_sums(logits.float(), labels)  # the SFT trainer's cross-entropy: same value
    assert ptx_loss(logits, labels).item() == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)
