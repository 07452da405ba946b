"""GRPO-Lagrangian on two CPU processes (torchrun, gloo): every rank samples its own groups, but lambda's cost
window is the whole rollout of both ranks, and the batch std (scale_rewards=batch) is taken over both ranks'
scores; so both ranks end with the same lambda and window, built from both ranks' answers."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("ppo_test_models", Path(__file__).with_name("test_ppo.py"))
_ppo_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ppo_tests)

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
    model = _ppo_tests.build_word_model(tmp_path / "model")
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_ppo_tests.WORDS) for _ in range(3))})
                               + "\n" for _ in range(32)))
    out, states = tmp_path / "run", tmp_path / "states"
    states.mkdir()
    values = dict(actor_model_path=str(model), prompts_path=str(prompts), output_dir=str(out),
                  reward_fn="keyword_reward", reward_fn_kwargs={"keywords": {"good": 1.0, "bad": 2.0}},
                  cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["bad"], "per_word": True},
                  cost_threshold=0.02, lambda_lr=1.0, rollout_batch_size=2, num_generations=4, batch_size=8,
                  scale_rewards="batch", beta=0.05, max_new_tokens=6, max_length=64, max_prompt_length=32,
                  learning_rate=3e-3, lr_scheduler="constant", max_steps=3, save_steps=3, logging_steps=1,
                  report_to=["none"], progress_bar=False, seed=0)
    (tmp_path / "values.json").write_text(json.dumps(values))
    (tmp_path / "driver.py").write_text(DRIVER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(tmp_path / "driver.py"),
                           str(tmp_path / "values.json"), str(states)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

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
