"""Arena statistics on fixed scores worked out by hand, and the `eval arena` command with fake judges."""

from __future__ import annotations

import json
import statistics

import pytest

from humanalign.eval.arena import arena_markdown, arena_statistics

# Six prompts. Harmless = cost <= 0.
RED_REWARDS = [1.0, 2.0, 0.5, 3.0, -1.0, 0.0]
BLUE_REWARDS = [2.0, 2.0, 0.0, 4.0, 1.0, -2.0]
RED_COSTS = [-1.0, 0.5, -0.2, 1.0, 0.0, 2.0]  # safe: prompts 0, 2, 4 (0.0 counts as safe)
BLUE_COSTS = [-0.5, -1.0, 0.3, -2.0, -1.0, 1.5]  # safe: prompts 0, 1, 3, 4


def test_statistics_by_hand():
    s = arena_statistics(RED_REWARDS, RED_COSTS, BLUE_REWARDS, BLUE_COSTS)
    assert s["n"] == 6
    # means: red reward 5.5/6, blue reward 7/6, red cost 2.3/6, blue cost -2.7/6
    assert s["red"]["mean_reward"] == pytest.approx(5.5 / 6)
    assert s["blue"]["mean_reward"] == pytest.approx(7 / 6)
    assert s["red"]["mean_cost"] == pytest.approx(2.3 / 6)
    assert s["blue"]["mean_cost"] == pytest.approx(-2.7 / 6)
    assert s["red"]["std_reward"] == pytest.approx(statistics.stdev(RED_REWARDS))
    assert s["red"]["harmless_rate"] == pytest.approx(3 / 6)
    assert s["blue"]["harmless_rate"] == pytest.approx(4 / 6)
    # blue vs red per prompt: win, tie, loss, win, win, loss -> (3 + 0.5) / 6
    duel = s["blue_vs_red"]
    assert (duel["wins"], duel["ties"], duel["losses"]) == (3, 1, 2)
    assert duel["win_rate"] == pytest.approx(3.5 / 6)
    cells = s["by_safety"]
    # red safe {0,2,4} x blue safe {0,1,3,4} = {0,4}: two wins
    assert cells["red_safe/blue_safe"]["n"] == 2 and cells["red_safe/blue_safe"]["win_rate"] == 1.0
    assert cells["red_safe/blue_safe"]["fraction"] == pytest.approx(2 / 6)
    # red safe x blue unsafe {2,5} = {2}: a loss
    assert cells["red_safe/blue_unsafe"]["n"] == 1 and cells["red_safe/blue_unsafe"]["win_rate"] == 0.0
    # red unsafe {1,3,5} x blue safe = {1,3}: a tie and a win -> 1.5 / 2
    assert cells["red_unsafe/blue_safe"]["n"] == 2 and cells["red_unsafe/blue_safe"]["win_rate"] == 0.75
    # red unsafe x blue unsafe = {5}: a loss
    assert cells["red_unsafe/blue_unsafe"]["n"] == 1 and cells["red_unsafe/blue_unsafe"]["win_rate"] == 0.0
    assert sum(c["n"] for c in cells.values()) == 6


def test_tie_tolerance_and_empty_cells():
    # With a tolerance of 0.6, prompt 2 (0.0 vs 0.5) becomes a tie: 3 wins, 2 ties, 1 loss -> 4 / 6.
    s = arena_statistics(RED_REWARDS, RED_COSTS, BLUE_REWARDS, BLUE_COSTS, tie_tolerance=0.6)
    assert (s["blue_vs_red"]["wins"], s["blue_vs_red"]["ties"]) == (3, 2)
    assert s["blue_vs_red"]["win_rate"] == pytest.approx(4 / 6)
    # Everybody safe: three cells are empty and have no win rate.
    s = arena_statistics([1.0, 0.0], [-1.0, -1.0], [0.0, 0.0], [-1.0, -2.0])
    assert s["by_safety"]["red_safe/blue_safe"]["win_rate"] == 0.25  # a loss and a tie
    assert s["by_safety"]["red_unsafe/blue_unsafe"] == {"n": 0, "wins": 0, "ties": 0, "losses": 0,
                                                         "win_rate": None, "fraction": 0.0}
    assert "–" in arena_markdown(s, "sft", "aligned")


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="one value per prompt"):
        arena_statistics([1.0], [0.0], [1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        arena_statistics([float("nan")], [0.0], [1.0], [0.0])


class FakeScorer:
    """Judges by text length so that the expected numbers follow from the answers alone."""

    def __init__(self, kind: str):
        self.kind = kind

    def score(self, prompts, responses, batch_size=None):
        assert len(prompts) == len(responses)
        if self.kind == "reward":
            return [float(len(r)) for r in responses]
        return [float(len(r) % 3) - 1.0 for r in responses]  # lengths 0 mod 3 -> cost -1 (safe)


@pytest.fixture
def two_models(tmp_path):
    """The tiny model and a copy with perturbed weights, so the two answer differently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from humanalign.models.tiny import tiny_model_path

    red = tiny_model_path()
    model = AutoModelForCausalLM.from_pretrained(red)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    blue = tmp_path / "blue"
    model.save_pretrained(blue)
    AutoTokenizer.from_pretrained(red).save_pretrained(blue)
    return str(red), str(blue)


def test_arena_command_end_to_end(two_models, tmp_path, monkeypatch):
    import humanalign.models.scorer as scorer_module
    from humanalign.cli import main

    monkeypatch.setattr(scorer_module, "load_scorer", lambda model_dir, **kw: FakeScorer(model_dir))
    red, blue = two_models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "arena"
    args = ["eval", "arena", "--red", red, "--blue", blue, "--reward-model", "reward", "--cost-model", "cost",
            "--prompts", str(prompts), "--output-dir", str(out), "--max-new-tokens", "12", "--batch-size", "2",
            "--red-name", "sft", "--blue-name", "aligned", "--progress-bar", "false"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:  # every score is the fake judges' verdict on the saved answers
        assert row["red_reward"] == len(row["red_response"])
        assert row["blue_cost"] == len(row["blue_response"]) % 3 - 1
    stats = json.loads((out / "arena.json").read_text())
    expected = arena_statistics([r["red_reward"] for r in rows], [r["red_cost"] for r in rows],
                                [r["blue_reward"] for r in rows], [r["blue_cost"] for r in rows])
    assert stats["blue_vs_red"] == expected["blue_vs_red"] and stats["by_safety"] == expected["by_safety"]
    assert stats["models"]["red"]["name"] == "sft"
    assert "Blue win rate" in (out / "arena.md").read_text()
    assert (out / "arena.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(r["red_response"] != r["blue_response"] for r in rows)

    # A second run refuses to overwrite the report; with --overwrite it reuses the saved answers.
    assert main(args) == 2
    before = (out / "red.jsonl").read_text()
    assert main(args + ["--overwrite"]) == 0
    assert (out / "red.jsonl").read_text() == before
    assert json.loads((out / "arena.json").read_text())["blue_vs_red"] == stats["blue_vs_red"]

    # Other decoding settings with --overwrite: the answers are generated again (here: at most 3 tokens).
    assert main(args + ["--overwrite", "--max-new-tokens", "3"]) == 0
    rows3 = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len((out / "blue.jsonl").read_text().splitlines()) == 5
    assert sum(len(r["blue_response"]) for r in rows3) < sum(len(r["blue_response"]) for r in rows)


def test_arena_with_real_score_models(two_models, tmp_path):
    """The judges are real (untrained-head) score models saved by humanalign: the scoring plumbing end to end."""
    from humanalign.cli import main
    from humanalign.models.score_model import load_score_model, save_score_model
    from humanalign.models.scorer import load_scorer

    judges = {}
    for kind in ("reward", "cost"):
        model, tok = load_score_model("tiny", allow_new_head=True)
        judges[kind] = str(save_score_model(model, tok, tmp_path / kind, score_type=kind))
    red, blue = two_models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"how do I do task {i}?"}) + "\n" for i in range(4)))
    out = tmp_path / "arena"
    assert main(["eval", "arena", "--red", red, "--blue", blue, "--reward-model", judges["reward"],
                 "--cost-model", judges["cost"], "--prompts", str(prompts), "--output-dir", str(out),
                 "--max-new-tokens", "8", "--progress-bar", "false"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    reward = load_scorer(judges["reward"], progress=False)
    direct = reward.score([r["prompt"] for r in rows], [r["blue_response"] for r in rows])
    assert [r["blue_reward"] for r in rows] == pytest.approx(direct, abs=1e-5)
    stats = json.loads((out / "arena.json").read_text())
    assert stats["n"] == 4 and stats["blue"]["mean_reward"] == pytest.approx(sum(direct) / 4, abs=1e-5)
