"""Folding a LoRA adapter into full-model weights without changing the live model.

``merged_weights`` merges on the live (unsharded) model and unmerges again; ``merged_gathered_weights`` does the
same arithmetic on weights gathered from FSDP / DeepSpeed shards, where the live parameters are shards. Both
return the weights under the plain model's names, so ``save_pretrained(state_dict=...)`` of the base writes a
model any tool loads.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from humanalign.errors import UserError


def plain_weight_names(state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """Keys of a LoRA-wrapped model's (merged) weights as the plain model names them: adapter tensors and
    ``original_module`` copies dropped, ``base_layer`` / ``modules_to_save.<adapter>`` unwrapped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or ".original_module." in key:
            continue
        key = key.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        out[key] = value
    return out


def merged_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-model weights of a LoRA-wrapped model with the adapter folded in, without changing the model."""
    adapter = peft_model.active_adapter
    inner = peft_model.get_base_model()
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
        raise UserError("cannot save a model trained on a 4/8-bit base as a full model: merge the LoRA "
                        "adapter onto the full-precision base first")
    peft_model.merge_adapter()
    try:  # CPU copies: no second model on the GPU
        state = {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}
    finally:
        peft_model.unmerge_adapter()
    return plain_weight_names(state, adapter)


def merged_gathered_weights(peft_model: nn.Module, gathered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold the adapter into *gathered* weights (keys of the ``PeftModel``, ``base_model.model.<...>``), for
    sharded training where the live parameters are shards: W + scaling * B @ A per LoRA linear layer
    (transposed for fan_in_fan_out layers), as peft's ``merge`` computes it."""
    adapter = peft_model.active_adapter
    prefix = "base_model.model."  # the PeftModel's keys; the base model's without it
    state = {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if adapter in getattr(module, "lora_magnitude_vector", {}) or adapter in getattr(module, "lora_embedding_A", {}):
            raise UserError(f"cannot merge a DoRA or embedding LoRA adapter ({name}) from sharded weights: "
                            "train this model with DDP, or with a plain LoRA on linear layers")
        a = state[f"{name}.lora_A.{adapter}.weight"].float()  # (r, in)
        b = state[f"{name}.lora_B.{adapter}.weight"].float()  # (out, r)
        delta = (b @ a) * module.scaling[adapter]  # (out, in)
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        key = f"{name}.base_layer.weight"
        state[key] = (state[key].float() + delta.to(state[key].device)).to(state[key].dtype)
    return plain_weight_names(state, adapter)


__all__ = ["plain_weight_names", "merged_weights", "merged_gathered_weights"]
