"""Tiny random-init vision-language models of more families, built in memory and offline, for tests: Idefics3,
SmolVLM and Qwen2.5-VL (the tiny LLaVA and Qwen2-VL are in ``models.tiny_vision``).

They cover the other ways a processor hands images over:

- Idefics3 / SmolVLM split an image into tiles (plus a downscaled global view) and give a 5-D ``pixel_values``
  (rows, tiles, C, H, W) with a ``pixel_attention_mask`` (rows, tiles, H, W) marking the real pixels; each
  ``<image>`` becomes ``<fake_token_around_image><row_i_col_j><image>...`` per tile. A row with fewer tiles is
  padded with all-zero tiles, which the models drop.
- Qwen2.5-VL is Qwen2-VL's layout (patch-sequence ``pixel_values``, ``image_grid_thw``) with a vision tower
  that attends within windows except in its full-attention blocks.

Each builder returns (model, processor) with the tiny tokenizer of ``models.tiny`` (plus the family's image
tokens) and the ChatML template of ``models.tiny_vision`` with the family's image markup. The Idefics3 pair saves
to a folder ``AutoProcessor`` / ``AutoModelForImageTextToText`` load (its image processor is the PIL one, no
torchvision). SmolVLM's and Qwen2.5-VL's processors insist on a video processor (torchvision), so image-only
subclasses stand in and are not saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from humanalign.data.records import IMAGE_PLACEHOLDER
from humanalign.errors import UserError
from humanalign.models import tiny
from humanalign.models.tiny_vision import (
    LLAVA_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_VISION_TOKENS,
    ImageOnlyQwenProcessor,
    _text_config,
    vision_tokenizer,
)

FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>"
# Idefics3's markup tokens: the processor writes <row_i_col_j> for up to 6 x 6 tiles
TILE_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_PLACEHOLDER, GLOBAL_IMAGE_TOKEN, "<end_of_utterance>",
               *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
# Idefics3 and SmolVLM mark an image with <image> like LLaVA: the same template places it
IDEFICS3_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE


def _tile_parts(texts, vocab_size: int, tile_size: int, patch_size: int, scale_factor: int, resized_edge: int,
                vision_hidden_size: int, hidden_size: int, num_layers: int) -> tuple:
    """(tokenizer, image processor kwargs, vision config, text config, image tokens per tile) shared by the
    Idefics3 and SmolVLM builders."""
    if tile_size % (patch_size * scale_factor):
        raise UserError(f"patch_size x scale_factor ({patch_size} x {scale_factor}) must divide tile_size "
                        f"({tile_size})")
    texts = list(tiny._default_texts() if texts is None else texts)
    tokenizer = vision_tokenizer(texts, vocab_size, 1024, TILE_TOKENS)
    tokenizer.chat_template = IDEFICS3_CHAT_TEMPLATE
    # longest edge resized to ``resized_edge`` then to a multiple of tile_size: a square picture is
    # (resized_edge / tile_size)^2 tiles plus the global view
    image_kwargs = dict(size={"longest_edge": resized_edge}, max_image_size={"longest_edge": tile_size},
                        do_image_splitting=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    vision = dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=1,
                  num_attention_heads=2, image_size=tile_size, patch_size=patch_size)
    text = _text_config(tokenizer, hidden_size, num_layers, 4, 2, 2 * hidden_size, 1024)
    return tokenizer, image_kwargs, vision, text, (tile_size // patch_size) ** 2 // scale_factor ** 2


def tiny_idefics3(
    texts: Sequence[str] | None = None, *, vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
    tile_size: int = 32, patch_size: int = 8, scale_factor: int = 2, resized_edge: int = 64,
    vision_hidden_size: int = 32, seed: int = 0,
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """(model, processor) of a tiny Idefics3: ``tile_size`` tiles of ``patch_size`` patches, pixel-shuffled by
    ``scale_factor`` (4 tokens a tile by default); a square picture is 2 x 2 tiles + the global view."""
    tokenizer, image_kwargs, vision, text, per_tile = _tile_parts(
        texts, vocab_size, tile_size, patch_size, scale_factor, resized_edge, vision_hidden_size, hidden_size,
        num_layers)
    processor = Idefics3Processor(Idefics3ImageProcessorPil(**image_kwargs), tokenizer, image_seq_len=per_tile,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**text), scale_factor=scale_factor,
                            image_token_id=processor.image_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seeding the build leaves the caller's random stream alone
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    return model, processor


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without its video processor (torchvision) and the num2words check (videos only)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token, self.image_token = FAKE_IMAGE_TOKEN, IMAGE_PLACEHOLDER
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token, self.global_image_token = "<end_of_utterance>", GLOBAL_IMAGE_TOKEN
        self.image_seq_len, self.video_token = image_seq_len, "<video>"
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLM's own reads the video processor's frame settings; there are no videos here
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


def tiny_smolvlm(
    texts: Sequence[str] | None = None, *, vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
    tile_size: int = 32, patch_size: int = 8, scale_factor: int = 2, resized_edge: int = 64,
    vision_hidden_size: int = 32, seed: int = 0,
) -> tuple[SmolVLMForConditionalGeneration, ImageOnlySmolVLMProcessor]:
    """(model, processor) of a tiny SmolVLM (Idefics3's layout and sizes, ``tiny_idefics3``), in memory."""
    tokenizer, image_kwargs, vision, text, per_tile = _tile_parts(
        texts, vocab_size, tile_size, patch_size, scale_factor, resized_edge, vision_hidden_size, hidden_size,
        num_layers)
    processor = ImageOnlySmolVLMProcessor(SmolVLMImageProcessorPil(**image_kwargs), tokenizer,
                                          image_seq_len=per_tile, chat_template=IDEFICS3_CHAT_TEMPLATE)
    config = SmolVLMConfig(vision_config=vision, text_config=LlamaConfig(**text), scale_factor=scale_factor,
                           image_token_id=processor.image_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmolVLMForConditionalGeneration(config)
    return model, processor


class ImageOnlyQwen2_5_VLProcessor(ImageOnlyQwenProcessor, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor (which needs torchvision); images and text only."""


def tiny_qwen2_5_vl(
    texts: Sequence[str] | None = None, *, vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
    image_side: int = 112, window_size: int = 56, seed: int = 0,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageOnlyQwen2_5_VLProcessor]:
    """(model, processor) of a tiny Qwen2.5-VL, in memory. Images are resized to about ``image_side``^2 pixels
    (14-pixel patches, 2x2 merged: 16 tokens for 112x112); the tower's first block attends within
    ``window_size``-pixel windows (4 of them at the defaults), its second over the whole image."""
    texts = list(tiny._default_texts() if texts is None else texts)
    tokenizer = vision_tokenizer(texts, vocab_size, 512, QWEN_VISION_TOKENS)
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_side ** 2, max_pixels=image_side ** 2,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    head_dim = hidden_size // 4
    text = _text_config(tokenizer, hidden_size, num_layers, 4, 2, 2 * hidden_size, 512)
    third = head_dim // 2 // 3  # multimodal RoPE: the rotary half of each head split over (time, height, width)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, processor


__all__ = ["tiny_idefics3", "tiny_smolvlm", "tiny_qwen2_5_vl", "ImageOnlySmolVLMProcessor",
           "ImageOnlyQwen2_5_VLProcessor", "IDEFICS3_CHAT_TEMPLATE", "QWEN2_5_VL_CHAT_TEMPLATE", "TILE_TOKENS"]
