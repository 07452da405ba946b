"""Safe-MM-DPO's margins, computed once before training (docs/algorithms/safe_mm_dpo.md, section 1).

Every pair is scored with the score models (``models.scorer``, cached on disk): the Helpful-RM gives
delta_h = R(y_w) - R(y_l), the cost model delta_s = C(y_l) - C(y_w) and the costs C(y_w), C(y_l) that the
expected cost J_c needs; both margins are positive when the model agrees with the label. ``attach_margins``
attaches them to the tokenised datasets as per-pair fields (``data.joint_pairs``: ``delta``, ``cost_chosen``,
``cost_rejected``, ``has_cost``) that travel into every batch. Without a model: delta = 0 (beta = beta_ori) and,
for harmless pairs, costs from the is_safe labels (-1 safe, +1 unsafe). The training margins' statistics are
reported, with a warning when their distribution is degenerate (``degenerate_margins``) and when the cost
model's signs contradict the labels.

How the models are loaded and run (which device, which process scores first) is the trainer's business: it
passes ``attach_margins`` a ``score`` function, and a ``say`` function for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from humanalign.data.joint_pairs import COST_CHOSEN, COST_REJECTED, DELTA, HARMLESS, HAS_COST, HELPFUL
from humanalign.data.preference_dataset import PairDataset
from humanalign.data.records import HarmlessPair
from humanalign.losses.safe_mm_dpo import margin_scaled_beta
from humanalign.models.scorer import Scorer, VisionScorer

LABEL_COST = 1.0  # cost of a labelled unsafe response when no cost model is given (-1 for a safe one)

# score(model path, datasets, expected score type) -> ([(chosen scores, rejected scores) per dataset], scorer)
ScorePairs = Callable[[str, Sequence[PairDataset], str], tuple[list[tuple[list[float], list[float]]], Scorer]]
Say = Callable[[str], None]


def margin_summary(delta: Sequence[float], k: float) -> dict[str, float]:
    """Statistics of a margin distribution, with the shares that make MM-DPO's beta degenerate."""
    values = np.asarray(delta, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"n": int(values.size), "nonfinite": int(values.size)}
    p05, median, p95 = np.percentile(finite, [5, 50, 95])
    return {
        "n": int(values.size), "nonfinite": int(values.size - finite.size),
        "mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()), "p05": float(p05),
        "median": float(median), "p95": float(p95), "max": float(finite.max()),
        "positive": float((finite > 0).mean()),
        "near_zero": float((np.abs(finite) < 1e-3).mean()),
        # k * delta > 5: beta within 1% of its cap (1 - e^-5 = 0.993)
        "saturated": float((k * finite > 5).mean()),
    }


def degenerate_margins(summary: Mapping[str, float]) -> list[str]:
    """Why a margin distribution makes the per-pair beta meaningless (empty when it is fine)."""
    problems = []
    if summary.get("nonfinite"):
        problems.append(f"{summary['nonfinite']} margins are NaN or infinite")
    if "mean" not in summary:
        return problems
    if summary["near_zero"] >= 0.95:
        problems.append(f"{summary['near_zero']:.0%} of margins are within 1e-3 of 0, so beta = beta_ori almost "
                        "everywhere (MM-DPO reduces to DPO): is the reward model trained?")
    if summary["saturated"] >= 0.95:
        problems.append(f"{summary['saturated']:.0%} of margins are extreme (k * delta > 5), so beta = (1 + w) * "
                        "beta_ori almost everywhere: lower k, or normalise the scores")
    if summary["n"] >= 10 and summary["positive"] < 0.5 and summary["near_zero"] < 0.95:
        problems.append(f"only {summary['positive']:.0%} of margins are positive: the model disagrees with most "
                        "labels (a wrong or swapped model path?)")
    return problems


def format_summary(summary: Mapping[str, float]) -> str:
    if "mean" not in summary:
        return f"n {summary['n']}, all non-finite"
    return (f"n {summary['n']}, mean {summary['mean']:.4g}, std {summary['std']:.4g}, min {summary['min']:.4g}, "
            f"p5 {summary['p05']:.4g}, median {summary['median']:.4g}, p95 {summary['p95']:.4g}, "
            f"max {summary['max']:.4g}, positive {summary['positive']:.1%}")


def label_costs(pairs: Sequence[Any]) -> tuple[list[float], list[float], list[float]]:
    """Costs from is_safe labels when no cost model is given: -1 safe, +1 unsafe (cost > 0 means unsafe);
    (cost_chosen, cost_rejected, has_cost), has_cost 0 for a pair without both labels."""
    chosen, rejected, has = [], [], []
    for pair in pairs:
        labels = (getattr(pair, "is_chosen_safe", None), getattr(pair, "is_rejected_safe", None))
        known = isinstance(pair, HarmlessPair) and None not in labels
        chosen.append(-LABEL_COST if labels[0] else LABEL_COST if known else 0.0)
        rejected.append(-LABEL_COST if labels[1] else LABEL_COST if known else 0.0)
        has.append(1.0 if known else 0.0)
    return chosen, rejected, has


def cost_sign_accuracy(pairs: Sequence[Any], chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    """Share of labelled responses whose cost has the label's sign (safe <= 0 < unsafe); None without labels."""
    right = total = 0
    for pair, c_w, c_l in zip(pairs, chosen, rejected):
        for safe, cost in ((getattr(pair, "is_chosen_safe", None), c_w), (getattr(pair, "is_rejected_safe", None), c_l)):
            if safe is not None:
                total += 1
                right += int((cost <= 0) == bool(safe))
    return right / total if total else None


def attach_margins(cfg, streams: Mapping[str, Mapping[str, PairDataset | None]], score: ScorePairs, say: Say):
    """Score every pair once and attach ``delta`` (and, to harmless pairs, ``cost_chosen`` / ``cost_rejected``
    / ``has_cost``) to the datasets; report the training margins (validation ones when a stream is evaluated
    only) and warn when their distribution is degenerate.

    ``streams``: {"helpful": {"train": ds, "val": ds}, "harmless": {...}} (None entries ignored). ``score``
    scores every pair of a list of datasets with one model (see ``ScorePairs``); ``say`` prints a line.
    Returns (summary for the run summary, the cost scorer when ``expected_cost: sampled`` needs it, else None).
    """
    summary: dict[str, Any] = {}
    keep_scorer = None
    for stream, model_path, expected in ((HELPFUL, cfg.helpful_rm_path, "reward"),
                                         (HARMLESS, cfg.harmless_rm_path, "cost")):
        named = [(split, d) for split, d in streams.get(stream, {}).items() if d is not None]
        if not named:
            continue
        datasets = [d for _, d in named]
        if model_path:
            scores, scorer = score(model_path, datasets, expected)
            # text scores are cached per model and text; image pairs are scored afresh (models/scorer.py)
            cache = "image pairs: not cached" if isinstance(scorer, VisionScorer) else "cached on disk"
            say(f"[margins] scored {sum(len(d) for d in datasets)} {stream} pairs with {model_path} ({cache})")
            if stream == HARMLESS and cfg.use_harmless_stream and cfg.expected_cost == "sampled":
                keep_scorer = scorer
            del scorer
        for i, (split, dataset) in enumerate(named):
            if model_path:
                chosen, rejected = scores[i]
            elif stream == HARMLESS:
                chosen, rejected, _ = label_costs(dataset.pairs)
            else:
                chosen, rejected = [0.0] * len(dataset), [0.0] * len(dataset)
            if not model_path:
                delta = [0.0] * len(dataset)
            elif stream == HELPFUL:  # delta_h = R(y_w) - R(y_l): how much more helpful the chosen answer is
                delta = [w - lo for w, lo in zip(chosen, rejected)]
            else:  # delta_s = C(y_l) - C(y_w): how much more costly (unsafe) the rejected answer is
                delta = [lo - w for w, lo in zip(chosen, rejected)]
            if stream == HARMLESS:
                has = [1.0] * len(dataset) if model_path else label_costs(dataset.pairs)[2]
                dataset.add_field(COST_CHOSEN, chosen)
                dataset.add_field(COST_REJECTED, rejected)
                dataset.add_field(HAS_COST, has)
            dataset.add_field(DELTA, delta)
            if i == 0:
                summary[stream] = {"split": split, **_report_margins(cfg, say, stream, split, model_path,
                                                                     dataset, chosen, rejected, delta)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary, keep_scorer


def expected_cost_range(cost_chosen: Sequence[float], cost_rejected: Sequence[float],
                        has_cost: Sequence[float] | None = None) -> tuple[float, float] | None:
    """(J_c of the starting policy, J_c of a policy that always picks the safer answer) on harmless pairs with
    costs: at the start h = 0, p = 1/2 and J = (C(y_w) + C(y_l)) / 2; always safer, J = C(y_w). A threshold d
    between the two binds at the start and can be met by learning the safety ordering. None without costs."""
    keep = [i for i in range(len(cost_chosen)) if has_cost is None or has_cost[i] > 0]
    if not keep:
        return None
    start = float(np.mean([(cost_chosen[i] + cost_rejected[i]) / 2 for i in keep]))
    return start, float(np.mean([cost_chosen[i] for i in keep]))


def _report_range(cfg, say: Say, chosen, rejected, has, split) -> dict[str, float]:
    found = expected_cost_range(chosen, rejected, has)
    if found is None:
        return {}
    start, safer = found
    d = cfg.cost_threshold
    where = "" if split == "train" else f" ({split} pairs)"
    if split != "train" or not (cfg.use_harmless_stream and cfg.update_lambda):
        # Only the training pairs drive the dual update, and only when there is one: no outlook for lambda here.
        say(f"[margins] harmless{where}: J_c is {start:.4g} at the start (p = 1/2) and {safer:.4g} for a "
                     f"policy that always prefers the safer answer (d = {d:g})")
        return {"expected_cost_start": start, "expected_cost_always_safer": safer}
    if safer > d:
        outlook = "below every J_c that ranking can reach: the constraint cannot be met, lambda will rise to lambda_max"
    elif start > d:
        outlook = "below the start: the constraint is violated at first, so lambda rises until the policy meets it"
    else:
        outlook = "at or above the start: the constraint holds from the first step, so lambda falls"
    say(f"[margins] harmless: J_c is {start:.4g} at the start (p = 1/2) and {safer:.4g} for a policy that "
                 f"always prefers the safer answer; d = {d:g} is {outlook}")
    return {"expected_cost_start": start, "expected_cost_always_safer": safer}


def _report_margins(cfg, say: Say, stream, split, model_path, dataset, chosen, rejected, delta) -> dict[str, Any]:
    name = ("delta_h" if stream == HELPFUL else "delta_s") + ("" if split == "train" else f" ({split})")
    if not model_path:
        what = "costs from is_safe labels (-1 safe, +1 unsafe)" if stream == HARMLESS else "no scores"
        say(f"[margins] {stream}: no {'reward' if stream == HELPFUL else 'cost'} model, so {name} = 0 and "
                     f"beta = beta_ori for every pair; {what}")
        out: dict[str, Any] = {"model": None}
        if stream == HARMLESS:
            has = label_costs(dataset.pairs)[2]
            labelled = int(sum(has))
            out["pairs_with_costs"] = labelled
            out.update(_report_range(cfg, say, chosen, rejected, has, split))
            if labelled < len(dataset):
                say(f"[margins] warning: {len(dataset) - labelled} of {len(dataset)} harmless pairs have no "
                             "is_safe labels and no cost model: they do not count in the expected cost")
        return out
    stats = margin_summary(delta, cfg.k)
    beta = margin_scaled_beta(torch.tensor(delta, dtype=torch.float64).nan_to_num(0.0), cfg.beta_ori, cfg.w, cfg.k)
    say(f"[margins] {stream} {name}: {format_summary(stats)}; beta mean {float(beta.mean()):.4g} "
                 f"(range {cfg.beta_ori:g}..{(1 + cfg.w) * cfg.beta_ori:g})")
    for problem in degenerate_margins(stats):
        say(f"[margins] warning: {stream} margins look degenerate: {problem}")
    out = {"model": model_path, "margins": stats, "beta_mean": float(beta.mean())}
    if stream == HARMLESS:
        out.update(_report_range(cfg, say, chosen, rejected, None, split))
        sign = cost_sign_accuracy(dataset.pairs, chosen, rejected)
        out["cost_sign_accuracy"] = sign
        if sign is not None:
            say(f"[margins] harmless: {sign:.1%} of labelled responses have a cost of the label's sign "
                         "(safe <= 0 < unsafe)")
            if sign < 0.5:
                say("[margins] warning: the cost model's signs mostly contradict the is_safe labels "
                             "(a reward model given as harmless_rm_path?)")
    return out


__all__ = ["LABEL_COST", "ScorePairs", "margin_summary", "degenerate_margins", "format_summary", "label_costs",
           "cost_sign_accuracy", "expected_cost_range", "attach_margins"]
