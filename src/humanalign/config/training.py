"""Settings every trainer shares: the seed run-book's flat keys plus engine, model and LoRA settings."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.base import ConfigBase, check_prompt_length


class LoraSettings(ConfigBase):
    """LoRA / QLoRA through peft. Off by default (full fine-tuning)."""

    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear", "auto"] = Field(
        "auto", description="Modules to adapt: 'auto' (peft's default for the architecture), 'all-linear' or names."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base in 4 or 8 bit (bitsandbytes, GPU only)."
    )
    merge_on_save: bool = Field(False, description="Also save the base with the adapter merged in, as a full model.")
    top_layers: int | None = Field(
        None, ge=1, description="Adapt only the top N decoder layers (peft's layers_to_transform); unset: all layers."
    )
    trunk_cache_dir: str | None = Field(
        None, description="With top_layers: cache the frozen lower trunk's hidden states here, computed once per "
        "input row and shared by every run on the same base; forwards then run the top layers only "
        "(models/trunk_cache.py)."
    )
    trunk_cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage dtype of the cached trunk states (float16: half the disk, ~1e-3 rel. error)."
    )

    @model_validator(mode="after")
    def _trunk_needs_top_layers(self) -> LoraSettings:
        if self.trunk_cache_dir and not (self.enabled and self.top_layers):
            raise ValueError("trunk_cache_dir caches the frozen lower trunk: set enabled: true and top_layers too")
        return self


class ModelSettings(ConfigBase):
    """How a model is loaded."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto: trained weights fp32 (computed in bf16 by mixed_precision), "
        "frozen ones (reference, scoring models, the base under LoRA) bf16 on a GPU that supports it; fp32 on the "
        "CPU. bfloat16 trains pure bf16 (no fp32 weights: small updates round away)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (off: safe).")
    gguf_file: str | None = Field(None, description="GGUF file inside the model folder to load (dequantised).")
    attn_implementation: str | None = Field(
        None, description="Attention kernel, e.g. 'sdpa', 'flash_attention_2'. Unset: flash_attention_2 for bf16/fp16 "
        "weights on a GPU with flash_attn installed, else transformers' default (sdpa)."
    )
    chat_template: str = Field(
        "auto", description="'auto' (the tokenizer's own, else chatml), 'chatml', 'safe-rlhf', or a Jinja file."
    )


class VisionFields(ConfigBase):
    """What a vision-language model trains and how many images a record may show (SFT, DPO, Safe-MM-DPO, RM)."""

    freeze_vision_tower: bool = Field(
        True, description="Vision-language model: keep the vision tower's weights fixed (under LoRA they always are)."
    )
    freeze_projector: bool = Field(
        False, description="Vision-language model: keep the image projector fixed (else it trains, also under LoRA)."
    )
    max_images_per_prompt: int | None = Field(
        None, ge=1, description="Vision-language model: the most images one record may show (default: what the "
        "model's context length allows); a record with more stops the load naming its file and line.",
    )


class TrainingConfig(ConfigBase):
    """Engine settings shared by every trainer; top-level keys as the seed run-book writes them."""

    output_fields: ClassVar[dict[str, str]] = {"output_dir": "folder", "logging_dir": "folder"}

    output_dir: str = Field("runs/train", description="Run folder: checkpoints, final model, metrics, config.")
    logging_dir: str | None = Field(None, description="Where metrics.jsonl and TensorBoard events go (default: output_dir).")
    overwrite_output_dir: bool = Field(False, description="Allow writing into an output_dir that already holds a run.")
    resume_from_checkpoint: str | None = Field(None, description="Checkpoint folder to resume from, or 'latest'.")
    seed: int = Field(42, description="Seed for python, numpy and torch (data order included).")

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, description="AdamW epsilon.")
    optim: Literal["adamw_torch_fused", "adamw_torch"] = Field(
        "adamw_torch_fused", description="AdamW kernel: fused (one kernel over all tensors; the default, as in "
        "transformers) or torch's foreach loop; fused falls back to foreach where torch has no fused kernel."
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "cosine_floor"] = Field(
        "cosine", description="Schedule after warmup; cosine_floor is MiniMind's cosine that ends at lr/10."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup as a fraction of all steps (if warmup_steps is 0).")

    batch_size: int = Field(
        8, ge=1, validation_alias=AliasChoices("batch_size", "per_device_train_batch_size"),
        description="Examples per device per micro-batch.",
    )
    eval_batch_size: int | None = Field(None, ge=1, description="Evaluation batch size (default: batch_size).")
    epochs: float = Field(
        1, gt=0, validation_alias=AliasChoices("epochs", "num_train_epochs"), description="Passes over the training data."
    )
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps; overrides epochs when set.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm (null: no clipping).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, else no (fp32)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")

    eval_on_start: bool = Field(
        True, validation_alias=AliasChoices("eval_on_start", "eval_at_start"),
        description="Evaluate once before the first step: the baseline, logged at step 0.",
    )
    logging_steps: int = Field(10, ge=1, description="Write metrics every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps (null: at the end only).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps (null: at the end only).")
    save_total_limit: int | None = Field(
        3, ge=1, description="Keep at most N checkpoints, oldest deleted first; the newest and the best are always "
        "kept (null: keep all; each holds the weights and the optimizer state, ~3x the model's size)."
    )
    load_best_model_at_end: bool = Field(False, description="Finish with the checkpoint that had the best eval metric.")
    metric_for_best_model: str = Field("eval/loss", description="Eval metric that picks the best checkpoint.")
    greater_is_better: bool = Field(False, description="Whether a larger metric_for_best_model is better.")
    max_nonfinite_steps: int = Field(5, ge=1, description="Stop after this many NaN/inf losses in a row (each skipped).")
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(
        ["tensorboard"], description="Loggers beside metrics.jsonl."
    )
    wandb_project: str = Field("humanalign", description="Weights & Biases project when report_to has wandb.")
    progress_bar: bool = Field(True, description="Show a progress bar with step, ETA and key metrics.")

    max_length: int = Field(512, ge=8, description="Max tokens of prompt + response; the prompt is cut from the left.")
    max_prompt_length: int = Field(
        256, ge=1, description="Max prompt tokens kept (cut from the left); when unset and max_length is at most "
        "256: half of max_length.",
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length to compute fewer pad tokens.")
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    model: ModelSettings = Field(default_factory=ModelSettings, description="Model loading settings.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA / QLoRA settings.")

    @model_validator(mode="after")
    def _check_lengths(self):
        check_prompt_length(self)
        return self
