"""A tiny engine run for the tests: a 1-layer Llama, synthetic token data, and the loop a trainer writes.

Also a script, so tests can run it in a subprocess (to kill it, or under torchrun)::

    python tests/engine/engine_toy.py '{"output_dir": "...", "max_steps": 8}' [--sleep 0.2] [--poison 3,4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from humanalign.config.training import TrainingConfig
from humanalign.engine import Engine
from humanalign.errors import Interrupted

VOCAB = 64
torch.set_num_threads(1)  # the test machine has 2 shared cores: more threads only contend


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                         attention_dropout=dropout)
    return LlamaForCausalLM(config)


class ToyData(Dataset):
    """Arithmetic sequences mod 64 (start and stride random, so learnable); the first half is the 'prompt'."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            length = int(rng.integers(6, 17))
            start, stride = int(rng.integers(0, VOCAB)), int(rng.integers(1, 4))
            ids = [(start + stride * i) % VOCAB for i in range(length)]
            labels = [-100] * (length // 2) + ids[length // 2:]
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(x["input_ids"]) for x in self.items]


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of next-token cross-entropy over target tokens, and their counts: (B,), (B,)."""
    targets = labels[:, 1:]  # (B, T-1)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return ce.sum(-1), (targets != -100).sum(-1)


def evaluate(engine: Engine, model, loader) -> dict[str, float]:
    model.eval()
    sums, counts = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, c = token_losses(logits, batch["labels"])
            s, c = engine.gather_for_metrics((s, c))
            sums.append(s)
            counts.append(c)
    model.train()
    loss = (torch.cat(sums).sum() / torch.cat(counts).sum()).item()
    return {"loss": loss, "examples": float(torch.cat(counts).numel())}


def toy_loop(engine: Engine, model, train_set, eval_set=None, *, poison_steps=(), sleep=0.0, on_step=None,
             poison_rank=None):
    train_loader = engine.train_loader(train_set, collate, lengths=train_set.lengths())
    eval_loader = engine.eval_loader(eval_set, collate) if eval_set is not None else None
    model, _, _ = engine.prepare(model, train_loader)
    for micro_batches in engine.train_steps(train_loader):
        n_tokens = engine.reduce_sum(sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches))
        for batch in micro_batches:
            with engine.accumulate(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                sums, counts = token_losses(logits, batch["labels"])
                loss_sum, n = sums.sum(), counts.sum()
                if engine.step + 1 in poison_steps and poison_rank in (None, engine.process_index):
                    loss_sum = loss_sum * float("nan")
                engine.backward(loss_sum, normalizer=n_tokens)
                engine.record({"loss": loss_sum / n.clamp(min=1)}, weight=n)
                # logged as exp(mean NLL per token of the window), see test_metrics
                engine.record({"perplexity": loss_sum / n.clamp(min=1)}, weight=n, then=math.exp)
        engine.optimizer_step()
        if on_step is not None:
            on_step(engine, model)
        if sleep:
            time.sleep(sleep)
        if eval_loader is not None and engine.should_evaluate():
            engine.log_eval(evaluate(engine, model, eval_loader))
        if engine.should_save():
            engine.save_checkpoint()
    return model


def save_plain(model, folder: Path, state_dict) -> None:
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def run_toy(values: dict, *, n_train: int = 40, n_eval: int = 12, poison_steps=(), sleep: float = 0.0,
            on_step=None, dropout: float = 0.0, model=None, poison_rank=None) -> Path:
    defaults = {"learning_rate": 3e-3, "batch_size": 4, "logging_steps": 1, "report_to": ["tensorboard"],
                "progress_bar": False, "max_length": 64, "max_prompt_length": 32, "warmup_steps": 0}
    cfg = TrainingConfig(**{**defaults, **values})
    with Engine(cfg, name="toy") as engine:
        model = model if model is not None else tiny_llama(dropout=dropout)
        eval_set = ToyData(n_eval, seed=2) if n_eval else None
        model = toy_loop(engine, model, ToyData(n_train, seed=1), eval_set, poison_steps=poison_steps, sleep=sleep,
                         on_step=on_step, poison_rank=poison_rank)
        return engine.finish(model, None, save_fn=save_plain)


def read_metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("values")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--poison", default="")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--poison-rank", type=int, default=None)
    args = parser.parse_args(argv)
    poison = tuple(int(s) for s in args.poison.split(",") if s)
    try:
        run_toy(json.loads(args.values), poison_steps=poison, sleep=args.sleep, dropout=args.dropout,
                poison_rank=args.poison_rank)
    except Interrupted as stop:  # as the CLI reports a run stopped by a signal
        print(f"rank {os.environ.get('RANK', '0')}: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
