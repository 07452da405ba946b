"""The benchmark harness's arithmetic (benchmarks/common.py): FLOPs and MFU, step rates after the warmup, the
alternating order, medians and ratios, the table, and the peak-RSS reading on /proc."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from humanalign.paths import PROJECT_ROOT


def _load_common():
    spec = importlib.util.spec_from_file_location("humanalign_bench_common", PROJECT_ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


common = _load_common()


def test_flops_per_token_and_mfu():
    # 6P to train every weight, 4P with a frozen base (LoRA), +2P for a reference forward
    assert common.flops_per_token(100) == 600
    assert common.flops_per_token(100, reference_forward=True) == 800
    assert common.flops_per_token(100, frozen_base=True, reference_forward=True) == 600
    # 50 tokens/s x 8e9 FLOPs/token = 4e11 FLOP/s against a 1000 GFLOP/s peak -> 40 %
    assert common.mfu(50, 8e9, 1000) == pytest.approx(0.4)
    assert common.mfu(50, 8e9, 0) == 0.0


def test_step_recorder_rates_leave_out_the_warmup(monkeypatch):
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(common.time, "process_time", lambda: clock["cpu"])
    recorder = common.StepRecorder(warmup=1)
    # step 1 (warmup): 100 tokens in 10 s; steps 2 and 3: 300 + 500 tokens in 2 s + 6 s wall, 1 s + 3 s CPU
    for tokens, wall, cpu in ((100, 10.0, 9.0), (300, 2.0, 1.0), (500, 6.0, 3.0)):
        recorder.batch(tokens // 2)
        recorder.batch(tokens - tokens // 2)  # two micro-batches
        clock["wall"] += wall
        clock["cpu"] += cpu
        recorder.step()
    out = recorder.summary()
    assert out["timed_steps"] == 2 and out["tokens"] == 800
    assert out["wall_seconds"] == pytest.approx(8.0) and out["cpu_seconds"] == pytest.approx(4.0)
    assert out["steps_per_second"] == pytest.approx(2 / 8)
    assert out["tokens_per_second"] == pytest.approx(800 / 8)  # 100 tokens/s
    assert out["tokens_per_cpu_second"] == pytest.approx(800 / 4)  # 200 tokens per CPU-second
    assert out["step_wall_seconds"] == pytest.approx([2.0, 6.0])
    with pytest.raises(RuntimeError, match="warmup"):
        common.StepRecorder(warmup=3).summary()


def test_alternating_order_and_summary():
    assert common.alternate(["ours", "trl"], 2) == [(0, "ours"), (0, "trl"), (1, "ours"), (1, "trl")]

    def run(variant, tokens_per_second, cpu_rate, peak, loss):
        return {"variant": variant, "steps_per_second": tokens_per_second / 100, "tokens_per_second": tokens_per_second,
                "tokens_per_cpu_second": cpu_rate, "peak_rss_mib": peak, "final_loss": loss, "mfu": 0.1,
                "tokens": 1000, "timed_steps": 10}

    runs = [run("ours", 300, 330, 900, 0.5), run("trl", 100, 200, 1000, 0.5),
            run("ours", 200, 310, 950, 0.5), run("trl", 140, 220, 1100, 0.5),
            run("ours", 250, 320, 920, 0.5), run("trl", 120, 210, 1050, 0.5)]
    rows = {r["variant"]: r for r in common.summarize(runs, baseline="trl")}
    ours, trl = rows["ours"], rows["trl"]
    assert ours["runs"] == 3 and ours["tokens_per_second"] == 250  # median of 300, 200, 250
    assert trl["tokens_per_second"] == 120 and trl["peak_rss_mib"] == 1100  # peak: the largest run
    assert ours["tokens_per_second_vs_trl"] == pytest.approx(250 / 120)
    assert ours["tokens_per_cpu_second_vs_trl"] == pytest.approx(320 / 210)
    assert ours["peak_rss_mib_vs_trl"] == pytest.approx(950 / 1100)
    assert trl["tokens_per_second_vs_trl"] == 1.0 and ours["tokens_per_step"] == 100
    table = common.format_table(list(rows.values()))
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| variant |")
    assert "| ours | 3 | 2.500 | 250.0 | 2.08 | 320.0 | 1.52 | 950 | 0.86 | 10.0% | 0.5000 |" in table


def test_peak_rss_reads_and_resets():
    before = common.peak_rss_mib()
    if before is None:
        pytest.skip("no /proc/self/status on this system")
    block = bytearray(64 * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page so that it is resident
        block[i] = 1
    assert common.peak_rss_mib() >= common.current_rss_mib() >= 60
    del block
    if common.reset_peak_rss():
        # after the reset the peak is the current size again, without the freed 64 MiB block
        assert common.peak_rss_mib() - common.current_rss_mib() < 16


def test_matmul_peak_is_measured():
    assert common.matmul_peak_gflops(size=128, repeats=2) > 0.01


def test_gpu_runs_add_peak_gpu_memory_columns():
    def run(variant, tokens_per_second, gpu_mib):
        return {"variant": variant, "steps_per_second": 1.0, "tokens_per_second": tokens_per_second,
                "tokens_per_cpu_second": tokens_per_second, "peak_rss_mib": 1000, "peak_gpu_mib": gpu_mib,
                "final_loss": 0.5, "mfu": 0.4, "tokens": 100, "timed_steps": 1}

    rows = common.summarize([run("ours", 300, 20000), run("trl", 200, 25000)], baseline="trl")
    assert rows[0]["peak_gpu_mib_vs_trl"] == pytest.approx(0.8)
    table = common.format_table(rows)
    assert "| peak GPU MiB | x trl | MFU |" in table.splitlines()[0]
    assert "| 20000 | 0.80 | 40.0% |" in table


def test_matmul_params_leave_out_an_untied_embedding_table():
    from humanalign.models.load import load_causal_lm
    from humanalign.models.score_model import load_score_model

    causal = load_causal_lm("tiny", trainable=False)  # tied: the table is the LM head's matmul
    assert common.matmul_params(causal) == sum(p.numel() for p in causal.parameters())
    score, _ = load_score_model("tiny")
    table = score.model.get_input_embeddings().weight.numel()
    assert common.matmul_params(score) == sum(p.numel() for p in score.parameters()) - table
