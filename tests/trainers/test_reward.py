"""`humanalign train rm`: hand-worked losses of a batch, the data rules (margins, missing safety labels,
contradictory labels), and tiny end-to-end runs on the demo set: both models far above chance, the cost model's
sign accuracy, the saved model reloading in plain transformers with the same scores, resume equality."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from humanalign.cli import main
from humanalign.config.base import load_config
from humanalign.config.rm import RewardModelConfig
from humanalign.data.records import HarmlessPair, PreferencePair, user_prompt
from humanalign.errors import ConfigError
from humanalign.paths import PROJECT_ROOT
from humanalign.trainers.reward import (
    LossSettings,
    NormalizerState,
    score_groups,
    score_pair_loss,
    train_score_model,
)
from humanalign.trainers.reward_data import UNKNOWN_LABEL, encode_pairs, safety_label_note


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------------- fast


def _batch(n: int, **extra) -> dict:
    return {"input_ids": torch.zeros(2 * n, 3, dtype=torch.long), "attention_mask": torch.ones(2 * n, 3), **extra}


def test_reward_batch_loss_hand_worked_with_margin():
    out = SimpleNamespace(end_scores=torch.tensor([2.0, 0.0, 1.0, 1.0]))  # chosen 2, 0; rejected 1, 1
    batch = _batch(2, margin=torch.tensor([0.5, 0.0]))
    result = score_pair_loss(out, batch, LossSettings(task="helpful", granularity="sequence"))
    # -log s(2 - 1 - 0.5) = 0.4741, -log s(0 - 1 - 0) = 1.3133
    assert result.losses.tolist() == pytest.approx([-log_sigmoid(0.5), -log_sigmoid(-1.0)], abs=1e-6)
    assert result.losses.tolist() == pytest.approx([0.474077, 1.313262], abs=1e-5)
    assert result.metrics["accuracy"].item() == 0.5
    no_margin = score_pair_loss(out, batch, LossSettings(task="helpful", granularity="sequence", use_margin=False))
    assert no_margin.losses[0].item() == pytest.approx(-log_sigmoid(1.0), abs=1e-6)  # 0.3133


def test_cost_batch_loss_hand_worked_with_an_unknown_label():
    # pair 0: safer cost -1 (safe), unsafer 2 (unsafe); pair 1: safer 0.5 (label unknown), unsafer -0.5 (unsafe)
    out = SimpleNamespace(end_scores=torch.tensor([-1.0, 0.5, 2.0, -0.5]))
    batch = _batch(2, is_chosen_safe=torch.tensor([1.0, UNKNOWN_LABEL]), is_rejected_safe=torch.tensor([0.0, 0.0]))
    result = score_pair_loss(out, batch, LossSettings(task="harmless", granularity="sequence"))
    # pair 0: -log s(2 - (-1)) - log s(-(+1)(-1)) - log s(-(-1)(2)) = 0.0486 + 0.3133 + 0.1269 = 0.4888
    # pair 1: -log s(-0.5 - 0.5) + (no sign term for the unknown label) - log s(-(-1)(-0.5)) = 1.3133 + 0.9741
    expected = [-log_sigmoid(3) - log_sigmoid(1) - log_sigmoid(2), -log_sigmoid(-1) - log_sigmoid(-0.5)]
    assert result.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.4888, 2.2874], abs=1e-4)
    # sign accuracy over the 3 labelled responses: -1 safe ok, 2 unsafe ok, -0.5 unsafe but cost < 0: miss
    assert result.metrics["sign_accuracy"].item() == pytest.approx(2 / 3)
    assert result.metrics["accuracy"].item() == 0.5  # 2 > -1 yes, -0.5 > 0.5 no
    off = score_pair_loss(out, batch, LossSettings(task="harmless", granularity="sequence", use_sign_terms=False))
    assert off.losses.tolist() == pytest.approx([-log_sigmoid(3), -log_sigmoid(-1)], abs=1e-6)


def test_token_wise_batch_loss_compares_from_the_first_differing_token():
    # chosen [5, 6, 7] vs rejected [5, 6, 8]: they differ from position 2 on, so only that position counts
    out = SimpleNamespace(scores=torch.tensor([[9.0, 9.0, 1.0], [-9.0, -9.0, 0.0]]), end_scores=None)
    batch = {"input_ids": torch.tensor([[5, 6, 7], [5, 6, 8]]), "attention_mask": torch.ones(2, 3)}
    result = score_pair_loss(out, batch, LossSettings(task="helpful", granularity="token"))
    assert result.losses.tolist() == pytest.approx([-log_sigmoid(1.0)], abs=1e-6)


def test_encode_pairs_gives_every_feature_the_same_keys():
    from humanalign.models.load import load_tokenizer

    tok = load_tokenizer("tiny")
    prompt = user_prompt("How do I bake bread?")
    helpful = [PreferencePair(prompt=prompt, chosen="Knead the dough.", rejected="No idea.", margin=2.0),
               PreferencePair(prompt=prompt, chosen="Use flour.", rejected="Ask a friend.")]
    feats, stats, identical = encode_pairs(tok, helpful, task="helpful", max_length=64, max_prompt_length=32,
                                           encoder=False, use_margin=True)
    assert [f["margin"] for f in feats] == [2.0, 0.0] and stats.total == 4 and identical == 0
    feats, *_ = encode_pairs(tok, helpful, task="helpful", max_length=64, max_prompt_length=32, encoder=False,
                             use_margin=False)
    assert all("margin" not in f for f in feats)
    harmless = [HarmlessPair(prompt=prompt, chosen="I can't help.", rejected="Here is how.", is_chosen_safe=True,
                             is_rejected_safe=False),
                HarmlessPair(prompt=prompt, chosen="Be careful.", rejected="Do it now.")]
    feats, *_ = encode_pairs(tok, harmless, task="harmless", max_length=64, max_prompt_length=32, encoder=False,
                             use_margin=True)
    assert [(f["is_chosen_safe"], f["is_rejected_safe"]) for f in feats] == [(1.0, 0.0), (-1.0, -1.0)]
    # both answers share their first tokens: with room for 1 answer token they become the same, and are dropped
    same_start = [PreferencePair(prompt=prompt, chosen="Sure thing, knead it.", rejected="Sure thing, skip it.")]
    full, *_ = encode_pairs(tok, same_start, task="helpful", max_length=64, max_prompt_length=32, encoder=False,
                            use_margin=True)
    prompt_tokens = sum(1 for x in full[0]["chosen_labels"] if x == -100)
    feats, _, identical = encode_pairs(tok, same_start, task="helpful", max_length=prompt_tokens + 1,
                                       max_prompt_length=prompt_tokens, encoder=False, use_margin=True)
    assert feats == [] and identical == 1


def test_safety_label_note_says_what_happens_in_one_line():
    prompt = user_prompt("q")
    labelled = HarmlessPair(prompt=prompt, chosen="a", rejected="b", is_chosen_safe=True, is_rejected_safe=False)
    bare = HarmlessPair(prompt=prompt, chosen="a", rejected="b")
    assert safety_label_note([labelled], "f.jsonl", True) is None
    note = safety_label_note([bare, bare], "f.jsonl", True)
    assert "\n" not in note and "f.jsonl: no is_safe labels on its 2 harmless pairs" in note and "sign terms off" in note
    note = safety_label_note([labelled, bare, bare], "f.jsonl", True)
    assert "2 of 3 harmless pairs have no is_safe labels" in note


def test_normalizer_state_restores_in_place():
    from humanalign.models.score_model import ScoreNormalizer

    trained = ScoreNormalizer("running")
    trained.update(torch.tensor([1.0, 3.0]))  # mean 2, population var 1
    target = ScoreNormalizer("running")
    NormalizerState(target).load_state_dict(NormalizerState(trained).state_dict())
    assert (target.mean, target.var, target.count) == (2.0, 1.0, 2)


def test_config_rejects_centering_with_the_token_wise_loss():
    with pytest.raises(ConfigError, match="center_rewards_coefficient applies to the sequence-wise loss"):
        load_config(RewardModelConfig, values={"loss_granularity": "token", "center_rewards_coefficient": 0.01})


def test_per_group_learning_rates_are_validated_and_off_by_default():
    cfg = load_config(RewardModelConfig, values={"task": "harmless"})
    assert cfg.head_lr_multiplier == 1.0 and cfg.layer_lr_decay == 1.0
    assert score_groups(cfg, None) is None  # the engine's default groups, checkpoints unchanged
    for bad in ({"layer_lr_decay": 1.5}, {"layer_lr_decay": 0}, {"head_lr_multiplier": -1}):
        with pytest.raises(ConfigError):
            load_config(RewardModelConfig, values={"task": "harmless", **bad})


def test_output_dir_defaults_by_task():
    rm_yaml = PROJECT_ROOT / "configs" / "rm.yaml"
    assert load_config(RewardModelConfig, rm_yaml).output_dir == "models/helpful_rm"
    assert load_config(RewardModelConfig, rm_yaml, values={"task": "harmless"}).output_dir == "models/harmless_rm"
    given = load_config(RewardModelConfig, rm_yaml, values={"task": "harmless", "output_dir": "models/cost"})
    assert given.output_dir == "models/cost"


def test_shipped_configs_validate():
    for name in ("rm", "rm_tiny", "cost_tiny", "rm_minilm"):
        cfg = load_config(RewardModelConfig, PROJECT_ROOT / "configs" / f"{name}.yaml")
        assert cfg.learning_rate > 0
    assert load_config(RewardModelConfig, PROJECT_ROOT / "configs" / "cost_tiny.yaml").score_type == "cost"


def test_contradictory_safety_label_exits_2_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "harmless_pairs.jsonl"
    rows = [{"prompt": "q1", "chosen": "no", "rejected": "yes", "is_chosen_safe": True, "is_rejected_safe": False},
            {"prompt": "q2", "chosen": "no", "rejected": "yes", "is_chosen_safe": False, "is_rejected_safe": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code = main(["train", "rm", "--task", "harmless", "--train-harmless-path", str(path), "--val-harmless-path",
                 "null", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:2" in err and "is_chosen_safe" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # the data is read before anything is written


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("rm_demo")
    raw = write_demo_raw(root / "raw", n=1000, seed=0)
    prepare(load_config(PrepareDataConfig, PROJECT_ROOT / "configs" / "prepare_data_tiny.yaml",
                        values={"input_dir": str(raw.parent), "output_dir": str(root / "data")}))
    return root / "data"


def tiny_config(name: str, data: Path, out: Path, **values) -> RewardModelConfig:
    """The shipped configs/<name>.yaml on the test's demo data, fewer steps, no TensorBoard."""
    paths = {f"{split}_{kind}_path": str(data / split / f"{kind}_pairs.jsonl")
             for split in ("train", "val") for kind in ("helpful", "harmless")}
    defaults = {"output_dir": str(out), "report_to": ["none"], "progress_bar": False, "eval_on_start": False,
                "eval_steps": None, "max_steps": 50, "learning_rate": 2e-3}
    return load_config(RewardModelConfig, PROJECT_ROOT / "configs" / f"{name}.yaml",
                       values={**paths, **defaults, **values})


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "final_metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cost_run(demo_data, tmp_path_factory) -> Path:
    from humanalign.trainers.reward import run

    out = tmp_path_factory.mktemp("cost") / "run"
    run(tiny_config("cost_tiny", demo_data, out))
    return out


@pytest.mark.slow
def test_cost_model_orders_pairs_and_signs_costs(cost_run):
    m = final_metrics(cost_run)
    # measured: accuracy 1.0, sign accuracy 1.0 on the 107 held-out demo pairs after 50 steps
    assert m["score_type"] == "cost" and m["sign_terms"] is True and m["steps"] == 50
    assert m["eval"]["eval/accuracy"] >= 0.9
    assert m["eval"]["eval/sign_accuracy"] >= 0.9
    assert m["eval"]["eval/score_chosen"] < 0 < m["eval"]["eval/score_rejected"]  # safer answers cost < 0
    # sign calibration (on by default for a cost model with labelled validation pairs): saved with the model
    calibration = m["sign_calibration"]
    assert calibration["answers"] == 2 * m["val_pairs"]  # the demo answers: unbalanced, so balanced accuracy
    assert calibration["objective"] == ("accuracy" if 0.4 <= calibration["unsafe_share"] <= 0.6 else "balanced_accuracy")
    assert calibration["before"]["accuracy"] == pytest.approx(m["eval"]["eval/sign_accuracy"])
    assert calibration["offset"] == 0.0  # measured: every answer already on its side of 0, nothing to gain
    assert calibration["after"]["accuracy"] >= calibration["before"]["accuracy"]
    assert calibration["folded_into_head_bias"] is False  # a Llama score head has no bias
    rows = [json.loads(line) for line in (cost_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert {"train/accuracy", "train/margin", "train/cost_safer", "train/cost_unsafer",
            "train/sign_accuracy"} <= train_rows[-1].keys()
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]


@pytest.mark.slow
def test_saved_cost_model_loads_in_transformers_with_the_same_scores(cost_run, demo_data):
    """The model is saved in final/, like every trainer's; the run folder stands for it (load_scorer)."""
    from transformers import AutoModelForSequenceClassification

    from humanalign.data.pairs import load_preference_pairs
    from humanalign.models.scorer import load_scorer

    assert not (cost_run / "config.json").exists() and not list(cost_run.glob("*.safetensors"))
    assert final_metrics(cost_run)["model"] == str(cost_run / "final")
    block = json.loads((cost_run / "final" / "config.json").read_text())["humanalign_score"]
    assert block["score_type"] == "cost" and (block["max_length"], block["max_prompt_length"]) == (128, 48)
    # the EMA normaliser saw every training end score: 50 steps x 16 pairs x 2 answers
    assert block["normalizer"]["kind"] == "ema" and block["normalizer"]["count"] == 50 * 16 * 2
    offset = block["sign_calibration"]["offset"]  # the loaders subtract it (no head bias to fold it into)
    trained = final_metrics(cost_run)["normalizer"]
    assert block["normalizer"] == {**trained, "mean": pytest.approx(trained["mean"] - offset)}
    pairs, _ = load_preference_pairs(demo_data / "val" / "harmless_pairs.jsonl", kind="harmless")
    scorer = load_scorer(str(cost_run), device="cpu", progress=False)
    ours = scorer.score([p.prompt for p in pairs[:6]], [p.rejected for p in pairs[:6]])
    hf = AutoModelForSequenceClassification.from_pretrained(cost_run / "final").eval()
    with torch.no_grad():
        plain = [hf(input_ids=torch.tensor([scorer.encode(p.prompt, p.rejected)])).logits[0, 0].item()
                 for p in pairs[:6]]
    assert ours == pytest.approx([p - offset for p in plain], abs=1e-5)  # as its config.json note says


def legacy_run_folder(run: Path, folder: Path) -> Path:
    """``run`` laid out as earlier versions wrote it: the model's files at the run folder's top level."""
    import shutil

    folder.mkdir()
    for child in run.iterdir():
        if child.is_file():
            shutil.copy(child, folder / child.name)
    for child in (run / "final").iterdir():
        shutil.copy(child, folder / child.name)
    return folder


@pytest.mark.slow
def test_a_run_folder_of_either_layout_stands_for_its_score_model(cost_run, demo_data, tmp_path):
    """The run folder, its final/ and a legacy run folder (model at the top level) load the same score model:
    load_score_model keeps the saved head, score type and normaliser; load_scorer the same scores."""
    from humanalign.data.pairs import load_preference_pairs
    from humanalign.models.load import resolve_model
    from humanalign.models.score_model import is_score_model_dir, load_score_model
    from humanalign.models.scorer import load_scorer

    legacy = legacy_run_folder(cost_run, tmp_path / "legacy")
    pairs, _ = load_preference_pairs(demo_data / "val" / "harmless_pairs.jsonl", kind="harmless")
    prompts, answers = [p.prompt for p in pairs[:4]], [p.chosen for p in pairs[:4]]
    scores = {}
    for name, path in (("run", cost_run), ("final", cost_run / "final"), ("legacy", legacy)):
        assert is_score_model_dir(resolve_model(path).path), name
        model, _ = load_score_model(str(path), allow_new_head=False)
        assert model.score_type == "cost" and model.normalizer.count == 50 * 16 * 2, name
        scores[name] = load_scorer(str(path), device="cpu", progress=False).score(prompts, answers)
    assert resolve_model(cost_run).path == str(cost_run / "final") and resolve_model(legacy).path == str(legacy)
    assert scores["run"] == scores["final"] == scores["legacy"]
    assert len(set(scores["run"])) == 4  # four different answers, four different costs: real scores


@pytest.mark.slow
def test_retraining_into_a_legacy_run_folder_removes_its_old_top_level_model(cost_run, demo_data, tmp_path, capsys):
    """overwrite_output_dir clears only the files a run of ours names; the model an earlier version saved at
    the top level would then shadow the new final/ (a folder holding a model stands for itself): it is removed
    once final/ is written, and the folder loads the new model."""
    from humanalign.models.scorer import load_scorer

    legacy = legacy_run_folder(cost_run, tmp_path / "legacy")
    (legacy / "notes.txt").write_text("the user's own file")
    pairs = _pairs(demo_data)
    cfg = tiny_config("cost_tiny", demo_data, legacy, max_steps=2, overwrite_output_dir=True, save_steps=None,
                      load_best_model_at_end=False)
    train_score_model(cfg, pairs[:32], pairs[32:40])
    assert "removed the model an earlier version saved at the top of" in capsys.readouterr().err
    assert not (legacy / "config.json").exists() and not list(legacy.glob("*.safetensors"))
    assert not (legacy / "tokenizer.json").exists() and (legacy / "notes.txt").is_file()
    assert (legacy / "final" / "config.json").is_file()
    answers = [p.chosen for p in pairs[:3]]
    new = load_scorer(str(legacy), device="cpu", progress=False).score([p.prompt for p in pairs[:3]], answers)
    final = load_scorer(str(legacy / "final"), device="cpu", progress=False).score([p.prompt for p in pairs[:3]],
                                                                                  answers)
    old = load_scorer(str(cost_run), device="cpu", progress=False).score([p.prompt for p in pairs[:3]], answers)
    assert new == final and new != pytest.approx(old, abs=1e-3)  # 2 steps from scratch, not the 50-step model


@pytest.mark.slow
def test_eval_rm_on_the_run_folder_reproduces_the_final_validation(cost_run, demo_data, tmp_path, monkeypatch):
    from humanalign.config.evaluation import EvalRMConfig
    from humanalign.eval.rm import run as eval_rm

    monkeypatch.setenv("HUMANALIGN_CACHE", str(tmp_path / "cache"))
    report = eval_rm(EvalRMConfig(model=str(cost_run), data=str(demo_data / "val" / "harmless_pairs.jsonl")))
    final = final_metrics(cost_run)["eval"]
    assert report["score_type"] == "cost" and report["pairs"] == int(final["eval/pairs"])
    for ours, theirs in (("accuracy", "accuracy"), ("sign_accuracy", "sign_accuracy"), ("auc", "auc"),
                         ("score_chosen", "mean_chosen"), ("score_rejected", "mean_rejected")):
        assert report[theirs] == pytest.approx(final[f"eval/{ours}"], abs=1e-5), ours


@pytest.mark.slow
def test_reward_model_beats_chance(demo_data, tmp_path, capsys):
    from humanalign.trainers.reward import run

    out = tmp_path / "rm"
    run(tiny_config("rm_tiny", demo_data, out))
    m = final_metrics(out)
    # the demo set's best possible accuracy is ~0.81 (annotators prefer some harmful compliances); measured 0.80
    assert m["score_type"] == "reward" and m["eval"]["eval/accuracy"] >= 0.7
    assert "eval/sign_accuracy" not in m["eval"]
    assert "[rm] final validation" in capsys.readouterr().err


@pytest.mark.slow
def test_harmless_pairs_without_labels_train_on_the_order_only(demo_data, tmp_path, capsys):
    rows = [json.loads(line) for line in (demo_data / "train" / "harmless_pairs.jsonl").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", "rm", "--config", str(PROJECT_ROOT / "configs" / "cost_tiny.yaml"),
                 "--train-harmless-path", str(bare), "--val-harmless-path", str(bare), "--max-eval-samples", "100",
                 "--output-dir", str(out), "--max-steps", "30", "--learning-rate", "2e-3", "--eval-steps", "null",
                 "--eval-on-start", "false", "--report-to", "[none]", "--progress-bar", "false"])
    err = capsys.readouterr().err
    assert code == 0
    notes = [line for line in err.splitlines() if "no is_safe labels" in line]
    assert notes == [f"[rm] {bare}: no is_safe labels on its {len(rows):,} harmless pairs: the cost model learns the "
                     "pair ordering only, sign terms off; its costs are not anchored at 0 (no sign accuracy)"]
    m = final_metrics(out)
    assert m["sign_terms"] is False and m["labelled_train_pairs"] == 0
    # measured 1.0 after 30 steps: the order alone is easy on the demo set; the costs are just not anchored at 0
    assert m["eval"]["eval/accuracy"] >= 0.85 and "eval/sign_accuracy" not in m["eval"]


@pytest.mark.slow
def test_resume_gives_the_same_losses(demo_data, tmp_path):
    common = {"max_steps": 8, "save_steps": 4, "logging_steps": 1, "train_harmless_path":
              str(demo_data / "val" / "harmless_pairs.jsonl"), "eval_steps": 4}
    full = tmp_path / "full"
    train = _pairs(demo_data)
    cfg = tiny_config("cost_tiny", demo_data, full, **common)
    train_score_model(cfg, train[:96], train[96:128])
    resumed = tmp_path / "resumed"
    cfg = tiny_config("cost_tiny", demo_data, resumed, resume_from_checkpoint=str(full / "checkpoint-4"), **common)
    train_score_model(cfg, train[:96], train[96:128])

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    a, b = losses(full), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6)
    # the normaliser statistics came back with the checkpoint and saw the same scores after it
    na, nb = final_metrics(full)["normalizer"], final_metrics(resumed)["normalizer"]
    assert nb["count"] == na["count"] == 8 * 16 * 2
    assert nb["mean"] == pytest.approx(na["mean"], abs=1e-6) and nb["var"] == pytest.approx(na["var"], abs=1e-6)


def _pairs(demo_data: Path) -> list:
    from humanalign.data.pairs import load_preference_pairs

    pairs, _ = load_preference_pairs(demo_data / "train" / "harmless_pairs.jsonl", kind="harmless")
    return pairs


@pytest.mark.slow
def test_lora_cost_model_with_gradient_checkpointing_saves_merged(demo_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    cfg = tiny_config("cost_tiny", demo_data, out, max_steps=40, learning_rate=5e-3, gradient_checkpointing=True,
                      lora={"enabled": True, "r": 8, "alpha": 16, "target_modules": "all-linear"})
    pairs = _pairs(demo_data)
    summary = train_score_model(cfg, pairs[:640], pairs[640:740])
    # measured 0.92 pair accuracy after 40 steps (LoRA on a random-init model learns slower than full training)
    assert summary["eval"]["eval/accuracy"] >= 0.8
    weights = load_file(out / "final" / "model.safetensors")
    assert not any("lora_" in k or "modules_to_save" in k for k in weights)  # the adapter is merged
    assert "score.weight" in weights and not (out / "final" / "adapter_config.json").exists()


def test_one_step_moves_each_layer_by_its_own_learning_rate(demo_data, tmp_path):
    """head_lr_multiplier / layer_lr_decay reach the trainer's optimizer: after one AdamW step (no warmup, no
    weight decay, eps far below the gradients) every weight moved by at most its group's rate, and the largest
    move in each tensor is that rate: the 2-layer tiny model's top layer 1e-3, the layer below 0.5e-3, the
    embeddings 0.25e-3; the logged train/lr is the peak rate."""
    from safetensors.torch import load_file

    from humanalign.models.load import resolve_model

    out = tmp_path / "groups"
    cfg = tiny_config("cost_tiny", demo_data, out, max_steps=1, warmup_ratio=0.0, learning_rate=1e-3,
                      adam_epsilon=1e-14, head_lr_multiplier=10.0, layer_lr_decay=0.5, eval_on_start=False)
    pairs = _pairs(demo_data)
    train_score_model(cfg, pairs[:16], pairs[16:20])
    base = load_file(Path(resolve_model("tiny").path) / "model.safetensors")
    trained = load_file(out / "final" / "model.safetensors")

    def moved(name: str) -> float:
        rows = base[name].shape[0]  # the embedding table may have gained a pad row
        return (trained[name][:rows] - base[name]).abs().max().item()

    assert moved("model.layers.1.mlp.up_proj.weight") == pytest.approx(1e-3, rel=1e-3)
    assert moved("model.layers.0.mlp.up_proj.weight") == pytest.approx(5e-4, rel=1e-3)
    assert moved("model.embed_tokens.weight") == pytest.approx(2.5e-4, rel=1e-3)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/lr"] for row in logged if "train/lr" in row] == [pytest.approx(1e-3)]


@pytest.mark.slow
def test_token_wise_cost_model(demo_data, tmp_path):
    out = tmp_path / "token"
    cfg = tiny_config("cost_tiny", demo_data, out, loss_granularity="token", max_steps=40)
    pairs = _pairs(demo_data)
    summary = train_score_model(cfg, pairs[:640], pairs[640:740])
    # measured 1.0 / 1.0 after 40 steps: the end scores order and sign the answers like the sequence-wise loss
    assert summary["eval"]["eval/accuracy"] >= 0.9 and summary["eval"]["eval/sign_accuracy"] >= 0.9
    assert json.loads((out / "final" / "config.json").read_text())["humanalign_score"]["loss_granularity"] == "token"
    assert summary["pair_forward"] == "plain"  # the token-wise loss reads every position of both rows


@pytest.mark.slow
def test_shared_prompt_rows_train_as_the_plain_forward_does(demo_data, tmp_path, capsys, monkeypatch):
    """The pair forward takes one row per pair (the prompt once, the last layer at the end tokens) and says so;
    when its self-check fails with the last layer at the ends, the whole last layer; when that fails too, the
    plain forward, with the reason; all give the same losses."""
    import humanalign.trainers.reward as reward

    pairs = _pairs(demo_data)
    losses = {}
    for layout in ("ends", "whole", "plain"):
        if layout == "whole":
            monkeypatch.setattr(reward, "shared_rows_agree", lambda model, *_: not model.end_rows_only)
        if layout == "plain":
            monkeypatch.setattr(reward, "shared_rows_agree", lambda *_: False)
        out = tmp_path / layout
        cfg = tiny_config("rm_tiny", demo_data, out, max_steps=4, batch_size=4, load_best_model_at_end=False,
                          save_steps=None, logging_steps=1)
        summary = train_score_model(cfg, pairs[:16], pairs[16:24])
        assert summary["pair_forward"] == ("plain" if layout == "plain" else "shared")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[layout] = [r["train/loss"] for r in rows if "train/loss" in r] + [summary["eval"]["eval/loss"]]
    err = capsys.readouterr().err
    shared = "[rm] pair forward: one row per pair (the prompt once, 4-D mask), "
    assert shared + "the last layer and the head on the 2 end tokens" in err
    assert shared + "the head on the 2 end tokens" in err
    assert "[rm] pair forward: plain (chosen and rejected rows, the prompt twice): the shared-prompt rows did not" in err
    assert len(losses["ends"]) == 5
    assert losses["ends"] == pytest.approx(losses["plain"], abs=1e-5)
    assert losses["whole"] == pytest.approx(losses["plain"], abs=1e-5)


@pytest.mark.slow
def test_minilm_encoder_reads_prompt_sep_answer_and_reloads(demo_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from humanalign.models.scorer import load_scorer

    out = tmp_path / "minilm"
    cfg = tiny_config("rm_minilm", demo_data, out, max_steps=2, batch_size=4, max_length=64, max_prompt_length=24,
                      load_best_model_at_end=False, save_steps=None, learning_rate=1e-4)
    pairs = _pairs(demo_data)
    summary = train_score_model(cfg, pairs[:8], pairs[8:12])
    assert summary["steps"] == 2 and summary["eval"]["eval/pairs"] == 4
    scorer = load_scorer(str(out), device="cpu", progress=False)
    ids = scorer.encode(pairs[0].prompt, pairs[0].chosen)
    text = AutoTokenizer.from_pretrained(out / "final").decode(ids)
    assert text.startswith("[CLS] ") and text.count("[SEP]") == 2 and "im_start" not in text
    hf = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score([pairs[0].prompt], [pairs[0].chosen])[0] == pytest.approx(plain, abs=1e-5)


@pytest.mark.slow
def test_token_wise_loss_on_an_encoder_is_refused(demo_data, tmp_path, capsys):
    code = main(["train", "rm", "--config", str(PROJECT_ROOT / "configs" / "rm_minilm.yaml"),
                 "--train-harmless-path", str(demo_data / "val" / "harmless_pairs.jsonl"),
                 "--val-harmless-path", "null", "--load-best-model-at-end", "false",
                 "--loss-granularity", "token", "--output-dir", str(tmp_path / "run"), "--report-to", "[none]"])
    assert code == 2
    assert "loss_granularity: token needs a decoder backbone" in capsys.readouterr().err
