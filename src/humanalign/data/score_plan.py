"""Where the LM head must score in a (2B, T) pair batch, planned on the CPU by the collator (``PairCollator``)
so that the training step needs no host-device sync. ``models.logprobs.concatenated_forward`` reads the plan
from the batch (``PLAN_KEY``) and runs the head on the planned positions only; ``score_plan`` is pure tensor
layout, no model involved.

Two layouts: ``padded`` (the collated rows, chosen first) and ``shared`` (one row per pair, the prompt once,
then the chosen and the rejected response, with its own position ids and 4-D attention mask).
"""

from __future__ import annotations

import torch

from humanalign.data.tokenize import IGNORE_INDEX

PLAN_KEY = "score_plan"  # the batch's score plan: {"padded": {...}, "shared": {...}}


def _first_label(labels_row: torch.Tensor) -> int:
    hits = (labels_row != IGNORE_INDEX).nonzero()
    return int(hits[0]) if len(hits) else labels_row.numel()


def score_plan(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
               shared: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Where the head must score, for a (2B, T) pair batch (CPU tensors; chosen rows first).

    Each layout has ``index`` (N,): the flattened position, in its own rows, of the hidden state that predicts a
    label; ``target`` (N,): that label; ``dense`` (N,): where the log-prob goes in the (2B, T - 1) grid of the
    shifted labels. ``shared`` (only when ``shared``) also has its inputs: ``input_ids`` / ``position_ids``
    (B, L) and ``attention_mask`` (B, 1, L, L) bool (True: may attend). Chosen and rejected share the longest
    common prefix of their ids that holds no label (the prompt)."""
    rows, width = labels.shape
    valid = labels[:, 1:] != IGNORE_INDEX  # (2B, T-1)
    row_of, col_of = valid.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    dense = row_of * (width - 1) + col_of
    plans = {"padded": {"index": row_of * width + col_of, "target": labels[row_of, col_of + 1], "dense": dense}}
    if not shared or rows % 2:
        return plans
    half = rows // 2
    lengths = (attention_mask.sum(-1) if attention_mask is not None else torch.full((rows,), width)).tolist()
    segments = []  # per pair: (chosen length, rejected length, shared prefix length)
    for i in range(half):
        chosen, rejected = input_ids[i], input_ids[half + i]
        limit = min(_first_label(labels[i]), _first_label(labels[half + i]), lengths[i], lengths[half + i])
        same = (chosen[:limit] != rejected[:limit]).nonzero()
        segments.append((lengths[i], lengths[half + i], int(same[0]) if len(same) else limit))
    span = max(c + r - k for c, r, k in segments)  # L
    ids = torch.zeros(half, span, dtype=input_ids.dtype)
    positions = torch.zeros(half, span, dtype=torch.long)
    pos = torch.arange(span)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # (L, L) query row may see key column
    masks = causal.unsqueeze(0).repeat(half, 1, 1)  # (B, L, L)
    alone = torch.eye(span, dtype=torch.bool)
    index = torch.empty_like(dense)
    for i, (c, r, k) in enumerate(segments):
        total = c + r - k
        ids[i, :c] = input_ids[i, :c]
        ids[i, c:total] = input_ids[half + i, k:r]
        positions[i, :c] = torch.arange(c)
        positions[i, c:total] = torch.arange(k, r)
        rejected_queries = (pos >= c) & (pos < total)
        chosen_keys = (pos >= k) & (pos < c)
        masks[i] &= ~(rejected_queries.unsqueeze(1) & chosen_keys.unsqueeze(0))
        masks[i, total:] = alone[total:]  # padding sees itself only (no NaN rows)
        for row, in_row in ((i, lambda q: q), (half + i, lambda q, c=c, k=k: torch.where(q < k, q, q + c - k))):
            picked = row_of == row
            index[picked] = i * span + in_row(col_of[picked])  # col = s - 1, the predicting position in the pair
    plans["shared"] = {"index": index, "target": plans["padded"]["target"], "dense": dense, "input_ids": ids,
                       "position_ids": positions, "attention_mask": masks.unsqueeze(1)}
    return plans


__all__ = ["PLAN_KEY", "score_plan"]
