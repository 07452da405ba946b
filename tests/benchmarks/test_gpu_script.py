"""benchmarks/gpu/run.sh --smoke: every section of the GPU script runs on the CPU with the tiny model and writes
real numbers (results.json) and the tables (results.md), so the one device call cannot fail on a plain bug."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from humanalign.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow  # a few minutes: fresh processes train the tiny model with both trainers


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_script_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "BUDGET_S": "900"}
    done = subprocess.run(["bash", str(PROJECT_ROOT / "benchmarks" / "gpu" / "run.sh"), "--smoke", str(out)],
                          env=env, capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    sections = results["sections"]
    assert results["smoke"] is True and "finished" in results
    assert set(sections) == {"env", "peak", "tests", "dpo", "rm", "safe_mm_dpo", "ppo_lag"}
    assert _positive(sections["peak"]["gflops"])
    # the gpu tests collect and skip without CUDA
    assert sections["tests"]["exit"] == 0 and sections["tests"]["counts"].get("skipped", 0) >= 20
    # smollm2-mini (a model folder at SmolLM2's vocabulary, as on the GPU) when .gpu_assets is there, else tiny
    shape = "smollm2-mini" if (PROJECT_ROOT / ".gpu_assets" / "smollm2-tokenizer").is_dir() else "tiny"
    for name in ("dpo", "rm"):
        rows = {r["variant"]: r for r in sections[name][shape]["summary"]}
        assert set(rows) == {"ours", "trl"}, name
        for row in rows.values():
            assert _positive(row["tokens_per_second"]) and _positive(row["mfu"]) and _positive(row["peak_rss_mib"])
        # the same batches: the two trainers' losses agree
        assert rows["ours"]["final_loss"] == pytest.approx(rows["trl"]["final_loss"], abs=1e-3), name
    safe = sections["safe_mm_dpo"]
    assert _positive(safe["dpo"]["seconds_per_step"]) and _positive(safe["safe-mm-dpo"]["seconds_per_step"])
    assert _positive(safe["safe_over_dpo_step_time"])
    ppo = sections["ppo_lag"]
    row = ppo["trainer"]["results"][0]
    assert _positive(row["generation_tokens_per_s"]) and _positive(row["update_tokens_per_s"])
    generation = {r["variant"]: r for r in ppo["generation"]["results"]}
    assert _positive(generation["dynamic"]["tokens_per_s"]) and _positive(generation["static"]["tokens_per_s"])
    table = (out / "results.md").read_text(encoding="utf-8")
    for heading in ("## tests", "## dpo", "## rm", "## safe_mm_dpo", "## ppo_lag"):
        assert heading in table
    assert "| ours |" in table and "| trl |" in table and "Safe-MM-DPO step / DPO step" in table
    assert (out / "run.log").stat().st_size > 0 and (out / "tests.log").stat().st_size > 0
