"""Pinned curves: the first five logged values of every trainer on the tiny model, to 1e-4.

Each test runs one trainer's ``run(cfg)`` for a few optimizer steps (logging every step, seed 0, one CPU thread)
on small demo data and compares what it wrote to metrics.jsonl with numbers recorded here, as torchtune's recipe
tests pin their loss curves. Any refactor that changes the arithmetic (loss reductions, data order, masking,
the optimizer, lambda's update) moves these numbers, even when every behavioural test still passes.

Pinned: SFT (full and LoRA) train/loss; reward model (helpful) and cost model with sign terms (harmless)
train/loss; the DPO family (sigmoid, ipo, hinge, cpo, orpo, simpo) train/loss; Safe-MM-DPO (label costs; and
score-model margins with the KL term) train/loss_total and train/lambda; PPO train/pg_loss,
train/reward_value_loss and train/entropy (steps 1-5: the first pass over a rollout has ratio 1 and whitened
advantages, so its policy loss is 0; the second is not); PPO-Lagrangian the same plus train/cost_value_loss and
train/lambda (rollouts 1-5).

The values were recorded on commit 6edd61a, before the trainers' structure refactor; PPO's and
PPO-Lagrangian's were re-recorded when the rollout loop's sampler moved from ``torch.multinomial`` to the inverse
transform (``rollout.hf.sample_categorical``: the same distribution, other draws for the same seed). A deliberate numerical change
must re-record them: run

    HUMANALIGN_RECORD_PINS=1 python -m pytest -q -s tests/trainers/test_pinned_curves.py

which prints each test's actual values as a paste-ready ``PINS`` entry instead of asserting; paste them below
and say in the commit message why the numbers moved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.config.ppo import PPOConfig, PPOLagConfig
from humanalign.config.rm import RewardModelConfig
from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.config.sft import SFTConfig
from humanalign.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow  # whole (short) training runs, as the trainers' other end-to-end tests

RECORD = os.environ.get("HUMANALIGN_RECORD_PINS") == "1"
STEPS = 5
COMMON = {"report_to": ["none"], "progress_bar": False, "logging_steps": 1, "max_steps": STEPS, "seed": 0,
          "eval_on_start": False, "eval_steps": None, "save_steps": None, "mixed_precision": "no"}

# name -> metric -> its value at steps 1..5 (recorded on 6edd61a; see the module docstring to re-record)
PINS: dict[str, dict[str, list[float]]] = {
    "sft-full": {
        "train/loss": [7.393838, 7.296326, 7.240913, 7.128746, 7.154744],
    },
    "sft-lora": {
        "train/loss": [7.393838, 7.374512, 7.335483, 7.324539, 7.312819],
    },
    "rm-helpful": {
        "train/loss": [0.694755, 0.638456, 0.648186, 0.552376, 0.536936],
    },
    "rm-harmless": {
        "train/loss": [2.060635, 1.692306, 2.188757, 1.801981, 1.778654],
    },
    "dpo-sigmoid": {
        "train/loss": [0.693147, 0.690485, 0.613756, 0.643551, 0.55754],
    },
    "dpo-ipo": {
        "train/loss": [25.0, 25.051229, 24.624796, 24.683109, 24.065664],
    },
    "dpo-hinge": {
        "train/loss": [1.0, 0.993847, 0.837571, 0.893591, 0.707132],
    },
    "dpo-cpo": {
        "train/loss": [13.278538, 18.71866, 22.228085, 13.595993, 18.161402],
    },
    "dpo-orpo": {
        "train/loss": [7.463693, 7.400992, 7.289676, 7.208106, 7.231688],
    },
    "dpo-simpo": {
        "train/loss": [0.974529, 0.975493, 0.969972, 0.97174, 0.967253],
    },
    "safe-mm-dpo-labels": {
        "train/loss_total": [0.693147, 0.623632, 0.587308, 0.543251, 0.491285],
        "train/lambda": [1.0, 1.05, 1.030916, 1.005478, 1.049124],
    },
    "safe-mm-dpo-rm-margins-kl": {
        "train/loss_total": [0.693147, 0.615894, 0.582095, 0.528286, 0.496211],
        "train/lambda": [1.0, 1.15102, 1.480442, 1.486037, 0.855087],
    },
    "ppo": {
        "train/pg_loss": [0.0, -0.137378, 0.0, -0.13532, 0.0],
        "train/reward_value_loss": [0.009816, 0.20018, 0.097549, 0.002736, 0.012767],
        "train/entropy": [7.339326, 7.33989, 7.339175, 7.339426, 7.338973],
    },
    "ppo-lag": {
        "train/pg_loss": [0.0, -0.140792, 0.0, -0.122719, 0.0],
        "train/reward_value_loss": [0.009816, 0.20018, 0.08852, 0.001943, 0.010523],
        "train/entropy": [7.339326, 7.339675, 7.338645, 7.338227, 7.338914],
        "train/cost_value_loss": [0.018812, 0.205248, 0.043046, 0.011161, 0.015212],
        "train/lambda": [0.980199, 0.96117, 0.94287, 0.925256, 0.908292],
    },
}


# ----------------------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo set (600 records) prepared: {train,val,test}/{helpful,harmless}_pairs.jsonl (485 / 59 / 56)."""
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("pins_demo")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return root / "data"


def pairs(demo_data: Path, kind: str) -> str:
    """The 59 validation pairs of one kind, used as a small training file."""
    return str(demo_data / "val" / f"{kind}_pairs.jsonl")


def check(name: str, run_dir: Path, keys: tuple[str, ...]) -> None:
    """The first STEPS logged values of each key against PINS[name] (abs 1e-4), or print them when recording."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    actual = {k: [round(float(r[k]), 6) + 0.0 for r in rows if k in r][:STEPS] for k in keys}  # + 0.0: no -0.0
    assert all(len(v) == STEPS for v in actual.values()), actual
    if RECORD:
        print(f'\n    "{name}": {{' + "".join(f'\n        "{k}": {json.dumps(v)},' for k, v in actual.items()) + "\n    },")
        return
    assert name in PINS, f"no pinned values for {name}: record them (see the module docstring)"
    for key in keys:
        assert actual[key] == pytest.approx(PINS[name][key], abs=1e-4, rel=0), (name, key)


# ----------------------------------------------------------------------------------------- SFT, score models


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft(demo_data, tmp_path, lora):
    from humanalign.trainers.sft import run

    values = {**COMMON, "output_dir": str(tmp_path / "run"), "train_path": pairs(demo_data, "helpful"),
              "val_path": None, "batch_size": 4, "max_length": 96, "max_prompt_length": 32, "warmup_ratio": 0.0}
    if lora:
        values.update(learning_rate=5e-3, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                                                "target_modules": "all-linear"})
    run(load_config(SFTConfig, PROJECT_ROOT / "configs" / "sft_tiny.yaml", values=values))
    check(f"sft-{'lora' if lora else 'full'}", tmp_path / "run", ("train/loss",))


@pytest.mark.parametrize("task", ["helpful", "harmless"])
def test_score_model(demo_data, tmp_path, task):
    """helpful: configs/rm_tiny.yaml (Bradley-Terry); harmless: configs/cost_tiny.yaml (cost model, sign terms)."""
    from humanalign.trainers.reward import run

    values = {**COMMON, "output_dir": str(tmp_path / "run"), f"train_{task}_path": pairs(demo_data, task),
              f"val_{task}_path": None, "batch_size": 8, "max_length": 96, "max_prompt_length": 32,
              "warmup_ratio": 0.0}
    run(load_config(RewardModelConfig, PROJECT_ROOT / "configs" / f"{'rm' if task == 'helpful' else 'cost'}_tiny.yaml",
                    values=values))
    check(f"rm-{task}", tmp_path / "run", ("train/loss",))


# ----------------------------------------------------------------------------------------- DPO family


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "cpo", "orpo", "simpo"])
def test_dpo(demo_data, tmp_path, loss_type):
    from humanalign.trainers.dpo import run

    values = {**COMMON, "output_dir": str(tmp_path / "run"), "train_path": pairs(demo_data, "helpful"),
              "val_path": None, "loss_type": loss_type, "batch_size": 4, "max_length": 96, "max_prompt_length": 32}
    run(load_config(DPOConfig, PROJECT_ROOT / "configs" / "dpo_tiny.yaml", values=values))
    check(f"dpo-{loss_type}", tmp_path / "run", ("train/loss",))


# ----------------------------------------------------------------------------------------- Safe-MM-DPO


@pytest.fixture(scope="module")
def score_models(tmp_path_factory):
    """A tiny reward model and cost model with seeded random score heads, scaled so margins spread over units."""
    from humanalign.models.score_model import load_score_model, save_score_model

    root = tmp_path_factory.mktemp("pins_rms")
    out = {}
    for name, score_type, seed in (("helpful", "reward", 1), ("harmless", "cost", 2)):
        torch.manual_seed(seed)
        model, tok = load_score_model("tiny")
        with torch.no_grad():
            for p in model.model.score.parameters():
                p.mul_(50.0)
        save_score_model(model, tok, root / name, score_type=score_type)
        out[name] = root / name
    return out


@pytest.mark.parametrize("margins", [False, True], ids=["labels", "rm-margins-kl"])
def test_safe_mm_dpo(demo_data, tmp_path, margins, request, monkeypatch):
    """configs/safe_mm_dpo_tiny.yaml, both streams, lambda updated every step; with margins: score-model margins
    for both streams, the cost model's costs in the window, and the exact KL term."""
    from humanalign.models.tiny import tiny_model_path
    from humanalign.trainers.safe_mm_dpo import run

    values = {**COMMON, "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_length": 96,
              "max_prompt_length": 32, "cost_window_size": 8, "val_helpful_path": None, "val_harmless_path": None,
              **{f"train_{k}_path": pairs(demo_data, k) for k in ("helpful", "harmless")}}
    if margins:
        rms = request.getfixturevalue("score_models")
        cache = tmp_path / "cache"  # a fresh score cache (holding the built tiny model): no scores cached elsewhere
        cache.mkdir()
        (cache / tiny_model_path().name).symlink_to(tiny_model_path(), target_is_directory=True)
        monkeypatch.setenv("HUMANALIGN_CACHE", str(cache))
        values.update(helpful_rm_path=str(rms["helpful"]), harmless_rm_path=str(rms["harmless"]), kl_coeff=0.05,
                      cost_threshold=-3.1)  # near the random cost head's J_c: lambda moves both ways
    run(load_config(SafeMMDPOConfig, PROJECT_ROOT / "configs" / "safe_mm_dpo_tiny.yaml", values=values))
    check(f"safe-mm-dpo-{'rm-margins-kl' if margins else 'labels'}", tmp_path / "run",
          ("train/loss_total", "train/lambda"))


# ----------------------------------------------------------------------------------------- PPO, PPO-Lagrangian


@pytest.fixture(scope="module")
def prompts(demo_data, tmp_path_factory) -> Path:
    """40 demo prompts, helpful and harmful."""
    rows = [json.loads(line) for kind in ("helpful", "harmless")
            for line in Path(pairs(demo_data, kind)).read_text(encoding="utf-8").splitlines()[:20]]
    path = tmp_path_factory.mktemp("pins_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("lagrangian", [False, True], ids=["ppo", "ppo-lag"])
def test_ppo(prompts, tmp_path, lagrangian):
    """Rule-based reward (keyword emission) and, for PPO-Lag, a banned-word cost: no score model is loaded. Two
    passes over each rollout (two optimizer steps), so the second step's clipped ratio is not 1 and the policy
    loss is not 0. Rollout metrics (lambda) are logged once per rollout: 5 rollouts, 10 steps."""
    from humanalign.trainers.ppo import run

    values = {**COMMON, "actor_model_path": "tiny", "prompts_path": str(prompts), "output_dir": str(tmp_path / "run"),
              "rollout_batch_size": 8, "batch_size": 8, "max_new_tokens": 8, "max_length": 64,
              "max_prompt_length": 32, "learning_rate": 3e-3, "critic_learning_rate": 3e-3,
              "lr_scheduler": "constant", "kl_coeff": 0.05, "update_iters": 2, "max_steps": 2 * STEPS, "reward_fn": "keyword_reward",
              "reward_fn_kwargs": {"keywords": {"the": 1.0, "you": 2.0}}}
    keys: tuple[str, ...] = ("train/pg_loss", "train/reward_value_loss", "train/entropy")
    if lagrangian:
        values.update(cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["you"], "per_word": True},
                      cost_threshold=0.02, lambda_init=1.0, lambda_lr=1.0, episode_cost_window_size=16)
        keys += ("train/cost_value_loss", "train/lambda")
    run(load_config(PPOLagConfig if lagrangian else PPOConfig, values=values))
    check("ppo-lag" if lagrangian else "ppo", tmp_path / "run", keys)
