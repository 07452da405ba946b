"""Fixtures shared by the trainer tests; makes ``word_world`` (the online trainers' test world) importable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from humanalign.config.base import load_config
from humanalign.config.data import PrepareDataConfig
from humanalign.data.image_demo import write_image_demo
from humanalign.data.prepare import run as prepare
from humanalign.models.tiny_vision import build_tiny_vision_model

sys.path.insert(0, str(Path(__file__).parent))  # word_world.py: the online trainers' shared test world


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA folder and 40 generated picture questions prepared into train/val pairs (one per test
    module: the vision trainer tests of SFT, DPO and the reward model)."""
    root = tmp_path_factory.mktemp("vision_run")
    model = build_tiny_vision_model(root / "tiny_vision", seed=0)
    raw = write_image_demo(root / "raw", n=40, seed=0, size=32)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return {"root": root, "model": model, "train": root / "data" / "train" / "helpful_pairs.jsonl",
            "val": root / "data" / "val" / "helpful_pairs.jsonl"}


@pytest.fixture
def two_image_pairs(vision_run, tmp_path) -> Path:
    """A swift pair file whose line 2 shows two images (line 1 shows one): for the max_images_per_prompt checks."""
    image = json.loads(vision_run["train"].read_text().splitlines()[0])["images"][0]
    pair = {"query": "<image>\nWhat colour is the shape?", "response": "Red.", "rejected_response": "Blue."}
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({**pair, "images": [image]}) + "\n" + json.dumps(
        {**pair, "query": "<image> and <image>: same colour?", "images": [image, image]}) + "\n")
    return data
