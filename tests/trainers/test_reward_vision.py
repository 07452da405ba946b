"""`train rm` / `eval rm` on a vision-language score model (the tiny LLaVA + a scalar head) and the generated
picture questions: the training loss falls with the vision tower frozen, the final folder reloads with the same
scores, `eval rm` reports its accuracy on image pairs, the harmless task's sign term trains, and a text score
model refuses image pairs in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from humanalign.cli import main as cli_main
from humanalign.config.base import load_config
from humanalign.config.evaluation import EvalRMConfig
from humanalign.config.rm import RewardModelConfig
from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.data.pairs import load_preference_pairs
from humanalign.data.records import HarmlessPair
from humanalign.errors import UserError
from humanalign.eval.rm import run as eval_rm
from humanalign.models.scorer import VisionScorer, load_scorer
from humanalign.models.vision_score import HEAD_FILE, HEAD_MARKER, load_vision_score_model
from humanalign.trainers.reward import run as train_rm
from humanalign.trainers.reward import train_score_model
from humanalign.trainers.safe_mm_dpo import run as train_safe_mm_dpo


def rm_config(vision_run, out: Path, **values) -> RewardModelConfig:
    return load_config(RewardModelConfig, values={
        "base_model_path": str(vision_run["model"]), "train_helpful_path": str(vision_run["train"]),
        "val_helpful_path": str(vision_run["val"]), "output_dir": str(out), "max_length": 128,
        "batch_size": 4, "max_steps": 12, "learning_rate": 3e-3, "logging_steps": 1, "eval_steps": 100,
        "save_steps": 100, "report_to": [], "progress_bar": False, "seed": 0, **values})


@pytest.fixture(scope="module")
def trained(vision_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rm_vision_run") / "run"
    cfg = rm_config(vision_run, out)
    before = {n: p.clone() for n, p in load_vision_score_model(str(vision_run["model"]), trainable=False)[0]
              .model.named_parameters() if "vision_tower" in n}
    summary = train_rm(cfg)
    return {"summary": summary, "out": out, "before": before}


def test_training_loss_falls_with_the_vision_tower_frozen(trained):
    history = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert trained["summary"]["vision"] and trained["summary"]["pair_forward"] == "plain"
    final = Path(trained["summary"]["model"])
    reloaded, _ = load_vision_score_model(str(final), trainable=False)
    params = dict(reloaded.model.named_parameters())
    assert trained["before"] and all(torch.equal(params[n], p) for n, p in trained["before"].items())


def test_final_folder_reloads_with_the_same_scores_and_eval_rm_reports_them(trained, vision_run, tmp_path,
                                                                             monkeypatch):
    final = Path(trained["summary"]["model"])
    config = json.loads((final / "config.json").read_text())
    assert config["humanalign_score"]["head"] == HEAD_MARKER and (final / HEAD_FILE).is_file()
    assert (final / "processor_config.json").is_file() or (final / "preprocessor_config.json").is_file()
    monkeypatch.setenv("HUMANALIGN_CACHE_DIR", str(tmp_path / "cache"))
    scorer = load_scorer(str(final), device="cpu", batch_size=4)
    assert isinstance(scorer, VisionScorer)
    pairs, _ = load_preference_pairs(vision_run["val"], allow_images=True)
    chosen, rejected = scorer.score_pairs(pairs)
    again = load_scorer(str(final), device="cpu", batch_size=3).score_pairs(pairs)
    assert all(math.isfinite(x) for x in chosen + rejected)
    assert torch.allclose(torch.tensor(chosen), torch.tensor(again[0]), atol=1e-4)
    ev = trained["summary"]["eval"]  # the trainer's final validation: the same model on the same pairs
    assert ev["eval/pairs"] == len(pairs)
    assert sum(chosen) / len(chosen) == pytest.approx(ev["eval/score_chosen"], abs=1e-3)
    report = eval_rm(EvalRMConfig(model=str(final), data=str(vision_run["val"]), batch_size=4))
    assert report["pairs"] == len(pairs)
    assert report["accuracy"] == pytest.approx(ev["eval/accuracy"])


def test_safe_mm_dpo_takes_its_helpful_margins_from_the_vision_reward_model(trained, vision_run, tmp_path, capsys):
    final = trained["summary"]["model"]
    cfg = load_config(SafeMMDPOConfig, values={
        "policy_model_path": str(vision_run["model"]), "helpful_rm_path": final, "harmless_rm_path": None,
        "train_helpful_path": str(vision_run["train"]), "train_harmless_path": None, "val_helpful_path": None,
        "val_harmless_path": None, "output_dir": str(tmp_path / "smd"), "max_length": 128, "batch_size": 4,
        "max_steps": 1, "learning_rate": 1e-3, "save_steps": 100, "report_to": [], "progress_bar": False,
        "seed": 0})
    result = train_safe_mm_dpo(cfg)
    assert result["steps"] == 1
    helpful = result["margins"]["helpful"]  # delta_h = r(chosen) - r(rejected), scored with the pictures
    assert helpful["model"] == final and helpful["margins"]["n"] == result["pairs"]["train_helpful"] > 0
    assert helpful["margins"]["nonfinite"] == 0 and helpful["margins"]["std"] > 0
    assert f"with {final} (image pairs: not cached)" in capsys.readouterr().err


def test_harmless_sign_term_trains_on_image_pairs(vision_run, tmp_path):
    pairs, _ = load_preference_pairs(vision_run["train"], allow_images=True)
    harmless = [HarmlessPair(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, images=p.images,
                             is_chosen_safe=True, is_rejected_safe=False) for p in pairs[:16]]
    cfg = rm_config(vision_run, tmp_path / "cost", task="harmless", max_steps=8, calibrate_sign=False,
                    lora={"enabled": True, "r": 4, "alpha": 8})
    summary = train_score_model(cfg, harmless, harmless[:8])
    assert summary["sign_terms"] and summary["labelled_train_pairs"] == 16
    assert 0.0 <= summary["eval"]["eval/sign_accuracy"] <= 1.0
    reloaded, _ = load_vision_score_model(summary["model"], trainable=False)
    assert reloaded.score_type == "cost"


def test_text_score_model_refuses_image_pairs_in_one_line(vision_run, tmp_path):
    cfg = load_config(RewardModelConfig, values={
        "base_model_path": "tiny", "train_helpful_path": str(vision_run["train"]), "val_helpful_path": None,
        "output_dir": str(tmp_path / "text"), "max_steps": 1, "report_to": [], "progress_bar": False})
    with pytest.raises(UserError) as err:
        train_rm(cfg)
    assert "image" in str(err.value) and "\n" not in str(err.value)


def test_a_pair_with_more_images_than_the_model_takes_is_one_line_and_exit_2(vision_run, two_image_pairs, tmp_path, capsys):
    """`train rm` with max_images_per_prompt 1 (the setting every vision trainer shares): a two-image pair stops
    the run before the model loads, naming the file, line and field."""
    data = two_image_pairs
    code = cli_main(["train", "rm", "--base-model-path", str(vision_run["model"]), "--train-helpful-path", str(data),
                     "--val-helpful-path", "null", "--source", "swift", "--output-dir", str(tmp_path / "run"),
                     "--max-images-per-prompt", "1", "--max-steps", "1", "--report-to", "[none]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"humanalign: error: {data}:2: field 'images': 2 images, the model takes at most 1 per prompt "
                       "(set max_images_per_prompt to change)")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run" / "final").exists()
