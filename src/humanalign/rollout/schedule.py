"""The step plan shared by the online trainers (PPO, GRPO): whole rollouts, each a fixed number of optimizer steps.

A rollout samples ``rollout_batch_size`` prompts per process (in the engine's seeded order, an epoch at a time),
answers each ``answers_per_prompt`` times, and is trained on in ``update_iters`` passes of micro-batches of
``batch_size``: ``update_iters x sequences_per_rollout / (batch_size x gradient_accumulation_steps)`` optimizer
steps. Checkpoints and evaluations fall on rollout boundaries, so a resumed run regenerates nothing.
"""

from __future__ import annotations

import math
from typing import Any

from humanalign.engine.data import StepBatchSampler
from humanalign.errors import UserError


class RolloutSchedule:
    """Which prompts each rollout answers, how many optimizer steps it makes, and how many rollouts run."""

    def __init__(self, num_prompts: int, cfg: Any, num_processes: int, process_index: int):
        self.prompt_sampler = StepBatchSampler(num_prompts, cfg.rollout_batch_size, num_processes=num_processes,
                                               process_index=process_index, seed=cfg.seed)
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.steps_per_rollout = cfg.update_iters * cfg.sequences_per_rollout // per_step
        self.num_prompts, self.num_processes = num_prompts, num_processes
        self.rollout_batch_size, self.update_iters, self.max_steps = cfg.rollout_batch_size, cfg.update_iters, cfg.max_steps
        if cfg.max_steps is not None:
            self.total_rollouts = math.ceil(cfg.max_steps / self.steps_per_rollout)
        else:
            self.total_rollouts = max(1, math.ceil(cfg.epochs * self.prompt_sampler.steps_per_epoch))
        self.total_steps = self.total_rollouts * self.steps_per_rollout

    def prompt_rows(self, index: int) -> list[int]:
        """This process's prompt indices for rollout ``index``."""
        epoch, micro = divmod(index, self.prompt_sampler.micro_batches_per_epoch)
        return self.prompt_sampler.micro_batch(self.prompt_sampler.epoch_order(epoch), micro)

    def first_rollout(self, step: int, algorithm: str) -> int:
        """The rollout a run at optimizer step ``step`` starts with (0, or the one after a resumed checkpoint)."""
        if step % self.steps_per_rollout:
            raise UserError(f"cannot resume at step {step}: {algorithm} checkpoints lie on rollout boundaries "
                            f"({self.steps_per_rollout} steps per rollout); was the batch layout changed?")
        return step // self.steps_per_rollout

    def describe(self, answers_per_prompt: int, first: int) -> str:
        """The one-line plan printed at the start of a run (``first``: the rollout it starts with)."""
        rounded = self.max_steps and self.max_steps != self.total_steps
        return (f"{self.num_prompts:,} prompts | rollout: {self.rollout_batch_size} prompts x {answers_per_prompt} "
                f"answers x {self.num_processes} process(es) | {self.steps_per_rollout} optimizer steps per rollout "
                f"({self.update_iters} pass(es)) | {self.total_rollouts} rollouts = {self.total_steps} steps"
                + (f" (max_steps {self.max_steps} rounded up to whole rollouts)" if rounded else "")
                + (f" | resuming after rollout {first}" if first else ""))

    def due(self, every: int | None, before: int, after: int) -> bool:
        """Whether a multiple of ``every`` (or the last step) lies in the steps (before, after]."""
        return after == self.total_steps or bool(every and after // every > before // every)


__all__ = ["RolloutSchedule"]
