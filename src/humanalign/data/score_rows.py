"""Score-model pair batches with the prompt once per pair (the reward-model trainer's collator).

A score model reads one number per answer: its head on the answer's last token. A ``collate_pairs`` batch (2B, T)
runs the shared prompt through the backbone twice, once in the chosen row and once in the rejected row. The
``shared`` layout of ``data.score_plan`` (the DPO trainer's: one row per pair, ``prompt + chosen + rejected``,
position ids restarting at the end of the prompt for the rejected answer, a 4-D mask that hides the chosen
answer from the rejected one) computes the prompt once; every token then sees exactly what it sees in its own
row, so the hidden state at each answer's last token is the plain forward's. ``shared_score_rows`` adds to
that layout where those last tokens sit (``ends``); ``ScorePairCollator`` builds it on the CPU, so the training
step needs no host-device sync. Pure tensor layout, no model involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from humanalign.data.score_plan import score_plan
from humanalign.data.tokenize import collate_pairs

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
    """The shared-prompt rows of a right-padded (2B, T) pair batch (CPU tensors, chosen rows first) and where
    each of its 2B sequences ends in them.

    Returns ``input_ids`` / ``position_ids`` (B, L), ``attention_mask`` (B, 1, L, L) bool (True: may attend),
    as ``score_plan``'s shared layout, and ``ends`` (2B,): the flattened index into the (B, L) rows of the token
    whose score is each sequence's end score (the last non-pad token, ``last_non_pad_index``, as the plain
    forward reads it), chosen first. Chosen and rejected share the longest common prefix of their ids holding
    no label (the prompt); a position of the rejected answer inside that prefix reads the chosen row's token,
    which is the same token with the same context."""
    rows = input_ids.shape[0]
    if rows % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen then rejected), got {rows}")
    half = rows // 2
    plan = score_plan(input_ids, labels, attention_mask)["shared"]
    span = plan["input_ids"].shape[1]  # L
    lengths = attention_mask.sum(-1)  # (2B,)
    chosen, rejected = lengths[:half], lengths[half:]  # c, r
    # a pair row's real columns all see column 0; its padding columns see only themselves
    total = plan["attention_mask"][:, 0, :, 0].sum(-1)  # (B,) c + r - k
    prefix = chosen + rejected - total  # (B,) k, the shared prompt's length
    end = last_non_pad_index(input_ids, pad_token_id)  # (2B,) in the padded rows
    end_rejected = end[half:]
    end_rejected = torch.where(end_rejected < prefix, end_rejected, end_rejected + chosen - prefix)
    start = torch.arange(half) * span  # (B,) each pair row's first index
    ends = torch.cat([start + end[:half], start + end_rejected])  # (2B,)
    return {"input_ids": plan["input_ids"], "position_ids": plan["position_ids"],
            "attention_mask": plan["attention_mask"], "ends": ends}


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
