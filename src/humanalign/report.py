"""`humanalign report RUN_DIR [RUN_DIR ...] [--output DIR] [--overwrite]`: curves of one run or several, overlaid.

Reads each run's ``metrics.jsonl`` (one JSON object per line: ``"step"`` plus metric names such as
``train/loss``, ``eval/loss``, ``train/lambda``) and draws **one PNG per group of related metrics**: losses,
Lagrange multiplier (lambda), betas, rewards, costs, KL, learning rate, accuracy, gradient norm; every other
metric gets a figure of its own. Within a figure there is one line per (run, metric); with several runs the
legend names the run. ``report.html`` shows the figures and a table of each metric's final value per run;
``manifest.json`` lists every figure's series with their point counts (what the tests read back).

A step logged twice (a run resumed from a checkpoint logs the steps after it again) keeps its last value.
Non-finite values are left out of the curves and counted in the manifest.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from humanalign.data.io import publish_dir
from humanalign.errors import RecordError, UserError

RESOLVED_CONFIG = "config.resolved.yaml"  # written into every run folder by the engine (engine.checkpoint)
BOOKKEEPING = {"step", "epoch", "time", "timestamp", "wall_time", "elapsed", "global_step"}

# (group, title, test on the name's tokens); the first group that matches wins, so "train/reward_loss" is a loss
# and "train/kl_coef" a KL curve.
GROUPS: list[tuple[str, str, Any]] = [
    ("lambda", "Lagrange multiplier (lambda)", lambda t: bool({"lambda", "λ", "lagrange"} & t)),
    ("beta", "betas", lambda t: any(x.startswith(("beta", "β")) for x in t)),
    ("lr", "learning rate", lambda t: "lr" in t or {"learning", "rate"} <= t or "learning_rate" in t),
    ("kl", "KL divergence", lambda t: "kl" in t),
    ("loss", "losses", lambda t: any(x.startswith("loss") for x in t)),
    ("accuracy", "accuracy", lambda t: any(x.startswith("acc") for x in t)),
    ("reward", "rewards", lambda t: any(x.startswith("reward") for x in t)),
    ("cost", "costs", lambda t: any(x.startswith("cost") for x in t)),
    ("grad_norm", "gradient norm", lambda t: "grad" in t and "norm" in t),
]

Series = dict[str, list[tuple[float, float]]]  # metric -> [(step, value)] sorted by step


def _tokens(metric: str) -> set[str]:
    return {t for t in re.split(r"[/_.\-\s]+", metric.lower()) if t}


def group_of(metric: str) -> tuple[str, str]:
    """(file stem, title) of the figure a metric is drawn in."""
    tokens = _tokens(metric)
    if metric.lower().endswith(("_updates", "_count", "_counts")):  # a counter is not the quantity it counts
        return "metric_" + re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_"), metric
    for name, title, test in GROUPS:
        if test(tokens):
            return name, title
    return "metric_" + re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_"), metric


def _logged_elsewhere(run: Path) -> Path | None:
    """The metrics file of a run trained with ``logging_dir``: the run's config.resolved.yaml records where
    (an absolute path since the CLI resolves it; a relative one is tried from here and from the run's parent)."""
    config = run / RESOLVED_CONFIG
    if not config.is_file():
        return None
    try:
        logging_dir = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("logging_dir")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(logging_dir, str) or not logging_dir:
        return None
    for base in (Path.cwd(), run.parent):
        candidate = base / logging_dir / "metrics.jsonl"
        if candidate.is_file():
            return candidate
    raise UserError(f"{run}: its metrics were logged to {logging_dir} ({config}: logging_dir), "
                    "which holds no metrics.jsonl")


def find_metrics_file(run: str | Path) -> Path:
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    direct = run / "metrics.jsonl"
    if direct.is_file():
        return direct
    elsewhere = _logged_elsewhere(run)
    if elsewhere is not None:
        return elsewhere
    found = sorted(run.glob("*/metrics.jsonl"))  # e.g. a separate logging_dir inside the run
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{run}: several metrics.jsonl files ({', '.join(str(f) for f in found)}); name one")
    raise UserError(f"{run}: no metrics.jsonl (is this a run folder?)")


def read_metrics(path: str | Path) -> tuple[Series, dict[str, int]]:
    """metric -> [(step, value)] and counts of what was left out (lines without step, non-finite values)."""
    path = Path(path)
    by_metric: dict[str, dict[float, float]] = {}
    skipped = {"lines_without_step": 0, "nonfinite_values": 0, "truncated_last_line": 0}
    lines = path.read_bytes().split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if line_no == len(lines):  # the run was killed while writing its last line
                skipped["truncated_last_line"] = 1
                continue
            raise RecordError(path, line_no, None, "malformed JSON") from None
        if not isinstance(obj, dict):
            raise RecordError(path, line_no, None, "expected a JSON object")
        step = obj.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            skipped["lines_without_step"] += 1
            continue
        for key, value in obj.items():
            if key in BOOKKEEPING or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                skipped["nonfinite_values"] += 1
                continue
            by_metric.setdefault(key, {})[float(step)] = float(value)
    series = {m: sorted(points.items()) for m, points in sorted(by_metric.items())}
    return series, skipped


def run_names(paths: Sequence[str | Path]) -> list[str]:
    """Folder names, made longer (parent/name) where two runs would share one."""
    resolved = [Path(p).resolve() for p in paths]
    resolved = [p.parent if p.is_file() else p for p in resolved]
    names = [p.name for p in resolved]
    depth = 1
    while len(set(names)) < len(names) and depth < 6:
        depth += 1
        names = ["/".join(p.parts[-depth:]) for p in resolved]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    return names


def figure_groups(runs: dict[str, Series]) -> dict[str, dict[str, Any]]:
    """group stem -> {"title", "series": [(run, metric)]} in a stable order (groups as in GROUPS, then others)."""
    order = {name: i for i, (name, _, _) in enumerate(GROUPS)}
    groups: dict[str, dict[str, Any]] = {}
    for run, series in runs.items():
        for metric in series:
            stem, title = group_of(metric)
            groups.setdefault(stem, {"title": title, "series": []})["series"].append((run, metric))
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def draw_group(title: str, members: list[tuple[str, str]], runs: dict[str, Series], several_runs: bool):
    """One figure: a line per (run, metric). Returns the matplotlib Figure."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    metrics_in_group = sorted({m for _, m in members})
    run_order = list(runs)
    styles = ["-", "--", ":", "-."]
    for run, metric in members:
        points = runs[run][metric]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if several_runs:  # colour = run, line style = metric, so that runs compare at a glance
            label = run if len(metrics_in_group) == 1 else f"{run}: {metric}"
            color = f"C{run_order.index(run) % 10}"
            style = styles[metrics_in_group.index(metric) % len(styles)]
        else:
            label, color, style = metric, f"C{metrics_in_group.index(metric) % 10}", "-"
        ax.plot(xs, ys, label=label, color=color, linestyle=style, marker="o" if len(points) <= 25 else None,
                markersize=3, linewidth=1.4)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _final_table(runs: dict[str, Series]) -> list[dict[str, Any]]:
    metrics = sorted({m for s in runs.values() for m in s})
    table = []
    for metric in metrics:
        row: dict[str, Any] = {"metric": metric}
        for run, series in runs.items():
            pts = series.get(metric)
            row[run] = {"step": pts[-1][0], "value": pts[-1][1]} if pts else None
        table.append(row)
    return table


def _html(runs: dict[str, Series], sources: dict[str, str], figures: list[dict[str, Any]],
          table: list[dict[str, Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(r)}</th>" for r in runs)
    body = []
    for row in table:
        cells = []
        for run in runs:
            cell = row[run]
            cells.append("<td>–</td>" if cell is None else
                         f"<td>{cell['value']:.6g} <span class='step'>(step {cell['step']:g})</span></td>")
        body.append(f"<tr><td><code>{esc(row['metric'])}</code></td>{''.join(cells)}</tr>")
    runs_list = "".join(f"<li><b>{esc(n)}</b>: <code>{esc(p)}</code></li>" for n, p in sources.items())
    figs = "".join(
        f"<figure><img src='{esc(f['file'])}' alt='{esc(f['title'])}'><figcaption>{esc(f['title'])}: "
        f"{esc(', '.join(sorted({s['metric'] for s in f['series']})))}</figcaption></figure>" for f in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>humanalign report: {esc(', '.join(runs))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
.step {{ color: #888; font-size: 85%; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 760px; }}
</style></head><body>
<h1>Training report</h1>
<ul>{runs_list}</ul>
<h2>Final values</h2>
<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>
<h2>Curves</h2>
{figs}
</body></html>
"""


def draw_report(runs: dict[str, Series], out_dir: str | Path, sources: dict[str, str] | None = None,
                skipped: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """Write one PNG per metric group, report.html and manifest.json into ``out_dir``; return the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    several = len(runs) > 1
    figures: list[dict[str, Any]] = []
    for stem, group in figure_groups(runs).items():
        fig = draw_group(group["title"], group["series"], runs, several)
        fig.savefig(out_dir / f"{stem}.png", dpi=100)
        figures.append({
            "file": f"{stem}.png", "group": stem, "title": group["title"],
            "series": [{"run": r, "metric": m, "points": len(runs[r][m])} for r, m in group["series"]],
        })
    table = _final_table(runs)
    sources = sources or {r: r for r in runs}
    (out_dir / "report.html").write_text(_html(runs, sources, figures, table), encoding="utf-8")
    manifest = {"runs": sources, "figures": figures, "final_values": table, "skipped": skipped or {}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Read the runs, draw the report into ``output`` (atomically) and return its paths and manifest."""
    if not run_dirs:
        raise UserError("usage: humanalign report RUN_DIR [RUN_DIR ...] [--output DIR] [--overwrite]")
    files = [find_metrics_file(r) for r in run_dirs]
    names = run_names(run_dirs)
    if output is None:
        first = Path(run_dirs[0])
        first = first.parent if first.is_file() else first
        output = first / "report" if len(run_dirs) == 1 else Path("reports") / "-vs-".join(
            re.sub(r"[^A-Za-z0-9._-]+", "_", n) for n in names)
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")
    runs: dict[str, Series] = {}
    skipped: dict[str, dict[str, int]] = {}
    for name, path in zip(names, files):
        runs[name], skipped[name] = read_metrics(path)
        if not runs[name]:
            raise UserError(f"{path}: no numeric metrics with a step")
        for what, count in skipped[name].items():
            if count:
                print(f"[humanalign] {path}: {count} {what.replace('_', ' ')} left out")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is for sharing
    try:
        manifest = draw_report(runs, tmp, {n: str(f) for n, f in zip(names, files)}, skipped)
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "html": output / "report.html",
        "manifest": output / "manifest.json",
        "figures": [output / f["file"] for f in manifest["figures"]],
        "data": manifest,
    }


def run_cli(positionals: list[str], **flags: Any) -> int:
    allowed = {"output", "overwrite"}
    unknown = set(flags) - allowed
    if unknown:
        raise UserError(f"report: unknown flag --{sorted(unknown)[0].replace('_', '-')} (use --output, --overwrite)")
    output = flags.get("output")
    result = write_report(positionals, str(output) if output not in (None, True) else None,
                          bool(flags.get("overwrite", False)))
    for fig in result["figures"]:
        print(fig)
    print(result["html"])
    return 0
