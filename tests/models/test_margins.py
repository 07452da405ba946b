"""Safe-MM-DPO's margins (models/margins.py): the statistics that flag a degenerate margin distribution, the
range of the expected cost J_c, and what the run says about where the threshold lies. Margins scored with real
score models, through the trainer: tests/trainers/test_safe_mm_dpo.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from humanalign.models.margins import _report_range, degenerate_margins, expected_cost_range, margin_summary


def test_margin_statistics_flag_degenerate_distributions():
    rng = np.random.default_rng(0)
    assert degenerate_margins(margin_summary(rng.normal(1.0, 1.0, 500), k=0.5)) == []  # 84% positive, spread
    near_zero = margin_summary([0.0] * 98 + [0.5, 1.0], k=0.5)
    assert near_zero["near_zero"] == 0.98 and "within 1e-3 of 0" in degenerate_margins(near_zero)[0]
    # k * delta > 5 for every margin of 20: beta is stuck at (1 + w) beta_ori
    extreme = margin_summary([20.0] * 100, k=0.5)
    assert extreme["saturated"] == 1.0 and "extreme" in degenerate_margins(extreme)[0]
    reversed_ = margin_summary(rng.normal(-1.0, 1.0, 500), k=0.5)  # 16% positive
    assert "disagrees with most labels" in degenerate_margins(reversed_)[0]
    assert "NaN" in degenerate_margins(margin_summary([float("nan"), 1.0, 2.0], k=0.5))[0]
    s = margin_summary([-1.0, 0.0, 1.0, 2.0], k=0.5)
    assert (s["mean"], s["min"], s["max"], s["positive"]) == (0.5, -1.0, 2.0, 0.5)
    # J_c at the start: mean (C_w + C_l) / 2 = (0 - 1 + 1) / 3 = 0; always safer: mean C_w = (-1 - 1 + 1) / 3
    assert expected_cost_range([-1.0, -1.0, 1.0], [1.0, -1.0, 1.0]) == (0.0, pytest.approx(-1 / 3))
    assert expected_cost_range([-1.0, 5.0], [1.0, 5.0], has_cost=[1.0, 0.0]) == (0.0, -1.0)  # unlabelled pair out


@pytest.mark.parametrize(("threshold", "says"), [
    (-0.5, "below the start: the constraint is violated at first, so lambda rises"),  # -1 < d < 0
    (0.0, "at or above the start: the constraint holds from the first step, so lambda falls"),
    (-2.0, "below every J_c that ranking can reach"),  # d < -1, the always-safer J_c
])
def test_the_run_says_where_the_threshold_lies(threshold, says):
    printed = []
    # start: mean (C_w + C_l) / 2 = (0 + 0) / 2 = 0; always safer: mean C_w = -1
    cfg = SimpleNamespace(cost_threshold=threshold, use_harmless_stream=True, update_lambda=True)
    found = _report_range(cfg, printed.append, [-1.0, -1.0], [1.0, 1.0], None, "train")
    assert found == {"expected_cost_start": 0.0, "expected_cost_always_safer": -1.0}
    assert says in printed[0], printed[0]
    # Held-out pairs, or a run with no dual update (DPO, MM-DPO, shaping): the range, and nothing about lambda
    for split, stream, update in [("val", True, True), ("train", False, True), ("train", True, False)]:
        cfg = SimpleNamespace(cost_threshold=threshold, use_harmless_stream=stream, update_lambda=update)
        assert _report_range(cfg, printed.append, [-1.0, -1.0], [1.0, 1.0], None, split) == found
        assert "lambda" not in printed[-1] and f"d = {threshold:g}" in printed[-1], printed[-1]
