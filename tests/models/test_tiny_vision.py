"""The tiny vision-language models: a plain HF folder the Auto classes load (without torchvision), deterministic,
and the picture really reaches the text model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from humanalign.cli import main as cli_main
from humanalign.models.tiny_vision import build_tiny_vision_model, tiny_llava, tiny_qwen2_vl

CORPUS = [f"User {i} asks what colour the {shape} is. The assistant says it is {colour}."
          for i in range(30) for shape in ("circle", "square") for colour in ("red", "blue", "green")]
SMALL = {"texts": CORPUS, "vocab_size": 400}
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_vision_model(tmp_path_factory.mktemp("tiny_vision") / "model", **SMALL)


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(built), AutoProcessor.from_pretrained(built)


def test_folder_is_a_llava_checkpoint_with_a_processor(built):
    names = {p.name for p in built.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "build_info.json"} <= names
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model" and config["image_seq_length"] == 16
    processor = json.loads((built / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaProcessor" and processor["image_token"] == "<image>"


def test_auto_classes_load_it_without_torchvision(loaded):
    model, processor = loaded
    assert importlib.util.find_spec("torchvision") is None  # the PIL image processor serves
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_id and image_id == len(processor.tokenizer) - 1


def test_chat_template_places_the_image_tokens(loaded):
    model, processor = loaded
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<image>What colour is the shape?<|im_end|>\n<|im_start|>assistant\n"
    # a canonical string prompt with the placeholder renders the same text
    same = processor.apply_chat_template([{"role": "user", "content": "<image>What colour is the shape?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert same == text
    batch = processor(images=[Image.new("RGB", (50, 40), (200, 30, 30))], text=[text], return_tensors="pt")
    assert (batch["input_ids"] == model.config.image_token_index).sum() == 16  # (32 / 8)^2 patches
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_the_picture_changes_the_next_token_distribution(loaded):
    model, processor = loaded
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    logits = []
    for colour in ((220, 40, 40), (40, 80, 220)):
        batch = processor(images=[Image.new("RGB", (32, 32), colour)], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**batch).logits[0, -1])
    assert all(torch.isfinite(x).all() for x in logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_same_seed_same_bytes(built, tmp_path):
    again = build_tiny_vision_model(tmp_path / "again", **SMALL)
    assert sha(again / "model.safetensors") == sha(built / "model.safetensors")
    other = build_tiny_vision_model(tmp_path / "other", seed=1, **SMALL)
    assert sha(other / "model.safetensors") != sha(built / "model.safetensors")


def test_cli_vision_flag(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out = tmp_path / "vlm"
    assert cli_main(["tiny-model", "--vision", "--output-dir", str(out), "--corpus", str(corpus),
                     "--vocab-size", "400"]) == 0
    assert "LLaVA-style" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert cli_main(["tiny-model", "--vision", "--output-dir", str(out), "--corpus", str(corpus)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_tiny_qwen2_vl_sees_its_picture():
    model, processor = tiny_qwen2_vl(CORPUS, vocab_size=400)
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour" in text
    logits = []
    for colour in ((220, 40, 40), (40, 80, 220)):
        batch = processor(images=[Image.new("RGB", (56, 56), colour)], text=[text], return_tensors="pt")
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # 16 patches, 2x2 merged: 4 image tokens
        assert (batch["input_ids"] == model.config.image_token_id).sum() == 4
        with torch.no_grad():
            logits.append(model(**batch).logits[0, -1])
    assert all(torch.isfinite(x).all() for x in logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_vision_position_std_sets_the_towers_position_spread():
    """CLIP's 0.02 by default; the pixels recipe widens it so a random tower's features say where a patch is."""
    spread = {}
    for std in (None, 0.3):
        tower = tiny_llava(vision_position_std=std)[0].model.vision_tower
        spread[std] = tower.embeddings.position_embedding.weight.std().item()
    assert abs(spread[None] - 0.02) < 0.005 and abs(spread[0.3] - 0.3) < 0.08
