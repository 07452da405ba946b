"""Prompts with images -> the inputs of a vision-language model's ``generate``: one left-padded batch.

Each prompt goes through the processor's own chat template as content-part messages (``data.vision_collate.
content_parts``: an image part at each ``<image>`` placeholder, or all images before the first user turn's text),
then through the processor, which loads nothing itself: the pictures are opened here (``data.images.load_image``)
and expanded into image tokens by the processor. Rows are encoded one by one and left-padded together, so that
every answer starts at the same position (the KV cache of HF ``generate`` is used as for text) and a prompt's
tokens are the same alone or in a batch. Per-token tensors (``input_ids``, ``attention_mask``, Qwen2-VL's
``mm_token_type_ids``) are padded on the left; per-image tensors (``pixel_values``, Qwen2-VL's
``image_grid_thw``) are concatenated in row order, as the models expect.

Several answers per prompt are made by repeating the rows here (prompt-major: prompt 0 ``n`` times, then prompt
1, ...) with their images, rather than by ``num_return_sequences``: HF's expansion repeats each image tensor on
its own, which misorders the images of a prompt that shows two or more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from humanalign.data.images import load_image
from humanalign.data.records import Message
from humanalign.data.tokenize import pad_sequences
from humanalign.data.vision_collate import content_parts

# Per-image processor outputs (never padded): a prompt of exactly 3 tokens must not pass for an image's tensor
IMAGE_KEYS = frozenset({"pixel_values", "image_grid_thw", "image_sizes"})


def is_processor(tokenizer_or_processor: Any) -> bool:
    """Whether a loaded "tokenizer" is a vision-language processor (a tokenizer plus an image processor)."""
    return getattr(tokenizer_or_processor, "image_processor", None) is not None


@dataclass
class VisionBatch:
    """One batch of processor inputs; ``long_image_prompts`` counts the prompts with images longer than
    ``max_prompt_length`` that were kept whole (cutting them would cut their image tokens)."""

    inputs: dict[str, torch.Tensor]
    prompt_truncated: int = 0
    long_image_prompts: int = 0


def _encode_row(processor: Any, prompt: Sequence[Message], refs: Sequence[str]) -> dict[str, torch.Tensor]:
    pictures = [load_image(ref) for ref in refs]
    messages = content_parts(list(prompt), len(pictures))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=pictures or None, return_tensors="pt"))


def _cut_left(row: dict[str, torch.Tensor], keep: int, bos_id: int | None) -> dict[str, torch.Tensor]:
    """The last ``keep`` positions of a text row; a leading bos token survives the cut (as in
    ``data.tokenize.encode_prompt``)."""
    if keep >= 2 and bos_id is not None and int(row["input_ids"][0]) == bos_id:
        return {k: torch.cat([v[:1], v[len(v) - keep + 1:]]) for k, v in row.items()}
    return {k: v[-keep:] for k, v in row.items()}


def vision_generation_inputs(
    processor: Any, prompts: Sequence[Sequence[Message]], images: Sequence[Sequence[str]], max_prompt_length: int,
    pad_id: int, num_return_sequences: int = 1,
) -> VisionBatch:
    """The left-padded batch of ``len(prompts) * num_return_sequences`` rows (prompt-major).

    A prompt without images longer than ``max_prompt_length`` loses its beginning, as text prompts do; one with
    images is kept whole and counted."""
    batch = VisionBatch(inputs={})
    token_rows: list[dict[str, torch.Tensor]] = []
    image_rows: list[dict[str, torch.Tensor]] = []
    for prompt, refs in zip(prompts, images, strict=True):
        encoded = _encode_row(processor, prompt, refs)
        ids = encoded["input_ids"]  # (1, P)
        per_token = {k: v[0] for k, v in encoded.items()
                     if k not in IMAGE_KEYS and isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape}
        per_image = {k: v for k, v in encoded.items() if k not in per_token}
        if ids.shape[1] > max_prompt_length:
            if refs:
                batch.long_image_prompts += 1
            else:
                per_token = _cut_left(per_token, max_prompt_length, processor.tokenizer.bos_token_id)
                batch.prompt_truncated += 1
        token_rows += [per_token] * num_return_sequences
        image_rows += [per_image] * num_return_sequences
    fill = {"input_ids": pad_id}
    for key in token_rows[0]:
        rows = [row[key].tolist() for row in token_rows]
        batch.inputs[key] = pad_sequences(rows, fill.get(key, 0), side="left").to(token_rows[0][key].dtype)  # (B*n, P)
    for key in sorted({k for row in image_rows for k in row}):
        parts = [row[key] for row in image_rows if key in row]
        batch.inputs[key] = torch.cat(parts, dim=0)  # (images or patches of every row in order, ...)
    return batch


__all__ = ["is_processor", "VisionBatch", "vision_generation_inputs"]
