"""Keys every online RL command shares (`train ppo`, `ppo-lag`, `grpo`, `grpo-lag`): the models, the scores, the
prompts, the sampling and the rollout's shape; and the dual-ascent keys of the two Lagrangian commands.

A command redefines a field here only where its key differs (another default, alias or description); a rollout
is ``rollout_batch_size`` prompts per process, each answered ``sequences_per_rollout / rollout_batch_size`` times
(``num_return_sequences`` in PPO, ``num_generations`` in GRPO).
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field

from humanalign.config.base import ConfigBase
from humanalign.config.training import TrainingConfig


class OnlineRLConfig(TrainingConfig):
    """Sample answers to prompts from the policy, score them, and train the policy on them."""

    actor_model_path: str = Field(
        "tiny", validation_alias=AliasChoices("actor_model_path", "policy_model_path", "model_name_or_path"),
        description="Policy to train (usually the SFT model): folder, hub name or preset.",
    )
    ref_model_path: str | None = Field(
        None, description="Frozen reference policy for the KL penalty (default: the actor's start; with LoRA the "
        "actor with its adapter disabled, no second copy)."
    )
    reward_model_path: str | None = Field(
        None, description="Reward score model (`humanalign train rm`); it reads the decoded text with its own tokenizer."
    )
    reward_fn: str | None = Field(None, description="Python reward 'module:function' (see humanalign.rewards).")
    reward_fn_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for reward_fn.")
    # each command says what it does with the cost when it has no constraint on it
    cost_model_path: str | None = Field(None, description="Cost score model (cost > 0 = unsafe).")
    cost_fn: str | None = Field(None, description="Python cost 'module:function' (added to the cost model's score).")
    cost_fn_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for cost_fn.")
    epochs: float = Field(
        1, gt=0, validation_alias=AliasChoices("epochs", "num_train_epochs"),
        description="Passes over the prompts (rounded up to whole rollouts; max_steps overrides).",
    )
    metric_for_best_model: str = Field("eval/reward", description="Eval metric that picks the best checkpoint.")
    greater_is_better: bool = Field(True, description="Whether a larger metric_for_best_model is better.")

    prompts_path: str | list[str] = Field(
        "data/train/helpful_pairs.jsonl", validation_alias=AliasChoices("prompts_path", "train_path", "train_prompts_path"),
        description="Prompt file(s): any records with a 'prompt' (string or messages); duplicates are skipped.",
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many prompts (after deduplication).")
    eval_prompts_path: str | None = Field(None, description="Held-out prompts answered and scored at each evaluation.")
    eval_max_prompts: int = Field(64, ge=1, description="Prompts used per evaluation.")

    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the rollouts (0: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty of the rollouts (1: off).")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer; prompt + answer must fit in max_length.")
    rollout_batch_size: int = Field(
        16, ge=1, validation_alias=AliasChoices("rollout_batch_size", "per_device_prompt_batch_size"),
        description="Prompts per process per rollout.",
    )
    generation_batch_size: int | None = Field(
        None, ge=1, description="Prompts generated at once (default: the whole rollout); lower it to save memory."
    )
    forward_batch_size: int | None = Field(
        None, ge=1, description="Sequences per no-grad forward when scoring a rollout (default: batch_size)."
    )
    update_iters: int = Field(1, ge=1, description="Passes over each rollout (PPO epochs).")
    disable_dropout: bool = Field(True, description="Turn dropout off (ratios start at exactly 1).")

    @property
    def uses_cost(self) -> bool:
        return bool(self.cost_model_path or self.cost_fn)

    @property
    def is_lagrangian(self) -> bool:
        return False

    @property
    def sequences_per_rollout(self) -> int:
        raise NotImplementedError

    def _check_rollout_shape(self, answers_field: str) -> None:
        """Prompt + answer fit in max_length, and a rollout splits into whole optimizer steps. Called by each
        command's validator after its own checks; ``answers_field`` names its answers-per-prompt key."""
        if self.max_prompt_length + self.max_new_tokens > self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) + max_new_tokens ({self.max_new_tokens}) "
                             f"must fit in max_length ({self.max_length})")
        per_step = self.batch_size * self.gradient_accumulation_steps
        if self.sequences_per_rollout % per_step:
            raise ValueError(
                f"a rollout's {self.sequences_per_rollout} sequences (rollout_batch_size x {answers_field}) must "
                f"split into whole optimizer steps of batch_size x gradient_accumulation_steps = {per_step}"
            )


class LagrangianFields(ConfigBase):
    """Dual ascent on log-lambda for "maximise reward subject to E[cost] <= cost_threshold" (Safe RLHF).

    Mixed in before the command's own config (``class PPOLagConfig(LagrangianFields, PPOConfig)``) so that these
    keys come last in ``--help``.
    """

    cost_threshold: float = Field(
        0.0, validation_alias=AliasChoices("cost_threshold", "threshold", "d"),
        description="Constraint J_c <= d on the rollout's mean cost (cost <= 0 means safe).",
    )
    lambda_init: float = Field(1.0, gt=0, description="Starting Lagrange multiplier.")
    lambda_lr: float = Field(0.1, ge=0, description="Step size of log-lambda's ascent.")
    lambda_max: float | None = Field(10.0, gt=0, description="Cap on lambda (null: none).")
    lambda_update_delay_steps: int = Field(
        0, ge=0, description="No lambda update before this optimizer step (costs are still measured)."
    )

    def _check_lagrangian(self, command: str, uses_cost: bool) -> None:
        if not uses_cost:
            raise ValueError(f"{command} needs cost_model_path, cost_fn, or both")
        if self.lambda_max is not None and self.lambda_init > self.lambda_max:
            raise ValueError(f"lambda_init ({self.lambda_init}) is above lambda_max ({self.lambda_max})")


__all__ = ["LagrangianFields", "OnlineRLConfig"]
