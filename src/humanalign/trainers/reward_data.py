"""The reward-model trainer's data: preference pairs -> tokenised features for its pair collators.

Text pairs are encoded by ``encode_score_pair`` (the function ``Scorer`` uses at scoring time, so a trained model
sees then exactly what it saw in training); vision pairs by the processor (``data.vision_pairs``). Each feature
also carries what the loss reads: the pair's ``margin`` (helpful, ``use_margin``) or its answers' safety labels
(harmless: 1 safe, 0 unsafe, ``UNKNOWN_LABEL`` without a label). What is skipped, truncated or dropped is counted,
said in one line each, and kept in the run's data statistics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from humanalign.config.rm import RewardModelConfig
from humanalign.data.records import PreferencePair
from humanalign.data.score_pairs import count_labelled
from humanalign.data.tokenize import TruncationStats
from humanalign.data.vision_collate import VisionPairCollator
from humanalign.data.vision_pairs import build_vision_pair_dataset
from humanalign.data.vision_sft import (
    IMAGE_INPUTS,  # a vision batch's processor outputs besides the token rows
)
from humanalign.errors import UserError
from humanalign.models.score_model import encode_score_pair

NAME = "rm"  # the command's name in its log lines and run summary
UNKNOWN_LABEL = -1.0  # is_*_safe of a response without a label (the cost losses skip its sign term)


def safety_label_note(pairs: Sequence[PreferencePair], where: str, use_sign_terms: bool) -> str | None:
    """One line when harmless training pairs lack is_safe labels (all or some), else None."""
    labelled = count_labelled(pairs)
    if labelled == len(pairs):
        return None
    if labelled == 0:
        why = "" if use_sign_terms else " (use_sign_terms is off anyway)"
        return (f"[{NAME}] {where}: no is_safe labels on its {len(pairs):,} harmless pairs: the cost model learns "
                f"the pair ordering only, sign terms off{why}; its costs are not anchored at 0 (no sign accuracy)")
    return (f"[{NAME}] {where}: {len(pairs) - labelled:,} of {len(pairs):,} harmless pairs have no is_safe labels: "
            "their responses get no sign term (the ordering term still applies)")


def _label_value(label: bool | None) -> float:
    return UNKNOWN_LABEL if label is None else float(label)


def encode_pairs(
    tokenizer, pairs: Sequence[PreferencePair], *, task: str, max_length: int, max_prompt_length: int,
    encoder: bool, use_margin: bool,
) -> tuple[list[dict[str, Any]], Any, int]:
    """Pairs -> ``collate_pairs`` features, the truncation stats and the number of pairs dropped because both
    responses became the same tokens after truncation.

    Every feature carries the same keys (``collate_pairs`` needs that): the cost task gets ``is_chosen_safe`` /
    ``is_rejected_safe`` as 1 (safe), 0 (unsafe) or -1 (unknown); the reward task gets ``margin`` when
    ``use_margin`` and any pair has one (a pair without a margin gets 0, i.e. the plain Bradley-Terry term).
    """
    stats = TruncationStats()
    with_margin = task == "helpful" and use_margin and any(p.margin is not None for p in pairs)
    features, identical = [], 0
    for pair in pairs:
        encoded = encode_score_pair(tokenizer, pair, max_length, max_prompt_length, encoder=encoder, stats=stats)
        if encoded is None:
            continue
        if encoded["chosen_input_ids"] == encoded["rejected_input_ids"]:
            identical += 1
            continue
        for key in ("margin", "is_chosen_safe", "is_rejected_safe"):
            encoded.pop(key, None)
        if with_margin:
            encoded["margin"] = float(pair.margin or 0.0)
        if task == "harmless":
            encoded["is_chosen_safe"] = _label_value(getattr(pair, "is_chosen_safe", None))
            encoded["is_rejected_safe"] = _label_value(getattr(pair, "is_rejected_safe", None))
        features.append(encoded)
    return features, stats, identical


@dataclass
class ScoreData:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    labelled_train: int
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_score_data(
    cfg: RewardModelConfig, tokenizer, *, encoder: bool, max_length: int, max_prompt_length: int,
    train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair],
    skipped: dict[str, Counter[str]], sources: dict[str, str], say: Callable[[str], None],
) -> ScoreData:
    """Tokenise both splits, reporting what was skipped, truncated or dropped (and a missing safety label)."""
    encode = partial(encode_pairs, tokenizer, task=cfg.task, max_length=max_length,
                     max_prompt_length=max_prompt_length, encoder=encoder, use_margin=cfg.use_margin)
    stats: dict[str, Any] = {"task": cfg.task, "max_length": max_length, "max_prompt_length": max_prompt_length}
    encoded: dict[str, list[dict[str, Any]]] = {}
    for split, pairs in (("train", train_pairs), ("val", val_pairs)):
        if split == "val" and not pairs:
            encoded[split] = []
            continue
        features, trunc, identical = encode(pairs)
        encoded[split] = features
        stats[split] = {"source": sources.get(split, ""), "pairs": len(pairs), "examples": len(features),
                        "skipped": dict(skipped.get(split, {})), "truncation": trunc.as_dict(),
                        "identical_after_truncation": identical}
        if cfg.task == "harmless":
            stats[split]["labelled_pairs"] = count_labelled(pairs)
        say(f"[{NAME}] {split}: {sources.get(split, '')}: {len(pairs):,} {cfg.task} pairs -> {len(features):,} "
            "examples")
        if skipped.get(split):
            say(f"[{NAME}] {split} skipped: " + ", ".join(f"{k}: {v}" for k, v in skipped[split].most_common()))
        if trunc.prompt_truncated or trunc.response_truncated or trunc.dropped_empty:
            say(f"[{NAME}] {split} truncation (max_length {max_length}, max_prompt_length {max_prompt_length}): "
                f"{trunc.summary()}")
        if identical:
            say(f"[{NAME}] {split}: {identical} pairs dropped: both responses are the same tokens after truncation")
    return finish_score_data(cfg, encoded, train_pairs, sources, stats, max_length, say)


class VisionScoreCollator:
    """Vision pair features -> a ``VisionPairCollator`` batch (2B rows, chosen first, pixel values repeated for
    the rejected rows; processor outputs under ``IMAGE_INPUTS``) plus the loss's ``margin`` / ``is_*_safe``."""

    def __init__(self, pad_token_id: int):
        self.rows = VisionPairCollator(pad_token_id)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = self.rows([f["example"] for f in features])
        batch: dict[str, Any] = {"input_ids": rows.pop("input_ids"), "attention_mask": rows.pop("attention_mask")}
        rows.pop("labels", None)
        batch[IMAGE_INPUTS] = rows
        for key in ("margin", "is_chosen_safe", "is_rejected_safe"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)  # (B,)
        return batch


def vision_pair_length(feature: dict[str, Any]) -> int:
    example = feature["example"]
    return max(len(example.chosen["input_ids"]), len(example.rejected["input_ids"]))


def prepare_vision_score_data(
    cfg: RewardModelConfig, processor, *, train_pairs: Sequence[PreferencePair],
    val_pairs: Sequence[PreferencePair], skipped: dict[str, Counter[str]], sources: dict[str, str],
    say: Callable[[str], None],
) -> ScoreData:
    """Both splits tokenised by the processor (``data.vision_pairs``: image tokens expanded, answers cut at
    ``max_length``, the prompt never), each feature the pair's example plus its margin / safety labels."""
    with_margin = cfg.task == "helpful" and cfg.use_margin and any(p.margin is not None for p in train_pairs)
    stats: dict[str, Any] = {"task": cfg.task, "max_length": cfg.max_length, "vision": True}
    encoded: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for split, pairs in (("train", train_pairs), ("val", val_pairs)):
        if not pairs:
            continue
        dataset, more = build_vision_pair_dataset(pairs, processor, cfg.max_length)
        for example, pair in zip(dataset.examples, dataset.pairs):
            feature: dict[str, Any] = {"example": example}
            if with_margin:
                feature["margin"] = float(pair.margin or 0.0)
            if cfg.task == "harmless":
                feature["is_chosen_safe"] = _label_value(getattr(pair, "is_chosen_safe", None))
                feature["is_rejected_safe"] = _label_value(getattr(pair, "is_rejected_safe", None))
            encoded[split].append(feature)
        all_skipped = Counter(skipped.get(split, {})) + more
        stats[split] = {"source": sources.get(split, ""), "pairs": len(pairs), "examples": len(encoded[split]),
                        "images": dataset.images, "skipped": dict(all_skipped)}
        say(f"[{NAME}] {split}: {sources.get(split, '')}: {len(pairs):,} {cfg.task} pairs ({dataset.images:,} with "
            f"images) -> {len(encoded[split]):,} examples")
        if all_skipped:
            say(f"[{NAME}] {split} skipped: " + ", ".join(f"{k}: {v}" for k, v in all_skipped.most_common()))
    return finish_score_data(cfg, encoded, train_pairs, sources, stats, cfg.max_length, say)


def finish_score_data(cfg, encoded, train_pairs, sources, stats, max_length, say) -> ScoreData:
    """The end both loaders (text and images) share: refuse an empty training set, note the harmless stream's
    safety labels, and bundle the encoded splits."""
    if not encoded["train"]:
        raise UserError(f"{sources.get('train', 'training data')}: no pair left to train on after tokenisation "
                        f"(max_length {max_length}); raise max_length")
    labelled = count_labelled(train_pairs) if cfg.task == "harmless" else 0
    if cfg.task == "harmless":
        note = safety_label_note(train_pairs, sources.get("train", "training data"), cfg.use_sign_terms)
        if note:
            say(note)
    return ScoreData(train=encoded["train"], val=encoded["val"], labelled_train=labelled, stats=stats)


__all__ = [
    "IMAGE_INPUTS", "NAME", "UNKNOWN_LABEL", "ScoreData", "VisionScoreCollator", "encode_pairs",
    "prepare_score_data", "prepare_vision_score_data", "safety_label_note", "vision_pair_length",
]
