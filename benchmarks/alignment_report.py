"""The report of benchmarks/alignment_real.py: per-variant means with bootstrap intervals and seed ranges, the
paired difference of two variants, the constraint check (which J_c estimate keeps the policy's answers under the
threshold) and the plots (metrics, lambda's paths, J_c against the answers' cost, the helpful/harmless
trade-off). Pure functions of the runs' JSON (``runs/<variant>-s<seed>.json``)."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

METRICS = ("helpful_acc", "harmless_acc", "hh_acc", "refusal_rate", "mean_cost", "unsafe_rate", "kl")


def bootstrap(values: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def seed_average(runs: list[dict[str, Any]], key: str) -> list[float | None]:
    """Per item, the mean over seeds (None where any seed has no value)."""
    columns = [r["items"][key] for r in runs]
    return [None if any(v is None for v in vals) else statistics.fmean(vals) for vals in zip(*columns)]


def summarize(runs: dict[str, list[dict[str, Any]]], resamples: int, pairs: list[tuple[str, str]]
              ) -> dict[str, Any]:
    """Per variant and metric: the mean of the seed-averaged items, its bootstrap interval and the seeds'
    means; plus, for each (candidate, baseline) of ``pairs`` that both ran, ``candidate - baseline`` paired over
    the same items."""
    summary: dict[str, Any] = {}
    for variant, seeds in runs.items():
        row = {}
        for key in METRICS:
            per_item = [v for v in seed_average(seeds, key) if v is not None]
            per_seed = [statistics.fmean([v for v in r["items"][key] if v is not None]) for r in seeds
                        if any(v is not None for v in r["items"][key])]
            if not per_item:
                row[key] = None
                continue
            low, high = bootstrap(per_item, resamples)
            row[key] = {"mean": statistics.fmean(per_item), "ci95": [low, high], "items": len(per_item),
                        "seeds": per_seed, "seed_range": [min(per_seed), max(per_seed)]}
        row["lambda_final"] = [r["lambda_final"] for r in seeds]
        row["seconds_per_step"] = [r["seconds_per_step"] for r in seeds]
        summary[variant] = row
    for candidate, baseline in pairs:
        if baseline in runs and candidate in runs:
            summary[f"{candidate} - {baseline}"] = paired_difference(runs[candidate], runs[baseline], resamples)
    return summary


def paired_difference(candidate: list[dict[str, Any]], baseline: list[dict[str, Any]], resamples: int
                      ) -> dict[str, Any]:
    """Per metric, the mean over items of (candidate - baseline), each side averaged over its seeds first."""
    diff = {}
    for key in METRICS:
        a, b = seed_average(candidate, key), seed_average(baseline, key)
        paired = [x - y for x, y in zip(a, b) if x is not None and y is not None]
        if paired:
            diff[key] = {"mean": statistics.fmean(paired), "ci95": list(bootstrap(paired, resamples)),
                         "items": len(paired)}
    return diff


LABELS = {"helpful_acc": "helpful acc (held out)", "harmless_acc": "harmless acc (held out)",
          "hh_acc": "harmless acc (HH-RLHF, never trained on)", "refusal_rate": "refusal rate (BeaverTails)",
          "mean_cost": "mean cost of answers", "unsafe_rate": "unsafe rate (cost > 0)",
          "kl": "KL to reference (nats/answer)"}


def _cell(value: dict[str, Any] | None) -> str:
    if not value:
        return "-"
    text = f"{value['mean']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"
    if len(value.get("seeds", [])) > 1:
        text += f" (seeds {value['seed_range'][0]:.3f}..{value['seed_range'][1]:.3f})"
    return text


def markdown(summary: dict[str, Any], header: str) -> str:
    """The table of every variant, then each paired difference (the summary's "a - b" entries)."""
    lines = [header, "", "| variant | " + " | ".join(LABELS[k] for k in METRICS) + " | final lambda | s/step |",
             "|" + "---|" * (len(METRICS) + 3)]
    for variant, row in summary.items():
        if " - " in variant:
            continue
        lam = [v for v in row["lambda_final"] if v is not None]
        sec = [v for v in row["seconds_per_step"] if v is not None]
        cells = [_cell(row[k]) for k in METRICS]
        cells += [f"{statistics.fmean(lam):.3f}" if lam else "-", f"{statistics.fmean(sec):.2f}" if sec else "-"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    for diff_key in [k for k in summary if " - " in k]:
        lines += ["", f"Paired difference {diff_key} (mean over the same items, 95% bootstrap interval):", "",
                  "| metric | difference |", "|---|---|"]
        lines += [f"| {LABELS[k]} | {_cell(v)} |" for k, v in summary[diff_key].items()]
    return "\n".join(lines)


def plots(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]], folder: Path) -> list[Path]:
    """metrics.png: each metric's mean and interval per variant; lambda.png: lambda's path of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in summary if " - " not in v]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6))
    for ax, key in zip(axes, METRICS):
        for i, variant in enumerate(variants):
            value = summary[variant][key]
            if value:
                ax.errorbar([i], [value["mean"]], yerr=[[value["mean"] - value["ci95"][0]],
                                                        [value["ci95"][1] - value["mean"]]], fmt="o", capsize=3,
                            color=f"C{i}")  # one colour per variant on every panel
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=7)
        ax.set_title(LABELS[key], fontsize=8)
    fig.tight_layout()
    paths = [folder / "metrics.png", folder / "lambda.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, seeds in runs.items():
        for r in seeds:
            if r.get("lambda_path"):
                steps, values = zip(*r["lambda_path"])
                ax.plot(steps, values, label=f"{variant} s{r['seed']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lambda")
    if ax.lines:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def tradeoff_plot(summary: dict[str, Any], baseline: str, path: Path, harmless_gain: float = 0.15,
                  helpful_loss: float = 0.02) -> Path:
    """tradeoff.png: each variant's held-out harmless accuracy (x) against its helpful accuracy (y), the mean of
    the seed-averaged items with its bootstrap interval on both axes and each seed's mean as a small dot; the
    shaded corner is the target relative to ``baseline`` (harmless at least ``harmless_gain`` above it, helpful at
    most ``helpful_loss`` below it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    variants = [v for v in summary if " - " not in v]
    for i, variant in enumerate(variants):
        x, y = summary[variant].get("harmless_acc"), summary[variant].get("helpful_acc")
        if not x or not y:
            continue
        ax.errorbar([x["mean"]], [y["mean"]], xerr=[[x["mean"] - x["ci95"][0]], [x["ci95"][1] - x["mean"]]],
                    yerr=[[y["mean"] - y["ci95"][0]], [y["ci95"][1] - y["mean"]]], fmt="o", capsize=3,
                    color=f"C{i}", label=f"{variant} ({len(x['seeds'])} seed{'s' if len(x['seeds']) > 1 else ''})")
        if len(x["seeds"]) > 1:
            ax.scatter(x["seeds"], y["seeds"], s=10, color=f"C{i}", alpha=0.5)
    base = summary.get(baseline) or {}
    if base.get("harmless_acc") and base.get("helpful_acc"):
        corner = (base["harmless_acc"]["mean"] + harmless_gain, base["helpful_acc"]["mean"] - helpful_loss)
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        right, top = max(x1, corner[0] + 0.02), max(y1, corner[1] + 0.02)  # the corner stays in view
        ax.fill_between([corner[0], right], corner[1], top, color="green", alpha=0.1, lw=0,
                        label=f"target: harmless >= {baseline} + {harmless_gain:g}, helpful >= {baseline} "
                              f"- {helpful_loss:g}")
        ax.set_xlim(min(x0, corner[0]), right)
        ax.set_ylim(y0, top)
    ax.set_xlabel("harmless accuracy (held out)")
    ax.set_ylabel("helpful accuracy (held out)")
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- the constraint


def _late_mean(path: list[list[float]] | None, fraction: float = 0.2) -> float | None:
    """Mean of a [step, value] path over its last ``fraction`` of the steps."""
    if not path:
        return None
    last = max(step for step, _ in path)
    late = [value for step, value in path if step > last * (1 - fraction)]
    return statistics.fmean(late) if late else None


def answer_cost(run: dict[str, Any], resamples: int) -> tuple[float, float, float] | None:
    """The judge's mean cost of a run's final answers (one per evaluation prompt) and its bootstrap interval."""
    costs = [c for c in run["items"].get("mean_cost", []) if c is not None]
    if not costs:
        return None
    return (statistics.fmean(costs), *bootstrap(costs, resamples))


def constraint_table(runs: dict[str, list[dict[str, Any]]], d: float, estimates: dict[str, str],
                     resamples: int) -> str:
    """Does lambda follow what the policy writes? Per constrained run (the variants of ``estimates``, each
    mapped to its J_c estimate, pairwise or sampled): the J_c its lambda saw over the last fifth of the steps,
    lambda's end and peak, and the judge's mean cost of the final answers to the evaluation prompts (the cost the
    constraint is about), against d: "met" when the interval's top is <= d, "missed" when its bottom is > d."""
    lines = [f"Constraint check (d = {d:g}): the J_c each run's lambda followed, over the last fifth of its steps, "
             "against the judge's mean cost of its final answers (95% bootstrap interval over prompts):", "",
             "| variant | seed | J_c estimate | its J_c, last fifth | final lambda (peak) | answers' mean cost "
             "| answers under d? |", "|---|---|---|---|---|---|---|"]
    for variant, estimate in estimates.items():
        for run in sorted(runs.get(variant, []), key=lambda r: r["seed"]):
            late = _late_mean(run.get("expected_cost_path"))
            lam = run.get("lambda_path") or []
            peak = max(lam, key=lambda x: x[1]) if lam else None
            cost = answer_cost(run, resamples)
            verdict = "-" if cost is None else "met" if cost[2] <= d else "missed" if cost[1] > d else "undecided"
            lines.append(
                f"| {variant} | {run['seed']} | {estimate} | {'-' if late is None else f'{late:.3f}'} | "
                + (f"{lam[-1][1]:.2f} ({peak[1]:.2f} at step {peak[0]})" if lam else "-") + " | "
                + ("-" if cost is None else f"{cost[0]:.3f} [{cost[1]:.3f}, {cost[2]:.3f}]") + f" | {verdict} |")
    return "\n".join(lines)


def constraint_plot(runs: dict[str, list[dict[str, Any]]], d: float, estimates: dict[str, str], resamples: int,
                    path: Path) -> Path:
    """jc.png: each constrained run's J_c path (what its lambda saw) against d, and at its end the judge's mean
    cost of its final answers with the interval (the marker): a pairwise path under d with a marker above it is
    lambda letting go while the answers are still over the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colour = 0
    for variant, estimate in estimates.items():
        for run in sorted(runs.get(variant, []), key=lambda r: r["seed"]):
            jc = run.get("expected_cost_path")
            if not jc:
                continue
            steps, values = zip(*jc)
            ax.plot(steps, values, color=f"C{colour}", lw=0.8, alpha=0.8,
                    label=f"{variant} s{run['seed']} ({estimate} J_c)")
            cost = answer_cost(run, resamples)
            if cost:
                ax.errorbar([max(steps) * (1.02 + 0.015 * colour)], [cost[0]],
                            yerr=[[cost[0] - cost[1]], [cost[2] - cost[0]]], fmt="s", capsize=3,
                            color=f"C{colour}")
            colour += 1
    ax.axhline(d, color="black", ls="--", lw=1, label=f"d = {d:g}")
    ax.set_xlabel("optimizer step (squares: the final answers' mean cost by the judge)")
    ax.set_ylabel("J_c / cost")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
