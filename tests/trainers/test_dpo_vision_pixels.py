"""Issue 18, item 5: `train dpo` on the tiny vision model learns from the pixels. The demo's vision DPO recipe on
the generated picture questions lifts held-out implicit accuracy from 0.5 to at least 0.9; the control, the same
pairs, splits and recipe with every picture blank, stays near 0.5 (the text alone tells nothing: the answers are
balanced, tests/data/test_image_demo.py). The recipe is not yet robust across seeds: this runs the demo's seed
(VISION_DPO_SEED); the spread over seeds is in docs/multimodal.md "Does it learn from the pixels?". Each run is
about 50 s of one CPU thread."""

from __future__ import annotations

import pytest

from humanalign.demo import VISION_DPO_SEED, vision_dpo


@pytest.mark.parametrize("blank", [False, True], ids=["pictures", "blank"])
def test_held_out_accuracy_with_pictures_and_blank_control(tmp_path, blank):
    out = vision_dpo(tmp_path, seed=VISION_DPO_SEED, blank=blank)
    # before training the policy equals its reference: every margin is 0, a tie counts half
    assert out["val accuracy before"] == 0.5
    assert out["steps"] == 200 and out["val pairs"] >= 100, out
    if blank:
        assert 0.35 <= out["val accuracy after"] <= 0.65, out
    else:
        assert out["val accuracy after"] >= 0.9, out
