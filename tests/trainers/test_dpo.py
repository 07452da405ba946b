"""The DPO-family trainer: the loss table, hand-worked values at the start, every loss type for one step, an
end-to-end run on the demo pairs (held-out implicit-reward accuracy and margins rise), and resume == uninterrupted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from humanalign.cli import main
from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.data.preference_dataset import PairCollator, build_pair_dataset
from humanalign.engine import Engine
from humanalign.errors import ConfigError
from humanalign.models.load import load_causal_lm, load_tokenizer
from humanalign.models.logprobs import concatenated_forward
from humanalign.models.reference import FrozenReference
from humanalign.paths import PROJECT_ROOT
from humanalign.trainers.dpo import LossSettings, current_beta, pair_loss

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo set (600 records) prepared into {train,val,test}/helpful_pairs.jsonl: 485 / 59 / 56 pairs."""
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("dpo_demo")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return root / "data"


@pytest.fixture(scope="module")
def small_pairs(demo_data, tmp_path_factory) -> Path:
    """16 demo pairs plus 2 whose chosen and rejected responses are identical (to be skipped and counted)."""
    lines = (demo_data / "train" / "helpful_pairs.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    same = json.dumps({"prompt": "How do I fry an egg?", "chosen": "Heat the pan.", "rejected": "Heat  the pan."})
    path = tmp_path_factory.mktemp("dpo_small") / "pairs.jsonl"
    path.write_text("\n".join([*lines[:8], same, *lines[8:], same]) + "\n", encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def train_lines(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "train/loss" in m}


def eval_lines(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "eval/loss" in m}


# ----------------------------------------------------------------------------------------- settings


def test_loss_settings_follow_the_table():
    def settings(**values) -> LossSettings:
        return LossSettings.from_config(load_config(DPOConfig, values=values))

    assert not settings().average  # DPO: summed log-probs
    assert settings(average_log_prob=True).average  # MiniMind's DPO: averaged
    assert all(settings(loss_type=t).average for t in ("ipo", "orpo", "simpo"))
    assert not settings(loss_type="cpo").average
    assert settings(loss_type="cpo").cpo_alpha == 1.0 and settings(loss_type="cpo").nll_used
    assert settings(loss_type="simpo").sft_weight == 0.0 and not settings(loss_type="simpo").nll_used
    assert settings(loss_type="simpo", cpo_alpha=0.3).sft_weight == 0.3  # CPO-SimPO
    assert settings(loss_type="simpo", sft_weight=0.2).sft_weight == 0.2
    assert settings(loss_type="orpo").nll_used and settings(sft_weight=0.2).nll_used
    assert not settings().nll_used
    for bad in ({"loss_type": "cpo", "sft_weight": 0.5}, {"loss_type": "sigmoid", "cpo_alpha": 1.0},
                {"loss_type": "orpo", "average_log_prob": False}, {"loss_type": "hinge", "label_smoothing": 0.1},
                {"loss_type": "simpo", "cpo_alpha": 0.1, "sft_weight": 0.1},
                {"reference_mode": "adapter-disabled"},  # without LoRA
                {"reference_mode": "adapter-disabled", "lora": {"enabled": True}, "ref_model_path": "tiny"}):
        with pytest.raises(ConfigError):
            load_config(DPOConfig, values=bad)


def test_linear_beta_schedule():
    cfg = load_config(DPOConfig, values={"beta_schedule": "linear", "beta_min": 0.1, "beta_max": 0.5})
    # beta_min + (beta_max - beta_min) * step / total: 0.1, 0.2, 0.3, 0.4, 0.5 over 4 steps
    assert [round(current_beta(cfg, s, 4), 10) for s in range(5)] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert current_beta(load_config(DPOConfig, values={"beta": 0.3}), 7, 10) == 0.3


# ----------------------------------------------------------------------------------------- one batch


@pytest.fixture(scope="module")
def tiny_batch(demo_data):
    from humanalign.data.pairs import load_preference_pairs

    tokenizer = load_tokenizer("tiny")
    pairs, _ = load_preference_pairs(demo_data / "val" / "helpful_pairs.jsonl")
    dataset, _, _ = build_pair_dataset(pairs[:4], tokenizer, max_length=96, max_prompt_length=32)
    return PairCollator(tokenizer.pad_token_id)(list(dataset))


def test_pair_loss_at_the_start_by_hand(tiny_batch, tmp_path):
    """Policy == reference: every log-ratio is 0, so DPO's loss is -log sigmoid(0) = ln 2, rewards and margins
    are 0 and no pair counts as ranked right. The SFT term adds exactly sft_weight x the chosen NLL, the
    token-mean NLL of the chosen responses (sum of their log-probs / their token count)."""
    model = load_causal_lm("tiny")
    cfg = load_config(DPOConfig, values={"output_dir": str(tmp_path), "report_to": ["none"]})
    with Engine(cfg, name="t") as engine:
        reference = FrozenReference(engine.prepare_frozen(load_causal_lm("tiny", trainable=False)))
        plain = pair_loss(model, reference, tiny_batch, LossSettings("sigmoid", False), beta=0.1)
        with_sft = pair_loss(model, reference, tiny_batch, LossSettings("sigmoid", False, sft_weight=0.5,
                                                                         nll_used=True), beta=0.1)
    assert plain.loss.item() == pytest.approx(LN2, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert plain.metrics[key].abs().max().item() < 1e-5, key
    assert plain.metrics["rewards/accuracies"].tolist() == [0.5] * len(plain.metrics["rewards/accuracies"])  # ties
    with torch.no_grad():
        out = concatenated_forward(model, tiny_batch)
    nll = -(out["chosen_logps"].sum() / out["chosen_token_counts"].sum()).item()
    assert with_sft.metrics["nll"][0].item() == pytest.approx(nll, rel=1e-6)
    assert with_sft.loss.item() == pytest.approx(LN2 + 0.5 * nll, rel=1e-6)
    assert plain.loss.requires_grad and "nll" not in plain.metrics


# start-of-training loss of each reference-based type when policy == reference (log-ratio margin 0):
# sigmoid/cDPO and robust: ln 2 whatever the smoothing; hinge: relu(1 - 0) = 1; ipo: (0 - 1/(2*0.1))^2 = 25
START_LOSS = {"sigmoid": LN2, "hinge": 1.0, "ipo": 25.0, "robust": LN2}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "cpo", "orpo", "simpo"])
def test_every_loss_type_trains_one_step(loss_type, small_pairs, tmp_path):
    cfg = load_config(DPOConfig, values=dict(
        train_path=str(small_pairs), val_path=None, loss_type=loss_type, output_dir=str(tmp_path / "run"),
        max_length=96, max_prompt_length=32, batch_size=4, max_steps=1, learning_rate=1e-3, report_to=["none"],
        progress_bar=False, label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "cpo") else 0.0,
    ))
    summary = _run(cfg)
    assert summary["skipped"]["train"] == {"identical responses": 2} and summary["train_pairs"] == 16
    line = train_lines(tmp_path / "run")[1]
    assert math.isfinite(line["train/loss"]) and line["train/skipped_nonfinite"] == 0
    assert math.isfinite(line["train/grad_norm"]) and line["train/grad_norm"] > 0
    if loss_type in START_LOSS:
        assert line["train/loss"] == pytest.approx(START_LOSS[loss_type], rel=1e-5)
        assert summary["reference"].startswith("model")
    else:
        assert summary["reference"] is None
    if loss_type in ("cpo", "orpo"):  # NLL plus a positive preference term
        assert line["train/loss"] > line["train/nll"] > 0
    start = load_causal_lm("tiny").state_dict()
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 0  # the step changed the weights


def _run(cfg):
    from humanalign.trainers.dpo import run

    return run(cfg)


# ----------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_end_to_end_accuracy_and_margins_rise(demo_data, tmp_path, capsys):
    """`humanalign train dpo` with configs/dpo_tiny.yaml on the demo pairs (485 train, 59 held-out).

    Measured (40 steps of 8 pairs, ~25 s on 2 busy CPU cores): held-out implicit-reward accuracy 0 -> 0.85
    (50 of 59 pairs), mean margin 0 -> 1.65, loss ln 2 -> 0.36; at the start accuracy and margin are exactly 0
    (policy == reference: every pair is a tie)."""
    out = tmp_path / "dpo_tiny"
    code = main(["train", "dpo", "--config", str(PROJECT_ROOT / "configs" / "dpo_tiny.yaml"), "--output-dir", str(out),
                 "--train-path", str(demo_data / "train" / "helpful_pairs.jsonl"),
                 "--val-path", str(demo_data / "val" / "helpful_pairs.jsonl"), "--report-to", "[none]"])
    assert code == 0, capsys.readouterr().err
    evals = eval_lines(out)
    first, last = evals[0], evals[max(evals)]
    assert max(evals) == 40 and set(evals) == {0, 20, 40}
    assert first["eval/rewards/accuracies"] == 0.5 and first["eval/rewards/margins"] == 0.0  # ties count 1/2
    assert first["eval/loss"] == pytest.approx(LN2, abs=1e-6)
    assert last["eval/rewards/accuracies"] >= 0.7  # measured 0.85
    assert last["eval/rewards/margins"] >= 0.8  # measured 1.65
    assert last["eval/loss"] < 0.5  # measured 0.36, from ln 2 = 0.693
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/beta"):
        assert key in train_lines(out)[40], key
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["step"] == 40 and summary["train_pairs"] == 485 and summary["val_pairs"] == 59
    # the final policy is an ordinary HF folder that loads and prefers the chosen answers more than the start did
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    trained = load_causal_lm(out / "final")
    assert trained.state_dict()["model.norm.weight"].shape == (64,)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    """A LoRA run (adapter-disabled reference, LoRA dropout, 2 accumulation steps, cosine lr) that crashes in
    step 5, after checkpoint-4, and resumes from `latest` ends with the same losses and the same adapter as a
    run that was never interrupted."""
    values = dict(
        train_path=str(demo_data / "val" / "helpful_pairs.jsonl"), val_path=None, max_length=96,
        max_prompt_length=32, batch_size=4, gradient_accumulation_steps=2, max_steps=6, save_steps=2,
        logging_steps=1, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=1, report_to=["none"],
        progress_bar=False, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
        beta_schedule="linear", beta_min=0.05, beta_max=0.2,
    )
    whole = tmp_path / "whole"
    _run(load_config(DPOConfig, values={**values, "output_dir": str(whole)}))

    crashed = tmp_path / "crashed"
    original = Engine.optimizer_step

    def crash_in_step_5(self):
        result = original(self)
        if self.step == 5:  # step 5 is logged, then the process "dies" before checkpoint-6
            raise KeyboardInterrupt("simulated kill")
        return result

    monkeypatch.setattr(Engine, "optimizer_step", crash_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        _run(load_config(DPOConfig, values={**values, "output_dir": str(crashed)}))
    monkeypatch.setattr(Engine, "optimizer_step", original)
    assert not (crashed / "final").exists() and (crashed / "checkpoint-4").is_dir()
    assert max(train_lines(crashed)) == 5
    summary = _run(load_config(DPOConfig, values={**values, "output_dir": str(crashed),
                                                  "resume_from_checkpoint": "latest"}))
    assert summary["steps"] == 6 and summary["reference"] == "adapter-disabled"

    a, b = train_lines(whole), train_lines(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # the crashed run's step-5 line was replaced
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-6), step
        assert b[step]["train/beta"] == pytest.approx(a[step]["train/beta"], abs=1e-12)
    assert a[6]["train/loss"] != a[1]["train/loss"]
    wa = load_file(str(whole / "final" / "adapter_model.safetensors"))
    wb = load_file(str(crashed / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-7, rtol=0)
    assert any(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k)  # the adapter did train


def test_precomputed_run_matches_frozen_model_run(small_pairs, tmp_path, capsys):
    """Three steps with reference log-probs carried in the batch (precomputed, cached) give the same losses as
    three steps with a frozen reference model; a second precomputed run reads the cache."""
    values = dict(train_path=str(small_pairs), val_path=None, max_length=96, max_prompt_length=32, batch_size=4,
                  max_steps=3, logging_steps=1, learning_rate=1e-3, report_to=["none"], progress_bar=False,
                  precompute_cache_dir=str(tmp_path / "cache"))
    runs = {}
    for name, mode in (("model", "model"), ("precomputed", "precomputed"), ("again", "precomputed")):
        capsys.readouterr()
        summary = _run(load_config(DPOConfig, values={**values, "reference_mode": mode,
                                                      "output_dir": str(tmp_path / name)}))
        runs[name] = (summary, train_lines(tmp_path / name), capsys.readouterr().err)
    assert runs["precomputed"][0]["reference"].startswith("precomputed")
    assert "precomputing reference log-probs of 16 pairs" in runs["precomputed"][2]
    assert "from the cache" in runs["again"][2] and "precomputing" not in runs["again"][2]
    assert runs["model"][1][1]["train/loss"] == pytest.approx(LN2, abs=1e-6)
    for step in (1, 2, 3):
        for name in ("precomputed", "again"):
            assert runs[name][1][step]["train/loss"] == pytest.approx(runs["model"][1][step]["train/loss"], abs=1e-5)
    assert runs["model"][1][3]["train/loss"] < LN2  # it trained
