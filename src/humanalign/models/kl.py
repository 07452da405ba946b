"""The exact per-token KL(pi || pi_ref) between a policy and its reference on the pair trainers' fast forward.

KL_t = sum_v p_v (log p_v - log q_v), with p the policy's and q the reference's next-token distribution at a
position t whose next token is a response label (Safe-MM-DPO's KL term, docs/algorithms/safe_mm_dpo.md).
``per_token_kl`` (``models/logprobs.py``) computes it from both models' full (2B, T, V) logits, which needs the
plain forward of both: the LM head at every position, prompt and padding included, and two (2B, T, V) tensors.
Here the KL comes out of the same fast forward as the log-probs (``scored_forward``: the prompt once per pair,
the LM head on the scored positions only):

1. the reference's forward (no gradient, in its own fast layout) with its LM head replaced by a capture of the
   final hidden states at the scored positions, (N, H): the reference's head does not run there;
2. the policy's forward with its LM head replaced by ``linear_head_kl``, which applies both heads to chunks of
   positions and gives, per position, the policy's and the reference's log-prob of the label and KL_t, never
   holding more than a chunk of either model's (N, V) logits.

Both layouts list the scored positions in the same order (``score_plan``: row-major over the labels), so the
two (N, H) tensors line up whichever fast layout each model takes. The gradient reaches the policy only:
d KL_t / d z_v = p_v ((log p_v - log q_v) - KL_t) and d log p_label / d z_v = 1[v = label] - p_v (z: the
policy's logits), and the backward reuses what the forward prepared, as ``_LinearHeadLogps``'s does (no second
logits product unless the kept tensors would exceed ``PROBS_ELEMENTS``). Per chunk, the forward holds about
three (n, V) float32 tensors (n = ``HEAD_CHUNK_ELEMENTS`` / V positions).

Where either model keeps the plain forward (``pair_layout`` says "plain": FSDP / DeepSpeed, logit soft-capping
and other post-processed logits, a failed self-check) or its LM head is not a plain ``nn.Linear`` (a LoRA-wrapped
or quantised head), ``pair_kl_forward`` returns None and the caller uses the full-logits KL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.models import logprobs
from humanalign.models.logprobs import _HeadGrads, _logits, _unwrap, pair_layout, row_sums, scored_forward
from humanalign.models.reference import AdapterDisabledReference, FrozenReference


class _LinearHeadKL(torch.autograd.Function):
    """For (N, H) policy and reference hidden states at the same positions and the labels there: the policy's
    log-prob of each label, KL(p || q) per position and the reference's log-prob of each label (no gradient),
    in chunks of positions.

    With z and z' the two models' logits and A, A' their log-partitions, log p - log q = (z - z') - (A - A'),
    so KL = p . (z - z') - (A - A') and d KL / d z = p ((z - z') - p . (z - z')): neither model's log-softmax
    is formed, and each chunk costs a few passes over two (n, V) tensors. ``keep`` prepares the backward as
    ``_LinearHeadLogps`` does: "direction" (a frozen policy head: the (N, H) gradients d log p / d h =
    W[label] - p W and d KL / d h = (d KL / d z) W are computed in the forward), "probs" (a trained head: p and
    d KL / d z, (N, V) float32 each, kept when they fit ``PROBS_ELEMENTS``), "recompute" (the backward
    recomputes both models' logits per chunk) or "none"."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, target, chunk: int, keep: str,
                kl_grad: bool):
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        logps, kl, ref_logps, log_z, p_dot_diff = (torch.empty(n, dtype=torch.float32, device=device)
                                                  for _ in range(5))
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        w_ref, b_ref = ref_weight.to(dtype), None if ref_bias is None else ref_bias.to(dtype)
        direction = kl_direction = probs = kl_probs = None
        if keep == "direction":
            direction = torch.empty(hidden.shape, dtype=torch.float32, device=device)
            kl_direction = torch.empty_like(direction) if kl_grad else None
        elif keep == "probs":
            probs = torch.empty(n, vocab, dtype=torch.float32, device=device)
            kl_probs = torch.empty_like(probs) if kl_grad else None
        with torch.autocast(device.type, enabled=False):
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                t = target[lo:hi].unsqueeze(-1)
                z = _logits(hidden[lo:hi].to(dtype), w, b)  # (n, V) float32
                z_ref = _logits(ref_hidden[lo:hi].to(dtype), w_ref, b_ref)
                top = z.amax(-1, keepdim=True)
                p = torch.sub(z, top, out=probs[lo:hi] if probs is not None else None).exp_()
                total = p.sum(-1, keepdim=True)
                p.div_(total)
                log_z[lo:hi] = (top + total.log()).squeeze(-1)
                # the log-partition as for z (not logsumexp): equal logits give bit-equal values, a KL of exactly 0
                top_ref = z_ref.amax(-1, keepdim=True)
                ref_log_z = (top_ref + torch.sub(z_ref, top_ref).exp_().sum(-1, keepdim=True).log()).squeeze(-1)
                logps[lo:hi] = z.gather(-1, t).squeeze(-1) - log_z[lo:hi]
                ref_logps[lo:hi] = z_ref.gather(-1, t).squeeze(-1) - ref_log_z
                diff = torch.sub(z, z_ref, out=z_ref)  # z - z', in z_ref's memory
                p_dot_diff[lo:hi] = torch.einsum("nv,nv->n", p, diff)
                kl[lo:hi] = p_dot_diff[lo:hi] - log_z[lo:hi] + ref_log_z
                if keep in ("direction", "probs") and kl_grad:  # d KL / d z = p ((z - z') - p . (z - z'))
                    out = kl_probs[lo:hi] if kl_probs is not None else diff
                    torch.sub(diff, p_dot_diff[lo:hi].unsqueeze(-1), out=out).mul_(p)
                    if keep == "direction":
                        kl_direction[lo:hi] = (out.to(dtype) @ w).float()
                if keep == "direction":
                    direction[lo:hi] = w[target[lo:hi]].float() - (p.to(dtype) @ w).float()
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, target, log_z, p_dot_diff,
                              direction, kl_direction, probs, kl_probs)
        ctx.chunk, ctx.dtype, ctx.kl_grad = chunk, dtype, kl_grad
        ctx.mark_non_differentiable(ref_logps, *(() if kl_grad else (kl,)))  # one call: a second replaces it
        return logps, kl, ref_logps

    @staticmethod
    def backward(ctx, grad_logps, grad_kl, _grad_ref):
        (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, target, log_z, p_dot_diff,
         direction, kl_direction, probs, kl_probs) = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        nothing = (None,) * 7  # ref_hidden, ref_weight, ref_bias, target, chunk, keep, kl_grad
        g_lp = grad_logps.float().unsqueeze(-1)  # (N, 1)
        g_kl = grad_kl.float().unsqueeze(-1) if ctx.kl_grad and grad_kl is not None else None
        if direction is not None:  # a frozen head: the gradient reaches the hidden states only
            grad = direction * g_lp
            if g_kl is not None:
                grad.addcmul_(kl_direction, g_kl)
            return (grad.to(hidden.dtype) if need_hidden else None, None, None, *nothing)
        dtype, chunk, n = ctx.dtype, ctx.chunk, hidden.shape[0]
        grads = _HeadGrads(hidden, weight, bias, (need_hidden, need_weight, need_bias))
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        w_ref, b_ref = ref_weight.to(dtype), None if ref_bias is None else ref_bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                h = hidden[lo:hi].to(dtype)
                if probs is not None:
                    p, d_kl = probs[lo:hi], kl_probs[lo:hi] if g_kl is not None else None
                else:  # recompute both models' logits
                    z = _logits(h, w, b)
                    p = torch.sub(z, log_z[lo:hi].unsqueeze(-1)).exp_()
                    d_kl = None
                    if g_kl is not None:
                        d_kl = torch.sub(z, _logits(ref_hidden[lo:hi].to(dtype), w_ref, b_ref), out=z)
                        d_kl.sub_(p_dot_diff[lo:hi].unsqueeze(-1)).mul_(p)
                # d loss / d z = g_lp (1[v = label] - p) + g_kl d KL / d z
                grad_z = p * -g_lp[lo:hi]
                if d_kl is not None:
                    grad_z.addcmul_(d_kl, g_kl[lo:hi])
                grad_z.scatter_add_(-1, target[lo:hi].unsqueeze(-1), g_lp[lo:hi])
                grads.add(grad_z.to(dtype), h, w, lo, hi)
        return (*grads.result(), *nothing)


def linear_head_kl(head: torch.nn.Linear, hidden: torch.Tensor, ref_head: torch.nn.Linear, ref_hidden: torch.Tensor,
                   target: torch.Tensor, kl_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's head on (N, H) ``hidden`` and the reference's on (N, H) ``ref_hidden`` (the same positions),
    ``target`` (N,) the labels there -> (policy log-prob of the label (N,), KL(pi || pi_ref) (N,), reference
    log-prob of the label (N,)), float32. Only the policy's side is differentiable, and the KL only with
    ``kl_grad`` (else it is a measurement). In chunks of ``HEAD_CHUNK_ELEMENTS`` logits per model; a trained
    head keeps p and d KL / d z for its backward up to ``PROBS_ELEMENTS`` values in all (else recomputes)."""
    vocab = head.weight.shape[0]
    if ref_head.weight.shape[0] != vocab:
        raise ValueError(f"the policy's vocabulary ({vocab}) and the reference's ({ref_head.weight.shape[0]}) differ")
    chunk = max(1, logprobs.HEAD_CHUNK_ELEMENTS // vocab)
    keep = logprobs.head_backward_plan(head, hidden, vocab, tables=2 if kl_grad else 1)  # p, and d KL / d z
    ref_bias = None if ref_head.bias is None else ref_head.bias.detach()
    return _LinearHeadKL.apply(hidden, head.weight, head.bias, ref_hidden.detach(), ref_head.weight.detach(),
                               ref_bias, target, chunk, keep, kl_grad)


# --------------------------------------------------------------------------------------------- two models


class PairKL(NamedTuple):
    """What ``pair_kl_forward`` gives for a (2B, T) pair batch, per row (2B,)."""

    logps: torch.Tensor  # the policy's log-probs summed over the row's response tokens, differentiable
    ref_logps: torch.Tensor  # the reference's, detached
    kl: torch.Tensor  # KL(pi || pi_ref) summed over the row's response positions (differentiable with kl_grad)
    counts: torch.Tensor  # response tokens of the row


@contextlib.contextmanager
def reference_scope(reference) -> Iterator[Any]:
    """The model that computes ``reference``'s numbers, under no_grad (for adapter-disabled: the policy with its
    adapter off, in eval mode); None for a reference that keeps no model (precomputed)."""
    if isinstance(reference, AdapterDisabledReference):
        with reference.base_model() as base:
            yield base
    elif isinstance(reference, FrozenReference):
        with torch.no_grad():
            yield reference.model
    else:
        yield None


def _linear_head(model) -> torch.nn.Linear | None:
    head = _unwrap(model)[0].get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


def pair_kl_forward(model, reference, batch: Mapping[str, Any], kl_grad: bool = True) -> PairKL | None:
    """The policy's and the reference's summed log-probs and the exact KL of a pair batch (``PairCollator`` /
    ``JointCollator``) from one fast forward of each model, or None where either needs the plain forward."""
    with reference_scope(reference) as ref_model:
        if ref_model is None or _linear_head(ref_model) is None:
            return None
        ref_layout = pair_layout(ref_model, batch)
    layout = pair_layout(model, batch)
    if "plain" in (layout, ref_layout) or _linear_head(model) is None:
        return None

    captured: dict[str, Any] = {}

    def capture(head, picked, target, forward) -> dict[str, Any]:  # the reference's head: keep its input only
        captured.update(hidden=picked.detach(), head=head)
        return {"logps": picked}

    with reference_scope(reference) as ref_model:
        scored_forward(ref_model, batch, ref_layout, scorer=capture)

    def fused(head, picked, target, forward) -> dict[str, Any]:
        logps, kl, ref_logps = linear_head_kl(head, picked, captured["head"], captured["hidden"], target, kl_grad)
        return {"logps": logps, "kl": kl, "ref_logps": ref_logps}

    result, plan = scored_forward(model, batch, layout, scorer=fused)
    labels = batch["labels"]
    return PairKL(row_sums(result["logps"], plan, labels), row_sums(result["ref_logps"], plan, labels),
                  row_sums(result["kl"], plan, labels), (labels[:, 1:] != IGNORE_INDEX).sum(-1))


__all__ = ["linear_head_kl", "PairKL", "reference_scope", "pair_kl_forward"]
