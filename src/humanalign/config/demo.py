"""`humanalign demo`: the whole pipeline on the embedded default (tiny model, generated data), no download."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from humanalign.config.base import ConfigBase


class DemoConfig(ConfigBase):
    """What the demo runs and where it writes; each run gets a fresh timestamped folder."""

    output_fields: ClassVar[dict[str, str]] = {"output_dir": "folder"}

    output_dir: str = Field("demo_out", description="Parent folder; each demo run writes a new timestamped folder inside.")
    num_records: int = Field(3000, ge=100, description="Demo records generated in the PKU-SafeRLHF schema.")
    seed: int = Field(0, description="Seed for data, models and training.")
    stages: list[str] | None = Field(None, description="Run only these stages (default: all, in order).")
