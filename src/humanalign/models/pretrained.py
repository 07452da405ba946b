"""What every loader of a transformers model shares: the dtype, the ``from_pretrained`` keyword arguments, the
4/8-bit (bitsandbytes) config, the one "is this a PEFT model" test, which parameters take no weight decay, and
the portable tokenizer config.

``load.load_causal_lm`` (causal LMs) and ``score.load_score_model`` (reward/cost models) both build their
``from_pretrained`` call here, so a setting (dtype, remote code, attention kernel, GGUF, QLoRA) means the same
thing for both.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import BitsAndBytesConfig
from transformers.utils import is_flash_attn_2_available

from humanalign.config.training import ModelSettings
from humanalign.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_gpu(device: torch.device | str | None = None) -> bool:
    """Whether the weights go to a CUDA device that computes in bf16 (``device`` None: "a CUDA GPU when there is
    one"; a CPU model on a GPU machine is not on one)."""
    device = torch.device(device) if device is not None else None
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return on_cuda and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str = "auto", device: torch.device | str | None = None, *,
                  trainable: bool = False) -> torch.dtype:
    """The dtype weights load in: the one decision every loader (causal LMs, score models) makes here.

    'auto': weights that will be trained (full fine-tuning: ``trainable``) load in fp32 and compute in bf16
    through the engine's mixed precision (``mixed_precision: auto``): AdamW then updates fp32 weights, as an update
    of lr 5e-6 is far below bf16's spacing and would round away on bf16 weights. Frozen weights (a reference
    model, a score model that only scores, the base under LoRA / QLoRA) load in bf16 on a GPU that supports it,
    halving their memory; elsewhere fp32. Other names are the user's choice for every model: 'bfloat16' trains
    pure bf16 (no fp32 copy of the weights; small updates are lost)."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if not trainable and bf16_gpu(device) else torch.float32


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable half-precision parameters -> fp32, as PEFT does for LoRA adapters (``autocast_adapter_dtype``):
    for the modules a LoRA model trains in full (a score head in ``modules_to_save``) on a bf16 base."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The bitsandbytes config of ``lora.quantization`` ('4bit' or '8bit'), CUDA only (QLoRA).

    4-bit: NF4 with double quantisation, the matmuls computed in ``compute_dtype`` -- the model's own (training)
    dtype, so the LoRA layers and the dequantised base weights meet in one dtype (bf16 when the model is bf16).
    """
    if quantization not in ("4bit", "8bit"):
        raise UserError(f"unknown lora.quantization '{quantization}' (use none, 4bit or 8bit)")
    if not torch.cuda.is_available():
        raise UserError(f"lora.quantization={quantization} needs a CUDA GPU (bitsandbytes); "
                        "use quantization: none on the CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("QLoRA needs bitsandbytes: pip install 'humanalign[qlora]'")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def flash_attention_available() -> bool:
    """CUDA is there, ``flash_attn`` imports and transformers can use it."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("flash_attn")
    except Exception:  # not installed, or built for another torch / CUDA (OSError, RuntimeError...)
        return False
    return is_flash_attn_2_available()


def attention_kernel(settings: ModelSettings, dtype: torch.dtype) -> str | None:
    """``settings.attn_implementation`` when set; else FlashAttention-2 for half-precision weights when it is
    available, else None: transformers' default (sdpa where the architecture has it). FlashAttention-2 needs
    bf16/fp16 weights, so a model that trains in fp32 under autocast (``dtype: auto``) keeps sdpa."""
    if settings.attn_implementation:
        return settings.attn_implementation
    if dtype in (torch.bfloat16, torch.float16) and flash_attention_available():
        return "flash_attention_2"
    return None


def from_pretrained_kwargs(settings: ModelSettings, dtype: torch.dtype, gguf_file: str | None = None,
                           quantization: BitsAndBytesConfig | None = None, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of ``AutoModel*.from_pretrained``: dtype, remote code only when the settings allow it,
    the attention kernel (``attention_kernel``), the GGUF file (dequantised on load) or safetensors only (never
    unpickle a checkpoint), and a quantized model placed whole on the current CUDA device. ``extra`` is added
    as is (e.g. ``num_labels=1``)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    kernel = attention_kernel(settings, dtype)
    if kernel:
        kwargs["attn_implementation"] = kernel
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return {**kwargs, **extra}


def from_pretrained(auto_class: Any, path: str, settings: ModelSettings, kwargs: dict[str, Any]) -> Any:
    """``auto_class.from_pretrained(path, **kwargs)``; FlashAttention-2 chosen by ``attention_kernel`` (not by the
    user) gives way to transformers' default kernel for an architecture that has none."""
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (ValueError, ImportError):
        if settings.attn_implementation or kwargs.get("attn_implementation") != "flash_attention_2":
            raise
    return auto_class.from_pretrained(path, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper (LoRA): the one test every module uses."""
    return isinstance(model, PeftModel)


def peft_base(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its LoRA layers stay injected); other models as they are."""
    return model.get_base_model() if is_peft_model(model) else model


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm scales and any other 1-D parameter are not decayed (decaying them only hurts); the engine's
    default AdamW groups and a score model's per-layer groups both split on this."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered


def portable_tokenizer_config(folder: str | Path) -> None:
    """Name the generic fast tokenizer class in tokenizer_config.json: newer transformers write their backend's
    name, which older ones cannot load (versions: docs/engine.md, "Dated library notes")."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") in ("TokenizersBackend", None):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def disable_dropout_outside_lora(model: torch.nn.Module) -> int:
    """The DPO family's dropout switch: set every ``nn.Dropout`` outside LoRA branches to p = 0 (as TRL's
    disable_dropout), leaving LoRA's own dropout and attention-probability dropout as configured; returns how many.
    PPO turns off all dropout instead (``actor_critic.disable_all_dropout``)."""
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name and module.p > 0:
            module.p = 0.0
            changed += 1
    return changed


__all__ = ["DTYPES", "bf16_gpu", "resolve_dtype", "upcast_trainable", "bnb_config", "flash_attention_available",
           "attention_kernel", "from_pretrained_kwargs", "from_pretrained", "is_peft_model", "peft_base", "is_no_decay",
           "portable_tokenizer_config", "disable_dropout_outside_lora"]
