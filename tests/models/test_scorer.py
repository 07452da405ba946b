"""The Scorer: text in (re-tokenised with the score model's own template), scores out in input order,
length-sorted batches that do not change a score, and the disk cache that skips the model on a second pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from humanalign.data.records import PreferencePair, user_prompt
from humanalign.errors import UserError
from humanalign.models.load import resolve_model_path
from humanalign.models.score_model import (
    ScoreNormalizer,
    encode_score_input,
    load_score_model,
    save_score_model,
)
from humanalign.models.scorer import ScoreCache, Scorer, cached_score_pairs, load_scorer, model_fingerprint
from humanalign.models.tiny import build_tiny_model

TEXTS = ["Hello there, how are you doing today?", "The quick brown fox jumps over the lazy dog.",
         "I cannot help with that request, it could hurt someone.", "Here is a recipe for a cake."] * 10
PROMPTS = [user_prompt("hello"), user_prompt("how do I bake a cake?"), "tell me about the fox",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]
RESPONSES = ["I cannot help", "Here is a recipe for a cake with eggs and flour and sugar.", "The quick brown fox.",
             "Hello!"]


def _scaled_save(model, tok, folder: Path, score_type: str, normalizer=None) -> Path:
    inner = model.model
    head = inner.score if model.layout == "decoder" else inner.classifier
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(50.0)  # random heads score everything near 0; spread the scores so order checks mean something
    save_score_model(model, tok, folder, score_type=score_type, normalizer_state=normalizer,
                     extra={"max_length": 64, "max_prompt_length": 24})
    return folder


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scoring")
    backbone = build_tiny_model(root / "tiny", texts=TEXTS, vocab_size=300, hidden_size=16, num_layers=2,
                                num_heads=2, num_kv_heads=1, intermediate_size=32, seed=4)
    model, tok = load_score_model(str(backbone))
    norm = ScoreNormalizer("running")
    norm.update(torch.tensor([1.0, 3.0]))  # mean 2, var 1
    return _scaled_save(model, tok, root / "rm", "reward", norm)


@pytest.fixture(scope="module")
def encoder_cost_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scoring_enc")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(root / "bert")
    AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6-v2")).save_pretrained(root / "bert")
    model, tok = load_score_model(str(root / "bert"))
    return _scaled_save(model, tok, root / "cm", "cost")


def test_scorer_uses_the_recorded_lengths_and_scores_in_input_order(reward_dir):
    scorer = load_scorer(str(reward_dir), device="cpu", batch_size=2)
    assert (scorer.max_length, scorer.max_prompt_length, scorer.score_type) == (64, 24, "reward")
    assert next(scorer.model.parameters()).dtype == torch.float32  # dtype 'auto' on the CPU
    batched = scorer.score(PROMPTS, RESPONSES)
    # 4 texts, batch size 2, sorted by length: 2 forward passes
    assert scorer.forward_calls == 2
    one_by_one = [scorer.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(s, 4) for s in batched)) == 4  # distinct texts, distinct scores: order is checkable


def test_scorer_renders_text_with_the_score_models_own_template(reward_dir):
    scorer = load_scorer(str(reward_dir), device="cpu")
    ids = scorer.encode(PROMPTS[0], RESPONSES[0])
    assert ids == encode_score_input(scorer.tokenizer, user_prompt("hello"), "I cannot help", 64, 24)["input_ids"]
    assert scorer.tokenizer.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nI cannot help<|im_end|>"
    with torch.no_grad():
        direct = scorer.model(torch.tensor([ids])).end_scores.item()
    assert scorer.score([PROMPTS[0]], [RESPONSES[0]])[0] == pytest.approx(direct, abs=1e-6)
    # a plain string prompt is a single user turn
    assert scorer.encode("hello", "I cannot help") == ids


def test_encoder_scorer_wraps_cls_sep_and_truncates(encoder_cost_dir):
    scorer = load_scorer(str(encoder_cost_dir), device="cpu", max_length=24, max_prompt_length=8)
    tok = scorer.tokenizer
    ids = scorer.encode("a very long question " * 20, "and a long answer " * 20)
    assert len(ids) == 24 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert scorer.stats.prompt_truncated == 1 and scorer.stats.response_truncated == 1
    assert scorer.score_type == "cost"
    # an encoder has learned positions: a longer max_length is capped at what it can read (128 here)
    assert load_scorer(str(encoder_cost_dir), device="cpu", max_length=1024).max_length == 128


def test_normalize_applies_the_saved_statistics(reward_dir):
    raw = load_scorer(str(reward_dir), device="cpu").score(PROMPTS, RESPONSES)
    normalized = load_scorer(str(reward_dir), device="cpu", normalize=True).score(PROMPTS, RESPONSES)
    # saved running stats: mean 2, var 1 -> (x - 2) / (1 + 1e-8)
    assert normalized == pytest.approx([(x - 2.0) / (1.0 + 1e-8) for x in raw], abs=1e-5)


def test_cache_second_pass_runs_no_forward(reward_dir, tmp_path):
    pairs = [PreferencePair(prompt=user_prompt(f"question {i}"), chosen=f"good answer {i}", rejected=f"bad {i}")
             for i in range(5)]
    scorer = load_scorer(str(reward_dir), device="cpu", batch_size=4)
    first = cached_score_pairs(scorer, pairs, cache_root=tmp_path)
    calls = scorer.forward_calls
    assert calls == 3  # 10 texts in batches of 4
    second = cached_score_pairs(scorer, pairs, cache_root=tmp_path)
    assert scorer.forward_calls == calls  # everything came from the cache
    assert second == first
    assert first == scorer.score_pairs(pairs)  # and the cached values are the model's scores

    # one new pair: only its two texts go through the model (one batch)
    more = [*pairs, PreferencePair(prompt=user_prompt("new"), chosen="yes", rejected="no")]
    calls = scorer.forward_calls
    third = cached_score_pairs(scorer, more, cache_root=tmp_path)
    assert scorer.forward_calls == calls + 1 and third[0][:5] == first[0]

    # other scorer settings are other cache keys
    normalized = load_scorer(str(reward_dir), device="cpu", normalize=True)
    cached_score_pairs(normalized, pairs, cache_root=tmp_path)
    assert normalized.forward_calls > 0


def test_fingerprint_changes_when_the_model_is_saved_again(reward_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reward_dir, copy)  # copytree keeps mtimes: same content, same fingerprint
    assert model_fingerprint(copy) == model_fingerprint(reward_dir)
    (copy / "metrics.jsonl").write_text("{}\n")  # run files do not matter
    assert model_fingerprint(copy) == model_fingerprint(reward_dir)
    model, tok = load_score_model(str(copy), allow_new_head=False)
    save_score_model(model, tok, copy)  # a retrained model is written again
    assert model_fingerprint(copy) != model_fingerprint(reward_dir)
    config = json.loads((copy / "config.json").read_text())
    assert config["humanalign_score"]["score_type"] == "reward"


def test_cache_skips_nonfinite_scores(tmp_path):
    cache = ScoreCache("f" * 64, tmp_path)
    cache.put_many({"a": 1.5, "b": float("nan"), "c": float("inf")})
    assert cache.get_many(["a", "b", "c", "a"]) == {"a": 1.5}
    cache.close()


def test_load_scorer_refuses_an_untrained_backbone(tmp_path):
    backbone = build_tiny_model(tmp_path / "tiny", texts=TEXTS, vocab_size=300, hidden_size=16, num_layers=1,
                                num_heads=2, num_kv_heads=1, intermediate_size=32)
    with pytest.raises(UserError, match="not a score model"):
        load_scorer(str(backbone), device="cpu")


def test_mismatched_lengths_are_an_error(reward_dir):
    scorer = load_scorer(str(reward_dir), device="cpu")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(PROMPTS[:2], RESPONSES[:1])
    assert isinstance(scorer, Scorer)


def test_an_empty_answer_is_scored_on_the_prompt_alone(encoder_cost_dir, reward_dir):
    """Real data has empty answers (UltraFeedback train line 479: rejected ""); scoring them must not fail."""
    from humanalign.trainers.reward import encoder_pair_template

    encoder = load_scorer(str(encoder_cost_dir), device="cpu", max_length=24, max_prompt_length=8)
    tok = encoder.tokenizer
    tok.chat_template = encoder_pair_template(tok.sep_token)  # what `train rm` saves with an encoder
    # the pair template renders no answer token for "": [CLS] prompt [SEP] + the empty answer + [SEP]
    ids = encoder.encode("what is two plus two", "")
    assert tok.decode(ids) == "[CLS] what is two plus two [SEP] [SEP]"
    long_ids = encoder.encode("a very long question " * 20, "")
    assert len(long_ids) == 24 and long_ids[0] == tok.cls_token_id  # cut to max_length from the left
    scores = encoder.score(["what is two plus two", "what is two plus two"], ["", "four"])
    assert all(math.isfinite(s) for s in scores) and scores[0] != pytest.approx(scores[1], abs=1e-6)
    # a chat template closes the assistant turn, so a decoder's empty answer still has its end-of-turn token
    decoder = load_scorer(str(reward_dir), device="cpu")
    assert decoder.tokenizer.decode(decoder.encode("hello", "")).endswith("<|im_start|>assistant\n<|im_end|>")
