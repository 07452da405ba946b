"""The shared loading pieces (models/pretrained.py): dtype, from_pretrained kwargs, bitsandbytes config, PEFT test.

bitsandbytes needs a CUDA GPU; the config tests stand in a GPU (``torch.cuda.is_available``) and an installed
bitsandbytes, since building a ``BitsAndBytesConfig`` needs neither.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from humanalign.config.training import LoraSettings, ModelSettings
from humanalign.errors import UserError
from humanalign.models import load as load_module
from humanalign.models import pretrained
from humanalign.models import score_model as score_module
from humanalign.models.pretrained import (
    bnb_config,
    from_pretrained_kwargs,
    is_peft_model,
    peft_base,
    resolve_dtype,
)
from humanalign.models.score_model import ScoreModel


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device and bitsandbytes, as far as the config builders can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    real_find_spec = pretrained.importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


# --------------------------------------------------------------------------------------------- dtype


def test_resolve_dtype_names_and_auto_on_the_cpu():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto", device="cpu") is torch.float32  # a CPU model stays fp32 even on a GPU machine


@pytest.fixture
def bf16_gpu(monkeypatch):
    """A CUDA GPU that computes in bf16, as far as ``resolve_dtype`` can tell (nothing is put on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_auto_dtype_on_a_bf16_gpu_trains_fp32_and_freezes_bf16(bf16_gpu):
    assert resolve_dtype("auto", trainable=True) is torch.float32  # fp32 weights, bf16 compute by autocast
    assert resolve_dtype("auto") is torch.bfloat16  # frozen is the default: weights no optimizer updates
    assert resolve_dtype("auto", "cuda", trainable=False) is torch.bfloat16
    assert resolve_dtype("auto", "cpu", trainable=False) is torch.float32  # a CPU model on the GPU machine
    assert resolve_dtype("bfloat16", trainable=True) is torch.bfloat16  # explicit: pure bf16, the user's choice


def _loaded_dtype(monkeypatch, load) -> torch.dtype:
    seen: list[dict] = []
    monkeypatch.setattr(load_module, "AutoModelForCausalLM", _capturing_loader(seen))
    monkeypatch.setattr(score_module, "AutoModelForSequenceClassification", _capturing_loader(seen))
    with pytest.raises(_Captured):
        load()
    return seen[0]["dtype"]


LORA = LoraSettings(enabled=True)
BF16 = ModelSettings(dtype="bfloat16")


@pytest.mark.parametrize(("what", "load", "expected"), [
    ("full fine-tuning", lambda: load_module.load_causal_lm("tiny"), torch.float32),
    ("frozen reference", lambda: load_module.load_causal_lm("tiny", trainable=False), torch.bfloat16),
    ("LoRA base", lambda: load_module.load_causal_lm("tiny", lora=LORA), torch.bfloat16),
    ("explicit bfloat16", lambda: load_module.load_causal_lm("tiny", BF16), torch.bfloat16),
    ("reward model training", lambda: score_module.load_score_model("tiny"), torch.float32),
    ("scorer", lambda: score_module.load_score_model("tiny", trainable=False), torch.bfloat16),
    ("LoRA reward model base", lambda: score_module.load_score_model("tiny", lora=LORA), torch.bfloat16),
    ("explicit bfloat16 score model", lambda: score_module.load_score_model("tiny", BF16), torch.bfloat16),
])
def test_every_loader_asks_resolve_dtype_whether_its_weights_train(bf16_gpu, monkeypatch, what, load, expected):
    assert _loaded_dtype(monkeypatch, load) is expected, what


def test_the_cpu_loads_every_model_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for load in (lambda: load_module.load_causal_lm("tiny"), lambda: load_module.load_causal_lm("tiny", lora=LORA),
                 lambda: load_module.load_causal_lm("tiny", trainable=False),
                 lambda: score_module.load_score_model("tiny", trainable=False)):
        assert _loaded_dtype(monkeypatch, load) is torch.float32


def test_lora_on_a_bf16_base_trains_fp32_adapters_and_head():
    """LoRA adapters (PEFT) and the score head a LoRA score model trains in full are fp32 on a bf16 base, and
    the forward runs without autocast (the head meets the bf16 hidden states in its own dtype)."""
    model, tokenizer = score_module.load_score_model("tiny", BF16, LORA)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("score" in n and "lora_" not in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.end_scores.dtype == torch.float32 and torch.isfinite(out.end_scores).all()
    out.end_scores.sum().backward()
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n and "lora_" not in n]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


# --------------------------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_compute_dtype_is_the_models_dtype(fake_gpu, dtype):
    config = bnb_config("4bit", dtype)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_compute_dtype == dtype
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


def test_8bit_config(fake_gpu):
    config = bnb_config("8bit", torch.bfloat16)
    assert config.load_in_8bit and not config.load_in_4bit


def test_bnb_config_refuses_the_cpu_and_unknown_modes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        bnb_config("4bit", torch.bfloat16)
    with pytest.raises(UserError, match="unknown lora.quantization"):
        bnb_config("2bit", torch.bfloat16)


# --------------------------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_kwargs_plain_gguf_and_quantized(fake_gpu):
    plain = from_pretrained_kwargs(ModelSettings(), torch.float32)
    assert plain == {"dtype": torch.float32, "trust_remote_code": False, "use_safetensors": True}

    settings = ModelSettings(trust_remote_code=True, attn_implementation="sdpa")
    gguf = from_pretrained_kwargs(settings, torch.bfloat16, "model.gguf", num_labels=1)
    assert gguf == {"dtype": torch.bfloat16, "trust_remote_code": True, "attn_implementation": "sdpa",
                    "gguf_file": "model.gguf", "num_labels": 1}  # a GGUF file is not safetensors

    quant = bnb_config("4bit", torch.bfloat16)
    quantized = from_pretrained_kwargs(ModelSettings(), torch.bfloat16, quantization=quant)
    assert quantized["quantization_config"] is quant and quantized["device_map"] == {"": 0}


class _Captured(Exception):
    pass


def _capturing_loader(seen: list[dict]):
    class Loader:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs)
            raise _Captured

    return Loader


def test_causal_and_score_loaders_build_the_same_qlora_kwargs(fake_gpu, monkeypatch):
    """Both loaders, same settings: the same from_pretrained kwargs (the score model adds num_labels), and the
    4-bit compute dtype is the configured dtype for both (the score loader used bf16/fp16 whatever the dtype)."""
    seen: list[dict] = []
    monkeypatch.setattr(load_module, "AutoModelForCausalLM", _capturing_loader(seen))
    monkeypatch.setattr(score_module, "AutoModelForSequenceClassification", _capturing_loader(seen))
    settings = ModelSettings(dtype="float16")
    lora = LoraSettings(enabled=True, quantization="4bit")
    with pytest.raises(_Captured):
        load_module.load_causal_lm("tiny", settings, lora)
    with pytest.raises(_Captured):
        score_module.load_score_model("tiny", settings, lora)
    causal, scored = seen
    assert scored.pop("num_labels") == 1
    assert causal.keys() == scored.keys()
    for kwargs in (causal, scored):
        assert kwargs["dtype"] is torch.float16
        assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float16
        assert kwargs["use_safetensors"] and kwargs["device_map"] == {"": 0}


# --------------------------------------------------------------------------------------------- attention


@pytest.fixture
def flash_gpu(bf16_gpu, monkeypatch):
    """A bf16 GPU with flash_attn importable (a stand-in module) and transformers agreeing it is usable."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(pretrained, "is_flash_attn_2_available", lambda: True)


def test_flash_attention_2_for_half_precision_weights_when_installed(flash_gpu):
    assert from_pretrained_kwargs(ModelSettings(), torch.bfloat16)["attn_implementation"] == "flash_attention_2"
    assert from_pretrained_kwargs(ModelSettings(), torch.float16)["attn_implementation"] == "flash_attention_2"
    # fp32 weights (trained under autocast): FlashAttention-2 needs half precision, transformers' default stays
    assert "attn_implementation" not in from_pretrained_kwargs(ModelSettings(), torch.float32)
    # an explicit setting always wins
    explicit = from_pretrained_kwargs(ModelSettings(attn_implementation="sdpa"), torch.bfloat16)
    assert explicit["attn_implementation"] == "sdpa"


def test_no_flash_attention_without_cuda_or_without_flash_attn(flash_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    assert "attn_implementation" not in from_pretrained_kwargs(ModelSettings(), torch.bfloat16)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "attn_implementation" not in from_pretrained_kwargs(ModelSettings(), torch.bfloat16)


def test_loaders_choose_flash_attention_for_frozen_models_only(flash_gpu, monkeypatch):
    for load, kernel in ((lambda: load_module.load_causal_lm("tiny", trainable=False), "flash_attention_2"),
                         (lambda: load_module.load_causal_lm("tiny", lora=LORA), "flash_attention_2"),
                         (lambda: score_module.load_score_model("tiny", trainable=False), "flash_attention_2"),
                         (lambda: load_module.load_causal_lm("tiny"), None)):  # fp32 full fine-tuning
        seen: list[dict] = []
        monkeypatch.setattr(load_module, "AutoModelForCausalLM", _capturing_loader(seen))
        monkeypatch.setattr(score_module, "AutoModelForSequenceClassification", _capturing_loader(seen))
        with pytest.raises(_Captured):
            load()
        assert seen[0].get("attn_implementation") == kernel


def test_an_architecture_without_flash_attention_falls_back_unless_the_user_asked_for_it():
    calls: list[str | None] = []

    class NoFlash:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.append(kwargs.get("attn_implementation"))
            if kwargs.get("attn_implementation") == "flash_attention_2":
                raise ValueError("NoFlash does not support Flash Attention 2.0 yet")
            return "model"

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "flash_attention_2"}
    assert pretrained.from_pretrained(NoFlash, "path", ModelSettings(), kwargs) == "model"
    assert calls == ["flash_attention_2", None]
    with pytest.raises(ValueError, match="Flash Attention"):
        pretrained.from_pretrained(NoFlash, "path", ModelSettings(attn_implementation="flash_attention_2"), kwargs)


# --------------------------------------------------------------------------------------------- PEFT


def test_is_peft_model_plain_and_lora_wrapped():
    model = tiny_llama()
    assert not is_peft_model(model) and peft_base(model) is model
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert is_peft_model(wrapped)
    assert peft_base(wrapped) is model  # the transformers model, its LoRA layers injected
    assert not is_peft_model(torch.nn.Linear(2, 2))
    # the score model's test is the same one
    assert ScoreModel(wrapped).is_peft and not ScoreModel(tiny_llama()).is_peft
