"""Sign calibration of cost models: the offset chosen on hand-made costs, saved, reloaded and applied, and the
relation between our scores and plain transformers' for a head with and without a bias."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from humanalign.data.tokenize import pad_sequences
from humanalign.models.calibration import choose_sign_offset, sign_accuracies, write_sign_calibration
from humanalign.models.score_model import (
    SCORE_CONFIG_KEY,
    ScoreNormalizer,
    encode_score_input,
    load_score_model,
    save_score_model,
)

EXAMPLES = [("hello", "I cannot help"), ("how do I bake a cake?", "Here is a recipe for a cake with eggs."),
            ("tell me about the fox", "The quick brown fox jumps over the lazy dog, twice.")]


def test_offset_hand_worked_on_balanced_answers():
    # safe answers cost -1, 0.2, 0.5; unsafe 0.3, 0.8, 1.5. At 0: 4/6 right (0.2 and 0.5 called unsafe).
    # Offsets in (0.2, 0.3) and in (0.5, 0.8) both get 5/6; the one nearer 0, the midpoint 0.25, wins.
    costs = [-1.0, 0.2, 0.5, 0.3, 0.8, 1.5]
    unsafe = [False, False, False, True, True, True]
    choice = choose_sign_offset(costs, unsafe)
    assert choice["objective"] == "accuracy" and choice["answers"] == 6 and choice["unsafe_share"] == 0.5
    assert choice["offset"] == pytest.approx(0.25)
    assert choice["before"]["accuracy"] == pytest.approx(4 / 6) and choice["after"]["accuracy"] == pytest.approx(5 / 6)


def test_offset_stays_zero_when_nothing_is_gained_and_balanced_accuracy_rules_unbalanced_labels():
    assert choose_sign_offset([-2.0, -1.0, 1.0, 3.0], [False, False, True, True])["offset"] == 0.0
    # 8 safe answers (costs 1..8) and 2 unsafe (4.5, 10): 20% unsafe, so balanced accuracy is maximised. It is
    # 0.75 both in (4, 4.5) (safe 4/8, unsafe 2/2) and in (8, 10) (8/8, 1/2): the offset nearer 0 wins. Plain
    # accuracy would pick (8, 10) (9/10): every safe answer right, half the unsafe ones missed.
    costs = [1, 2, 3, 4, 5, 6, 7, 8, 4.5, 10]
    unsafe = [False] * 8 + [True, True]
    choice = choose_sign_offset(costs, unsafe)
    assert choice["objective"] == "balanced_accuracy"  # 20% unsafe, below the 40% floor
    assert choice["offset"] == pytest.approx(4.25)  # safe 1..4 right, 5..8 wrong; both unsafe right
    assert choice["after"]["balanced_accuracy"] == pytest.approx((4 / 8 + 1) / 2)
    assert sign_accuracies(costs, unsafe, 8.5)["accuracy"] == pytest.approx(0.9)  # what plain accuracy picks


def _scores(model, tokenizer):
    seqs = [encode_score_input(tokenizer, [{"role": "user", "content": p}], r, 96, 32, encoder=model.is_encoder)
            ["input_ids"] for p, r in EXAMPLES]
    ids = pad_sequences(seqs, tokenizer.pad_token_id, "right")  # (B, T)
    mask = pad_sequences([[1] * len(s) for s in seqs], 0, "right")  # (B, T)
    with torch.no_grad():
        out = model.eval()(ids, mask)
    return ids, mask, out


@pytest.mark.parametrize("backbone, folded", [("decoder", False), ("encoder", True)])
def test_saved_offset_is_reloaded_and_applied_and_transformers_scores_relate_as_documented(
        backbone, folded, decoder_dir, encoder_dir, tmp_path):
    model, tok = load_score_model(str(decoder_dir if backbone == "decoder" else encoder_dir))
    ids, mask, raw = _scores(model, tok)
    norm = ScoreNormalizer("ema")
    norm.update(raw.end_scores)
    save_score_model(model, tok, tmp_path / "cost", normalizer_state=norm, score_type="cost")
    # the offset that splits the three answers, the first safe and the other two unsafe, hand-made around them
    costs = raw.end_scores.tolist()
    unsafe = [c > sorted(costs)[0] for c in costs]
    choice = choose_sign_offset(costs, unsafe)
    t = choice["offset"]
    assert sorted(costs)[0] < t < sorted(costs)[1] and choice["after"]["accuracy"] == 1.0
    written = write_sign_calibration(tmp_path / "cost", choice)
    block = json.loads((tmp_path / "cost" / "config.json").read_text())[SCORE_CONFIG_KEY]
    assert block["sign_calibration"] == written and written["offset"] == pytest.approx(t)
    assert written["folded_into_head_bias"] is folded
    assert ("must subtract" in written["note"]) is not folded
    assert block["normalizer"]["mean"] == pytest.approx(norm.mean - t)  # normalised scores do not move

    again, _ = load_score_model(str(tmp_path / "cost"), allow_new_head=False)
    assert again.score_offset == (0.0 if folded else pytest.approx(t))
    _, _, calibrated = _scores(again, tok)
    torch.testing.assert_close(calibrated.end_scores, raw.end_scores - t, atol=1e-5, rtol=0)
    assert [c > 0 for c in calibrated.end_scores.tolist()] == unsafe  # cost > 0 = unsafe at the chosen point
    normalized = again(ids, mask, normalize=True).end_scores
    torch.testing.assert_close(normalized, (raw.end_scores - norm.mean) / (norm.std + norm.epsilon), atol=1e-4,
                               rtol=0)

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cost").eval()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    # folded: transformers gives the calibrated costs; not folded: its logits minus the documented offset do
    expected = calibrated.end_scores if folded else calibrated.end_scores + written["offset"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_recalibrating_adds_the_offsets(decoder_dir, tmp_path):
    model, tok = load_score_model(str(decoder_dir))
    _, _, raw = _scores(model, tok)
    save_score_model(model, tok, tmp_path / "cost", score_type="cost")
    write_sign_calibration(tmp_path / "cost", {**choose_sign_offset([0.0], [False]), "offset": 0.5})
    second = write_sign_calibration(tmp_path / "cost", {**choose_sign_offset([0.0], [False]), "offset": -0.2})
    again, _ = load_score_model(str(tmp_path / "cost"))
    assert second["offset"] == pytest.approx(0.3)
    _, _, calibrated = _scores(again, tok)
    torch.testing.assert_close(calibrated.end_scores, raw.end_scores - 0.3, atol=1e-5, rtol=0)


def test_resaving_a_calibrated_decoder_keeps_its_offset(decoder_dir, tmp_path):
    model, tok = load_score_model(str(decoder_dir))
    _, _, raw = _scores(model, tok)
    save_score_model(model, tok, tmp_path / "a", score_type="cost")
    write_sign_calibration(tmp_path / "a", {**choose_sign_offset([0.0], [False]), "offset": 0.4})
    loaded, _ = load_score_model(str(tmp_path / "a"))
    save_score_model(loaded, tok, tmp_path / "b")  # e.g. a run that starts from a calibrated cost model
    block = json.loads((tmp_path / "b" / "config.json").read_text())[SCORE_CONFIG_KEY]
    assert block["sign_calibration"]["offset"] == pytest.approx(0.4)
    again, _ = load_score_model(str(tmp_path / "b"))
    _, _, calibrated = _scores(again, tok)
    torch.testing.assert_close(calibrated.end_scores, raw.end_scores - 0.4, atol=1e-5, rtol=0)
