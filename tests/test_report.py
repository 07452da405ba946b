"""`humanalign report`: metric groups, one PNG per group, overlays of several runs, read back from the manifest."""

from __future__ import annotations

import json

import pytest

from humanalign.cli import main
from humanalign.errors import UserError
from humanalign.report import (
    draw_group,
    figure_groups,
    find_metrics_file,
    group_of,
    read_metrics,
    write_report,
)


def _write_run(folder, rows, tail: str = ""):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (folder / "metrics.jsonl").write_text(text)
    return folder


def _safe_dpo_rows(scale: float, steps: int = 10):
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": step / steps, "train/loss": scale / step, "train/lambda": 0.1 * step,
               "train/beta_ori": 0.1, "train/lr": 1e-4, "train/rewards/chosen": 0.2 * step,
               "train/kl": 0.01 * step, "train/grad_norm": 1.0}
        if step % 5 == 0:
            row["eval/loss"] = scale / step + 0.1
            row["eval/cost"] = -0.1 * step
        rows.append(row)
    return rows


@pytest.mark.parametrize(
    ("metric", "group"),
    [("train/loss", "loss"), ("eval/loss", "loss"), ("train/reward_loss", "loss"), ("train/lambda", "lambda"),
     ("train/λ", "lambda"), ("train/beta_ori", "beta"), ("train/lr", "lr"), ("train/learning_rate", "lr"),
     ("train/kl", "kl"), ("train/rewards/chosen", "reward"), ("eval/cost", "cost"), ("eval/accuracy", "accuracy"),
     ("train/rewards/accuracies", "accuracy"), ("train/grad_norm", "grad_norm"),
     ("train/entropy", "metric_train_entropy")],
)
def test_groups(metric, group):
    assert group_of(metric)[0] == group


def test_single_run_one_png_per_group(tmp_path):
    run = _write_run(tmp_path / "safe_dpo", _safe_dpo_rows(1.0), tail='{"step": 11, "train/lo')  # killed mid-line
    result = write_report([run])
    out = run / "report"
    assert result["html"] == out / "report.html"
    manifest = json.loads((out / "manifest.json").read_text())
    figures = {f["group"]: f for f in manifest["figures"]}
    # 9 metrics (epoch is bookkeeping) in 8 groups: train/loss and eval/loss share the loss figure.
    assert sorted(figures) == ["beta", "cost", "grad_norm", "kl", "lambda", "loss", "lr", "reward"]
    loss = {s["metric"]: s["points"] for s in figures["loss"]["series"]}
    assert loss == {"train/loss": 10, "eval/loss": 2}
    assert figures["lambda"]["series"] == [{"run": "safe_dpo", "metric": "train/lambda", "points": 10}]
    for f in result["figures"]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("<img ") == 8 and "train/lambda" in html
    final = {row["metric"]: row["safe_dpo"] for row in manifest["final_values"]}
    assert final["train/lambda"] == {"step": 10.0, "value": pytest.approx(1.0)}
    assert manifest["skipped"]["safe_dpo"]["truncated_last_line"] == 1


def test_several_runs_are_overlaid(tmp_path):
    a = _write_run(tmp_path / "a" / "dpo", _safe_dpo_rows(1.0))
    b = _write_run(tmp_path / "b" / "dpo", _safe_dpo_rows(2.0, steps=6))
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--output", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    loss = next(f for f in manifest["figures"] if f["group"] == "loss")
    # Two runs x (train/loss, eval/loss) = 4 lines; names made unique from the parent folders.
    assert sorted((s["run"], s["metric"], s["points"]) for s in loss["series"]) == [
        ("a/dpo", "eval/loss", 2), ("a/dpo", "train/loss", 10), ("b/dpo", "eval/loss", 1), ("b/dpo", "train/loss", 6)]
    # The drawn figure holds the same lines, labelled with the run names.
    runs = {"a/dpo": read_metrics(a / "metrics.jsonl")[0], "b/dpo": read_metrics(b / "metrics.jsonl")[0]}
    group = figure_groups(runs)["lambda"]
    fig = draw_group(group["title"], group["series"], runs, several_runs=True)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["a/dpo", "b/dpo"]  # one metric in the group: the run names
    assert [len(ln.get_xdata()) for ln in lines] == [10, 6]
    assert main(["report", str(a), str(b), "--output", str(out)]) == 2  # no overwrite without --overwrite
    assert main(["report", str(a), str(b), "--output", str(out), "--overwrite"]) == 0


def test_duplicate_steps_keep_the_last_value_and_bad_input(tmp_path):
    rows = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5},
            {"step": 3, "train/loss": float("nan")}, {"note": "no step"}]
    path = _write_run(tmp_path / "r", []) / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series, skipped = read_metrics(path)
    assert series == {"train/loss": [(1.0, 3.0), (2.0, 1.5)]}  # resumed run: step 2 logged again
    assert skipped == {"lines_without_step": 1, "nonfinite_values": 1, "truncated_last_line": 0}
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        write_report([tmp_path / "empty"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert main(["report", str(tmp_path / "bad")]) == 2


def test_metrics_in_a_separate_logging_dir_are_found_through_the_run_config(tmp_path, monkeypatch):
    """`--logging-dir logs/x` puts metrics.jsonl outside the run folder; the run's config.resolved.yaml says
    where (the CLI makes the path absolute), so `report RUN_DIR` finds them from any working directory."""
    logs = tmp_path / "logs" / "dpo"
    logs.mkdir(parents=True)
    (logs / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.9}\n{"step": 2, "train/loss": 0.5}\n')
    run = tmp_path / "models" / "dpo"
    run.mkdir(parents=True)
    (run / "config.resolved.yaml").write_text(f"output_dir: {run}\nlogging_dir: {logs}\n")
    monkeypatch.chdir(run)
    assert find_metrics_file(run) == logs / "metrics.jsonl"
    manifest = write_report([run])["data"]
    assert manifest["figures"][0]["series"] == [{"run": "dpo", "metric": "train/loss", "points": 2}]
    (run / "config.resolved.yaml").write_text("logging_dir: ../../logs/dpo\n")  # relative: from the run's parent
    monkeypatch.chdir(tmp_path / "logs")
    with pytest.raises(UserError, match="its metrics were logged to ../../logs/dpo"):
        find_metrics_file(run)
    (run / "config.resolved.yaml").write_text("logging_dir: logs/dpo\n")
    monkeypatch.chdir(tmp_path)
    assert find_metrics_file(run) == tmp_path / "logs" / "dpo" / "metrics.jsonl"
