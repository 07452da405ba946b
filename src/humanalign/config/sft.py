"""`humanalign train sft`: supervised fine-tuning on conversations (loss on assistant tokens only)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.data import RecordType
from humanalign.config.training import TrainingConfig, VisionFields


class SFTConfig(VisionFields, TrainingConfig):
    """SFT data, model and packing on top of the shared engine settings."""

    input_fields: ClassVar[tuple[str, ...]] = ("train_path",)  # checked by the CLI before any work

    output_dir: str = Field("runs/sft", description="Run folder: checkpoints, final model (final/), metrics, config.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    model_name_or_path: str = Field(
        "tiny",
        validation_alias=AliasChoices("model_name_or_path", "base_model_path", "policy_model_path", "model_path"),
        description="Model to fine-tune: a local folder, a preset ('tiny', 'smollm2-135m-instruct') or a Hub id.",
    )
    train_path: str = Field(
        "data/train/helpful_pairs.jsonl",
        validation_alias=AliasChoices("train_path", "train_file", "dataset_path"),
        description="Training data: a file or folder in any supported format (SFT conversations, prompt/"
        "response, Alpaca, preference pairs -> prompt + chosen, PKU-SafeRLHF ...).",
    )
    val_path: str | None = Field(
        None, validation_alias=AliasChoices("val_path", "eval_path", "validation_file"),
        description="Validation data (same formats) for eval loss and perplexity (null: none, or val_ratio).",
    )
    val_ratio: float = Field(
        0.0, ge=0, lt=1, description="Without val_path: hold out this share of the training prompts for validation.",
    )
    source: str = Field(
        "auto", validation_alias=AliasChoices("source", "format"),
        description="Adapter for the data files ('auto' detects it; e.g. generic, pku-saferlhf, alpaca, swift).",
    )
    field_map: dict[str, Any] = Field(
        default_factory=dict, description="generic adapter: our field -> the file's field (e.g. {response: output}).",
    )
    record_type: RecordType | None = Field(None, description="generic adapter: the record type it builds (e.g. sft).")
    pair_kind: Literal["helpful", "harmless"] = Field(
        "helpful", description="From preference data, imitate the helpfulness-preferred (helpful) or the safer "
        "(harmless) response.",
    )
    only_safe_responses: bool = Field(
        False, description="Skip (and count) examples whose response is labelled unsafe.",
    )
    system_prompt: str | None = Field(None, description="System message added to conversations that have none.")
    skip_invalid: bool = Field(False, description="Skip (and count) bad records instead of stopping at the first.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training conversations.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many validation conversations.")
    packing: bool = Field(
        False, description="Pack several short examples into each max_length row (separate position ids, no "
        "attention across examples).",
    )
    freeze_language_model: bool = Field(
        False, description="Vision-language model: keep the language model fixed, so that only the projector (and "
        "the tower, if not frozen) trains: LLaVA's first stage, aligning image features with the language model.",
    )

    @model_validator(mode="after")
    def _check_eval(self):
        if self.load_best_model_at_end and self.val_path is None and self.val_ratio == 0:
            raise ValueError("load_best_model_at_end needs validation data: set val_path or val_ratio")
        if self.freeze_language_model and self.lora.enabled:
            raise ValueError("freeze_language_model: true with lora.enabled: LoRA adapts the language model; turn "
                             "one off (projector-only training needs no LoRA)")
        return self
