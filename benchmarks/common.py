"""Shared pieces of the side-by-side benchmarks (``dpo_vs_trl.py``, ``rm_vs_trl.py``): step timing, peak
resident memory, the machine's measured matmul peak and MFU, the alternating-run harness, JSON and table output.

Method, the same for every benchmark:

- every run is a fresh Python subprocess (``python <script> --child <variant> ...``), so its peak resident
  memory (``VmHWM`` of /proc/self/status) is its own; the peak is reset (``/proc/self/clear_refs``) just before
  the first training forward, so model loading does not count, and read after the last step;
- runs alternate between the variants (ours, trl, ours, trl, ...) so that a drift of the machine's speed hits
  both alike; a variant's figure is the median over its runs;
- the first ``warmup`` steps are not timed; throughput is tokens (non-pad, i.e. attention-mask ones) per second
  of wall time, and also per second of the process's CPU time (robust against other processes on the machine);
- MFU = achieved model FLOP/s over the FLOP/s of a large float32 matmul measured on this machine with the same
  thread count. Model FLOPs per token: 6 x params to train every weight (forward 2, backward 4), 4 x params with
  a frozen base (LoRA: no weight gradients, only activation gradients), plus 2 x params for a reference forward.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------- memory

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def peak_rss_mib() -> float | None:
    """Peak resident set size of this process (VmHWM) in MiB; None where /proc is missing."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def current_rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs). False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- FLOPs


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, threads: int | None = None, device: str = "cpu") -> float:
    """Best FLOP/s (in GFLOP/s) of a (size x size) @ (size x size) matmul: 2 * size^3 FLOPs each. On the CPU in
    float32; on CUDA in bfloat16 on random data (zeros run faster), timed with CUDA events, the median of
    ``repeats`` products after three warm-ups (a 8192 product at least: small ones do not fill an H200)."""
    import torch

    if device == "cuda":
        return cuda_bf16_matmul_gflops(max(size, 8192), max(repeats, 10))
    if threads is not None:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    a @ b  # warm the kernels and caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cuda_bf16_matmul_gflops(size: int = 8192, repeats: int = 10) -> float:
    """The GPU's bf16 matmul rate measured here (GFLOP/s): the median of ``repeats`` event-timed products."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / statistics.median(times) / 1e9


def flops_per_token(params: int, *, frozen_base: bool = False, reference_forward: bool = False) -> float:
    """Model FLOPs per trained token: 6P (all weights trained) or 4P (frozen base), + 2P for a reference
    forward (DPO)."""
    return (4 if frozen_base else 6) * params + (2 * params if reference_forward else 0)


def matmul_params(model) -> int:
    """Parameters that enter a matmul for every token: all of them but the input embedding table (a lookup, no
    FLOPs) unless the LM head is tied to it (then the table is the head's matmul). A score model's head is its
    own small layer, so its embedding table is left out: at SmolLM2-135M's shape counting it would overstate a
    reward model's FLOPs by a fifth."""
    inner = getattr(model, "model", model) if not hasattr(model, "get_input_embeddings") else model
    total = sum(p.numel() for p in model.parameters())
    embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "weight"):
        return total
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is embeddings.weight
    return total if tied else total - embeddings.weight.numel()


def mfu(tokens_per_second: float, per_token_flops: float, peak_gflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured peak (a fraction)."""
    if peak_gflops <= 0:
        return 0.0
    return tokens_per_second * per_token_flops / (peak_gflops * 1e9)


# ------------------------------------------------------------------------------------------------- timing


@dataclass
class StepRecorder:
    """Per-step wall and CPU clocks and tokens; the first ``warmup`` steps are left out of the rates.

    Call ``batch(tokens)`` for every training micro-batch (before its forward: the first call resets the peak
    RSS, and on CUDA the peak of allocated GPU memory) and ``step()`` after every optimizer step (on CUDA it
    waits for the GPU before reading the clock, so a step's time is its kernels' time)."""

    warmup: int = 1
    device: str = "cpu"
    peak_gpu_mib: float | None = None  # torch.cuda.max_memory_allocated after the last step (CUDA only)
    tokens: list[int] = field(default_factory=list)  # tokens of each finished step
    wall: list[float] = field(default_factory=list)  # perf_counter after each step
    cpu: list[float] = field(default_factory=list)  # process_time after each step
    pending: int = 0
    peak_reset: bool | None = None
    peak_mib: float | None = None  # VmHWM after the last step (before any saving at the end of the run)
    start_rss_mib: float | None = None  # RSS when the peak was reset: models, data, the allocator's leftovers
    start_wall: float = 0.0
    start_cpu: float = 0.0

    def batch(self, tokens: int) -> None:
        if self.peak_reset is None:
            if self.device == "cuda":
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.peak_reset = reset_peak_rss()
            self.start_rss_mib = current_rss_mib()
            self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()
        self.pending += int(tokens)

    def step(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(self.pending)
        self.pending = 0
        self.peak_mib = peak_rss_mib()

    def summary(self) -> dict[str, Any]:
        """Rates over the steps after the warmup (the clock starts at the end of the last warmup step)."""
        steps = len(self.wall)
        if steps <= self.warmup:
            raise RuntimeError(f"{steps} steps recorded: need more than the {self.warmup} warmup step(s)")
        w0 = self.wall[self.warmup - 1] if self.warmup else self.start_wall
        c0 = self.cpu[self.warmup - 1] if self.warmup else self.start_cpu
        timed = steps - self.warmup
        tokens = sum(self.tokens[self.warmup:])
        wall, cpu = self.wall[-1] - w0, self.cpu[-1] - c0
        return {"timed_steps": timed, "tokens": tokens, "wall_seconds": wall, "cpu_seconds": cpu,
                "steps_per_second": timed / wall, "tokens_per_second": tokens / wall,
                "tokens_per_cpu_second": tokens / cpu if cpu > 0 else None,
                "step_wall_seconds": [b - a for a, b in zip([w0, *self.wall[self.warmup:]], self.wall[self.warmup:])],
                "peak_rss_mib": self.peak_mib, "peak_reset": bool(self.peak_reset), "peak_gpu_mib": self.peak_gpu_mib,
                "start_rss_mib": self.start_rss_mib,
                "training_rss_increase_mib": None if self.peak_mib is None or self.start_rss_mib is None
                else self.peak_mib - self.start_rss_mib}


# ------------------------------------------------------------------------------------------------- harness


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "loadavg": list(os.getloadavg())}


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def alternate(variants: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """The run order: round by round, every variant once per round, in the given order."""
    return [(r, v) for r in range(rounds) for v in variants]


def run_child(script: Path, variant: str, args: Sequence[str], out_json: Path, threads: int,
              timeout: float = 3600, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script --child variant --child-output out_json *args`` with ``threads`` CPU threads and
    return the JSON it wrote (raises with the child's last output when it fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    cmd = [sys.executable, str(script), "--child", variant, "--child-output", str(out_json), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out_json.is_file():
        tail = (done.stdout[-2000:] + "\n" + done.stderr[-4000:]).strip()
        raise RuntimeError(f"{variant} run failed (exit {done.returncode}):\n{tail}")
    return json.loads(out_json.read_text(encoding="utf-8"))


def run_alternating(variants: Sequence[str], rounds: int, run_one: Callable[[str, int], dict[str, Any]],
                    say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every variant ``rounds`` times, alternating; returns the runs' results tagged with variant and round."""
    results = []
    for round_index, variant in alternate(variants, rounds):
        began = time.time()
        result = run_one(variant, round_index)
        result.update(variant=variant, round=round_index, run_seconds=round(time.time() - began, 1),
                      loadavg_after=list(os.getloadavg()))
        say(f"  {variant:<12} round {round_index + 1}/{rounds}: {result['tokens_per_second']:.1f} tok/s, "
            f"{result['tokens_per_cpu_second']:.1f} tok/cpu-s, peak {result['peak_rss_mib']:.0f} MiB"
            + (f" (GPU {result['peak_gpu_mib']:.0f} MiB)" if result.get("peak_gpu_mib") else "") + ", "
            f"loss {result['final_loss']:.4f} ({result['run_seconds']:.0f}s, load {os.getloadavg()[0]:.1f})")
        results.append(result)
    return results


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def summarize(results: Sequence[dict[str, Any]], baseline: str = "trl") -> list[dict[str, Any]]:
    """One row per variant: medians of the rates, the largest peak RSS, the loss after the last step (median),
    and each rate as a ratio to ``baseline``'s."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        rows.append({
            "variant": variant, "runs": len(runs),
            "steps_per_second": _median([r["steps_per_second"] for r in runs]),
            "tokens_per_second": _median([r["tokens_per_second"] for r in runs]),
            "tokens_per_cpu_second": _median([r["tokens_per_cpu_second"] for r in runs]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_gpu_mib": max((r["peak_gpu_mib"] for r in runs if r.get("peak_gpu_mib") is not None), default=None),
            "final_loss": _median([r["final_loss"] for r in runs]),
            "mfu": _median([r.get("mfu") for r in runs]),
            "tokens_per_step": runs[0]["tokens"] / runs[0]["timed_steps"],
            "loss_curve": runs[0].get("loss_curve"),  # per step, warmup included (the same in every run)
        })
    base = next((row for row in rows if row["variant"] == baseline), None)
    for row in rows:
        for key in ("tokens_per_second", "tokens_per_cpu_second", "peak_rss_mib", "peak_gpu_mib"):
            ratio = None
            if base is not None and base[key] and row[key] is not None:
                ratio = row[key] / base[key]
            row[f"{key}_vs_{baseline}"] = ratio
    return rows


def format_table(rows: Sequence[dict[str, Any]], baseline: str = "trl") -> str:
    """A Markdown table of ``summarize`` rows (with peak GPU memory columns when the runs were on CUDA)."""
    gpu = any(r.get("peak_gpu_mib") is not None for r in rows)
    head = ["variant", "runs", "steps/s", "tokens/s", f"x {baseline}", "tokens/CPU-s", f"x {baseline}",
            "peak RSS MiB", f"x {baseline}", "MFU", "loss after last step"]
    if gpu:
        head[9:9] = ["peak GPU MiB", f"x {baseline}"]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["runs"]), num(r["steps_per_second"], ".3f"), num(r["tokens_per_second"], ".1f"),
                 num(r[f"tokens_per_second_vs_{baseline}"], ".2f"), num(r["tokens_per_cpu_second"], ".1f"),
                 num(r[f"tokens_per_cpu_second_vs_{baseline}"], ".2f"), num(r["peak_rss_mib"], ".0f"),
                 num(r[f"peak_rss_mib_vs_{baseline}"], ".2f"), num(None if r["mfu"] is None else 100 * r["mfu"], ".1f")
                 + ("%" if r["mfu"] is not None else ""), num(r["final_loss"], ".4f")]
        if gpu:
            cells[9:9] = [num(r.get("peak_gpu_mib"), ".0f"), num(r.get(f"peak_gpu_mib_vs_{baseline}"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_benchmark(*, script: Path, name: str, title: str, settings: dict[str, Any], variants: Sequence[str],
                  rounds: int, threads: int, child_args: Sequence[str], work: Path, output: Path,
                  before_src: str | None = None, device: str = "cpu",
                  peak_gflops: float | None = None) -> dict[str, Any]:
    """The parent side of a benchmark: measure the matmul peak, run the variants alternately in fresh
    subprocesses (``ours-before``: our variant with humanalign imported from ``before_src``), measure the peak
    again, then print the table and write the JSON (settings, machine, every run, the summary)."""
    import humanalign
    from humanalign.paths import shared_data_dir

    if "ours-before" in variants and not before_src:
        raise SystemExit("variant ours-before needs --before-src")
    set_threads(threads)
    measured = peak_gflops is None
    peak = matmul_peak_gflops(threads=threads, repeats=10, device=device) if measured else peak_gflops
    print(f"[bench] {title}; {device}, {threads} thread(s); {'bf16' if device == 'cuda' else 'fp32'} matmul peak "
          f"{peak:.1f} GFLOP/s; variants {list(variants)} x {rounds} rounds", flush=True)
    env = {"HUMANALIGN_SHARED_DATA": str(shared_data_dir())}
    if device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")  # the CPU even on a GPU machine
    start = machine_info(threads)

    def run_one(variant: str, round_index: int) -> dict[str, Any]:
        before = variant == "ours-before"
        extra = {**env, "PYTHONPATH": str(Path(before_src).resolve())} if before else env
        result = run_child(script, "ours" if before else variant, child_args, work / f"{variant}-{round_index}.json",
                           threads, extra_env=extra)  # the child runs "ours-fused-adamw" itself
        result["mfu"] = mfu(result["tokens_per_second"], result["flops_per_token"], peak)
        return result

    runs = run_alternating(variants, rounds, run_one, say=lambda m: print(m, flush=True))
    # the peak again after the runs (the machine is shared): MFU against the better of the two measurements
    peak_after = matmul_peak_gflops(threads=threads, repeats=10, device=device) if measured else peak
    if peak_after > peak:
        peak = peak_after
        for result in runs:
            result["mfu"] = mfu(result["tokens_per_second"], result["flops_per_token"], peak)
    rows = summarize(runs, baseline="trl")
    table = format_table(rows, baseline="trl")
    print(table)
    payload = {"benchmark": name, "command": f"python benchmarks/{script.name} " + " ".join(sys.argv[1:]),
               "settings": settings, "machine": {**machine_info(threads), "loadavg_start": start["loadavg"],
                                                 "gpu": gpu_name() if device == "cuda" else None},
               "matmul_peak_gflops": peak, "humanalign": str(Path(humanalign.__file__).parent),
               "before_src": before_src, "summary": rows, "runs": runs, "table": table}
    write_json(output, payload)
    print(f"[bench] results in {output}")
    return payload


def parse_side_by_side_args(argv: list[str] | None, *, description: str, models: Sequence[str],
                            defaults: dict[str, tuple], prefix: str, lora_help: str, variants: str,
                            before_help: str) -> Any:
    """The command line shared by dpo_vs_trl.py and rm_vs_trl.py. ``defaults[model]``: (batch size, max length,
    max prompt length, full-fine-tuning lr, LoRA lr, pairs); options left unset take them."""
    import argparse

    def per_model(i: int) -> str:
        return ", ".join(f"{m} {d[i]}" for m, d in defaults.items())

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(models), help="tiny (demo pairs) or smollm2")
    p.add_argument("--model-path", default=None,
                   help="a model folder to train instead of the --model preset (e.g. a random-init model at\n"
                        "SmolLM2-1.7B's shape written by benchmarks/gpu/run.py); --model still picks the defaults")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both trainers run (default cpu)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and mixed precision for both (default fp32)")
    p.add_argument("--data-kind", default="pairs", choices=["pairs", "long"],
                   help="pairs: the model's data set; long: synthetic pairs that fill max_length (every\n"
                        "sequence max_length tokens: throughput at a fixed sequence length)")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="the matmul peak to compute MFU against (default: measured here, bf16 on CUDA)")
    p.add_argument("--lora", action="store_true", help=lora_help)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="runs per variant, alternating (default 2)")
    p.add_argument("--variants", default="ours,trl", help=f"comma-separated: {variants} (default ours,trl)")
    p.add_argument("--before-src", default=None, help=before_help)
    p.add_argument("--batch-size", type=int, default=None, help=f"pairs per step (default: {per_model(0)})")
    p.add_argument("--max-length", type=int, default=None, help=f"tokens per sequence (default: {per_model(1)})")
    p.add_argument("--max-prompt-length", type=int, default=None, help=f"prompt tokens (default: {per_model(2)})")
    p.add_argument("--pairs", type=int, default=None, help=f"pairs in the training set (default: {per_model(5)})")
    p.add_argument("--learning-rate", type=float, default=None, help="default per model and LoRA/full")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: the cores are shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, deleted)")
    p.add_argument("--output", default=None,
                   help=f"JSON file (default: benchmarks/results/{prefix}_<model>[_lora].json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch, length, prompt, lr_full, lr_lora, pairs = defaults[args.model]
    args.batch_size = args.batch_size or batch
    args.max_length = args.max_length or length
    args.max_prompt_length = args.max_prompt_length or prompt
    args.pairs = args.pairs or pairs
    args.learning_rate = args.learning_rate or (lr_lora if args.lora else lr_full)
    return args


def run_parent(args: Any, *, script: Path, prefix: str, label: str,
               prepare_data: Callable[[Any, Path], Path]) -> dict[str, Any]:
    """The parent process of dpo_vs_trl.py / rm_vs_trl.py (the same command-line options): prepare the data in a
    work folder, then ``run_benchmark`` over ``--variants`` with the settings handed to every child."""
    import shutil
    import tempfile

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    model_label = Path(args.model_path).name if args.model_path else args.model
    name = f"{prefix}_{model_label}{'_lora' if args.lora else ''}"
    output = Path(args.output) if args.output else script.parent / "results" / f"{name}.json"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix=f"{prefix}-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(args, work)
        child_args = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                      "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                      "--max-prompt-length", str(args.max_prompt_length), "--pairs", str(args.pairs),
                      "--learning-rate", str(args.learning_rate), "--threads", str(args.threads),
                      "--seed", str(args.seed), "--data", str(data), "--device", args.device]
        child_args += (["--lora"] if args.lora else []) + (["--bf16"] if args.bf16 else [])
        child_args += ["--model-path", args.model_path] if args.model_path else []
        title = (f"{label} {model_label}{' LoRA' if args.lora else ' full'}{' bf16' if args.bf16 else ''}: "
                 f"{args.steps} timed steps (+{args.warmup} warmup) of {args.batch_size} pairs, max_length "
                 f"{args.max_length}")
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_output", "data")}
        return run_benchmark(script=script, name=name, title=title, settings=settings, variants=variants,
                             rounds=args.rounds, threads=args.threads, child_args=child_args, work=work,
                             output=output, before_src=args.before_src, device=args.device,
                             peak_gflops=args.peak_gflops)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def long_pairs(source: Sequence[str], count: int, words: int, seed: int = 0) -> list[str]:
    """``count`` JSON lines of synthetic preference pairs whose prompt, chosen and rejected answers each hold
    about ``words`` words, drawn from the texts of ``source`` (prepare-data pair lines): with max_prompt_length
    and max_length below the word counts' token counts, every sequence is cut to exactly max_length tokens, so a
    step's tokens are batch x 2 x max_length (no padding). Harmless labels are kept, so the file serves either
    stream of Safe-MM-DPO."""
    import random

    rows = [json.loads(line) for line in source if line.strip()]
    vocab = [w for r in rows for key in ("prompt", "chosen", "rejected") for w in r[key].split()]
    rng = random.Random(seed)
    out = []
    for i in range(count):
        base = rows[i % len(rows)]
        text = {key: " ".join(rng.choice(vocab) for _ in range(words)) for key in ("prompt", "chosen", "rejected")}
        out.append(json.dumps({**base, **text}))
    return out


def model_name(args: Any, presets: dict[str, str]) -> str:
    """The model a side-by-side child trains: ``--model-path`` when given, else the preset of ``--model``."""
    return args.model_path or presets[args.model]


def model_dtype(args: Any) -> str:
    """Both trainers' weights: bf16 with --bf16 (and mixed precision bf16), else fp32."""
    return "bfloat16" if args.bf16 else "float32"


def use_fused_adamw() -> None:
    """Experiment (variant ``ours-fused-adamw``): the engine builds torch's fused AdamW (one kernel over all
    parameters; what the transformers Trainer uses by default since torch 2.8) instead of the per-tensor loop."""
    import torch

    import humanalign.engine.run as engine_run
    from humanalign.engine.optim import param_groups

    def build(model, config):
        return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.learning_rate,
                                 betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, fused=True)

    engine_run.build_optimizer = build


def set_threads(threads: int) -> None:
    """Pin torch to ``threads`` intra-op threads (and one inter-op thread) for a fair, repeatable run."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once the pool started
        pass


__all__ = [
    "peak_rss_mib", "current_rss_mib", "reset_peak_rss", "matmul_peak_gflops", "flops_per_token", "mfu",
    "StepRecorder", "machine_info", "alternate", "run_child", "run_alternating", "summarize", "format_table",
    "write_json", "set_threads", "run_benchmark", "run_parent", "use_fused_adamw", "long_pairs", "model_name",
    "model_dtype", "cuda_bf16_matmul_gflops", "gpu_name", "matmul_params",
]
