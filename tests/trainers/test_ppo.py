"""PPO and PPO-Lagrangian: the pieces with hand-worked numbers, then tiny end-to-end runs whose optimum is known.

The end-to-end runs use a word-level tiny Llama (``word_world.build_word_model``: 29 tokens, one layer of width 32): with random
weights it emits each word with probability ~1/29, so a reward for emitting "good" starts near 0.04 and its
optimum is 1.0 (answers made only of "good"). Runs take a few seconds on one CPU thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from word_world import build_word_model, run_on_two_processes, write_word_prompts

from humanalign.config.base import load_config
from humanalign.config.ppo import PPOConfig, PPOLagConfig
from humanalign.data.prompts import load_ptx_examples
from humanalign.errors import ConfigError, RecordError
from humanalign.models.actor_critic import critic_source, vocabulary_mismatch
from humanalign.models.load import load_tokenizer
from humanalign.rollout.batch import response_logps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_world")
    model = build_word_model(root / "model")
    prompts = write_word_prompts(root / "prompts.jsonl")
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "say something"},
                                                    {"role": "assistant", "content": "ok " * (i % 3 + 1)}]}) + "\n"
                           for i in range(12)))
    return {"root": root, "model": model, "prompts": prompts, "sft": sft}


def ppo_values(world, out: Path, **overrides) -> dict:
    values = dict(
        actor_model_path=str(world["model"]), prompts_path=str(world["prompts"]), output_dir=str(out),
        rollout_batch_size=16, batch_size=16, max_new_tokens=8, max_length=64, max_prompt_length=32,
        learning_rate=3e-3, critic_learning_rate=3e-3, lr_scheduler="constant", kl_coeff=0.0,
        logging_steps=1, report_to=["none"], progress_bar=False, seed=0,
    )
    values.update(overrides)
    return values


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/reward" in r]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------------------------- config


def test_config_aliases_and_checks():
    cfg = load_config(PPOLagConfig, values={"policy_model_path": "m", "reward_fn": "keyword_reward", "cost_fn": "x:y",
                                            "gae_lambda": 0.9, "threshold": -1.0, "λ_init": 2.0})
    assert (cfg.actor_model_path, cfg.lam, cfg.cost_threshold, cfg.lambda_init) == ("m", 0.9, -1.0, 2.0)
    assert cfg.is_lagrangian and cfg.uses_cost
    assert not load_config(PPOLagConfig, values={"reward_fn": "a:b", "cost_fn": "x:y", "reward_shaping": True}
                           ).is_lagrangian
    with pytest.raises(ConfigError, match="reward_model_path, reward_fn"):
        load_config(PPOConfig, values={})
    with pytest.raises(ConfigError, match="needs cost_model_path"):
        load_config(PPOLagConfig, values={"reward_fn": "a:b"})
    with pytest.raises(ConfigError, match="whole optimizer steps"):  # 6 sequences cannot make steps of 4
        load_config(PPOConfig, values={"reward_fn": "a:b", "rollout_batch_size": 3, "num_return_sequences": 2,
                                       "batch_size": 4})
    with pytest.raises(ConfigError, match="must fit in max_length"):
        load_config(PPOConfig, values={"reward_fn": "a:b", "max_length": 64, "max_prompt_length": 32,
                                       "max_new_tokens": 40})


def test_missing_inputs_fail_before_the_run_folder_exists(world, tmp_path):
    from humanalign.errors import UserError
    from humanalign.trainers.ppo import run

    out = tmp_path / "never"
    cfg = load_config(PPOConfig, values=ppo_values(world, out, reward_fn="keyword_reward",
                                                   prompts_path=str(tmp_path / "absent.jsonl")))
    with pytest.raises(UserError, match="prompts_path: .*absent.jsonl not found"):
        run(cfg)
    cfg = load_config(PPOConfig, values=ppo_values(world, out, reward_fn="keyword_reward",
                                                   reward_model_path=str(tmp_path / "no_rm")))
    with pytest.raises(UserError, match="no_rm"):
        run(cfg)
    assert not out.exists()


@pytest.mark.parametrize("name", ["ppo.yaml", "ppo_lag.yaml", "ppo_lag_tiny.yaml"])
def test_shipped_configs_validate(name):
    from humanalign.cli import COMMANDS, _import, infer_command

    path = Path(__file__).resolve().parents[2] / "configs" / name
    cfg = load_config(_import(COMMANDS[infer_command(str(path))][0]), path)
    assert isinstance(cfg, PPOLagConfig) == name.startswith("ppo_lag")


# --------------------------------------------------------------------------------------------- pieces


def test_critic_source_prefers_a_score_model_on_the_same_tokenizer(world, tmp_path):
    from humanalign.models.score_model import load_score_model, save_score_model

    cfg = load_config(PPOConfig, values={"reward_fn": "a:b"})
    actor_path = str(world["model"])
    tokenizer = load_tokenizer(actor_path)
    same, same_tok = load_score_model(actor_path, allow_new_head=True)
    save_score_model(same, same_tok, tmp_path / "rm_same")
    other, other_tok = load_score_model("tiny", allow_new_head=True)
    save_score_model(other, other_tok, tmp_path / "rm_other")
    assert vocabulary_mismatch(tokenizer, same_tok) is None
    assert vocabulary_mismatch(tokenizer, other_tok) is not None  # the BPE vocabulary of the tiny preset
    assert critic_source(None, str(tmp_path / "rm_same"), actor_path, tokenizer, cfg) == str(tmp_path / "rm_same")
    assert critic_source(None, str(tmp_path / "rm_other"), actor_path, tokenizer, cfg) == actor_path
    assert critic_source(None, None, actor_path, tokenizer, cfg) == actor_path
    assert critic_source("explicit", str(tmp_path / "rm_same"), actor_path, tokenizer, cfg) == "explicit"


def test_ptx_data_from_pairs_and_conversations(world, tmp_path):
    """(The prompt files and the ptx stream are tested in tests/data/test_prompts.py.)"""
    b = tmp_path / "b.jsonl"
    b.write_text('{"prompt": "say good", "chosen": "good good", "rejected": "bad"}\n')
    tokenizer = load_tokenizer(str(world["model"]))
    pair = load_ptx_examples(str(b), "auto", tokenizer, 64)  # a pair's chosen answer is imitated
    assert tokenizer.decode([t for t in pair[0]["labels"] if t != -100]) == "good good <|im_end|>"
    assert len(load_ptx_examples(str(world["sft"]), "auto", tokenizer, 64)) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"messages": "oops"}\n')
    with pytest.raises(RecordError, match=":2: field 'messages'"):
        load_ptx_examples(str(bad), "auto", tokenizer, 64)


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ppo_learns_a_token_emission_reward(world, tmp_path):
    """Reward = share of the answer's words that are "good" (optimum 1.0). Starting near 1/29, the mean reward
    of the last 3 rollouts is at least 0.5 above that of the first 3 after 24 rollouts (48 updates); seeds 0-3
    give rises of 0.6 to 0.9."""
    from transformers import AutoModelForCausalLM

    from humanalign.trainers.ppo import run

    out = tmp_path / "run"
    cfg = load_config(PPOConfig, values=ppo_values(world, out, reward_fn="keyword_reward",
                                                   reward_fn_kwargs={"keywords": ["good"]}, update_iters=2,
                                                   max_steps=48, logging_steps=2))
    result = run(cfg)
    rows = train_rows(out)
    rewards = [r["train/reward"] for r in rows]
    assert len(rewards) == 24
    assert mean(rewards[:3]) < 0.1
    assert mean(rewards[-3:]) - mean(rewards[:3]) >= 0.5, rewards
    for key in ("entropy", "clipfrac", "kl", "response_length", "reward_value_loss", "advantage_std",
                "actor_grad_norm", "reward_critic_grad_norm", "critic_lr"):
        assert f"train/{key}" in rows[-1], key
    assert result["final_model"] == str(out / "final")
    assert (out / "reward_critic" / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers loads the policy
    assert model.config.vocab_size == 29


@pytest.mark.parametrize("lagrangian", [False, True], ids=["ppo", "ppo-lag"])
def test_eval_on_start_logs_the_baseline_at_step_0(world, tmp_path, lagrangian):
    """eval_on_start: the held-out prompts are answered once before the first rollout and logged at step 0;
    off, nothing is logged at step 0. Generation runs on a forked RNG, so the training that follows is the same
    number for number, and so is the evaluation after the last step."""
    from humanalign.trainers.ppo import run

    extra = dict(cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["bad"], "per_word": True}) if lagrangian else {}
    rows = {}
    for on in (True, False):
        out = tmp_path / f"run-{on}"
        values = ppo_values(world, out, reward_fn="keyword_reward", reward_fn_kwargs={"keywords": ["good"]},
                            eval_prompts_path=str(world["prompts"]), eval_max_prompts=6, eval_on_start=on,
                            rollout_batch_size=4, batch_size=4, max_steps=2, **extra)
        result = run(load_config(PPOLagConfig if lagrangian else PPOConfig, values=values))
        rows[on] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert (result["eval_on_start"] is not None) == on
    keys = {"eval/reward", "eval/response_length", "eval/finished"} | ({"eval/cost"} if lagrangian else set())
    at_start = [r for r in rows[True] if r["step"] == 0]
    assert len(at_start) == 1 and keys <= set(at_start[0])
    assert 0.0 <= at_start[0]["eval/reward"] <= 1.0 and at_start[0]["eval/response_length"] > 0
    assert not [r for r in rows[False] if r["step"] == 0]
    later = {on: [r for r in rows[on] if r["step"] > 0] for on in rows}
    assert [r["step"] for r in later[True]] == [r["step"] for r in later[False]] == [1, 2, 2]
    for a, b in zip(later[True], later[False]):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("train/", "eval/")) and not key.endswith(("_seconds", "tokens_per_s")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_ppo_lag_pushes_the_cost_under_its_threshold(world, tmp_path):
    """Reward: 1 per "good", 2 per "bad" (per word); cost: share of "bad" words, threshold 0.05. The reward
    alone drives "bad" up; once the cost window exceeds the threshold lambda rises until (A_r - lam A_c) /
    (1 + lam) favours "good" (lam > 1); the cost falls under the threshold and lambda turns down by ever
    smaller steps (log-lambda moves by lambda_lr (J_c - d) lambda). Seeds 0-3 peak at lambda 2.6 to 5."""
    from humanalign.trainers.ppo import run

    out = tmp_path / "run"
    cfg = load_config(PPOLagConfig, values=ppo_values(
        world, out, reward_fn="keyword_reward", reward_fn_kwargs={"keywords": {"good": 1.0, "bad": 2.0}},
        cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["bad"], "per_word": True}, cost_threshold=0.05,
        lambda_init=1.0, lambda_lr=1.0, lambda_max=5.0, episode_cost_window_size=16, update_iters=2,
        max_steps=80, logging_steps=2))
    result = run(cfg)
    rows = train_rows(out)
    costs = [r["train/cost"] for r in rows]
    lambdas = [r["train/lambda"] for r in rows]
    assert len(rows) == 40
    assert max(costs) > 0.1  # the reward pushed the cost above its threshold first
    assert mean(costs[-5:]) < 0.05  # ... and the constraint pushed it back under
    peak = lambdas.index(max(lambdas))
    assert max(lambdas) > 1.5 * lambdas[0] and peak < len(lambdas) - 10  # lambda rose, then turned
    late = lambdas[-10:]
    assert all(b <= a + 1e-9 for a, b in zip(late, late[1:]))  # cost under the threshold: lambda only falls
    steps = [abs(b - a) for a, b in zip(lambdas, lambdas[1:])]
    assert mean(steps[-5:]) < mean(steps[peak:peak + 5])  # ... by ever smaller steps: it settles
    assert mean(r["train/reward"] for r in rows[-5:]) > 0.8  # the safe optimum: mostly "good"
    assert result["lambda"] == pytest.approx(lambdas[-1], rel=0.2)
    assert (out / "cost_critic" / "config.json").is_file()


@pytest.mark.slow
def test_resume_continues_exactly(world, tmp_path):
    """PPO-Lag with reward normalisation, adaptive KL and a ptx loss: a run resumed from its checkpoint at rollout
    3 of 6 ends with the same actor, critics, lambda and metrics as the uninterrupted run."""
    from safetensors.torch import load_file

    from humanalign.trainers.ppo import run

    common = dict(reward_fn="keyword_reward", reward_fn_kwargs={"keywords": {"good": 1.0, "bad": 2.0}},
                  cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["bad"], "per_word": True},
                  cost_threshold=0.02, lambda_lr=1.0, episode_cost_window_size=16, rollout_batch_size=8,
                  batch_size=4, gradient_accumulation_steps=2, update_iters=2, max_steps=12, save_steps=6,
                  logging_steps=2, normalize_reward=True, kl_coeff=0.05,
                  adaptive_kl={"enabled": True, "target": 0.5, "horizon": 64}, ptx_path=str(world["sft"]),
                  ptx_coeff=0.5)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(load_config(PPOLagConfig, values=ppo_values(world, full, **common)))
    state = torch.load(full / "checkpoint-6" / "extra_state.pt", weights_only=True)
    assert set(state) == {"kl_controller", "reward_stats", "lagrangian"}
    assert state["lagrangian"]["window"] and state["reward_stats"]["count"] == 3 * 8
    run(load_config(PPOLagConfig, values=ppo_values(world, resumed, resume_from_checkpoint=str(full / "checkpoint-6"),
                                                    **common)))
    rows_full, rows_resumed = train_rows(full), train_rows(resumed)
    assert [r["step"] for r in rows_resumed] == [8, 10, 12]  # the resumed run starts after step 6
    for a, b in zip(rows_full[-3:], rows_resumed):
        for key in ("train/reward", "train/cost", "train/lambda", "train/kl_coef", "train/reward_value_loss",
                    "train/cost_value_loss", "train/ptx_loss", "train/reward_normalized"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    end_full = load_file(full / "checkpoint-12" / "model.safetensors")
    end_resumed = load_file(resumed / "checkpoint-12" / "model.safetensors")
    assert any(k.startswith("reward_critic.") for k in end_full) and any(k.startswith("cost_critic.") for k in end_full)
    for key, value in end_full.items():
        torch.testing.assert_close(end_resumed[key], value, atol=1e-5, rtol=1e-4)
    lam_full = torch.load(full / "checkpoint-12" / "extra_state.pt", weights_only=True)["lagrangian"]
    lam_resumed = torch.load(resumed / "checkpoint-12" / "extra_state.pt", weights_only=True)["lagrangian"]
    assert lam_resumed["log_lambda"] == pytest.approx(lam_full["log_lambda"], rel=1e-5)
    assert lam_resumed["window"] == pytest.approx(lam_full["window"], rel=1e-5)


@pytest.mark.slow
def test_lora_actor_reward_model_on_another_tokenizer_and_reward_shaping(world, tmp_path):
    """A LoRA actor takes its reference from its own adapter-disabled weights (no copy); a reward model with a
    different tokenizer scores the decoded text (re-tokenised) and the critic starts from the actor instead;
    the reward-shaping baseline trains one critic on R - lambda C."""
    from humanalign.engine import Engine
    from humanalign.models.load import load_causal_lm
    from humanalign.models.score_model import load_score_model, save_score_model
    from humanalign.models.scorer import load_scorer
    from humanalign.trainers.ppo import PPOTrainer

    rm, rm_tok = load_score_model("tiny", allow_new_head=True)  # the tiny preset's BPE tokenizer, not the words
    save_score_model(rm, rm_tok, tmp_path / "rm")
    cfg = load_config(PPOLagConfig, values=ppo_values(
        world, tmp_path / "run", reward_model_path=str(tmp_path / "rm"), cost_fn="banned_word_cost",
        cost_fn_kwargs={"banned": ["bad"]}, reward_shaping=True, lambda_init=0.5, max_steps=1, rollout_batch_size=4,
        batch_size=4, lora={"enabled": True, "r": 2, "merge_on_save": True}))
    with Engine(cfg, name="ppo-lag") as engine:
        trainer = PPOTrainer(cfg, engine)
        assert trainer.ref is None and list(trainer.unwrapped.critics()) == ["reward"]
        captured = []
        generate = trainer.rollout_engine.generate
        trainer.rollout_engine.generate = lambda *a, **k: captured.append(generate(*a, **k)) or captured[-1]
        batch = trainer.rollout(0)
        gen = captured[0]
        prompts = [trainer.prompts[i] for i in trainer.schedule.prompt_rows(0)]
        expected = load_scorer(str(tmp_path / "rm"), device="cpu").score(
            [prompts[i] for i in gen.prompt_index], gen.texts)
        assert trainer.last_rollout["reward_model_score"] == pytest.approx(mean(expected), rel=1e-5)
        # a fresh LoRA adapter is the identity: reference log-probs equal the actor's own
        torch.testing.assert_close(batch.ref_logps, batch.old_logps)
        base = load_causal_lm(str(world["model"]), trainable=False)
        with torch.no_grad():
            logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(response_logps(logits, batch)[0], batch.ref_logps, atol=1e-5, rtol=1e-5)
        # the rollout's no-grad forward and the update's forward see the same policy: ratios start at exactly 1
        _, metrics = trainer._loss(batch.select(range(len(batch))), None)
        assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-7)
        assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
        trainer.update(batch, 0)
        trainer.rollout_engine.generate = generate
    assert trainer.lam is None


@pytest.mark.slow
def test_cli_train_ppo(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from humanalign.cli import main

    out = tmp_path / "cli_run"
    code = main(["train", "ppo", "--actor-model-path", str(world["model"]), "--prompts-path", str(world["prompts"]),
                 "--output-dir", str(out), "--reward-fn", "keyword_reward", "--rollout-batch-size", "4",
                 "--batch-size", "4", "--max-new-tokens", "4", "--max-length", "64", "--max-prompt-length", "32",
                 "--max-steps", "2", "--report-to", "[none]", "--progress-bar", "false"])
    assert code == 0
    assert len(train_rows(out)) == 1  # logging_steps 10: one log at the last step
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 1


DRIVER = '''
import json, os, sys
import torch
from humanalign.config.base import load_config
from humanalign.config.ppo import PPOLagConfig
from humanalign.engine import Engine
from humanalign.trainers.ppo import PPOTrainer

torch.set_num_threads(1)
cfg = load_config(PPOLagConfig, values=json.loads(open(sys.argv[1]).read()))
with Engine(cfg, name="ppo-lag") as engine:
    trainer = PPOTrainer(cfg, engine)
    trainer.train()
state = {"lagrangian": trainer.lam.state_dict(), "reward_stats": trainer.reward_stats.state_dict(),
         "kl_controller": trainer.kl_ctl.state_dict()}
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(state, f)
'''


@pytest.mark.slow
def test_ppo_lag_on_two_processes_keeps_lambda_and_statistics_identical_on_both_ranks(world, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank generates its own rollouts, but the costs behind lambda's
    update, the reward normaliser's statistics and the KL controller's input are gathered across ranks, so every
    rank ends with the same lambda, cost window and statistics, built from both ranks' episodes; checkpoints and
    critics are written once."""
    out = tmp_path / "run"
    values = ppo_values(world, out, reward_fn="keyword_reward", reward_fn_kwargs={"keywords": {"good": 1.0, "bad": 2.0}},
                        cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["bad"], "per_word": True},
                        cost_threshold=0.02, lambda_lr=1.0, episode_cost_window_size=64, rollout_batch_size=8,
                        batch_size=8, update_iters=1, max_steps=4, save_steps=4, logging_steps=1,
                        normalize_reward=True, kl_coeff=0.05, adaptive_kl={"enabled": True, "target": 0.5,
                                                                            "horizon": 64})
    states = run_on_two_processes(DRIVER, values, tmp_path, timeout=300)

    rank0, rank1 = (json.loads((states / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # lambda, its cost window, the reward statistics, the KL coefficient: the same numbers
    assert len(rank0["lagrangian"]["window"]) == 4 * 2 * 8  # 4 rollouts x 2 ranks x 8 episodes
    assert rank0["reward_stats"]["count"] == 4 * 2 * 8
    assert rank0["lagrangian"]["log_lambda"] != 0.0  # the costs moved lambda: a real check, not two defaults
    saved = torch.load(out / "checkpoint-4" / "extra_state.pt", weights_only=True)
    assert saved["lagrangian"]["log_lambda"] == pytest.approx(rank0["lagrangian"]["log_lambda"], rel=1e-6)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["num_processes"] == 2
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one metrics line per step: rank 0 writes them
    assert (out / "cost_critic" / "config.json").is_file() and (out / "final" / "config.json").is_file()
