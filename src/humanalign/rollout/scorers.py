"""Scores of sampled answers: a score model on the decoded text, a Python function, or their sum; and the
running reward statistics that ``normalize_reward`` divides by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

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


__all__ = ["SequenceScorer", "RunningScoreStats"]
