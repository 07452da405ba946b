"""Pairwise preference losses: the DPO family (sigmoid/cDPO, hinge, IPO, robust, DPO+SFT), CPO, SimPO and ORPO.

Every function takes per-sequence log-probabilities of shape (B,) (one number per chosen / rejected response,
already reduced over the response tokens by the caller) and returns per-example losses (B,) that the caller
reduces with ``.mean()``, together with DETACHED implicit rewards for logging.

Whether the log-probs must be summed or averaged over the response tokens is part of each loss's definition;
``LOSS_SPECS`` records it, together with whether a reference model and a chosen-response NLL term are needed.
The trainer reads the table, computes what it says, and calls ``compute_preference_loss``.

Sign conventions: "chosen" is the preferred response y_w, "rejected" the dispreferred y_l. A larger
``logits``/margin means the policy prefers the chosen response more (relative to the reference for the DPO
family), and every loss here is non-increasing in it (the IPO loss is a square and is minimised at a finite
margin 1/(2 beta) instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

Beta = float | torch.Tensor  # a float, or a (B,) tensor of per-pair betas (MM-DPO scales beta per pair)


class PreferenceLoss(NamedTuple):
    """Per-example losses and detached implicit rewards; unpacks as ``losses, chosen, rejected``."""

    losses: torch.Tensor  # (B,) not reduced; callers take .mean()
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


class ORPOLoss(NamedTuple):
    """ORPO losses plus the odds-ratio statistics TRL logs (all but ``losses`` detached)."""

    losses: torch.Tensor  # (B,) nll - beta * log sigmoid(log odds ratio)
    chosen_rewards: torch.Tensor  # (B,) beta * average log-prob of chosen, detached
    rejected_rewards: torch.Tensor  # (B,) beta * average log-prob of rejected, detached
    log_odds_ratio: torch.Tensor  # (B,) log odds(y_w) - log odds(y_l), detached
    log_sigmoid_ratio: torch.Tensor  # (B,) log sigmoid(log_odds_ratio), detached


@dataclass(frozen=True)
class LossSpec:
    """What a preference loss needs from the caller."""

    needs_reference: bool  # needs reference-model log-probs (a frozen copy or the adapter-disabled base)
    average_log_probs: bool  # per-sequence log-probs are the MEAN over response tokens (else the SUM)
    has_nll_term: bool  # adds an NLL (SFT) term on the chosen response, so the caller must compute it
    summary: str


# The table the DPO trainer dispatches on. MiniMind's DPO is ``sigmoid`` with averaged log-probs: the caller
# picks it by overriding ``average_log_probs`` for sigmoid (a config switch), not by a separate loss type.
# IPO averages, as TRL's DPOTrainer does (it divides the summed log-ratios by the completion length; the IPO
# authors confirmed the paper's results use this normalised form).
LOSS_SPECS: dict[str, LossSpec] = {
    "sigmoid": LossSpec(True, False, False, "DPO (Rafailov et al. 2023, Eq. 7); cDPO with label_smoothing > 0"),
    "hinge": LossSpec(True, False, False, "SLiC-style hinge on the DPO margin (Zhao et al. 2023)"),
    "ipo": LossSpec(True, True, False, "IPO (Azar et al. 2023, Eq. 17), length-normalised log-ratios"),
    "robust": LossSpec(True, False, False, "Robust DPO for noisy labels (Chowdhury et al. 2024, Eq. 9)"),
    "cpo": LossSpec(False, False, True, "CPO (Xu et al. 2024, arXiv 2401.08417): reference-free DPO + NLL"),
    "orpo": LossSpec(False, True, True, "ORPO (Hong et al. 2024, arXiv 2403.07691): NLL + odds-ratio term"),
    "simpo": LossSpec(False, True, False, "SimPO (Meng et al. 2024, arXiv 2405.14734): avg log-probs, margin"),
}

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _as_beta(beta: Beta, like: torch.Tensor) -> float | torch.Tensor:
    """Keep a float as is; move a per-pair beta tensor to the log-probs' device and dtype, detached."""
    if isinstance(beta, torch.Tensor):
        return beta.detach().to(device=like.device, dtype=like.dtype)
    return float(beta)


def _margin_loss(logits: torch.Tensor, beta: float | torch.Tensor, loss_type: str, label_smoothing: float):
    """The DPO-family loss of a margin ``logits`` (B,) = chosen score - rejected score."""
    if loss_type == "sigmoid":
        # cDPO (Mitchell 2023): the label is flipped with probability eps, so the target is the expected BCE.
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        # IPO Eq. 17: beta plays the role of the regulariser tau; the minimum sits at logits = 1/(2 beta).
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        # Chowdhury et al. 2024 Eq. 9: an unbiased estimate of the clean loss under label-flip rate eps < 1/2.
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
        flipped = -label_smoothing * F.logsigmoid(-beta * logits)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: Beta,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO and its margin variants (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    logits = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]        # (B,)
      sigmoid: -(1-eps) log s(beta*logits) - eps log s(-beta*logits)             (eps > 0 is cDPO)
      hinge:   relu(1 - beta*logits)
      ipo:     (logits - 1/(2 beta))^2   -- pass AVERAGED log-probs (LOSS_SPECS["ipo"].average_log_probs):
               IPO's log-ratios are per token; TRL divides the summed log-ratio by the completion length,
               which equals subtracting per-token averages.
      robust:  [-(1-eps) log s(beta*logits) + eps log s(-beta*logits)] / (1 - 2 eps)  (Chowdhury et al. 2024)

    All inputs are (B,). ``beta`` is a float or a (B,) tensor (per-pair beta, used by MM-DPO; it is detached).
    Returns per-example losses (B,) and the implicit rewards beta*(log pi - log ref) of each side (detached).
    The loss falls as the chosen log-ratio rises (except IPO, which pulls the margin to 1/(2 beta)).
    Note TRL 1.16's DPOTrainer ignores ``label_smoothing`` for sigmoid; here eps > 0 gives cDPO, as TRL's
    CPOTrainer and earlier DPOTrainer versions do.
    """
    b = _as_beta(beta, policy_chosen_logps)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    losses = _margin_loss(chosen_logratios - rejected_logratios, b, loss_type, label_smoothing)
    return PreferenceLoss(losses, (b * chosen_logratios).detach(), (b * rejected_logratios).detach())


def dpo_sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: Beta,
    sft_weight: float,
    chosen_nll: torch.Tensor,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO + SFT on the chosen response: RPO (Pang et al. 2024, arXiv 2404.19733, Eq. 5; ms-swift ``rpo_alpha``).

    losses = dpo_loss(...) + sft_weight * chosen_nll.
    ``chosen_nll`` is the caller's negative log-likelihood of the chosen response: a (B,) tensor (per-example
    token-mean NLL) or a scalar (the batch token-mean NLL, TRL's convention, broadcast to every pair; the mean
    of the result is then dpo.mean() + sft_weight * nll exactly). With sft_weight = 0 this is ``dpo_loss``.
    """
    dpo = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta, loss_type, label_smoothing,
    )
    losses = dpo.losses + sft_weight * chosen_nll  # (B,)
    return PreferenceLoss(losses, dpo.chosen_rewards, dpo.rejected_rewards)


def _with_nll(losses: torch.Tensor, weight: float, chosen_nll: torch.Tensor | None, name: str) -> torch.Tensor:
    if weight == 0:
        return losses
    if chosen_nll is None:
        raise ValueError(f"{name} > 0 needs chosen_nll (the NLL of the chosen response)")
    return losses + weight * chosen_nll


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    chosen_nll: torch.Tensor | None = None,
) -> PreferenceLoss:
    """CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 3 + the NLL regulariser of Eq. 6), as TRL CPOTrainer.

    Reference-free: logits = log pi(y_w) - log pi(y_l) on SUMMED log-probs (B,), then the DPO-family
    ``loss_type`` (sigmoid with label smoothing, hinge, ipo) and ``+ cpo_alpha * chosen_nll``
    (TRL: loss = losses.mean() + cpo_alpha * nll; ``chosen_nll`` is (B,) or a scalar, see ``dpo_sft_loss``).
    Rewards are beta * log pi of each side (detached), as TRL logs them.
    """
    if loss_type not in ("sigmoid", "hinge", "ipo"):
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected sigmoid, hinge or ipo")
    logits = policy_chosen_logps - policy_rejected_logps  # (B,)
    losses = _margin_loss(logits, float(beta), loss_type, label_smoothing)
    losses = _with_nll(losses, cpo_alpha, chosen_nll, "cpo_alpha")
    return PreferenceLoss(losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach())


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6) on AVERAGED log-probs (B,).

    loss = -(1-eps) log s(beta*Δ - gamma) - eps log s(-(beta*Δ - gamma)),  Δ = avg log pi(y_w) - avg log pi(y_l).
    ``gamma`` is the paper's target reward margin γ in reward units and equals TRL's ``simpo_gamma``
    (CPOTrainer computes beta * (Δ - simpo_gamma/beta) = beta*Δ - simpo_gamma). It is NOT the SimPO repository's
    ``gamma_beta_ratio``: for that convention pass gamma = gamma_beta_ratio * beta (their defaults
    beta=2.0, gamma_beta_ratio=0.5 mean gamma=1.0). ``cpo_alpha`` > 0 adds cpo_alpha * chosen_nll (CPO-SimPO).
    """
    logits = policy_chosen_logps - policy_rejected_logps - gamma / beta  # (B,)
    losses = _margin_loss(logits, float(beta), "sigmoid", label_smoothing)
    losses = _with_nll(losses, cpo_alpha, chosen_nll, "cpo_alpha")
    return PreferenceLoss(losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    chosen_nll: torch.Tensor,
) -> ORPOLoss:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4-7), as TRL ORPOTrainer.odds_ratio_loss.

    Inputs are AVERAGED log-probs (B,) (always < 0). odds(y) = p / (1 - p), so
    log odds(y) = logp - log(1 - exp(logp)); log_odds_ratio = log odds(y_w) - log odds(y_l)          # (B,)
    loss = chosen_nll - beta * log sigmoid(log_odds_ratio)   (beta is the paper's lambda)
    ``chosen_nll`` is (B,) or a scalar (TRL: the batch token-mean NLL of the chosen responses).
    Computed in float32 as TRL does. Rewards are beta * average log-prob of each side (detached).
    """
    chosen = policy_chosen_logps.float()
    rejected = policy_rejected_logps.float()
    log_odds_ratio = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    log_sigmoid_ratio = F.logsigmoid(log_odds_ratio)  # (B,)
    losses = chosen_nll - beta * log_sigmoid_ratio
    return ORPOLoss(
        losses, (beta * chosen).detach(), (beta * rejected).detach(),
        log_odds_ratio.detach(), log_sigmoid_ratio.detach(),
    )


def compute_preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: Beta,
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    sft_weight: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
) -> PreferenceLoss:
    """Dispatch on a ``LOSS_SPECS`` key. The caller has already reduced log-probs as the spec says.

    ``sft_weight`` adds the RPO term to the DPO types and to SimPO (CPO-SimPO); ``cpo_alpha`` weighs CPO's NLL
    term; ORPO always uses ``chosen_nll`` with weight 1. A (B,) ``beta`` tensor is accepted for the DPO types.
    """
    if loss_type not in LOSS_SPECS:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_SPECS)}")
    if loss_type not in DPO_LOSS_TYPES and isinstance(beta, torch.Tensor) and beta.numel() > 1:
        raise ValueError(f"a per-pair beta tensor works with the DPO types only, not {loss_type!r}")
    if loss_type in DPO_LOSS_TYPES:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
        out = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta, loss_type, label_smoothing,
        )
    elif loss_type == "cpo":
        return cpo_loss(
            policy_chosen_logps, policy_rejected_logps, float(beta), "sigmoid", label_smoothing, cpo_alpha, chosen_nll
        )
    elif loss_type == "simpo":
        out = simpo_loss(policy_chosen_logps, policy_rejected_logps, float(beta), simpo_gamma, label_smoothing)
    else:  # orpo
        if chosen_nll is None:
            raise ValueError("loss_type 'orpo' needs chosen_nll")
        orpo = orpo_loss(policy_chosen_logps, policy_rejected_logps, float(beta), chosen_nll)
        return PreferenceLoss(orpo.losses, orpo.chosen_rewards, orpo.rejected_rewards)
    losses = _with_nll(out.losses, sft_weight, chosen_nll, "sft_weight")
    return PreferenceLoss(losses, out.chosen_rewards, out.rejected_rewards)


def beta_schedule(step: int, total_steps: int, beta_min: float, beta_max: float) -> float:
    """Linear beta schedule (MiniMind's DPO run-book): beta_min at step 0 rising to beta_max at total_steps.

    A small beta early lets the policy move away from the reference; a larger one later holds it close.
    Steps past ``total_steps`` stay at ``beta_max``. Pass beta_min > beta_max for a decreasing schedule.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = min(max(step, 0) / total_steps, 1.0)
    return beta_min + (beta_max - beta_min) * frac


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B,) float: 1 where a pair is ordered right (margin > 0), 0.5 for a tie (margin == 0), 0 else.

    ``margin`` is (score or implicit reward of the preferred answer) - (the other's). A tie is no error: at the
    start of DPO the policy equals the reference, every implicit margin is exactly 0, and an accuracy that
    counted ties as misses would report 0 where the model knows as much as chance (0.5). A metric only; no loss
    uses it.
    """
    margin = margin.detach().float()
    return (margin > 0).float() + 0.5 * (margin == 0).float()
