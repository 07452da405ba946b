"""SFT conversations with images -> processor inputs for `train sft` with a vision-language model.

The conversation goes through the processor's own chat template as content-part messages
(``data.vision_collate.content_parts``: an image part at each ``<image>`` placeholder, or all images before the
first user turn's text), so each model family gets its own image markup, and the processor expands each image
into its tokens. Labels follow ``data.tokenize.encode_conversation``: every assistant turn carries loss, through
its end-of-turn token; the system and user turns, the image tokens and the padding are ``-100``.

``max_length`` cuts a conversation from the right but never through its image tokens (a row without all of
its image tokens would not match its pixel values): a conversation whose image tokens reach past ``max_length``
is skipped and counted, as is one with no assistant token left after the cut.

An example is a dict of 1-D per-token tensors (``input_ids``, ``attention_mask``, ``labels`` and, for Qwen2-VL,
``mm_token_type_ids``) plus ``image_inputs``: the per-image tensors (``pixel_values``, ``image_grid_thw`` ...) as
the processor gives them. ``VisionSFTCollator`` right-pads the first and batches the second
(``data.vision_collate.batch_image_inputs``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from humanalign.data.images import image_digest, load_image
from humanalign.data.records import Message, prompt_key
from humanalign.data.tokenize import END_OF_TURN_TOKENS, IGNORE_INDEX, TruncationStats
from humanalign.data.vision_collate import batch_image_inputs, content_parts
from humanalign.errors import UserError

IMAGE_INPUTS = "image_inputs"
SKIP_TEMPLATE = "chat template is not prefix-stable"
SKIP_PREFIX = "earlier turns' tokens change when an answer follows"
SKIP_IMAGES_CUT = "image tokens beyond max_length"
SKIP_NO_ANSWER = "no assistant token left (truncated or empty after templating)"


@dataclass
class VisionConversation:
    """A conversation to imitate and its images (references, in order)."""

    messages: list[Message]
    images: list[str] = field(default_factory=list)

    def key(self) -> str:
        """Identity for the validation split: the prompt text plus its images' content hashes (``split_key``)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        key = prompt_key(self.messages[:last])
        if self.images:
            key += "\x1d" + ",".join(image_digest(ref) for ref in self.images)
        return key


def _image_count(parts: Sequence[dict[str, Any]]) -> int:
    return sum(1 for m in parts for p in m["content"] if p["type"] == "image")


def _encode(processor, parts: list[dict[str, Any]], images: list, generation_prompt: bool) -> tuple[str, dict]:
    text = processor.apply_chat_template(parts, add_generation_prompt=generation_prompt, tokenize=False)
    used = images[:_image_count(parts)]
    return text, dict(processor(text=[text], images=used or None, return_tensors="pt"))


def image_token_id(processor) -> int | None:
    """The token id the processor expands each image into (None when it names none)."""
    found = getattr(processor, "image_token_id", None)
    if found is None and getattr(processor, "image_token", None):
        found = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return found


def tokenize_vision_conversation(conversation: VisionConversation, processor, max_length: int,
                                 stats: TruncationStats | None = None) -> dict[str, Any] | str:
    """A conversation -> an example (see the module docstring), or the reason it cannot be one (a skip reason)."""
    if not getattr(processor, "chat_template", None):
        raise UserError(f"the processor ({type(processor).__name__}) has no chat template to place image tokens with")
    stats = stats if stats is not None else TruncationStats()
    stats.total += 1
    images = [load_image(ref) for ref in conversation.images]
    parts = content_parts(conversation.messages, len(images))
    full_text, encoded = _encode(processor, parts, images, generation_prompt=False)
    ids = encoded["input_ids"][0]  # (T,)
    labels = torch.full_like(ids, IGNORE_INDEX)
    tokenizer = processor.tokenizer
    end_ids = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in tokenizer.get_vocab()}
    end_ids |= {tokenizer.eos_token_id} - {None}
    for i, message in enumerate(conversation.messages):
        if message["role"] != "assistant":
            continue
        prefix_text, prefix = _encode(processor, parts[:i], images, generation_prompt=True)
        start = prefix["input_ids"].shape[1]
        if not full_text.startswith(prefix_text):
            return SKIP_TEMPLATE
        if not torch.equal(ids[:start], prefix["input_ids"][0]):
            return SKIP_PREFIX
        answer = ids[start:].tolist()
        stop = start + next((k + 1 for k, t in enumerate(answer) if t in end_ids), len(answer))
        labels[start:stop] = ids[start:stop]
    keep = len(ids)
    if keep > max_length:
        image_id = image_token_id(processor)
        positions = (ids == image_id).nonzero() if image_id is not None else None
        if images and (positions is None or (len(positions) and int(positions[-1]) >= max_length)):
            return SKIP_IMAGES_CUT
        keep = max_length
        stats.response_truncated += 1
    if not (labels[:keep] != IGNORE_INDEX).any():  # counted once, as a skip (not also in ``stats``)
        return SKIP_NO_ANSWER
    example: dict[str, Any] = {k: v[0, :keep] for k, v in encoded.items() if _per_token(v, encoded["input_ids"])}
    example["labels"] = labels[:keep]
    example[IMAGE_INPUTS] = {k: v for k, v in encoded.items() if not _per_token(v, encoded["input_ids"])}
    return example


def _per_token(value: Any, input_ids: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == input_ids.shape


def tokenize_vision_conversations(conversations: Sequence[VisionConversation], processor, max_length: int
                                  ) -> tuple[list[dict[str, Any]], Counter[str], TruncationStats]:
    """Every conversation tokenised; the ones that cannot be are counted by reason (nothing dropped silently)."""
    examples, skipped, stats = [], Counter(), TruncationStats()
    for conversation in conversations:
        out = tokenize_vision_conversation(conversation, processor, max_length, stats)
        if isinstance(out, str):
            skipped[out] += 1
        else:
            examples.append(out)
    return examples, skipped, stats


class VisionSFTCollator:
    """Examples -> one batch: right-padded per-token tensors (B, T) (``input_ids`` with the pad id, ``labels`` with
    -100, the rest with 0) and the per-image tensors batched by ``data.vision_collate.batch_image_inputs``
    (concatenated in row order; Idefics3 / SmolVLM tiles padded per row). Picklable (workers)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch: dict[str, torch.Tensor] = {}
        for key in (k for k in examples[0] if k != IMAGE_INPUTS):
            out = torch.full((len(examples), width), fill.get(key, 0), dtype=examples[0][key].dtype)  # (B, T)
            for i, example in enumerate(examples):
                out[i, : len(example[key])] = example[key]
            batch[key] = out
        batch.update(batch_image_inputs([e[IMAGE_INPUTS] for e in examples]))
        return batch


__all__ = ["IMAGE_INPUTS", "VisionConversation", "image_token_id", "tokenize_vision_conversation",
           "tokenize_vision_conversations", "VisionSFTCollator"]
