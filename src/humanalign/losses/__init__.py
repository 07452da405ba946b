"""Pure loss functions (torch only): tensors in, per-example losses and detached metrics out.

preference   DPO family (sigmoid/cDPO, hinge, IPO, robust, DPO+SFT), CPO, SimPO, ORPO and the LOSS_SPECS table
safe_mm_dpo  MM-DPO's margin-scaled beta, the Safe-MM-DPO Lagrangian loss, the lambda dual ascent
score        reward- and cost-model losses (sequence- and token-wise)
sft          next-token cross-entropy on assistant tokens (SFT, and PPO's ptx term)
grpo         GRPO / DAPO / Dr. GRPO losses, group-normalised and RLOO advantages, k3 KL
ppo          GAE, KL-shaped rewards, clipped policy / value losses, KL controllers, PPO-Lag lambda
"""

from humanalign.losses.grpo import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    grpo_token_loss,
    k3_kl,
    kl_penalized_scores,
    reduce_grpo_loss,
    rloo_advantages,
    rloo_loss,
)
from humanalign.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOLagLambda,
    aggregate,
    clipped_surrogate_loss,
    clipped_value_loss,
    gae,
    kl_shaped_rewards,
    lagrangian_advantage,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
)
from humanalign.losses.preference import (
    DPO_LOSS_TYPES,
    LOSS_SPECS,
    LossSpec,
    ORPOLoss,
    PreferenceLoss,
    beta_schedule,
    compute_preference_loss,
    cpo_loss,
    dpo_loss,
    dpo_sft_loss,
    orpo_loss,
    pair_accuracy,
    simpo_loss,
)
from humanalign.losses.reward_cost import (
    ScoreLoss,
    cost_loss,
    cost_tokenwise_loss,
    divergence_span_mask,
    end_scores,
    first_divergence_index,
    reward_pairwise_loss,
    reward_tokenwise_loss,
)
from humanalign.losses.safe_mm_dpo import (
    LambdaState,
    expected_cost_pairwise,
    margin_scaled_beta,
    safe_mm_dpo_loss,
    update_lambda,
)
from humanalign.losses.sft import ptx_loss, sft_loss_sums

__all__ = [
    "ptx_loss", "sft_loss_sums",
    "GRPO_LOSS_TYPES", "group_advantages", "grpo_loss", "grpo_token_loss", "k3_kl", "kl_penalized_scores",
    "reduce_grpo_loss", "rloo_advantages", "rloo_loss",
    "AdaptiveKLController", "DPO_LOSS_TYPES", "FixedKLController", "LOSS_SPECS", "LambdaState", "LossSpec",
    "ORPOLoss", "PPOLagLambda", "PreferenceLoss", "ScoreLoss", "aggregate", "beta_schedule", "clipped_surrogate_loss",
    "clipped_value_loss", "compute_preference_loss", "cost_loss", "cost_tokenwise_loss", "cpo_loss",
    "divergence_span_mask", "dpo_loss", "dpo_sft_loss", "end_scores", "expected_cost_pairwise",
    "first_divergence_index", "gae", "kl_shaped_rewards", "lagrangian_advantage", "last_token_index",
    "margin_scaled_beta", "masked_mean", "masked_var", "masked_whiten", "orpo_loss", "pair_accuracy",
    "reward_pairwise_loss",
    "reward_tokenwise_loss", "safe_mm_dpo_loss", "simpo_loss", "update_lambda",
]
