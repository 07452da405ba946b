"""`humanalign train ppo` and `humanalign train ppo-lag`: online RLHF (InstructGPT PPO, Safe RLHF PPO-Lagrangian).

One rollout = ``rollout_batch_size`` prompts per process, each answered ``num_return_sequences`` times. The
rollout's sequences are then trained on for ``update_iters`` passes in micro-batches of ``batch_size`` with
``gradient_accumulation_steps`` micro-batches per optimizer step, so a rollout makes
``update_iters * rollout_batch_size * num_return_sequences / (batch_size * gradient_accumulation_steps)``
optimizer steps; ``max_steps`` and ``save_steps`` count those steps and are rounded to whole rollouts.

Safe RLHF's names are accepted as aliases (``policy_model_path``, ``gae_lambda``, ``threshold``...).
The keys shared with the other online RL command (models, scores, prompts, sampling, rollout size, dual
ascent) are in ``config/online_rl.py``; the ones redefined here differ in default, alias or description.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.base import ConfigBase, lower_default
from humanalign.config.online_rl import LagrangianFields, OnlineRLConfig


class AdaptiveKLSettings(ConfigBase):
    """Ziegler et al.'s adaptive KL coefficient: beta moves so that the measured KL tracks ``target``."""

    enabled: bool = Field(False, description="Adapt the KL coefficient (off: kl_coeff stays fixed).")
    init_kl_coef: float | None = Field(None, ge=0, description="Starting coefficient (default: kl_coeff).")
    target: float = Field(6.0, gt=0, description="Target KL(pi || ref) per response, in nats (summed over tokens).")
    horizon: int = Field(10000, ge=1, description="Responses over which the coefficient may change by at most 20%.")


class PPOConfig(OnlineRLConfig):
    """PPO on prompt-only data with a reward model, a reward function, or both (their scores add up)."""

    input_fields: ClassVar[tuple[str, ...]] = ("prompts_path",)  # checked by the CLI before any work

    reward_fn: str | None = Field(
        None, description="Python reward 'module:function' or 'file.py:function' (see humanalign.rewards); "
        "added to the reward model's score when both are set."
    )
    cost_model_path: str | None = Field(
        None, description="Cost score model (cost > 0 = unsafe). In plain PPO it is only scored and logged."
    )
    reward_critic_model_path: str | None = Field(
        None, description="Start of the reward critic (a value head on a backbone): default the reward model when "
        "it shares the actor's tokenizer, else the actor with a fresh head."
    )
    output_dir: str = Field("models/ppo", description="Run folder; the final policy is saved in final/.")
    learning_rate: float = Field(1e-5, gt=0, description="Actor peak learning rate.")

    num_return_sequences: int = Field(1, ge=1, description="Answers sampled per prompt in a rollout.")

    kl_coeff: float = Field(0.02, ge=0, description="Weight of the per-token KL(pi || ref) penalty in the reward.")
    adaptive_kl: AdaptiveKLSettings = Field(default_factory=AdaptiveKLSettings, description="Adaptive KL control.")
    clip_range_score: float | None = Field(
        50.0, gt=0, validation_alias=AliasChoices("clip_range_score", "reward_clip_range"),
        description="Clip sequence scores to [-c, c] (null: no clipping).",
    )
    normalize_reward: bool = Field(False, description="Normalise reward scores by their running mean and std.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(
        0.95, ge=0, le=1, validation_alias=AliasChoices("lam", "gae_lambda"), description="GAE lambda."
    )
    whiten_advantages: bool = Field(True, description="Normalise the (combined) advantages over each rollout.")
    clip_range_ratio: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    clip_range_value: float = Field(5.0, gt=0, description="Value clip epsilon around the rollout's values.")
    loss_aggregation: Literal["token_mean", "seq_mean"] = Field(
        "token_mean", description="token_mean: every token weighs the same (InstructGPT); seq_mean: every answer (Safe RLHF)."
    )
    critic_learning_rate: float = Field(5e-6, gt=0, description="Critics' peak learning rate.")
    critic_lr_scheduler: Literal["cosine", "linear", "constant", "cosine_floor"] = Field(
        "constant", description="Critics' schedule after warmup."
    )
    disable_dropout: bool = Field(True, description="Turn dropout off in actor and critics (ratios start at exactly 1).")

    ptx_path: str | None = Field(
        None, description="SFT data ('messages' records, or pairs whose chosen answer is imitated) for the ptx loss."
    )
    ptx_source: str = Field("auto", description="Adapter for ptx_path when it is not a 'messages' file.")
    ptx_coeff: float = Field(16.0, ge=0, description="Weight of the ptx language-modelling loss (with ptx_path).")

    @property
    def sequences_per_rollout(self) -> int:
        return self.rollout_batch_size * self.num_return_sequences

    @model_validator(mode="after")
    def _check_ppo(self):
        if not (self.reward_model_path or self.reward_fn):
            raise ValueError("set reward_model_path, reward_fn, or both")
        lower_default(self, "max_prompt_length", self.max_length - self.max_new_tokens)  # a prompt must leave room
        self._check_rollout_shape("num_return_sequences")
        return self


class PPOLagConfig(LagrangianFields, PPOConfig):
    """PPO-Lagrangian (Safe RLHF): maximise reward subject to E[cost] <= cost_threshold."""

    cost_critic_model_path: str | None = Field(
        None, description="Start of the cost critic: default the cost model when it shares the actor's tokenizer, "
        "else the actor with a fresh head."
    )
    output_dir: str = Field("models/ppo_lag", description="Run folder; the final policy is saved in final/.")
    # Safe RLHF's names and texts for the shared dual-ascent keys
    cost_threshold: float = Field(
        0.0, validation_alias=AliasChoices("cost_threshold", "threshold", "d"),
        description="Constraint J_c <= d on the mean episode cost (cost <= 0 means safe).",
    )
    lambda_init: float = Field(
        1.0, gt=0, validation_alias=AliasChoices("lambda_init", "λ_init"), description="Starting Lagrange multiplier."
    )
    lambda_lr: float = Field(
        0.1, ge=0, validation_alias=AliasChoices("lambda_lr", "λ_lr"), description="Step size of log-lambda's ascent."
    )
    lambda_max: float | None = Field(
        10.0, gt=0, validation_alias=AliasChoices("lambda_max", "λ_max"),
        description="Cap on lambda (null: none; the log-space ascent grows lambda geometrically while costs stay high).",
    )
    lambda_update_delay_steps: int = Field(
        0, ge=0, description="No lambda update before this optimizer step (costs are still collected)."
    )
    episode_cost_window_size: int = Field(128, ge=1, description="Recent episodes whose mean cost is J_c.")
    reward_shaping: bool = Field(
        False, description="Fixed-lambda baseline: plain PPO on R - lambda_init * C, no cost critic, no lambda update."
    )

    @property
    def is_lagrangian(self) -> bool:
        return not self.reward_shaping

    @model_validator(mode="after")
    def _check_cost(self):
        self._check_lagrangian("ppo-lag", self.uses_cost)
        return self


__all__ = ["AdaptiveKLSettings", "PPOConfig", "PPOLagConfig"]
