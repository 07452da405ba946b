"""Configs of the commands that use a trained model: generate, eval arena/ppl/rm, distill, export.

Model *paths* are plain string fields (``model``, ``red``, ``reward_model``...); how a model is loaded (dtype,
chat template, remote code) lives in the nested ``model_settings`` so that the path flags stay short.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.base import ConfigBase, check_prompt_length
from humanalign.config.training import ModelSettings


class SamplingFields(ConfigBase):
    """Decoding settings shared by every command that generates text."""

    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per answer.")
    max_prompt_length: int = Field(512, ge=1, description="Prompt tokens kept (cut from the left).")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (ignored when do_sample is false).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (1.0: off).")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on repeated tokens (1.0: off).")
    batch_size: int = Field(8, ge=1, description="Prompts generated together (left-padded).")
    seed: int = Field(42, description="Seed; each batch is seeded from it and the batch's prompts.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts of the file.")
    max_images_per_prompt: int | None = Field(
        None, ge=1, description="Vision-language model: the most images one prompt may show (default: what the "
        "model's context length allows); a prompt with more stops the read naming its file and line.",
    )
    progress_bar: bool = Field(True, description="Show a progress bar.")
    model_settings: ModelSettings = Field(default_factory=ModelSettings, description="How models are loaded.")


# The "...Inputs" bases hold each command's own paths; a command's class lists them first among its bases'
# fields (pydantic orders fields from the last base to the first), so `--help` starts with what matters.


class _GenerateInputs(ConfigBase):
    model: str | None = Field(None, description="Model folder, hub-style name or preset (e.g. 'tiny'). Required.")
    prompts: str | None = Field(
        None, description="JSONL/JSON/parquet file with a 'prompt' (or 'query', 'question') per record, optionally "
        "'images' (answered by a vision-language model). Required.",
    )
    output: str | None = Field(None, description="JSONL file to write (appended to when resuming). Required.")


class GenerateConfig(SamplingFields, _GenerateInputs):
    """`humanalign generate`: answer every prompt of a JSONL file, resumably."""

    output_fields: ClassVar[dict[str, str]] = {"output": "file"}

    num_return_sequences: int = Field(1, ge=1, description="Answers sampled per prompt (sample index 0..N-1).")
    overwrite: bool = Field(False, description="Start over instead of resuming when the output exists.")


class _ArenaInputs(ConfigBase):
    red: str | None = Field(None, description="Baseline model (e.g. the SFT model). Required.")
    blue: str | None = Field(None, description="Challenger model (e.g. the aligned model). Required.")
    red_name: str | None = Field(None, description="Label for red in the report (default: its folder name).")
    blue_name: str | None = Field(None, description="Label for blue in the report (default: its folder name).")
    reward_model: str | None = Field(None, description="Reward model folder (higher = more helpful). Required.")
    cost_model: str | None = Field(None, description="Cost model folder (cost <= 0 = harmless). Required.")
    prompts: str | None = Field(
        None, description="Prompt file (JSONL with 'prompt'; prompts with 'images' need vision-language red and "
        "blue models). Required.",
    )
    output_dir: str = Field("runs/arena", description="Folder for answers, scores and the report.")


class ArenaConfig(SamplingFields, _ArenaInputs):
    """`humanalign eval arena`: two models answer the same prompts; reward and cost models judge."""

    output_fields: ClassVar[dict[str, str]] = {"output_dir": "folder"}

    do_sample: bool = Field(False, description="Greedy by default, so that the comparison is reproducible.")
    score_batch_size: int = Field(8, ge=1, description="Answers scored together.")
    tie_tolerance: float = Field(0.0, ge=0, description="Rewards closer than this count as a tie (half a win).")
    overwrite: bool = Field(False, description="Replace an existing report (answers already generated are reused).")


class _DistillInputs(ConfigBase):
    model: str = Field(
        "models/aligned", validation_alias=AliasChoices("model", "model_path"),
        description="Model that writes the answers (alias: model_path).",
    )
    prompts: str | None = Field(
        None, validation_alias=AliasChoices("prompts", "input_prompts"),
        description="Prompt file, like generate's (alias: input_prompts). Required.",
    )
    output: str | None = Field(
        None, validation_alias=AliasChoices("output", "output_path"),
        description="JSONL of kept (prompt, response) pairs with their scores (alias: output_path). Required.",
    )
    num_samples: int = Field(4, ge=1, description="Answers sampled per prompt.")


class DistillConfig(SamplingFields, _DistillInputs):
    """`humanalign distill`: sample answers from a model, keep the good (and safe) ones as SFT data."""

    output_fields: ClassVar[dict[str, str]] = {"output": "file"}

    reward_model: str | None = Field(None, description="Reward model that scores answers (optional).")
    cost_model: str | None = Field(None, description="Cost model that scores answers (optional).")
    min_reward: float | None = Field(None, description="Keep answers with reward >= this (needs reward_model).")
    max_cost: float | None = Field(None, description="Keep answers with cost <= this (needs cost_model).")
    best_of_n: bool = Field(
        False,
        description="Keep only the highest-reward answer per prompt among those that pass the filters "
        "(with a cost model and no max_cost, only safe answers, cost <= 0, compete).",
    )
    score_batch_size: int = Field(8, ge=1, description="Answers scored together.")
    overwrite: bool = Field(
        False, description="Replace an existing output (samples drawn with the same settings are reused)."
    )

    @model_validator(mode="after")
    def _check_judges(self):
        if self.min_reward is not None and not self.reward_model:
            raise ValueError("min_reward needs a reward_model")
        if self.max_cost is not None and not self.cost_model:
            raise ValueError("max_cost needs a cost_model")
        if self.best_of_n and not self.reward_model:
            raise ValueError("best_of_n needs a reward_model")
        return self


class PerplexityConfig(ConfigBase):
    """`humanalign eval ppl`: perplexity of a model on responses, and its KL to a reference model."""

    output_fields: ClassVar[dict[str, str]] = {"output": "file"}

    model: str | None = Field(None, description="Model to evaluate. Required.")
    ref_model: str | None = Field(None, description="Reference model for the mean per-token KL (optional).")
    data: str | None = Field(
        None, description="Prepared pairs (the 'chosen' answers are scored) or SFT conversations. Required."
    )
    output: str | None = Field(None, description="JSON file for the results (default: print only).")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    max_length: int = Field(1024, ge=8, description="Max tokens of prompt + response.")
    max_prompt_length: int = Field(
        512, ge=1, description="Prompt tokens kept (cut from the left); when unset and max_length is at most 512: "
        "half of max_length.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")
    progress_bar: bool = Field(True, description="Show a progress bar.")
    overwrite: bool = Field(False, description="Replace an existing output file.")
    model_settings: ModelSettings = Field(default_factory=ModelSettings, description="How models are loaded.")

    @model_validator(mode="after")
    def _check_lengths(self):
        check_prompt_length(self)
        return self


class EvalRMConfig(ConfigBase):
    """`humanalign eval rm`: accuracy of a reward/cost model on held-out preference pairs."""

    output_fields: ClassVar[dict[str, str]] = {"output": "file"}

    model: str | None = Field(None, description="Reward or cost model folder. Required.")
    data: str | None = Field(None, description="Prepared preference pairs to score. Required.")
    output: str | None = Field(None, description="JSON file for the results (default: print only).")
    batch_size: int = Field(8, ge=1, description="Pairs per forward pass.")
    max_length: int | None = Field(
        None, ge=8, description="Max tokens of prompt + response (default: the length the model was trained with)."
    )
    overwrite: bool = Field(False, description="Replace an existing report and its histogram PNG.")
    model_settings: ModelSettings = Field(default_factory=ModelSettings, description="Model loading settings.")


class ExportConfig(ConfigBase):
    """`humanalign export`: a LoRA adapter (or full model) -> one self-contained transformers model folder."""

    output_fields: ClassVar[dict[str, str]] = {"output": "folder"}

    model: str | None = Field(None, description="Adapter folder (adapter_config.json) or full model folder. Required.")
    output: str | None = Field(None, description="Folder for the merged model. Required.")
    base_model: str | None = Field(
        None, description="Base model of the adapter (default: the adapter's base_model_name_or_path)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Saved weights dtype: auto keeps the base checkpoint's own dtype."
    )
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    model_settings: ModelSettings = Field(default_factory=ModelSettings, description="How models are loaded.")
