"""AdamW with weight-decay groups, and the learning-rate schedules every trainer shares; for a module trained
in several roles (PPO's actor and critics), groups tagged by role with a schedule and gradient clipping each.

The learning rate is a pure function of the optimizer step (``lr_factor``), so a resumed run, a run on more
processes and a run whose steps were skipped for a non-finite loss all follow the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from humanalign.config.training import TrainingConfig
from humanalign.errors import UserError
from humanalign.models.pretrained import is_no_decay

SCHEDULES = ("cosine", "linear", "constant", "cosine_floor")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and a not-decayed group (empty groups left out)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise UserError("the model has no trainable parameters (is everything frozen?)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_supported(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW needs plain floating-point tensors on one CPU/CUDA/MPS/XPU device; sharded DTensors
    (FSDP2) and anything else take the foreach path."""
    if not params:
        return False
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda", "mps", "xpu")
        and all(type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    )


def build_optimizer(model: torch.nn.Module, config: TrainingConfig,
                    groups: list[dict] | None = None) -> torch.optim.AdamW:
    """torch AdamW over the trainable parameters, with the config's lr, betas, epsilon and weight decay.
    ``groups``: parameter groups of the caller's own (e.g. per-group learning rates) instead of ``param_groups``.

    ``optim: adamw_torch_fused`` (default) uses the fused kernel where torch has one: several times faster than
    the per-tensor loop (timings in docs/benchmarks/performance.md, "Left to do"). Both implement the same
    update; they differ by float round-off only."""
    groups = groups if groups is not None else param_groups(model, config.weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = config.optim == "adamw_torch_fused" and fused_supported(params)
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        **({"fused": True} if fused else {}),
    )


def warmup_steps_for(config: TrainingConfig, total_steps: int) -> int:
    """warmup_steps when set, else warmup_ratio of all steps (rounded up)."""
    if config.warmup_steps:
        return min(config.warmup_steps, total_steps)
    return min(math.ceil(config.warmup_ratio * total_steps), total_steps)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step with 0-based index ``step``.

    Warmup rises linearly, (step + 1) / (warmup + 1), so the first step already learns and step ``warmup``
    reaches 1. After warmup, with progress p in [0, 1] from the end of warmup to ``total``:
    cosine 0.5 (1 + cos(pi p)) ends at 0; linear 1 - p ends at 0; constant stays 1; cosine_floor is
    MiniMind's cosine that keeps a floor of lr/10: 0.1 + 0.45 (1 + cos(pi p)), from 1 down to 0.1.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule '{kind}' (known: {', '.join(SCHEDULES)})")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine":
        return cosine
    return 0.1 + 0.9 * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int) -> LambdaLR:
    """LambdaLR stepping once per optimizer step (skipped steps included) over ``total_steps`` steps."""
    fn = partial(lr_factor, kind=config.lr_scheduler, warmup=warmup_steps_for(config, total_steps), total=total_steps)
    return LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------------------- groups by role


def build_param_groups(model: torch.nn.Module, actor_lr: float, critic_lr: float, weight_decay: float
                       ) -> list[dict[str, Any]]:
    """AdamW groups of a ``PolicyAndCritics`` (``.actor``, ``.critics()``): actor (decay / no decay) at
    ``actor_lr``, then critics at ``critic_lr``; each group is tagged with ``role`` so the schedule and the
    gradient clipping can tell them apart."""
    groups = []
    for role, module, lr in (("actor", model.actor, actor_lr), *(
            (f"{name}_critic", critic, critic_lr) for name, critic in model.critics().items())):
        for group in param_groups(module, weight_decay):
            groups.append({**group, "lr": lr, "role": role})
    return groups


def per_group_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int, last_step: int):
    """LambdaLR with the actor's schedule (lr_scheduler) on actor groups and critic_lr_scheduler on critic
    groups, positioned at optimizer step ``last_step`` (a resumed run continues its curve)."""
    warmup = warmup_steps_for(cfg, total_steps)
    fns = [partial(lr_factor, kind=cfg.lr_scheduler if g.get("role") == "actor" else cfg.critic_lr_scheduler,
                   warmup=warmup, total=total_steps) for g in optimizer.param_groups]
    return LambdaLR(optimizer, fns, last_epoch=last_step - 1)


def clip_per_role(optimizer: torch.optim.Optimizer, max_norm: float | None, roles: Sequence[str]
                  ) -> dict[str, float]:
    """Clip the gradients of each role (actor, each critic) to ``max_norm / sqrt(len(roles))`` separately.

    Separate clipping keeps a large value-loss gradient from shrinking the policy's step (Safe RLHF clips
    actor and critic apart); dividing by sqrt(#roles) keeps the joint norm within ``max_norm``, so the
    engine's joint clip that follows changes nothing. Returns each role's norm before clipping.
    """
    norms = {}
    limit = (max_norm / math.sqrt(len(roles))) if max_norm else float("inf")
    for role in roles:
        params = [p for g in optimizer.param_groups if g.get("role") == role for p in g["params"]
                  if p.grad is not None]
        if params:
            norms[role] = float(torch.nn.utils.clip_grad_norm_(params, limit))
    return norms
