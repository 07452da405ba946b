"""Hand-worked values and properties of the preference losses (DPO family, CPO, SimPO, ORPO)."""

from __future__ import annotations

import math

import pytest
import torch

from humanalign.losses import (
    LOSS_SPECS,
    beta_schedule,
    compute_preference_loss,
    cpo_loss,
    dpo_loss,
    dpo_sft_loss,
    orpo_loss,
    pair_accuracy,
    simpo_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# One pair used below: policy chosen -1, rejected -3; reference -2 for both.
# chosen log-ratio = -1 - (-2) = +1, rejected log-ratio = -3 - (-2) = -1, logits = 1 - (-1) = 2.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


def test_dpo_sigmoid_hand_worked():
    # beta = 0.5: beta * logits = 1; loss = -log s(1) = log(1 + e^-1) = 0.3132617
    # rewards: chosen 0.5 * (+1) = 0.5, rejected 0.5 * (-1) = -0.5
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    torch.testing.assert_close(out.losses, t(0.3132617))
    torch.testing.assert_close(out.chosen_rewards, t(0.5))
    torch.testing.assert_close(out.rejected_rewards, t(-0.5))


def test_cdpo_label_smoothing_hand_worked():
    # eps = 0.1: 0.9 * -log s(1) + 0.1 * -log s(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    torch.testing.assert_close(out.losses, t(0.4132617))


def test_hinge_hand_worked():
    # beta = 0.5: relu(1 - 0.5 * 2) = 0;  beta = 0.25: relu(1 - 0.25 * 2) = 0.5
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, 0.5, "hinge").losses, t(0.0))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, 0.25, "hinge").losses, t(0.5))


def test_ipo_hand_worked():
    # beta = 0.5: (2 - 1/(2*0.5))^2 = (2 - 1)^2 = 1;  beta = 0.25: (2 - 1/0.5)^2 = 0
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, 0.5, "ipo").losses, t(1.0))
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, 0.25, "ipo").losses, t(0.0))


def test_robust_hand_worked():
    # eps = 0.1: [0.9 * -log s(1) - 0.1 * -log s(-1)] / (1 - 0.2) = (0.2819355 - 0.1313262) / 0.8 = 0.1882617
    out = dpo_loss(PC, PR, RC, RR, 0.5, "robust", label_smoothing=0.1)
    torch.testing.assert_close(out.losses, t(0.1882617))
    # eps = 0: robust is plain DPO
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, 0.5, "robust").losses, t(0.3132617))


def test_per_pair_beta_tensor():
    # two copies of the pair with beta 0.5 and 1.0: -log s(1) = 0.3132617, -log s(2) = 0.1269280
    pc, pr, rc, rr = (x.repeat(2) for x in (PC, PR, RC, RR))
    beta = t(0.5, 1.0).requires_grad_()
    out = dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(out.losses, t(0.3132617, 0.1269280))
    torch.testing.assert_close(out.chosen_rewards, t(0.5, 1.0))
    assert not out.losses.requires_grad  # beta is a constant of the loss, not trained through it


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(PC, PR, RC, RR, 0.1, "kto")


def test_rewards_are_detached_losses_are_not():
    pc = PC.clone().requires_grad_()
    out = dpo_loss(pc, PR, RC, RR, 0.5)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
    out.losses.sum().backward()
    # d/d pc of -log s(beta * logits) = -beta * (1 - s(1)) = -0.5 * 0.2689414 = -0.1344707
    torch.testing.assert_close(pc.grad, t(-0.1344707))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_dpo_loss_falls_as_chosen_logratio_rises(loss_type):
    pc = torch.linspace(-6, 2, 41)  # chosen log-prob rising, everything else fixed
    n = pc.numel()
    out = dpo_loss(pc, torch.full((n,), -3.0), torch.full((n,), -2.0), torch.full((n,), -2.0), 0.5, loss_type,
                   label_smoothing=0.1 if loss_type == "robust" else 0.0)
    diffs = out.losses[1:] - out.losses[:-1]
    assert (diffs <= 1e-7).all()
    assert out.losses[0] > out.losses[-1]


def test_ipo_and_dpo_differ_as_the_formulas_say():
    # DPO keeps falling as the margin grows; IPO is a parabola with its minimum at 1/(2 beta) = 1 for beta 0.5,
    # so it penalises margins beyond it (regularises towards the reference).
    margins = torch.tensor([0.0, 1.0, 4.0])
    zeros = torch.zeros(3)
    dpo = dpo_loss(margins, zeros, zeros, zeros, 0.5).losses
    ipo = dpo_loss(margins, zeros, zeros, zeros, 0.5, "ipo").losses
    # DPO: -log s(0) = 0.6931472, -log s(0.5) = 0.4740770, -log s(2) = 0.1269280
    torch.testing.assert_close(dpo, t(0.6931472, 0.4740770, 0.1269280))
    # IPO: (0-1)^2 = 1, (1-1)^2 = 0, (4-1)^2 = 9
    torch.testing.assert_close(ipo, t(1.0, 0.0, 9.0))


def test_dpo_sft_with_weight_zero_equals_dpo_and_adds_the_nll():
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=gen) * 20 for _ in range(4))
    nll = torch.rand(5, generator=gen) * 3
    dpo = dpo_loss(pc, pr, rc, rr, 0.1)
    torch.testing.assert_close(dpo_sft_loss(pc, pr, rc, rr, 0.1, 0.0, nll).losses, dpo.losses)
    # weight 0.5 with a scalar NLL of 2.0 adds 1.0 to every pair
    torch.testing.assert_close(dpo_sft_loss(pc, pr, rc, rr, 0.1, 0.5, torch.tensor(2.0)).losses, dpo.losses + 1.0)


def test_cpo_hand_worked():
    # chosen -2, rejected -4, beta 0.1: beta * (-2 - -4) = 0.2; -log s(0.2) = 0.5981389; + 1.0 * nll 1.5 = 2.0981389
    out = cpo_loss(t(-2.0), t(-4.0), beta=0.1, cpo_alpha=1.0, chosen_nll=t(1.5))
    torch.testing.assert_close(out.losses, t(2.0981389))
    torch.testing.assert_close(out.chosen_rewards, t(-0.2))  # beta * log pi(y_w)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(t(-2.0), t(-4.0), beta=0.1, cpo_alpha=1.0)


def test_simpo_hand_worked():
    # averaged log-probs -0.5 and -1.0, beta 2, gamma 0.5: 2 * 0.5 - 0.5 = 0.5; -log s(0.5) = 0.4740770
    out = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    torch.testing.assert_close(out.losses, t(0.4740770))
    # the SimPO repo's gamma_beta_ratio 0.25 with beta 2 is gamma = 0.5: same number
    torch.testing.assert_close(simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.25 * 2.0).losses, t(0.4740770))


def test_orpo_hand_worked():
    # p_w = 0.5 -> odds 1, log odds 0; p_l = 0.2 -> odds 0.25, log odds -1.3862944; ratio = 1.3862944 = log 4
    # log s(log 4) = log(4/5) = -0.2231436; loss = nll 2.0 - 0.1 * (-0.2231436) = 2.0223144
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1, chosen_nll=t(2.0))
    torch.testing.assert_close(out.losses, t(2.0223144))
    torch.testing.assert_close(out.log_odds_ratio, t(math.log(4.0)))
    torch.testing.assert_close(out.log_sigmoid_ratio, t(math.log(0.8)))


@pytest.mark.parametrize("name", ["cpo", "simpo", "orpo"])
def test_reference_free_losses_fall_as_chosen_logprob_rises(name):
    pc = torch.linspace(-3.0, -0.05, 30)
    pr = torch.full_like(pc, -1.5)
    nll = torch.zeros_like(pc)
    if name == "cpo":
        losses = cpo_loss(pc, pr, 0.1, cpo_alpha=0.0).losses
    elif name == "simpo":
        losses = simpo_loss(pc, pr).losses
    else:
        losses = orpo_loss(pc, pr, 0.1, nll).losses
    assert ((losses[1:] - losses[:-1]) <= 1e-7).all() and losses[0] > losses[-1]


def test_loss_specs_table():
    assert set(LOSS_SPECS) == {"sigmoid", "hinge", "ipo", "robust", "cpo", "orpo", "simpo"}
    assert [k for k, s in LOSS_SPECS.items() if s.needs_reference] == ["sigmoid", "hinge", "ipo", "robust"]
    assert [k for k, s in LOSS_SPECS.items() if s.average_log_probs] == ["ipo", "orpo", "simpo"]
    assert [k for k, s in LOSS_SPECS.items() if s.has_nll_term] == ["cpo", "orpo"]


def test_compute_preference_loss_dispatches_to_each_function():
    gen = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(4, generator=gen) * 3 for _ in range(4))
    nll = torch.rand(4, generator=gen)
    for loss_type in ("sigmoid", "hinge", "ipo", "robust"):
        got = compute_preference_loss(loss_type, pc, pr, rc, rr, beta=0.3, sft_weight=0.5, chosen_nll=nll)
        want = dpo_sft_loss(pc, pr, rc, rr, 0.3, 0.5, nll, loss_type)
        torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(
        compute_preference_loss("cpo", pc, pr, beta=0.3, chosen_nll=nll, cpo_alpha=0.7).losses,
        cpo_loss(pc, pr, 0.3, cpo_alpha=0.7, chosen_nll=nll).losses,
    )
    torch.testing.assert_close(
        compute_preference_loss("simpo", pc, pr, beta=2.0, simpo_gamma=0.8).losses,
        simpo_loss(pc, pr, 2.0, 0.8).losses,
    )
    torch.testing.assert_close(
        compute_preference_loss("orpo", pc, pr, beta=0.2, chosen_nll=nll).losses, orpo_loss(pc, pr, 0.2, nll).losses
    )
    with pytest.raises(ValueError, match="reference"):
        compute_preference_loss("sigmoid", pc, pr, beta=0.1)
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_preference_loss("dpo", pc, pr, rc, rr, beta=0.1)


def test_beta_schedule_linear():
    # 0.1 -> 0.5 over 100 steps: step 25 is a quarter of the way, 0.1 + 0.4 * 0.25 = 0.2
    assert beta_schedule(0, 100, 0.1, 0.5) == pytest.approx(0.1)
    assert beta_schedule(25, 100, 0.1, 0.5) == pytest.approx(0.2)
    assert beta_schedule(100, 100, 0.1, 0.5) == pytest.approx(0.5)
    assert beta_schedule(500, 100, 0.1, 0.5) == pytest.approx(0.5)  # stays at the end value
    with pytest.raises(ValueError):
        beta_schedule(1, 0, 0.1, 0.5)


def test_pair_accuracy_counts_a_tie_one_half():
    margin = torch.tensor([0.3, -0.1, 0.0, 0.0])  # right, wrong, two ties (as when the policy is the reference)
    assert pair_accuracy(margin).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert pair_accuracy(margin).mean().item() == 0.5
