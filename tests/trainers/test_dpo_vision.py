"""`train dpo` on a vision-language policy (the tiny LLaVA) and the generated picture questions: the plain
concatenated forward with the pixel values (no text fast path), every loss type for one step, the frozen vision
tower, LoRA on the language model only, the saved folder loading with AutoProcessor /
AutoModelForImageTextToText, and the refusals (precomputed reference; text consumers of image data)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from humanalign.cli import main as cli_main
from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.config.training import LoraSettings
from humanalign.data.preference_dataset import load_pair_dataset
from humanalign.data.vision_collate import tokenize_vision_pairs
from humanalign.data.vision_pairs import VisionPairCollator, load_vision_pair_dataset
from humanalign.errors import ConfigError, UserError
from humanalign.models import logprobs
from humanalign.models.load import load_tokenizer
from humanalign.models.logprobs import (
    concatenated_forward,
    pair_layout,
    sequence_logps,
    shared_layout_possible,
)
from humanalign.models.reference import FrozenReference
from humanalign.models.tiny_vision import tiny_qwen2_vl
from humanalign.models.vision import (
    is_vision_model,
    load_processor,
    load_vision_lm,
    model_part,
    set_trainable_parts,
)
from humanalign.trainers.dpo import LossSettings, pair_loss
from humanalign.trainers.dpo import run as train_dpo

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "cpo", "orpo", "simpo")


def dpo_config(vision_run, tmp_path, **values) -> DPOConfig:
    return load_config(DPOConfig, values={
        "policy_model_path": str(vision_run["model"]), "train_path": str(vision_run["train"]),
        "val_path": str(vision_run["val"]), "output_dir": str(tmp_path / "run"), "max_length": 128,
        "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 2,
        "save_steps": 100, "report_to": [], "progress_bar": False, "seed": 0, **values})


def first_batch(vision_run, processor, n=4):
    cfg = type("Cfg", (), {"max_length": 128})()
    dataset = load_vision_pair_dataset(vision_run["train"], "helpful", processor, cfg)
    return VisionPairCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(n)])


def test_detects_the_vision_model_and_not_the_text_one(vision_run):
    assert is_vision_model(vision_run["model"]) and not is_vision_model("tiny")
    assert [model_part(n) for n in ("model.vision_tower.x.weight", "model.multi_modal_projector.linear_1.weight",
                                    "model.visual.merger.mlp.0.weight", "model.language_model.layers.0.q_proj")] \
        == ["vision", "projector", "projector", "language"]


def test_the_pair_forward_with_images_is_the_plain_one(vision_run, monkeypatch):
    """No fast path with images: pair_layout says plain, the scoring head is never used, and the log-probs are
    those of the model's own forward with the pixel values."""
    processor = load_processor(vision_run["model"])
    model = load_vision_lm(vision_run["model"], trainable=False)
    batch = first_batch(vision_run, processor)
    assert "pixel_values" in batch and not shared_layout_possible(model)
    assert pair_layout(model, batch) == "plain"
    monkeypatch.setattr(logprobs, "scored_logps", lambda *a, **k: pytest.fail("a text fast path was taken"))
    out = concatenated_forward(model, batch)
    labels = batch.pop("labels")
    expected, _ = sequence_logps(model(**batch, use_cache=False).logits, labels)
    torch.testing.assert_close(torch.cat([out["chosen_logps"], out["rejected_logps"]]), expected)
    batch["labels"] = labels
    with pytest.raises(ValueError, match="plain layout"):
        concatenated_forward(model, batch, layout="padded")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_takes_a_step_on_images(vision_run, loss_type):
    """One step of each loss: finite, the expected value at the start where it is known, gradients on the
    language model and the projector, none on the frozen vision tower."""
    processor = load_processor(vision_run["model"])
    policy = load_vision_lm(vision_run["model"])
    cfg = load_config(DPOConfig, values={"loss_type": loss_type})
    settings = LossSettings.from_config(cfg)
    reference = FrozenReference(load_vision_lm(vision_run["model"], trainable=False))
    needs_ref = loss_type not in ("cpo", "orpo", "simpo")
    step = pair_loss(policy, reference if needs_ref else None, first_batch(vision_run, processor), settings, cfg.beta)
    assert torch.isfinite(step.loss)
    if loss_type in ("sigmoid", "robust"):
        assert step.loss.item() == pytest.approx(0.6931, abs=1e-3)  # policy = reference: h = 0, -log sigmoid(0)
    if loss_type in ("hinge", "ipo"):
        assert step.loss.item() == pytest.approx(1.0 if loss_type == "hinge" else (1 / (2 * cfg.beta)) ** 2, rel=1e-4)
    step.loss.backward()
    grads = {part: 0.0 for part in ("vision", "projector", "language")}
    for name, param in policy.named_parameters():
        if param.grad is not None:
            grads[model_part(name)] += float(param.grad.abs().sum())
    assert grads["vision"] == 0 and grads["projector"] > 0 and grads["language"] > 0
    assert not any(p.requires_grad for n, p in policy.named_parameters() if model_part(n) == "vision")


def test_train_dpo_saves_a_folder_auto_classes_load(vision_run, tmp_path):
    summary = train_dpo(dpo_config(vision_run, tmp_path))
    assert summary["vision"]["pair_forward"] == "plain" and summary["vision"]["images"]["train"] == summary["train_pairs"]
    assert summary["steps"] == 2 and summary["eval"]["eval/loss"] > 0
    final = Path(summary["final_model"])
    processor = AutoProcessor.from_pretrained(final)
    model = AutoModelForImageTextToText.from_pretrained(final)
    start = AutoModelForImageTextToText.from_pretrained(vision_run["model"])
    batch = first_batch(vision_run, processor, n=2)
    batch.pop("labels")
    with torch.no_grad():
        changed = (model(**batch).logits - start(**batch).logits).abs().max()
    assert changed > 1e-4  # trained, and the saved processor tokenises the same way
    vision = {n: p for n, p in model.named_parameters() if model_part(n) == "vision"}
    assert all(torch.equal(p, dict(start.named_parameters())[n]) for n, p in vision.items())  # frozen tower


def test_lora_adapts_the_language_model_only(vision_run, tmp_path):
    lora = LoraSettings(enabled=True, r=4, alpha=8)
    policy = load_vision_lm(vision_run["model"], lora=lora)
    adapted = {n.split(".lora_")[0] for n, _ in policy.named_parameters() if ".lora_" in n}
    assert adapted and all(model_part(n) == "language" for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"q_proj", "v_proj", "down_proj"}
    trained = [n for n, p in policy.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert trained and all(model_part(n) == "projector" for n in trained)  # the projector trains fully
    summary = train_dpo(dpo_config(vision_run, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8},
                                   learning_rate=1e-2))
    assert summary["reference"] == "adapter-disabled"
    reloaded = load_vision_lm(summary["final_model"], trainable=False)  # the adapter folder, merged onto its base
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in load_vision_lm(vision_run["model"], trainable=False).parameters())


def test_precomputed_reference_is_refused_with_images(vision_run, tmp_path):
    with pytest.raises(ConfigError, match="precomputed is not supported with a vision-language policy"):
        train_dpo(dpo_config(vision_run, tmp_path, reference_mode="precomputed"))


def test_a_pair_with_more_images_than_the_policy_takes_is_one_line_and_exit_2(vision_run, two_image_pairs, tmp_path, capsys):
    """`train dpo` with max_images_per_prompt 1: a two-image pair stops the run before any step, naming the file,
    line and field."""
    data = two_image_pairs
    code = cli_main(["train", "dpo", "--policy-model-path", str(vision_run["model"]), "--train-path", str(data),
                     "--source", "swift", "--output-dir", str(tmp_path / "run"), "--max-images-per-prompt", "1",
                     "--max-steps", "1", "--report-to", "[none]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"humanalign: error: {data}:2: field 'images': 2 images, the model takes at most 1 per prompt "
                       "(set max_images_per_prompt to change)")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run" / "final").exists()


def test_text_consumers_still_refuse_image_pairs_and_say_who_takes_them(vision_run):
    cfg = type("Cfg", (), {"max_length": 64, "max_prompt_length": 32})()
    with pytest.raises(UserError, match=r"carry images, .*taken by `train dpo`.* with a vision-language policy"):
        load_pair_dataset(vision_run["train"], "helpful", load_tokenizer("tiny"), cfg)


def test_a_qwen2_vl_policy_takes_the_same_step(vision_run):
    """The second family (patch-sequence pixel values, image_grid_thw, multimodal RoPE): plain forward, the
    sigmoid loss at ln 2 against a frozen copy, its merger counted as the projector and trained, the tower not."""
    import copy

    from humanalign.data.load import load_source
    from humanalign.data.pairs import records_to_pairs

    model, processor = tiny_qwen2_vl()
    reference = FrozenReference(copy.deepcopy(model).eval().requires_grad_(False))
    counts = set_trainable_parts(model, freeze_vision_tower=True, freeze_projector=False)
    assert counts["vision"] == 0 and counts["projector"] > 0
    pairs = records_to_pairs(load_source(str(vision_run["train"])).records, "helpful", Counter())[:3]
    examples, skipped = tokenize_vision_pairs(pairs, processor, 256)
    assert not skipped
    batch = VisionPairCollator(processor.tokenizer.pad_token_id)(examples)
    assert "image_grid_thw" in batch and pair_layout(model, batch) == "plain"
    settings = LossSettings.from_config(load_config(DPOConfig, values={}))
    step = pair_loss(model, reference, batch, settings, 0.1)
    assert step.loss.item() == pytest.approx(0.6931, abs=1e-3)
    step.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if model_part(n) == "vision")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if model_part(n) == "projector")
