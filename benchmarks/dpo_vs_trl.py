"""Benchmark: humanalign's DPO trainer against trl.DPOTrainer (TRL 1.16), side by side on this machine.

Both trainers get the same model (loaded by ``humanalign.models.load``, float32), the same tokenised pairs, the
same batches in the same order (TRL is fed, with a sequential sampler, the exact examples of each of our steps:
our seeded, length-grouped order), the same optimiser settings (AdamW, constant learning rate, clipping at 1.0),
beta 0.1, the sigmoid loss, dropout off, no gradient checkpointing, and a live reference (a frozen copy for full
fine-tuning, the adapter switched off for LoRA). Each run is a fresh subprocess; runs alternate ours, trl, ours,
trl (``--rounds``). Measured per run: steps/s and tokens/s (non-pad tokens, wall clock and process CPU time)
after ``--warmup`` untimed steps, peak resident memory during training, the loss after the last step (the same
batches, so the two losses should agree), and MFU against the measured float32 matmul peak. Opt-in variants:
``trl-random`` runs TRL in its own default order (shuffled, no length grouping); ``ours-before`` runs our
trainer from another source tree (``--before-src``), for before/after figures of a change; ``ours-fused-adamw``
runs ours with torch's fused AdamW in place of the engine's (an experiment, patched in the benchmark only).

Data: ``tiny`` trains on the demo pairs (``humanalign.data.demo_data`` + prepare-data), ``smollm2`` on the first
``--pairs`` pairs of <shared data>/ultrafeedback/train.jsonl. Results: a Markdown table on stdout and a JSON file::

    python benchmarks/dpo_vs_trl.py --model tiny --steps 20
    python benchmarks/dpo_vs_trl.py --model smollm2 --lora --steps 4
    python benchmarks/dpo_vs_trl.py --model smollm2 --steps 4
    python benchmarks/dpo_vs_trl.py --model-path <folder> --device cuda --bf16 --data-kind long --max-length 1024

On a GPU (``--device cuda --bf16``) both trainers get bf16 weights and bf16 autocast, steps are timed after a
CUDA synchronize, and the table adds the peak of allocated GPU memory (``torch.cuda.max_memory_allocated``) and
MFU against a bf16 matmul timed on the same GPU (benchmarks/gpu/run.py drives this at SmolLM2 shapes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {"tiny": "tiny", "smollm2": "smollm2-135m-instruct"}
# per model: batch size (pairs), max_length, max_prompt_length, learning rate (full, LoRA), pairs in the data set
DEFAULTS = {"tiny": (8, 128, 48, 1e-3, 1e-3, 485), "smollm2": (2, 256, 128, 5e-6, 5e-5, 256)}
ULTRAFEEDBACK = "ultrafeedback/train.jsonl"
LORA = {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0}  # no LoRA dropout: TRL turns every dropout off


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return common.parse_side_by_side_args(
        argv, description=__doc__.split("\n\n")[0], models=MODELS, defaults=DEFAULTS, prefix="dpo",
        lora_help="train a LoRA adapter (r 16, alpha 32) instead of all weights",
        variants="ours, trl, trl-random, ours-before, ours-fused-adamw",
        before_help="variant ours-before: humanalign from this src folder (e.g. a git worktree of an older "
                    "commit: `git worktree add ../before <commit>` -> ../before/src)")


# ------------------------------------------------------------------------------------------------- data


def prepare_data(args: argparse.Namespace, work: Path) -> Path:
    """The training pairs file both trainers read (prepare-data's pair format)."""
    out = work / "pairs.jsonl"
    if args.model == "tiny" or args.data_kind == "long":
        from humanalign.config.base import load_config
        from humanalign.config.data import PrepareDataConfig
        from humanalign.data.demo_data import write_demo_raw
        from humanalign.data.prepare import run as prepare

        raw = write_demo_raw(work / "raw", n=600, seed=0)
        prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(work / "data"),
                                                       "seed": 0}))
        lines = (work / "data" / "train" / "helpful_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    else:
        from humanalign.paths import shared_data_dir

        lines = (shared_data_dir() / ULTRAFEEDBACK).read_text(encoding="utf-8").splitlines()
    if args.data_kind == "long":  # every sequence cut to max_length tokens (a word is one token or more)
        lines = common.long_pairs(lines, args.pairs, words=args.max_length, seed=args.seed)
    out.write_text("\n".join(lines[: args.pairs]) + "\n", encoding="utf-8")
    return out


def tokenised_pairs(args: argparse.Namespace, tokenizer):
    from types import SimpleNamespace

    from humanalign.data.preference_dataset import load_pair_dataset

    cfg = SimpleNamespace(max_length=args.max_length, max_prompt_length=args.max_prompt_length, source="pairs",
                          skip_invalid=True)
    return load_pair_dataset(args.data, "helpful", tokenizer, cfg, name="bench")


def our_order(args: argparse.Namespace, dataset, policy) -> list[int]:
    """The examples of our first (warmup + steps) steps, in order: the engine's seeded order, grouped by length
    as our DPO trainer groups them (``humanalign.trainers.dpo.run``)."""
    from humanalign.engine.data import StepBatchSampler

    try:
        from humanalign.models.logprobs import shared_layout_possible
    except ImportError:  # an older humanalign (before the shared layout) groups by the longer sequence
        shared_layout_possible = None
    shared = shared_layout_possible is not None and shared_layout_possible(policy)
    lengths = dataset.shared_lengths if shared else dataset.lengths
    sampler = StepBatchSampler(len(dataset), args.batch_size, seed=args.seed, lengths=lengths)
    return sampler.epoch_order(0)[: (args.warmup + args.steps) * args.batch_size].tolist()


# ------------------------------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import humanalign.trainers.dpo as dpo
    from humanalign.config.base import load_config
    from humanalign.config.dpo import DPOConfig
    from humanalign.engine import Engine

    recorder = common.StepRecorder(warmup=args.warmup, device=args.device)
    facts: dict[str, Any] = {}
    original_loss, original_step = dpo.pair_loss, Engine.optimizer_step

    def counting_loss(model, reference, batch, settings, beta):
        if model.training:
            if "params" not in facts:
                facts["params"] = sum(p.numel() for p in model.parameters())
                facts["layout"] = dpo.pair_layout(model, batch) if hasattr(dpo, "pair_layout") else "plain"
            recorder.batch(int(batch["attention_mask"].sum()))
        return original_loss(model, reference, batch, settings, beta)

    def timed_step(self):
        result = original_step(self)
        recorder.step()
        return result

    def no_save(self, model, tokenizer, output_dir, **_):  # the final model is not needed (and not timed)
        return Path(output_dir)

    dpo.pair_loss, Engine.optimizer_step, Engine.save_model = counting_loss, timed_step, no_save
    cfg = load_config(DPOConfig, values=dict(
        policy_model_path=common.model_name(args, MODELS), train_path=args.data, val_path=None, skip_invalid=True,
        output_dir=str(run_dir), overwrite_output_dir=True, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.learning_rate, lr_scheduler="constant", logging_steps=1, report_to=["none"],
        progress_bar=False, seed=args.seed, beta=0.1, loss_type="sigmoid", lora=LORA if args.lora else {},
        mixed_precision="bf16" if args.bf16 else "no", model={"dtype": common.model_dtype(args)},
    ))
    summary = dpo.run(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    curve = {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}
    return {**recorder.summary(), "final_loss": curve[args.warmup + args.steps], "params": facts["params"],
            "loss_curve": [curve[s] for s in sorted(curve)], "reference": summary["reference"],
            "layout": facts.get("layout")}


def child_trl(args: argparse.Namespace, run_dir: Path, same_order: bool) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    from humanalign.config.training import LoraSettings, ModelSettings
    from humanalign.models.load import load_causal_lm, load_tokenizer

    recorder = common.StepRecorder(warmup=args.warmup, device=args.device)
    name, settings = common.model_name(args, MODELS), ModelSettings(dtype=common.model_dtype(args))
    tokenizer = load_tokenizer(name)
    dataset = tokenised_pairs(args, tokenizer)
    transformers.set_seed(args.seed)
    lora = LoraSettings(**LORA) if args.lora else None
    policy = load_causal_lm(name, settings, lora)
    reference = None if args.lora else load_causal_lm(name, settings, trainable=False)
    order = our_order(args, dataset, policy) if same_order else list(range(len(dataset)))
    rows = []
    for i in order:
        example = dataset[i]
        prompt = next(j for j, label in enumerate(example["chosen_labels"]) if label != -100)
        assert example["rejected_input_ids"][:prompt] == example["chosen_input_ids"][:prompt]
        rows.append({"prompt_ids": example["chosen_input_ids"][:prompt],
                     "chosen_ids": example["chosen_input_ids"][prompt:],
                     "rejected_ids": example["rejected_input_ids"][prompt:]})
    train = datasets.Dataset.from_list(rows)

    class Timing(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            recorder.step()

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *_, **__):  # already tokenised by humanalign: the same token ids
            return dataset

        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset) if same_order else super()._get_train_sampler(*a, **k)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                recorder.batch(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    params = sum(p.numel() for p in policy.parameters())
    config = DPOConfig(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", bf16=args.bf16, fp16=False,
        gradient_checkpointing=False, beta=0.1, loss_type=["sigmoid"], max_length=None, seed=args.seed,
        data_seed=args.seed, dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_dropout=True,
        disable_tqdm=True,
    )
    trainer = BenchDPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train,
                              processing_class=tokenizer, callbacks=[Timing()])
    trainer.train()
    curve = {h["step"]: float(h["loss"]) for h in trainer.state.log_history if "loss" in h}
    return {**recorder.summary(), "final_loss": curve[args.warmup + args.steps], "params": params,
            "loss_curve": [curve[s] for s in sorted(curve)],
            "reference": "adapter-disabled" if args.lora else "model", "layout": "padded (trl fused head)"}


def child_main(args: argparse.Namespace) -> None:
    common.set_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix=f"dpo-{args.child}-", dir=Path(args.child_output).parent))
    try:
        if args.child in ("ours", "ours-fused-adamw"):
            if args.child == "ours-fused-adamw":
                common.use_fused_adamw()
            result = child_ours(args, run_dir)
        elif args.child in ("trl", "trl-random"):
            result = child_trl(args, run_dir, same_order=args.child == "trl")
        else:
            raise SystemExit(f"unknown variant {args.child}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    frozen_base = args.lora
    result["flops_per_token"] = common.flops_per_token(result["params"], frozen_base=frozen_base,
                                                       reference_forward=True)
    common.write_json(Path(args.child_output), result)


# ------------------------------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    return common.run_parent(args, script=Path(__file__).resolve(), prefix="dpo", label="DPO",
                             prepare_data=prepare_data)


if __name__ == "__main__":
    main()
