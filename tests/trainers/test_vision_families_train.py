"""`train dpo` and `train sft` on a saved tiny Idefics3 (tiles: 5-D pixel values and a pixel_attention_mask), the
generated picture questions: the folder reloads with AutoProcessor / AutoModelForImageTextToText and encodes as
the in-memory processor does, one step of each trainer moves the connector (projector) and the text model and
leaves the frozen vision tower alone, the saved run folder loads with the Auto classes, and LoRA adapts the text
model only (the connector trained fully)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from humanalign.config.base import load_config
from humanalign.config.data import PrepareDataConfig
from humanalign.config.dpo import DPOConfig
from humanalign.config.sft import SFTConfig
from humanalign.config.training import LoraSettings
from humanalign.data.image_demo import write_image_demo
from humanalign.data.prepare import run as prepare
from humanalign.models.load import portable_tokenizer_config
from humanalign.models.tiny_vision_families import tiny_idefics3
from humanalign.models.vision import load_vision_lm, model_part
from humanalign.trainers.dpo import run as train_dpo
from humanalign.trainers.sft import run as train_sft


@pytest.fixture(scope="module")
def idefics3_run(tmp_path_factory) -> dict:
    """The tiny Idefics3 saved to a folder, and 24 generated picture questions prepared into train/val pairs."""
    root = tmp_path_factory.mktemp("idefics3")
    model, processor = tiny_idefics3(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    portable_tokenizer_config(root / "model")
    raw = write_image_demo(root / "raw", n=24, seed=0, size=32)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return {"model": root / "model", "processor": processor, "train": root / "data" / "train" / "helpful_pairs.jsonl",
            "val": root / "data" / "val" / "helpful_pairs.jsonl"}


def run_values(idefics3_run, tmp_path) -> dict:
    return {"train_path": str(idefics3_run["train"]), "val_path": str(idefics3_run["val"]),
            "output_dir": str(tmp_path / "run"), "max_length": 160, "batch_size": 4, "max_steps": 1,
            "learning_rate": 1e-2, "logging_steps": 1, "eval_steps": 1, "save_steps": 100, "report_to": [],
            "progress_bar": False, "seed": 0}


def changed_parts(final: Path, start: Path) -> dict[str, bool]:
    before = dict(AutoModelForImageTextToText.from_pretrained(start).named_parameters())
    changed = {"vision": False, "projector": False, "language": False}
    for name, param in AutoModelForImageTextToText.from_pretrained(final).named_parameters():
        if not torch.equal(param, before[name]):
            changed[model_part(name)] = True
    return changed


def test_the_saved_folder_reloads_and_encodes_the_same(idefics3_run, tmp_path):
    picture = tmp_path / "wide.png"
    Image.new("RGB", (56, 28), (200, 30, 30)).save(picture)
    reloaded = AutoProcessor.from_pretrained(idefics3_run["model"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    encoded = []
    for processor in (idefics3_run["processor"], reloaded):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded.append(processor(text=[text], images=[Image.open(picture)], return_tensors="pt"))
    assert set(encoded[0]) == set(encoded[1]) == {"input_ids", "attention_mask", "pixel_values",
                                                  "pixel_attention_mask"}
    assert all(torch.equal(encoded[0][k], encoded[1][k]) for k in encoded[0])
    assert type(AutoModelForImageTextToText.from_pretrained(idefics3_run["model"])).__name__ == \
        "Idefics3ForConditionalGeneration"


def test_train_dpo_takes_a_step(idefics3_run, tmp_path):
    summary = train_dpo(load_config(DPOConfig, values={"policy_model_path": str(idefics3_run["model"]),
                                                       **run_values(idefics3_run, tmp_path)}))
    assert summary["steps"] == 1 and summary["vision"]["pair_forward"] == "plain"
    assert summary["vision"]["images"]["train"] == summary["train_pairs"] > 0
    assert summary["eval"]["eval/loss"] > 0
    AutoProcessor.from_pretrained(summary["final_model"])
    assert changed_parts(Path(summary["final_model"]), idefics3_run["model"]) == {
        "vision": False, "projector": True, "language": True}


def test_train_sft_takes_a_step(idefics3_run, tmp_path):
    summary = train_sft(load_config(SFTConfig, values={"model_name_or_path": str(idefics3_run["model"]),
                                                       **run_values(idefics3_run, tmp_path)}))
    assert summary["steps"] == 1 and summary["vision"]["with_images"]["train"] == summary["train_examples"] > 0
    assert summary["eval_loss"] > 0
    AutoProcessor.from_pretrained(summary["final_model"])
    assert changed_parts(Path(summary["final_model"]), idefics3_run["model"]) == {
        "vision": False, "projector": True, "language": True}


def test_lora_adapts_the_text_model_and_trains_the_connector(idefics3_run):
    policy = load_vision_lm(idefics3_run["model"], lora=LoraSettings(enabled=True, r=4, alpha=8))
    adapted = {n.split(".lora_")[0] for n, _ in policy.named_parameters() if ".lora_" in n}
    assert adapted and all(".text_model." in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"q_proj", "v_proj", "down_proj"}
    trained = [n for n, p in policy.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert trained and all(".connector." in n and model_part(n) == "projector" for n in trained)
