"""Supervised fine-tuning losses: next-token cross-entropy on target (assistant) tokens only.

``sft_loss_sums`` is the SFT trainer's (per-row sums); ``ptx_loss`` is the same objective as PPO's auxiliary
"ptx" term (InstructGPT, Ouyang et al. 2022, eq. 2: gamma x E_pretrain[log pi(x)]), a mean over the batch's
target tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of the target tokens, summed per row, and the number of target tokens per row.

    logits (B, T, V) from inputs aligned with labels (B, T); a label -100 carries no loss; the token at t is
    predicted from position t-1. Only target positions are upcast to fp32 (memory). Returns (B,), (B,)."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    picked = logits[:, :-1][mask].float()  # (N, V)
    ce = F.cross_entropy(picked, targets[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) row of each target token
    sums = torch.zeros(labels.shape[0], device=logits.device, dtype=ce.dtype).index_add_(0, rows, ce)
    return sums, mask.sum(-1)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens of an SFT batch (the InstructGPT 'ptx' term), a scalar.

    logits (B, T, V) aligned with labels (B, T) (-100: no loss; the token at t is predicted from t-1). Each
    row's log-probs are the gathered logit minus its log-sum-exp in float32, one row at a time (no full
    log-softmax tensor). Positive: minimising it raises the likelihood of the SFT data.
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    rows = []
    for row_logits, row_targets in zip(logits[:, :-1, :], targets.masked_fill(~mask, 0)):  # (T-1, V), (T-1,)
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)  # (T-1,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    weights = mask.to(torch.float32)
    logps = torch.stack(rows) * weights  # (B, T-1), 0 where there is no label
    return -logps.sum() / weights.sum().clamp(min=1)
