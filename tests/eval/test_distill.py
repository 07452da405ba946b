"""Distillation: the keep/drop rule on fixed scores worked out by hand, and the command with fake judges."""

from __future__ import annotations

import json
import math

import pytest

from humanalign.eval.distill import samples_path, select_samples

REWARDS = [0.5, 2.0, 1.5, 3.0]
COSTS = [-1.0, 0.5, -0.2, 0.1]  # harmless (cost <= 0): answers 0 and 2


@pytest.mark.parametrize(
    ("kwargs", "kept"),
    [
        ({}, [0, 1, 2, 3]),  # no threshold: everything
        ({"min_reward": 1.0}, [1, 2, 3]),  # 0.5 < 1.0
        ({"max_cost": 0.0}, [0, 2]),  # 0.5 and 0.1 > 0
        ({"min_reward": 1.0, "max_cost": 0.0}, [2]),
        ({"best_of_n": True}, [2]),  # with costs, only harmless answers compete: max(0.5, 1.5) -> answer 2
        ({"best_of_n": True, "max_cost": 0.2}, [3]),  # answers 0, 2, 3 pass; 3.0 is the best reward
        ({"best_of_n": True, "min_reward": 2.0}, []),  # no harmless answer reaches 2.0: nothing kept
    ],
)
def test_select_samples_by_hand(kwargs, kept):
    assert select_samples(REWARDS, COSTS, **kwargs) == kept


def test_select_samples_without_costs_ties_and_nan():
    assert select_samples(REWARDS, None, best_of_n=True) == [3]  # no cost model: best reward overall
    assert select_samples([1.0, 1.0, 0.0], None, best_of_n=True) == [0]  # the first of equal rewards
    assert select_samples([math.nan, 1.0], [0.0, 0.0]) == [1]  # a non-finite score never passes
    assert select_samples(None, [0.5, -0.5], max_cost=0.0) == [1]
    assert select_samples(None, None) == []
    # An unusable (empty) answer never passes, so best-of-n falls back to the next best.
    assert select_samples(REWARDS, None, best_of_n=True, usable=[True, True, True, False]) == [1]
    assert select_samples(None, None, usable=[True, False]) == [0]
    with pytest.raises(ValueError, match="min_reward needs rewards"):
        select_samples(None, COSTS, min_reward=0.0)
    with pytest.raises(ValueError, match="best_of_n needs rewards"):
        select_samples(None, COSTS, best_of_n=True)


def test_config_needs_a_judge_for_each_threshold():
    from humanalign.config.base import load_config
    from humanalign.config.evaluation import DistillConfig
    from humanalign.errors import ConfigError

    cfg = load_config(DistillConfig, values={"model_path": "m", "input_prompts": "p.jsonl", "output_path": "o.jsonl",
                                             "num_samples": 2})
    assert (cfg.model, cfg.prompts, cfg.output, cfg.num_samples) == ("m", "p.jsonl", "o.jsonl", 2)
    with pytest.raises(ConfigError, match="max_cost needs a cost_model"):
        load_config(DistillConfig, values={"max_cost": 0.0})


class FakeScorer:
    def __init__(self, kind: str):
        self.kind = kind
        self.calls = 0

    def score(self, prompts, responses, batch_size=None):
        if self.kind == "reward":  # longer answers are "better"
            return [float(len(r)) for r in responses]
        return [-1.0 if len(r) % 2 == 0 else 1.0 for r in responses]  # even length = harmless


def test_distill_command_best_of_n_and_rerun(tmp_path, monkeypatch):
    import humanalign.models.scorer as scorer_module
    from humanalign.cli import main
    from humanalign.models.tiny import tiny_model_path

    monkeypatch.setattr(scorer_module, "load_scorer", lambda model_dir, **kw: FakeScorer(model_dir))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about topic {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "distilled.jsonl"
    args = ["distill", "--model-path", str(tiny_model_path()), "--input-prompts", str(prompts), "--output-path",
            str(out), "--num-samples", "4", "--reward-model", "reward", "--cost-model", "cost", "--best-of-n",
            "--max-new-tokens", "10", "--temperature", "1.0", "--progress-bar", "false"]
    assert main(args) == 0
    samples = [json.loads(line) for line in samples_path(out).read_text().splitlines()]
    assert len(samples) == 12  # 3 prompts x 4 samples
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(kept) <= 3  # at most one per prompt
    for row in kept:
        same_prompt = [s["response"] for s in samples if s["prompt"] == row["prompt"]]
        harmless = [len(r) for r in same_prompt if r and len(r) % 2 == 0]
        assert row["cost"] == -1.0 and row["reward"] == max(harmless)
        assert row["response"] == same_prompt[row["sample_index"]]

    assert main(args) == 2  # the output exists
    # --overwrite with a plain threshold re-filters the same samples (no new sampling, no model loaded).
    monkeypatch.setattr("humanalign.eval.distill.load_generator", lambda *a: pytest.fail("model loaded"))
    stamp = samples_path(out).stat().st_mtime_ns
    assert main([a for a in args if a != "--best-of-n"] + ["--max-cost", "0", "--overwrite"]) == 0
    assert samples_path(out).stat().st_mtime_ns == stamp
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    harmless_all = [s for s in samples if s["response"] and len(s["response"]) % 2 == 0]
    assert len(kept) == len(harmless_all)  # every harmless answer, several per prompt
    assert all(row["cost"] == -1.0 for row in kept)
