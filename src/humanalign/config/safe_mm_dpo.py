"""`humanalign train safe-mm-dpo`: margin-scaled DPO with a Lagrangian balance of helpfulness and harmlessness.

Accepts the seed run-book's keys as written there (Greek included): ``β_ori``, ``λ_init``, ``λ_lr``, ``w``, ``k``,
``kl_coeff``, ``policy_model_path``, ``ref_model_path``, ``helpful_rm_path``, ``harmless_rm_path``,
``train_helpful_path``, ``train_harmless_path``, ``val_helpful_path``, ``val_harmless_path``; and the earlier
name ``use_safety_stream`` for ``use_harmless_stream``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.dpo import ReferenceMode
from humanalign.config.training import TrainingConfig, VisionFields


class SafeMMDPOConfig(VisionFields, TrainingConfig):
    """Safe-MM-DPO and its ablations (Safe-DPO: w=0; reward shaping: update_lambda=false; MM-DPO: no harmless stream)."""

    input_fields: ClassVar[tuple[str, ...]] = ("train_helpful_path",)  # checked by the CLI before any work

    policy_model_path: str = Field(
        "tiny", validation_alias=AliasChoices("policy_model_path", "model_name_or_path"),
        description="Policy to train (usually the SFT model): folder, hub name or preset.",
    )
    ref_model_path: str | None = Field(None, description="Frozen reference (default: the policy's start).")
    reference_mode: ReferenceMode = Field("auto", description="Reference log-probs from: model, adapter-disabled, precomputed, auto.")
    helpful_rm_path: str | None = Field(
        "models/helpful_rm", description="Helpful reward model for delta_h (null: margins 0, beta = beta_ori)."
    )
    harmless_rm_path: str | None = Field(
        "models/harmless_rm", description="Cost model for delta_s and expected cost (null: margins 0, labels only)."
    )
    output_dir: str = Field("models/aligned", description="Run folder; the aligned policy is saved here.")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    train_helpful_path: str = Field("data/train/helpful_pairs.jsonl", description="Helpful pairs for training.")
    train_harmless_path: str | None = Field(
        "data/train/harmless_pairs.jsonl", description="Harmless pairs for training (null: no harmless stream = MM-DPO)."
    )
    val_helpful_path: str | None = Field("data/val/helpful_pairs.jsonl", description="Helpful pairs for validation.")
    val_harmless_path: str | None = Field("data/val/harmless_pairs.jsonl", description="Harmless pairs for validation.")
    skip_invalid: bool = Field(False, description="Count and skip bad records instead of stopping at the first.")

    beta_ori: float = Field(
        0.1, gt=0, validation_alias=AliasChoices("beta_ori", "β_ori", "beta"), description="Base DPO beta (MM-DPO's beta_ori)."
    )
    w: float = Field(0.5, ge=0, description="Beta growth with the margin: beta in [beta_ori, (1 + w) beta_ori]; 0 = fixed beta.")
    k: float = Field(0.5, gt=0, description="Rate at which beta saturates with the reward margin.")
    kl_coeff: float = Field(0.0, ge=0, description="Weight of the exact per-token KL(pi || pi_ref) term.")
    average_log_prob: bool = Field(False, description="Mean instead of summed token log-probs in the log-ratios.")

    use_harmless_stream: bool = Field(
        True, validation_alias=AliasChoices("use_harmless_stream", "use_safety_stream"),
        description="false: helpful pairs only (MM-DPO alone, lambda unused). Alias: use_safety_stream.",
    )
    lambda_init: float = Field(
        1.0, ge=0, validation_alias=AliasChoices("lambda_init", "λ_init"), description="Starting Lagrange multiplier."
    )
    lambda_lr: float = Field(
        0.05, ge=0, validation_alias=AliasChoices("lambda_lr", "λ_lr"), description="Dual-ascent step size for lambda."
    )
    lambda_max: float = Field(
        10.0, gt=0, validation_alias=AliasChoices("lambda_max", "λ_max"), description="Cap on lambda (run-book guard)."
    )
    update_lambda: bool = Field(True, description="false: lambda stays at lambda_init (fixed reward shaping).")
    lambda_update_interval: int = Field(1, ge=1, description="Update lambda every N optimizer steps.")
    lambda_update_delay_steps: int = Field(0, ge=0, description="No lambda update before this optimizer step.")
    cost_threshold: float = Field(
        0.0, validation_alias=AliasChoices("cost_threshold", "threshold", "d"),
        description="Constraint J_c <= d; cost <= 0 means safe.",
    )
    expected_cost: Literal["pairwise", "sampled"] = Field(
        "pairwise", description="J_c from the policy's implicit choice on harmless pairs, or from sampled answers."
    )
    cost_window_size: int = Field(256, ge=1, description="Recent harmless pairs (or samples) averaged into J_c.")
    sampled_prompts_path: str | None = Field(None, description="Held-out prompts for expected_cost: sampled.")
    sampled_num_prompts: int = Field(16, ge=1, description="Prompts generated per lambda update when sampled.")
    sampled_max_new_tokens: int = Field(48, ge=1, description="Answer length when estimating J_c by sampling.")
    margin_batch_size: int = Field(32, ge=1, description="Batch size when scoring margins before training.")
    source: str = Field("pairs", description="Adapter that reads the pair files ('pairs' = prepare-data output).")
    share_responses: bool = Field(
        True, description="Forward each response once per step when a helpful and a harmless pair hold the same "
        "prompt and the same two responses (PKU-SafeRLHF); false: every pair forwarded on its own.",
    )
    precompute_cache_dir: str | None = Field(
        None, description="Where precomputed reference log-probs are cached (default: <cache>/ref_logps)."
    )
    disable_dropout: bool = Field(
        True, description="Set the policy's dropout to 0 (not LoRA's), so log-probs are deterministic (TRL's default)."
    )
    measure_kl: bool = Field(
        True, description="With kl_coeff 0, still measure the exact KL (first micro-batch of logged steps, and "
        "evaluation); false skips its extra head work (and, on models without the fused path, a full-logits forward).",
    )
    metric_for_best_model: str = Field("eval/loss_total", description="Eval metric that picks the best checkpoint.")
    group_by_length: bool = Field(
        False, description="Batch pairs of similar length (off by default here: length-sorted batches would make "
        "the recent pairs in lambda's cost window alike, e.g. all benign, and bias J_c).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.expected_cost == "sampled" and self.use_harmless_stream and not self.sampled_prompts_path:
            raise ValueError("expected_cost: sampled needs sampled_prompts_path")
        if self.expected_cost == "sampled" and self.use_harmless_stream and not self.harmless_rm_path:
            raise ValueError("expected_cost: sampled scores the policy's answers with the cost model: set "
                             "harmless_rm_path")
        if self.kl_coeff > 0 and self.reference_mode == "precomputed":
            raise ValueError("kl_coeff > 0 needs the reference's full distributions: reference_mode model, "
                             "adapter-disabled or auto (precomputed keeps only summed log-probs)")
        if self.lambda_init > self.lambda_max:
            raise ValueError(f"lambda_init ({self.lambda_init}) exceeds lambda_max ({self.lambda_max})")
        return self
