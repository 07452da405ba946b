"""Log-prob utilities against hand computations and against separate forwards."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from humanalign.data.tokenize import collate_pairs, collate_sft, encode_preference
from humanalign.models.logprobs import (
    batch_logps,
    concatenated_forward,
    per_token_kl,
    right_padded_mask,
    sequence_logps,
    token_logps,
)

LN2 = math.log(2.0)


def hand_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of 2, T = 3, V = 3. Position t predicts token t + 1.

    Row 0: labels [-100, 1, 2]. Logits at t=0 are [0, 0, 0] -> p(1) = 1/3, log = -1.0986;
    at t=1 [0, ln 2, 0] -> p = [1/4, 1/2, 1/4], p(2) = 1/4, log = -1.3863. Sum -2.4849, mean -1.2425.
    Row 1: labels [-100, -100, 0]; only t=1 counts, logits [ln 2, 0, 0] -> p(0) = 1/2, log = -0.6931.
    The last position's logits (999) predict nothing and must be ignored.
    """
    logits = torch.tensor([
        [[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [999.0, 0.0, 0.0]],
        [[5.0, 1.0, 0.0], [LN2, 0.0, 0.0], [0.0, 999.0, 0.0]],
    ])
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 0]])
    return logits, labels


def test_token_logps_by_hand():
    logits, labels = hand_logits()
    expected = torch.tensor([[-math.log(3), -math.log(4)], [0.0, -LN2]])
    assert torch.allclose(token_logps(logits, labels), expected, atol=1e-6)


def test_sequence_logps_sum_mean_and_counts_by_hand():
    logits, labels = hand_logits()
    total, counts = sequence_logps(logits, labels)
    assert torch.allclose(total, torch.tensor([-2.484907, -0.693147]), atol=1e-5)
    assert counts.tolist() == [2, 1]
    mean, _ = sequence_logps(logits, labels, average=True)
    assert torch.allclose(mean, torch.tensor([-1.242453, -0.693147]), atol=1e-5)
    # A row without any label: 0 and count 0 (no division by zero).
    empty, n = sequence_logps(logits[:1], torch.full((1, 3), -100), average=True)
    assert empty.tolist() == [0.0] and n.tolist() == [0]


def test_token_logps_is_differentiable_and_handles_bf16():
    logits, labels = hand_logits()
    logits = logits.clone().requires_grad_(True)
    sequence_logps(logits, labels)[0].sum().backward()
    # d log p(2) / d logits at t=1 of row 0 = onehot(2) - softmax = [-1/4, -1/2, 3/4].
    assert torch.allclose(logits.grad[0, 1], torch.tensor([-0.25, -0.5, 0.75]), atol=1e-6)
    assert logits.grad[0, 2].abs().sum() == 0  # the last position gets no gradient
    bf16 = token_logps(hand_logits()[0].bfloat16(), labels)
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, token_logps(hand_logits()[0].bfloat16().float(), labels))


def test_per_token_kl_by_hand_and_against_kl_div():
    # One response position: pi = [1/2, 1/2], pi_ref = [1/4, 3/4]:
    # KL = 1/2 ln(2) + 1/2 ln(2/3) = 0.143841.
    policy = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    ref = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]]))
    labels = torch.tensor([[-100, 1]])
    assert torch.allclose(per_token_kl(policy, ref, labels), torch.tensor([0.143841]), atol=1e-5)

    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(3, 6, 11, generator=gen)
    ref = torch.randn(3, 6, 11, generator=gen)
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, 1, 2, 3, 4, 5], [-100] * 6])
    direct = torch.nn.functional.kl_div(
        torch.log_softmax(ref, -1), torch.log_softmax(policy, -1), log_target=True, reduction="none"
    ).sum(-1)[:, :-1]  # (B, T-1): KL(pi || ref) at each position
    mask = (labels[:, 1:] != -100).float()
    expected = (direct * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    assert torch.allclose(per_token_kl(policy, ref, labels), expected, atol=1e-6)
    assert per_token_kl(policy, ref, labels)[2] == 0  # no response token
    assert torch.allclose(per_token_kl(policy, policy, labels), torch.zeros(3), atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    from humanalign.models.load import load_causal_lm, load_tokenizer
    from humanalign.models.tiny import tiny_model_path

    path = tiny_model_path()
    return load_causal_lm(path, trainable=False), load_tokenizer(path)


def test_concatenated_forward_equals_two_separate_forwards(tiny):
    model, tok = tiny
    pairs = [
        encode_preference(tok, [{"role": "user", "content": "How do I bake bread?"}],
                          "Mix flour, water and yeast, then bake.", "No.", 128, 64),
        encode_preference(tok, [{"role": "user", "content": "Hi"}], "Hello!", "Go away, I will not help you.", 128, 64),
    ]
    pairs[0]["margin"], pairs[1]["margin"] = 1.0, 0.5
    out = concatenated_forward(model, collate_pairs(pairs, tok.pad_token_id), return_logits=True)
    chosen = collate_sft([{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"]} for p in pairs],
                         tok.pad_token_id)
    rejected = collate_sft([{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]} for p in pairs],
                           tok.pad_token_id)
    with torch.no_grad():
        chosen_logps, chosen_counts = batch_logps(model, chosen)
        rejected_logps, rejected_counts = batch_logps(model, rejected)
        rejected_mean, _ = batch_logps(model, rejected, average=True)
    assert torch.allclose(out["chosen_logps"], chosen_logps, atol=1e-5)
    assert torch.allclose(out["rejected_logps"], rejected_logps, atol=1e-5)
    assert torch.allclose(out["rejected_mean_logps"], rejected_mean, atol=1e-5)
    assert out["chosen_token_counts"].tolist() == chosen_counts.tolist()
    assert out["rejected_token_counts"].tolist() == rejected_counts.tolist()
    # Counts are the labelled tokens after the shift (the response and its end-of-turn token).
    assert out["rejected_token_counts"].tolist() == [sum(x != -100 for x in p["rejected_labels"]) for p in pairs]
    assert out["logits"].shape[0] == 4 and torch.isfinite(out["chosen_logits_mean"]).all()
    averaged = concatenated_forward(model, collate_pairs(pairs, tok.pad_token_id), average=True)
    assert torch.allclose(averaged["chosen_logps"], out["chosen_logps"] / out["chosen_token_counts"], atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        concatenated_forward(model, {"input_ids": torch.ones(3, 4, dtype=torch.long), "labels": torch.ones(3, 4)})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_right_padded_mask_is_4d_and_gives_the_2d_masks_logits(attn):
    """A right-padded batch's mask as a 4-D mask (no host check of a 2-D mask in transformers): the same logits at
    every real position; each query sees the real keys up to it and itself."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, attn_implementation=attn))
    model.eval()
    ids = torch.randint(1, 32, (2, 5))
    mask2d = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = right_padded_mask(model, mask2d)
    assert mask.shape == (2, 1, 5, 5)
    allowed = mask.bool() if attn == "sdpa" else mask == 0
    assert allowed[1, 0, 4].tolist() == [True, True, True, False, True]  # a pad query: real keys and itself
    assert allowed[1, 0, 1].tolist() == [True, True, False, False, False]  # causal
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask2d).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1, :3], expected[1, :3], atol=1e-5)


def test_right_padded_mask_leaves_sliding_window_models_their_2d_mask():
    model = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, sliding_window=4))
    mask2d = torch.tensor([[1, 1, 0]])
    assert right_padded_mask(model, mask2d) is mask2d
    assert right_padded_mask(model, None) is None
