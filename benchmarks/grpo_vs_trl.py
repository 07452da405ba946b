"""Benchmark: humanalign's GRPO trainer against trl.GRPOTrainer (TRL 1.16), side by side on this machine.

Both trainers get the same model (loaded by ``humanalign.models.load``, float32; TRL's reference is that same
loader's frozen copy), the same prompts in the same order (our engine's seeded order; TRL reads them with
``shuffle_dataset=False``), the same group size G, generation settings (sampling at temperature 1, no top-p /
top-k, ``--max-new-tokens``), the same reward (``humanalign.rewards.length_reward``, 20 words), the same
objective (loss_type grpo, group std scaling, epsilon 0.2, beta 0.04 with a frozen reference, one pass and one
optimizer step per generation batch) and optimiser (AdamW, constant learning rate, clipping at 1.0, no weight
decay), dropout off. A step is the WHOLE step: generation, scoring, reference / policy forwards, backward,
optimizer. Tokens are the prompt and completion tokens of the step's sequences (their attention masks), so
tokens/s is comparable even though the two sample different answers. Each run is a fresh subprocess; runs
alternate ours, trl, ours, trl (``--rounds``); peak RSS and MFU as in ``benchmarks/common.py``::

    python benchmarks/grpo_vs_trl.py --model tiny --steps 4 --rounds 3
    python benchmarks/grpo_vs_trl.py --model smollm2 --steps 2 --rounds 2
    python benchmarks/grpo_vs_trl.py --model tiny --variants ours,ours-before,trl --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {"tiny": "tiny", "smollm2": "smollm2-135m-instruct"}
# per model: prompts per step, G, max_new_tokens, learning rate
DEFAULTS = {"tiny": (4, 4, 32, 1e-4), "smollm2": (2, 4, 32, 1e-6)}
ULTRAFEEDBACK = "ultrafeedback/train.jsonl"
BETA, TARGET_WORDS, MAX_PROMPT_CHARS = 0.04, 20, 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="runs per variant, alternating (default 2)")
    p.add_argument("--variants", default="ours,trl", help="ours, trl, ours-before (needs --before-src)")
    p.add_argument("--before-src", default=None, help="variant ours-before: humanalign from this src folder")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default: tiny 4, smollm2 2)")
    p.add_argument("--num-generations", type=int, default=None, help="G (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 32")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/grpo_<model>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    prompts, g, new, lr = DEFAULTS[args.model]
    args.prompts = args.prompts or prompts
    args.num_generations = args.num_generations or g
    args.max_new_tokens = args.max_new_tokens or new
    args.learning_rate = args.learning_rate or lr
    return args


def prepare_prompts(args: argparse.Namespace, work: Path) -> Path:
    """Distinct short prompts ({"prompt": text}), enough for every step of a run."""
    if args.model == "tiny":
        from humanalign.data.demo_data import demo_prompts

        candidates = demo_prompts("benign", 200, seed=0)  # held-out demo prompts
    else:
        from humanalign.paths import shared_data_dir

        lines = (shared_data_dir() / ULTRAFEEDBACK).read_text().splitlines()[:2000]
        candidates = [json.loads(line).get("prompt") for line in lines]
    texts: list[str] = []
    for prompt in candidates:
        if isinstance(prompt, list):  # messages: the last user turn
            prompt = prompt[-1].get("content") if prompt else None
        if isinstance(prompt, str) and 0 < len(prompt.strip()) <= MAX_PROMPT_CHARS and prompt.strip() not in texts:
            texts.append(prompt.strip())
    need = (args.warmup + args.steps) * args.prompts
    if len(texts) < need:
        raise SystemExit(f"only {len(texts)} usable prompts, {need} needed")
    out = work / "prompts.jsonl"
    out.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[: max(need, 64)]))
    return out


# ------------------------------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import humanalign.trainers.grpo as grpo
    from humanalign.config.base import load_config
    from humanalign.config.grpo import GRPOConfig
    from humanalign.engine import Engine

    recorder = common.StepRecorder(warmup=args.warmup)
    facts: dict[str, Any] = {}
    original_loss, original_step = grpo.GRPOTrainer._loss, Engine.optimizer_step

    def counting_loss(self, mb, advantages):
        facts.setdefault("params", sum(p.numel() for p in self.unwrapped.actor.parameters()))
        recorder.batch(int(mb.attention_mask.sum()))
        return original_loss(self, mb, advantages)

    def timed_step(self):
        result = original_step(self)
        recorder.step()
        return result

    grpo.GRPOTrainer._loss, Engine.optimizer_step = counting_loss, timed_step
    Engine.save_model = lambda self, model, tokenizer, output_dir, **_: Path(output_dir)  # not needed, not timed
    Engine.save_checkpoint = lambda self: None
    g = args.num_generations
    cfg = load_config(GRPOConfig, values=dict(
        actor_model_path=MODELS[args.model], prompts_path=args.data, output_dir=str(run_dir), overwrite_output_dir=True,
        reward_fn="length_reward", reward_fn_kwargs={"target_words": TARGET_WORDS}, rollout_batch_size=args.prompts,
        num_generations=g, batch_size=args.prompts * g, max_new_tokens=args.max_new_tokens, max_prompt_length=256,
        max_length=256 + args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, loss_type="grpo",
        scale_rewards="group", epsilon_low=0.2, max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
        lr_scheduler="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=["none"],
        progress_bar=False, seed=args.seed))
    grpo.run(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}
    rewards = [m["train/reward"] for m in lines if "train/reward" in m]
    return {**recorder.summary(), "final_loss": curve[args.warmup + args.steps], "params": facts["params"],
            "loss_curve": [curve[s] for s in sorted(curve)], "reward_curve": rewards}


def our_prompt_order(args: argparse.Namespace, count: int) -> list[int]:
    """The prompts of our first (warmup + steps) rollouts, in order (``RolloutSchedule``'s sampler, one process)."""
    from humanalign.engine.data import StepBatchSampler

    sampler = StepBatchSampler(count, args.prompts, seed=args.seed)
    return sampler.epoch_order(0)[: (args.warmup + args.steps) * args.prompts].tolist()


def child_trl(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import datasets
    import transformers
    import trl.trainer.grpo_trainer as trl_grpo
    from trl import GRPOConfig, GRPOTrainer

    from humanalign.config.training import ModelSettings
    from humanalign.models.load import load_causal_lm, load_tokenizer
    from humanalign.rewards import length_reward

    recorder = common.StepRecorder(warmup=args.warmup)
    tokenizer = load_tokenizer(MODELS[args.model])
    transformers.set_seed(args.seed)
    policy = load_causal_lm(MODELS[args.model], ModelSettings())
    # TRL builds its reference from the policy's config path, which a GGUF preset cannot be re-read from: hand it
    # the same loader's frozen copy (what our trainer uses)
    trl_grpo.create_model_from_path = lambda *a, **k: load_causal_lm(MODELS[args.model], ModelSettings(),
                                                                     trainable=False)
    texts = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines()]
    rows = [{"prompt": [{"role": "user", "content": texts[i]}]} for i in our_prompt_order(args, len(texts))]

    def reward(prompts, completions, **_):
        return length_reward(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions],
                             target_words=TARGET_WORDS)

    class Timing(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            recorder.step()

    class BenchGRPOTrainer(GRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            recorder.batch(int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    g = args.num_generations
    config = GRPOConfig(
        output_dir=str(run_dir), per_device_train_batch_size=args.prompts * g, num_generations=g,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=BETA, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        shuffle_dataset=False, max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        report_to=[], save_strategy="no", bf16=False, fp16=False, use_cpu=True, disable_dropout=True,
        disable_tqdm=True, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
    )
    trainer = BenchGRPOTrainer(model=policy, reward_funcs=[reward], args=config,
                               train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                               callbacks=[Timing()])
    params = sum(p.numel() for p in policy.parameters())
    trainer.train()
    history = trainer.state.log_history
    curve = {h["step"]: float(h["loss"]) for h in history if "loss" in h}
    return {**recorder.summary(), "final_loss": curve[args.warmup + args.steps], "params": params,
            "loss_curve": [curve[s] for s in sorted(curve)], "reward_curve": [h["reward"] for h in history
                                                                            if "reward" in h]}


def child_main(args: argparse.Namespace) -> None:
    common.set_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix=f"grpo-{args.child}-", dir=Path(args.child_output).parent))
    try:
        if args.child == "ours":
            result = child_ours(args, run_dir)
        elif args.child == "trl":
            result = child_trl(args, run_dir)
        else:
            raise SystemExit(f"unknown variant {args.child}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    # generation is not counted in model FLOPs: MFU here is training arithmetic over a whole-step time
    result["flops_per_token"] = common.flops_per_token(result["params"], reference_forward=True)
    common.write_json(Path(args.child_output), result)


# ------------------------------------------------------------------------------------------------- parent


def spread(payload: dict[str, Any]) -> str:
    """Mean +- sample std of each variant's tokens/s over its rounds, and the ours / trl ratio of the means."""
    lines, means = [], {}
    for variant in dict.fromkeys(r["variant"] for r in payload["runs"]):
        rates = [r["tokens_per_second"] for r in payload["runs"] if r["variant"] == variant]
        means[variant] = statistics.mean(rates)
        std = statistics.stdev(rates) if len(rates) > 1 else 0.0
        lines.append(f"{variant}: {means[variant]:.1f} +- {std:.1f} tokens/s over {len(rates)} runs "
                     f"({', '.join(f'{r:.1f}' for r in rates)})")
    if "ours" in means and "trl" in means:
        lines.append(f"ours / trl (means): {means['ours'] / means['trl']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    script = Path(__file__).resolve()
    output = Path(args.output) if args.output else script.parent / "results" / f"grpo_{args.model}.json"
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    try:
        data = prepare_prompts(args, work)
        child_args = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                      "--prompts", str(args.prompts), "--num-generations", str(args.num_generations),
                      "--max-new-tokens", str(args.max_new_tokens), "--learning-rate", str(args.learning_rate),
                      "--threads", str(args.threads), "--seed", str(args.seed), "--data", str(data)]
        title = (f"GRPO {args.model}: {args.steps} timed steps (+{args.warmup} warmup) of {args.prompts} prompts x "
                 f"G {args.num_generations}, {args.max_new_tokens} new tokens")
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_output", "data")}
        payload = common.run_benchmark(script=script, name=f"grpo_{args.model}", title=title, settings=settings,
                                       variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                                       rounds=args.rounds, threads=args.threads, child_args=child_args, work=work,
                                       output=output, before_src=args.before_src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload["spread"] = spread(payload)
    print(payload["spread"])
    common.write_json(output, payload)
    return payload


if __name__ == "__main__":
    main()
