"""Score-model pair batches with the prompt once per pair (the reward-model trainer's collator).

A score model reads one number per answer: its head on the answer's last token. A ``collate_pairs`` batch (2B, T)
runs the shared prompt through the backbone twice, once in the chosen row and once in the rejected row. The
``shared`` layout of ``data.score_plan`` (the DPO trainer's: one row per pair, ``prompt + chosen + rejected``,
position ids restarting at the end of the prompt for the rejected answer, a 4-D mask that hides the chosen
answer from the rejected one) computes the prompt once; every token then sees exactly what it sees in its own
row, so the hidden state at each answer's last token is the plain forward's. ``shared_score_rows`` builds that
layout (tests/data/test_score_rows.py checks it against ``score_plan``'s) and where those last tokens sit
(``ends``); ``ScorePairCollator`` builds it on the CPU, so the training step needs no host-device sync. Pure
tensor layout, no model involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from humanalign.data.tokenize import IGNORE_INDEX, collate_pairs

SHARED_ROWS_KEY = "shared_rows"  # the batch's shared-prompt rows: {"input_ids", "position_ids", "attention_mask", "ends"}


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B, T) -> (B,) rightmost position whose token is not the pad token (transformers' rule; 0 if all pad)."""
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).long()  # (B, T)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    return (positions * non_pad).argmax(dim=-1)


def shared_score_rows(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                      pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """The shared-prompt rows of a right-padded (2B, T) pair batch (chosen rows first) and where each of its 2B
    sequences ends in them: ``score_plan``'s shared layout, built for the whole batch at once (no loop over the
    pairs: the collator runs on every training step, and a score model needs no label positions).

    Returns ``input_ids`` (B, L) (``pad_token_id``, or 0, after each row's end), ``position_ids`` (B, L) and
    ``attention_mask`` (B, 1, L, L) bool (True: may attend) as ``score_plan(...)["shared"]`` has them, and
    ``ends`` (2B,): the flattened index into the (B, L) rows of the token whose score is each sequence's end
    score (its last non-pad token, ``last_non_pad_index``, as the plain forward reads it), chosen first.
    Chosen and rejected share the longest common prefix of their ids holding no label (the prompt); a position
    of the rejected answer inside that prefix reads the chosen row's token: the same token, the same context."""
    rows, width = input_ids.shape
    if rows % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen then rejected), got {rows}")
    half = rows // 2
    lengths = attention_mask.sum(-1)  # (2B,)
    c, r = lengths[:half], lengths[half:]  # (B,) each
    pos = torch.arange(width)  # (T,)
    has_label = labels != IGNORE_INDEX  # (2B, T)
    first_label = torch.where(has_label, pos, width).amin(-1)  # (2B,) T when a row has no label
    limit = torch.minimum(torch.minimum(first_label[:half], first_label[half:]), torch.minimum(c, r))  # (B,)
    same = (input_ids[:half] == input_ids[half:]) & (pos < limit.unsqueeze(1))  # (B, T)
    k = same.long().cumprod(-1).sum(-1)  # (B,) the shared prompt's length
    total = c + r - k  # (B,) real tokens of each pair row
    span = int(total.max())  # L
    col = torch.arange(span)  # (L,)
    in_chosen = col < c.unsqueeze(1)  # (B, L)
    real = col < total.unsqueeze(1)  # (B, L)
    source = torch.where(in_chosen, col, col - c.unsqueeze(1) + k.unsqueeze(1))  # (B, L) position in its own row
    source = torch.where(real, source, 0).clamp(max=width - 1)
    ids = torch.where(in_chosen, input_ids[:half].gather(1, source), input_ids[half:].gather(1, source))
    ids = ids.masked_fill(~real, 0 if pad_token_id is None else pad_token_id)
    causal = col.unsqueeze(1) >= col.unsqueeze(0)  # (L, L) query row may see key column
    rejected_query = real & ~in_chosen  # (B, L)
    chosen_answer_key = in_chosen & (col >= k.unsqueeze(1))  # (B, L)
    mask = causal & ~(rejected_query.unsqueeze(2) & chosen_answer_key.unsqueeze(1))  # (B, L, L)
    mask = torch.where(real.unsqueeze(2), mask, torch.eye(span, dtype=torch.bool))  # padding sees itself only
    end = last_non_pad_index(input_ids, pad_token_id)  # (2B,) in the padded rows
    end_rejected = torch.where(end[half:] < k, end[half:], end[half:] + c - k)
    start = torch.arange(half) * span  # (B,) each pair row's first index
    return {"input_ids": ids, "position_ids": source.masked_fill(~real, 0), "attention_mask": mask.unsqueeze(1),
            "ends": torch.cat([start + end[:half], start + end_rejected])}


class ScorePairCollator:
    """Examples -> ``collate_pairs`` batch (input_ids / attention_mask / labels (2B, T), chosen rows first,
    numeric extra fields (B,)), plus, when ``shared``, its shared-prompt rows under ``SHARED_ROWS_KEY``
    (``shared_score_rows``). Picklable (workers)."""

    def __init__(self, pad_token_id: int, shared: bool = False):
        self.pad_token_id = pad_token_id
        self.shared = shared

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_pairs(features, self.pad_token_id)
        if self.shared and features:
            batch[SHARED_ROWS_KEY] = shared_score_rows(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                       self.pad_token_id)
        return batch


__all__ = ["SHARED_ROWS_KEY", "ScorePairCollator", "last_non_pad_index", "shared_score_rows"]
