"""`humanalign prepare-data` and data-source specs shared by every command that reads preference data."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from humanalign.config.base import ConfigBase

RecordType = Literal["preference", "harmless", "safety_preference", "safety_label", "sft", "prompt"]
PairKind = Literal["auto", "helpful", "harmless"]


class SourceSpec(ConfigBase):
    """One data source: a local file/folder or a `datasets` hub name, read through a named adapter."""

    source: str = Field(
        "auto",
        validation_alias=AliasChoices("source", "format", "adapter"),
        description="Adapter name (pku-saferlhf, beavertails, hh-rlhf, ultrafeedback, swift, minimind, alpaca, "
        "generic, prompts, pairs) or 'auto' to detect it from the first record's fields.",
    )
    path: str | None = Field(None, description="Local .jsonl/.json/.parquet(.gz) file, or a folder of them.")
    dataset: str | None = Field(
        None, description="`datasets.load_dataset` name (hub id, or a builder such as 'json' with data_files)."
    )
    subset: str | None = Field(None, validation_alias=AliasChoices("subset", "name", "config_name"),
                               description="Dataset configuration name (load_dataset's second argument).")
    split: str = Field("train", description="Dataset split to read (hub datasets only).")
    data_files: str | list[str] | None = Field(None, description="data_files passed to load_dataset.")
    data_dir: str | None = Field(None, description="data_dir passed to load_dataset (e.g. 'harmless-base').")
    cache_dir: str | None = Field(None, description="Cache folder for load_dataset (default: datasets' own).")
    ratio: float = Field(
        1.0, gt=0, le=1,
        description="Fraction of this source's records to keep (a seeded sample), for mixing several sources.",
    )
    max_records: int | None = Field(None, ge=1, description="Keep at most this many records (after ratio).")
    field_map: dict[str, Any] = Field(
        default_factory=dict,
        description="generic adapter: our field -> raw field (dotted for nested, e.g. metadata.score); a "
        "non-string value (true, 1.5) is a constant, e.g. {prompt: prompt, chosen: safer, rejected: unsafer, "
        "is_chosen_safe: true, is_rejected_safe: false}.",
    )
    constants: dict[str, Any] = Field(
        default_factory=dict, description="generic adapter: our field -> constant value (strings included)."
    )
    record_type: RecordType | None = Field(
        None, description="generic adapter: the record it builds (preference, harmless, safety_preference, "
        "safety_label, sft, prompt); default: harmless when safety fields are mapped, else preference.",
    )
    pair_kind: PairKind = Field(
        "auto", description="Which pairs plain preference pairs feed: auto (helpful), helpful or harmless "
        "(e.g. hh-rlhf harmless-base: harmless pairs without safety labels).",
    )
    label: str | None = Field(None, description="Name shown in reports (default: the path or dataset).")

    @model_validator(mode="after")
    def _one_location(self):
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (local file or folder) and 'dataset' (datasets name)")
        return self

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.path is not None:
            return self.path
        extra = f"/{self.subset}" if self.subset else ""
        return f"{self.dataset}{extra}[{self.split}]"

    def adapter_options(self) -> dict[str, Any]:
        return {"field_map": dict(self.field_map), "constants": dict(self.constants),
                "record_type": self.record_type, "pair_kind": self.pair_kind}


class PrepareDataConfig(ConfigBase):
    """Raw preference data -> {train,val,test}/{helpful,harmless}_pairs.jsonl, split by prompt, plus a data card."""

    output_fields: ClassVar[dict[str, str]] = {"output_dir": "folder"}

    input_dir: str = Field(
        "data/raw", validation_alias=AliasChoices("input_dir", "input", "raw_dir"),
        description="Folder (or single file) of raw data files; ignored when 'sources' is given.",
    )
    output_dir: str = Field("data", description="Where {train,val,test}/*_pairs.jsonl and data_card.* are written.")
    train_ratio: float = Field(0.8, ge=0, le=1, description="Share of prompts in the train split.")
    val_ratio: float = Field(0.1, ge=0, le=1, description="Share of prompts in the val split.")
    test_ratio: float = Field(0.1, ge=0, le=1, description="Share of prompts in the test split.")
    seed: int = Field(42, description="Seed of the hash that assigns prompts to splits (and of ratio sampling).")
    source: str = Field("auto", description="Adapter for the files in input_dir ('auto' detects per file).")
    field_map: dict[str, Any] = Field(default_factory=dict, description="generic adapter field map for input_dir.")
    record_type: RecordType | None = Field(None, description="generic adapter record type for input_dir.")
    pair_kind: PairKind = Field("auto", description="Which pairs plain preference pairs of input_dir feed.")
    sources: list[SourceSpec] = Field(
        default_factory=list, description="Sources to mix (each: source, path or dataset, ratio, field_map ...)."
    )
    overwrite: bool = Field(False, description="Replace existing output files (refused otherwise).")
    skip_invalid: bool = Field(False, description="Skip (and count) bad records instead of stopping at the first.")
    deduplicate: bool = Field(True, description="Drop repeated (prompt, chosen, rejected) pairs, counted.")

    @model_validator(mode="after")
    def _ratios_sum_to_one(self):
        total = self.train_ratio + self.val_ratio + self.test_ratio
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train_ratio + val_ratio + test_ratio must sum to 1, got {self.train_ratio} + {self.val_ratio} "
                f"+ {self.test_ratio} = {total:g}"
            )
        if self.train_ratio <= 0:
            raise ValueError("train_ratio must be above 0")
        return self

    def source_specs(self) -> list[SourceSpec]:
        """The sources to read: the explicit list, else input_dir through `source`."""
        if self.sources:
            return list(self.sources)
        return [SourceSpec(source=self.source, path=self.input_dir, field_map=self.field_map,
                           record_type=self.record_type, pair_kind=self.pair_kind)]
