"""Tokenised preference pairs for the pair trainers (the DPO family, Safe-MM-DPO).

A ``PairDataset`` holds one example per usable pair::

    {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",   # lists of token ids
     "index": position in the dataset, **extra per-example fields (margin, is_chosen_safe, ref log-probs ...)}

Both sequences share the prompt's tokens; labels are -100 on the prompt (``data.tokenize.encode_preference``).
A pair that would teach nothing is skipped and counted by reason, never silently dropped and never turned into a
NaN later: identical chosen and rejected responses (after whitespace normalisation), an empty response, and a
response truncated to nothing by ``max_length``. ``PairCollator`` turns examples into one (2B, T) batch (chosen
rows first) plus ``index`` (B,) and the extra fields as (B,) float tensors.

Typical use in a trainer::

    train_set = load_pair_dataset(cfg.train_path, "helpful", tokenizer, cfg, engine)
    loader = engine.train_loader(train_set, PairCollator(tokenizer.pad_token_id), lengths=train_set.lengths)
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from humanalign.config.data import SourceSpec
from humanalign.data.pairs import Kind, load_preference_pairs, pair_problem
from humanalign.data.records import PreferencePair
from humanalign.data.score_plan import PLAN_KEY, score_plan
from humanalign.data.tokenize import IGNORE_INDEX, TruncationStats, collate_pairs, encode_preference
from humanalign.errors import UserError

PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
INDEX_KEY = "index"
REF_CHOSEN = "ref_chosen_logps"  # summed reference log-probs carried in the batch (``models.reference``, precomputed)
REF_REJECTED = "ref_rejected_logps"

# Extra per-example fields: attribute names of the pair (``("margin", "is_chosen_safe")``), or a function of
# the pair returning {name: value}. Values should be numbers (bools count) so that they collate to tensors.
ExtraFields = Sequence[str] | Callable[[PreferencePair], dict[str, Any]] | None

SKIP_NO_RESPONSE = "no response token left (truncated or empty after templating)"


class PairDataset(Dataset):
    """Tokenised pairs plus, for each, the pair it came from (``pairs[i]``)."""

    def __init__(self, examples: list[dict[str, Any]], pairs: list[PreferencePair]):
        if len(examples) != len(pairs):
            raise ValueError(f"{len(examples)} examples for {len(pairs)} pairs")
        self.examples, self.pairs = examples, pairs
        self.skipped: Counter[str] = Counter()  # filled by load_pair_dataset
        self.truncation = TruncationStats()
        self.name = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        """Tokens per example as batched (the longer of its two sequences), for length-grouped batching."""
        return [max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in self.examples]

    @property
    def shared_lengths(self) -> list[int]:
        """Tokens of each pair's row in the shared-prompt layout (prompt once, then both responses), for
        length-grouped batching when the model computes pairs that way (``models.logprobs``)."""
        return [len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) - _shared_prefix(e) for e in self.examples]

    def add_field(self, name: str, values: Sequence[Any]) -> None:
        """Attach one value per example (e.g. precomputed reference log-probs); carried into every batch."""
        if name in PAIR_KEYS or name == INDEX_KEY:
            raise ValueError(f"'{name}' is a reserved field of a pair example")
        if len(values) != len(self.examples):
            raise ValueError(f"{len(values)} values of '{name}' for {len(self.examples)} examples")
        for example, value in zip(self.examples, values):
            example[name] = value

    def fingerprint(self) -> str:
        """sha256 of every example's token ids and labels, in order: the identity of the tokenised data."""
        digest = hashlib.sha256(f"pairs:{len(self.examples)}".encode())
        for example in self.examples:
            for key in PAIR_KEYS:
                values = np.asarray(example[key], dtype=np.int64)
                digest.update(np.int64(values.size).tobytes())
                digest.update(values.tobytes())
        return digest.hexdigest()


def _shared_prefix(example: dict[str, Any]) -> int:
    """Leading tokens the two sequences share before either has a label (the prompt), as ``score_plan`` finds."""
    chosen, rejected = example["chosen_input_ids"], example["rejected_input_ids"]
    limit = min(_first_label(example["chosen_labels"]), _first_label(example["rejected_labels"]))
    for i in range(limit):
        if chosen[i] != rejected[i]:
            return i
    return limit


def _first_label(labels: Sequence[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _extras(pair: PreferencePair, extra_fields: ExtraFields) -> dict[str, Any]:
    if extra_fields is None:
        return {}
    if callable(extra_fields):
        values = dict(extra_fields(pair))
    else:
        values = {name: getattr(pair, name, None) for name in extra_fields}
    reserved = [k for k in values if k in PAIR_KEYS or k == INDEX_KEY]
    if reserved:
        raise ValueError(f"extra field '{reserved[0]}' clashes with a pair example's own field")
    return values


def build_pair_dataset(
    pairs: Sequence[PreferencePair],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    extra_fields: ExtraFields = None,
) -> tuple[PairDataset, Counter[str], TruncationStats]:
    """Tokenise ``pairs`` -> (dataset, skipped pairs counted by reason, truncation statistics).

    The prompt is cut from the left to ``max_prompt_length`` and responses from the right to fit ``max_length``
    (see ``encode_preference``). Skipped, each counted: identical or empty responses, and pairs whose response
    has no token left after truncation.
    """
    stats = TruncationStats()
    skipped: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    kept: list[PreferencePair] = []
    for pair in pairs:
        problem = pair_problem(pair)
        if problem:
            skipped[problem] += 1
            continue
        encoded = encode_preference(tokenizer, pair.prompt, pair.chosen, pair.rejected, max_length,
                                    max_prompt_length, stats)
        if encoded is None:
            skipped[SKIP_NO_RESPONSE] += 1
            continue
        encoded[INDEX_KEY] = len(examples)
        encoded.update(_extras(pair, extra_fields))
        examples.append(encoded)
        kept.append(pair)
    dataset = PairDataset(examples, kept)
    dataset.truncation = stats
    return dataset, skipped, stats


class PairCollator:
    """Examples -> ``collate_pairs`` batch: input_ids / attention_mask / labels (2B, T), chosen rows first,
    ``index`` (B,) long, numeric extra fields (B,) float32, other extra fields as lists, and (``score_plan``)
    the positions the LM head must score in each layout (``data.score_plan``: built here, on the
    CPU, so that the training step needs no host-device sync). Picklable (workers)."""

    def __init__(self, pad_token_id: int, score_plan: bool = True):
        self.pad_token_id = pad_token_id
        self.score_plan = score_plan

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rest = [{k: v for k, v in f.items() if k != INDEX_KEY} for f in features]
        batch = collate_pairs(rest, self.pad_token_id)
        if features and INDEX_KEY in features[0]:
            batch[INDEX_KEY] = torch.tensor([int(f[INDEX_KEY]) for f in features], dtype=torch.long)  # (B,)
        if self.score_plan and features:
            batch[PLAN_KEY] = score_plan(batch["input_ids"], batch["labels"], batch["attention_mask"])
        return batch


def describe_skips(skipped: Counter[str]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common()) if skipped else "none"


def load_pair_dataset(
    path: str | Path,
    kind: Kind,
    tokenizer,
    cfg,
    engine=None,
    *,
    extra_fields: ExtraFields = None,
    name: str | None = None,
) -> PairDataset:
    """Read pairs of ``kind`` from ``path`` (a prepared *_pairs.jsonl, or any file the config's ``source``
    adapter reads), tokenise them with ``cfg.max_length`` / ``cfg.max_prompt_length``, and print (once, through
    ``engine.print`` when given) how many pairs were kept, skipped by reason, and truncated.

    ``cfg`` needs max_length, max_prompt_length, and optionally skip_invalid and source (default 'pairs').
    The counts are kept on the dataset (``.skipped``, ``.truncation``) for the run summary. Raises UserError
    when no pair is left.
    """
    label = name or str(path)
    spec = SourceSpec(source=getattr(cfg, "source", "pairs"), path=str(path))
    pairs, skipped = load_preference_pairs(spec, kind=kind, skip_invalid=getattr(cfg, "skip_invalid", False),
                                           allow_empty=True)
    dataset, more, stats = build_pair_dataset(
        pairs, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        extra_fields=extra_fields,
    )
    skipped.update(more)
    dataset.skipped, dataset.truncation, dataset.name = skipped, stats, label
    say = engine.print if engine is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"[data] {label}: {len(dataset)} {kind} pairs kept; skipped: {describe_skips(skipped)}")
    if stats.prompt_truncated or stats.response_truncated:
        say(f"[data] {label}: truncation (max_length {cfg.max_length}, max_prompt_length "
            f"{cfg.max_prompt_length}): {stats.summary()}")
    if len(dataset) == 0:
        raise UserError(f"{label}: no usable {kind} pairs (skipped: {describe_skips(skipped)})")
    return dataset


__all__ = [
    "PAIR_KEYS", "INDEX_KEY", "REF_CHOSEN", "REF_REJECTED", "SKIP_NO_RESPONSE", "ExtraFields", "PairDataset",
    "PairCollator", "build_pair_dataset", "load_pair_dataset", "describe_skips",
]
