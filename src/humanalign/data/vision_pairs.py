"""Preference pairs with images for the pair trainers (`train dpo` with a vision-language policy).

The vision counterpart of ``data.preference_dataset``: pairs are read with their images
(``load_preference_pairs(allow_images=True)``), the ones that teach nothing are skipped and counted as for text
(``pair_problem``), the rest tokenised with the model's processor (``data.vision_collate``: the processor's
chat template, image tokens expanded, answer-only labels) and batched by ``VisionPairCollator`` (2B rows, chosen
first, pixel values repeated for the rejected rows). ``max_length`` cuts answers, never the prompt (whose image
tokens must stay whole), so ``max_prompt_length`` does not apply; a prompt that alone reaches ``max_length``
is skipped and counted. Text-only pairs in the same file are batched the same way (no image inputs).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from torch.utils.data import Dataset

from humanalign.config.data import SourceSpec
from humanalign.data.pairs import Kind, load_preference_pairs, pair_problem
from humanalign.data.preference_dataset import describe_skips
from humanalign.data.records import PreferencePair
from humanalign.data.tokenize import TruncationStats
from humanalign.data.vision_collate import VisionPairCollator, VisionPairExample, tokenize_vision_pair
from humanalign.errors import UserError


class VisionPairDataset(Dataset):
    """Tokenised pairs with their image inputs, plus the pair each came from (``pairs[i]``)."""

    def __init__(self, examples: list[VisionPairExample], pairs: list[PreferencePair]):
        self.examples, self.pairs = examples, pairs
        self.skipped: Counter[str] = Counter()
        self.truncation = TruncationStats()  # never filled: answers are cut by the processor rows, not counted
        self.name = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> VisionPairExample:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        """Tokens per example as batched (the longer of its two rows, image tokens included)."""
        return [max(len(e.chosen["input_ids"]), len(e.rejected["input_ids"])) for e in self.examples]

    @property
    def images(self) -> int:
        return sum(1 for p in self.pairs if p.images)


def build_vision_pair_dataset(pairs, processor, max_length: int | None) -> tuple[VisionPairDataset, Counter[str]]:
    """Tokenise ``pairs`` with ``processor`` -> (dataset, skipped pairs counted by reason)."""
    skipped: Counter[str] = Counter()
    examples, kept = [], []
    for pair in pairs:
        problem = pair_problem(pair)
        out = problem or tokenize_vision_pair(pair, processor, max_length)
        if isinstance(out, str):
            skipped[out] += 1
            continue
        examples.append(out)
        kept.append(pair)
    return VisionPairDataset(examples, kept), skipped


def load_vision_pair_dataset(path: str | Path, kind: Kind, processor, cfg, engine=None, *,
                             name: str | None = None, max_images: int | None = None) -> VisionPairDataset:
    """Read pairs of ``kind`` (images allowed, at most ``max_images`` each) from ``path`` with the config's
    ``source`` adapter, tokenise them with ``cfg.max_length``, print how many were kept and skipped; raises
    UserError when none is left."""
    label = name or str(path)
    spec = SourceSpec(source=getattr(cfg, "source", "pairs"), path=str(path))
    pairs, skipped = load_preference_pairs(spec, kind=kind, skip_invalid=getattr(cfg, "skip_invalid", False),
                                           allow_empty=True, allow_images=True, max_images=max_images)
    dataset, more = build_vision_pair_dataset(pairs, processor, cfg.max_length)
    skipped.update(more)
    dataset.skipped, dataset.name = skipped, label
    say = engine.print if engine is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"[data] {label}: {len(dataset)} {kind} pairs kept ({dataset.images} with images); skipped: "
        f"{describe_skips(skipped)}")
    if len(dataset) == 0:
        raise UserError(f"{label}: no usable {kind} pairs (skipped: {describe_skips(skipped)})")
    return dataset


__all__ = ["VisionPairDataset", "VisionPairCollator", "build_vision_pair_dataset", "load_vision_pair_dataset"]
