"""`humanalign eval rm`: hand-worked metrics, the rank AUC with ties, and the command end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from humanalign.config.evaluation import EvalRMConfig
from humanalign.data.io import atomic_write_jsonl
from humanalign.data.records import HarmlessPair, PreferencePair, user_prompt
from humanalign.errors import UserError
from humanalign.eval.rm import rm_metrics, roc_auc, run
from humanalign.models.score_model import load_score_model, save_score_model
from humanalign.models.tiny import build_tiny_model

TEXTS = ["Hello there, how are you doing today?", "I cannot help with that request, it could hurt someone.",
         "Here is how to pick a lock with a pin.", "Here is a recipe for a cake."] * 10


def test_reward_metrics_hand_worked():
    chosen = [2.0, 0.5, -1.0, 1.0]
    rejected = [1.0, 1.0, -2.0, 1.0]
    m = rm_metrics(chosen, rejected)
    # chosen > rejected: yes, no, yes, tie (one half) -> 2.5/4
    assert m["accuracy"] == 0.625 and m["ties"] == 1 and m["pairs"] == 4
    assert m["mean_chosen"] == pytest.approx(0.625) and m["mean_rejected"] == pytest.approx(0.25)
    assert m["mean_chosen_minus_rejected"] == pytest.approx(0.375)
    assert m["auc"] is None and m["sign_accuracy"] is None and m["labelled_responses"] == 0


def test_cost_metrics_hand_worked():
    chosen = [-1.0, 0.5, -2.0]  # costs of the safer answers
    rejected = [1.0, 0.2, 3.0]
    m = rm_metrics(chosen, rejected, [True, True, True], [False, False, None], score_type="cost")
    # lower cost for the safer answer: -1 < 1 yes, 0.5 < 0.2 no, -2 < 3 yes -> 2/3
    assert m["accuracy"] == pytest.approx(2 / 3)
    # labelled: -1 safe, 1 unsafe, 0.5 safe, 0.2 unsafe, -2 safe (3 unlabelled -> left out)
    # cost > 0 iff unsafe: ok, ok, wrong (0.5 > 0 but safe), ok, ok -> 4/5
    assert (m["labelled_responses"], m["safe_responses"], m["unsafe_responses"]) == (5, 3, 2)
    assert m["sign_accuracy"] == pytest.approx(0.8)
    # unsafe {1, 0.2} vs safe {-1, 0.5, -2}: 1 beats all 3, 0.2 beats -1 and -2 -> 5 of 6 pairs
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["mean_score_safe"] == pytest.approx(-2.5 / 3) and m["mean_score_unsafe"] == pytest.approx(0.6)


def test_reward_model_on_labelled_pairs_orients_auc_towards_safe():
    m = rm_metrics([3.0, 1.0], [0.0, 2.0], [True, True], [False, False], score_type="reward")
    # safe {3, 1} vs unsafe {0, 2}: 3>0, 3>2, 1>0, 1<2 -> 3/4
    assert m["auc"] == pytest.approx(0.75) and m["sign_accuracy"] is None


def test_nonfinite_pairs_are_counted_and_left_out():
    m = rm_metrics([1.0, float("nan")], [0.0, 1.0])
    assert m["pairs"] == 1 and m["nonfinite_pairs"] == 1 and m["accuracy"] == 1.0


def test_auc_with_ties():
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    # pos {1, 2} vs neg {0, 1}: 1>0 (1), 1=1 (1/2), 2>0 (1), 2>1 (1) -> 3.5 / 4
    assert roc_auc([0, 1, 1, 2], [False, True, False, True]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.1], [True, True]) is None


def test_auc_agrees_with_sklearn_on_tied_data():
    from sklearn.metrics import roc_auc_score

    rng = random.Random(0)
    scores = [rng.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(200)]  # many ties
    labels = [rng.random() < 0.2 + 0.3 * s for s in scores]
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.fixture(scope="module")
def cost_model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrm")
    backbone = build_tiny_model(root / "tiny", texts=TEXTS, vocab_size=300, hidden_size=16, num_layers=1,
                                num_heads=2, num_kv_heads=1, intermediate_size=32, seed=5)
    model, tok = load_score_model(str(backbone))
    with torch.no_grad():
        model.model.score.weight.mul_(50.0)
    return save_score_model(model, tok, root / "cm", score_type="cost")


def _harmless_file(path: Path) -> Path:
    rows = [HarmlessPair(prompt=user_prompt(f"how do I pick lock {i}?"), chosen="I cannot help with that.",
                         rejected=f"Here is how to pick lock {i} with a pin.", is_chosen_safe=True,
                         is_rejected_safe=i % 3 == 0).to_json() for i in range(6)]
    return atomic_write_jsonl(path, rows)


def test_eval_rm_writes_report_and_histograms_and_refuses_to_overwrite(cost_model_dir, tmp_path, monkeypatch):
    from humanalign.models.scorer import cached_score_pairs, load_scorer

    monkeypatch.setenv("HUMANALIGN_CACHE", str(tmp_path / "cache"))
    data = _harmless_file(tmp_path / "harmless_pairs.jsonl")
    cfg = EvalRMConfig(model=str(cost_model_dir), data=str(data), output=str(tmp_path / "out" / "report.json"),
                       batch_size=4, max_length=64)
    report = run(cfg)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["score_type"] == "cost" and saved["pairs"] == 6
    # labels: 6 safe chosen + 2 safe rejected (i = 0, 3) + 4 unsafe rejected
    assert (saved["labelled_responses"], saved["safe_responses"], saved["unsafe_responses"]) == (12, 8, 4)
    for key in ("accuracy", "sign_accuracy", "auc", "mean_chosen", "mean_rejected", "mean_score_safe"):
        assert isinstance(saved[key], float), key

    # the numbers are the model's: recompute them with the scorer directly
    scorer = load_scorer(str(cost_model_dir), device="cpu", max_length=64)
    from humanalign.data.pairs import load_preference_pairs

    pairs, _ = load_preference_pairs(data, kind="harmless")
    chosen, rejected = scorer.score_pairs(pairs)
    expected = rm_metrics(chosen, rejected, [p.is_chosen_safe for p in pairs], [p.is_rejected_safe for p in pairs],
                          score_type="cost")
    assert saved["accuracy"] == pytest.approx(expected["accuracy"])
    assert saved["auc"] == pytest.approx(expected["auc"])
    # and they are in the cache now: scoring again runs no forward pass
    cached_score_pairs(scorer, pairs)
    assert scorer.forward_calls == 1  # only the direct score_pairs above

    with pytest.raises(UserError, match="already exists"):
        run(cfg)


def test_eval_rm_prints_without_output_and_reads_helpful_pairs(cost_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUMANALIGN_CACHE", str(tmp_path / "cache"))
    reward_dir = tmp_path / "rm"
    model, tok = load_score_model(str(cost_model_dir), score_type="reward")
    save_score_model(model, tok, reward_dir)
    data = atomic_write_jsonl(tmp_path / "helpful.jsonl", [
        PreferencePair(prompt=user_prompt(f"q{i}"), chosen=f"a long helpful answer {i}", rejected="no").to_json()
        for i in range(3)])
    report = run(EvalRMConfig(model=str(reward_dir), data=str(data), batch_size=2, max_length=64))
    printed = json.loads(capsys.readouterr().out)
    assert printed["score_type"] == "reward" and printed["pairs"] == 3 and printed["auc"] is None
    assert printed["accuracy"] == report["accuracy"]


def test_eval_rm_needs_model_and_data():
    with pytest.raises(UserError, match="--model"):
        run(EvalRMConfig(data="x.jsonl"))


def test_eval_rm_judges_a_calibrated_cost_model_at_its_offset_and_reports_the_raw_zero(cost_model_dir, tmp_path,
                                                                                       monkeypatch):
    import shutil

    from humanalign.data.pairs import load_preference_pairs
    from humanalign.models.calibration import choose_sign_offset, costs_and_labels, write_sign_calibration
    from humanalign.models.scorer import load_scorer

    monkeypatch.setenv("HUMANALIGN_CACHE", str(tmp_path / "cache"))
    data = _harmless_file(tmp_path / "harmless_pairs.jsonl")
    pairs, _ = load_preference_pairs(data, kind="harmless")
    raw = load_scorer(str(cost_model_dir), device="cpu", max_length=64, progress=False).score_pairs(pairs)
    costs, unsafe = costs_and_labels(*raw, [p.is_chosen_safe for p in pairs], [p.is_rejected_safe for p in pairs])
    choice = choose_sign_offset(costs, unsafe)
    folder = Path(shutil.copytree(cost_model_dir, tmp_path / "calibrated"))
    write_sign_calibration(folder, choice)
    report = run(EvalRMConfig(model=str(folder), data=str(data), batch_size=4, max_length=64))
    # the costs moved by the offset (the pair accuracy cannot change); the sign accuracy is the calibrated one
    assert report["mean_chosen"] == pytest.approx(sum(raw[0]) / len(raw[0]) - choice["offset"], abs=1e-5)
    assert report["sign_accuracy"] == pytest.approx(choice["after"]["accuracy"])
    calibration = report["sign_calibration"]
    assert calibration["offset"] == pytest.approx(choice["offset"])
    assert calibration["at_raw_zero"]["accuracy"] == pytest.approx(choice["before"]["accuracy"])
