"""`humanalign export`: turn a LoRA adapter folder into one self-contained model folder.

The result loads with plain ``transformers.AutoModelForCausalLM.from_pretrained`` (safetensors weights, config,
generation config, tokenizer with its chat template) and needs neither peft nor the base checkpoint.
The merge happens in float32 (merging into bf16 rounds the low-rank update away); the weights are cast to the
requested dtype afterwards. A full model folder is re-saved the same way (e.g. to change its dtype).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from humanalign.errors import UserError
from humanalign.models.load import (
    ADAPTER_INFO_FILE,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    save_pretrained_model,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"float32", "bfloat16", "float16"}


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a checkpoint was saved in (its config.json), float32 when it does not say (e.g. GGUF)."""
    config_file = Path(model_dir) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if config.get(key) in DTYPES:
                return str(config[key])
    return "float32"


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def recorded_base(adapter_dir: str | Path) -> str:
    """The base an adapter folder names: humanalign's own record (a preset name survives), else peft's."""
    for name, key in ((ADAPTER_INFO_FILE, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        file = Path(adapter_dir) / name
        if file.is_file():
            try:
                base = json.loads(file.read_text(encoding="utf-8")).get(key)
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}: not valid JSON ({exc.msg})") from None
            if base:
                return str(base)
    raise UserError(f"{adapter_dir}: the adapter names no base model; pass --base-model")


def merged_model(model_path: str | Path, settings: Any, base_model: str | None = None) -> tuple[Any, Any, str]:
    """(model with any adapter merged in, in float32; its tokenizer; the dtype of the source checkpoint).

    An adapter loads onto the base it records (humanalign_model.json, else adapter_config.json's
    base_model_name_or_path), or onto ``base_model`` when given (a base that moved since training).
    """
    path = resolve_model_path(str(model_path))
    if not Path(path).is_dir():
        raise UserError(f"{model_path}: export needs a local model or adapter folder")
    fp32 = settings.model_copy(update={"dtype": "float32"})  # merge at full precision, cast afterwards
    adapter = is_adapter_dir(path)
    if not adapter and not (Path(path) / "config.json").is_file() and not settings.gguf_file:
        raise UserError(f"{path}: neither an adapter (adapter_config.json) nor a model folder (config.json)")
    if adapter and base_model:
        base = load_causal_lm(base_model, fp32, trainable=False)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
        has_tokenizer = any((Path(path) / f).is_file() for f in TOKENIZER_FILES)
        tokenizer = load_tokenizer(path if has_tokenizer else base_model, settings)
        return model, tokenizer, checkpoint_dtype(resolve_model_path(base_model))
    model = load_causal_lm(path, fp32, trainable=False)  # an adapter folder loads merged into its base
    source = resolve_model_path(recorded_base(path)) if adapter else path
    return model, load_tokenizer(path, settings), checkpoint_dtype(source)


def export_model(model_path: str | Path, output: str | Path, settings: Any, dtype: str = "auto",
                 base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write the merged model and its tokenizer to ``output`` (atomically: a temporary folder renamed in place).
    ``dtype`` 'auto' keeps the source checkpoint's dtype."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")
    model, tokenizer, source_dtype = merged_model(model_path, settings, base_model)
    target = source_dtype if dtype == "auto" else dtype
    model = model.to(getattr(torch, target))
    model.config.dtype = target
    save_pretrained_model(model, tokenizer, output)
    return output


def run(cfg: Any) -> Path:
    if not cfg.model:
        raise UserError("`humanalign export` needs --model")
    if not cfg.output:
        raise UserError("`humanalign export` needs --output")
    out = export_model(cfg.model, cfg.output, cfg.model_settings, cfg.dtype, cfg.base_model, cfg.overwrite)
    n_files = sum(1 for _ in out.iterdir())
    print(f"[humanalign] exported {cfg.model} -> {out} ({n_files} files; loads with AutoModelForCausalLM)")
    return out
