"""Log-probabilities of label tokens, per sequence, for preference pairs, and the exact per-token KL.

Conventions: ``labels`` is aligned with ``input_ids`` (Hugging Face style) with -100 on tokens that carry no
loss; the logits at position t predict the token at t + 1, so every function shifts by one. Per-token results
have shape (B, T - 1). Work over the vocabulary of full logits is done one sequence at a time, in float32, so the
extra memory is one (T, V) slice rather than another (B, T, V) tensor (each row is already a large vectorised
op, so batching rows would add a (B, T, V) temporary for no speed: timings in docs/benchmarks/performance.md).

``concatenated_forward`` (the pair trainers' forward) never builds the (2B, T, V) logits. Its ``score plan``
(``data.score_plan``; ``PairCollator`` builds it on the CPU, so the step needs no host-device sync) lists the
positions whose next token is a label, and the LM head runs on those hidden states only, in chunks of tokens,
with a fused log-softmax (``_LinearHeadLogps``): prompt and padding positions never reach the (V-wide) head.
Its backward costs no second logits product: a frozen head (LoRA) gets d log p / d h = W[target] - p @ W in the
forward, a trained head keeps the softmax when it fits ``PROBS_ELEMENTS`` (else recomputes each chunk). Two
layouts of the backbone's input:

- ``shared``: one row per pair, ``prompt + chosen response + rejected response``, position ids restarting at the
  end of the prompt for the rejected response and a 4-D attention mask that hides the chosen response from the
  rejected one: the prompt goes through the model once per pair instead of twice. Needs sdpa or eager attention
  and no sliding window.
- ``padded``: the (2B, T) batch as collated (chosen rows, then rejected rows).

Both give the full forward's numbers up to float round-off. ``pair_layout`` picks one per model, once, after a
self-check against the plain full-logits forward on two pairs of the first batch (``plain`` if neither agrees,
e.g. for a model whose forward post-processes its logits). A vision-language model always takes the plain
forward (``IMAGE_KEYS`` of the batch passed through): the fast layouts rebuild the rows from ``input_ids`` alone
(the shared layout's one-row-per-pair positions and 4-D mask would misplace the image tokens and multimodal
position ids, and the self-check would need the pixels too), so they are not tried. ``scored_forward`` takes another scorer for the
head: ``models/kl.py`` computes the exact KL between a policy and its reference that way (``per_token_kl``
below is the plain forward's). GRPO packs the G answers of a prompt the same way (``rollout.batch``'s
``shared_prompt_plan``) and scores them through ``score_positions`` / ``shared_inputs``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from humanalign.data.score_plan import PLAN_KEY, score_plan
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.models.pretrained import is_peft_model

LAYOUTS = ("shared", "padded", "plain")
LAYOUT_NOTES = {
    "shared": "one row per pair (the prompt once, 4-D mask), LM head on response tokens only",
    "padded": "chosen and rejected rows, LM head on response tokens only",
    "plain": "chosen and rejected rows, full logits",
}
# Per-image and extra per-token inputs of a vision-language batch (``data.vision_collate``), passed to the model
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask", "mm_token_type_ids")
_LAYOUT_ATTR = "_humanalign_pair_layout"  # the self-check's decision, kept on the Hugging Face model
HEAD_CHUNK_ELEMENTS = 1 << 24  # tokens x vocabulary per head chunk: 64 MiB of float32 logits
PROBS_ELEMENTS = 1 << 26  # a trained head keeps the softmax for its backward up to this size (256 MiB float32)


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    next_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    return next_logits, targets.masked_fill(~mask, 0), mask


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_{t+1} | prefix) for every position: (B, T, V), (B, T) -> (B, T-1), 0 where there is no label.

    Computed as the gathered logit minus the log-sum-exp of its row, one sequence at a time in float32, which
    avoids materialising a full log-softmax tensor.
    """
    next_logits, targets, mask = _shift(logits, labels)
    rows = []
    for row_logits, row_targets in zip(next_logits, targets):  # (T-1, V), (T-1,)
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)  # (T-1,)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    logps = torch.stack(rows) if rows else next_logits.new_zeros(targets.shape, dtype=torch.float32)
    return logps * mask  # (B, T-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean, if ``average``) of the label tokens' log-probs per sequence, and their counts: (B,), (B,).

    A sequence with no label token gets 0 (sum and mean) and count 0.
    """
    per_token = token_logps(logits, labels)  # (B, T-1)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)  # (B,) long
    total = per_token.sum(-1)  # (B,)
    if average:
        total = total / counts.clamp(min=1)
    return total, counts


def image_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's image inputs (``IMAGE_KEYS`` present), to pass to a vision-language model's forward."""
    return {key: batch[key] for key in IMAGE_KEYS if batch.get(key) is not None}


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **images: torch.Tensor) -> torch.Tensor:
    """The model's logits (B, T, V) for a right-padded batch (no KV cache kept); ``images``: ``image_inputs``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **images)
    return out.logits


def batch_logps(model, batch: dict[str, torch.Tensor], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward a collated {"input_ids", "attention_mask", "labels"} batch -> (log-probs (B,), token counts (B,))."""
    logits = forward_logits(model, batch["input_ids"], batch.get("attention_mask"))
    return sequence_logps(logits, batch["labels"], average=average)


# --------------------------------------------------------------------------------------------- the scoring head


class _LinearHeadLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target] for (N, H) hidden states, in token chunks, never holding the
    (N, V) logits at once. Also returns each token's logit sum (no gradient), for the mean-logit diagnostics.

    What the backward needs is prepared by ``keep``: "direction" (a frozen head, e.g. under LoRA: only the
    hidden states need a gradient, d log p / d h = W[target] - p @ W, an (N, H) tensor computed here, so the
    backward is a product), "probs" (the softmax, (N, V) float32, kept when it fits ``PROBS_ELEMENTS``, so the
    backward needs no second logits product), "recompute" (the backward recomputes each chunk's logits), or
    "none" (no gradient: a reference forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk: int, keep: str):
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=device)
        logit_sums = torch.empty_like(logps)
        log_z = torch.empty_like(logps)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        direction = torch.empty(hidden.shape, dtype=torch.float32, device=device) if keep == "direction" else None
        probs = torch.empty(n, w.shape[0], dtype=torch.float32, device=device) if keep == "probs" else None
        with torch.autocast(device.type, enabled=False):
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                t = target[lo:hi]
                z = _logits(hidden[lo:hi].to(dtype), w, b)  # (n, V) float32
                logit_sums[lo:hi] = z.sum(-1)
                picked = z.gather(-1, t.unsqueeze(-1)).squeeze(-1)
                top = z.amax(-1)
                total = z.sub_(top.unsqueeze(-1)).exp_().sum(-1)  # z now holds exp(z - max)
                log_z[lo:hi] = top + total.log()
                logps[lo:hi] = picked - log_z[lo:hi]
                if direction is not None or probs is not None:
                    z.div_(total.unsqueeze(-1))  # the softmax
                if direction is not None:
                    direction[lo:hi] = w[t].float() - (z.to(dtype) @ w).float()
                if probs is not None:
                    probs[lo:hi] = z
        ctx.save_for_backward(hidden, weight, bias, target, log_z, direction, probs)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(logit_sums)
        return logps, logit_sums

    @staticmethod
    def backward(ctx, grad_logps, _grad_sums):
        hidden, weight, bias, target, log_z, direction, probs = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, chunk, n = ctx.dtype, ctx.chunk, hidden.shape[0]
        g = grad_logps.float()
        if direction is not None:  # a frozen head: the gradient reaches the hidden states only
            grad = (direction * g.unsqueeze(-1)).to(hidden.dtype) if need_hidden else None
            return grad, None, None, None, None, None
        grads = _HeadGrads(hidden, weight, bias, (need_hidden, need_weight, need_bias))
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                h = hidden[lo:hi].to(dtype)
                gc = g[lo:hi].unsqueeze(-1)
                # d log p_target / d z_v = 1[v = target] - p_v, scaled by the incoming gradient
                if probs is not None:
                    grad_z = probs[lo:hi] * -gc
                else:
                    grad_z = _logits(h, w, b).sub_(log_z[lo:hi].unsqueeze(-1)).exp_().mul_(-gc)
                grad_z.scatter_add_(-1, target[lo:hi].unsqueeze(-1), gc)
                grads.add(grad_z.to(dtype), h, w, lo, hi)
        return (*grads.result(), None, None, None)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    return z.float()


def head_backward_plan(head: torch.nn.Linear, hidden: torch.Tensor, vocab: int, tables: int = 1) -> str:
    """What a fused linear-head forward keeps for its backward: "none" (no gradient wanted), "direction" (a
    frozen head: the (N, H) gradient direction only), "probs" (``tables`` (N, V) float32 tables, while they fit
    in ``PROBS_ELEMENTS``) or "recompute" (the logits again, chunk by chunk, in the backward)."""
    weights_grad = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weights_grad):
        return "none"
    if not weights_grad:
        return "direction"
    return "probs" if hidden.shape[0] * vocab * tables <= PROBS_ELEMENTS else "recompute"


class _HeadGrads:
    """The gradients of a linear head's inputs (hidden states, weight, bias), summed in float32 chunk by chunk
    from d loss / d logits; None for what needs no gradient. Shared by the fused log-prob and KL backwards."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs) -> None:
        def zeros(t, need):
            return torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None

        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.grad_hidden, self.grad_weight, self.grad_bias = (zeros(hidden, needs[0]), zeros(weight, needs[1]),
                                                              zeros(bias, needs[2]))

    def add(self, grad_z: torch.Tensor, h: torch.Tensor, w: torch.Tensor, lo: int, hi: int) -> None:
        """Chunk rows lo:hi: grad_z (n, V) = d loss / d logits, h (n, H) its hidden states, w (V, H) the head."""
        if self.grad_hidden is not None:
            self.grad_hidden[lo:hi] = (grad_z @ w).float()
        if self.grad_weight is not None:
            self.grad_weight += (grad_z.t() @ h).float()
        if self.grad_bias is not None:
            self.grad_bias += grad_z.float().sum(0)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return tuple(None if g is None else g.to(t.dtype)  # type: ignore[return-value]
                     for g, t in ((self.grad_hidden, self.hidden), (self.grad_weight, self.weight),
                                  (self.grad_bias, self.bias)))


def _module_chunk(head, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = head(hidden).float()  # (n, V)
    picked = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1), z.detach().sum(-1)


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor, forward=None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N, H) hidden states, (N,) targets -> (log-probs (N,) float32, logit sums (N,) detached, vocabulary size).

    A plain ``nn.Linear`` head goes through ``_LinearHeadLogps``; any other head (a LoRA-wrapped or quantised
    one) is called per chunk (``forward``: its original forward), under activation checkpointing."""
    vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
    chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    if type(head) is torch.nn.Linear:
        keep = head_backward_plan(head, hidden, vocab)
        logps, sums = _LinearHeadLogps.apply(hidden, head.weight, head.bias, target, chunk, keep)
        return logps, sums, vocab
    call = forward or head
    parts = []
    for lo in range(0, hidden.shape[0], chunk):
        h, t = hidden[lo:lo + chunk], target[lo:lo + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(_module_chunk, call, h, t, use_reentrant=False))
        else:
            parts.append(_module_chunk(call, h, t))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0, hidden.new_zeros(0), vocab
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), vocab


# --------------------------------------------------------------------------------------------- the model


def _unwrap(model) -> tuple[Any, bool]:
    """(the Hugging Face model inside DDP / PEFT wrappers, whether the fast path may run on it). FSDP and
    DeepSpeed shard the head's weight, so they keep the plain forward."""
    inner, supported = model, True
    for _ in range(8):
        kind = type(inner).__name__
        if kind in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            supported = False
        if is_peft_model(inner):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP and the like
            inner = inner.module
        else:
            break
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "get_output_embeddings") or inner.get_output_embeddings() is None:
        return inner, False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaled = any(getattr(text, key, None) not in (None, 1, 1.0) for key in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    weight = getattr(inner.get_output_embeddings(), "weight", None)
    sharded = weight is not None and type(weight).__name__ == "DTensor"
    return inner, supported and not scaled and not sharded


def shared_layout_possible(model) -> bool:
    """Whether ``model`` can take the shared-prompt layout, judged from its type and config alone (the
    self-check of ``pair_layout`` still has the last word): picks the lengths to group batches by."""
    hf, supported = _unwrap(model)
    return supported and _shared_supported(hf) and not is_vision_language(hf)


def is_vision_language(hf) -> bool:
    """Whether a (unwrapped) Hugging Face model takes images: its config has a vision config."""
    return getattr(getattr(hf, "config", None), "vision_config", None) is not None


def _shared_supported(hf) -> bool:
    text = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    layer_types = getattr(text, "layer_types", None) or ()
    return (getattr(hf.config, "_attn_implementation", None) in ("sdpa", "eager") and not sliding
            and "sliding_attention" not in layer_types)


def right_padded_mask(model, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to pass a causal decoder for a right-padded batch: its (B, T) padding mask as the 4-D mask
    transformers uses as is, (B, 1, T, T) bool (True: may attend; additive in the model's dtype for eager), each
    query seeing the real keys up to it and itself. transformers checks a 2-D mask on the host
    (``padding_mask.all()``) and, without a mask, the position ids for packed rows: a GPU sync per forward either
    way. Only sdpa and eager without sliding windows take such a mask (as for the shared layout); other models
    (flash / flex attention, sliding windows, sharded wrappers) get the 2-D mask, and keep that sync."""
    inner = model
    for _ in range(8):  # DDP / DeepSpeed / PEFT wrappers
        if is_peft_model(inner):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
    if attention_mask is None or attention_mask.ndim != 2 or not _shared_supported(inner):
        return attention_mask
    width = attention_mask.shape[1]
    pos = torch.arange(width, device=attention_mask.device)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # (T, T) query row may see key column
    mask = (causal & attention_mask.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool,
                                                                    device=attention_mask.device)  # (B, T, T)
    mask = mask.unsqueeze(1)  # (B, 1, T, T)
    if inner.config._attn_implementation == "eager":  # eager adds the mask to its scores
        dtype = inner.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def takes_4d_mask(model) -> bool:
    """Whether ``model`` (a Hugging Face model, possibly inside DDP / DeepSpeed / PEFT wrappers) takes a 4-D
    attention mask of our own making: sdpa or eager attention without sliding windows (``_shared_supported``),
    as ``right_padded_mask`` and the shared-prompt layout need."""
    inner = model
    for _ in range(8):
        if is_peft_model(inner):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
    return getattr(inner, "config", None) is not None and _shared_supported(inner)


@contextlib.contextmanager
def _scoring_head(hf, index: torch.Tensor, target: torch.Tensor, scorer=None) -> Iterator[dict[str, Any]]:
    """While active, the model's LM head scores the positions ``index`` of its (R, L, H) input instead of
    computing logits; the results land in the yielded dict. The head module is called as usual (its hooks run:
    devices, autocast), only its forward is replaced. ``scorer(head, picked, target, forward)`` -> dict (with
    ``logps``) replaces ``head_logps`` (e.g. the fused log-probs and KL of ``models/kl.py``)."""
    head = hf.get_output_embeddings()
    original = head.forward
    own = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) to put back
    result: dict[str, Any] = {}

    def score(hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
        if scorer is not None:
            result.update(scorer(head, picked, target, original))
        else:
            logps, sums, vocab = head_logps(head, picked, target, forward=original)
            result.update(logps=logps, sums=sums, vocab=vocab)
        return result["logps"]

    head.forward = score
    try:
        yield result
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _plan_for(batch: Mapping[str, Any], layout: str) -> dict[str, torch.Tensor]:
    plans = batch.get(PLAN_KEY)
    if plans is None or layout not in plans:  # a batch from collate_pairs: plan it here (a host sync on a GPU)
        device = batch["input_ids"].device
        mask = batch.get("attention_mask")
        plans = score_plan(batch["input_ids"].cpu(), batch["labels"].cpu(), None if mask is None else mask.cpu(),
                           shared=layout == "shared")
        plans = {name: {k: v.to(device) for k, v in plan.items()} for name, plan in plans.items()}
    return plans[layout]


def scored_forward(model, batch: Mapping[str, Any], layout: str = "padded", scorer=None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One forward of ``model`` in ``layout`` "shared" or "padded" with its LM head replaced by the scoring
    head (``scorer``: see ``_scoring_head``): (the scorer's results, one value per scored position, and the
    layout's plan, whose ``dense`` places them in the (2B, T - 1) grid of the shifted labels)."""
    hf, _ = _unwrap(model)
    plan = _plan_for(batch, layout)
    if layout == "shared":
        inputs = shared_inputs(hf, plan)
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    with _scoring_head(hf, plan["index"], plan["target"], scorer) as result:
        model(**inputs, use_cache=False)
    return result, plan


def shared_inputs(model, plan: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shared-prompt plan's model inputs (``input_ids``, ``position_ids``, ``attention_mask``): its (B, 1, L, L)
    boolean mask as is for sdpa, additive in the model's dtype for eager attention (which adds it to its scores)."""
    hf, _ = _unwrap(model)
    mask = plan["attention_mask"]
    if hf.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=hf.dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(hf.dtype).min)
    return {"input_ids": plan["input_ids"], "position_ids": plan["position_ids"], "attention_mask": mask}


def score_positions(call, model, index: torch.Tensor, target: torch.Tensor, scorer=None) -> dict[str, Any]:
    """Run ``call()`` (a forward of ``model``, possibly through a wrapper such as DDP) with ``model``'s LM head
    scoring the flattened positions ``index`` against ``target`` instead of computing logits: the scorer's
    results (``head_logps``'s ``logps`` / ``sums`` / ``vocab`` without ``scorer``; see ``_scoring_head``)."""
    hf, _ = _unwrap(model)
    with _scoring_head(hf, index, target, scorer) as result:
        call()
    return result


def row_sums(values: torch.Tensor, plan: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per scored position values (N,) -> their sum over each row of the (2B, T) batch: (2B,) (0 for a row
    without labels); differentiable."""
    rows, width = labels.shape
    grid = values.new_zeros(rows * (width - 1)).scatter(0, plan["dense"], values)
    return grid.view(rows, width - 1).sum(-1)


def scored_logps(model, batch: Mapping[str, Any], layout: str = "padded") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the label tokens (2B, T - 1) (0 elsewhere) and each row's mean logit over its
    label positions (2B,) (detached), through the scoring head in ``layout`` "shared" or "padded"."""
    result, plan = scored_forward(model, batch, layout)
    labels = batch["labels"]
    rows, width = labels.shape
    per_token = result["logps"].new_zeros(rows * (width - 1)).scatter(0, plan["dense"], result["logps"])
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    sums = row_sums(result["sums"], plan, labels)
    return per_token.view(rows, width - 1), sums / (counts.clamp(min=1) * result["vocab"])


def _sub_batch(batch: Mapping[str, Any], pairs: int) -> dict[str, torch.Tensor]:
    half = batch["input_ids"].shape[0] // 2
    rows = list(range(min(pairs, half))) + list(range(half, half + min(pairs, half)))
    sub = {k: batch[k][rows] for k in ("input_ids", "labels", "attention_mask") if batch.get(k) is not None}
    width = int(sub["attention_mask"].sum(-1).max()) if "attention_mask" in sub else sub["input_ids"].shape[1]
    return {k: v[:, :width] for k, v in sub.items()}


@torch.no_grad()
def pair_layout(model, batch: Mapping[str, Any]) -> str:
    """The layout ``concatenated_forward`` uses for ``model``: decided once (kept on the model) by comparing the
    fast layouts with the plain full-logits forward on two pairs of ``batch``, in eval mode (no dropout, so no
    random numbers are drawn)."""
    hf, supported = _unwrap(model)
    if not supported or is_vision_language(hf) or image_inputs(batch):
        return "plain"  # images: the fast layouts do not apply (see the module docstring)
    decided = hf.__dict__.get(_LAYOUT_ATTR)
    if decided is not None:
        return decided
    sub = _sub_batch(batch, 2)
    was_training = model.training
    model.eval()
    try:
        logits = forward_logits(model, sub["input_ids"], sub.get("attention_mask"))
        expected, _ = sequence_logps(logits, sub["labels"])  # (4,)
        tolerance = 1e-3 if logits.dtype == torch.float32 else 5e-2
        decided = "plain"
        for layout in ("shared", "padded") if _shared_supported(hf) else ("padded",):
            got = scored_logps(model, sub, layout)[0].sum(-1)
            if ((got - expected).abs() <= tolerance * expected.abs().clamp(min=1)).all():
                decided = layout
                break
    finally:
        model.train(was_training)
    if decided != "shared":
        warnings.warn(f"{type(hf).__name__}: the pair forward uses the {decided} layout (the faster layouts did not "
                      "reproduce the model's own log-probs)", stacklevel=2)
    hf.__dict__[_LAYOUT_ATTR] = decided
    return decided


def concatenated_forward(
    model, batch: dict[str, Any], average: bool = False, return_logits: bool = False, layout: str = "auto"
) -> dict[str, torch.Tensor]:
    """One forward over a ``collate_pairs`` batch (2B, T): chosen rows first, then rejected rows.

    Returns, each (B,): ``chosen_logps`` / ``rejected_logps`` (sum over response tokens, or mean if
    ``average``), ``chosen_mean_logps`` / ``rejected_mean_logps`` (always the mean, e.g. for an SFT/NLL term),
    ``chosen_token_counts`` / ``rejected_token_counts``, ``chosen_logits_mean`` / ``rejected_logits_mean``
    (mean logit over response positions, a detached diagnostic); plus ``logits`` (2B, T, V) if asked (which
    needs the plain layout). ``layout``: "auto" (``pair_layout``), "shared", "padded" or "plain".
    """
    input_ids, labels = batch["input_ids"], batch["labels"]  # (2B, T)
    if input_ids.shape[0] % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen then rejected), got {input_ids.shape[0]}")
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"layout must be one of {LAYOUTS} or 'auto', got {layout!r}")
    if return_logits:
        layout = "plain"
    elif layout == "auto":
        layout = pair_layout(model, batch)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)  # (2B,)
    logits = None
    if image_inputs(batch) and layout != "plain":
        raise ValueError(f"a batch with images takes the plain layout, not {layout!r}")
    if layout == "plain":
        logits = forward_logits(model, input_ids, batch.get("attention_mask"), **image_inputs(batch))  # (2B, T, V)
        sums, _ = sequence_logps(logits, labels)  # (2B,)
        with torch.no_grad():
            response = (labels[:, 1:] != IGNORE_INDEX).unsqueeze(-1)  # (2B, T-1, 1)
            logit_sums = (logits[:, :-1, :].float() * response).sum(dim=(1, 2))
            logits_mean = logit_sums / (counts.clamp(min=1) * logits.shape[-1])  # (2B,)
    else:
        per_token, logits_mean = scored_logps(model, batch, layout)  # (2B, T-1), (2B,)
        sums = per_token.sum(-1)
    means = sums / counts.clamp(min=1)
    picked = means if average else sums
    b = input_ids.shape[0] // 2
    out = {
        "chosen_logps": picked[:b], "rejected_logps": picked[b:],
        "chosen_mean_logps": means[:b], "rejected_mean_logps": means[b:],
        "chosen_token_counts": counts[:b], "rejected_token_counts": counts[b:],
        "chosen_logits_mean": logits_mean[:b], "rejected_logits_mean": logits_mean[b:],
    }
    if return_logits:
        out["logits"] = logits
    return out


def per_token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over response positions of the exact KL(pi || pi_ref) of the next-token distributions: (B,).

    KL_t = sum_v pi(v | x_<t) * (log pi(v | x_<t) - log pi_ref(v | x_<t)), at every position whose next token
    has a label; differentiable through ``policy_logits``. A sequence with no label token gets 0.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"policy {tuple(policy_logits.shape)} and reference {tuple(ref_logits.shape)} logits differ")
    policy_next, _, mask = _shift(policy_logits, labels)
    ref_next = ref_logits[:, :-1, :]
    rows = []
    for pol, ref in zip(policy_next, ref_next):  # (T-1, V) each
        log_p = torch.log_softmax(pol.float(), dim=-1)
        log_q = torch.log_softmax(ref.float(), dim=-1)
        rows.append((log_p.exp() * (log_p - log_q)).sum(-1))  # (T-1,)
    kl = torch.stack(rows) * mask  # (B, T-1)
    return kl.sum(-1) / mask.sum(-1).clamp(min=1)


__all__ = [
    "LAYOUTS", "LAYOUT_NOTES", "IMAGE_KEYS", "image_inputs", "is_vision_language", "token_logps", "sequence_logps", "forward_logits", "batch_logps",
    "head_logps", "scored_forward", "shared_inputs", "score_positions", "row_sums", "scored_logps", "pair_layout",
    "shared_layout_possible",
    "concatenated_forward", "per_token_kl", "right_padded_mask", "takes_4d_mask",
]
