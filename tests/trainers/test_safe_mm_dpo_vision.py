"""`train safe-mm-dpo` on a vision-language policy (the tiny LLaVA; one step on the in-memory tiny Qwen2-VL):
helpful and harmless pairs with images on one sampler (shared rows only for the same pictures), the plain
concatenated forward with the pixel values for policy and reference, label costs driving lambda, the final
folder loading with the Auto classes, and the refusals (text-only score models, precomputed, sampled)."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from humanalign.config.base import load_config
from humanalign.config.data import PrepareDataConfig
from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.data.image_demo import write_image_demo
from humanalign.data.io import atomic_write_jsonl, read_jsonl
from humanalign.data.joint_pairs import HARMLESS, HELPFUL, build_joint_dataset
from humanalign.data.load import load_source
from humanalign.data.pairs import records_to_pairs
from humanalign.data.prepare import run as prepare
from humanalign.data.vision_collate import tokenize_vision_pairs
from humanalign.data.vision_joint import VisionJointCollator, VisionStream, load_vision_stream
from humanalign.data.vision_pairs import VisionPairDataset
from humanalign.errors import ConfigError
from humanalign.models.margins import label_costs
from humanalign.models.reference import FrozenReference
from humanalign.models.tiny_vision import build_tiny_vision_model, tiny_qwen2_vl
from humanalign.models.vision import load_processor, load_vision_lm, model_part, set_trainable_parts
from humanalign.trainers.safe_mm_dpo import StepSettings, expected_cost_of, step_loss
from humanalign.trainers.safe_mm_dpo import run as train_safe_mm_dpo

LN2 = math.log(2.0)
SETTINGS = StepSettings(beta_ori=0.1, w=0.5, k=0.5, kl_coeff=0.0, average=False)


def harmless_from(helpful_file: Path, out: Path) -> Path:
    """Harmless pairs about the same pictures: the right answer is safe; every other pair keeps the helpful
    pair's wrong answer as the unsafe one (shared with the helpful stream), the rest get another unsafe answer."""
    rows = []
    for i, row in enumerate(read_jsonl(helpful_file)):
        rejected = row["rejected"] if i % 2 == 0 else "Never mind the picture, here is how to hurt someone."
        rows.append({**row, "rejected": rejected, "is_chosen_safe": True, "is_rejected_safe": False})
    atomic_write_jsonl(out, rows)
    return out


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA folder and 40 generated picture questions prepared into helpful and harmless pairs."""
    root = tmp_path_factory.mktemp("smd_vision")
    model = build_tiny_vision_model(root / "tiny_vision", seed=0)
    raw = write_image_demo(root / "raw", n=40, seed=0, size=32)
    data = root / "data"
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(data), "seed": 0}))
    out = {"root": root, "model": model}
    for split in ("train", "val"):
        out[f"{split}_helpful"] = data / split / "helpful_pairs.jsonl"
        out[f"{split}_harmless"] = harmless_from(out[f"{split}_helpful"], root / f"{split}_harmless.jsonl")
    return out


def smd_config(vision_run, tmp_path, **values) -> SafeMMDPOConfig:
    return load_config(SafeMMDPOConfig, values={
        "policy_model_path": str(vision_run["model"]), "helpful_rm_path": None, "harmless_rm_path": None,
        "train_helpful_path": str(vision_run["train_helpful"]), "train_harmless_path": str(vision_run["train_harmless"]),
        "val_helpful_path": str(vision_run["val_helpful"]), "val_harmless_path": str(vision_run["val_harmless"]),
        "output_dir": str(tmp_path / "run"), "max_length": 128, "batch_size": 4, "max_steps": 3,
        "learning_rate": 2e-3, "logging_steps": 1, "eval_steps": 3, "eval_on_start": True, "save_steps": 100,
        "lambda_lr": 0.5, "cost_threshold": -0.5, "report_to": [], "progress_bar": False, "seed": 0, **values})


def streams_with_costs(vision_run, processor, n=4):
    cfg = type("Cfg", (), {"max_length": 128})()
    helpful = load_vision_stream(vision_run["train_helpful"], HELPFUL, processor, cfg)
    harmless = load_vision_stream(vision_run["train_harmless"], HARMLESS, processor, cfg)
    chosen, rejected, has = label_costs(harmless.pairs)
    for name, values in (("cost_chosen", chosen), ("cost_rejected", rejected), ("has_cost", has)):
        harmless.add_field(name, values)
    helpful.add_field("delta", [0.0] * len(helpful))
    harmless.add_field("delta", [0.0] * len(harmless))
    return helpful, harmless


def test_streams_share_rows_only_for_the_same_pictures(vision_run):
    processor = load_processor(vision_run["model"])
    helpful, harmless = streams_with_costs(vision_run, processor)
    joint = build_joint_dataset(helpful, harmless, seed=0)
    assert joint.num_shared == (len(harmless) + 1) // 2  # the even pairs keep the helpful pair's two answers
    batch = VisionJointCollator(processor.tokenizer.pad_token_id)([joint[i] for i in range(4)])
    shared = sum(1 for h, s, rel in joint.items[:4] if rel)
    rows = 2 * (8 - shared)  # each distinct pair once: chosen and rejected rows
    assert batch["input_ids"].shape[0] == rows and batch["pixel_values"].shape[0] == rows
    # another picture with the same text is another pair: never shared
    other = copy.deepcopy(harmless.pairs[0])
    other.images = [harmless.pairs[1].images[0]]
    examples, _ = tokenize_vision_pairs([other], processor, 128)
    moved = VisionStream(VisionPairDataset(examples, [other]))
    assert build_joint_dataset(VisionStream(VisionPairDataset([helpful.dataset.examples[0]],
                                                              [helpful.pairs[0]])), moved, seed=0).num_shared == 0


def test_a_step_on_both_streams_with_images(vision_run):
    """Policy = reference: every log-ratio is 0, so each stream's loss is ln 2 and the total too; the gradient
    reaches the language model and the projector, never the frozen tower."""
    processor = load_processor(vision_run["model"])
    helpful, harmless = streams_with_costs(vision_run, processor)
    joint = build_joint_dataset(helpful, harmless, seed=0)
    batch = VisionJointCollator(processor.tokenizer.pad_token_id)([joint[i] for i in range(4)])
    policy = load_vision_lm(vision_run["model"])
    reference = FrozenReference(load_vision_lm(vision_run["model"], trainable=False))
    out = step_loss(policy, reference, batch, SETTINGS, lam=1.0, with_kl=True)
    assert out.metrics["loss_helpful"].item() == pytest.approx(LN2, abs=1e-4)
    assert out.metrics["loss_safety"].item() == pytest.approx(LN2, abs=1e-4)
    assert out.metrics["kl_divergence"].item() == pytest.approx(0.0, abs=1e-5)  # the plain path's exact KL
    cost, pairs = expected_cost_of(out.streams[HARMLESS])
    assert pairs.item() == 4 and cost.item() == pytest.approx(0.0, abs=1e-5)  # p = 1/2 on costs -1 and +1
    out.loss.backward()
    grads = {part: 0.0 for part in ("vision", "projector", "language")}
    for name, param in policy.named_parameters():
        if param.grad is not None:
            grads[model_part(name)] += float(param.grad.abs().sum())
    assert grads["vision"] == 0 and grads["projector"] > 0 and grads["language"] > 0


def test_train_safe_mm_dpo_on_images_with_label_costs(vision_run, tmp_path):
    result = train_safe_mm_dpo(smd_config(vision_run, tmp_path))
    assert result["steps"] == 3 and result["vision"]["pair_forward"] == "plain"
    assert result["vision"]["images"]["train_helpful"] == result["pairs"]["train_helpful"] > 0
    assert result["vision"]["images"]["train_harmless"] == result["pairs"]["train_harmless"] > 0
    assert result["pairs"]["shared"] > 0
    assert result["before"]["helpful_accuracy"] == result["before"]["harmless_accuracy"] == 0.5
    assert all(math.isfinite(v) for v in result["after"].values() if v is not None)
    assert result["after"]["kl_divergence"] > 0  # measured on the plain path with the pixel values
    # J_c starts at 0 (p = 1/2, costs -1 and +1) > d = -0.5: the constraint binds and lambda rises
    assert result["lambda"]["updates"] == 3 and result["lambda"]["final"] > 1.0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/loss_total" in m]
    assert len(train) == 3 and all(math.isfinite(m["train/loss_total"]) for m in train)
    final = Path(result["final_model"])
    AutoProcessor.from_pretrained(final)
    model = AutoModelForImageTextToText.from_pretrained(final)
    start = dict(AutoModelForImageTextToText.from_pretrained(vision_run["model"]).named_parameters())
    moved = {model_part(n) for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == {"projector", "language"}


def test_lora_policy_with_the_adapter_disabled_reference(vision_run, tmp_path):
    result = train_safe_mm_dpo(smd_config(vision_run, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8},
                                          max_steps=1, eval_on_start=False, eval_steps=100, val_helpful_path=None,
                                          val_harmless_path=None))
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert "adapter-disabled" in json.dumps(summary) and result["steps"] == 1
    assert sum(p.numel() for p in load_vision_lm(result["final_model"], trainable=False).parameters()) > 0


def test_refusals(vision_run, tmp_path):
    with pytest.raises(ConfigError, match="helpful_rm_path 'tiny' is a text-only model, but .* carry images"):
        train_safe_mm_dpo(smd_config(vision_run, tmp_path, helpful_rm_path="tiny"))
    with pytest.raises(ConfigError, match="precomputed is not supported with a vision-language policy"):
        train_safe_mm_dpo(smd_config(vision_run, tmp_path, reference_mode="precomputed"))
    with pytest.raises(ConfigError, match="expected_cost: sampled is not supported with a vision-language policy"):
        train_safe_mm_dpo(smd_config(vision_run, tmp_path, expected_cost="sampled", harmless_rm_path="x",
                                     sampled_prompts_path="x"))


def test_a_qwen2_vl_policy_takes_the_same_step(vision_run):
    model, processor = tiny_qwen2_vl()
    reference = FrozenReference(copy.deepcopy(model).eval().requires_grad_(False))
    set_trainable_parts(model, freeze_vision_tower=True, freeze_projector=False)
    pairs = records_to_pairs(load_source(str(vision_run["train_harmless"])).records, "harmless", Counter())[:2]
    examples, skipped = tokenize_vision_pairs(pairs, processor, 256)
    assert not skipped
    harmless = VisionStream(VisionPairDataset(examples, pairs))
    for name, values in zip(("cost_chosen", "cost_rejected", "has_cost"), label_costs(pairs)):
        harmless.add_field(name, values)
    helpful = VisionStream(VisionPairDataset(examples, pairs))
    joint = build_joint_dataset(helpful, harmless, seed=0)
    batch = VisionJointCollator(processor.tokenizer.pad_token_id)([joint[i] for i in range(len(joint))])
    assert "image_grid_thw" in batch
    out = step_loss(model, reference, batch, SETTINGS, lam=1.0, with_kl=False)
    assert out.loss.item() == pytest.approx(LN2, abs=1e-3)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if model_part(n) == "vision")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if model_part(n) == "projector")
