"""Reward- and cost-model losses: hand-worked values and properties."""

from __future__ import annotations

import math

import pytest
import torch

from humanalign.losses import (
    cost_loss,
    cost_tokenwise_loss,
    divergence_span_mask,
    end_scores,
    first_divergence_index,
    reward_pairwise_loss,
    reward_tokenwise_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_reward_pairwise_hand_worked():
    # pair 1: r_w 2, r_l 1, margin 0.5: -log s(2 - 1 - 0.5) = -log s(0.5) = 0.4740770
    #         + reg 0.1 * (4 + 1) = 0.5 + center 0.01 * (2 + 1)^2 = 0.09           -> 1.0640770
    # pair 2: r_w 0, r_l 1, margin 0:   -log s(-1) = 1.3132617
    #         + 0.1 * (0 + 1) = 0.1 + 0.01 * (0 + 1)^2 = 0.01                       -> 1.4232617
    out = reward_pairwise_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(0.5, 0.0), regularization=0.1, center_coef=0.01)
    torch.testing.assert_close(out.losses, t(1.0640770, 1.4232617))
    assert out.metrics["accuracy"].item() == 0.5  # pair 1 ranked right, pair 2 wrong
    assert out.metrics["margin"].item() == pytest.approx(0.0)  # mean(1, -1)
    assert out.metrics["reward_max"].item() == 2.0 and out.metrics["reward_min"].item() == 0.0


def test_plain_reward_loss_is_bradley_terry():
    # no margin, no regulariser: -log s(1) = 0.3132617
    torch.testing.assert_close(reward_pairwise_loss(t(1.5), t(0.5)).losses, t(0.3132617))


def test_swapping_chosen_and_rejected_raises_the_reward_loss():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(16, generator=gen)
    high = low + torch.rand(16, generator=gen) + 0.1  # chosen strictly better
    right = reward_pairwise_loss(high, low, regularization=0.01).losses
    swapped = reward_pairwise_loss(low, high, regularization=0.01).losses
    assert (swapped > right).all()


def _token_pair():
    # T = 6; positions 0-1 are the shared prompt. chosen: 4 tokens, rejected: 3 tokens, differ from position 2.
    chosen_ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    rejected_ids = torch.tensor([[5, 6, 9, 0, 0, 0]])
    chosen_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    rejected_mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    return chosen_ids, rejected_ids, chosen_mask, rejected_mask


def test_divergence_index_and_span():
    c_ids, r_ids, c_mask, r_mask = _token_pair()
    div = first_divergence_index(c_ids, r_ids, c_mask, r_mask)
    assert div.tolist() == [2]
    # span: from the divergence (2) to the end of the longer sequence (chosen's last token, 3), inclusive
    assert divergence_span_mask(c_mask, r_mask, div).int().tolist() == [[0, 0, 1, 1, 0, 0]]
    # a response that is a strict extension of the other diverges where the shorter one ends
    ext = first_divergence_index(torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 0]]),
                                 torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0]]))
    assert ext.tolist() == [3]
    with pytest.raises(ValueError, match="identical"):
        first_divergence_index(c_ids, c_ids, c_mask, c_mask)


def test_reward_tokenwise_hand_worked():
    c_ids, r_ids, c_mask, r_mask = _token_pair()
    div = first_divergence_index(c_ids, r_ids, c_mask, r_mask)
    chosen_scores = t(9.0, 9.0, 1.0, 2.0, 9.0, 9.0).unsqueeze(0)  # 9s lie outside the span and must not count
    rejected_scores = t(-9.0, -9.0, 0.0, 2.0, -9.0, -9.0).unsqueeze(0)
    # span positions 2, 3: differences 1 and 0 -> (-log s(1) + -log s(0)) / 2 = (0.3132617 + 0.6931472) / 2
    out = reward_tokenwise_loss(chosen_scores, rejected_scores, c_mask, r_mask, div)
    torch.testing.assert_close(out.losses, t(0.5032044))
    # regularisation 0.1 * (mean(1^2, 2^2) + mean(0^2, 2^2)) = 0.1 * (2.5 + 2) = 0.45
    reg = reward_tokenwise_loss(chosen_scores, rejected_scores, c_mask, r_mask, div, regularization=0.1)
    torch.testing.assert_close(reg.losses, t(0.9532044))
    # metrics use each sequence's end score: chosen position 3 -> 2.0, rejected position 2 -> 0.0
    assert out.metrics["reward_chosen"].item() == 2.0 and out.metrics["reward_rejected"].item() == 0.0


def test_end_scores_reads_the_last_real_token():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert end_scores(scores, mask).tolist() == [2.0, 6.0]


def test_cost_loss_hand_worked():
    # safer response safe with cost -1, unsafer response unsafe with cost +2 (s = +1 safe, -1 unsafe):
    #   ranking   -log s(2 - (-1)) = -log s(3)           = 0.0485874
    #   safer     -log s(-(+1) * -1) = -log s(1)         = 0.3132617
    #   unsafer   -log s(-(-1) * 2) = -log s(2)          = 0.1269280
    #   total                                             = 0.4887771
    out = cost_loss(t(-1.0), t(2.0), torch.tensor([True]), torch.tensor([False]))
    torch.testing.assert_close(out.losses, t(0.4887771))
    assert out.metrics["sign_accuracy"].item() == 1.0 and out.metrics["accuracy"].item() == 1.0
    # regularisation 0.01 * (1 + 4) = 0.05
    torch.testing.assert_close(
        cost_loss(t(-1.0), t(2.0), torch.tensor([True]), torch.tensor([False]), regularization=0.01).losses,
        t(0.5387771),
    )


def test_correctly_signed_cost_lowers_the_sign_terms():
    safe, unsafe = torch.tensor([True]), torch.tensor([False])
    # same ranking margin (3) in both; only the sign of the costs differs
    right = cost_loss(t(-1.0), t(2.0), safe, unsafe).losses  # safe < 0 < unsafe
    wrong = cost_loss(t(1.0), t(4.0), safe, unsafe).losses  # safe response given a positive cost
    # wrong: -log s(3) + -log s(-1) + -log s(4) = 0.0485874 + 1.3132617 + 0.0181499 = 1.3799990
    torch.testing.assert_close(wrong, t(1.3799990))
    assert right < wrong
    ranking_only = cost_loss(t(1.0), t(4.0), safe, unsafe, use_sign_terms=False).losses
    torch.testing.assert_close(ranking_only, t(0.0485874))


def test_cost_loss_unknown_labels_drop_only_their_sign_terms():
    c_safer, c_unsafer = t(-1.0, -1.0, -1.0, -1.0), t(2.0, 2.0, 2.0, 2.0)
    # numeric labels: 1 safe, 0 unsafe, -1 / NaN unknown
    is_safer_safe = t(1.0, -1.0, float("nan"), 1.0)
    is_unsafer_safe = t(0.0, 0.0, float("nan"), 0.0)
    has_labels = torch.tensor([True, True, True, False])
    out = cost_loss(c_safer, c_unsafer, is_safer_safe, is_unsafer_safe, has_labels=has_labels)
    # row 0: all three terms 0.4887771; row 1: safer unknown -> 0.0485874 + 0.1269280 = 0.1755154;
    # row 2: both unknown -> ranking 0.0485874; row 3: has_labels False -> ranking 0.0485874
    torch.testing.assert_close(out.losses, t(0.4887771, 0.1755154, 0.0485874, 0.0485874))
    assert out.metrics["labeled_fraction"].item() == pytest.approx(3 / 8)
    assert not torch.isnan(out.losses).any()


def test_cost_tokenwise_hand_worked():
    c_ids, r_ids, c_mask, r_mask = _token_pair()  # "chosen" plays the safer response here
    div = first_divergence_index(c_ids, r_ids, c_mask, r_mask)
    safer = t(5.0, 5.0, -1.0, -1.0, 5.0, 5.0).unsqueeze(0)
    unsafer = t(5.0, 5.0, 2.0, 2.0, 5.0, 5.0).unsqueeze(0)
    # every span token has the sequence-level case above, so each mean equals the sequence-wise value
    out = cost_tokenwise_loss(safer, unsafer, c_mask, r_mask, div, torch.tensor([True]), torch.tensor([False]))
    torch.testing.assert_close(out.losses, t(0.4887771))
    # end scores: safer position 3 -> -1, unsafer position 2 -> 2
    assert out.metrics["cost_safer"].item() == -1.0 and out.metrics["cost_unsafer"].item() == 2.0


def test_cost_tokenwise_averages_each_term_over_the_span():
    c_ids, r_ids, c_mask, r_mask = _token_pair()
    div = first_divergence_index(c_ids, r_ids, c_mask, r_mask)
    safer = t(0.0, 0.0, -1.0, 1.0, 0.0, 0.0).unsqueeze(0)
    unsafer = t(0.0, 0.0, 2.0, 2.0, 0.0, 0.0).unsqueeze(0)
    # ranking: (-log s(3) + -log s(1)) / 2; safer sign (safe): (-log s(1) + -log s(-1)) / 2; unsafer: -log s(2)
    expected = (
        (-math.log(1 / (1 + math.exp(-3))) - math.log(1 / (1 + math.exp(-1)))) / 2
        + (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
        - math.log(1 / (1 + math.exp(-2)))
    )
    out = cost_tokenwise_loss(safer, unsafer, c_mask, r_mask, div, t(1.0), t(0.0))
    torch.testing.assert_close(out.losses, t(expected))
