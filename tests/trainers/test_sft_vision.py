"""`train sft` on a vision-language model (the tiny LLaVA; one step on the in-memory tiny Qwen2-VL) and the
generated picture questions: the loss falls, only the parts asked for train (the frozen tower never, the
projector alone with freeze_language_model), the saved folder loads with AutoProcessor /
AutoModelForImageTextToText and reproduces the run's last evaluation, and the refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from humanalign.config.base import load_config
from humanalign.config.sft import SFTConfig
from humanalign.data.load import load_source
from humanalign.data.pairs import records_to_pairs
from humanalign.data.vision_sft import VisionConversation, VisionSFTCollator, tokenize_vision_conversations
from humanalign.errors import ConfigError, UserError
from humanalign.losses.sft import sft_loss_sums
from humanalign.models.tiny_vision import tiny_qwen2_vl
from humanalign.models.vision import load_vision_lm, model_part, set_trainable_parts
from humanalign.trainers.sft import forward_logits
from humanalign.trainers.sft import run as train_sft


def sft_config(vision_run, tmp_path, **values) -> SFTConfig:
    return load_config(SFTConfig, values={
        "model_name_or_path": str(vision_run["model"]), "train_path": str(vision_run["train"]),
        "val_path": str(vision_run["val"]), "output_dir": str(tmp_path / "run"), "max_length": 128,
        "batch_size": 8, "max_steps": 6, "learning_rate": 3e-3, "logging_steps": 1, "eval_steps": 6,
        "eval_on_start": True, "save_steps": 100, "report_to": [], "progress_bar": False, "seed": 0, **values})


def parts_changed(model, start) -> dict[str, bool]:
    before = dict(start.named_parameters())
    changed = {"vision": False, "projector": False, "language": False}
    for name, param in model.named_parameters():
        if not torch.equal(param, before[name]):
            changed[model_part(name)] = True
    return changed


def val_conversations(path) -> list[VisionConversation]:
    pairs = records_to_pairs(load_source(str(path)).records, "helpful", Counter())
    return [VisionConversation([*p.prompt, {"role": "assistant", "content": p.chosen}], list(p.images))
            for p in pairs]


def test_train_sft_on_images_learns_and_saves_a_folder_auto_classes_load(vision_run, tmp_path):
    summary = train_sft(sft_config(vision_run, tmp_path))
    assert summary["steps"] == 6
    assert summary["vision"]["with_images"]["train"] == summary["train_examples"] > 0
    assert summary["eval_loss"] < summary["eval_loss_at_start"] - 0.5  # the answers are being learnt
    final = Path(summary["final_model"])
    processor = AutoProcessor.from_pretrained(final)
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    # the reloaded model and processor reproduce the run's last evaluation (token-mean loss on the val answers)
    examples, skipped, _ = tokenize_vision_conversations(val_conversations(vision_run["val"]), processor, 128)
    assert not skipped
    batch = VisionSFTCollator(processor.tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        sums, counts = sft_loss_sums(forward_logits(model, batch, vision=True), batch["labels"])
    assert float(sums.sum() / counts.sum()) == pytest.approx(summary["eval_loss"], rel=1e-4)
    start = AutoModelForImageTextToText.from_pretrained(vision_run["model"])
    assert parts_changed(model, start) == {"vision": False, "projector": True, "language": True}


def test_projector_only_training_leaves_the_rest_alone(vision_run, tmp_path):
    """LLaVA's first stage: freeze_language_model (and the tower): only the projector's weights move."""
    policy = load_vision_lm(vision_run["model"], freeze_language_model=True)
    trained = {model_part(n) for n, p in policy.named_parameters() if p.requires_grad}
    assert trained == {"projector"}
    summary = train_sft(sft_config(vision_run, tmp_path, freeze_language_model=True, max_steps=2, eval_steps=2,
                                   learning_rate=1e-2))
    model = AutoModelForImageTextToText.from_pretrained(summary["final_model"])
    start = AutoModelForImageTextToText.from_pretrained(vision_run["model"])
    assert parts_changed(model, start) == {"vision": False, "projector": True, "language": False}
    assert summary["eval_loss"] < summary["eval_loss_at_start"]


def test_lora_sft_adapts_the_language_model_and_saves_an_adapter(vision_run, tmp_path):
    summary = train_sft(sft_config(vision_run, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8}, max_steps=2,
                                   eval_steps=2, learning_rate=1e-2))
    final = Path(summary["final_model"])
    assert (final / "adapter_config.json").is_file() and (final / "processor_config.json").is_file()
    merged = load_vision_lm(final, trainable=False)  # the adapter merged onto its base
    start = AutoModelForImageTextToText.from_pretrained(vision_run["model"])
    assert parts_changed(merged, start) == {"vision": False, "projector": True, "language": True}
    assert summary["eval_loss"] < summary["eval_loss_at_start"]


def test_a_qwen2_vl_model_takes_an_sft_step(vision_run):
    """The second family (patch-sequence pixel values, image_grid_thw, multimodal RoPE): finite loss, gradients
    on the language model and the merger (projector), none on the frozen tower."""
    model, processor = tiny_qwen2_vl()
    set_trainable_parts(model, freeze_vision_tower=True, freeze_projector=False)
    examples, skipped, _ = tokenize_vision_conversations(val_conversations(vision_run["train"])[:3], processor, 256)
    assert not skipped
    batch = VisionSFTCollator(processor.tokenizer.pad_token_id)(examples)
    assert "image_grid_thw" in batch
    sums, counts = sft_loss_sums(forward_logits(model, batch, vision=True), batch["labels"])
    loss = sums.sum() / counts.sum()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {part: 0.0 for part in ("vision", "projector", "language")}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads[model_part(name)] += float(param.grad.abs().sum())
    assert grads["vision"] == 0 and grads["projector"] > 0 and grads["language"] > 0


def test_refusals(vision_run, tmp_path):
    with pytest.raises(ConfigError, match="packing is not supported with a vision-language model"):
        train_sft(sft_config(vision_run, tmp_path, packing=True))
    with pytest.raises(ConfigError, match="freeze_language_model: true with lora.enabled"):
        sft_config(vision_run, tmp_path, freeze_language_model=True, lora={"enabled": True})
    with pytest.raises(UserError, match=r"carry images, which `train sft` with a text model does not take"):
        train_sft(sft_config(vision_run, tmp_path, model_name_or_path="tiny"))
    image = json.loads(vision_run["train"].read_text().splitlines()[0])["images"][0]
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps({"query": "<image> and <image>: same colour?", "response": "Yes.",
                               "images": [image, image]}) + "\n")
    with pytest.raises(UserError, match=r"two.jsonl:1: field 'images': 2 images, the model takes at most 1 per prompt"):
        train_sft(sft_config(vision_run, tmp_path, train_path=str(two), source="swift", max_images_per_prompt=1))
