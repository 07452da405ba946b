"""Shared pieces of the scale-out tests (test_scale_out_*.py): FSDP2 and DeepSpeed ZeRO on two CPU processes
(gloo), launched as users launch them on GPUs. The tests are split over four files so that parallel test
processes (`make test`: pytest-xdist, one file per process at a time) can run them side by side.


Each sharded run is ``accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes 2
--mixed_precision no -m humanalign.cli train ...``: the shipped configs themselves, on a machine without a GPU
(the engine switches the CPU process group to FSDP2 / DeepSpeed: ``engine/launch.py``). It is compared with one
process taking the same 8 examples per step (batch size 8 against 2 x 4): the engine gives both the same
examples in every step (tests/engine/test_distributed.py), the losses are means over the step's examples and
both FSDP's reduce-scatter and ZeRO's gradient reduction average over the 2 equal halves, so per-step losses and
held-out losses agree up to the order of float sums. Tolerance 1e-5 (measured: at most 8e-7). Final weights:
within 2e-4 with fewer than 0.1 % of them more than 1e-6 apart, for the reason given in
tests/trainers/test_distributed_parity.py (Adam magnifies round-off in weights whose gradient is round-off
sized; measured here: at most 3.6e-5, 124 to 150 of 198,528 weights more than 1e-6 apart).

DPO runs with full fine-tuning, so its reference is a separate frozen model: sharded by ``fully_shard`` under
FSDP2 and a ZeRO-3 inference engine under ZeRO-3. Step 1's loss is ln 2 only if that reference holds the
policy's starting weights on both ranks. The DeepSpeed cases need ``pip install deepspeed`` (skipped without
it); its first run compiles DeepSpeed's CPU ops (shared-memory all-reduce, CPU Adam) into
~/.cache/torch_extensions, about a minute per op on 2 cores, and reuses them afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from humanalign.paths import PROJECT_ROOT

ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
CONFIGS = PROJECT_ROOT / "configs"
STEPS = 6
LOG_EVAL_SAVE = ["--max-steps", str(STEPS), "--logging-steps", "1", "--eval-steps", "3", "--save-steps", "3",
                 "--report-to", "[none]", "--progress-bar", "false", "--seed", "3"]
DPO = ["--eval-on-start", "false", "--lr-scheduler", "constant", "--learning-rate", "5e-3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sharded(config: str) -> list[str]:
    """The launcher prefix for two CPU processes with one of the shipped accelerate configs (fp32 here:
    the configs ask for bf16, which a CPU runs but not within 1e-5 of fp32)."""
    return [ACCELERATE, "launch", "--config_file", str(CONFIGS / "accelerate" / f"{config}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]


def run_cli(prefix: list[str], args: list[str]) -> str:
    """Run ``humanalign <args>`` under ``prefix`` (python, or the launcher) and return its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable] if prefix == ["python"] else prefix
    done = subprocess.run([*cmd, "-m", "humanalign.cli", *args], env=env, capture_output=True, text=True,
                          timeout=400, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stderr


def train_dpo(prefix: list[str], out: Path, data: Path, batch_size: int, *extra: str) -> str:
    return run_cli(prefix, ["train", "dpo", "--config", str(CONFIGS / "dpo_tiny.yaml"), "--output-dir", str(out),
                            "--train-path", str(data / "val" / "helpful_pairs.jsonl"),
                            "--val-path", str(data / "test" / "helpful_pairs.jsonl"),
                            "--batch-size", str(batch_size), *LOG_EVAL_SAVE, *DPO, *extra])


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]
    return {m["step"]: m[key] for m in lines if key in m}


def assert_same_curve(one: Path, two: Path, key: str, steps: list[int], tolerance: float = 1e-5) -> float:
    a, b = metrics(one, key), metrics(two, key)
    assert sorted(a) == sorted(b) == steps, key
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst < tolerance, (key, a, b)
    return worst


def assert_close_weights(one: Path, two: Path, name: str = "model.safetensors") -> None:
    wa, wb = load_file(str(one / "final" / name)), load_file(str(two / "final" / name))
    assert wa.keys() == wb.keys() and len(wa) > 0  # tied embeddings saved once by both
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diffs.max().item() < 2e-4 and (diffs > 1e-6).float().mean().item() < 5e-3


def assert_loads_as_trained(final: Path) -> None:
    """The final folder is a plain Hugging Face model whose weights are the saved ones."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    saved = load_file(str(final / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory) -> Path:
    """The demo pairs (485 train / 59 val / 56 test); the runs train on the 59 val pairs, evaluate on test."""
    from humanalign.config.base import load_config
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("scale_out")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return root / "data"


@pytest.fixture(scope="module")
def one_process_dpo(demo_pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "one"
    train_dpo(["python"], out, demo_pairs, 8)
    return out


LORA_MERGED = ["--set", "lora.enabled=true", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.dropout=0.0",
               "--set", "lora.merge_on_save=true", "--learning-rate", "3e-2"]


COST_VARIANTS = {
    "full": [],
    "lora": ["--set", "lora.enabled=true", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.dropout=0.0"],
    # full fine-tuning with per-group learning rates: the engine's AdamW over the groups, or under the offload
    # config DeepSpeed's CPU Adam built from them
    "groups": ["--set", "head_lr_multiplier=10", "--set", "layer_lr_decay=0.8"],
}


def train_cost_model(prefix: list[str], out: Path, data: Path, batch_size: int, *extra: str) -> str:
    return run_cli(prefix, ["train", "rm", "--config", str(CONFIGS / "cost_tiny.yaml"), "--output-dir", str(out),
                            "--set", f"train_harmless_path={data / 'val' / 'harmless_pairs.jsonl'}",
                            "--set", f"val_harmless_path={data / 'test' / 'harmless_pairs.jsonl'}",
                            "--batch-size", str(batch_size), *LOG_EVAL_SAVE, "--learning-rate", "1e-2", *extra])


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
PPO_TIMINGS = ("seconds", "per_s", "grad_norm", "time")  # wall-clock figures; grad norms: see the docstring


@pytest.fixture(scope="module")
def tiny_score_models(demo_pairs, tmp_path_factory) -> dict[str, Path]:
    """A helpful reward model and a harmless cost model on the tiny model (6 steps each)."""
    root = tmp_path_factory.mktemp("scorers")
    train_cost_model(["python"], root / "cost", demo_pairs, 8)
    run_cli(["python"], ["train", "rm", "--config", str(CONFIGS / "rm_tiny.yaml"), "--output-dir", str(root / "reward"),
                         "--set", f"train_helpful_path={demo_pairs / 'val' / 'helpful_pairs.jsonl'}",
                         "--set", f"val_helpful_path={demo_pairs / 'test' / 'helpful_pairs.jsonl'}",
                         "--max-steps", "6", "--report-to", "[none]", "--progress-bar", "false"])
    return {"reward": root / "reward", "cost": root / "cost"}


def train_ppo_lag(prefix: list[str], out: Path, data: Path, scorers: dict[str, Path], *extra: str) -> str:
    return run_cli(prefix, ["train", "ppo-lag", "--config", str(CONFIGS / "ppo_lag_tiny.yaml"), "--output-dir", str(out),
                            "--set", f"reward_model_path={scorers['reward']}", "--set", f"cost_model_path={scorers['cost']}",
                            "--set", f"prompts_path=[{data / 'val' / 'helpful_pairs.jsonl'}]",
                            "--set", f"eval_prompts_path={data / 'test' / 'harmless_pairs.jsonl'}",
                            "--set", "eval_max_prompts=7",  # odd: one rank answers a repeated, uncounted prompt
                            "--max-steps", "4", "--eval-on-start", "false", "--eval-steps", "2", "--save-steps", "2", "--max-grad-norm", "1000",
                            "--report-to", "[none]", "--progress-bar", "false", *extra])


PPO_LORA = ["--set", "lora.enabled=true", "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.dropout=0.0",
            "--set", "lora.merge_on_save=true"]


@pytest.fixture(scope="module")
def ddp_ppo_lag(demo_pairs, tiny_score_models, tmp_path_factory) -> Callable[[bool], Path]:
    """DDP runs on two processes, full fine-tuning and LoRA (keyed by lora), made when first asked for."""
    root, runs = tmp_path_factory.mktemp("ppo"), {}

    def get(lora: bool) -> Path:
        if lora not in runs:
            runs[lora] = root / ("lora" if lora else "full")
            train_ppo_lag([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port())], runs[lora],
                          demo_pairs, tiny_score_models, *(PPO_LORA if lora else []))
        return runs[lora]

    return get


def all_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not any(t in key for t in PPO_TIMINGS):
                out.setdefault(key, {})[record["step"]] = value
    return out
