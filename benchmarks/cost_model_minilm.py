"""Benchmark: a Harmless cost model on the MiniLM encoder, trained and tested on real PKU-SafeRLHF pairs.

Data: ``pku-saferlhf/safe_vs_unsafe_pairs.jsonl`` of the shared data folder (``humanalign.paths.shared_data_dir()``,
``HUMANALIGN_SHARED_DATA`` overrides): 5,135 pairs of one safe and one unsafe answer to the same prompt, read
through the generic adapter (``safer`` -> chosen with is_safe true, ``unsafer`` -> rejected with is_safe false).
Pairs are split by prompt with ``prepare.split_of`` (a prompt's pairs all land on the same side), so the test
pairs answer prompts the model never saw. The file repeats 30% of its (prompt, safe, unsafe) triples: the
training side keeps each once (``--keep-duplicates`` trains on all), the held-out side is scored as it is (784
pairs). Nothing is copied: the split lives in memory and the trainer reads the pairs directly
(``train_score_model``).

It trains with `humanalign train rm`'s trainer (task harmless: pairwise + sign terms) and reports the held-out
pair accuracy (cost(safe answer) < cost(unsafe answer)), the sign accuracy (cost > 0 exactly for the unsafe
answers), the AUC, the training wall time and pairs per second, as a table and as JSON::

    python benchmarks/cost_model_minilm.py                       # the defaults documented in docs/benchmarks.md
    python benchmarks/cost_model_minilm.py --head-lr-multiplier 1 --max-length 256 --output /tmp/cm.json

The trained model is a normal score model folder (``--run-dir``): ``humanalign eval rm --model RUN_DIR ...``
scores other data with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

DATA_FILE = "pku-saferlhf/safe_vs_unsafe_pairs.jsonl"
RESULTS_NAME = "benchmarks/results/cost_model_minilm.json"
RESULTS = Path(__file__).resolve().parents[1] / RESULTS_NAME


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from humanalign.paths import cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help=f"pairs file (default: <shared data>/{DATA_FILE})")
    p.add_argument("--model", default="minilm-l6-v2", help="backbone preset or folder (default: minilm-l6-v2)")
    p.add_argument("--run-dir", default=str(cache_dir() / "benchmarks" / "cost_model_minilm"),
                   help="run folder (replaced on every run); the trained cost model is saved here")
    p.add_argument("--output", default=str(RESULTS), help=f"JSON results file (default: {RESULTS_NAME})")
    p.add_argument("--test-ratio", type=float, default=0.15, help="share of prompts held out (default 0.15)")
    p.add_argument("--calibration-ratio", type=float, default=0.1, help="share of prompts kept out of training "
                   "to choose the cost model's sign offset on (default 0.1; 0: no calibration)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the prompt split (default 0)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--max-length", type=int, default=128, help="tokens of prompt + answer (default 128)")
    p.add_argument("--max-prompt-length", type=int, default=48, help="prompt tokens kept (default 48)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share (default 0.1)")
    p.add_argument("--regularization", type=float, default=0.001, help="score regularisation (default 0.001)")
    p.add_argument("--head-lr-multiplier", type=float, default=10.0,
                   help="pooler + classifier learning rate = lr x this (default 10)")
    p.add_argument("--layer-lr-decay", type=float, default=1.0,
                   help="layer-wise learning-rate decay, top layer at lr (default 1: off)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="train on every pair of the file, repeated (prompt, safe, unsafe) triples included")
    p.add_argument("--no-sign-terms", action="store_true", help="train on the pair ordering only (an ablation)")
    p.add_argument("--max-train-pairs", type=int, default=None, help="use at most this many training pairs")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="also score the held-out pairs every N steps (metrics.jsonl of the run folder; default: end only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on 2 shared cores a second thread costs CPU, not wall time)")
    return p.parse_args(argv)


def load_split(path: Path, test_ratio: float, seed: int, calibration_ratio: float = 0.0):
    """(train pairs, calibration pairs, test pairs, skip counts): PKU safe-vs-unsafe pairs split by prompt."""
    from humanalign.config.data import SourceSpec
    from humanalign.data.pairs import load_preference_pairs
    from humanalign.data.prepare import split_of
    from humanalign.data.records import prompt_key

    spec = SourceSpec(source="generic", path=str(path),
                      field_map={"prompt": "prompt", "chosen": "safer", "rejected": "unsafer"},
                      constants={"is_chosen_safe": True, "is_rejected_safe": False})
    pairs, skipped = load_preference_pairs(spec, kind="harmless")
    ratios = (1.0 - test_ratio - calibration_ratio, calibration_ratio, test_ratio)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for pair in pairs:
        parts[split_of(prompt_key(pair.prompt), seed, ratios)].append(pair)
    return parts["train"], parts["val"], parts["test"], skipped


def unique_pairs(pairs: list) -> tuple[list, int]:
    """The pairs with each (prompt, safe answer, unsafe answer) kept once, in file order, and how many repeats
    were left out. The file repeats 30% of its triples; a repeat costs a training step and teaches nothing new."""
    from humanalign.data.records import prompt_key

    seen, kept = set(), []
    for pair in pairs:
        key = (prompt_key(pair.prompt), pair.chosen, pair.rejected)
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    return kept, len(pairs) - len(kept)


def calibrate(run_dir: str, calibration: list, test: list) -> dict[str, Any]:
    """Choose the sign offset on the calibration pairs' labelled answers, save it with the model, and give the
    held-out answers' sign accuracy at the raw 0 and at the calibrated one."""
    from humanalign.models.calibration import (
        choose_sign_offset,
        costs_and_labels,
        sign_accuracies,
        write_sign_calibration,
    )
    from humanalign.models.scorer import load_scorer

    def labelled(pairs):
        chosen, rejected = load_scorer(run_dir, progress=False).score_pairs(pairs)
        return costs_and_labels(chosen, rejected, [p.is_chosen_safe for p in pairs],
                                [p.is_rejected_safe for p in pairs])

    choice = choose_sign_offset(*labelled(calibration))
    test_costs, test_unsafe = labelled(test)  # the raw costs: scored before the offset is written
    block = write_sign_calibration(run_dir, choice)
    return {**block, "held_out": {"at_raw_zero": sign_accuracies(test_costs, test_unsafe, 0.0),
                                  "calibrated": sign_accuracies(test_costs, test_unsafe, choice["offset"])}}


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cost_model_config(args: argparse.Namespace):
    """The `humanalign train rm` config of this benchmark's cost model (task harmless)."""
    from humanalign.config.base import load_config
    from humanalign.config.rm import RewardModelConfig

    return load_config(RewardModelConfig, values={
        "task": "harmless", "base_model_path": args.model, "output_dir": args.run_dir,
        "overwrite_output_dir": True, "seed": args.seed, "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length, "epochs": args.epochs, "batch_size": args.batch_size,
        "eval_batch_size": 64, "learning_rate": args.lr, "warmup_ratio": args.warmup_ratio,
        "lr_scheduler": "linear", "regularization": args.regularization, "eval_on_start": False,
        "use_sign_terms": not args.no_sign_terms, "head_lr_multiplier": args.head_lr_multiplier,
        "layer_lr_decay": args.layer_lr_decay, "weight_decay": args.weight_decay,
        "logging_steps": 10, "eval_steps": args.eval_steps, "report_to": ["none"], "group_by_length": True,
        "calibrate_sign": False,  # its validation pairs are the held-out test: calibrated below on its own split
    })


def summary_rows(result: dict[str, Any], calibrated: dict[str, Any] | None, batch_size: int) -> list[tuple[str, str]]:
    """The printed summary: accuracies, sizes and times."""
    return [("pair accuracy (held out)", f"{result['pair_accuracy']:.4f}"),
            ("sign accuracy (held out)", f"{result['sign_accuracy']:.4f}" if result["sign_accuracy"] is not None
             else "n/a"),
            ("sign accuracy, calibrated (held out)", f"{calibrated['held_out']['calibrated']['accuracy']:.4f} "
             f"(offset {calibrated['offset']:+.4f})" if calibrated else "n/a"),
            ("AUC safe vs unsafe", f"{result['auc']:.4f}" if result["auc"] is not None else "n/a"),
            ("train / held-out pairs", f"{result['train_pairs']:,} / {result['test_pairs']:,}"),
            ("steps x batch", f"{result['steps']} x {batch_size}"),
            ("training time (s)", f"{result['train_seconds']:.1f} wall, "
                                  f"{result['train_cpu_seconds']:.1f} CPU"),
            ("held-out scoring time (s)", f"{result['eval_seconds']:.1f} wall, "
                                          f"{result['eval_cpu_seconds']:.1f} CPU"),
            ("wall time, all included (s)", f"{result['wall_seconds']:.1f}"),
            ("train pairs / s", f"{result['train_pairs_per_second']} wall, "
                                f"{result['train_pairs_per_cpu_second']} per CPU-second")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from humanalign.data.io import atomic_write_json
    from humanalign.paths import shared_data_dir
    from humanalign.trainers.reward import train_score_model

    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else shared_data_dir() / DATA_FILE
    if not data.is_file():
        sys.exit(f"benchmark data not found: {data} (set HUMANALIGN_SHARED_DATA or pass --data)")
    train, calibration, test, skipped = load_split(data, args.test_ratio, args.split_seed, args.calibration_ratio)
    duplicates = 0
    if not args.keep_duplicates:
        train, duplicates = unique_pairs(train)
    if args.max_train_pairs:
        train = train[:args.max_train_pairs]
    print(f"[bench] {data}: {len(train):,} train / {len(test):,} held-out pairs (split by prompt); "
          f"skipped: {dict(skipped) or 'none'}; {duplicates:,} repeated training pairs left out", file=sys.stderr)
    cfg = cost_model_config(args)
    start = time.time()
    summary = train_score_model(cfg, train, test, skipped={"train": skipped},
                                sources={"train": f"{data} (train split)", "val": f"{data} (held out)"})
    wall = time.time() - start
    # the model is the run's final folder (summary['model']), not the run folder that holds it
    calibrated = calibrate(summary["model"], calibration, test) if calibration else None
    data_stats = json.loads((Path(args.run_dir) / "data_stats.json").read_text(encoding="utf-8"))
    ev = summary["eval"]
    pairs_seen = summary["steps"] * args.batch_size
    result = {
        "benchmark": "cost_model_minilm",
        "data": str(data), "train_pairs": summary["train_pairs"], "test_pairs": int(ev["eval/pairs"]),
        "repeated_train_pairs_left_out": duplicates,
        "model": args.model, "run_dir": args.run_dir,
        "pair_accuracy": ev["eval/accuracy"], "sign_accuracy": ev.get("eval/sign_accuracy"),
        "auc": ev.get("eval/auc"), "eval_loss": ev["eval/loss"], "sign_calibration": calibrated,
        "train_loss": summary["train"].get("train/loss"),
        "steps": summary["steps"], "pairs_seen": pairs_seen,
        "train_seconds": summary["train_seconds"], "eval_seconds": summary["eval_seconds"],
        "train_cpu_seconds": summary["train_cpu_seconds"], "eval_cpu_seconds": summary["eval_cpu_seconds"],
        "wall_seconds": round(wall, 1),
        "train_pairs_per_second": round(pairs_seen / max(summary["train_seconds"], 1e-9), 2),
        "train_pairs_per_cpu_second": round(pairs_seen / max(summary["train_cpu_seconds"], 1e-9), 2),
        "settings": {k: getattr(args, k) for k in ("max_length", "max_prompt_length", "epochs", "batch_size", "lr",
                                                   "warmup_ratio", "regularization", "seed", "split_seed",
                                                   "test_ratio", "no_sign_terms", "threads", "head_lr_multiplier",
                                                   "layer_lr_decay", "weight_decay", "keep_duplicates",
                                                   "max_train_pairs", "eval_steps", "calibration_ratio")},
        "truncation": {split: data_stats[split]["truncation"] for split in ("train", "val")},
        "machine": {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu"},
    }
    output = Path(args.output)
    atomic_write_json(output, result)
    print("\n" + table(summary_rows(result, calibrated, args.batch_size)))
    print(f"\n[bench] results: {output}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
