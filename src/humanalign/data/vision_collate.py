"""Preference pairs with images -> processor inputs: tokenised chosen/rejected rows with loss labels, and the
prompt's pixel values, batched for any Hugging Face vision-language processor.

The text goes through the processor's own chat template as content-part messages (an image part wherever the
canonical text holds an ``<image>`` placeholder, or all images before the first user turn's text when it holds
none), so each model family gets its own image markup; the processor then expands each image into its tokens.
Labels follow ``data.tokenize``: aligned with ``input_ids``, ``-100`` on the prompt and padding, and an answer's
labels end at its end-of-turn token. Chosen and rejected share the prompt and so its images: an example keeps
them once and the collator repeats them for the rejected rows.

A batch of B pairs is laid out like ``data.preference_dataset.PairCollator``'s: 2B rows, chosen first. Per-token
processor outputs (``input_ids``, ``attention_mask``, Qwen2-VL's ``mm_token_type_ids``) are right-padded; per-image
outputs (``pixel_values``, ``image_grid_thw``) are concatenated in row order, as the models expect; Idefics3 /
SmolVLM's per-row tiles are stacked, padded with zero tiles (``batch_image_inputs``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from humanalign.data.images import load_image
from humanalign.data.records import IMAGE_PLACEHOLDER, Message, PreferencePair
from humanalign.data.tokenize import END_OF_TURN_TOKENS, IGNORE_INDEX
from humanalign.errors import UserError

TEXT_KEYS = ("input_ids", "attention_mask")
PIXEL_MASK = "pixel_attention_mask"  # Idefics3 / SmolVLM: which pixels of each tile are real
ROW_IMAGE_KEYS = ("pixel_values", PIXEL_MASK)  # batched one row each (rows, tiles, ...) where PIXEL_MASK comes


def content_parts(messages: Sequence[Message], n_images: int) -> list[dict[str, Any]]:
    """Canonical messages -> chat-template messages whose content is a list of text and image parts."""
    placed = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placed not in (0, n_images):
        raise ValueError(f"{placed} '{IMAGE_PLACEHOLDER}' placeholders for {n_images} images")
    out: list[dict[str, Any]] = []
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
    for i, msg in enumerate(messages):
        text = msg["content"]
        if placed == 0 and n_images and i == first_user:
            text = f"{IMAGE_PLACEHOLDER}\n" * n_images + text
        parts: list[dict[str, Any]] = []
        for j, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if j:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": msg["role"], "content": parts})
    return out


def _encode(processor, text: str, images: list) -> dict[str, torch.Tensor]:
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def _answer_labels(ids: torch.Tensor, prompt_len: int, end_ids: set[int]) -> torch.Tensor:
    """Labels of one row: the answer from ``prompt_len`` to its end-of-turn token (inclusive)."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    answer = ids[prompt_len:].tolist()
    stop = next((k + 1 for k, t in enumerate(answer) if t in end_ids), len(answer))
    labels[prompt_len:prompt_len + stop] = ids[prompt_len:prompt_len + stop]
    return labels


@dataclass
class VisionPairExample:
    """One tokenised pair: per-token tensors of each row (1-D), and the prompt's per-image tensors once."""

    chosen: dict[str, torch.Tensor]
    rejected: dict[str, torch.Tensor]
    image_inputs: dict[str, torch.Tensor]
    prompt_length: int


def tokenize_vision_pair(pair: PreferencePair, processor, max_length: int | None = None) -> VisionPairExample | str:
    """A pair -> a ``VisionPairExample``, or the reason it cannot be one (a countable skip reason).

    A row longer than ``max_length`` loses the end of its answer; the prompt (whose image tokens must stay
    whole) is never cut, so a prompt that alone reaches ``max_length`` is skipped."""
    if not getattr(processor, "chat_template", None):
        raise UserError(f"the processor ({type(processor).__name__}) has no chat template to place image tokens with")
    images = [load_image(ref) for ref in pair.images]
    prompt = content_parts(pair.prompt, len(images))
    prompt_text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    encoded_prompt = _encode(processor, prompt_text, images)
    prompt_len = encoded_prompt["input_ids"].shape[1]
    if max_length is not None and prompt_len >= max_length:
        return "prompt longer than max_length"
    tokenizer = processor.tokenizer
    end_ids = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in tokenizer.get_vocab()}
    end_ids |= {tokenizer.eos_token_id} - {None}
    rows = {}
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = prompt + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        text = processor.apply_chat_template(full, tokenize=False)
        if not text.startswith(prompt_text):
            return "chat template is not prefix-stable"
        encoded = _encode(processor, text, images)
        ids = encoded["input_ids"][0]
        if not torch.equal(ids[:prompt_len], encoded_prompt["input_ids"][0]):
            return "prompt tokens change when the answer follows"
        keep = len(ids) if max_length is None else min(len(ids), max_length)
        row = {k: v[0, :keep] for k, v in encoded.items() if _per_token(v, encoded["input_ids"])}
        row["labels"] = _answer_labels(ids, prompt_len, end_ids)[:keep]
        rows[name] = row
    image_inputs = {k: v for k, v in encoded_prompt.items() if not _per_token(v, encoded_prompt["input_ids"])}
    return VisionPairExample(rows["chosen"], rows["rejected"], image_inputs, prompt_len)


def _per_token(value: torch.Tensor, input_ids: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == input_ids.shape


def tokenize_vision_pairs(
    pairs: Sequence[PreferencePair], processor, max_length: int | None = None,
) -> tuple[list[VisionPairExample], Counter[str]]:
    """Every pair tokenised; the ones that cannot be are counted by reason (nothing dropped silently)."""
    examples, skipped = [], Counter()
    for pair in pairs:
        out = tokenize_vision_pair(pair, processor, max_length)
        if isinstance(out, str):
            skipped[out] += 1
        else:
            examples.append(out)
    return examples, skipped


class VisionPairCollator:
    """Examples -> one batch of 2B rows (chosen first): right-padded per-token tensors (``input_ids`` with the
    pad id, ``labels`` with -100, the rest with 0) and the per-image tensors concatenated in row order."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[VisionPairExample]) -> dict[str, torch.Tensor]:
        rows = [e.chosen for e in examples] + [e.rejected for e in examples]
        width = max(len(r["input_ids"]) for r in rows)
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            out = torch.full((len(rows), width), fill.get(key, 0), dtype=rows[0][key].dtype)  # (2B, T)
            for i, row in enumerate(rows):
                out[i, : len(row[key])] = row[key]
            batch[key] = out
        # the rejected rows show the same images as the chosen ones
        batch.update(batch_image_inputs([e.image_inputs for e in examples] * 2))
        return batch


def batch_image_inputs(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-image tensors of each row (``{}`` for a row without images), batched the way the model family
    expects.

    Most processors give a row's images stacked on the first dimension (LLaVA's ``pixel_values`` (images, C, H,
    W); Qwen2-VL's (patches, D) and ``image_grid_thw`` (images, 3)): they are concatenated in row order. Idefics3 /
    SmolVLM (recognised by their ``pixel_attention_mask``) give (1, tiles, C, H, W) per row, with the mask
    (1, tiles, H, W): they are stacked to one row each, the tiles and pixels padded with zeros (all-zero tiles are
    the models' own padding, dropped before the vision tower; zero mask pixels are ignored), a row without
    images all zeros."""
    keys = sorted({k for r in rows for k in r})
    if PIXEL_MASK not in keys:
        return {key: torch.cat([r[key] for r in rows if key in r], dim=0) for key in keys}
    out = {}
    for key in keys:
        if key not in ROW_IMAGE_KEYS:
            raise ValueError(f"a per-image processor output '{key}' next to {PIXEL_MASK} is not supported")
        present = [r[key] for r in rows if key in r]
        dims = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]  # tiles, (C,) H, W
        batch = torch.zeros((len(rows), *dims), dtype=present[0].dtype)  # (rows, tiles, [C,] H, W)
        for i, row in enumerate(rows):
            if key in row:
                value = row[key][0]
                batch[(i, *(slice(0, n) for n in value.shape))] = value
        out[key] = batch
    return out


__all__ = ["batch_image_inputs", "content_parts", "tokenize_vision_pair", "tokenize_vision_pairs", "VisionPairExample",
           "VisionPairCollator"]
