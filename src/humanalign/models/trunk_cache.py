"""A cached lower trunk: with LoRA on the top K decoder layers only, the hidden states after layer N - K are a
fixed function of each input row (nothing below them trains), so they are computed once, with no grad, stored
on disk, and every later forward of that row (any epoch, variant or seed, the policy and the reference alike:
the reference is the same model with its adapter disabled, and the adapter only sits above) runs only the top
K layers, the final norm and the head. The method is unchanged: the same log-probs and the same gradients on
the LoRA weights as the full forward (tests/models/test_trunk_cache.py checks both), computed on fewer layers.

How: ``install_trunk_cache`` replaces the decoder's (``get_decoder()``, e.g. ``LlamaModel``) ``forward`` by
one that, for a training or scoring forward (``input_ids`` given, no KV cache: generation keeps the plain
forward), keys each row by its real tokens, position ids and attention pattern (right padding cut off, so a row
hits the cache whatever batch it lands in), reads the rows' states from the store, computes the missing ones
with the lower layers only (the norm bypassed), and runs the decoder's own forward on them as
``inputs_embeds`` with its layer list swapped for the top K (put back afterwards, so saving and parameter names
are untouched). A row whose mask is not a right-padded prefix (left padding, packing) takes the plain forward.

Store: ``<folder>/<trunk fingerprint>/<key[:2]>/<key>.pt``, one (n, H) tensor per row in ``dtype`` (float32:
exact; float16 halves the disk at ~1e-3 relative error). The fingerprint hashes the lower trunk's weights,
its layer count and the model's dtype and attention kernel, so a changed base or K never reads stale states.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from humanalign.errors import UserError
from humanalign.models.pretrained import is_peft_model

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _hf_model(model) -> Any:
    inner = model
    for _ in range(8):  # PEFT / DDP wrappers
        if is_peft_model(inner):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        else:
            break
    return inner


def decoder_of(model) -> Any:
    """The decoder stack (the module holding ``layers`` and ``norm``) inside ``model``'s wrappers."""
    hf = _hf_model(model)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) \
            or not hasattr(decoder, "norm"):
        raise UserError(f"lora.trunk_cache_dir: {type(hf).__name__} has no decoder with `layers` and `norm` "
                        "(a cached trunk needs a plain decoder-only model)")
    return decoder


def num_layers(model) -> int:
    return len(decoder_of(model).layers)


def top_layer_indices(model, top_layers: int) -> list[int]:
    """The indices of the top ``top_layers`` decoder layers (peft's ``layers_to_transform``)."""
    n = num_layers(model)
    if not 1 <= top_layers <= n:
        raise UserError(f"lora.top_layers: {top_layers} is outside 1..{n} (the model's decoder layers)")
    return list(range(n - top_layers, n))


class TrunkStore:
    """Hidden states of the lower trunk, one file per row, keyed by the row's content."""

    def __init__(self, folder: str | Path, fingerprint: str, dtype: str = "float32") -> None:
        if dtype not in STORE_DTYPES:
            raise UserError(f"lora.trunk_cache_dtype: {dtype!r} is not one of {sorted(STORE_DTYPES)}")
        self.folder = Path(folder) / fingerprint[:24]
        self.dtype = STORE_DTYPES[dtype]
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return torch.load(path, map_location="cpu", weights_only=True)

    def put(self, key: str, states: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(states.detach().to("cpu", self.dtype).contiguous().clone(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none


def trunk_fingerprint(model, decoder, lower: int) -> str:
    """sha256 over the lower trunk's weights (embeddings and the first ``lower`` layers), the layer count, the
    dtype and the attention kernel: what the cached states depend on."""
    digest = hashlib.sha256()
    hf = _hf_model(model)
    digest.update(f"{lower}\0{hf.dtype}\0{getattr(hf.config, '_attn_implementation', None)}\0".encode())
    modules = [decoder.embed_tokens, *decoder.layers[:lower]]
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{i}.{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool (True: may attend); eager's additive masks hold 0 where allowed."""
    return mask if mask.dtype == torch.bool else mask == 0


def row_lengths(attention_mask: torch.Tensor | None, batch: int, width: int) -> list[int] | None:
    """Each row's real length (its right padding cut off), or None when some row is not a real prefix followed
    by padding (left padding, packed rows): those forwards are not cached."""
    if attention_mask is None:
        return [width] * batch
    if attention_mask.ndim == 2:
        real = attention_mask.bool()
    elif attention_mask.ndim == 4:  # (B, 1, T, T): a real query attends the row's first token, padding only itself
        real = _allowed(attention_mask)[:, 0, :, 0]
    else:
        return None
    lengths = real.sum(-1).tolist()
    for row, n in zip(real, lengths):
        if not bool(row[:n].all()):
            return None
    return [int(n) for n in lengths]


def row_key(input_ids: torch.Tensor, position_ids: torch.Tensor | None, mask: torch.Tensor | None, n: int) -> str:
    """The key of one row's first ``n`` positions: tokens, positions (default 0..n-1) and attention pattern
    (default causal)."""
    digest = hashlib.sha256(input_ids[:n].to(torch.int64).numpy().tobytes())
    if position_ids is not None:
        digest.update(b"pos" + position_ids[:n].to(torch.int64).numpy().tobytes())
    if mask is not None and mask.ndim == 4:
        digest.update(b"mask" + _allowed(mask)[0, :n, :n].numpy().tobytes())
    return digest.hexdigest()


class CachedTrunk:
    """The decoder's replacement forward (see the module docstring); ``store`` counts hits and misses."""

    def __init__(self, decoder, top_layers: int, store: TrunkStore) -> None:
        self.decoder, self.store = decoder, store
        self.original = type(decoder).forward
        layers = list(decoder.layers)
        self.lower = torch.nn.ModuleList(layers[:len(layers) - top_layers])
        self.top = torch.nn.ModuleList(layers[len(layers) - top_layers:])
        self.enabled = True

    def _run(self, layers: torch.nn.ModuleList, bypass_norm: bool, **kwargs):
        decoder = self.decoder
        full, norm = decoder._modules["layers"], decoder._modules["norm"]
        decoder._modules["layers"] = layers
        if bypass_norm:
            decoder._modules["norm"] = torch.nn.Identity()
        try:
            return self.original(decoder, **kwargs)
        finally:
            decoder._modules["layers"], decoder._modules["norm"] = full, norm

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                 **kwargs):
        plain = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                 "inputs_embeds": inputs_embeds, "use_cache": use_cache, **kwargs}
        generating = use_cache or any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
        if not self.enabled or input_ids is None or inputs_embeds is not None or generating:
            return self.original(self.decoder, **plain)
        batch, width = input_ids.shape
        lengths = row_lengths(attention_mask, batch, width)
        if lengths is None:
            return self.original(self.decoder, **plain)
        states = self.lower_states(input_ids, attention_mask, position_ids, lengths)
        return self._run(self.top, False, input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=states, use_cache=False, **kwargs)

    def lower_states(self, input_ids, attention_mask, position_ids, lengths: list[int]) -> torch.Tensor:
        """(B, T, H): each row's cached states after the lower trunk (computed and stored where missing), zeros
        on its padding (which no real position attends)."""
        cpu = {"ids": input_ids.cpu(), "mask": None if attention_mask is None else attention_mask.cpu(),
               "pos": None if position_ids is None else position_ids.cpu()}

        def row_pos(b):
            return None if cpu["pos"] is None else cpu["pos"][b if cpu["pos"].shape[0] > 1 else 0]

        keys = [row_key(cpu["ids"][b], row_pos(b), None if cpu["mask"] is None else cpu["mask"][b], n)
                for b, n in enumerate(lengths)]
        rows: list[torch.Tensor | None] = [self.store.get(k) for k in keys]
        missing = [b for b, r in enumerate(rows) if r is None]
        if missing:
            computed = self._compute(input_ids, attention_mask, position_ids, missing, max(lengths[b] for b in missing))
            for j, b in enumerate(missing):
                self.store.put(keys[b], computed[j, :lengths[b]])
                rows[b] = self.store.get(keys[b]) if self.store.dtype != computed.dtype else computed[j, :lengths[b]]
        hidden = self.decoder.embed_tokens.weight
        out = torch.zeros(len(rows), input_ids.shape[1], hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        for b, r in enumerate(rows):
            out[b, :r.shape[0]] = r.to(out.device, out.dtype)
        return out

    @torch.no_grad()
    def _compute(self, input_ids, attention_mask, position_ids, missing: list[int], width: int) -> torch.Tensor:
        """The lower trunk's output (len(missing), width, H) for the rows ``missing``, cut to ``width``."""
        index = torch.tensor(missing, device=input_ids.device)
        mask = attention_mask
        if mask is not None:
            mask = mask.index_select(0, index)
            mask = mask[:, :width] if mask.ndim == 2 else mask[:, :, :width, :width]
        pos = position_ids
        if pos is not None:
            pos = (pos.index_select(0, index) if pos.shape[0] > 1 else pos)[:, :width]
        out = self._run(self.lower, True, input_ids=input_ids.index_select(0, index)[:, :width],
                        attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state


def install_trunk_cache(model, top_layers: int, folder: str | Path, dtype: str = "float32") -> CachedTrunk:
    """Run ``model``'s forwards on its top ``top_layers`` decoder layers over cached lower-trunk states (module
    docstring). Every trainable parameter must sit above the trunk: a trained lower layer would make the cache
    stale (UserError)."""
    decoder = decoder_of(model)
    lower = len(top_layer_indices(model, top_layers)) and num_layers(model) - top_layers
    frozen = [decoder.embed_tokens, *decoder.layers[:lower]]
    trained = [n for m in frozen for n, p in m.named_parameters() if p.requires_grad]
    if trained:
        raise UserError(f"lora.trunk_cache_dir: {len(trained)} trainable parameters sit in the cached lower trunk "
                        f"(e.g. {trained[0]}); set lora.top_layers so that only the top layers train")
    store = TrunkStore(folder, trunk_fingerprint(model, decoder, lower), dtype)
    cached = CachedTrunk(decoder, top_layers, store)
    decoder.forward = cached  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    return cached


__all__ = ["STORE_DTYPES", "decoder_of", "num_layers", "top_layer_indices", "TrunkStore", "trunk_fingerprint",
           "row_lengths", "row_key", "CachedTrunk", "install_trunk_cache"]
