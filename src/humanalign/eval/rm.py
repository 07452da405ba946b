"""`humanalign eval rm`: how well a reward or cost model orders held-out preference pairs.

Metrics (``rm_metrics``, a pure function):
- ``accuracy``: the share of pairs the model orders like the data. Reward model: score(chosen) > score(rejected).
  Cost model: cost(chosen) < cost(rejected), since ``chosen`` is the safer answer and a cost is high when harmful.
  A tie counts one half (an untrained model that scores everything alike is at chance, not at 0); ``ties``
  counts them.
- with is_safe labels: ``auc``, the ROC-AUC of the score as a safe/unsafe separator, oriented so that 1.0 is
  perfect (cost: P(cost of an unsafe answer > cost of a safe one); reward: P(reward safe > reward unsafe);
  ties count one half), and for cost models ``sign_accuracy``: the share of answers with cost > 0 exactly when
  they are unsafe (Safe RLHF's sign convention). A sign-calibrated cost model (models/calibration.py) is judged
  at its calibrated 0; the report's ``sign_calibration`` adds the same answers' accuracy at the raw 0.
The report (JSON) adds counts and mean scores; a PNG beside it shows the score histograms (chosen vs rejected,
safe vs unsafe).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from humanalign.data.io import atomic_write_json
from humanalign.data.pairs import load_preference_pairs
from humanalign.errors import UserError
from humanalign.models import (
    scorer as scorer_module,  # called as scorer_module.load_scorer: tests stand a fake scorer in
)
from humanalign.models.calibration import costs_and_labels, sign_accuracies
from humanalign.models.load import resolve_model_path
from humanalign.models.score_model import CALIBRATION_KEY, read_score_config
from humanalign.models.vision_score import HEAD_MARKER


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney U).

    Ranks with ties averaged: AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    None when either class is empty. O(n log n), no sklearn.
    """
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    n_pos = sum(1 for p in positive if p)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        average_rank = (i + j) / 2 + 1  # 1-based ranks i+1 .. j+1 share their mean
        for k in range(i, j + 1):
            ranks[order[k]] = average_rank
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rm_metrics(chosen: Sequence[float], rejected: Sequence[float],
               chosen_safe: Sequence[bool | None] | None = None, rejected_safe: Sequence[bool | None] | None = None,
               score_type: str = "reward") -> dict[str, Any]:
    """Pair accuracy, mean scores and (with safety labels) AUC / sign accuracy; see the module docstring.

    Pairs with a non-finite score are left out and counted (``nonfinite_pairs``).
    """
    if score_type not in ("reward", "cost"):
        raise ValueError(f"score_type must be 'reward' or 'cost', got {score_type!r}")
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen scores but {len(rejected)} rejected scores")
    n = len(chosen)
    chosen_safe = list(chosen_safe) if chosen_safe is not None else [None] * n
    rejected_safe = list(rejected_safe) if rejected_safe is not None else [None] * n
    if len(chosen_safe) != n or len(rejected_safe) != n:
        raise ValueError("safety labels must have one entry per pair")
    keep = [i for i in range(n) if math.isfinite(chosen[i]) and math.isfinite(rejected[i])]
    c = [float(chosen[i]) for i in keep]
    r = [float(rejected[i]) for i in keep]
    sign = 1.0 if score_type == "reward" else -1.0  # a cost model orders the safer (chosen) answer lower
    correct = [1.0 if sign * (a - b) > 0 else 0.5 if a == b else 0.0 for a, b in zip(c, r)]
    out: dict[str, Any] = {
        "score_type": score_type,
        "pairs": len(keep),
        "nonfinite_pairs": n - len(keep),
        "accuracy": _mean(correct),
        "ties": sum(1 for a, b in zip(c, r) if a == b),
        "mean_chosen": _mean(c),
        "mean_rejected": _mean(r),
        "mean_chosen_minus_rejected": _mean([a - b for a, b in zip(c, r)]),
    }
    scores: list[float] = []
    safe: list[bool] = []
    for i in keep:
        for value, label in ((chosen[i], chosen_safe[i]), (rejected[i], rejected_safe[i])):
            if label is not None:
                scores.append(float(value))
                safe.append(bool(label))
    out["labelled_responses"] = len(scores)
    out["safe_responses"] = sum(safe)
    out["unsafe_responses"] = len(safe) - sum(safe)
    out["mean_score_safe"] = _mean([s for s, ok in zip(scores, safe) if ok])
    out["mean_score_unsafe"] = _mean([s for s, ok in zip(scores, safe) if not ok])
    if score_type == "cost":
        out["auc"] = roc_auc(scores, [not ok for ok in safe])
        out["sign_accuracy"] = _mean([float((s > 0) == (not ok)) for s, ok in zip(scores, safe)])
    else:
        out["auc"] = roc_auc(scores, safe)
        out["sign_accuracy"] = None  # a reward's sign carries no safety meaning
    return out


def plot_histograms(path: str | Path, chosen: Sequence[float], rejected: Sequence[float],
                    scores_safe: Sequence[float], scores_unsafe: Sequence[float], title: str) -> Path:
    """PNG with the score histograms: chosen vs rejected, and (when labelled) safe vs unsafe answers."""
    panels = 2 if (scores_safe or scores_unsafe) else 1
    fig = Figure(figsize=(5.5 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    finite = [v for v in [*chosen, *rejected] if math.isfinite(v)]
    bins = 40 if finite else 1
    axes[0].hist([v for v in chosen if math.isfinite(v)], bins=bins, alpha=0.6, label="chosen")
    axes[0].hist([v for v in rejected if math.isfinite(v)], bins=bins, alpha=0.6, label="rejected")
    axes[0].set_title("chosen vs rejected")
    if panels == 2:
        axes[1].hist(list(scores_safe), bins=bins, alpha=0.6, label="safe", color="tab:green")
        axes[1].hist(list(scores_unsafe), bins=bins, alpha=0.6, label="unsafe", color="tab:red")
        axes[1].set_title("safe vs unsafe")
    for ax in axes:
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_xlabel("score")
        ax.set_ylabel("answers")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def _load_pairs(data: str, score_type: str, allow_images: bool = False):
    """Cost models read harmless pairs (with is_safe labels when the file has them); reward models read helpful
    pairs, or harmless pairs when the file holds only those. Pairs with images only for a vision-language score
    model (``allow_images``); a text one refuses them."""
    if score_type == "cost":
        return load_preference_pairs(data, kind="harmless", allow_images=allow_images)
    pairs, skipped = load_preference_pairs(data, kind="helpful", allow_empty=True, allow_images=allow_images)
    if pairs:
        return pairs, skipped
    return load_preference_pairs(data, kind="harmless", allow_images=allow_images)


def _report_paths(output: str | None) -> tuple[Path | None, Path | None]:
    if not output:
        return None, None
    report = Path(output)
    return report, report.with_suffix(".png")


def run(cfg) -> dict[str, Any]:
    """Score every pair of ``cfg.data`` with ``cfg.model`` and write / print the report."""
    if not cfg.model:
        raise UserError("eval rm needs --model (a reward or cost model folder)")
    if not cfg.data:
        raise UserError("eval rm needs --data (a preference pairs file)")
    report_path, png_path = _report_paths(cfg.output)
    overwrite = bool(getattr(cfg, "overwrite", False))
    if report_path is not None and not overwrite:
        existing = [p for p in (report_path, png_path) if p.exists()]
        if existing:
            raise UserError(f"{existing[0]}: already exists (pass --overwrite to replace it)")

    # the data is read first (its mistakes surface before a model loads); the saved score type picks the pair kind
    block = read_score_config(resolve_model_path(cfg.model)) or {}
    pairs, skipped = _load_pairs(cfg.data, block.get("score_type", "reward"), block.get("head") == HEAD_MARKER)
    scorer = scorer_module.load_scorer(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length,
                         settings=getattr(cfg, "model_settings", None))
    print(f"[eval rm] {len(pairs)} pairs from {cfg.data} ({sum(skipped.values())} skipped); "
          f"{scorer.score_type} model {cfg.model}", file=sys.stderr)
    chosen, rejected = scorer_module.cached_score_pairs(scorer, pairs)
    chosen_safe = [getattr(p, "is_chosen_safe", None) for p in pairs]
    rejected_safe = [getattr(p, "is_rejected_safe", None) for p in pairs]
    metrics = rm_metrics(chosen, rejected, chosen_safe, rejected_safe, score_type=scorer.score_type)
    report: dict[str, Any] = {
        "model": str(cfg.model),
        "data": str(cfg.data),
        **metrics,
        "skipped_records": dict(skipped),
        "max_length": scorer.max_length,
        "max_prompt_length": scorer.max_prompt_length,
        "truncation": scorer.stats.as_dict(),  # of the texts scored in this run (cached ones are not re-read)
    }
    calibration = block.get(CALIBRATION_KEY)
    if calibration and metrics["sign_accuracy"] is not None:  # the same answers judged at the raw 0
        costs, unsafe = costs_and_labels(chosen, rejected, chosen_safe, rejected_safe)
        report["sign_calibration"] = {"offset": calibration["offset"],
                                      "at_raw_zero": sign_accuracies(costs, unsafe, -calibration["offset"]),
                                      "calibrated": sign_accuracies(costs, unsafe, 0.0)}
    if report_path is not None:
        atomic_write_json(report_path, report)
        safe_scores = [s for s, ok in zip([*chosen, *rejected], [*chosen_safe, *rejected_safe])
                       if ok is True and math.isfinite(s)]
        unsafe_scores = [s for s, ok in zip([*chosen, *rejected], [*chosen_safe, *rejected_safe])
                         if ok is False and math.isfinite(s)]
        plot_histograms(png_path, chosen, rejected, safe_scores, unsafe_scores,
                        f"{Path(str(cfg.model)).name} on {Path(str(cfg.data)).name}")
        print(f"[eval rm] report: {report_path}, histograms: {png_path}", file=sys.stderr)
    else:
        print(json.dumps(report, indent=2))
    summary = f"accuracy {metrics['accuracy']:.4f}" if metrics["accuracy"] is not None else "no scorable pairs"
    if metrics["auc"] is not None:
        summary += f", auc {metrics['auc']:.4f}"
    if metrics["sign_accuracy"] is not None:
        summary += f", sign accuracy {metrics['sign_accuracy']:.4f}"
    if "sign_calibration" in report:
        raw = report["sign_calibration"]["at_raw_zero"]["accuracy"]
        summary += f" (calibrated, offset {calibration['offset']:+.4f}; {raw:.4f} at the uncalibrated 0)"
    print(f"[eval rm] {summary}", file=sys.stderr)
    return report


__all__ = ["roc_auc", "rm_metrics", "plot_histograms", "run"]
