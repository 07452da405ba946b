"""The preference pairs a reward or cost model trains on: read from the run config's source, counted by why
they were left out, and the lengths and safety labels the trainer plans around."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from humanalign.config.data import SourceSpec
from humanalign.config.rm import RewardModelConfig
from humanalign.data.pairs import load_preference_pairs
from humanalign.data.records import HarmlessPair, PreferencePair


def source_spec(cfg: RewardModelConfig, path: str) -> SourceSpec:
    return SourceSpec(source=cfg.source, path=path, field_map=cfg.field_map, constants=cfg.constants,
                      record_type=cfg.record_type)


def load_pairs(cfg: RewardModelConfig, path: str, limit: int | None, allow_images: bool = False,
               max_images: int | None = None) -> tuple[list[PreferencePair], Counter[str]]:
    """The task's pairs from ``path`` (bad records raise with file and line unless skip_invalid), at most
    ``limit`` of them; everything left out is counted by reason. Pairs with images are refused unless
    ``allow_images`` (a vision-language score model), and a record showing more than ``max_images`` is a bad
    record (the model's limit per prompt)."""
    pairs, skipped = load_preference_pairs(source_spec(cfg, path), kind=cfg.task, skip_invalid=cfg.skip_invalid,
                                           allow_images=allow_images, max_images=max_images)
    if limit is not None and len(pairs) > limit:
        skipped[f"beyond the first {limit} (max samples)"] += len(pairs) - limit
        pairs = pairs[:limit]
    return pairs, skipped


def pair_length(example: dict[str, Any]) -> int:
    """Tokens of an encoded pair's longer side (what length-grouped batching sorts by)."""
    return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def count_labelled(pairs: Sequence[PreferencePair]) -> int:
    """Pairs with both is_safe labels."""
    return sum(1 for p in pairs if isinstance(p, HarmlessPair) and p.is_chosen_safe is not None
               and p.is_rejected_safe is not None)


__all__ = ["source_spec", "load_pairs", "pair_length", "count_labelled"]
