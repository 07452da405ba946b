"""Vision-language models for the preference trainers: recognising one, loading it with its processor, which
parts train (vision tower, projector, language model), and LoRA on the language model only.

A model folder is vision-language when its config has a ``vision_config`` (LLaVA, Qwen2-VL, Idefics, Gemma 3
...). It loads through ``AutoProcessor`` and ``AutoModelForImageTextToText``, from safetensors only, running code
shipped with the checkpoint only when ``model.trust_remote_code`` is set (as ``models.load`` does for text).

Parameters are sorted into three parts by their module names: the vision tower (LLaVA's ``vision_tower``,
Qwen2-VL / Qwen2.5-VL's ``visual``, Idefics3 / SmolVLM's ``vision_model``), the projector that maps image
features into the language model (LLaVA's ``multi_modal_projector``, Qwen2-VL / Qwen2.5-VL's ``visual.merger``,
Idefics3 / SmolVLM's ``connector``, ``mm_projector``) and everything else, the language model (``language_model``,
Idefics3's ``text_model``, ``lm_head``). ``freeze_vision_tower``,
``freeze_projector`` and ``freeze_language_model`` turn off the gradients of each (the last for LLaVA's first
stage: only the projector trains, aligning image features with the frozen language model). The pair trainers
(`train dpo`, `train safe-mm-dpo`) and `train sft` load their vision-language policy through ``load_vision_lm``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from humanalign.config.training import LoraSettings, ModelSettings
from humanalign.errors import UserError
from humanalign.models.load import (
    _adapter_base,
    _loading_error,
    _quiet_peft,
    enable_gradient_checkpointing,
    portable_name,
    resolve_dtype,
    resolve_model,
)

VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "mm_projector", "connector")
# LoRA's default targets on the language model: the attention and MLP projections of Llama-like blocks
LANGUAGE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_vision_model(name_or_path: str | Path, settings: ModelSettings | None = None) -> bool:
    """Whether ``name_or_path`` (folder, run folder, adapter folder or Hub id) is a vision-language model."""
    config = model_config(name_or_path, settings)
    return config is not None and isinstance(config.get("vision_config"), dict)


def model_config(name_or_path: str | Path, settings: ModelSettings | None = None) -> dict | None:
    """The model's ``config.json`` as a dict (an adapter folder's: its base's), or None when there is none to read
    here (a GGUF file, or a name that does not load as a config: the loaders report that problem)."""
    settings = settings or ModelSettings()
    resolved = resolve_model(name_or_path)
    if resolved.gguf_file:
        return None
    base = _adapter_base(resolved.path)
    if base is not None:
        return model_config(base[0], settings)
    config_file = Path(resolved.path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=settings.trust_remote_code).to_dict()
    except (OSError, ValueError):
        return None


def load_processor(name_or_path: str | Path, settings: ModelSettings | None = None):
    """The model's ``AutoProcessor``, with a pad token (eos when it has none) and a chat template."""
    settings = settings or ModelSettings()
    resolved = resolve_model(name_or_path)
    base = _adapter_base(resolved.path)
    path = resolved.path if base is None or (Path(resolved.path) / "processor_config.json").is_file() else base[0]
    try:
        processor = AutoProcessor.from_pretrained(str(resolve_model(path).path),
                                                  trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _loading_error("a processor", str(name_or_path), exc) from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise UserError(f"'{name_or_path}': its processor ({type(processor).__name__}) has no tokenizer and image "
                        "processor, so it cannot take images")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of '{name_or_path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(processor, "chat_template", None):
        raise UserError(f"'{name_or_path}': the processor has no chat template to place the image tokens with")
    return processor


def _tokens_per_image(config: dict, processor) -> int | None:
    """The fewest tokens one image expands into: the processor's count for a 1-pixel image (a fixed-size model
    gives its one count, a resizing one its smallest), else the config's ``image_seq_length``; None if unknown."""
    try:
        counts = processor._get_num_multimodal_tokens(image_sizes=[(1, 1)]).num_image_tokens
        return int(counts[0]) if counts else None
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, ZeroDivisionError):
        pass
    found = getattr(processor, "image_seq_length", None) or config.get("image_seq_length")
    return int(found) if found else None


def max_images_per_prompt(config: dict | None, processor, override: int | None = None) -> int | None:
    """The most images one prompt may carry for this model, or None for no known limit.

    ``override`` (the ``max_images_per_prompt`` setting) wins. Otherwise the limit is what the context length
    allows: a prompt whose image tokens alone (``_tokens_per_image`` each) fill ``max_position_embeddings``,
    leaving no room for a single text token, cannot be taken by the model at all."""
    if override is not None:
        return override
    if not config:
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    positions = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    per_image = _tokens_per_image(config, processor)
    if not positions or not per_image:
        return None
    return max(0, (int(positions) - 1) // per_image)


def model_part(name: str) -> str:
    """"vision", "projector" or "language" for a parameter or module name."""
    parts = set(name.split("."))
    if parts & set(PROJECTOR_NAMES):
        return "projector"
    if parts & set(VISION_TOWER_NAMES):
        return "vision"
    return "language"


def language_lora_targets(model: torch.nn.Module, lora: LoraSettings) -> list[str]:
    """Full names of the linear layers LoRA adapts: the language model's projections only (``LANGUAGE_LORA_TARGETS``,
    or the names of ``lora.target_modules`` when it lists some; 'all-linear': every linear layer there)."""
    wanted = lora.target_modules
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and model_part(name) == "language"
             and name.split(".")[-1] != "lm_head"
             and (wanted == "all-linear" or name.split(".")[-1] in (LANGUAGE_LORA_TARGETS if wanted == "auto"
                                                                     else wanted))]
    if not names:
        raise UserError(f"LoRA: no linear layer of the language model matches lora.target_modules ({wanted})")
    return names


def trainable_parts(model: torch.nn.Module) -> dict[str, int]:
    """{part: trainable parameter count} for "vision", "projector" and "language" (LoRA weights count as theirs)."""
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[model_part(name)] += param.numel()
    return counts


def set_trainable_parts(model: torch.nn.Module, *, freeze_vision_tower: bool, freeze_projector: bool,
                        freeze_language_model: bool = False) -> dict:
    """Turn off the gradients of the frozen parts; returns {part: trainable parameter count}."""
    frozen = {"vision": freeze_vision_tower, "projector": freeze_projector, "language": freeze_language_model}
    for name, param in model.named_parameters():
        if frozen[model_part(name)]:
            param.requires_grad_(False)
    return trainable_parts(model)


def load_vision_lm(
    name_or_path: str | Path, settings: ModelSettings | None = None, lora: LoraSettings | None = None, *,
    freeze_vision_tower: bool = True, freeze_projector: bool = False, freeze_language_model: bool = False,
    gradient_checkpointing: bool = False, trainable: bool = True,
):
    """An ``AutoModelForImageTextToText`` for training (parts frozen as asked; with ``lora.enabled`` a LoRA
    adapter on the language model, plus the projector fully trained unless ``freeze_projector``) or frozen
    (``trainable=False``: a reference). A PEFT adapter folder loads as its base with the adapter merged in."""
    settings, lora = settings or ModelSettings(), lora or LoraSettings()
    if lora.quantization != "none":
        raise UserError("lora.quantization (QLoRA) is not supported for vision-language models yet")
    if trainable and freeze_language_model and lora.enabled:
        raise UserError("freeze_language_model: true with lora.enabled: LoRA adapts the language model; turn one off")
    if trainable and freeze_vision_tower and freeze_projector and freeze_language_model:
        raise UserError("freeze_vision_tower, freeze_projector and freeze_language_model are all true: nothing "
                        "would train")
    resolved = resolve_model(name_or_path)
    base = _adapter_base(resolved.path)
    if base is not None:
        model = load_vision_lm(base[0], settings, trainable=False)
        with _quiet_peft():
            model = PeftModel.from_pretrained(model, resolved.path).merge_and_unload()
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                resolved.path, dtype=resolve_dtype(settings.dtype), use_safetensors=True,
                trust_remote_code=settings.trust_remote_code,
                **({"attn_implementation": settings.attn_implementation} if settings.attn_implementation else {}))
        except (OSError, ValueError) as exc:
            raise _loading_error("the vision-language model", str(name_or_path), exc) from None
    model.humanalign_base = {"base_model": portable_name(name_or_path), "gguf_file": None}
    if not trainable:
        model.eval()
        return model.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_trainable_parts(model, freeze_vision_tower=freeze_vision_tower, freeze_projector=freeze_projector,
                        freeze_language_model=freeze_language_model)
    if lora.enabled:
        projector = sorted({n.split(".")[-1] for n, _ in model.named_modules()} & set(PROJECTOR_NAMES))
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                            target_modules=language_lora_targets(model, lora),
                            modules_to_save=None if freeze_projector else projector or None)
        humanalign_base = model.humanalign_base
        with _quiet_peft():
            model = get_peft_model(model, config)
        model.humanalign_base = humanalign_base
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def describe_parts(model: torch.nn.Module) -> str:
    """Trainable parameters per part, for the run log: "vision tower 0, projector 1,234, language model 5,678"."""
    counts = trainable_parts(model)
    return f"vision tower {counts['vision']:,}, projector {counts['projector']:,}, language model {counts['language']:,}"


__all__ = ["is_vision_model", "model_config", "load_processor", "max_images_per_prompt", "load_vision_lm", "model_part", "language_lora_targets",
           "set_trainable_parts", "trainable_parts", "describe_parts", "VISION_TOWER_NAMES", "PROJECTOR_NAMES",
           "LANGUAGE_LORA_TARGETS"]
