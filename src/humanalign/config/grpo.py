"""`humanalign train grpo` and `humanalign train grpo-lag`: critic-free online RL (GRPO, DAPO, Dr. GRPO, RLOO) and
its safety-constrained form (GRPO-Lagrangian).

One rollout = ``rollout_batch_size`` prompts per process, each answered ``num_generations`` times (a group).
The rollout's sequences are trained on for ``update_iters`` passes in micro-batches of ``batch_size`` with
``gradient_accumulation_steps`` micro-batches per optimizer step, so a rollout makes
``update_iters * rollout_batch_size * num_generations / (batch_size * gradient_accumulation_steps)`` optimizer
steps; ``max_steps`` and ``save_steps`` count those steps and are rounded to whole rollouts.

TRL's names are accepted as aliases (``num_iterations``, ``epsilon``, ``max_completion_length``...).
The keys shared with the other online RL command (models, scores, prompts, sampling, rollout size, dual
ascent) are in ``config/online_rl.py``; the ones redefined here differ in default, alias or description.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.base import ConfigBase
from humanalign.config.online_rl import LagrangianFields, OnlineRLConfig


class WeightedScoreFn(ConfigBase):
    """One more Python score function and its weight in the total."""

    fn: str = Field(..., description="'module:function' or 'file.py:function' (see humanalign.rewards).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for fn.")
    weight: float = Field(1.0, description="Weight of this function's score in the total.")


class GRPOConfig(OnlineRLConfig):
    """GRPO on prompt-only data: rewards from a reward model, Python functions, or a weighted sum of them."""

    ref_model_path: str | None = Field(
        None, description="Frozen reference for the KL term (default: the actor's start; with LoRA the actor with "
        "its adapter disabled, no second copy). Not loaded when beta is 0."
    )
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score in the total reward.")
    reward_fn_weight: float = Field(1.0, description="Weight of reward_fn's score in the total reward.")
    more_reward_fns: list[WeightedScoreFn] = Field(
        default_factory=list, description="Further weighted reward functions, added to the total."
    )
    cost_model_path: str | None = Field(
        None, description="Cost score model (cost > 0 = unsafe). In plain GRPO it is only scored and logged."
    )
    output_dir: str = Field("models/grpo", description="Run folder; the final policy is saved in final/.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate.")

    num_generations: int = Field(
        4, ge=2, validation_alias=AliasChoices("num_generations", "num_return_sequences", "group_size"),
        description="Answers sampled per prompt (the group G whose scores are the baseline).",
    )
    max_new_tokens: int = Field(
        128, ge=1, validation_alias=AliasChoices("max_new_tokens", "max_completion_length"),
        description="Longest answer (Dr. GRPO's constant normaliser); prompt + answer must fit in max_length.",
    )
    rollout_batch_size: int = Field(
        8, ge=1, validation_alias=AliasChoices("rollout_batch_size", "per_device_prompt_batch_size"),
        description="Prompts per process per rollout (each answered num_generations times).",
    )
    update_iters: int = Field(
        1, ge=1, validation_alias=AliasChoices("update_iters", "num_iterations"),
        description="Passes over each rollout (GRPO's mu); 1 with one step per rollout is exactly on-policy.",
    )

    advantage_estimator: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: (r - group mean) / scale; rloo: r - mean of the other G - 1 answers."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="GRPO's divisor: the group's std, the batch's std, or none (Dr. GRPO)."
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo", description="grpo: per-answer token mean then mean; dapo: token mean over the step; dr_grpo: "
        "token sum / (answers x max_new_tokens)."
    )
    epsilon_low: float = Field(
        0.2, gt=0, lt=1, validation_alias=AliasChoices("epsilon_low", "epsilon", "clip_range_ratio"),
        description="Ratio clip below: 1 - epsilon_low.",
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="Ratio clip above: 1 + epsilon_high (default epsilon_low; DAPO's clip-higher: 0.28)."
    )
    beta: float = Field(
        0.04, ge=0, validation_alias=AliasChoices("beta", "kl_coeff"),
        description="Weight of the per-token k3 KL(pi || ref) in the loss (0: no reference model is loaded).",
    )

    @property
    def sequences_per_rollout(self) -> int:
        return self.rollout_batch_size * self.num_generations

    @model_validator(mode="after")
    def _check_grpo(self):
        if not (self.reward_model_path or self.reward_fn or self.more_reward_fns):
            raise ValueError("set reward_model_path, reward_fn or more_reward_fns")
        self._check_rollout_shape("num_generations")
        return self


class GRPOLagConfig(LagrangianFields, GRPOConfig):
    """GRPO-Lagrangian: maximise the reward subject to E[cost] <= cost_threshold, with group-normalised reward and
    cost advantages combined as (A_r - lambda A_c) / (1 + lambda)."""

    output_dir: str = Field("models/grpo_lag", description="Run folder; the final policy is saved in final/.")
    lambda_lr: float = Field(0.1, ge=0, description="Step size of log-lambda's ascent (as PPO-Lagrangian).")

    @property
    def is_lagrangian(self) -> bool:
        return True

    @model_validator(mode="after")
    def _check_cost(self):
        self._check_lagrangian("grpo-lag", self.uses_cost)
        return self


__all__ = ["GRPOConfig", "GRPOLagConfig", "WeightedScoreFn"]
