"""Benchmark: PPO throughput, with the rollout (generation, scoring, no-grad forwards) and the update timed apart.

It builds the real trainer (`humanalign train ppo`'s ``PPOTrainer``) around a policy and a rule-based reward
(``length_reward``; ``--reward-model`` scores with a score model instead) and times, for each rollout batch size
asked for, ``--rollouts`` rollouts after ``--warmup`` untimed ones:

- generation: ``HFRolloutEngine.generate`` (KV cache, left-padded batches), answer tokens per second;
- scoring: reward function / score model on the decoded text;
- forward: the no-grad passes for old log-probs, reference log-probs and values;
- update: ``update_iters`` passes of clipped surrogate + value loss and optimizer steps, tokens (prompt + answer)
  per second.

Prompts: the BeaverTails evaluation prompts of the shared data folder (``HUMANALIGN_SHARED_DATA``) when present,
else the demo's held-out prompts. Results are printed as a table and written as JSON::

    python benchmarks/ppo_throughput.py                                   # tiny preset, rollout batches 8 and 16
    python benchmarks/ppo_throughput.py --model smollm2-135m-instruct --rollout-batch-sizes 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS_FILE = "pku-saferlhf/beavertails_eval_prompts.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from humanalign.paths import cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="policy: preset or folder (default: tiny)")
    p.add_argument("--reward-model", default=None, help="score model for the reward (default: length_reward)")
    p.add_argument("--prompts", default=None, help=f"prompt file (default: <shared data>/{PROMPTS_FILE})")
    p.add_argument("--rollout-batch-sizes", default="8,16", help="prompts per rollout, comma-separated (default 8,16)")
    p.add_argument("--num-return-sequences", type=int, default=1, help="answers per prompt (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (default 64)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="prompt tokens kept (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per update micro-batch (default 8)")
    p.add_argument("--update-iters", type=int, default=1, help="passes over each rollout (default 1)")
    p.add_argument("--rollouts", type=int, default=3, help="timed rollouts per setting (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rollouts first (default 1)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (reference = adapter disabled)")
    p.add_argument("--lagrangian", action="store_true",
                   help="PPO-Lagrangian (train ppo-lag): a rule-based cost (banned_word_cost) beside the reward,\n"
                        "the cost critic and lambda")
    p.add_argument("--generation-variants", default=None,
                   help="instead of the trainer: time HF generate alone, comma-separated variants among\n"
                        "dynamic (the default KV cache), static (a static cache, not compiled), static-compile\n"
                        "(a static cache and the torch.compile'd forward transformers uses with it; CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--run-dir", default=str(cache_dir() / "benchmarks" / "ppo_throughput"),
                   help="scratch run folder (replaced on every setting)")
    p.add_argument("--output", default=None, help="JSON results file (default: <run-dir>/benchmark.json)")
    return p.parse_args(argv)


def prompts_file(args: argparse.Namespace, scratch: Path) -> Path:
    from humanalign.paths import shared_data_dir

    if args.prompts:
        return Path(args.prompts)
    shared = shared_data_dir() / PROMPTS_FILE
    if shared.is_file():
        return shared
    from humanalign.data.demo_data import demo_prompts

    path = scratch / "demo_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts("benign", 64) + demo_prompts("harmful", 64)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def bench_setting(args: argparse.Namespace, rollout_batch_size: int, prompts: Path) -> dict[str, Any]:
    import torch

    from humanalign.config.base import load_config
    from humanalign.config.ppo import PPOConfig, PPOLagConfig
    from humanalign.engine import Engine
    from humanalign.trainers.ppo import PPOTrainer

    sequences = rollout_batch_size * args.num_return_sequences
    values: dict[str, Any] = dict(
        actor_model_path=args.model, prompts_path=str(prompts), output_dir=args.run_dir, overwrite_output_dir=True,
        rollout_batch_size=rollout_batch_size, num_return_sequences=args.num_return_sequences,
        batch_size=min(args.batch_size, sequences), update_iters=args.update_iters,
        max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
        max_length=args.max_prompt_length + args.max_new_tokens, max_steps=10**6, logging_steps=10**6,
        report_to=["none"], progress_bar=False, lora={"enabled": args.lora}, seed=0,
    )
    if args.reward_model:
        values["reward_model_path"] = args.reward_model
    else:
        values.update(reward_fn="length_reward", reward_fn_kwargs={"target_words": 20})
    if args.lagrangian:
        values.update(cost_fn="banned_word_cost", cost_fn_kwargs={"banned": ["you"], "per_word": True},
                      cost_threshold=0.0, lambda_init=1.0, lambda_lr=0.1)
    cfg = load_config(PPOLagConfig if args.lagrangian else PPOConfig, values=values)
    rows = []
    with Engine(cfg, name="ppo-bench") as engine:
        trainer = PPOTrainer(cfg, engine)
        trainer.model.train()
        generations = []
        generate = trainer.rollout_engine.generate

        def timed_generate(*a, **k):
            generations.append(generate(*a, **k))
            return generations[-1]

        trainer.rollout_engine.generate = timed_generate
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        for index in range(args.warmup + args.rollouts):
            start = time.perf_counter()
            batch = trainer.rollout(index)
            sync()
            rolled = time.perf_counter()
            trainer.update(batch, index)
            sync()
            done = time.perf_counter()
            if index < args.warmup:
                continue
            gen = generations[-1]
            scoring = trainer.last_rollout["scoring_seconds"]
            rows.append({"generation_s": gen.seconds, "scoring_s": scoring,
                         "forward_s": (rolled - start) - gen.seconds - scoring, "update_s": done - rolled,
                         "answer_tokens": gen.response_tokens, "tokens": int(batch.attention_mask.sum())})
        device = str(engine.device)
    total = {key: sum(r[key] for r in rows) for key in rows[0]}
    return {
        "rollout_batch_size": rollout_batch_size, "sequences_per_rollout": sequences, "device": device,
        "generation_s": total["generation_s"] / len(rows), "scoring_s": total["scoring_s"] / len(rows),
        "forward_s": total["forward_s"] / len(rows), "update_s": total["update_s"] / len(rows),
        "generation_tokens_per_s": total["answer_tokens"] / total["generation_s"],
        "update_tokens_per_s": total["tokens"] * args.update_iters / total["update_s"],
        "sequences_per_s": sequences * len(rows) / sum(r["generation_s"] + r["scoring_s"] + r["forward_s"]
                                                       + r["update_s"] for r in rows),
        "mean_answer_tokens": total["answer_tokens"] / (sequences * len(rows)),
    }


def generation_variants(args: argparse.Namespace, prompts: Path) -> list[dict[str, Any]]:
    """Answer tokens per second of ``model.generate`` (sampling, every answer ``max_new_tokens`` long) for each
    variant: the first call (compilation, cache allocation) is reported apart, then the median of 3 timed calls.
    On CUDA the policy is bf16 (``dtype: auto``)."""
    import statistics

    import torch

    from humanalign.config.training import ModelSettings
    from humanalign.models.load import load_causal_lm, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, ModelSettings(), trainable=False).to(device)
    size = int(args.rollout_batch_sizes.split(",")[0])
    texts = [json.loads(line)["prompt"] for line in prompts.read_text(encoding="utf-8").splitlines()[:size]]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                      max_length=args.max_prompt_length).to(device)
    rows = []
    for variant in [v.strip() for v in args.generation_variants.split(",") if v.strip()]:
        if variant == "static-compile" and device != "cuda":
            rows.append({"variant": variant, "skipped": "transformers compiles a static-cache forward on CUDA only"})
            continue
        extra: dict[str, Any] = {}
        if variant.startswith("static"):
            extra["cache_implementation"] = "static"
            extra["disable_compile"] = variant == "static"
        times = []
        for _ in range(4):
            torch.manual_seed(0)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(**batch, do_sample=True, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **extra)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        rows.append({"variant": variant, "device": device, "prompts": len(texts), "answer_tokens": tokens,
                     "first_call_s": times[0], "median_s": statistics.median(times[1:]),
                     "tokens_per_s": tokens / statistics.median(times[1:])})
        print(f"[bench] generate {variant}: {rows[-1]['tokens_per_s']:.0f} answer tokens/s (first call "
              f"{times[0]:.1f}s)", file=sys.stderr, flush=True)
    return rows


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'prompts':>7} {'seqs':>5} {'gen s':>7} {'score s':>8} {'fwd s':>7} {'update s':>9} "
              f"{'gen tok/s':>10} {'upd tok/s':>10} {'seq/s':>7} {'ans len':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r['rollout_batch_size']:>7} {r['sequences_per_rollout']:>5} {r['generation_s']:>7.3f} "
                     f"{r['scoring_s']:>8.3f} {r['forward_s']:>7.3f} {r['update_s']:>9.3f} "
                     f"{r['generation_tokens_per_s']:>10.0f} {r['update_tokens_per_s']:>10.0f} "
                     f"{r['sequences_per_s']:>7.2f} {r['mean_answer_tokens']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from humanalign.data.io import atomic_write_json

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    prompts = prompts_file(args, run_dir.parent / "ppo_throughput_prompts")
    output = Path(args.output) if args.output else run_dir / "benchmark.json"
    if args.generation_variants:
        rows = generation_variants(args, prompts)
        atomic_write_json(output, {"benchmark": "generation_variants", "args": vars(args), "results": rows,
                                   "torch": torch.__version__,
                                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
        print(f"results written to {output}")
        return 0
    sizes = [int(s) for s in args.rollout_batch_sizes.split(",") if s.strip()]
    results = []
    for size in sizes:
        print(f"[bench] rollout batch {size} ...", file=sys.stderr, flush=True)
        results.append(bench_setting(args, size, prompts))
    table = format_table(results)
    print(f"{'PPO-Lagrangian' if args.lagrangian else 'PPO'} throughput: model {args.model}, {args.max_new_tokens} new tokens max, update_iters "
          f"{args.update_iters}, micro-batch {args.batch_size}, {args.rollouts} timed rollouts each "
          f"({results[0]['device']}, {torch.get_num_threads()} CPU threads)")
    print(table)
    atomic_write_json(output, {
        "benchmark": "ppo_throughput", "args": vars(args), "prompts": str(prompts), "results": results,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    })
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
