"""`humanalign train dpo`: the DPO family (sigmoid/cDPO, hinge, IPO, robust, DPO+SFT, CPO, ORPO, SimPO)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.training import TrainingConfig, VisionFields

ReferenceMode = Literal["auto", "model", "adapter-disabled", "precomputed"]


class DPOConfig(VisionFields, TrainingConfig):
    """Offline preference optimisation on (prompt, chosen, rejected) pairs."""

    input_fields: ClassVar[tuple[str, ...]] = ("train_path",)  # checked by the CLI before any work

    policy_model_path: str = Field(
        "tiny", validation_alias=AliasChoices("policy_model_path", "model_name_or_path", "base_model_path"),
        description="Policy to train: folder, hub name or preset (tiny, smollm2-135m-instruct).",
    )
    ref_model_path: str | None = Field(None, description="Frozen reference model (default: the policy's start).")
    reference_mode: ReferenceMode = Field(
        "auto",
        description="Reference log-probs from: model (a frozen copy), adapter-disabled (LoRA off, no copy), "
        "precomputed (once, cached on disk), auto (adapter-disabled with LoRA, else model).",
    )
    output_dir: str = Field("models/dpo", description="Run folder; the final policy is saved here.")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    train_path: str = Field("data/train/helpful_pairs.jsonl", description="Training pairs (prepared JSONL or a source).")
    val_path: str | None = Field("data/val/helpful_pairs.jsonl", description="Validation pairs.")
    source: str = Field("pairs", description="Adapter that reads the pair files ('pairs' = prepare-data output).")
    pair_kind: Literal["helpful", "harmless"] = Field(
        "helpful", description="Which pairs to train on: helpful (ordered by helpfulness) or harmless (by safety)."
    )
    skip_invalid: bool = Field(False, description="Count and skip bad records instead of stopping at the first.")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "cpo", "orpo", "simpo"] = Field(
        "sigmoid", description="Which preference loss (see docs/algorithms)."
    )
    beta: float = Field(0.1, gt=0, description="Inverse temperature (ORPO: the paper's lambda; SimPO default 2.0).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO / robust: assumed label-noise rate.")
    sft_weight: float = Field(
        0.0, ge=0, validation_alias=AliasChoices("sft_weight", "rpo_alpha"),
        description="DPO+SFT (RPO): weight of the chosen response's NLL added to the loss.",
    )
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin (TRL's simpo_gamma).")
    cpo_alpha: float | None = Field(
        None, ge=0, description="NLL weight for CPO (default 1.0) and SimPO (default 0.0)."
    )
    average_log_prob: bool | None = Field(
        None, description="Mean instead of summed token log-probs (default per loss; true on sigmoid = MiniMind's DPO)."
    )
    beta_schedule: Literal["constant", "linear"] = Field("constant", description="linear: beta from beta_min to beta_max.")
    beta_min: float = Field(0.05, gt=0, description="Start beta of the linear schedule.")
    beta_max: float = Field(0.5, gt=0, description="End beta of the linear schedule.")
    precompute_cache_dir: str | None = Field(
        None, description="Where precomputed reference log-probs are cached (default: <cache>/ref_logps)."
    )
    disable_dropout: bool = Field(
        True, description="Set the policy's dropout to 0 (not LoRA's), so log-probs are deterministic (TRL's default)."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.beta_schedule == "linear" and self.beta_min > self.beta_max:
            raise ValueError("beta_min must not exceed beta_max")
        if self.loss_type in ("cpo", "orpo") and self.sft_weight:
            raise ValueError(f"loss_type {self.loss_type} has its own NLL term: set cpo_alpha (cpo) instead of "
                             "sft_weight, or nothing (orpo)")
        if self.cpo_alpha is not None and self.loss_type not in ("cpo", "simpo"):
            raise ValueError("cpo_alpha applies to loss_type cpo and simpo; use sft_weight for the DPO types")
        if self.loss_type == "simpo" and self.cpo_alpha is not None and self.sft_weight:
            raise ValueError("simpo: cpo_alpha and sft_weight both weigh the chosen NLL; set only one")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust", "cpo", "simpo"):
            raise ValueError(f"label_smoothing has no effect on loss_type {self.loss_type} (it applies to sigmoid "
                             "= cDPO, robust, cpo and simpo)")
        if self.reference_mode == "adapter-disabled" and not self.lora.enabled:
            raise ValueError("reference_mode adapter-disabled needs a LoRA policy (lora.enabled: true)")
        if self.reference_mode == "adapter-disabled" and self.ref_model_path:
            raise ValueError("reference_mode adapter-disabled uses the policy's own base; with ref_model_path "
                             "use reference_mode model or precomputed")
        if self.loss_type in ("orpo", "simpo") and self.average_log_prob is False:
            raise ValueError(f"loss_type {self.loss_type} is defined on averaged log-probs (average_log_prob: false "
                             "is not allowed; cpo is the summed, reference-free variant)")
        return self

    def nll_weights(self) -> dict[str, float]:
        """compute_preference_loss's NLL weights: sft_weight (DPO types; SimPO's cpo_alpha = CPO-SimPO) and
        cpo_alpha (CPO, default 1.0). ORPO's NLL term always has weight 1."""
        cpo_alpha = 1.0 if self.cpo_alpha is None else self.cpo_alpha
        if self.loss_type == "simpo":  # CPO-SimPO: the NLL goes through compute_preference_loss's sft_weight
            return {"sft_weight": self.sft_weight if self.cpo_alpha is None else self.cpo_alpha, "cpo_alpha": 0.0}
        return {"sft_weight": self.sft_weight, "cpo_alpha": cpo_alpha}

    def nll_used(self) -> bool:
        """Whether the loss has an NLL term on the chosen response (so the trainer logs ``nll``)."""
        weights = self.nll_weights()
        return self.loss_type == "orpo" or weights["sft_weight"] > 0 or (self.loss_type == "cpo"
                                                                           and weights["cpo_alpha"] > 0)
