"""Benchmark: humanalign's reward-model trainer against trl.RewardTrainer (TRL 1.16), side by side.

Both trainers get the same score model (``humanalign.models.score_model.load_score_model``: the backbone's
``*ForSequenceClassification`` with one output, the same seeded head; TRL trains its Hugging Face model
directly), the same tokenised pairs (``encode_score_pair``: prompt + response, score at the last token), the
same batches in the same order (ours: seeded, grouped by length; TRL is fed those examples with a sequential
sampler), the same optimiser settings (AdamW, constant learning rate, clipping at 1.0) and the plain
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (our score regularisation and margins off, as TRL's
defaults). Ours computes each pair's prompt once (the shared-prompt rows of ``data.score_rows``); TRL forwards
the chosen and the rejected sequence, the prompt in each; tokens are counted the same for both (the pairs'
non-pad tokens, the prompt twice). Each run is a fresh subprocess; runs alternate ours, trl, ours, trl. Measured as in
``dpo_vs_trl.py``: steps/s, tokens/s (non-pad), peak resident memory while training, the loss after the last
step, and MFU (6 x params per token; 4 x params with LoRA; params without the input embedding table, a lookup:
``common.matmul_params``).

    python benchmarks/rm_vs_trl.py --model tiny --steps 20
    python benchmarks/rm_vs_trl.py --model smollm2 --lora --steps 4
    python benchmarks/rm_vs_trl.py --model smollm2 --steps 4
    python benchmarks/rm_vs_trl.py --model-path <folder> --device cuda --bf16 --data-kind long --max-length 1024
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
from dpo_vs_trl import MODELS, prepare_data  # noqa: E402

# per model: batch size (pairs), max_length, max_prompt_length, learning rate (full, LoRA), pairs in the data set
DEFAULTS = {"tiny": (16, 128, 48, 1e-3, 1e-3, 485), "smollm2": (2, 256, 128, 1e-5, 1e-4, 256)}
LORA = {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return common.parse_side_by_side_args(
        argv, description=__doc__.split("\n\n")[0], models=MODELS, defaults=DEFAULTS, prefix="rm",
        lora_help="train a LoRA adapter (r 16, alpha 32) and the head",
        variants="ours, trl, ours-before, ours-fused-adamw",
        before_help="variant ours-before: humanalign from this src folder")


def rm_config(args: argparse.Namespace, run_dir: Path):
    from humanalign.config.base import load_config
    from humanalign.config.rm import RewardModelConfig

    return load_config(RewardModelConfig, values=dict(
        task="helpful", base_model_path=common.model_name(args, MODELS), train_helpful_path=args.data, val_helpful_path=None,
        skip_invalid=True, output_dir=str(run_dir), overwrite_output_dir=True, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.learning_rate, lr_scheduler="constant", logging_steps=1, report_to=["none"],
        progress_bar=False, seed=args.seed, eval_at_start=False, regularization=0.0, use_margin=False,
        center_rewards_coefficient=0.0, lora=LORA if args.lora else {},
        mixed_precision="bf16" if args.bf16 else "no", model={"dtype": common.model_dtype(args)},
    ))


# ------------------------------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import humanalign.trainers.reward as reward
    from humanalign.data.score_pairs import load_pairs
    from humanalign.engine import Engine

    recorder = common.StepRecorder(warmup=args.warmup, device=args.device)
    facts: dict[str, Any] = {}
    original_forward, original_step = reward.forward_scores, Engine.optimizer_step

    def counting_forward(model, batch):
        if model.training:
            facts.setdefault("params", common.matmul_params(model))
            recorder.batch(int(batch["attention_mask"].sum()))
        return original_forward(model, batch)

    def timed_step(self):
        result = original_step(self)
        recorder.step()
        return result

    reward.forward_scores, Engine.optimizer_step = counting_forward, timed_step
    cfg = rm_config(args, run_dir)
    pairs, _ = load_pairs(cfg, cfg.train_path, None)
    reward.train_score_model(cfg, pairs)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    curve = {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}
    return {**recorder.summary(), "final_loss": curve[args.warmup + args.steps], "params": facts["params"],
            "loss_curve": [curve[s] for s in sorted(curve)]}


def child_trl(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    from trl import RewardConfig, RewardTrainer

    from humanalign.config.training import LoraSettings, ModelSettings
    from humanalign.data.score_pairs import load_pairs
    from humanalign.engine.data import StepBatchSampler
    from humanalign.models.score_model import load_score_model
    from humanalign.trainers.reward_data import encode_pairs

    recorder = common.StepRecorder(warmup=args.warmup, device=args.device)
    cfg = rm_config(args, run_dir)
    pairs, _ = load_pairs(cfg, cfg.train_path, None)
    transformers.set_seed(args.seed)  # as our engine seeds before loading: the same fresh head
    score_model, tokenizer = load_score_model(common.model_name(args, MODELS),
                                              ModelSettings(dtype=common.model_dtype(args)),
                                              LoraSettings(**LORA) if args.lora else None, score_type="reward")
    features, _, _ = encode_pairs(tokenizer, pairs, task="helpful", max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, encoder=score_model.is_encoder,
                                  use_margin=False)
    lengths = [max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in features]  # as ours groups
    order = StepBatchSampler(len(features), args.batch_size, seed=args.seed, lengths=lengths).epoch_order(0)
    rows = [{"chosen_ids": features[i]["chosen_input_ids"], "rejected_ids": features[i]["rejected_input_ids"]}
            for i in order[: (args.warmup + args.steps) * args.batch_size].tolist()]
    model = score_model.model
    params = common.matmul_params(model)

    class Timing(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            recorder.step()

    class BenchRewardTrainer(RewardTrainer):
        def _get_train_sampler(self, *_, **__):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                recorder.batch(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    config = RewardConfig(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", bf16=args.bf16, fp16=False,
        gradient_checkpointing=False, max_length=None, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_dropout=True, disable_tqdm=True,
    )
    trainer = BenchRewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[Timing()])
    trainer.train()
    curve = {h["step"]: float(h["loss"]) for h in trainer.state.log_history if "loss" in h}
    return {**recorder.summary(), "final_loss": curve[args.warmup + args.steps], "params": params,
            "loss_curve": [curve[s] for s in sorted(curve)]}


def child_main(args: argparse.Namespace) -> None:
    common.set_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix=f"rm-{args.child}-", dir=Path(args.child_output).parent))
    try:
        if args.child in ("ours", "ours-fused-adamw"):
            if args.child == "ours-fused-adamw":
                common.use_fused_adamw()
            result = child_ours(args, run_dir)
        elif args.child == "trl":
            result = child_trl(args, run_dir)
        else:
            raise SystemExit(f"unknown variant {args.child}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    result["flops_per_token"] = common.flops_per_token(result["params"], frozen_base=args.lora)
    common.write_json(Path(args.child_output), result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    return common.run_parent(args, script=Path(__file__).resolve(), prefix="rm", label="reward model",
                             prepare_data=prepare_data)


if __name__ == "__main__":
    main()
