"""Tiny random-init vision-language models, built offline: a LLaVA-style folder and an in-memory Qwen2-VL.

The LLaVA one (``humanalign tiny-model --vision``) is a tiny CLIP vision tower, LLaVA's two-layer projector and
the tiny Llama text model, with a ``LlavaProcessor`` (CLIP's PIL image processor, which needs no torchvision, and
the tiny tokenizer of ``models.tiny`` with an ``<image>`` token added). The folder is an ordinary Hugging Face
one (safetensors) that ``AutoProcessor`` / ``AutoModelForImageTextToText`` load.

The Qwen2-VL one proves the code paths are not LLaVA-only: its patch-sequence pixel values and
``image_grid_thw`` batch differently. It is built in memory only: transformers' ``Qwen2VLProcessor`` insists on
a video processor, which needs torchvision, so a subclass without one stands in and is not saved.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from humanalign.data.io import atomic_write_json, publish_dir
from humanalign.data.records import IMAGE_PLACEHOLDER
from humanalign.errors import UserError
from humanalign.models import tiny
from humanalign.models.load import portable_tokenizer_config

TINY_VISION_NAME = "tiny-vision-v1"  # bump when the recipe changes
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def _chat_template(image_markup: str) -> str:
    """ChatML whose message content may be a string or a list of parts; an image part becomes ``image_markup``
    (the processor expands it to the image's tokens). The generation markers are the text template's."""
    render = (
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}{{- '" + image_markup + "' }}"
        "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
    )
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}{% generation %}" + render + "{{- '<|im_end|>' }}{% endgeneration %}"
        "{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' }}" + render + "{{- '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


LLAVA_CHAT_TEMPLATE = _chat_template(IMAGE_PLACEHOLDER)
QWEN2_VL_CHAT_TEMPLATE = _chat_template("<|vision_start|><|image_pad|><|vision_end|>")


def vision_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int, extra_tokens: Sequence[str]):
    """The tiny text tokenizer (``models.tiny.train_tokenizer``) with the image tokens added as special tokens."""
    tokenizer = tiny.train_tokenizer(texts, vocab_size, model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": [tiny.IM_START, *extra_tokens]})
    return tokenizer


def _text_config(tokenizer, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, max_position_embeddings: int) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(tiny.IM_END), pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llava(
    texts: Sequence[str] | None = None, *, vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 192, max_position_embeddings: int = 512,
    image_size: int = 32, patch_size: int = 8, vision_hidden_size: int = 32, vision_position_std: float | None = None,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """(model, processor) of the tiny LLaVA; an image is (image_size / patch_size)^2 tokens (16 by default).

    ``vision_position_std``: initialise the tower's position embeddings with this spread instead of CLIP's 0.02.
    CLIP's init suits a pretrained tower; in a random one the patch content (about 0.3 per dimension) drowns a
    0.02 position, so a patch's features hardly say where it is (a linear probe of the mean image feature tells a
    left square from a right one 60 to 80% of the time at 0.02, every time at 0.3; docs/multimodal.md)."""
    if image_size % patch_size:
        raise UserError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
    texts = list(tiny._default_texts() if texts is None else texts)
    tokenizer = vision_tokenizer(texts, vocab_size, max_position_embeddings, [IMAGE_PLACEHOLDER])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    # "default" drops the CLS feature; the processor counts it (num_additional_image_tokens=1) and takes it off.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                              num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden_size)
    text = LlamaConfig(**_text_config(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads,
                                      intermediate_size, max_position_embeddings), tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="default",
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
                         vision_feature_layer=-1, image_seq_length=(image_size // patch_size) ** 2)
    with torch.random.fork_rng(devices=[]):  # seeding the build leaves the caller's random stream alone
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        if vision_position_std is not None:
            torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=vision_position_std)
    model.generation_config = GenerationConfig(eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
                                               bos_token_id=None)
    return model, processor


class ImageOnlyQwenProcessor:
    """Mixin for a Qwen-VL processor without its video processor (which needs torchvision): images and text
    only. Put first in the bases, before the transformers processor class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlyQwen2VLProcessor(ImageOnlyQwenProcessor, Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor; images and text only."""


def tiny_qwen2_vl(
    texts: Sequence[str] | None = None, *, vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
    image_side: int = 56, seed: int = 0,
) -> tuple[Qwen2VLForConditionalGeneration, ImageOnlyQwen2VLProcessor]:
    """(model, processor) of a tiny Qwen2-VL, in memory. Images are resized to about ``image_side``^2 pixels
    (14-pixel patches, 2x2 merged: 4 tokens for 56x56)."""
    texts = list(tiny._default_texts() if texts is None else texts)
    tokenizer = vision_tokenizer(texts, vocab_size, 512, QWEN_VISION_TOKENS)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_side ** 2, max_pixels=image_side ** 2,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    head_dim = hidden_size // 4
    text = _text_config(tokenizer, hidden_size, num_layers, 4, 2, 2 * hidden_size, 512)
    # Multimodal RoPE: the rotary half of each head is split over (time, height, width).
    third = head_dim // 2 // 3
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    return model, processor


def build_tiny_vision_model(output_dir: str | Path, *, overwrite: bool = False, **sizes) -> Path:
    """Build the tiny LLaVA (``tiny_llava(**sizes)``) into ``output_dir`` (a temporary folder renamed into
    place); returns the path."""
    output_dir = Path(output_dir)
    tiny._check_target(output_dir, overwrite)
    model, processor = tiny_llava(**sizes)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        portable_tokenizer_config(tmp)
        atomic_write_json(tmp / "build_info.json", {
            "recipe": TINY_VISION_NAME, "seed": sizes.get("seed", 0), "architecture": "llava",
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(processor.tokenizer),
            "image_size": model.config.vision_config.image_size, "image_tokens": model.config.image_seq_length,
            "vision_position_std": sizes.get("vision_position_std"),
        })
        publish_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def run(cfg) -> Path:
    """`humanalign tiny-model`: the tiny LLaVA with ``--vision``, else the tiny text model (``models.tiny.run``)."""
    if not cfg.vision:
        return tiny.run(cfg)
    texts = tiny.read_corpus(cfg.corpus) if cfg.corpus else None
    path = build_tiny_vision_model(
        cfg.output_dir, overwrite=cfg.overwrite, texts=texts, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings, seed=cfg.seed,
    )
    info = json.loads((path / "build_info.json").read_text(encoding="utf-8"))
    print(f"tiny vision-language model (LLaVA-style) written to {path}: {info['parameters']:,} parameters, "
          f"vocabulary {info['vocab_size']}, {info['image_size']}px images as {info['image_tokens']} tokens")
    return path


__all__ = ["build_tiny_vision_model", "tiny_llava", "tiny_qwen2_vl", "ImageOnlyQwen2VLProcessor", "run",
           "LLAVA_CHAT_TEMPLATE", "QWEN2_VL_CHAT_TEMPLATE", "TINY_VISION_NAME"]
