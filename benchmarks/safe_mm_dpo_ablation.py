"""Safe-MM-DPO and its ablations on the same data, model and budget: DPO, MM-DPO, Safe-DPO, reward shaping
(fixed lambda) and Safe-MM-DPO, all through `humanalign train safe-mm-dpo` (configs/safe_dpo.yaml, mm_dpo.yaml,
safe_mm_dpo_shaping.yaml, safe_mm_dpo_plain_dpo.yaml set the same switches), plus the time per step of
`humanalign train dpo` against Safe-MM-DPO (issue "Performance": at most 1.2x).

    python benchmarks/safe_mm_dpo_ablation.py                        # tiny model, demo set: minutes on a CPU
    python benchmarks/safe_mm_dpo_ablation.py --model smollm2 --steps 20 [--helpful-rm DIR --harmless-rm DIR]
        # SmolLM2-135M-Instruct + LoRA; helpful pairs from UltraFeedback, harmless pairs from PKU-SafeRLHF's
        # safe-vs-unsafe pairs (read from the shared data folder, never copied into the project)

Columns: held-out implicit accuracy of the helpful and the harmless pairs (share with h > 0), expected cost J_c
on the held-out harmless pairs (pairwise: p C(y_w) + (1 - p) C(y_l), p = sigmoid(beta_s h) with each variant's
own beta_s), with --sampled the cost model's mean cost of greedy answers to held-out harmful prompts and the
share of them it calls unsafe (cost > 0), the training window's J_c at the last lambda update (the constraint
is J_c <= d), final lambda, and seconds per optimizer step (training only); with --seeds N, the mean over seeds
and the range. The tiny run first trains its Helpful-RM and cost model on the demo pairs
(`humanalign train rm`, configs/rm_tiny.yaml and cost_tiny.yaml) unless --helpful-rm / --harmless-rm are given,
and its starting policy (and reference) by SFT on the demo's helpfulness-preferred answers (configs/sft_tiny.yaml),
which include the harmful compliances annotators preferred: a policy with something to unlearn.
Results also go to <output-dir>/results.json; docs/benchmarks/safe_mm_dpo.md records a run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict[str, Any]] = {  # the switches of docs/algorithms/safe_mm_dpo.md, section 5
    "DPO": {"w": 0.0, "use_harmless_stream": False, "kl_coeff": 0.0},
    "MM-DPO": {"use_harmless_stream": False},
    "Safe-DPO": {"w": 0.0},
    "shaping": {"update_lambda": False},
    "Safe-MM-DPO": {},
}


# ----------------------------------------------------------------------------------------------- data and models


def tiny_data(root: Path, records: int, seed: int) -> Path:
    from humanalign.config.base import load_config
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    data = root / "data"
    if not (data / "val" / "harmless_pairs.jsonl").is_file():
        raw = write_demo_raw(root / "raw", n=records, seed=seed)
        prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(data),
                                                       "seed": seed, "overwrite": True}))
    return data


def tiny_score_models(root: Path, data: Path) -> tuple[str, str]:
    """Train (once) the tiny Helpful-RM and cost model on the demo pairs with the shipped tiny configs."""
    from humanalign.config.base import load_config
    from humanalign.config.rm import RewardModelConfig
    from humanalign.trainers.reward import run as train_rm

    out = []
    for name, task in (("rm_tiny", "helpful"), ("cost_tiny", "harmless")):
        folder = root / "models" / f"{task}_rm"  # the run folder stands for its model: final/, or its top level
        if not any((f / "config.json").is_file() for f in (folder / "final", folder)):  # (earlier versions)
            cfg = load_config(RewardModelConfig, REPO / "configs" / f"{name}.yaml", values={
                f"train_{task}_path": str(data / "train" / f"{task}_pairs.jsonl"),
                f"val_{task}_path": str(data / "val" / f"{task}_pairs.jsonl"),
                "output_dir": str(folder), "progress_bar": False, "report_to": ["none"]})
            train_rm(cfg)
        out.append(str(folder))
    return out[0], out[1]


def tiny_sft(root: Path, data: Path) -> str:
    """SFT (once) of the tiny model on the demo's helpfulness-preferred answers (configs/sft_tiny.yaml): the
    starting policy and reference of every variant, so that its answers are demo-like and can be judged."""
    from humanalign.config.base import load_config
    from humanalign.config.sft import SFTConfig
    from humanalign.trainers.sft import run as train_sft

    folder = root / "models" / "sft"
    if not (folder / "final" / "config.json").is_file():
        train_sft(load_config(SFTConfig, REPO / "configs" / "sft_tiny.yaml", values={
            "train_path": str(data / "train" / "helpful_pairs.jsonl"), "val_path": str(data / "val" / "helpful_pairs.jsonl"),
            "output_dir": str(folder), "progress_bar": False, "report_to": ["none"]}))
    return str(folder / "final")


def _split_of(prompt: str, val_share: float) -> str:
    u = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if u < val_share else "train"


def smollm2_data(root: Path, train_pairs: int, val_pairs: int) -> Path:
    """UltraFeedback pairs as the helpful stream, PKU-SafeRLHF safe-vs-unsafe pairs (labelled) as the harmless
    stream, written as prepare-data style files under ``root`` (splits of the harmless pairs by prompt)."""
    from humanalign.data.io import atomic_write_jsonl, iter_records
    from humanalign.paths import shared_data_dir

    shared = shared_data_dir()
    data = root / "data"
    helpful = {split: [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                       for _, r in iter_records(shared / "ultrafeedback" / f"{name}.jsonl")][:n]
               for split, name, n in (("train", "train", train_pairs), ("val", "eval", val_pairs))}
    harmless: dict[str, list[dict]] = {"train": [], "val": []}
    for _, r in iter_records(shared / "pku-saferlhf" / "safe_vs_unsafe_pairs.jsonl"):
        split = _split_of(r["prompt"], 0.2)
        if len(harmless[split]) < (train_pairs if split == "train" else val_pairs):
            harmless[split].append({"prompt": r["prompt"], "chosen": r["safer"], "rejected": r["unsafer"],
                                    "is_chosen_safe": True, "is_rejected_safe": False})
    for split in ("train", "val"):
        atomic_write_jsonl(data / split / "helpful_pairs.jsonl", helpful[split])
        atomic_write_jsonl(data / split / "harmless_pairs.jsonl", harmless[split])
    return data


# ----------------------------------------------------------------------------------------------- measuring


def sampled_cost(model_dir: str, cost_model: str, prompts: list[str], max_new_tokens: int) -> tuple[float, float]:
    """Mean cost of the policy's greedy answers to ``prompts`` and the share the cost model calls unsafe."""
    from humanalign.config.training import ModelSettings
    from humanalign.eval.generate import generate_responses, load_generator
    from humanalign.models.scorer import load_scorer

    model, tokenizer = load_generator(model_dir, ModelSettings())
    answers = generate_responses(model, tokenizer, prompts, batch_size=16, max_new_tokens=max_new_tokens,
                                 do_sample=False, max_prompt_length=128)
    costs = load_scorer(cost_model, progress=False).score(prompts, answers)
    return statistics.fmean(costs), sum(c > 0 for c in costs) / len(costs)


def auto_threshold(cost_model: str, harmless_train: Path) -> tuple[float, float, float]:
    """(d, J_c of the starting policy, J_c of a policy that always picks the safer answer) on the training
    harmless pairs: the start has p = 1/2 on every pair, so J_c = mean (C(y_w) + C(y_l)) / 2; always safer gives
    mean C(y_w). d lies 3/4 of the way from the first to the second, so the constraint binds at the start and
    can be met by learning the safety ordering."""
    from humanalign.data.pairs import load_preference_pairs
    from humanalign.models.margins import expected_cost_range
    from humanalign.models.scorer import cached_score_pairs, load_scorer

    pairs, _ = load_preference_pairs(harmless_train, kind="harmless")
    start, safe = expected_cost_range(*cached_score_pairs(load_scorer(cost_model, progress=False), pairs))
    return start + 0.75 * (safe - start), start, safe


def step_seconds(run_dir: Path) -> float:
    """Wall time per optimizer step between the first and the last logged step of metrics.jsonl (so the first
    steps' warm-up is left out; logged steps include the trainers' logging-only work, as in a real run)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if any(k.startswith("train/") for k in r)]
    return (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])


def run_variant(name: str, values: dict[str, Any]) -> dict[str, Any]:
    from humanalign.config.base import load_config
    from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
    from humanalign.trainers.safe_mm_dpo import run

    print(f"\n=== {name} ===", file=sys.stderr, flush=True)
    cfg = load_config(SafeMMDPOConfig, values=values)
    return run(cfg)


def timing(base: dict[str, Any], steps: int, repeats: int = 2) -> dict[str, float]:
    """Per-step time of `train dpo` (B helpful pairs) and of Safe-MM-DPO (B helpful + B harmless pairs): as
    configured (the KL measured on logged steps), without that measurement, and without forwarding each shared
    response once; no evaluation, metrics every 5 steps. The three runs are
    repeated ``repeats`` times, interleaved, and each keeps its fastest repeat (least disturbed by other work
    on the machine)."""
    from humanalign.config.base import load_config
    from humanalign.config.dpo import DPOConfig
    from humanalign.trainers.dpo import run as run_dpo

    root = Path(base["output_dir"]) / "timing"
    common = {"max_steps": steps, "logging_steps": 5, "eval_steps": None, "save_steps": None, "report_to": ["none"],
              "progress_bar": False, "overwrite_output_dir": True, "group_by_length": False}
    for key in ("policy_model_path", "max_length", "max_prompt_length", "batch_size", "learning_rate", "seed",
                "lora", "model", "gradient_accumulation_steps", "lr_scheduler"):
        if key in base:
            common[key] = base[key]
    out: dict[str, list[float]] = {}
    for repeat in range(repeats):
        dpo_dir = root / f"dpo-{repeat}"
        print(f"\n=== timing {repeat + 1}/{repeats}: humanalign train dpo ===", file=sys.stderr, flush=True)
        run_dpo(load_config(DPOConfig, values={**common, "train_path": base["train_helpful_path"], "val_path": None,
                                               "output_dir": str(dpo_dir), "beta": base.get("beta_ori", 0.1),
                                               "loss_type": "sigmoid"}))
        out.setdefault("dpo", []).append(step_seconds(dpo_dir))
        for label, share, measure_kl in (("safe_mm_dpo", True, True), ("safe_mm_dpo_no_kl_log", True, False),
                                         ("safe_mm_dpo_unshared", False, True)):
            folder = root / f"{label}-{repeat}"
            values = {**base, **common, "output_dir": str(folder), "val_helpful_path": None,
                      "val_harmless_path": None, "eval_on_start": False, "share_responses": share,
                      "measure_kl": measure_kl}
            run_variant(f"timing {repeat + 1}/{repeats}: {label}", values)
            out.setdefault(label, []).append(step_seconds(folder))
    return {key: min(values) for key, values in out.items()}


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--output-dir", default="runs/bench_safe_mm_dpo")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (tiny 60, smollm2 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per stream per step (tiny 8, smollm2 2)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per variant (seeds 0..N-1): mean and range")
    parser.add_argument("--records", type=int, default=3000, help="tiny: demo records generated")
    parser.add_argument("--train-pairs", type=int, default=256, help="smollm2: training pairs per stream")
    parser.add_argument("--val-pairs", type=int, default=64, help="smollm2: held-out pairs per stream")
    parser.add_argument("--helpful-rm", default=None, help="Helpful-RM folder (tiny: trained here if not given)")
    parser.add_argument("--harmless-rm", default=None, help="cost model folder (tiny: trained here if not given)")
    parser.add_argument("--threshold", type=float, default=None, help="cost threshold d (default: 3/4 of the way "
                        "from the start's J_c to always-safer's, see auto_threshold; -0.6 with label costs)")
    parser.add_argument("--lambda-lr", type=float, default=0.2, help="dual step size")
    parser.add_argument("--learning-rate", type=float, default=None, help="policy learning rate (default: tiny "
                        "configs/safe_mm_dpo_tiny.yaml's, smollm2 2e-4)")
    parser.add_argument("--sampled", action=argparse.BooleanOptionalAction, default=None,
                        help="score greedy answers to held-out harmful prompts with the cost model (default: on for "
                        "smollm2; the tiny model's answers after a 60-step run are not text, so off for tiny)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared "
                        "machine; 0: torch's default)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--timing-steps", type=int, default=None, help="steps of the timing runs (tiny 40, smollm2 "
                        "11; 0: skip)")
    parser.add_argument("--no-sft", action="store_true", help="tiny: start from the random-init tiny model "
                        "instead of its SFT on the demo answers")
    return parser.parse_args(argv)


def model_setup(args: argparse.Namespace, root: Path) -> tuple[Path, dict[str, Any], int, int, int, list[str], int]:
    """--model's data folder, base config, budget (steps, pairs per step, timing steps) and the prompts and
    answer length of the sampled cost. Tiny: trains the score models (unless given) and the SFT start here."""
    import yaml

    if args.model == "tiny":
        data = tiny_data(root, args.records, seed=0)
        if args.helpful_rm is None or args.harmless_rm is None:
            trained = tiny_score_models(root, data)
            args.helpful_rm, args.harmless_rm = args.helpful_rm or trained[0], args.harmless_rm or trained[1]
        base = yaml.safe_load((REPO / "configs" / "safe_mm_dpo_tiny.yaml").read_text(encoding="utf-8"))
        base = {k: v for k, v in base.items() if k not in ("β_ori", "λ_init", "λ_lr")}  # set by name below
        base.update({"beta_ori": 0.1, "lambda_init": 1.0})
        if not args.no_sft:
            base["policy_model_path"] = tiny_sft(root, data)
        steps, batch, timing_steps = args.steps or 60, args.batch_size or 8, 40
        from humanalign.data.demo_data import demo_prompts

        prompts, new_tokens = demo_prompts("harmful", 64, seed=0), 48
    else:
        from humanalign.data.io import iter_records
        from humanalign.paths import shared_data_dir

        data = smollm2_data(root, args.train_pairs, args.val_pairs)
        base = {"policy_model_path": "smollm2-135m-instruct", "lora": {"enabled": True, "r": 8, "alpha": 16},
                "reference_mode": "auto", "max_length": 256, "max_prompt_length": 128, "learning_rate": 2e-4,
                "lr_scheduler": "constant", "beta_ori": 0.1, "lambda_init": 1.0,
                "cost_window_size": 32, "logging_steps": 5, "eval_on_start": True, "progress_bar": False,
                "model": {"dtype": "auto"}}
        steps, batch, timing_steps = args.steps or 20, args.batch_size or 2, 11
        prompts = [r["prompt"] for _, r in iter_records(shared_data_dir() / "pku-saferlhf" /
                                                         "beavertails_eval_prompts.jsonl")][:16]
        new_tokens = 32
    return data, base, steps, batch, timing_steps, prompts, new_tokens


def cost_threshold(args: argparse.Namespace, data: Path) -> float:
    """d: --threshold, else auto_threshold on the cost model, else -0.6 for label costs."""
    if args.threshold is not None:
        return args.threshold
    if args.harmless_rm:
        threshold, j_start, j_safe = auto_threshold(args.harmless_rm, data / "train" / "harmless_pairs.jsonl")
        print(f"[bench] cost threshold d = {threshold:.3f} (J_c at the start {j_start:.3f}, always safer "
              f"{j_safe:.3f})", file=sys.stderr)
        return threshold
    return -0.6  # label costs: -1 safe, +1 unsafe


def run_all(args: argparse.Namespace, base: dict[str, Any], root: Path, sampled: bool, prompts: list[str],
            new_tokens: int) -> dict[str, list[dict[str, Any]]]:
    """Every (variant, seed): train, then its row (before/after, lambda, s/step, sampled cost)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in args.variants:
        for seed in range(args.seeds):
            values = {**base, "seed": seed, "output_dir": str(root / "runs" / f"{name.lower()}-s{seed}")}
            result = run_variant(f"{name}, seed {seed}", {**values, **VARIANTS[name]})
            row = {"seed": seed, "before": result["before"], "after": result["after"],
                   "lambda_final": result["lambda"]["final"] if result["lambda"] else None,
                   "train_jc_last": (result["lambda"]["expected_cost_path"] or [[0, None]])[-1][1]
                   if result["lambda"] else None,
                   "seconds_per_step": result["seconds_per_step"]}
            if sampled and args.harmless_rm:
                row["sampled_cost"], row["unsafe_share"] = sampled_cost(result["final_model"], args.harmless_rm,
                                                                        prompts, new_tokens)
            runs.setdefault(name, []).append(row)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.output_dir) / args.model
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data, base, steps, batch, timing_steps, prompts, new_tokens = model_setup(args, root)
    sampled = (args.model == "smollm2") if args.sampled is None else args.sampled
    threshold = cost_threshold(args, data)
    base.update({
        "train_helpful_path": str(data / "train" / "helpful_pairs.jsonl"),
        "train_harmless_path": str(data / "train" / "harmless_pairs.jsonl"),
        "val_helpful_path": str(data / "val" / "helpful_pairs.jsonl"),
        "val_harmless_path": str(data / "val" / "harmless_pairs.jsonl"),
        "helpful_rm_path": args.helpful_rm, "harmless_rm_path": args.harmless_rm, "cost_threshold": threshold,
        **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
        "lambda_lr": args.lambda_lr, "max_steps": steps, "batch_size": batch, "eval_steps": None, "save_steps": None,
        "report_to": ["none"], "overwrite_output_dir": True, "seed": 0,
        "output_dir": str(root / "runs"),  # each run: a sub-folder
    })

    runs = run_all(args, base, root, sampled, prompts, new_tokens)
    timing_steps = timing_steps if args.timing_steps is None else args.timing_steps
    times = timing(base, timing_steps) if timing_steps > 5 else {}

    table = format_table(runs, times, args, steps, batch, threshold, sampled)
    print(table)
    (root / "results.json").write_text(json.dumps({"args": vars(args), "steps": steps, "batch_size": batch,
                                                   "threshold": threshold, "runs": runs, "timing": times,
                                                   "seconds": round(time.time() - start, 1)}, indent=2))
    (root / "table.md").write_text(table + "\n")
    return 0


def _cell(values: list[float | None], digits: int = 3) -> str:
    """Mean of the seeds' values, with their range when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def format_table(runs: dict[str, list[dict[str, Any]]], times: dict[str, float], args, steps: int, batch: int,
                 threshold: float, sampled: bool) -> str:
    seeds = f"seeds 0..{args.seeds - 1}: mean (range)" if args.seeds > 1 else "seed 0"
    lines = [f"model {args.model}, {steps} steps of {batch} helpful + {batch} harmless pairs, {seeds}, "
             f"d {threshold:.3f}, lambda_lr {args.lambda_lr:g}, {args.threads or 'default'} thread(s)", ""]
    head = ["variant", "helpful acc", "harmless acc", "expected cost (pairs)"]
    head += ["sampled cost", "unsafe share"] if sampled else []
    head += ["J_c last update (d " + f"{threshold:.2f})", "final lambda", "s/step"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(runs.values()), [None])[0]
    if first and first["before"]:
        b = first["before"]
        cells = ["start (policy = reference)", _cell([b["helpful_accuracy"]]), _cell([b["harmless_accuracy"]]),
                 _cell([b["expected_cost"]])] + [""] * (len(head) - 4)
        lines.append("| " + " | ".join(cells) + " |")
    for name, rows in runs.items():
        after = [r["after"] or {} for r in rows]
        cells = [name] + [_cell([a.get(k) for a in after]) for k in ("helpful_accuracy", "harmless_accuracy",
                                                                       "expected_cost")]
        if sampled:
            cells += [_cell([r.get("sampled_cost") for r in rows]), _cell([r.get("unsafe_share") for r in rows], 2)]
        cells += [_cell([r.get("train_jc_last") for r in rows]), _cell([r["lambda_final"] for r in rows]),
                  _cell([r["seconds_per_step"] for r in rows])]
        lines.append("| " + " | ".join(cells) + " |")
    if times:
        lines += ["", "| per optimizer step (no eval) | seconds | vs DPO |", "|---|---|---|"]
        for key, label in (("dpo", f"`train dpo`, {batch} helpful pairs"),
                           ("safe_mm_dpo", f"Safe-MM-DPO, {batch} + {batch} pairs, shared responses"),
                           ("safe_mm_dpo_no_kl_log", f"Safe-MM-DPO, {batch} + {batch} pairs, shared, measure_kl false"),
                           ("safe_mm_dpo_unshared", f"Safe-MM-DPO, {batch} + {batch} pairs, share_responses false")):
            if key in times:
                lines.append(f"| {label} | {times[key]:.4f} | {times[key] / times['dpo']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
