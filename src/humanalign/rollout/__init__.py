"""Rollout backends for online RL: ``RolloutEngine`` (the interface) and ``HFRolloutEngine`` (model.generate).

See ``humanalign.rollout.base`` for what a backend must do; ``build_rollout_engine`` picks one by name.
"""

from __future__ import annotations

from accelerate.utils import DistributedType

from humanalign.models.actor_critic import ActorGeneration
from humanalign.rollout.base import GeneratedBatch, GenerationSettings, RolloutEngine
from humanalign.rollout.hf import HFRolloutEngine

BACKENDS = ("hf",)


def build_rollout_engine(backend: str, model, tokenizer, *, batch_size: int | None = None) -> RolloutEngine:
    """The rollout engine named ``backend`` around the (unwrapped) actor."""
    if backend == "hf":
        return HFRolloutEngine(model, tokenizer, batch_size=batch_size)
    raise ValueError(f"unknown rollout backend '{backend}' (known: {', '.join(BACKENDS)})")


def actor_rollout_engine(engine, prepared, actor, tokenizer, batch_size: int | None = None) -> RolloutEngine:
    """The rollout engine of an online trainer: samples through the prepared module (``ActorGeneration``), which
    under FSDP / ZeRO-3 on several processes needs ``synced_gpus`` (every rank steps until all have stopped)."""
    sharded = engine.distributed_type == DistributedType.FSDP or engine.zero_stage == 3
    generation = ActorGeneration(prepared, actor, synced_gpus=engine.num_processes > 1 and sharded)
    return build_rollout_engine("hf", generation, tokenizer, batch_size=batch_size)


__all__ = ["BACKENDS", "GeneratedBatch", "GenerationSettings", "RolloutEngine", "HFRolloutEngine",
           "build_rollout_engine", "actor_rollout_engine"]
