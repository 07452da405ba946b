"""Which weights a checkpoint holds, and loading them back with a check.

A checkpoint needs only what training changes: the trainable parameters and the persistent buffers. For full
fine-tuning that is the whole state dict; for a LoRA model it is the adapter (a few MB instead of the base
model). Frozen weights come back from the base model that the trainer loads before resuming.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from humanalign.errors import UserError


def trainable_state_dict(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Trainable parameters (tied weights once, under their first name) plus persistent buffers."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, param in model.named_parameters():  # named_parameters lists a tied tensor once
        if param.requires_grad:
            out[name] = param.detach().contiguous()
    buffers = {name for name, _ in model.named_buffers()}
    for name, value in model.state_dict().items():
        if name in buffers:  # state_dict holds only the persistent ones
            out[name] = value.detach().contiguous()
    return out


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into ``model``; every trainable parameter must be in the file and every
    tensor of the file must belong to the model."""
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} in the checkpoint")
    loaded = load_file(str(path), device="cpu")
    expected = trainable_state_dict(model)
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} trained tensors, e.g. '{missing[0]}' "
                        "(was it saved from a different model or LoRA setting?)")
    result = model.load_state_dict(loaded, strict=False)
    if result.unexpected_keys:
        raise UserError(f"{path}: checkpoint has {len(result.unexpected_keys)} tensors the model lacks, e.g. "
                        f"'{result.unexpected_keys[0]}' (was it saved from a different model?)")


def nonfinite_count(model: torch.nn.Module, only_on: torch.device | None = None) -> torch.Tensor:
    """How many trainable tensors of this rank hold a NaN or inf, as a tensor on their device (no host sync).

    Only trainable parameters can change during training. Each rank sees its own shard under FSDP2 (a
    DTensor's local part) and ZeRO-3 (``ds_tensor``); sum the count over the ranks. One fused max-abs pass per
    dtype: the infinity norm of a tensor is NaN or inf exactly when the tensor holds one. ``only_on``: count
    only the tensors on that device (the per-step check skips weights offloaded to the CPU, which would cost a
    CPU pass over them every step; the check before each save covers them)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        local = getattr(param, "ds_tensor", None)
        if local is None:
            local = param.to_local() if hasattr(param, "to_local") else param
        if local.numel() and (only_on is None or local.device == only_on):
            groups.setdefault((local.device, local.dtype), []).append(local.detach())
    count = None
    for tensors in groups.values():
        norms = torch.stack(torch._foreach_norm(tensors, float("inf")))
        bad = (~torch.isfinite(norms)).sum().float()
        count = bad if count is None else count + bad.to(count.device)
    if count is None:
        device = next(model.parameters(), torch.empty(0)).device
        return torch.zeros((), device=device)
    return count
