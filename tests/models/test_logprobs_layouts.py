"""The pair forward's fast path (models/logprobs.py): the chunked LM-head log-softmax and its gradients against
autograd, and the shared / padded layouts against the plain full-logits forward (the score plan by hand:
tests/data/test_score_plan.py)."""

from __future__ import annotations

import pytest
import torch

import humanalign.models.logprobs as logprobs
from humanalign.config.training import LoraSettings
from humanalign.data.score_plan import PLAN_KEY
from humanalign.data.tokenize import collate_pairs
from humanalign.models.load import load_causal_lm
from humanalign.models.logprobs import concatenated_forward, head_logps, pair_layout


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("keep_probs", [False, True])
def test_head_logps_matches_autograd(bias, frozen, keep_probs, monkeypatch):
    """Every backward strategy (frozen head: a precomputed direction; trained head: kept softmax or recomputed
    logits), in chunks of 8 tokens, gives autograd's log-softmax, logit sums and gradients."""
    torch.manual_seed(0)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 50 * 8)
    monkeypatch.setattr(logprobs, "PROBS_ELEMENTS", 1 << 26 if keep_probs else 0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(not frozen)
    twin = torch.nn.Linear(16, 50, bias=bias).requires_grad_(not frozen)
    twin.load_state_dict(head.state_dict())
    hidden = torch.randn(37, 16, requires_grad=True)
    hidden_twin = hidden.detach().clone().requires_grad_()
    target, weights = torch.randint(0, 50, (37,)), torch.randn(37)
    logps, sums, vocab = head_logps(head, hidden, target)
    (logps * weights).sum().backward()
    logits = twin(hidden_twin)
    expected = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    assert vocab == 50 and not sums.requires_grad
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, logits.detach().sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, hidden_twin.grad, atol=1e-5, rtol=1e-5)
    if not frozen:
        torch.testing.assert_close(head.weight.grad, twin.weight.grad, atol=1e-5, rtol=1e-5)
        if bias:
            torch.testing.assert_close(head.bias.grad, twin.bias.grad, atol=1e-5, rtol=1e-5)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_layouts_match_the_plain_forward_values_and_gradients(pair_batch, lora):
    dataset, batch = pair_batch
    torch.manual_seed(0)
    model = load_causal_lm("tiny", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0) if lora else None)
    if lora:  # move the adapter away from zero, so its gradients are not trivially related to the base's
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    results = {}
    for layout in ("plain", "padded", "shared"):
        model.zero_grad(set_to_none=True)
        out = concatenated_forward(model, batch, layout=layout)
        loss = (out["chosen_logps"] * torch.tensor([1.0, -2.0, 0.5])).sum() + 0.3 * out["rejected_logps"].sum()
        loss.backward()
        results[layout] = (out, _grads(model))
    plain_out, plain_grads = results["plain"]
    assert len(plain_grads) > 0
    for layout in ("padded", "shared"):
        out, grads = results[layout]
        for key, value in plain_out.items():
            torch.testing.assert_close(out[key].float(), value.float(), atol=1e-4, rtol=1e-5, msg=key)
        assert grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            scale = grad.abs().max().item()
            assert (grads[name] - grad).abs().max().item() <= 1e-4 * max(scale, 1e-3), (layout, name)
    assert pair_layout(model, batch) == "shared"  # the self-check agrees, kept on the model
    # the shared rows are shorter than chosen + rejected: the prompt is computed once
    rows = batch[PLAN_KEY]["shared"]["input_ids"].shape[1]
    assert rows == max(dataset.shared_lengths) < 2 * batch["input_ids"].shape[1]


def test_shared_lengths_by_hand(pair_batch):
    dataset, _ = pair_batch
    for example, length in zip(dataset, dataset.shared_lengths):
        prompt = next(i for i, label in enumerate(example["chosen_labels"]) if label != -100)
        assert length == len(example["chosen_input_ids"]) + len(example["rejected_input_ids"]) - prompt


def test_batches_without_a_plan_and_models_that_post_process_logits(pair_batch):
    dataset, batch = pair_batch
    model = load_causal_lm("tiny", trainable=False)
    bare = collate_pairs([{k: v for k, v in e.items() if k != "index"} for e in dataset], 0)
    with torch.no_grad():
        planned = concatenated_forward(model, batch, layout="shared")["chosen_logps"]
        unplanned = concatenated_forward(model, bare, layout="shared")["chosen_logps"]  # planned on the fly
        torch.testing.assert_close(unplanned, planned)
    # a model that scales its logits after the head (e.g. Gemma's soft-capping) keeps the plain forward
    capped = load_causal_lm("tiny", trainable=False)
    capped.config.final_logit_softcapping = 30.0
    assert pair_layout(capped, batch) == "plain"
