"""GRPO-Lagrangian on two CPU processes (torchrun, gloo): every rank samples its own groups, but lambda's cost
window is the whole rollout of both ranks, and the batch std (scale_rewards=batch) is taken over both ranks'
scores; so both ranks end with the same lambda and window, built from both ranks' answers."""

from __future__ import annotations

import json

import pytest
import torch
from word_world import build_word_model, run_on_two_processes, write_word_prompts

DRIVER = '''
import json, os, sys
import torch
from humanalign.config.base import load_config
from humanalign.config.grpo import GRPOLagConfig
from humanalign.engine import Engine
from humanalign.trainers.grpo import GRPOTrainer

torch.set_num_threads(1)
cfg = load_config(GRPOLagConfig, values=json.loads(open(sys.argv[1]).read()))
with Engine(cfg, name="grpo-lag") as engine:
    trainer = GRPOTrainer(cfg, engine)
    trainer.train()
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump({"lagrangian": trainer.lam.state_dict(), "last_rollout": trainer.last_rollout}, f)
'''


@pytest.mark.slow
def test_grpo_lag_on_two_processes_keeps_lambda_identical_on_both_ranks(tmp_path):
    model = build_word_model(tmp_path / "model")
    prompts = write_word_prompts(tmp_path / "prompts.jsonl", n=32, words=(3, 3))
    out = tmp_path / "run"
    values = dict(actor_model_path=str(model), prompts_path=str(prompts), output_dir=str(out),
                  reward_fn="keyword_reward", reward_fn_kwargs={"keywords": {"good": 1.0, "bad": 2.0}},
                  cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["bad"], "per_word": True},
                  cost_threshold=0.02, lambda_lr=1.0, rollout_batch_size=2, num_generations=4, batch_size=8,
                  scale_rewards="batch", beta=0.05, max_new_tokens=6, max_length=64, max_prompt_length=32,
                  learning_rate=3e-3, lr_scheduler="constant", max_steps=3, save_steps=3, logging_steps=1,
                  report_to=["none"], progress_bar=False, seed=0)
    states = run_on_two_processes(DRIVER, values, tmp_path, timeout=600)

    rank0, rank1 = (json.loads((states / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["lagrangian"] == rank1["lagrangian"]  # lambda, its window and counters: the same numbers
    # the window is the last rollout of both ranks: 2 ranks x 2 prompts x 4 answers
    assert len(rank0["lagrangian"]["window"]) == 2 * 2 * 4
    assert rank0["lagrangian"]["num_updates"] == 3 and rank0["lagrangian"]["log_lambda"] != 0.0
    assert rank0["last_rollout"]["lambda"] == rank1["last_rollout"]["lambda"]
    saved = torch.load(out / "checkpoint-3" / "extra_state.pt", weights_only=True)
    assert saved["lagrangian"]["log_lambda"] == pytest.approx(rank0["lagrangian"]["log_lambda"], rel=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # rank 0 writes one line per step
    assert (out / "final" / "config.json").is_file()
