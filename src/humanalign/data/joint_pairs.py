"""Safe-MM-DPO's two preference streams on one sampler (docs/algorithms/safe_mm_dpo.md).

``build_joint_dataset`` pairs every helpful pair with a harmless pair. When both hold the same prompt and the
same two responses (one PKU-SafeRLHF record gives both, ordered by helpfulness and by safety), the two are
*shared*: ``JointCollator`` puts each distinct response in the batch once, so a step of B helpful + B harmless
pairs forwards 2B sequences, as DPO does for B pairs. ``StreamView`` shows one stream's pairs as joint items
(evaluation). The per-pair fields (margins, costs) that travel from a stream's examples into its batch are
named here (``STREAM_FIELDS``); ``models.margins`` fills them. Pairs with images (``data.vision_joint``) go
through the same sampler and placement, with the vision pair collator; two pairs share only when their images
are the same too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from humanalign.data.pairs import normalized
from humanalign.data.preference_dataset import (
    INDEX_KEY,
    PAIR_KEYS,
    REF_CHOSEN,
    REF_REJECTED,
    PairCollator,
    PairDataset,
)
from humanalign.data.records import prompt_key

HELPFUL, HARMLESS = "helpful", "harmless"
# how a joint item's harmless pair relates to its helpful pair
NOT_SHARED, SHARED_SAME_ORDER, SHARED_SWAPPED = 0, 1, 2
# per-pair fields carried from a stream's examples into its batch
DELTA, COST_CHOSEN, COST_REJECTED, HAS_COST = "delta", "cost_chosen", "cost_rejected", "has_cost"  # per pair
STREAM_FIELDS = (DELTA, COST_CHOSEN, COST_REJECTED, HAS_COST)
PREFERRED_ROWS = "preferred_rows"


def _text_key(pair) -> tuple[str, frozenset[str], tuple[str, ...]]:
    """Prompt, the two responses and the prompt's images (a pair about another picture is another pair)."""
    return (prompt_key(pair.prompt), frozenset((normalized(pair.chosen), normalized(pair.rejected))),
            tuple(getattr(pair, "images", ())))


def _relation(helpful: Mapping[str, Any], harmless: Mapping[str, Any]) -> int:
    """Whether two tokenised pairs hold the same two sequences, in the same or in swapped order."""
    def seq(example, side):
        return example[f"{side}_input_ids"], example[f"{side}_labels"]

    if seq(helpful, "chosen") == seq(harmless, "chosen") and seq(helpful, "rejected") == seq(harmless, "rejected"):
        return SHARED_SAME_ORDER
    if seq(helpful, "chosen") == seq(harmless, "rejected") and seq(helpful, "rejected") == seq(harmless, "chosen"):
        return SHARED_SWAPPED
    return NOT_SHARED


def match_streams(helpful: PairDataset, harmless: PairDataset) -> list[tuple[int, int, int]]:
    """(helpful index, harmless index, SHARED_SAME_ORDER or SHARED_SWAPPED) for pairs with the same prompt and
    the same two responses; found by text, confirmed on token ids (each pair used at most once)."""
    by_key: dict[tuple[str, frozenset[str]], list[int]] = {}
    for j, pair in enumerate(harmless.pairs):
        by_key.setdefault(_text_key(pair), []).append(j)
    matched = []
    for i, pair in enumerate(helpful.pairs):
        candidates = by_key.get(_text_key(pair))
        for pos, j in enumerate(candidates or ()):
            relation = _relation(helpful[i], harmless[j])
            if relation != NOT_SHARED:
                matched.append((i, j, relation))
                del candidates[pos]
                break
    return matched


class JointDataset(Dataset):
    """Items (helpful index, harmless index or None, relation): one helpful and one harmless pair per item.

    An epoch covers every pair of both streams at least once: shared pairs first, then the unshared pairs of the
    larger stream, each with a partner from the other stream (its unshared pairs first, then repeats drawn in a
    seeded order)."""

    def __init__(self, helpful: PairDataset, harmless: PairDataset | None,
                 items: Sequence[tuple[int, int | None, int]]):
        self.helpful, self.harmless, self.items = helpful, harmless, list(items)
        self.num_shared = sum(1 for _, _, rel in self.items if rel != NOT_SHARED)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        h, s, relation = self.items[i]
        item: dict[str, Any] = {HELPFUL: self.helpful[h], "relation": relation}
        if s is not None:
            item[HARMLESS] = self.harmless[s]
        return item

    @property
    def lengths(self) -> list[int]:
        """Longest sequence of each item (for length-grouped batching)."""
        h_len, s_len = self.helpful.lengths, self.harmless.lengths if self.harmless is not None else []
        return [max(h_len[h], s_len[s] if s is not None else 0) for h, s, _ in self.items]

    def describe(self) -> str:
        if self.harmless is None:
            return f"{len(self.helpful)} helpful pairs (no harmless stream)"
        nh, ns, n = len(self.helpful), len(self.harmless), len(self.items)
        parts = [f"{n} items per epoch, each a helpful and a harmless pair, from {nh} helpful + {ns} harmless pairs",
                 f"{self.num_shared} items share their prompt and both responses (each response forwarded once)"]
        if n > nh or n > ns:
            parts.append(f"repeated to fill the epoch: {n - nh} helpful, {n - ns} harmless")
        return "; ".join(parts)


def build_joint_dataset(helpful: PairDataset, harmless: PairDataset | None, seed: int,
                        share_responses: bool = True) -> JointDataset:
    if harmless is None:
        return JointDataset(helpful, None, [(i, None, NOT_SHARED) for i in range(len(helpful))])
    matched = match_streams(helpful, harmless) if share_responses else []
    used_h, used_s = {i for i, _, _ in matched}, {j for _, j, _ in matched}
    free_h = [i for i in range(len(helpful)) if i not in used_h]
    free_s = [j for j in range(len(harmless)) if j not in used_s]
    rng = np.random.default_rng([seed, 0x5AFE])

    def partners(free: list[int], total: int, count: int) -> list[int]:
        out = [free[k] for k in rng.permutation(len(free))] if free else []
        while len(out) < count:
            out.extend(rng.permutation(total).tolist())
        return out[:count]

    if len(free_h) >= len(free_s):
        extra = list(zip(free_h, partners(free_s, len(harmless), len(free_h))))
    else:
        extra = list(zip(partners(free_h, len(helpful), len(free_s)), free_s))
    items = list(matched) + [(int(h), int(s), NOT_SHARED) for h, s in extra]
    return JointDataset(helpful, harmless, items)


class StreamView(Dataset):
    """One stream's pairs as joint items (for evaluation and precomputing): {stream: example}."""

    def __init__(self, dataset: PairDataset, stream: str):
        self.dataset, self.stream = dataset, stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.stream: self.dataset[i], "relation": NOT_SHARED}


class JointCollator:
    """Joint items -> one pair batch of the distinct sequences plus, per stream, where its pairs' rows are.

    The batch is a ``PairCollator`` batch of P *distinct pairs* (``input_ids`` / ``attention_mask`` / ``labels``
    (2P, T): rows 0..P-1 the first responses, P..2P-1 the second ones; its ``score_plan``; the precomputed
    reference log-probs when the examples carry them), so the pair trainers' fast forward applies to it. A
    shared item is one distinct pair for both streams, an unshared item two. For each stream present,
    ``batch[stream]`` = {``chosen_row``, ``rejected_row`` (B,) long: rows of its chosen and rejected sequences;
    ``index`` (B,) long; the numeric STREAM_FIELDS present (B,) float}. Picklable (DataLoader workers).
    ``pairs`` / ``distinct_pair``: the pair collator and the feature it takes from a stream's example (the
    vision subclass, ``data.vision_joint.VisionJointCollator``, batches pairs with their images instead)."""

    def __init__(self, pad_token_id: int):
        self.pairs: Any = PairCollator(pad_token_id)

    def distinct_pair(self, example: Mapping[str, Any]) -> Any:
        """The pair collator's feature for a stream example's pair."""
        return {k: example[k] for k in (*PAIR_KEYS, REF_CHOSEN, REF_REJECTED) if k in example}

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        distinct: list[Any] = []  # the distinct pairs, as the pair collator's features
        placed: dict[str, list[tuple[int, bool]]] = {}  # stream -> (distinct pair, swapped) per item
        examples: dict[str, list[dict[str, Any]]] = {}

        def add(example: Mapping[str, Any]) -> int:
            distinct.append(self.distinct_pair(example))
            return len(distinct) - 1

        for feature in features:
            relation = feature.get("relation", NOT_SHARED)
            helpful, harmless = feature.get(HELPFUL), feature.get(HARMLESS)
            if helpful is not None:
                placed.setdefault(HELPFUL, []).append((add(helpful), False))
                examples.setdefault(HELPFUL, []).append(helpful)
            if harmless is not None:
                if helpful is not None and relation != NOT_SHARED:
                    where = (placed[HELPFUL][-1][0], relation == SHARED_SWAPPED)
                else:
                    where = (add(harmless), False)
                placed.setdefault(HARMLESS, []).append(where)
                examples.setdefault(HARMLESS, []).append(harmless)
        batch = self.pairs(distinct)
        count = len(distinct)  # P: the second response of distinct pair k is row P + k
        for stream, where in placed.items():
            index = torch.tensor([k for k, _ in where], dtype=torch.long)  # (B,)
            swapped = torch.tensor([flip for _, flip in where], dtype=torch.long)  # (B,)
            part: dict[str, torch.Tensor] = {
                "chosen_row": index + count * swapped,  # (B,)
                "rejected_row": index + count * (1 - swapped),  # (B,)
                INDEX_KEY: torch.tensor([int(e[INDEX_KEY]) for e in examples[stream]], dtype=torch.long),
            }
            for name in (DELTA, COST_CHOSEN, COST_REJECTED, HAS_COST):
                if name in examples[stream][0]:
                    part[name] = torch.tensor([float(e[name]) for e in examples[stream]], dtype=torch.float32)
            batch[stream] = part
        preferred = torch.zeros(2 * count, dtype=torch.bool)  # (2P,) rows some stream prefers (perplexity)
        for part in (batch[s] for s in placed):
            preferred[part["chosen_row"]] = True
        batch[PREFERRED_ROWS] = preferred
        return batch


__all__ = [
    "HELPFUL", "HARMLESS", "NOT_SHARED", "SHARED_SAME_ORDER", "SHARED_SWAPPED", "STREAM_FIELDS", "DELTA",
    "COST_CHOSEN", "COST_REJECTED", "HAS_COST", "PREFERRED_ROWS",
    "match_streams", "JointDataset", "build_joint_dataset", "StreamView", "JointCollator",
]
