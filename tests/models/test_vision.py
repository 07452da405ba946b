"""``models.vision.max_images_per_prompt``: the most images one prompt may carry, from what the model and its
processor declare (tokens per image against the context length) or the setting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from humanalign.models.tiny_vision import build_tiny_vision_model, tiny_qwen2_vl
from humanalign.models.vision import load_processor, max_images_per_prompt, model_config


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    path = build_tiny_vision_model(tmp_path_factory.mktemp("vision") / "tiny_vision", seed=0)
    return model_config(path), load_processor(path)


def test_a_fixed_size_model_takes_what_its_context_holds(tiny_llava):
    config, processor = tiny_llava
    assert config["text_config"]["max_position_embeddings"] == 512
    assert processor._get_num_multimodal_tokens(image_sizes=[(500, 300)]).num_image_tokens == [16]
    assert max_images_per_prompt(config, processor) == (512 - 1) // 16 == 31  # one position left for the text


def test_a_resizing_model_counts_its_smallest_image():
    model, processor = tiny_qwen2_vl()
    config = model.config.to_dict()
    # a 1-pixel picture is resized up to min_pixels: 4 merged tokens, the fewest any image costs
    assert max_images_per_prompt(config, processor) == (config["text_config"]["max_position_embeddings"] - 1) // 4


def test_a_declared_image_seq_length_and_the_setting():
    gemma_like = SimpleNamespace(image_seq_length=256)  # no token-count method: the declared length is used
    assert max_images_per_prompt({"text_config": {"max_position_embeddings": 8192}}, gemma_like) == 31
    assert max_images_per_prompt({"max_position_embeddings": 8192, "image_seq_length": 256}, object()) == 31
    assert max_images_per_prompt({"max_position_embeddings": 8192}, object()) is None  # no count: no known limit
    assert max_images_per_prompt(None, gemma_like) is None  # a GGUF file: no config to read
    assert max_images_per_prompt(None, gemma_like, override=1) == 1
    assert max_images_per_prompt({"text_config": {"max_position_embeddings": 8192}}, gemma_like, override=40) == 40
