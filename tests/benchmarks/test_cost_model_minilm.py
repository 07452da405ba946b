"""benchmarks/cost_model_minilm.py's sign calibration step on a tiny BERT cost model: the offset chosen on the
calibration answers is the one saved with the model (folded into the classifier bias), reloading gives the
calibrated costs, and the held-out accuracies it reports are those of the raw costs at 0 and at the offset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from humanalign.data.records import HarmlessPair, user_prompt
from humanalign.models.calibration import costs_and_labels, sign_accuracies
from humanalign.models.load import resolve_model_path
from humanalign.models.score_model import SCORE_CONFIG_KEY, load_score_model, save_score_model
from humanalign.models.scorer import load_scorer
from humanalign.paths import shared_data_dir

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cost_model_minilm.py"
ANSWERS = ["Here is a recipe with eggs and flour.", "Sure, mix bleach and ammonia in a closed room.",
           "Please ask a doctor about that dose.", "Steal the car at night when nobody looks.",
           "Water the plant twice a week.", "Hurt them where it does not show.", "Read the manual first.",
           "Lie to the police about it."]


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("cost_model_minilm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def cost_dir(tmp_path) -> Path:
    """A saved tiny BERT cost model (its classifier has a bias) with the MiniLM tokenizer."""
    backbone = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6-v2")).save_pretrained(backbone)
    model, tokenizer = load_score_model(str(backbone), score_type="cost")
    with torch.no_grad():  # a head bias far from the split: every answer called unsafe at the raw 0
        next(m for n, m in model.named_modules() if n.endswith("classifier")).bias.fill_(3.0)
    save_score_model(model, tokenizer, tmp_path / "cost", score_type="cost")
    return tmp_path / "cost"


def _pairs(start: int) -> list[HarmlessPair]:
    return [HarmlessPair(user_prompt(f"question {start + i}"), ANSWERS[2 * i], ANSWERS[2 * i + 1],
                         is_chosen_safe=True, is_rejected_safe=False) for i in range(4)]


def test_calibration_saves_the_chosen_offset_and_reports_raw_and_calibrated_held_out_accuracy(cost_dir):
    bench = _load()
    calibration, test = _pairs(0), _pairs(10)
    raw_chosen, raw_rejected = load_scorer(str(cost_dir), progress=False).score_pairs(test)
    raw_test = costs_and_labels(raw_chosen, raw_rejected, [True] * 4, [False] * 4)

    out = bench.calibrate(str(cost_dir), calibration, test)

    block = json.loads((cost_dir / "config.json").read_text())[SCORE_CONFIG_KEY]["sign_calibration"]
    assert block["offset"] == pytest.approx(out["offset"]) and block["folded_into_head_bias"] is True
    assert out["after"]["accuracy"] >= out["before"]["accuracy"] and out["answers"] == 8
    assert out["held_out"]["at_raw_zero"] == sign_accuracies(*raw_test, 0.0)
    assert out["held_out"]["calibrated"] == sign_accuracies(*raw_test, out["offset"])
    # reloaded, the model gives the calibrated costs (raw - offset): its own zero is the chosen point
    again_chosen, again_rejected = load_scorer(str(cost_dir), progress=False).score_pairs(test)
    torch.testing.assert_close(torch.tensor(again_chosen), torch.tensor(raw_chosen) - out["offset"], atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(again_rejected), torch.tensor(raw_rejected) - out["offset"], atol=1e-4,
                               rtol=0)


@pytest.mark.skipif(not (shared_data_dir() / "pku-saferlhf/safe_vs_unsafe_pairs.jsonl").is_file(),
                    reason="shared data not present")
def test_main_trains_calibrates_the_saved_model_and_writes_the_result(cost_dir, tmp_path):
    """The whole script on 300 real pairs and the tiny BERT: the offset lands in the final model's folder (the
    run folder only holds it), and the JSON reports it with the held-out sign accuracies."""
    bench = _load()
    lines = (shared_data_dir() / "pku-saferlhf/safe_vs_unsafe_pairs.jsonl").read_text().splitlines()[:300]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    run_dir, output = tmp_path / "run", tmp_path / "result.json"
    result = bench.main(["--data", str(data), "--model", str(tmp_path / "bert"), "--run-dir", str(run_dir),
                         "--output", str(output), "--max-train-pairs", "16", "--batch-size", "8",
                         "--max-length", "64", "--max-prompt-length", "24"])
    block = json.loads((run_dir / "final" / "config.json").read_text())[SCORE_CONFIG_KEY]["sign_calibration"]
    assert result["sign_calibration"]["offset"] == pytest.approx(block["offset"])
    assert set(result["sign_calibration"]["held_out"]) == {"at_raw_zero", "calibrated"}
    assert json.loads(output.read_text())["sign_calibration"]["offset"] == pytest.approx(block["offset"])
