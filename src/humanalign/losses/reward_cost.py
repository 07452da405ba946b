"""Losses of the score models: the reward model (helpfulness) and the cost model (harmfulness).

Both are Bradley-Terry pairwise losses (Ouyang et al. 2022, Eq. 1; Safe RLHF, Dai et al. 2023, arXiv
2310.12773, Eq. 5 for rewards and Eq. 6 for costs). Sequence-wise versions score each response once (the score
at its last token); token-wise versions (Safe RLHF's ``loss_type: token-wise``) compare the two responses'
per-token scores from the first token where they differ to the end of the longer one.

Sign conventions: reward — higher is more helpful, ``chosen`` is the better response. Cost — cost > 0 means
unsafe, cost < 0 means safe; ``safer`` is the less harmful response of the pair, ``unsafer`` the more harmful
one, so the pairwise term pushes c_unsafer above c_safer. Safety labels: True = the response is safe.

All functions return per-example losses (B,) (callers take ``.mean()``) and a dict of detached scalar metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from humanalign.losses.preference import pair_accuracy


class ScoreLoss(NamedTuple):
    losses: torch.Tensor  # (B,) not reduced
    metrics: dict[str, torch.Tensor]  # detached 0-dim tensors


def reward_pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    regularization: float = 0.0,
    center_coef: float = 0.0,
) -> ScoreLoss:
    """Sequence-wise Bradley-Terry reward loss, (B,) scores in, (B,) losses out.

    loss_i = -log s(r_w - r_l - margin_i)                      (Llama 2 margin, Touvron et al. 2023, Eq. 2)
             + regularization * (r_w^2 + r_l^2)                (Safe RLHF's score regulariser)
             + center_coef * (r_w + r_l)^2                     (TRL RewardTrainer ``center_rewards_coefficient``,
                                                                Eisenstein et al. 2023)
    The batch mean equals TRL's loss (margin + centering) and Safe RLHF's
    ``reg * (mean(r_l^2) + mean(r_w^2))``. ``margin`` is a (B,) tensor or a number: how much the chosen reward
    must exceed the rejected one before the loss stops pushing.
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff - margin if margin is not None else diff
    losses = -F.logsigmoid(logits)
    if regularization:
        losses = losses + regularization * (r_chosen.square() + r_rejected.square())
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected).square()
    with torch.no_grad():
        all_rewards = torch.cat([r_chosen.detach(), r_rejected.detach()]).float()
        metrics = {
            "accuracy": pair_accuracy(diff).mean(),  # a tie counts one half
            "margin": diff.float().mean(),
            "reward_chosen": r_chosen.detach().float().mean(),
            "reward_rejected": r_rejected.detach().float().mean(),
            "reward_mean": all_rewards.mean(),
            "reward_min": all_rewards.min(),
            "reward_max": all_rewards.max(),
        }
    return ScoreLoss(losses, metrics)


def first_divergence_index(
    chosen_ids: torch.Tensor, rejected_ids: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor
) -> torch.Tensor:
    """First position where two right-padded sequences differ (B,): token ids differ or only one is padding.

    Rows are prompt + response aligned from position 0; the shared prompt gives the same prefix. Identical
    pairs have no divergence and raise ValueError (the data pipeline should have dropped them, counted).
    """
    differs = (chosen_ids != rejected_ids) | (chosen_mask.bool() != rejected_mask.bool())  # (B, T)
    differs = differs & (chosen_mask.bool() | rejected_mask.bool())
    if not bool(differs.any(dim=1).all()):
        rows = (~differs.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"pairs {rows} have identical chosen and rejected sequences")
    return differs.int().argmax(dim=1)  # argmax returns the first maximal position


def divergence_span_mask(
    chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, divergence_index: torch.Tensor
) -> torch.Tensor:
    """Positions compared by the token-wise losses (B, T): divergence_index <= t <= end of the longer sequence.

    end = max(last attended position of chosen, of rejected), inclusive (Safe RLHF score trainers).
    """
    positions = torch.arange(chosen_mask.size(1), device=chosen_mask.device).unsqueeze(0)  # (1, T)
    last_chosen = (chosen_mask.bool() * positions).amax(dim=1)  # (B,)
    last_rejected = (rejected_mask.bool() * positions).amax(dim=1)  # (B,)
    end = torch.maximum(last_chosen, last_rejected).unsqueeze(1)  # (B, 1)
    start = divergence_index.to(positions.device).unsqueeze(1)  # (B, 1)
    return (positions >= start) & (positions <= end)


def _span_mean(x: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T) over each row's span (B, T) -> (B,)."""
    span = span.to(x.dtype)
    return (x * span).sum(dim=1) / span.sum(dim=1).clamp(min=1)


def reward_tokenwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    divergence_index: torch.Tensor,
    regularization: float = 0.0,
) -> ScoreLoss:
    """Token-wise reward loss (Safe RLHF ``RewardTrainer``, ``loss_type='token-wise'``).

    scores and masks are (B, T), the two sequences padded to the same T; ``divergence_index`` (B,) is the first
    position where chosen and rejected differ (see ``first_divergence_index``). Over the span
    [divergence_index, end of the longer sequence] (inclusive; the shorter sequence contributes its
    padding-position scores there, as in Safe RLHF):
        loss_i = mean_t -log s(s_w,t - s_l,t) + regularization * (mean_t s_w,t^2 + mean_t s_l,t^2)
    Metrics use the score at each sequence's own last token (the end score), like the sequence-wise loss.
    """
    span = divergence_span_mask(chosen_mask, rejected_mask, divergence_index)  # (B, T)
    losses = _span_mean(-F.logsigmoid(chosen_scores - rejected_scores), span)  # (B,)
    if regularization:
        losses = losses + regularization * (
            _span_mean(chosen_scores.square(), span) + _span_mean(rejected_scores.square(), span)
        )
    end_chosen = end_scores(chosen_scores, chosen_mask)
    end_rejected = end_scores(rejected_scores, rejected_mask)
    metrics = reward_pairwise_loss(end_chosen.detach(), end_rejected.detach()).metrics
    return ScoreLoss(losses, metrics)


def end_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Score at the last attended position of each row: (B, T) -> (B,). Assumes right padding."""
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    last = (mask.bool() * positions).amax(dim=1)  # (B,)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


def _is_safe(label: torch.Tensor) -> torch.Tensor:
    """Bool (B,): True where the label says safe (True / 1); unknown labels come out False and are masked."""
    return label.bool() if label.dtype == torch.bool else label.float() > 0.5


def _is_known(label: torch.Tensor, has_labels: torch.Tensor | None) -> torch.Tensor:
    """Bool (B,): the label is usable. Numeric labels -1 or NaN mean unknown; ``has_labels`` may veto more."""
    known = torch.ones_like(label, dtype=torch.bool) if label.dtype == torch.bool else label.float() >= 0
    return known & has_labels.bool().to(known.device) if has_labels is not None else known


def _signed(label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """s = +1 for a safe response, -1 for an unsafe one, in ``like``'s dtype (B,)."""
    return _is_safe(label).to(like.dtype) * 2 - 1


def _cost_metrics(c_safer, c_unsafer, safer_label, unsafer_label, known_safer, known_unsafer):
    with torch.no_grad():
        c_safer, c_unsafer = c_safer.detach().float(), c_unsafer.detach().float()
        metrics = {
            "accuracy": pair_accuracy(c_unsafer - c_safer).mean(),  # a tie counts one half
            "margin": (c_unsafer - c_safer).mean(),
            "cost_safer": c_safer.mean(),
            "cost_unsafer": c_unsafer.mean(),
            "labeled_fraction": torch.cat([known_safer, known_unsafer]).float().mean(),
        }
        # sign accuracy over labelled responses: cost < 0 exactly for the responses labelled safe
        right = torch.cat([
            ((c_safer < 0) == _is_safe(safer_label))[known_safer],
            ((c_unsafer < 0) == _is_safe(unsafer_label))[known_unsafer],
        ])
        metrics["sign_accuracy"] = right.float().mean() if right.numel() else torch.tensor(float("nan"))
    return metrics


def cost_loss(
    c_safer: torch.Tensor,
    c_unsafer: torch.Tensor,
    is_safer_safe: torch.Tensor,
    is_unsafer_safe: torch.Tensor,
    regularization: float = 0.0,
    use_sign_terms: bool = True,
    has_labels: torch.Tensor | None = None,
) -> ScoreLoss:
    """Sequence-wise cost-model loss (Safe RLHF, arXiv 2310.12773, Eq. 6), (B,) costs in, (B,) losses out.

    With s = +1 for a safe response and -1 for an unsafe one (the paper writes s(y) = +1 for harmful and puts the
    sign on the other side; the terms are the same):
        loss_i = -log s(c_unsafer - c_safer)                     ranking: the more harmful response costs more
                 - log s(-s_safer * c_safer)                     sign: safe -> cost < 0, unsafe -> cost > 0
                 - log s(-s_unsafer * c_unsafer)
                 + regularization * (c_safer^2 + c_unsafer^2)
    The sign terms anchor cost = 0 at the safe/unsafe boundary, which PPO-Lagrangian's threshold d = 0 relies on.
    Label convention: ``is_*_safe`` are (B,) tensors, either bool (True = safe) or numeric with 1 = safe,
    0 = unsafe and -1 or NaN = unknown. A response with an unknown label, or in a pair whose ``has_labels`` (B,)
    is False, gets no sign term (the ranking and regularisation terms stay). ``use_sign_terms=False`` drops the
    sign terms for every pair.
    """
    known_safer = _is_known(is_safer_safe, has_labels)  # (B,)
    known_unsafer = _is_known(is_unsafer_safe, has_labels)  # (B,)
    losses = -F.logsigmoid(c_unsafer - c_safer)  # (B,)
    if use_sign_terms:
        sign_safer = -F.logsigmoid(-_signed(is_safer_safe, c_safer) * c_safer)  # (B,)
        sign_unsafer = -F.logsigmoid(-_signed(is_unsafer_safe, c_unsafer) * c_unsafer)  # (B,)
        losses = losses + sign_safer * known_safer + sign_unsafer * known_unsafer
    if regularization:
        losses = losses + regularization * (c_safer.square() + c_unsafer.square())
    metrics = _cost_metrics(c_safer, c_unsafer, is_safer_safe, is_unsafer_safe, known_safer, known_unsafer)
    return ScoreLoss(losses, metrics)


def cost_tokenwise_loss(
    safer_scores: torch.Tensor,
    unsafer_scores: torch.Tensor,
    safer_mask: torch.Tensor,
    unsafer_mask: torch.Tensor,
    divergence_index: torch.Tensor,
    is_safer_safe: torch.Tensor,
    is_unsafer_safe: torch.Tensor,
    regularization: float = 0.0,
    use_sign_terms: bool = True,
    has_labels: torch.Tensor | None = None,
) -> ScoreLoss:
    """Token-wise cost loss (Safe RLHF ``CostTrainer``, ``loss_type='token-wise'``): ``cost_loss`` per token.

    Over the span of ``divergence_span_mask`` (B, T), each term of ``cost_loss`` is averaged over the span's
    tokens, the sign terms using the response-level safety labels at every token. Metrics use end scores.
    """
    span = divergence_span_mask(safer_mask, unsafer_mask, divergence_index)  # (B, T)
    known_safer = _is_known(is_safer_safe, has_labels)  # (B,)
    known_unsafer = _is_known(is_unsafer_safe, has_labels)  # (B,)
    losses = _span_mean(-F.logsigmoid(unsafer_scores - safer_scores), span)  # (B,)
    if use_sign_terms:
        s_safer = _signed(is_safer_safe, safer_scores).unsqueeze(1)  # (B, 1)
        s_unsafer = _signed(is_unsafer_safe, unsafer_scores).unsqueeze(1)  # (B, 1)
        sign_safer = _span_mean(-F.logsigmoid(-s_safer * safer_scores), span)  # (B,)
        sign_unsafer = _span_mean(-F.logsigmoid(-s_unsafer * unsafer_scores), span)  # (B,)
        losses = losses + sign_safer * known_safer + sign_unsafer * known_unsafer
    if regularization:
        losses = losses + regularization * (
            _span_mean(safer_scores.square(), span) + _span_mean(unsafer_scores.square(), span)
        )
    end_safer, end_unsafer = end_scores(safer_scores, safer_mask), end_scores(unsafer_scores, unsafer_mask)
    metrics = _cost_metrics(end_safer, end_unsafer, is_safer_safe, is_unsafer_safe, known_safer, known_unsafer)
    return ScoreLoss(losses, metrics)
