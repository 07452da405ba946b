"""Rollout tensors: the [prompt | response] layout, the positions that choose each response token, and the
per-token values read off them."""

from __future__ import annotations

import torch

from humanalign.rollout.batch import RolloutBatch, response_values


def test_rollout_layout_hand_worked():
    # prompt [1, 2, 3] + response [4, 5]; prompt [6] + response [7, 8, 9]; pad 0
    batch = RolloutBatch.from_generation([[1, 2, 3], [6]], [[4, 5], [7, 8, 9]], 0, torch.device("cpu"))
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.starts.tolist() == [3, 1]
    assert batch.response_ids.tolist() == [[4, 5, 0], [7, 8, 9]]
    # the logits choosing response token t sit at start - 1 + t (row 0's padding slot clamps to the end)
    assert batch.action_positions().tolist() == [[2, 3, 4], [0, 1, 2]]
    values = torch.arange(10, dtype=torch.float32).view(2, 5)  # value at (row, position) = 5 row + position
    assert response_values(values, batch).tolist() == [[2.0, 3.0, 0.0], [5.0, 6.0, 7.0]]
    one = batch.select([0])  # trimmed to its own width: 5 tokens, 2 response tokens
    assert one.input_ids.tolist() == [[1, 2, 3, 4, 5]] and one.response_ids.tolist() == [[4, 5]]
    assert batch.select([1]).input_ids.tolist() == [[6, 7, 8, 9]]
