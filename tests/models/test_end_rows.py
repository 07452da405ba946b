"""The last layer at the end tokens only (models/end_rows.py): for every supported layout (Llama, Mistral, Qwen2,
Qwen3 with its q/k norms), full and LoRA, sdpa and eager, with and without gradient checkpointing, the shared-prompt
end scores and their gradients equal the whole layer's and the plain forward's; the layer's forward is restored
afterwards, even on an error; the layouts it refuses, and why."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from humanalign.data.score_rows import SHARED_ROWS_KEY, ScorePairCollator
from humanalign.models.end_rows import LAYOUTS, end_rows_refusal, ends_only
from humanalign.models.score_model import ScoreModel

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, max_position_embeddings=64)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForSequenceClassification, {}),
    "mistral": (MistralConfig, MistralForSequenceClassification, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForSequenceClassification, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForSequenceClassification, {"use_sliding_window": False, "head_dim": 8}),
}


def _score_model(family: str, attention: str = "sdpa", lora: bool = False) -> ScoreModel:
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**SIZES, **extra, num_labels=1)
    config._attn_implementation = attention
    hf = model_class(config)
    with torch.no_grad():
        hf.score.weight.mul_(50.0)  # scores far enough apart that a wrong row shows
    if lora:
        from peft import LoraConfig, get_peft_model

        hf = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                                           modules_to_save=["score"], task_type="SEQ_CLS"))
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
    return ScoreModel(hf).eval()


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    features = []
    for prompt_len, chosen_len, rejected_len in [(5, 7, 3), (9, 2, 6), (3, 4, 4), (6, 1, 8)]:
        ids = lambda n: torch.randint(1, 64, (n,), generator=generator).tolist()  # noqa: E731
        prompt, chosen, rejected = ids(prompt_len), ids(chosen_len), ids(rejected_len)
        features.append({"chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected,
                         "chosen_labels": [-100] * prompt_len + chosen,
                         "rejected_labels": [-100] * prompt_len + rejected})
    return ScorePairCollator(pad_token_id=0, shared=True)(features)


def _scores_and_grads(model: ScoreModel, batch: dict, shared: bool, end_rows: bool):
    model.end_rows_only = end_rows
    model.zero_grad()
    out = model(batch["input_ids"], batch["attention_mask"], shared_rows=batch[SHARED_ROWS_KEY] if shared else None)
    (out.end_scores * torch.linspace(-1.0, 1.0, out.end_scores.numel())).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return out.end_scores.detach(), grads


def test_every_layout_is_covered_here():
    assert set(FAMILIES) == set(LAYOUTS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_end_rows_give_the_whole_layers_scores_and_gradients(family, attention, lora):
    model = _score_model(family, attention, lora)
    batch = _batch()
    assert end_rows_refusal(model.model.get_base_model().model if lora else model.model.model) is None
    plain, plain_grads = _scores_and_grads(model, batch, shared=False, end_rows=False)
    whole, whole_grads = _scores_and_grads(model, batch, shared=True, end_rows=False)
    ends, end_grads = _scores_and_grads(model, batch, shared=True, end_rows=True)
    assert plain.std() > 1e-2
    torch.testing.assert_close(ends, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(ends, whole, atol=1e-5, rtol=0)
    for ours, theirs in zip(end_grads, plain_grads):  # float round-off, relative to each gradient's scale
        torch.testing.assert_close(ours, theirs, atol=1e-5 * max(1.0, float(theirs.abs().max())), rtol=1e-4)


def test_end_rows_under_gradient_checkpointing():
    model = _score_model("llama")
    batch = _batch()
    model.train()
    reference, reference_grads = _scores_and_grads(model, batch, shared=True, end_rows=False)
    model.gradient_checkpointing_enable()
    ends, grads = _scores_and_grads(model, batch, shared=True, end_rows=True)
    torch.testing.assert_close(ends, reference, atol=1e-5, rtol=0)
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_the_layers_forward_is_restored_even_on_an_error():
    model = _score_model("llama")
    backbone = model.model.model
    layer = backbone.layers[-1]
    with pytest.raises(RuntimeError, match="boom"):
        with ends_only(backbone, torch.zeros(1, 2, dtype=torch.long)):
            assert "forward" in layer.__dict__
            raise RuntimeError("boom")
    assert "forward" not in layer.__dict__
    batch = _batch()
    with torch.no_grad():  # the whole layer again: (B, L, H) out
        hidden = backbone(input_ids=batch["input_ids"]).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape


def test_refusals_name_the_reason():
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    assert "model type 'gpt2'" in end_rows_refusal(gpt2.transformer)
    model = _score_model("mistral")
    backbone = model.model.model
    backbone.config.sliding_window = 8
    assert "sliding" in end_rows_refusal(backbone)
    backbone.config.sliding_window = None
    backbone.layers[-1].forward = backbone.layers[-1].forward  # an instance-level wrapper, as accelerate's hooks
    assert "already wrapped" in end_rows_refusal(backbone)
