"""Vision-language score models (reward and cost): a VLM's language-model hidden states + a scalar head.

transformers has no ``*ForSequenceClassification`` for LLaVA-style models, so a vision-language score model is
the ``AutoModelForImageTextToText`` (its inner ``model``: vision tower, projector, language model) with a
``score`` linear head read at each row's last attended token (rows are right-padded, so the end is
``attention_mask.sum(1) - 1``; the pad id may equal EOS here, which a pad-id rule could not tell apart).

Saved folder (``save_vision_score_model``): the VLM as its own transformers folder (safetensors, ``config.json``
with the ``humanalign_score`` block whose ``head`` is ``HEAD_MARKER``), the head in ``HEAD_FILE`` and the
processor beside them. ``load_vision_score_model`` reloads it (``models.scorer.load_scorer`` picks it for such a
folder; `train rm` for a vision-language base model); LoRA adapters are merged into the saved weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from humanalign.config.training import LoraSettings, ModelSettings
from humanalign.errors import UserError
from humanalign.models.load import resolve_model
from humanalign.models.lora_merge import merged_weights
from humanalign.models.pretrained import is_peft_model, peft_base, portable_tokenizer_config
from humanalign.models.score_model import (
    CALIBRATION_KEY,
    FORMAT_VERSION,
    SCORE_CONFIG_KEY,
    SCORE_TYPES,
    ScoreModelOutput,
    ScoreNormalizer,
    _move_into_place,
    read_score_config,
)
from humanalign.models.vision import describe_parts, load_processor, load_vision_lm

HEAD_MARKER = "vision_last_attended_token"  # ``humanalign_score.head`` of a vision score model's config
HEAD_FILE = "score_head.safetensors"  # the head's weight and bias (``score.weight`` (1, H), ``score.bias`` (1,))


def hidden_size(vlm: nn.Module) -> int:
    config = peft_base(vlm).config
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size)


class VisionScoreModel(nn.Module):
    """A vision-language model (optionally peft-wrapped) + a scalar head, returning ``ScoreModelOutput``."""

    layout = "vision"
    is_encoder = False

    def __init__(self, vlm: nn.Module, score_type: str = "reward", normalizer: ScoreNormalizer | None = None,
                 score_offset: float = 0.0, head: nn.Linear | None = None):
        super().__init__()
        if score_type not in SCORE_TYPES:
            raise UserError(f"unknown score type '{score_type}' (use 'reward' or 'cost')")
        self.model = vlm
        self.score = head if head is not None else nn.Linear(hidden_size(vlm), 1, dtype=torch.float32)
        if head is None:  # a small start: the first scores sit near 0 whatever the hidden states' scale
            nn.init.normal_(self.score.weight, std=1.0 / (hidden_size(vlm) + 1))
            nn.init.zeros_(self.score.bias)
        self.score_type, self.score_offset = score_type, float(score_offset)
        self.normalizer = normalizer or ScoreNormalizer()

    @property
    def config(self):
        return peft_base(self.model).config

    @property
    def pad_token_id(self) -> int | None:
        config = self.config
        text = getattr(config, "text_config", None)
        return config.pad_token_id if getattr(config, "pad_token_id", None) is not None else getattr(
            text, "pad_token_id", None)

    @property
    def is_peft(self) -> bool:
        return is_peft_model(self.model)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.is_peft:
            self.model.enable_input_require_grads()

    def shared_prompt_refusal(self) -> str:
        return "a vision-language model (image tokens and their positions are laid out per sequence)"

    def describe(self) -> str:
        return describe_parts(self.model) + f", head {sum(p.numel() for p in self.score.parameters()):,}"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False,
                shared_rows: dict[str, torch.Tensor] | None = None, **image_inputs) -> ScoreModelOutput:
        """Right-padded rows ``input_ids`` (B, T) with their processor outputs (``pixel_values`` ...) -> end
        scores (B,) at each row's last attended token and token-wise scores (B, T), float32."""
        if shared_rows is not None:
            raise ValueError("a vision score model has no shared-prompt layout")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inner = peft_base(self.model).model  # vision tower + projector + language model, no LM head
        hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **image_inputs).last_hidden_state  # (B, T, H)
        scores = self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()  # (B, T)
        end_index = (attention_mask.long().sum(1) - 1).clamp(min=0)  # (B,)
        end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1).clone()  # (B,)
        if self.score_offset:
            end_scores, scores = end_scores - self.score_offset, scores - self.score_offset
        if normalize:
            end_scores, scores = self.normalizer.normalize(end_scores), self.normalizer.normalize(scores)
        return ScoreModelOutput(end_scores=end_scores, scores=scores, end_index=end_index)

    def score_config(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        block = {"format_version": FORMAT_VERSION, "score_type": self.score_type, "head": HEAD_MARKER,
                 "end_score": "last_attended_token", "normalizer": self.normalizer.to_dict()}
        if self.score_offset:
            block[CALIBRATION_KEY] = {"offset": self.score_offset, "folded_into_head_bias": False}
        block.update(extra or {})
        return block


def is_vision_score_dir(path: str | Path) -> bool:
    """A folder saved by ``save_vision_score_model``."""
    block = read_score_config(path)
    return block is not None and block.get("head") == HEAD_MARKER


def load_vision_score_model(
    path: str | Path, settings: ModelSettings | None = None, lora: LoraSettings | None = None, *,
    score_type: str | None = None, normalizer: ScoreNormalizer | None = None, allow_new_head: bool = True,
    freeze_vision_tower: bool = True, freeze_projector: bool = False, trainable: bool = True,
    device: torch.device | str | None = None,
) -> tuple[VisionScoreModel, Any]:
    """A ``VisionScoreModel`` and its processor: a saved one with its head, normaliser and calibration, or a
    vision-language backbone with a fresh head (``allow_new_head``). Parts frozen as ``load_vision_lm`` does;
    with ``lora.enabled`` the adapter sits on the language model and the head trains in full."""
    local = Path(resolve_model(path).path)
    saved = is_vision_score_dir(local)
    if not saved and not allow_new_head:
        raise UserError(f"{path}: not a score model (no scalar head); train one with `humanalign train rm`")
    processor = load_processor(path, settings)
    vlm = load_vision_lm(path, settings, lora if trainable else None, freeze_vision_tower=freeze_vision_tower,
                         freeze_projector=freeze_projector, trainable=trainable)
    head, offset, block = None, 0.0, {}
    if saved:
        block = read_score_config(local) or {}
        tensors = load_file(str(local / HEAD_FILE))
        head = nn.Linear(tensors["score.weight"].shape[1], 1, dtype=torch.float32)
        head.load_state_dict({"weight": tensors["score.weight"].float(), "bias": tensors["score.bias"].float()})
        normalizer = normalizer or ScoreNormalizer.from_dict(block.get("normalizer"))
        calibration = block.get(CALIBRATION_KEY) or {}
        offset = 0.0 if calibration.get("folded_into_head_bias") else float(calibration.get("offset", 0.0))
    model = VisionScoreModel(vlm, score_type=score_type or block.get("score_type", "reward"),
                             normalizer=normalizer, score_offset=offset, head=head)
    if not trainable:
        model.requires_grad_(False).eval()
    if model.pad_token_id is None:
        model.config.pad_token_id = processor.tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, processor


def save_vision_score_model(model: VisionScoreModel, processor, output_dir: str | Path,
                            normalizer_state: ScoreNormalizer | None = None, score_type: str | None = None,
                            extra: dict[str, Any] | None = None, state_dict: dict | None = None) -> Path:
    """Write the VLM folder (LoRA merged, ``humanalign_score`` in its config.json), the head (``HEAD_FILE``)
    and the processor; files move into ``output_dir`` one by one, config.json last."""
    if state_dict is not None:
        raise UserError("a vision-language score model trained with sharded parameters (FSDP, ZeRO-3) cannot be "
                        "saved yet: train it on one process or with ZeRO-1/2")
    inner = peft_base(model.model)
    weights = merged_weights(model.model) if model.is_peft else None
    if normalizer_state is not None:
        model.normalizer = normalizer_state
    block = model.score_config(extra)
    block["score_type"] = score_type or model.score_type
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".score_model.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        inner.save_pretrained(str(tmp), state_dict=weights)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config[SCORE_CONFIG_KEY] = block
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        head = {"score.weight": model.score.weight.detach().float().cpu().contiguous(),
                "score.bias": model.score.bias.detach().float().cpu().contiguous()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        processor.save_pretrained(str(tmp))
        portable_tokenizer_config(tmp)
        _move_into_place(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


__all__ = ["HEAD_MARKER", "HEAD_FILE", "VisionScoreModel", "is_vision_score_dir", "load_vision_score_model",
           "save_vision_score_model"]
