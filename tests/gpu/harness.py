"""Run every command a few steps on one device and return what it computed, for the CUDA-vs-CPU tests.

``train_losses(case, device, ...)`` runs one trainer's ``run(cfg)`` on the tiny model for ``steps`` optimizer steps
(logging every step, seed 0) and returns its logged train metrics per step; ``eval_result(command, device, ...)``
runs an evaluation command (generate, eval rm, eval arena, eval ppl, distill, export) and returns its numbers.
The device is chosen the way a user chooses it: on "cpu" the process is told there is no GPU
(``ACCELERATE_USE_CPU`` for the engine, ``torch.cuda.is_available() -> False`` for model loading and the eval
commands, which move their models to CUDA when there is one); on "cuda" nothing is changed.

Precision: ``fp32`` (``mixed_precision: no``, ``model.dtype: float32``) for the 1e-4 comparisons; ``bf16``
(``mixed_precision: auto``, ``model.dtype: auto``: bf16 weights and autocast on a GPU that has bf16).

Sampling is device-independent: the rollout loop (PPO's rollouts, the sampled J_c) draws its uniforms from the
CPU generator by design (``rollout.hf.sample_categorical``), and ``same_sampling`` makes ``torch.multinomial``
(``generate``, so the sampling eval commands) draw on the CPU from the CPU generator on both devices; so they
pick the same tokens from (nearly) the same probabilities on CUDA as on the CPU; only a draw that lands within
rounding of a boundary between two tokens could differ.

This file is a helper (no tests): tests/gpu/test_cuda_*.py and tests/gpu/test_harness_cpu.py load it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from humanalign.config.base import load_config
from humanalign.paths import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "cpo", "orpo", "simpo")
TRAIN_CASES = ("sft", "rm-helpful", "rm-harmless", *(f"dpo-{t}" for t in DPO_LOSSES), "safe-mm-dpo-pairwise",
               "safe-mm-dpo-sampled", "ppo", "ppo-lag")
EVAL_COMMANDS = ("generate", "eval-rm", "eval-arena", "eval-ppl", "distill", "export")
PRECISION = {
    "fp32": {"mixed_precision": "no", "model": {"dtype": "float32"}},
    "bf16": {"mixed_precision": "auto", "model": {"dtype": "auto"}},
    # bf16 on any device (the CPU too): how far bf16 moves the losses, measured where no GPU is lent
    "bf16-forced": {"mixed_precision": "bf16", "model": {"dtype": "bfloat16"}},
}
# the metrics compared per trainer: every loss the trainer logs, and lambda where there is one
KEYS = {"sft": ("train/loss",), "rm-helpful": ("train/loss",), "rm-harmless": ("train/loss",),
        **{f"dpo-{t}": ("train/loss",) for t in DPO_LOSSES},
        "safe-mm-dpo-pairwise": ("train/loss_total", "train/lambda"),
        "safe-mm-dpo-sampled": ("train/loss_total", "train/lambda"),
        "ppo": ("train/pg_loss", "train/reward_value_loss", "train/entropy"),
        "ppo-lag": ("train/pg_loss", "train/reward_value_loss", "train/entropy", "train/cost_value_loss",
                    "train/lambda")}


# ----------------------------------------------------------------------------------------- devices


@contextmanager
def on_device(device: str) -> Iterator[None]:
    """Everything inside runs on ``device`` ("cpu" or "cuda")."""
    if device == "cpu":
        with mock.patch.dict(os.environ, {"ACCELERATE_USE_CPU": "true"}), \
                mock.patch.object(torch.cuda, "is_available", lambda: False):
            yield
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for, but torch sees no CUDA device")
        os.environ.pop("ACCELERATE_USE_CPU", None)
        # fp32 means fp32: no TF32 matmuls (PyTorch's default; set here in case a library changed it)
        with mock.patch.object(torch.backends.cuda.matmul, "allow_tf32", False):
            yield
    else:
        raise ValueError(f"unknown device {device!r}")


@contextmanager
def same_sampling() -> Iterator[None]:
    """``torch.multinomial`` on the CPU generator whatever the device of the probabilities."""
    original = torch.multinomial

    def multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
        drawn = original(probs.detach().float().cpu(), num_samples, replacement, generator=generator)
        return drawn.to(probs.device)

    with mock.patch.object(torch, "multinomial", multinomial):
        yield


# ----------------------------------------------------------------------------------------- shared inputs


def demo_data(root: Path) -> Path:
    """The demo set prepared under ``root``: {train,val,test}/{helpful,harmless}_pairs.jsonl (once per root)."""
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    out = root / "data"
    if not (out / "val" / "harmless_pairs.jsonl").is_file():
        raw = write_demo_raw(root / "raw", n=600, seed=0)
        prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(out),
                                                       "seed": 0}))
    return out


def pairs(data: Path, kind: str) -> str:
    """The 59 validation pairs of one kind, used as a small training file (as the pinned curves do)."""
    return str(data / "val" / f"{kind}_pairs.jsonl")


def prompts(root: Path) -> Path:
    """40 demo prompts, helpful and harmful."""
    path = root / "prompts.jsonl"
    if not path.is_file():
        data = demo_data(root)
        rows = [json.loads(line) for kind in ("helpful", "harmless")
                for line in Path(pairs(data, kind)).read_text(encoding="utf-8").splitlines()[:20]]
        path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows), encoding="utf-8")
    return path


def score_models(root: Path) -> dict[str, Path]:
    """A tiny reward model and cost model with seeded random heads scaled x50 (margins spread over units)."""
    from humanalign.models.score_model import load_score_model, save_score_model

    out = {"helpful": root / "rms" / "helpful", "harmless": root / "rms" / "harmless"}
    if all((p / "config.json").is_file() for p in out.values()):
        return out
    for path, (score_type, seed) in zip(out.values(), (("reward", 1), ("cost", 2))):
        with on_device("cpu"):
            torch.manual_seed(seed)
            model, tok = load_score_model("tiny")
        with torch.no_grad():
            for p in model.model.score.parameters():
                p.mul_(50.0)
        save_score_model(model, tok, path, score_type=score_type)
    return out


# ----------------------------------------------------------------------------------------- trainers


def _train_config(case: str, root: Path, run_dir: Path, steps: int, precision: str, extra: dict | None):
    """(run function, validated config) of one trainer case, the pinned curves' settings (tests/trainers)."""
    from humanalign.config.dpo import DPOConfig
    from humanalign.config.ppo import PPOConfig, PPOLagConfig
    from humanalign.config.rm import RewardModelConfig
    from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
    from humanalign.config.sft import SFTConfig
    from humanalign.trainers import dpo, ppo, reward, safe_mm_dpo, sft

    data = demo_data(root)
    common = {"report_to": ["none"], "progress_bar": False, "logging_steps": 1, "max_steps": steps, "seed": 0,
              "eval_on_start": False, "eval_steps": None, "save_steps": None, "output_dir": str(run_dir),
              "overwrite_output_dir": True, **PRECISION[precision]}
    pair_run = {"batch_size": 4, "max_length": 96, "max_prompt_length": 32}
    if case == "sft":
        values = {**common, **pair_run, "train_path": pairs(data, "helpful"), "val_path": None, "warmup_ratio": 0.0}
        made = sft.run, SFTConfig, CONFIGS / "sft_tiny.yaml", values
    elif case.startswith("rm-"):
        task = case.split("-", 1)[1]
        values = {**common, **pair_run, "batch_size": 8, f"train_{task}_path": pairs(data, task),
                  f"val_{task}_path": None, "warmup_ratio": 0.0}
        made = reward.run, RewardModelConfig, CONFIGS / f"{'rm' if task == 'helpful' else 'cost'}_tiny.yaml", values
    elif case.startswith("dpo-"):
        values = {**common, **pair_run, "train_path": pairs(data, "helpful"), "val_path": None,
                  "loss_type": case.split("-", 1)[1]}
        made = dpo.run, DPOConfig, CONFIGS / "dpo_tiny.yaml", values
    elif case.startswith("safe-mm-dpo-"):
        rms = score_models(root)
        values = {**common, **pair_run, "cost_window_size": 8, "val_helpful_path": None, "val_harmless_path": None,
                  **{f"train_{k}_path": pairs(data, k) for k in ("helpful", "harmless")},
                  "helpful_rm_path": str(rms["helpful"]), "harmless_rm_path": str(rms["harmless"]),
                  "kl_coeff": 0.05, "cost_threshold": -3.1}
        if case.endswith("sampled"):
            values.update(expected_cost="sampled", sampled_prompts_path=str(prompts(root)), sampled_num_prompts=4,
                          sampled_max_new_tokens=8)
        made = safe_mm_dpo.run, SafeMMDPOConfig, CONFIGS / "safe_mm_dpo_tiny.yaml", values
    elif case in ("ppo", "ppo-lag"):
        values = {**common, "actor_model_path": "tiny", "prompts_path": str(prompts(root)), "rollout_batch_size": 8,
                  "batch_size": 8, "max_new_tokens": 8, "max_length": 64, "max_prompt_length": 32,
                  "learning_rate": 3e-3, "critic_learning_rate": 3e-3, "lr_scheduler": "constant", "kl_coeff": 0.05,
                  "update_iters": 2, "max_steps": 2 * steps, "reward_fn": "keyword_reward",
                  "reward_fn_kwargs": {"keywords": {"the": 1.0, "you": 2.0}}}
        if case == "ppo-lag":
            values.update(cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["you"], "per_word": True},
                          cost_threshold=0.02, lambda_init=1.0, lambda_lr=1.0, episode_cost_window_size=16)
        made = ppo.run, PPOLagConfig if case == "ppo-lag" else PPOConfig, None, values
    else:
        raise ValueError(f"unknown trainer case {case!r}; one of {TRAIN_CASES}")
    run, schema, path, values = made
    values.update(extra or {})
    return run, load_config(schema, path, values=values)


def train_losses(case: str, device: str, root: Path, *, steps: int = 3, precision: str = "fp32",
                 extra: dict | None = None) -> dict[str, list[float]]:
    """The logged values of ``KEYS[case]`` at steps 1..steps (PPO: the first ``steps`` logged values) of one
    trainer run on ``device``; ``extra`` overrides config values."""
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "runs" / f"{case}-{device}-{precision}"
    with on_device(device), same_sampling():
        run, cfg = _train_config(case, root, run_dir, steps, precision, extra)
        run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {k: [float(r[k]) for r in rows if k in r][:steps] for k in KEYS[case]}


# ----------------------------------------------------------------------------------------- eval commands


def eval_result(command: str, device: str, root: Path, *, precision: str = "fp32") -> dict[str, Any]:
    """Run one evaluation command on the tiny model(s) on ``device``; returns the numbers it produced."""
    from humanalign.cli import main
    from humanalign.models.tiny import tiny_model_path

    root.mkdir(parents=True, exist_ok=True)
    out = root / "evals" / f"{command}-{device}-{precision}"
    dtype = "float32" if precision == "fp32" else "auto"
    data, rms, tiny = demo_data(root), score_models(root), str(tiny_model_path())
    sampling = ["--max-new-tokens", "8", "--temperature", "1.0", "--progress-bar", "false", "--seed", "0",
                "--set", f"model_settings.dtype={dtype}"]
    with on_device(device), same_sampling():
        if command == "generate":
            args = ["generate", "--model", tiny, "--prompts", str(prompts(root)), "--output", str(out / "a.jsonl"),
                    "--limit", "8", "--overwrite", *sampling]
        elif command == "eval-rm":
            args = ["eval", "rm", "--model", str(rms["harmless"]), "--data", pairs(data, "harmless"), "--output",
                    str(out / "report.json"), "--max-length", "96", "--overwrite",
                    "--set", f"model_settings.dtype={dtype}"]
        elif command == "eval-arena":
            args = ["eval", "arena", "--red", tiny, "--blue", tiny, "--reward-model", str(rms["helpful"]),
                    "--cost-model", str(rms["harmless"]), "--prompts", str(prompts(root)), "--output-dir", str(out),
                    "--limit", "8", "--do-sample", "true", "--overwrite", *sampling]
        elif command == "eval-ppl":
            args = ["eval", "ppl", "--model", tiny, "--ref-model", tiny, "--data", pairs(data, "helpful"),
                    "--output", str(out / "ppl.json"), "--max-length", "96", "--max-prompt-length", "32",
                    "--progress-bar", "false", "--overwrite", "--set", f"model_settings.dtype={dtype}"]
        elif command == "distill":
            args = ["distill", "--model", tiny, "--prompts", str(prompts(root)), "--output", str(out / "d.jsonl"),
                    "--limit", "4", "--num-samples", "2", "--reward-model", str(rms["helpful"]), "--cost-model",
                    str(rms["harmless"]), "--best-of-n", "--overwrite", *sampling]
        elif command == "export":
            args = ["export", "--model", tiny, "--output", str(out / "merged"), "--overwrite",
                    "--dtype", "float32"]
        else:
            raise ValueError(f"unknown eval command {command!r}; one of {EVAL_COMMANDS}")
        code = main(args)
    if code != 0:
        raise RuntimeError(f"humanalign {' '.join(args)} exited {code}")
    return _read_result(command, out)


def _read_result(command: str, out: Path) -> dict[str, Any]:
    def jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    if command == "generate":
        return {"texts": [r["response"] for r in jsonl(out / "a.jsonl")]}
    if command == "eval-rm":
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        return {k: v for k, v in report.items() if isinstance(v, float)}
    if command == "eval-arena":
        rows = jsonl(out / "scores.jsonl")
        return {"responses": [r["red_response"] for r in rows],
                "scores": [[r[f"{side}_{what}"] for side in ("red", "blue") for what in ("reward", "cost")]
                           for r in rows]}
    if command == "eval-ppl":
        report = json.loads((out / "ppl.json").read_text(encoding="utf-8"))
        return {k: v for k, v in report.items() if isinstance(v, float)}
    if command == "distill":
        return {"kept": [(r["response"], r.get("reward"), r.get("cost")) for r in jsonl(out / "d.jsonl")]}
    from safetensors.torch import load_file

    weights = load_file(str(next((out / "merged").glob("*.safetensors"))))
    return {"weights": {k: float(v.double().sum()) for k, v in sorted(weights.items())}}


# ----------------------------------------------------------------------------------------- host syncs


class HostSyncs:
    """Host reads of tensors made while a trainer works on its micro-batches, by call site.

    The window opens when ``Engine.train_steps`` hands the trainer a step's micro-batches and closes when the
    trainer calls ``Engine.optimizer_step`` (which holds the step's one intended sync, and the logging), so
    data loading, the optimizer step, logging, evaluation and saving are outside it. Counted inside: every
    Python-level ``item``, ``tolist``, ``cpu``, ``numpy``, ``float()``, ``int()``, ``bool()`` and ``__index__``
    of a tensor (on the CPU, where nothing is asynchronous, these are the calls that would wait for the GPU),
    keyed by "<innermost humanalign frame> <- <the calling frame>"; on CUDA also the synchronizing operations
    that ``torch.cuda.set_sync_debug_mode("warn")`` reports, keyed by the line that issued them.
    """

    METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self) -> None:
        self.sites: dict[str, int] = {}
        self.open = False
        self._busy = False

    def _note(self, name: str) -> None:
        import traceback

        frames = traceback.extract_stack()[:-2]  # drop _note and the wrapper
        caller = frames[-1]
        ours = next((f for f in reversed(frames) if f"{os.sep}humanalign{os.sep}" in f.filename), caller)
        key = f"{name} at {_short(ours)}" + ("" if ours is caller else f" <- {_short(caller)}")
        self.sites[key] = self.sites.get(key, 0) + 1

    @contextmanager
    def counting(self) -> Iterator[HostSyncs]:
        import warnings

        from humanalign.engine.run import Engine

        originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        counter = self
        cuda = torch.cuda.is_available()

        def wrap(name, original):
            def method(tensor, *args, **kwargs):
                # on a GPU machine a read of a CPU tensor waits for nothing: only device tensors count there
                if counter.open and not counter._busy and (not cuda or tensor.device.type != "cpu"):
                    counter._busy = True
                    try:
                        counter._note(name)
                    finally:
                        counter._busy = False
                return original(tensor, *args, **kwargs)
            return method

        train_steps, optimizer_step = Engine.train_steps, Engine.optimizer_step

        def set_open(value: bool) -> None:
            counter.open = value
            if cuda:
                torch.cuda.set_sync_debug_mode("warn" if value else 0)

        def counted_train_steps(engine, loader):
            for window in train_steps(engine, loader):
                set_open(True)
                yield window
                set_open(False)

        def counted_optimizer_step(engine):
            set_open(False)
            return optimizer_step(engine)

        patches = [mock.patch.object(torch.Tensor, name, wrap(name, fn)) for name, fn in originals.items()]
        patches += [mock.patch.object(Engine, "train_steps", counted_train_steps),
                    mock.patch.object(Engine, "optimizer_step", counted_optimizer_step)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for p in patches:
                p.start()
            try:
                yield self
            finally:
                for p in reversed(patches):
                    p.stop()
                set_open(False)
        for w in caught:
            if "synchroniz" in str(w.message):
                key = f"cuda sync at {Path(w.filename).name}:{w.lineno}"
                self.sites[key] = self.sites.get(key, 0) + 1


def _short(frame) -> str:
    path = Path(frame.filename)
    parts = path.parts
    where = "/".join(parts[parts.index("humanalign"):]) if "humanalign" in parts else path.name
    return f"{where}:{frame.lineno} ({frame.name})"


def host_syncs(case: str, device: str, root: Path, accumulation: int, steps: int = 2) -> dict[str, int]:
    """Host syncs by call site while ``case`` trains ``steps`` steps of ``accumulation`` micro-batches each."""
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "runs" / f"syncs-{case}-{device}-{accumulation}"
    counter = HostSyncs()
    with on_device(device):
        run, cfg = _train_config(case, root, run_dir, steps, "fp32", {"gradient_accumulation_steps": accumulation})
        with counter.counting():
            run(cfg)
    return counter.sites


def per_micro_batch_syncs(case: str, device: str, root: Path) -> dict[str, int]:
    """Call sites whose count grows with the micro-batches: 2 steps of 3 micro-batches against 2 steps of 1
    (4 more micro-batches, the same steps, logs and saves); {site: extra calls}."""
    one, three = host_syncs(case, device, root, 1), host_syncs(case, device, root, 3)
    return {site: n - one.get(site, 0) for site, n in three.items() if n > one.get(site, 0)}
