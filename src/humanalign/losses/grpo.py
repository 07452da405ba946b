"""Critic-free online RL: GRPO (DeepSeekMath, Shao et al. 2024), its DAPO and Dr. GRPO variants, and RLOO.

A rollout answers every prompt G times (a *group*); the group's own scores are the baseline, so no value model
is trained. Layout: scores are prompt-major, (N,) with N = P * G and the G answers of prompt p at rows
p*G .. p*G+G-1 (as ``GeneratedBatch`` orders them). Per-token tensors are response-aligned (B, T), right-padded,
``mask`` 1 on real response tokens (the layout of ``humanalign.losses.ppo``).

Sign conventions: scores are maximised (a cost enters as a separate stream, see ``lagrangian_advantage`` in
``humanalign.losses.ppo``); the loss is MINUS the clipped surrogate, plus beta times KL(pi || ref).

References: GRPO, arXiv 2402.03300 Eq. 3 and Sec. 4.1.2 (outcome supervision: A_i = (r_i - mean) / std);
DAPO, arXiv 2503.14476 Eq. 8-10 (token-level mean, clip-higher epsilon_high); Dr. GRPO, arXiv 2503.20783
Sec. 3.1 (no std scaling, a constant normaliser instead of the answer length); RLOO, Ahmadian et al. 2024,
arXiv 2402.14740 Eq. 4 (leave-one-out baseline); the k3 KL estimator, Schulman 2020 "Approximating KL
divergence" (http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import torch

from humanalign.losses.ppo import masked_mean

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_MODES = ("group", "batch", "none")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) prompt-major scores -> (P, G)."""
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's outcome advantages (N,) and each group's score spread (P,).

    A_i = (r_i - mean_group(r)) / (std + eps) with std the Bessel-corrected standard deviation of the answer's
    group (``scale="group"``, GRPO), of the whole batch (``"batch"``), or no division at all (``"none"``, Dr.
    GRPO: dividing by a small std over-weights groups whose answers barely differ). A group of identical scores
    gets advantage 0 (nothing to learn from it). eps 1e-4 and the unbiased std are TRL's choices.
    The spread returned is the group's std (logged: a group with zero spread carries no signal).
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALE_MODES)}")
    grouped = _groups(scores, group_size)  # (P, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)
    spread = grouped.std(dim=1) if group_size > 1 else torch.zeros_like(grouped[:, 0])  # (P,)
    if scale == "group":
        centred = centred / (spread.repeat_interleave(group_size) + eps)
    elif scale == "batch":
        batch_std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
        centred = centred / (batch_std + eps)
    return centred, spread


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (N,) (Ahmadian et al. 2024, Eq. 4; Kool et al. 2019).

    A_i = r_i - (sum_group(r) - r_i) / (G - 1): the baseline of each answer is the mean score of its G - 1
    siblings, so it does not depend on the answer itself (an unbiased estimate). Needs G >= 2.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 answers per prompt")
    grouped = _groups(scores, group_size)  # (P, G)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (P, G)
    return (grouped - baseline).reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) by Schulman's k3 estimator (B, T): exp(ref - pi) - (ref - pi) - 1 >= 0.

    Unbiased for samples from pi and never negative (unlike log pi - log ref); GRPO Eq. 4.
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def kl_penalized_scores(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                        beta: float) -> torch.Tensor:
    """RLOO's reward with the KL inside it (N,): r_i - beta * sum_t (log pi - log ref) (the k1 estimate summed
    over the answer's tokens, as Ahmadian et al. and TRL's RLOO do)."""
    return scores - beta * ((logps - ref_logps) * mask.to(logps.dtype)).sum(-1)


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's per-token loss (B, T) before reduction, and detached metrics.

    ratio_t = exp(log pi - log pi_old); loss_t = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)
    + beta * k3_t(pi || ref). ``advantages`` (B,) per answer (broadcast over its tokens) or (B, T).
    ``epsilon_high`` defaults to ``epsilon_low`` (DAPO's clip-higher sets it larger). Padding is NOT masked
    here: ``reduce_grpo_loss`` does it. Metrics: clipfrac (share of tokens where clipping is active: ratio
    below 1 - eps_low with A < 0 or above 1 + eps_high with A > 0), approx_kl (k3 of KL(old || new)),
    ratio_mean, and kl (token mean of k3 to the reference) when beta > 0.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    log_ratio = logps - old_logps  # (B, T)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)  # (B, T)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    with torch.no_grad():
        active = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
        metrics.update(clipfrac=masked_mean(active.float(), mask),
                       approx_kl=masked_mean((ratio - 1) - log_ratio, mask),
                       ratio_mean=masked_mean(ratio, mask))
    return loss, metrics


def reduce_grpo_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo",
                     max_completion_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, count): the batch loss is numerator / count; with gradient accumulation, sum the numerators
    of a step's micro-batches and divide by the step's total count (``Engine.backward(normalizer=...)``).

    grpo:    mean over each answer's tokens, then over answers (GRPO Eq. 3): numerator = sum of answer
             means, count = answers. A long answer's tokens weigh less than a short one's.
    dapo:    every token of the batch weighs the same (DAPO Eq. 8): numerator = token sum, count = tokens.
    dr_grpo: a constant normaliser (Dr. GRPO Eq. 3): numerator = token sum, count = answers x
             ``max_completion_length``; no length bias either way.
    """
    mask = mask.to(token_loss.dtype)
    if loss_type == "grpo":
        per_answer = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        return per_answer.sum(), token_loss.new_tensor(float(token_loss.shape[0]))
    if loss_type == "dapo":
        return (token_loss * mask).sum(), mask.sum()
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return (token_loss * mask).sum(), token_loss.new_tensor(float(token_loss.shape[0] * max_completion_length))
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one batch (scalar) and its metrics: ``grpo_token_loss`` reduced by ``loss_type``."""
    token_loss, metrics = grpo_token_loss(logps, old_logps, advantages, mask, epsilon_low, epsilon_high, beta,
                                          ref_logps)
    numerator, count = reduce_grpo_loss(token_loss, mask, loss_type, max_completion_length)
    loss = numerator / count.clamp(min=1.0)
    metrics["pg_loss"] = loss.detach()
    return loss, metrics


def rloo_loss(seq_logps: torch.Tensor, old_seq_logps: torch.Tensor, advantages: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's clipped sequence-level loss (scalar), inputs (B,): the ratio is that of whole answers,
    exp(sum_t log pi - sum_t log pi_old); loss = mean_i -min(ratio_i A_i, clip(ratio_i) A_i) (TRL's RLOO with
    PPO-style clipping; with one update per rollout ratio = 1 and it is Ahmadian et al.'s REINFORCE)."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(seq_logps - old_seq_logps)  # (B,)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    with torch.no_grad():
        metrics = {"pg_loss": loss.detach(), "ratio_mean": ratio.mean(),
                   "clipfrac": ((ratio - clipped).abs() > 0).float().mean()}
    return loss, metrics


__all__ = ["GRPO_LOSS_TYPES", "SCALE_MODES", "group_advantages", "grpo_loss", "grpo_token_loss", "k3_kl",
           "kl_penalized_scores", "reduce_grpo_loss", "rloo_advantages", "rloo_loss"]
