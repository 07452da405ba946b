"""Score models (reward and cost): any backbone + a scalar head, stored as a plain transformers model.

A score model *is* the architecture's own ``*ForSequenceClassification`` class with ``num_labels=1``
(``LlamaForSequenceClassification``, ``Qwen2ForSequenceClassification``, ``BertForSequenceClassification``...),
so a saved folder loads in plain transformers with ``AutoModelForSequenceClassification.from_pretrained(dir)``
and gives the same end scores as ``ScoreModel`` does. Nothing is stored in a private head layout.

What the "end score" is:
- decoders (a ``score`` linear head applied to every position): the head's output at the *rightmost token that is
  not the pad token* -- exactly transformers' own rule. Batches are padded on the right with ``pad_token_id``.
  That rule cannot tell a trailing EOS from padding when ``pad == eos``, so a fresh head gets its own pad token
  (``<|pad|>``, embeddings resized when needed): the EOS that closes a response is then scored, not skipped.
- BERT-style encoders (``pooler`` + ``classifier``): the head on the pooled first token (``[CLS]``), as
  transformers does; the input therefore starts with ``[CLS]`` (see ``encode_score_input``).
Token-wise scores (B, T) are the same head applied at every position (through the pooler's dense+tanh for
encoders); Safe RLHF's token-wise loss and a PPO critic use them. Architectures with another head layout
still score (through transformers' own forward) but have no token-wise scores. A decoder scores a pair batch
with the prompt once per pair when given its shared-prompt rows (``forward(..., shared_rows=...)``,
``data.score_rows``): the same end scores, no token-wise scores.

Score statistics (Safe RLHF's normaliser: running mean/var or an exponential moving average) travel in the
model's ``config.json`` under ``humanalign_score`` together with ``score_type`` ("reward" or "cost").
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForSequenceClassification

from humanalign.config.training import ModelSettings
from humanalign.data.score_rows import last_non_pad_index
from humanalign.data.tokenize import IGNORE_INDEX, encode_prompt_response
from humanalign.errors import UserError
from humanalign.models.end_rows import end_rows_refusal, ends_only
from humanalign.models.load import load_tokenizer, plain_float_model, portable_name, resolve_model
from humanalign.models.logprobs import is_vision_language, right_padded_mask, takes_4d_mask
from humanalign.models.lora_merge import merged_gathered_weights, merged_weights
from humanalign.models.pretrained import (
    bnb_config,
    from_pretrained,
    from_pretrained_kwargs,
    is_no_decay,
    is_peft_model,
    peft_base,
    portable_tokenizer_config,
    resolve_dtype,
    upcast_trainable,
)

SCORE_CONFIG_KEY = "humanalign_score"
SCORE_TYPES = ("reward", "cost")
CALIBRATION_KEY = "sign_calibration"  # a cost model's sign offset (models/calibration.py)
NORMALIZER_KINDS = ("none", "running", "ema")
PAD_TOKEN = "<|pad|>"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------- normaliser


class ScoreNormalizer:
    """Mean/variance of end scores, updated during training, optionally applied when scoring.

    Follows Safe RLHF (``safe_rlhf/models/normalizer.py``): ``running`` keeps the exact mean and (population)
    variance of every score seen (Chan et al.'s parallel update); ``ema`` keeps
    ``mean <- m * mean + (1 - m) * batch_mean`` (same for the variance) starting from mean 0, variance 1;
    ``none`` only counts. ``normalize(x) = (x - mean) / (std + epsilon)``.
    In multi-process training, pass the gathered scores of all processes to ``update``.

    The statistics live in one float64 tensor on the scores' device, updated there: ``update`` and ``normalize``
    never wait for the GPU (one host read per micro-batch would stall it). Reading ``mean``, ``var``, ``count``
    or ``to_dict()`` (logging, saving) copies them to the host.
    """

    def __init__(self, kind: str = "none", momentum: float = 0.9, epsilon: float = 1e-8,
                 mean: float = 0.0, var: float = 1.0, count: int = 0):
        if kind not in NORMALIZER_KINDS:
            raise UserError(f"unknown score normaliser '{kind}' (use one of {', '.join(NORMALIZER_KINDS)})")
        if not 0.0 < momentum < 1.0:
            raise UserError(f"normaliser momentum must be in (0, 1), got {momentum}")
        self.kind, self.momentum, self.epsilon = kind, float(momentum), float(epsilon)
        self.stats = torch.tensor([float(mean), float(var), float(count)], dtype=torch.float64)  # (3,)

    def _on(self, device: torch.device) -> torch.Tensor:
        """The (mean, var, count) tensor, moved to ``device`` once (float32 where float64 is missing: mps)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        if self.stats.device != device or self.stats.dtype != dtype:
            self.stats = self.stats.to(device, dtype)
        return self.stats

    def _set(self, index: int, value: float) -> None:
        self.stats[index] = float(value)

    mean = property(lambda self: float(self.stats[0]), lambda self, v: self._set(0, v))
    var = property(lambda self: float(self.stats[1]), lambda self, v: self._set(1, v))
    count = property(lambda self: int(round(float(self.stats[2]))), lambda self, v: self._set(2, int(v)))

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Fold a batch of end scores (any shape; non-finite values are ignored) into the statistics, on the
        scores' device (no host sync: an all-non-finite batch leaves them as they are through ``torch.where``)."""
        stats = self._on(values.device)
        flat = values.detach().reshape(-1).to(stats.dtype)  # (N,)
        finite = torch.isfinite(flat)  # (N,)
        n = finite.sum().to(stats.dtype)
        seen = n > 0
        batch_mean = torch.where(finite, flat, 0.0).sum() / n.clamp(min=1)
        batch_var = torch.where(finite, (flat - batch_mean) ** 2, 0.0).sum() / n.clamp(min=1)
        mean, var, count = stats.unbind()
        if self.kind == "running":
            total = (count + n).clamp(min=1)
            delta = batch_mean - mean
            m2 = var * count + batch_var * n + delta * delta * count * n / total
            mean, var = torch.where(seen, mean + delta * n / total, mean), torch.where(seen, m2 / total, var)
        elif self.kind == "ema":
            mean = torch.where(seen, self.momentum * mean + (1.0 - self.momentum) * batch_mean, mean)
            var = torch.where(seen, self.momentum * var + (1.0 - self.momentum) * batch_var, var)
        self.stats = torch.stack([mean, var, count + n])

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """(values - mean) / (std + epsilon); identity for kind ``none`` or before any update."""
        if self.kind == "none":
            return values
        mean, var, count = self._on(values.device).unbind()
        scale = var.clamp(min=0).sqrt() + self.epsilon  # in float64, then the scores' dtype (as Python floats did)
        normalized = (values - mean.to(values.dtype)) / scale.to(values.dtype)
        return torch.where(count > 0, normalized, values)

    def to_dict(self) -> dict[str, Any]:
        mean, var, count = self.stats.tolist()  # one host read
        return {"kind": self.kind, "mean": mean, "var": var, "count": int(round(count)),
                "momentum": self.momentum, "epsilon": self.epsilon}

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> ScoreNormalizer:
        state = dict(state or {})
        return cls(kind=state.get("kind", "none"), momentum=state.get("momentum", 0.9),
                   epsilon=state.get("epsilon", 1e-8), mean=state.get("mean", 0.0), var=state.get("var", 1.0),
                   count=state.get("count", 0))


# --------------------------------------------------------------------------------------------- model


@dataclass
class ScoreModelOutput:
    end_scores: torch.Tensor  # (B,) the score of each sequence
    scores: torch.Tensor | None  # (B, T) the head at every position (None for an unknown head layout)
    end_index: torch.Tensor | None  # (B,) position the end score was read at (0 for encoders)


def head_layout(hf_model: nn.Module) -> str:
    """'decoder' (per-token ``score`` head, last non-pad token), 'bert' (pooler + classifier), or 'opaque'."""
    inner = peft_base(hf_model)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if hasattr(inner, "score"):
        return "decoder"
    if hasattr(inner, "classifier") and getattr(backbone, "pooler", None) is not None and hasattr(inner, "dropout"):
        return "bert"
    return "opaque"


class ScoreModel(nn.Module):
    """A transformers ``*ForSequenceClassification`` (optionally peft-wrapped) returning ``ScoreModelOutput``."""

    def __init__(self, hf_model: nn.Module, score_type: str = "reward", normalizer: ScoreNormalizer | None = None,
                 score_offset: float = 0.0):
        super().__init__()
        # subtracted from every score: a sign calibration the saved head could not hold (models/calibration.py)
        self.score_offset = float(score_offset)
        if score_type not in SCORE_TYPES:
            raise UserError(f"unknown score type '{score_type}' (use 'reward' or 'cost')")
        self.model = hf_model
        self.score_type = score_type
        self.normalizer = normalizer or ScoreNormalizer()
        self.layout = head_layout(hf_model)
        # the shared-prompt forward computes the last layer at the end tokens only (models/end_rows.py)
        self.end_rows_only = True

    @property
    def config(self):
        return peft_base(self.model).config

    @property
    def pad_token_id(self) -> int | None:
        return self.config.pad_token_id

    @property
    def is_encoder(self) -> bool:
        """Reads its end score at the first token (BERT-style), so inputs start with [CLS]."""
        return self.layout != "decoder"

    @property
    def is_peft(self) -> bool:
        return is_peft_model(self.model)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Non-reentrant checkpointing by default; a LoRA model also gets inputs that require grad (else the
        checkpointed blocks of a frozen base would pass no gradient to the adapter)."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.is_peft:
            self.model.enable_input_require_grads()

    def update_normalizer(self, end_scores: torch.Tensor) -> None:
        self.normalizer.update(end_scores)

    def last_layer_at_ends(self) -> bool:
        """Whether the shared-prompt forward runs the last layer at the end tokens only (``models.end_rows``)."""
        if not self.end_rows_only or self.layout != "decoder":
            return False
        inner = peft_base(self.model)
        return end_rows_refusal(getattr(inner, inner.base_model_prefix)) is None

    def shared_prompt_refusal(self) -> str | None:
        """Why this model cannot score pairs in the shared-prompt layout (``data.score_rows``), or None when it
        can: the layout needs a decoder (causal attention: an encoder's prompt would see both answers) whose
        attention takes a 4-D mask (sdpa or eager, no sliding window: ``takes_4d_mask``) and no images."""
        inner = peft_base(self.model)
        if self.layout != "decoder":
            return f"{self.layout} head layout (the shared prompt needs a decoder's causal attention)"
        if is_vision_language(inner):
            return "a vision-language model (image tokens and their positions are laid out per sequence)"
        backbone = getattr(inner, inner.base_model_prefix)
        if not takes_4d_mask(backbone):
            kind = getattr(self.config, "_attn_implementation", None)
            return f"its attention ({kind}, or a sliding window) takes no 4-D mask"
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                normalize: bool = False, shared_rows: dict[str, torch.Tensor] | None = None,
                **kwargs) -> ScoreModelOutput:
        """Right-padded ``input_ids`` (B, T) -> end scores (B,) and token-wise scores (B, T), float32.

        ``attention_mask`` (B, T): 1 on real tokens; ``None`` attends to every position (as transformers does).
        A decoder gets it as a 4-D mask where it takes one (``right_padded_mask``): transformers would test a 2-D
        mask on the host (``padding_mask.all()``, a GPU sync per forward). Encoders get the 2-D mask (that sync
        remains there).

        ``shared_rows`` (``data.score_rows.shared_score_rows`` of this pair batch; decoders only, see
        ``shared_prompt_refusal``): the backbone runs on one row per pair, the prompt once, and the head on the
        2B end tokens only; the end scores are the plain forward's (up to float round-off), token-wise scores
        and ``end_index`` are None.
        """
        inner = peft_base(self.model)
        if shared_rows is not None:
            end_scores, scores, end_index = self._shared_end_scores(inner, shared_rows, **kwargs), None, None
        elif self.layout == "decoder":
            backbone = getattr(inner, inner.base_model_prefix)
            hidden = backbone(input_ids=input_ids, attention_mask=right_padded_mask(backbone, attention_mask),
                              use_cache=False, **kwargs).last_hidden_state  # (B, T, H)
            # a LoRA model's head trains in fp32 on a bf16 base (upcast_trainable): meet it in its dtype
            scores = inner.score(hidden.to(inner.score.weight.dtype)).squeeze(-1).float()  # (B, T)
            if self.pad_token_id is None and input_ids.shape[0] > 1:
                raise UserError("this score model has no pad_token_id, so it cannot score a padded batch")
            end_index = last_non_pad_index(input_ids, self.pad_token_id)  # (B,)
            end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1)  # (B,)
        elif self.layout == "bert":
            backbone = getattr(inner, inner.base_model_prefix)
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]  # (B, T, H)
            pooler = backbone.pooler
            # pooler(h)[b] = tanh(dense(h[b, 0])); applying dense+tanh at every position gives token-wise scores
            # whose position 0 is exactly transformers' pooled score.
            pooled = pooler.activation(pooler.dense(hidden.to(pooler.dense.weight.dtype)))  # (B, T, H)
            scores = inner.classifier(inner.dropout(pooled)).squeeze(-1).float()  # (B, T)
            end_index = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            end_scores = scores[:, 0]
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # (B, 1)
            end_scores, scores, end_index = logits.squeeze(-1).float(), None, None
        # fresh tensors, not views of the head's output: FSDP2 hooks its pre-backward into the forward's outputs,
        # and an in-place op on a view would bypass the hook (it warns on every forward otherwise)
        end_scores = end_scores.clone()
        scores = scores.clone() if scores is not None else None
        if self.score_offset:
            end_scores = end_scores - self.score_offset
            scores = scores - self.score_offset if scores is not None else None
        if normalize:
            end_scores = self.normalizer.normalize(end_scores)
            scores = self.normalizer.normalize(scores) if scores is not None else None
        return ScoreModelOutput(end_scores=end_scores, scores=scores, end_index=end_index)

    def _shared_end_scores(self, inner: nn.Module, rows: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        """End scores (2B,) of a pair batch from its shared-prompt rows: the backbone on the (B, L) rows, the
        head on the hidden states at ``rows["ends"]`` (2B,). Where ``end_rows_only`` is set and the layout allows
        (``models.end_rows``) the last layer runs at those end tokens only."""
        if self.layout != "decoder":
            raise ValueError(f"the shared-prompt layout needs a decoder, not a {self.layout} head layout")
        backbone = getattr(inner, inner.base_model_prefix)
        mask = rows["attention_mask"]  # (B, 1, L, L) bool, True: may attend
        if self.config._attn_implementation == "eager":  # eager adds the mask to its scores
            dtype = backbone.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        inputs = dict(input_ids=rows["input_ids"], position_ids=rows["position_ids"], attention_mask=mask,
                      use_cache=False, **kwargs)
        if self.last_layer_at_ends():
            pairs, width = rows["input_ids"].shape
            # (B, 2): each row's chosen and rejected end, as positions in the row
            positions = (rows["ends"].view(2, pairs) - torch.arange(pairs, device=mask.device) * width).T
            with ends_only(backbone, positions):
                hidden = backbone(**inputs).last_hidden_state  # (B, 2, H)
            picked = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # (2B, H) chosen first
        else:
            hidden = backbone(**inputs).last_hidden_state  # (B, L, H)
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows["ends"])  # (2B, H)
        return inner.score(picked.to(inner.score.weight.dtype)).squeeze(-1).float()  # (2B,)

    def score_config(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``humanalign_score`` block written into config.json."""
        end = {"decoder": "last_non_pad_token", "bert": "first_token_pooled"}.get(self.layout, "model_logits")
        block = {"format_version": FORMAT_VERSION, "score_type": self.score_type, "end_score": end,
                 "normalizer": self.normalizer.to_dict()}
        if self.score_offset:  # re-saving a calibrated model keeps its offset (weights saved uncalibrated)
            block[CALIBRATION_KEY] = {"offset": self.score_offset, "folded_into_head_bias": False}
        block.update(extra or {})
        return block


# --------------------------------------------------------------------------------------------- optimizer

HEAD_MODULES = ("score", "classifier", "pooler")  # a decoder's head; an encoder's pooler + classifier
_LAYER_INDEX = re.compile(r"\.(?:layers?|h|blocks)\.(\d+)\.")


def param_lr_scale(name: str, num_layers: int, head_lr_multiplier: float, layer_lr_decay: float) -> float:
    """Learning-rate multiplier of one parameter (named as in ``named_parameters``) of a score model.

    Head (``score``, or an encoder's ``pooler`` / ``classifier``): ``head_lr_multiplier``. Transformer layer
    ``i`` of ``num_layers`` (0 = nearest the input): ``layer_lr_decay ** (num_layers - 1 - i)``, so the top
    layer trains at the peak rate; embeddings (and anything else below the first layer): ``layer_lr_decay **
    num_layers``; any other parameter (a final norm) is above the layers: 1. Layer-wise decay follows
    ULMFiT's discriminative fine-tuning (Howard & Ruder 2018) / ELECTRA's layer-wise decay (Clark et al. 2020).
    """
    parts = name.split(".")
    if any(part in HEAD_MODULES for part in parts):
        return head_lr_multiplier
    match = _LAYER_INDEX.search(f".{name}")
    if match and num_layers > 0:
        return layer_lr_decay ** (num_layers - 1 - min(int(match.group(1)), num_layers - 1))
    if "embed" in name.lower() or "wte" in parts or "wpe" in parts:
        return layer_lr_decay ** num_layers
    return 1.0


def score_param_groups(model: nn.Module, learning_rate: float, weight_decay: float,
                       head_lr_multiplier: float = 1.0, layer_lr_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of a score model's trainable parameters: one group per (learning rate, decay)
    pair, each with its ``lr`` set (the peak rate times ``param_lr_scale``) and its ``weight_decay`` (0 for
    biases, norms and other 1-D parameters, as the engine's default groups do), the groups at ``learning_rate``
    first. With both multipliers at 1 this is the engine's two-group split."""
    inner = peft_base(model.model if isinstance(model, ScoreModel) else model)
    num_layers = int(getattr(inner.config, "num_hidden_layers", 0) or 0)
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = param_lr_scale(name, num_layers, head_lr_multiplier, layer_lr_decay)
        decay = 0.0 if is_no_decay(name, param) else weight_decay
        groups.setdefault((learning_rate * scale, decay), []).append(param)
    if not groups:
        raise UserError("the model has no trainable parameters (is everything frozen?)")
    # groups at the peak rate first: the engine logs the first group's rate as train/lr
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != learning_rate, kv[0]))
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in ordered]


# --------------------------------------------------------------------------------------------- encoding


def encode_score_input(tokenizer, prompt_messages, response: str, max_length: int, max_prompt_length: int,
                       encoder: bool = False, stats=None) -> dict[str, list[int]] | None:
    """Tokens a score model reads for one (prompt, response): the SCORE model's own chat template.

    Decoders: ``encode_prompt_response`` as is (prompt cut from the left, response from the right, labels on
    the response and its end-of-turn token). Encoders (``encoder=True``, BERT-style): the same ids wrapped in
    ``[CLS] ... [SEP]``, because the end score is read from the pooled first token. Trainer and ``Scorer`` both
    use this function, so training and scoring see identical inputs. None when no response token fits.
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    wrap = encoder and cls_id is not None
    extra = 1 + (sep_id is not None) if wrap else 0
    if max_prompt_length >= max_length - extra:
        max_prompt_length = max(1, (max_length - extra) // 2)
    encoded = encode_prompt_response(tokenizer, prompt_messages, response, max_length - extra, max_prompt_length,
                                     stats)
    if encoded is None or not wrap:
        return encoded
    tail = [sep_id] if sep_id is not None else []
    return {"input_ids": [cls_id, *encoded["input_ids"], *tail],
            "labels": [IGNORE_INDEX, *encoded["labels"], *([IGNORE_INDEX] * len(tail))]}


def encode_score_pair(tokenizer, pair, max_length: int, max_prompt_length: int, encoder: bool = False,
                      stats=None) -> dict | None:
    """A preference pair as ``collate_pairs`` expects it: chosen/rejected ids and labels from
    ``encode_score_input`` (so training sees exactly what ``Scorer`` will), plus ``margin``,
    ``is_chosen_safe`` and ``is_rejected_safe`` when the pair has them (absent keys, not None). None when a
    response has no token left (counted in ``stats``)."""
    chosen = encode_score_input(tokenizer, pair.prompt, pair.chosen, max_length, max_prompt_length, encoder, stats)
    rejected = encode_score_input(tokenizer, pair.prompt, pair.rejected, max_length, max_prompt_length, encoder,
                                  stats)
    if chosen is None or rejected is None:
        return None
    out: dict[str, Any] = {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                           "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
    for key in ("margin", "is_chosen_safe", "is_rejected_safe"):
        value = getattr(pair, key, None)
        if value is not None:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------- loading


def read_score_config(path: str | Path) -> dict[str, Any] | None:
    """The ``humanalign_score`` block of a saved model folder, or None (also for plain transformers RMs)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8")).get(SCORE_CONFIG_KEY)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{cfg_file}: not valid JSON") from None


def is_score_model_dir(path: str | Path) -> bool:
    """A folder holding a sequence-classification model with one output (ours or any transformers RM)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    num_labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    return SCORE_CONFIG_KEY in cfg or (any(a.endswith("ForSequenceClassification") for a in archs) and num_labels == 1)


def ensure_distinct_pad(tokenizer, hf_model: nn.Module, decoder: bool) -> None:
    """Give the tokenizer a pad token the end-score rule can tell from EOS; keep model config in step."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or (decoder and eos is not None and pad == eos):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        embeddings = hf_model.get_input_embeddings()
        if len(tokenizer) > embeddings.num_embeddings:
            hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    hf_model.config.pad_token_id = tokenizer.pad_token_id


def _lora_wrap(hf_model: nn.Module, lora, layout: str) -> nn.Module:
    head = {"decoder": ["score"], "bert": ["classifier", "pooler"]}.get(layout, ["classifier", "score"])
    target = None if lora.target_modules == "auto" else lora.target_modules
    if lora.quantization != "none":
        hf_model = prepare_model_for_kbit_training(hf_model)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=target, modules_to_save=head)
    return get_peft_model(hf_model, config)


def load_score_model(path: str, settings=None, lora=None, score_type: str | None = None,
                     allow_new_head: bool = True, normalizer: ScoreNormalizer | None = None,
                     device: torch.device | str | None = None, trainable: bool = True):
    """A score model and its tokenizer from a folder, hub-style name, GGUF file or preset ('tiny',
    'minilm-l6-v2', 'smollm2-135m-instruct').

    - a saved score model (``humanalign_score`` in its config, or any ``*ForSequenceClassification`` with one
      label) is reloaded with its head, normaliser and score type (``score_type`` overrides the saved one);
    - any other backbone (a causal LM or an encoder) gets a fresh scalar head when ``allow_new_head`` (the
      decoder's tokenizer gets a pad token distinct from EOS, see the module docstring), else a ``UserError``
      (scoring with an untrained head would be meaningless).
    ``settings``: ``ModelSettings`` (dtype, chat template, remote code, attention kernel). ``lora``:
    ``LoraSettings``; when enabled the model is peft-wrapped (task SEQ_CLS) and the head modules train in full.
    ``device``: where the weights go. ``trainable``: whether the model will be trained (a reward model or
    critic) or only score (``load_scorer``); with ``device`` it picks the 'auto' dtype (``resolve_dtype``): fp32
    for full fine-tuning, bf16 on a bf16 GPU for a frozen model or the frozen base under LoRA, whose adapters
    and head train in fp32. Returns (ScoreModel, tokenizer).
    """
    settings = settings or ModelSettings()
    resolved = resolve_model(path)
    local = Path(resolved.path)
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise UserError(f"{path}: holds a LoRA adapter, not a score model; use the run's final model folder "
                        "(score models are always saved with the adapter merged)")
    saved = is_score_model_dir(local)
    if not saved and not allow_new_head:
        raise UserError(f"{path}: not a score model (no sequence-classification head with one output); "
                        "train one with `humanalign train rm`")
    block = read_score_config(local) if saved else None
    gguf = settings.gguf_file or resolved.gguf_file
    quantized = lora is not None and lora.enabled and lora.quantization != "none"
    lora_enabled = lora is not None and lora.enabled
    dtype = resolve_dtype(settings.dtype, device, trainable=trainable and not lora_enabled)
    quantization = bnb_config(lora.quantization, dtype) if quantized else None
    kwargs = from_pretrained_kwargs(settings, dtype, gguf, quantization, num_labels=1)
    tokenizer = load_tokenizer(path, settings)
    try:
        hf_model = from_pretrained(AutoModelForSequenceClassification, resolved.path, settings, kwargs)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not load the score model '{path}': {first_line}") from None
    plain_float_model(hf_model)
    hf_model.name_or_path = portable_name(resolved.path)  # peft saves it as a LoRA adapter's base_model_name_or_path
    layout = head_layout(hf_model)
    if not saved:
        ensure_distinct_pad(tokenizer, hf_model, decoder=layout == "decoder")
    elif hf_model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    if block is not None:
        score_type = score_type or block.get("score_type", "reward")
        normalizer = normalizer or ScoreNormalizer.from_dict(block.get("normalizer"))
    calibration = (block or {}).get(CALIBRATION_KEY) or {}
    offset = 0.0 if calibration.get("folded_into_head_bias") else float(calibration.get("offset", 0.0))
    if lora_enabled:
        hf_model = _lora_wrap(hf_model, lora, layout)
        upcast_trainable(hf_model)  # the head trains in full (modules_to_save): fp32 like the adapters
    model = ScoreModel(hf_model, score_type=score_type or "reward", normalizer=normalizer, score_offset=offset)
    if device is not None and not quantized:
        model.to(device)
    return model, tokenizer


# --------------------------------------------------------------------------------------------- saving


def _weights_from_gathered(model: ScoreModel, gathered: dict[str, torch.Tensor],
                           owner_prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The full weights FSDP / DeepSpeed gathered as keys of the transformers model inside ``model``, the
    LoRA adapter folded in. ``owner_prefix``: where that model sits in the gathered keys ("model." when they
    are the ``ScoreModel``'s, "" when they are the transformers model's own)."""
    state = {k[len(owner_prefix):]: v for k, v in gathered.items() if k.startswith(owner_prefix)}
    if len(state) != len(gathered):
        raise UserError(f"the gathered weights are not those of this score model ({len(gathered) - len(state)} "
                        f"keys outside '{owner_prefix}')")
    return merged_gathered_weights(model.model, state) if model.is_peft else state


def save_score_model(model: ScoreModel | nn.Module, tokenizer, output_dir: str | Path,
                     normalizer_state: dict[str, Any] | ScoreNormalizer | None = None,
                     score_type: str | None = None, extra: dict[str, Any] | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a transformers ``*ForSequenceClassification`` folder (safetensors, tokenizer, config.json with
    ``humanalign_score``) that ``AutoModelForSequenceClassification.from_pretrained`` loads as is.

    LoRA adapters are merged into the saved weights (the live model keeps its adapter). The files are written
    to a temporary sub-folder and moved into ``output_dir`` one by one, ``config.json`` last; weight files of an
    older save that the new one does not have are removed. Other files in ``output_dir`` (a run's metrics,
    checkpoints) are left alone. ``extra`` adds keys to the ``humanalign_score`` block (e.g. max_length).
    ``state_dict``: the full weights gathered from FSDP / DeepSpeed shards (``engine.save_model`` passes them;
    keys of the ``ScoreModel``), written instead of the live parameters, which are shards then.
    """
    owner_prefix = "model."  # where the transformers model sits in the keys of a gathered state_dict
    if not isinstance(model, ScoreModel):
        model, owner_prefix = ScoreModel(model, score_type=score_type or "reward"), ""
    if isinstance(normalizer_state, ScoreNormalizer):
        normalizer = normalizer_state
    elif normalizer_state is not None:
        normalizer = ScoreNormalizer.from_dict(normalizer_state)
    else:
        normalizer = model.normalizer
    if score_type is not None and score_type not in SCORE_TYPES:
        raise UserError(f"unknown score type '{score_type}' (use 'reward' or 'cost')")
    inner = peft_base(model.model)
    if state_dict is not None:
        state_dict = _weights_from_gathered(model, state_dict, owner_prefix)
    elif model.is_peft:
        state_dict = merged_weights(model.model)
    block = model.score_config(extra)
    block["score_type"] = score_type or model.score_type
    block["normalizer"] = normalizer.to_dict()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".score_model.tmp-{os.getpid()}-{time.time_ns()}"
    config = inner.config
    had_block, old_block = hasattr(config, SCORE_CONFIG_KEY), getattr(config, SCORE_CONFIG_KEY, None)
    try:
        setattr(config, SCORE_CONFIG_KEY, block)
        config.num_labels = 1
        if tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id
        inner.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        portable_tokenizer_config(tmp)
        _move_into_place(tmp, output_dir)
    finally:
        if not had_block:
            delattr(config, SCORE_CONFIG_KEY)
        else:
            setattr(config, SCORE_CONFIG_KEY, old_block)
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json")


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    new_files = sorted(p for p in tmp.rglob("*") if p.is_file())
    new_names = {p.relative_to(tmp).as_posix() for p in new_files}
    for pattern in _WEIGHT_PATTERNS:  # stale shards of an older, differently sharded save
        for old in output_dir.glob(pattern):
            if old.name not in new_names:
                old.unlink()
    # weights first, config.json last: a reader that sees the new config also sees the new weights
    for src in sorted(new_files, key=lambda p: (p.name == "config.json", p.name)):
        dst = output_dir / src.relative_to(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


__all__ = [
    "SCORE_CONFIG_KEY", "SCORE_TYPES", "CALIBRATION_KEY", "ScoreNormalizer", "ScoreModelOutput", "ScoreModel", "head_layout",
    "last_non_pad_index", "load_score_model", "save_score_model", "read_score_config", "is_score_model_dir",
    "ensure_distinct_pad", "encode_score_input", "encode_score_pair", "param_lr_scale", "score_param_groups",
]
