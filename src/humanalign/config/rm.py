"""`humanalign train rm`: the Helpful-RM (Bradley-Terry) and the Harmless cost model (Safe RLHF)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.data import RecordType
from humanalign.config.training import TrainingConfig, VisionFields

DEFAULT_OUTPUT_DIRS = {"helpful": "models/helpful_rm", "harmless": "models/harmless_rm"}


class RewardModelConfig(VisionFields, TrainingConfig):
    """Train a score model: `task: helpful` -> reward model on helpful pairs, `harmless` -> cost model."""

    task: Literal["helpful", "harmless"] = Field("helpful", description="helpful: reward model; harmless: cost model.")
    base_model_path: str = Field(
        "tiny", validation_alias=AliasChoices("base_model_path", "model_name_or_path"),
        description="Backbone: a causal LM or encoder folder, hub name, or preset (tiny, minilm-l6-v2, smollm2-135m-instruct).",
    )
    output_dir: str = Field(
        "models/helpful_rm",
        description="Run folder; the final score model is saved in its final/ (default by task: models/helpful_rm, "
        "models/harmless_rm).",
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    train_helpful_path: str = Field("data/train/helpful_pairs.jsonl", description="Helpful pairs for training.")
    val_helpful_path: str | None = Field("data/val/helpful_pairs.jsonl", description="Helpful pairs for validation.")
    train_harmless_path: str = Field("data/train/harmless_pairs.jsonl", description="Harmless pairs for training.")
    val_harmless_path: str | None = Field("data/val/harmless_pairs.jsonl", description="Harmless pairs for validation.")
    source: str = Field("pairs", description="Adapter that reads the pair files (see `prepare-data`; 'pairs' = ours).")
    field_map: dict[str, Any] = Field(
        default_factory=dict, description="generic adapter: our field -> the file's field, or a constant "
        "(e.g. {prompt: prompt, chosen: safer, rejected: unsafer, is_chosen_safe: true, is_rejected_safe: false}).",
    )
    constants: dict[str, Any] = Field(
        default_factory=dict, description="generic adapter: our field -> constant value (strings included).",
    )
    record_type: RecordType | None = Field(None, description="generic adapter: the record type it builds.")
    skip_invalid: bool = Field(False, description="Count and skip bad records instead of stopping at the first.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training pairs.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many validation pairs.")
    loss_granularity: Literal["sequence", "token"] = Field(
        "sequence", description="sequence: score at the last token; token: Safe RLHF's token-wise loss."
    )
    use_margin: bool = Field(True, description="Subtract a pair's margin (when the data has one) inside the sigmoid.")
    regularization: float = Field(0.001, ge=0, description="Weight of mean(score^2), keeps scores near zero.")
    center_rewards_coefficient: float = Field(0.0, ge=0, description="TRL-style centering: coef * mean((r_w + r_l)^2).")
    use_sign_terms: bool = Field(True, description="Cost model: add the safe/unsafe sign terms when labels exist.")
    head_lr_multiplier: float = Field(
        1.0, gt=0, description="Learning rate of the score head (a decoder's score layer; an encoder's pooler and "
        "classifier) = learning_rate x this. A fresh head starts near zero: a larger rate gets it learning sooner.",
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="Layer-wise learning-rate decay: the top transformer layer trains at "
        "learning_rate, each layer below at this factor times the rate of the one above, the embeddings at "
        "factor^num_layers (1: one rate for the whole backbone).",
    )
    normalizer: Literal["none", "running", "ema"] = Field(
        "ema", description="Score normalisation statistics kept while training and saved with the model."
    )
    normalizer_momentum: float = Field(0.9, gt=0, lt=1, description="EMA momentum of the score statistics.")
    calibrate_sign: bool | None = Field(
        None, description="Cost model: after training, move the decision point (cost > 0 = unsafe) to the offset "
        "that best splits the validation split's labelled safe and unsafe answers, saved with the model "
        "(models/calibration.py). Default (null): on for task harmless when the validation pairs carry labels.",
    )

    @model_validator(mode="before")
    @classmethod
    def _output_dir_by_task(cls, data: Any) -> Any:
        # a cost model must not land in the Helpful-RM's default folder when output_dir is left out
        if isinstance(data, dict) and data.get("task") == "harmless" and "output_dir" not in data:
            data = {**data, "output_dir": DEFAULT_OUTPUT_DIRS["harmless"]}
        return data

    @model_validator(mode="after")
    def _check_rm(self):
        if self.loss_granularity == "token" and self.center_rewards_coefficient > 0:
            raise ValueError("center_rewards_coefficient applies to the sequence-wise loss only "
                             "(set loss_granularity: sequence or center_rewards_coefficient: 0)")
        if self.calibrate_sign and self.task != "harmless":
            raise ValueError("calibrate_sign applies to cost models only (task: harmless)")
        if self.calibrate_sign and self.val_path is None:
            raise ValueError("calibrate_sign needs labelled validation pairs: set val_harmless_path")
        if self.load_best_model_at_end and self.val_path is None:
            raise ValueError(f"load_best_model_at_end needs validation data: set val_{self.task}_path")
        return self

    @property
    def score_type(self) -> str:
        """'reward' for the helpful task, 'cost' for the harmless one."""
        return "reward" if self.task == "helpful" else "cost"

    @property
    def train_path(self) -> str:
        return self.train_helpful_path if self.task == "helpful" else self.train_harmless_path

    def input_targets(self) -> list[tuple[str, str]]:
        return [(f"train_{self.task}_path", self.train_path)]

    @property
    def val_path(self) -> str | None:
        return self.val_helpful_path if self.task == "helpful" else self.val_harmless_path
