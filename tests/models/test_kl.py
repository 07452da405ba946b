"""The exact per-token KL on the fast forward (models/kl.py): the fused head against autograd on random heads
(every backward strategy, chunked), and the whole forward against the full-logits KL on the tiny model (shared
and padded layouts, frozen-model and LoRA adapter-disabled references): values and policy gradients."""

from __future__ import annotations

import math

import pytest
import torch

import humanalign.models.kl as kl_module
import humanalign.models.logprobs as logprobs
from humanalign.config.training import LoraSettings
from humanalign.models.kl import linear_head_kl, pair_kl_forward
from humanalign.models.load import load_causal_lm
from humanalign.models.logprobs import concatenated_forward, per_token_kl, sequence_logps
from humanalign.models.reference import AdapterDisabledReference, FrozenReference, PrecomputedReference


def test_kl_of_two_point_distributions_by_hand():
    """Vocabulary of 2, one position: policy logits (0, 0) -> p = (1/2, 1/2); reference logits (log 3, 0) ->
    q = (3/4, 1/4). KL = 1/2 log(2/3) + 1/2 log(2) = 1/2 log(4/3) = 0.143841; label 1: log p = log 1/2,
    log q = log 1/4. d KL / d z_0 = p_0 (log(p_0/q_0) - KL) = 1/2 (log(2/3) - 1/2 log(4/3)) = -0.274653."""
    head = torch.nn.Linear(1, 2, bias=True)
    ref_head = torch.nn.Linear(1, 2, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        ref_head.weight.zero_()
        ref_head.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
    logps, kl, ref_logps = linear_head_kl(head, torch.zeros(1, 1), ref_head, torch.zeros(1, 1), torch.tensor([1]))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert logps.item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert ref_logps.item() == pytest.approx(math.log(0.25), abs=1e-6)
    kl.sum().backward()
    assert head.bias.grad.tolist() == pytest.approx([-0.274653, 0.274653], abs=1e-6)
    assert ref_head.bias.grad is None  # the reference gets no gradient


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("keep_probs", [False, True])
@pytest.mark.parametrize("kl_grad", [False, True])
def test_linear_head_kl_matches_autograd(bias, frozen, keep_probs, kl_grad, monkeypatch):
    """Every backward strategy (frozen head: precomputed directions; trained head: kept p and d KL / d z, or
    recomputed logits of both models), in chunks of 8 positions, gives autograd's values and gradients."""
    torch.manual_seed(0)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 50 * 8)
    monkeypatch.setattr(logprobs, "PROBS_ELEMENTS", 1 << 26 if keep_probs else 0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(not frozen)
    ref_head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    twin = torch.nn.Linear(16, 50, bias=bias).requires_grad_(not frozen)
    twin.load_state_dict(head.state_dict())
    hidden = torch.randn(37, 16, requires_grad=True)
    hidden_twin = hidden.detach().clone().requires_grad_()
    ref_hidden = torch.randn(37, 16)
    target, weights, kl_weights = torch.randint(0, 50, (37,)), torch.randn(37), torch.rand(37)
    logps, kl, ref_logps = linear_head_kl(head, hidden, ref_head, ref_hidden, target, kl_grad=kl_grad)
    loss = (logps * weights).sum() + ((kl * kl_weights).sum() if kl_grad else 0.0)
    loss.backward()
    assert kl.requires_grad == kl_grad and not ref_logps.requires_grad

    logits = twin(hidden_twin)
    log_p = torch.log_softmax(logits, -1)
    log_q = torch.log_softmax(ref_head(ref_hidden), -1)
    expected_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    expected = log_p.gather(-1, target[:, None]).squeeze(-1)
    ((expected * weights).sum() + ((expected_kl * kl_weights).sum() if kl_grad else 0.0)).backward()
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, expected_kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logps, log_q.gather(-1, target[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    assert (expected_kl > 0).all()  # two different random heads: a real divergence at every position
    torch.testing.assert_close(hidden.grad, hidden_twin.grad, atol=1e-5, rtol=1e-5)
    if not frozen:
        torch.testing.assert_close(head.weight.grad, twin.weight.grad, atol=1e-5, rtol=1e-5)
        if bias:
            torch.testing.assert_close(head.bias.grad, twin.bias.grad, atol=1e-5, rtol=1e-5)
    assert ref_head.weight.grad is None


# ----------------------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def batch(pair_batch):
    """The collated pairs of conftest.PAIRS."""
    return pair_batch[1]


def _policy_and_reference(kind: str):
    """A policy moved away from its reference: full fine-tuning against a frozen copy of the tiny model, or a
    LoRA policy (adapter moved off zero) against itself with the adapter disabled."""
    torch.manual_seed(0)
    if kind == "frozen":
        policy = load_causal_lm("tiny")
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(0.05 * torch.randn_like(param))
        return policy, FrozenReference(load_causal_lm("tiny", trainable=False))
    policy = load_causal_lm("tiny", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return policy, AdapterDisabledReference(policy)


def _full_logits_kl(policy, reference, batch):
    """Today's exact KL: both models' full logits -> (policy sums, reference sums, per-row KL sums)."""
    out = concatenated_forward(policy, batch, return_logits=True)
    ref_logits = reference.forward_logits(batch)
    counts = (batch["labels"][:, 1:] != -100).sum(-1)
    kl = per_token_kl(out["logits"], ref_logits, batch["labels"]) * counts
    sums = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    return sums, sequence_logps(ref_logits, batch["labels"])[0], kl


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["frozen", "lora"])
@pytest.mark.parametrize("layout", ["shared", "padded"])
def test_fast_kl_equals_the_full_logits_kl_values_and_gradients(batch, kind, layout, monkeypatch):
    policy, reference = _policy_and_reference(kind)
    monkeypatch.setattr(kl_module, "pair_layout", lambda model, batch: layout)
    weights = torch.tensor([1.0, -2.0, 0.5, 0.3, 0.3, -1.0])  # per row, on the summed log-probs
    policy.zero_grad(set_to_none=True)
    fast = pair_kl_forward(policy, reference, batch)
    ((fast.logps * weights).sum() + 0.7 * fast.kl.sum()).backward()
    fast_grads = _grads(policy)
    policy.zero_grad(set_to_none=True)
    sums, ref_sums, kl = _full_logits_kl(policy, reference, batch)
    ((sums * weights).sum() + 0.7 * kl.sum()).backward()
    plain_grads = _grads(policy)

    assert fast.counts.tolist() == (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    assert (kl > 0.05).all()  # the policy was moved: a real divergence on every row
    for got, expected in ((fast.kl, kl), (fast.logps, sums), (fast.ref_logps, ref_sums)):
        # within 1e-5 of the row's largest value: each KL_t sums p (log p - log q) over the vocabulary, so its
        # float32 round-off is ~1e-6 absolute whatever its size (a row's KL here: 0.07 to 1.8)
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert not fast.ref_logps.requires_grad
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert (fast_grads[name] - grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), name
    if kind == "lora":
        assert all("lora_" in name for name in plain_grads)  # the reference (the base) got no gradient


def test_measured_kl_carries_no_gradient(batch):
    policy, reference = _policy_and_reference("frozen")
    measured = pair_kl_forward(policy, reference, batch, kl_grad=False)
    assert measured.logps.requires_grad and not measured.kl.requires_grad
    with torch.no_grad():  # evaluation: nothing kept for a backward, same numbers
        evaluated = pair_kl_forward(policy, reference, batch)
    torch.testing.assert_close(evaluated.kl, measured.kl)
    torch.testing.assert_close(evaluated.logps, measured.logps.detach())


def test_a_fresh_lora_policy_has_a_kl_of_exactly_zero(batch):
    """lora_B starts at 0: the policy is its base, so both heads see bit-equal hidden states and logits."""
    policy = load_causal_lm("tiny", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    out = pair_kl_forward(policy, AdapterDisabledReference(policy), batch)
    assert out.kl.tolist() == [0.0] * 6
    torch.testing.assert_close(out.logps.detach(), out.ref_logps, atol=0, rtol=0)


def test_models_without_the_fast_path_get_none(batch):
    """The caller then computes the KL from full logits: a precomputed reference (no distributions), a model
    whose logits are post-processed (soft-capping: the plain layout), a head that is not a plain linear layer."""
    policy, reference = _policy_and_reference("frozen")
    assert pair_kl_forward(policy, PrecomputedReference(), batch) is None
    capped = load_causal_lm("tiny", trainable=False)
    capped.config.final_logit_softcapping = 30.0
    assert pair_kl_forward(policy, FrozenReference(capped), batch) is None

    class ScaledHead(torch.nn.Linear):
        pass

    odd = load_causal_lm("tiny", trainable=False)
    head = odd.get_output_embeddings()
    scaled = ScaledHead(head.in_features, head.out_features, bias=False)
    scaled.weight = head.weight
    odd.set_output_embeddings(scaled)
    assert pair_kl_forward(policy, FrozenReference(odd), batch) is None
    assert pair_kl_forward(odd, reference, batch) is None
