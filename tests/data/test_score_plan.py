"""The pair batch's score plan (data/score_plan.py), by hand: which positions the LM head scores in the padded
and the shared layout, the shared rows' ids, positions and attention mask."""

from __future__ import annotations

import torch

from humanalign.data.score_plan import score_plan

I = -100  # noqa: E741 - the ignored label, short for the hand-written tables


def test_score_plan_by_hand():
    # pair 0: prompt [5, 6], chosen response [7, 8], rejected [9]; pair 1: prompt [4], chosen [3], rejected [2, 1]
    ids = torch.tensor([[5, 6, 7, 8], [4, 3, 0, 0], [5, 6, 9, 0], [4, 2, 1, 0]])  # (2B, T) chosen rows first
    labels = torch.tensor([[I, I, 7, 8], [I, 3, I, I], [I, I, 9, I], [I, 2, 1, I]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    plans = score_plan(ids, labels, mask)
    padded, shared = plans["padded"], plans["shared"]
    # padded: the hidden state at (row, t) predicts labels[row, t + 1]; flattened as row * T + t
    assert padded["index"].tolist() == [1, 2, 4, 9, 12, 13]
    assert padded["target"].tolist() == [7, 8, 3, 9, 2, 1]
    assert padded["dense"].tolist() == [1, 2, 3, 7, 9, 10]  # in the (2B, T - 1) grid: row * 3 + t
    # shared: one row per pair, prompt once: pair 0 = [5, 6, 7, 8, 9] (length 4 + 3 - 2), pair 1 = [4, 3, 2, 1]
    assert shared["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    # the rejected response's first token is predicted by the prompt's last position (shared), later ones by
    # the rejected response itself: pair 0 scores 7 at 1, 8 at 2, 9 at 1; pair 1 scores 3 at 0, 2 at 0, 1 at 2
    assert shared["index"].tolist() == [0 * 5 + 1, 0 * 5 + 2, 1 * 5 + 0, 0 * 5 + 1, 1 * 5 + 0, 1 * 5 + 2]
    attend = shared["attention_mask"][:, 0]  # (B, L, L): query row may see key column
    assert attend[0, 4].tolist() == [True, True, False, False, True]  # rejected token: prompt + itself
    assert attend[0, 3].tolist() == [True, True, True, True, False]  # chosen: prompt + chosen, causal
    assert attend[1, 3].tolist() == [True, False, True, True, False]  # pair 1's rejected: not the chosen [3]
    assert attend[1, 4].tolist() == [False, False, False, False, True]  # padding sees itself only
    assert "shared" not in score_plan(ids, labels, mask, shared=False)
