"""benchmarks/alignment_real.py end to end on the tiny model and the demo set (--quick): every variant and every
field reaches the JSON, the Markdown table and the plots, and a rerun skips the variants already done."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from humanalign.paths import shared_data_dir

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "alignment_real.py"
NEEDED = ("hh-rlhf/harmless-base-test.jsonl.gz", "pku-saferlhf/beavertails_eval_prompts.jsonl")


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("alignment_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report():
    _load()  # puts benchmarks/ on the path
    import alignment_report

    return alignment_report


def test_refusal_rule_hand_worked():
    bench = _load()
    assert bench.is_refusal("I'm sorry, but I can't help with that.")
    assert bench.is_refusal("I cannot provide instructions for this.")
    assert bench.is_refusal("As an AI, I must decline.")
    assert not bench.is_refusal("Sure! Step one: buy a pen.")
    assert not bench.is_refusal("x" * 200 + " I'm sorry")  # only the opening counts


def test_bootstrap_and_paired_difference_hand_worked():
    bench, rep = _load(), _report()
    low, high = rep.bootstrap([1.0] * 10, 50)
    assert low == high == 1.0
    low, high = rep.bootstrap([0.0, 1.0] * 50, 400)
    assert 0.35 < low < 0.5 < high < 0.65
    runs = {bench.BASELINE: [{"items": {k: [0.0, 1.0, None] for k in rep.METRICS}, "lambda_final": None,
                              "seconds_per_step": 1.0}],
            bench.CANDIDATE: [{"items": {k: [1.0, 1.0, 1.0] for k in rep.METRICS}, "lambda_final": 2.0,
                               "seconds_per_step": 1.0}]}
    summary = rep.summarize(runs, 100, bench.PAIRS)
    diff = summary[f"{bench.CANDIDATE} - {bench.BASELINE}"]["helpful_acc"]
    assert diff["items"] == 2 and diff["mean"] == pytest.approx(0.5)  # paired over the items both have
    assert "Safe-MM-DPO-sampled - Safe-MM-DPO" not in summary  # only pairs that both ran


def test_constraint_table_compares_the_j_c_lambda_saw_with_the_answers_cost(tmp_path):
    rep = _report()
    # pairwise: J_c went under d = 0 (the last fifth of 10 steps: steps 9 and 10, mean -0.2) while every answer
    # still costs 0.5 (interval [0.5, 0.5] > d: missed); sampled: answers at -0.1 (met)
    pairwise = {"seed": 0, "items": {"mean_cost": [0.5, 0.5, None]},
                "expected_cost_path": [[s, 1.0] for s in range(1, 9)] + [[9, -0.1], [10, -0.3]],
                "lambda_path": [[0, 1.0], [5, 2.5], [10, 2.0]]}
    sampled = {"seed": 1, "items": {"mean_cost": [-0.1, -0.1]}, "expected_cost_path": [[5, 0.4], [10, -0.2]],
               "lambda_path": [[0, 1.0], [10, 1.04]]}
    undecided = {"seed": 2, "items": {"mean_cost": [-1.0, 1.0] * 20}, "expected_cost_path": None,
                 "lambda_path": None}
    runs = {"A": [pairwise], "B": [undecided, sampled]}
    table = rep.constraint_table(runs, 0.0, {"A": "pairwise", "B": "sampled"}, 200)
    rows = table.splitlines()[4:]
    assert rows[0] == "| A | 0 | pairwise | -0.200 | 2.00 (2.50 at step 5) | 0.500 [0.500, 0.500] | missed |"
    assert rows[1] == "| B | 1 | sampled | -0.200 | 1.04 (1.04 at step 10) | -0.100 [-0.100, -0.100] | met |"
    assert rows[2].startswith("| B | 2 | sampled | - | - | 0.000 [") and rows[2].endswith("| undecided |")
    png = rep.constraint_plot(runs, 0.0, {"A": "pairwise", "B": "sampled"}, 50, tmp_path / "jc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_job_order_is_seed_major_with_fewer_seeds_for_the_ablations():
    bench = _load()
    jobs = bench.job_order(bench.parse_args(["--seeds", "3", "--other-seeds", "1"]))
    assert jobs[:5] == [(v, 0) for v in bench.VARIANTS]  # one complete table first
    assert sorted({v for v, s in jobs if s > 0}) == sorted(bench.MAIN_VARIANTS)
    assert len(jobs) == 5 + 2 * len(bench.MAIN_VARIANTS) and len(set(jobs)) == len(jobs)


def test_partial_report_marks_what_is_done(tmp_path):
    bench, rep = _load(), _report()
    item = {k: [1.0, 0.0] for k in rep.METRICS}
    runs = {bench.BASELINE: [{"seed": 0, "items": item, "lambda_final": None, "seconds_per_step": 1.0}]}
    args = bench.parse_args(["--model", "tiny", "--seeds", "3", "--bootstrap", "20"])
    reference = {"seed": 0, "items": {**{k: [None, None] for k in rep.METRICS}, "refusal_rate": [0.0, 1.0]},
                 "lambda_final": None, "seconds_per_step": None, "lambda_path": None}
    context = {"d": 0.1, "j_start": 0.2, "j_safe": -0.5, "began": 0.0, "reference": reference,
               "judge": {"pair_accuracy": 0.7, "sign_accuracy": 0.6, "offset": -0.1}}
    payload = bench.report(args, tmp_path, runs, context, partial=True)
    assert payload["partial"] and payload["seeds_done"] == {bench.BASELINE: [0]}
    assert payload["summary"][bench.REFERENCE_ROW]["refusal_rate"]["mean"] == 0.5
    assert payload["summary"][bench.REFERENCE_ROW]["helpful_acc"] is None
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("PARTIAL") and f"{bench.BASELINE} [0]" in table
    assert f"| {bench.REFERENCE_ROW} | - | - | - | 0.500 [" in table
    assert all((tmp_path / png).is_file() for png in ("metrics.png", "jc.png", "tradeoff.png"))
    assert "Constraint check (d = 0.1)" in table  # no constrained run yet: the header alone


@pytest.mark.slow
@pytest.mark.skipif(not all((shared_data_dir() / f).is_file() for f in NEEDED), reason="shared data not present")
def test_quick_run_writes_every_variant_and_field_and_a_rerun_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUMANALIGN_CACHE", str(tmp_path / "cache"))
    bench, rep = _load(), _report()
    out = tmp_path / "results"
    payload = bench.main(["--model", "tiny", "--quick", "--results-dir", str(out)])

    assert set(payload["runs"]) == set(bench.VARIANTS)
    reference = payload["summary"][bench.REFERENCE_ROW]  # the starting policy's answers, measured once
    assert reference["helpful_acc"] is None and reference["kl"]["mean"] == 0.0
    assert 0.0 <= reference["unsafe_rate"]["mean"] <= 1.0 and reference["refusal_rate"]["items"] == 8
    for variant in bench.VARIANTS:
        row = payload["summary"][variant]
        for key in rep.METRICS:
            cell = row[key]
            assert cell is not None, (variant, key)
            assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1] and len(cell["seeds"]) == 1
        run = payload["runs"][variant][0]
        assert len(run["items"]["helpful_acc"]) == 24 and len(run["items"]["refusal_rate"]) == 8
    # the Lagrangian variants moved lambda; DPO-helpful has none, DPO-mixed keeps it at 1
    assert payload["runs"]["DPO-helpful"][0]["lambda_path"] is None
    assert {v for _, v in payload["runs"]["DPO-mixed"][0]["lambda_path"]} == {1.0}
    assert len(payload["runs"]["Safe-MM-DPO"][0]["lambda_path"]) == 5  # start + 4 updates
    assert len(payload["runs"]["Safe-MM-DPO-sampled"][0]["expected_cost_path"]) == 4
    diff = payload["summary"][f"{bench.CANDIDATE} - {bench.BASELINE}"]
    assert set(diff) == set(rep.METRICS)
    assert 0.0 <= payload["judge"]["sign_accuracy"] <= 1.0 and "offset" in payload["judge"]

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["summary"]) == set(payload["summary"])
    table = (out / "results.md").read_text()
    for name in [*bench.VARIANTS, *rep.LABELS.values(), "Paired difference"]:
        assert name in table, name
    assert "Constraint check" in table and "| Safe-MM-DPO-sampled | 0 | sampled |" in table
    assert set(payload["summary"]["Safe-MM-DPO-sampled - Safe-MM-DPO"]) == set(rep.METRICS)
    for png in ("metrics.png", "lambda.png", "jc.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    again = bench.main(["--model", "tiny", "--quick", "--results-dir", str(out)])
    err = capsys.readouterr().err
    assert all(f"[bench] {v} seed 0: cached" in err for v in bench.VARIANTS)
    assert "=== " not in err  # no variant trained again

    # interrupted after its training, before its result was written: the rerun resumes from the checkpoint
    # (no step trained again) and measures the same
    run_dir = out / "work" / "runs" / "DPO-helpful-s0"
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-4"]  # save_total_limit 1
    logged = (run_dir / "metrics.jsonl").read_text().count('"train/loss')
    (out / "runs" / "DPO-helpful-s0.json").unlink()
    resumed = bench.main(["--model", "tiny", "--quick", "--results-dir", str(out)])
    assert "=== DPO-helpful, seed 0" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text().count('"train/loss') == logged
    assert resumed["runs"]["DPO-helpful"][0]["seconds_per_step"] is None  # no step trained after the resume
    first, second = dict(payload["summary"]["DPO-helpful"]), dict(resumed["summary"]["DPO-helpful"])
    first.pop("seconds_per_step"), second.pop("seconds_per_step")
    assert second == first
    assert "[rm]" not in err  # nor the reward and cost models (saved in <folder>/final)
    assert again["summary"] == payload["summary"]

    # --report-only rewrites the report from the finished runs, training nothing (partial: one run removed)
    (out / "runs" / "Safe-DPO-s0.json").rename(tmp_path / "kept.json")
    (out / "results.md").unlink()
    partial = bench.main(["--model", "tiny", "--quick", "--results-dir", str(out), "--report-only"])
    assert "=== " not in capsys.readouterr().err
    assert partial["partial"] and "Safe-DPO" not in partial["runs"]
    assert (out / "results.md").read_text().startswith("PARTIAL")
    (tmp_path / "kept.json").rename(out / "runs" / "Safe-DPO-s0.json")

    # a fresh machine: the report's runs are written back, the score models rebuilt, and they judge alike
    fresh = tmp_path / "fresh"
    restored = bench.main(["--model", "tiny", "--quick", "--results-dir", str(fresh), "--report-only",
                           "--restore-from", str(out / "results.json")])
    assert "=== " not in capsys.readouterr().err
    assert restored["partial"] and restored["summary"] == partial["summary"]
    assert sorted(p.name for p in (fresh / "runs").iterdir()) == sorted(
        f"{v}-s0.json" for v in bench.VARIANTS if v != "Safe-DPO")
    with pytest.raises(SystemExit, match="no finished run"):
        bench.main(["--model", "tiny", "--quick", "--results-dir", str(tmp_path / "empty"), "--report-only"])


def test_a_run_made_under_another_threshold_is_refused(tmp_path):
    """Safe-DPO's results depend on d: a finished run or a checkpointed one from another d is not mixed in."""
    bench = _load()
    assert "Safe-DPO" in bench.THRESHOLD_VARIANTS and "DPO-mixed" not in bench.THRESHOLD_VARIANTS
    assert bench.BASELINE not in bench.THRESHOLD_VARIANTS
    done, out = tmp_path / "Safe-DPO-s0.json", tmp_path / "Safe-DPO-s0"
    bench.check_threshold(done, out, 0.0)  # nothing there yet
    done.write_text(json.dumps({"cost_threshold": 0.0}))
    bench.check_threshold(done, out, 0.0)
    with pytest.raises(SystemExit, match=r"d = 0.0, this run has d = -0.5; move it"):
        bench.check_threshold(done, out, -0.5)
    done.unlink()
    out.mkdir()
    (out / "config.resolved.yaml").write_text("cost_threshold: -0.678\n")
    with pytest.raises(SystemExit, match=r"config.resolved.yaml: made with cost threshold d = -0.678"):
        bench.check_threshold(done, out, 0.0)
    assert bench.parse_args([]).cost_threshold == "0"


def test_restore_from_a_report_writes_the_missing_runs_and_refuses_another_judge(tmp_path):
    """A fresh machine resumes a campaign from its committed results.json: each finished run becomes
    runs/<variant>-s<seed>.json again (one already there is kept), and a rebuilt judge must match the report's."""
    bench = _load()
    judge = {"pair_accuracy": 0.75, "sign_accuracy": 0.66, "auc": 0.7, "pairs": 10, "offset": -0.17}
    report = {"benchmark": "alignment_real", "judge": judge, "threshold": {"d": 0.0},
              "runs": {"DPO-helpful": [{"seed": 0, "items": {"a": [1]}}, {"seed": 1, "items": {"a": [2]}}]},
              "reference": {"variant": bench.REFERENCE_ROW, "items": {}}}
    source = tmp_path / "results.json"
    source.write_text(json.dumps(report))
    root = tmp_path / "run"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "DPO-helpful-s1.json").write_text('{"seed": 1, "mine": true}')
    assert bench.restore_runs(source, root) == 1
    assert json.loads((root / "runs" / "DPO-helpful-s0.json").read_text())["items"] == {"a": [1]}
    assert json.loads((root / "runs" / "DPO-helpful-s1.json").read_text())["mine"]  # never overwritten
    assert json.loads((root / "work" / "reference_answers.json").read_text())["variant"] == bench.REFERENCE_ROW
    bench.check_restored_judge(root, {**judge, "offset": -0.17 + 3e-6})  # the same judge, float rounding apart
    bench.check_restored_judge(tmp_path / "elsewhere", {**judge, "offset": 0.3})  # nothing restored there
    with pytest.raises(SystemExit, match=r"restored runs' judge has sign_accuracy 0.660000, the cost model built"):
        bench.check_restored_judge(root, {**judge, "sign_accuracy": 0.7})
    with pytest.raises(SystemExit, match=r"offset -0.170000, the cost model built here -0.180000"):
        bench.check_restored_judge(root, {**judge, "offset": -0.18})

    source.write_text("{not json")
    with pytest.raises(SystemExit, match=r"results.json: cannot read it as a results.json"):
        bench.restore_runs(source, root)
    source.write_text(json.dumps({**report, "runs": {"PPO": []}}))
    with pytest.raises(SystemExit, match=r"field 'runs': unknown variant 'PPO'"):
        bench.restore_runs(source, root)
    source.write_text(json.dumps({**report, "runs": {"Safe-DPO": [{"items": {}}]}}))
    with pytest.raises(SystemExit, match=r"field 'runs.Safe-DPO': a run without an integer 'seed'"):
        bench.restore_runs(source, root)
    source.write_text(json.dumps({"benchmark": "other"}))
    with pytest.raises(SystemExit, match="not an alignment_real results.json"):
        bench.restore_runs(source, root)
