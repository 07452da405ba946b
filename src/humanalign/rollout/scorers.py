"""Scores of sampled answers: a score model on the decoded text, a Python function, or their sum; and the
running reward statistics that ``normalize_reward`` divides by.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from humanalign.data.tokenize import encode_prompt
from humanalign.models.score_model import ScoreNormalizer
from humanalign.models.scorer import load_scorer
from humanalign.rewards import load_score_fn


class SequenceScorer:
    """A score per (prompt, answer) text from a score model, a Python function, or the sum of both."""

    def __init__(self, kind: str, model_path: str | None, fn_spec: str | None, fn_kwargs: dict[str, Any],
                 device: torch.device, batch_size: int, settings, log: Callable[[str], None] = print):
        self.kind = kind
        self.scorer = None
        if model_path:
            self.scorer = load_scorer(model_path, device=device, batch_size=batch_size, progress=False,
                                      settings=settings.model_copy(update={"chat_template": "auto", "gguf_file": None}))
            if self.scorer.score_type != kind:
                log(f"[ppo] note: {model_path} was trained as a {self.scorer.score_type} model and is used as the "
                    f"{kind} model here")
        self.fn = load_score_fn(fn_spec, fn_kwargs, name=f"{kind}_fn") if fn_spec else None

    def __call__(self, prompts: Sequence[list[dict[str, str]]], texts: Sequence[str]
                 ) -> tuple[list[float], dict[str, float]]:
        """(total score per answer, mean of each part for the metrics)."""
        total = [0.0] * len(texts)
        parts: dict[str, float] = {}
        if self.scorer is not None:
            values = self.scorer.score(prompts, texts)
            total = [t + v for t, v in zip(total, values)]
            parts[f"{self.kind}_model_score"] = sum(values) / max(len(values), 1)
        if self.fn is not None:
            values = self.fn(prompts, texts)
            total = [t + v for t, v in zip(total, values)]
            parts[f"{self.kind}_fn_score"] = sum(values) / max(len(values), 1)
        return total, parts


class RunningScoreStats:
    """Running mean / std of reward scores (``normalize_reward``), checkpointed with the run."""

    def __init__(self) -> None:
        self.normalizer = ScoreNormalizer("running")

    def state_dict(self) -> dict[str, Any]:
        return self.normalizer.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer = ScoreNormalizer.from_dict(state)



def score_held_out_prompts(engine, rollout_engine, tokenizer, prompts, generation, max_prompt_length: int, seed: int,
                           reward_scorer, cost_scorer=None) -> dict[str, float]:
    """One answer to each held-out prompt (this rank's share), scored: mean reward, cost (with a cost scorer),
    response length and finished share over all ranks. Every rank answers the same number of prompts (a rank
    short of one repeats a prompt, not counted): sharded models gather weights inside each forward, so all ranks
    must run the same generate calls (done under DDP too, so every backend samples the same batches)."""
    mine = list(range(engine.process_index, len(prompts), engine.num_processes))
    share = math.ceil(len(prompts) / engine.num_processes)
    padding = [mine[-1] if mine else 0] * (share - len(mine))
    totals = torch.zeros(5, device=engine.device)  # reward, cost, length, finished, count
    if mine or padding:
        asked = [prompts[i] for i in mine + padding]
        ids = [encode_prompt(tokenizer, p, max_prompt_length) for p in asked]
        gen = rollout_engine.generate(ids, generation, 1, seed=seed)
        counted = len(mine)  # one answer per prompt, in prompt order
        asked, texts = asked[:counted], gen.texts[:counted]
        if counted:
            rewards, _ = reward_scorer(asked, texts)
            costs = cost_scorer(asked, texts)[0] if cost_scorer else [0.0] * counted
            totals += torch.tensor([sum(rewards), sum(costs), float(sum(len(r) for r in gen.response_ids[:counted])),
                                    float(sum(gen.finished[:counted])), float(counted)], device=engine.device)
    totals = engine.reduce_sum(totals)
    n = max(float(totals[4]), 1.0)
    metrics = {"reward": float(totals[0]) / n, "response_length": float(totals[2]) / n, "finished": float(totals[3]) / n}
    if cost_scorer is not None:
        metrics["cost"] = float(totals[1]) / n
    return metrics

__all__ = ["score_held_out_prompts", "SequenceScorer", "RunningScoreStats"]
