"""The score model's shared-prompt pair forward (ScoreModel(shared_rows=...), data/score_rows.py): the same end
scores and gradients as the plain forward of the padded chosen and rejected rows, with LoRA, eager attention
and padding; the models it refuses, and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from humanalign.config.training import LoraSettings
from humanalign.data.records import PreferencePair, user_prompt
from humanalign.data.score_rows import SHARED_ROWS_KEY, ScorePairCollator
from humanalign.models.score_model import encode_score_pair, load_score_model

# prompts and answers of unequal lengths: rows of both layouts are padded
PAIRS = [
    PreferencePair(user_prompt("How do I bake a cake?"), "Here is a recipe for a cake with eggs and flour.",
                   "I cannot help with that request."),
    PreferencePair(user_prompt("Hello"), "Hello there, how are you doing today?", "No."),
    PreferencePair(user_prompt("Tell me about the quick brown fox and the lazy dog, please"), "It jumps.",
                   "The quick brown fox jumps over the lazy dog, twice, and then it sleeps."),
]


def _model(decoder_dir: Path, lora: bool = False, attention: str = "sdpa"):
    torch.manual_seed(0)
    settings = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0) if lora else None
    model, tok = load_score_model(str(decoder_dir), lora=settings)
    model.model.config._attn_implementation = attention
    with torch.no_grad():  # a random head (and LoRA B, zero at init) so that every part moves the scores
        for name, param in model.named_parameters():
            if "score" in name:
                param.mul_(50.0)
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return model.eval(), tok


def _batch(model, tok):
    features = [encode_score_pair(tok, pair, 96, 32) for pair in PAIRS]
    return ScorePairCollator(model.pad_token_id, shared=True)(features)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_rows_give_the_plain_forwards_scores_and_gradients(decoder_dir, lora, attention):
    model, tok = _model(decoder_dir, lora, attention)
    batch = _batch(model, tok)
    assert batch[SHARED_ROWS_KEY]["input_ids"].numel() < batch["input_ids"].numel()  # the prompt once
    trained = [p for p in model.parameters() if p.requires_grad]
    results = []
    for shared_rows in (None, batch[SHARED_ROWS_KEY]):
        model.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"], shared_rows=shared_rows)
        (out.end_scores * torch.linspace(-1.0, 1.0, 6)).sum().backward()
        results.append((out.end_scores.detach(), [p.grad.clone() for p in trained]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert plain.std() > 1e-2  # the six answers really score differently
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    for ours, theirs in zip(shared_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_shared_rows_match_each_answer_scored_alone(decoder_dir):
    """Padding changes nothing: each end score is that of the answer forwarded alone, unpadded."""
    model, tok = _model(decoder_dir)
    batch = _batch(model, tok)
    with torch.no_grad():
        shared = model(batch["input_ids"], batch["attention_mask"], shared_rows=batch[SHARED_ROWS_KEY]).end_scores
        lengths = batch["attention_mask"].sum(-1).tolist()
        for i, n in enumerate(lengths):
            alone = model(batch["input_ids"][i : i + 1, :n], torch.ones(1, n, dtype=torch.long)).end_scores
            assert abs(alone.item() - shared[i].item()) < 1e-5


def test_refusals_name_the_reason(decoder_dir):
    model, _ = _model(decoder_dir)
    assert model.shared_prompt_refusal() is None
    model.model.config._attn_implementation = "flash_attention_2"
    assert "takes no 4-D mask" in model.shared_prompt_refusal()
    model.model.config._attn_implementation = "sdpa"
    model.model.config.sliding_window, model.model.config.use_sliding_window = 8, True
    assert "takes no 4-D mask" in model.shared_prompt_refusal()
    model.layout = "bert"
    assert "causal attention" in model.shared_prompt_refusal()
