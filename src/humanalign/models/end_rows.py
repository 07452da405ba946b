"""The last decoder layer computed at a few rows only: a score model's end tokens.

A score model reads one hidden state per sequence, the last token's. Every layer but the last must run at every
position (later positions attend to them), but the last layer's output is read only at the end tokens: its keys
and values are needed at every position, its queries, attention, output projection and MLP only at the ends.
On the shared-prompt rows of a pair batch (``data.score_rows``: 2 ends per row of ~300 tokens) that removes
nearly all of one layer's work, forward and backward: about a third of a 2-layer model, 1/L of an L-layer one.

``ends_only(backbone, positions)`` swaps the last layer's forward, while active, for ``_end_rows_forward``: the
layer's own modules (norms, projections, rotary embedding, the model's attention function, MLP) applied to the
end rows, so LoRA adapters and the layer's hooks (DDP, autocast) run as usual. The backbone then returns
(B, E, H): its final norm applied to those rows only. Exact up to float round-off (the same sums in another order).

Supported: decoders laid out as Llama's (``LAYOUTS``: pre-norm layer, ``q/k/v/o_proj`` attention with optional
q/k norms, rotary embeddings passed by the model). The caller checks the result against the plain forward once
(``trainers.reward.pick_pair_layout``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")  # model types whose decoder layer is Llama's, checked by tests


def end_rows_refusal(backbone: nn.Module) -> str | None:
    """Why ``ends_only`` cannot run on ``backbone`` (a ``*Model`` decoder), or None when it can."""
    config = getattr(backbone, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in LAYOUTS:
        return f"model type {kind!r} (supported: {', '.join(LAYOUTS)})"
    layers = getattr(backbone, "layers", None)
    if not layers or len(layers) < config.num_hidden_layers:
        return "no decoder layers found"
    layer = layers[config.num_hidden_layers - 1]
    if "forward" in layer.__dict__:  # an instance-level forward (an accelerate hook): keep it whole
        return "its last layer's forward is already wrapped"
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    if attn is None or not all(hasattr(attn, name) for name in needed):
        return "its attention is not laid out as Llama's"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "a sliding attention window"
    return None


def _rotary(attn: nn.Module):
    """The attention module's own ``apply_rotary_pos_emb`` (its modelling file's)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _heads(attn: nn.Module, proj: str, norm: str, x: torch.Tensor) -> torch.Tensor:
    """(B, N, H) -> (B, heads, N, D): a projection split into heads, through the layer's q/k norm if it has one."""
    y = getattr(attn, proj)(x).view(*x.shape[:-1], -1, attn.head_dim)  # (B, N, heads, D)
    if getattr(attn, norm, None) is not None:
        y = getattr(attn, norm)(y)
    return y.transpose(1, 2)


def _end_rows_forward(layer: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                      **_: object) -> torch.Tensor:
    """A Llama decoder layer's output at ``positions`` (B, E) of its (B, L, H) input: (B, E, H)."""
    attn = layer.self_attn
    width = hidden_states.shape[-1]
    rows = positions.unsqueeze(-1)  # (B, E, 1)
    residual = hidden_states.gather(1, rows.expand(-1, -1, width))  # (B, E, H)
    normed = layer.input_layernorm(hidden_states)  # (B, L, H): keys and values at every position
    query = _heads(attn, "q_proj", "q_norm", normed.gather(1, rows.expand(-1, -1, width)))  # (B, h, E, D)
    key = _heads(attn, "k_proj", "k_norm", normed)  # (B, kv, L, D)
    value = _heads(attn, "v_proj", "v_norm", normed)  # (B, kv, L, D)
    cos, sin = position_embeddings  # (B, L, D) each
    cos_e, sin_e = (t.gather(1, rows.expand(-1, -1, t.shape[-1])) for t in (cos, sin))  # (B, E, D)
    rotate = _rotary(attn)
    query = rotate(query, query, cos_e, sin_e)[0]
    key = rotate(key, key, cos, sin)[1]
    mask = None
    if attention_mask is not None:  # (B, 1, L, L) -> the end queries' rows (B, 1, E, L)
        mask = attention_mask.gather(2, rows.unsqueeze(1).expand(-1, attention_mask.shape[1], -1,
                                                                   attention_mask.shape[-1]))
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attn, query, key, value, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                       scaling=attn.scaling)  # (B, E, h, D)
    hidden = residual + attn.o_proj(out.reshape(*positions.shape, -1).contiguous())  # (B, E, H)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@contextlib.contextmanager
def ends_only(backbone: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """While active, ``backbone``'s last layer computes only ``positions`` (B, E) of each row, so the backbone's
    ``last_hidden_state`` is (B, E, H). ``end_rows_refusal(backbone)`` must be None."""
    layer = backbone.layers[backbone.config.num_hidden_layers - 1]

    def forward(hidden_states, *args, **kwargs):
        return _end_rows_forward(layer, positions, hidden_states, *args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


__all__ = ["LAYOUTS", "end_rows_refusal", "ends_only"]
