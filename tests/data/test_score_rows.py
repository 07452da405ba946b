"""The score model's shared-prompt pair rows (data/score_rows.py): by hand, and the same layout as the DPO
trainer's score plan (data/score_plan.py) on random pair batches."""

from __future__ import annotations

import torch

from humanalign.data.score_plan import score_plan
from humanalign.data.score_rows import (
    SHARED_ROWS_KEY,
    ScorePairCollator,
    last_non_pad_index,
    shared_score_rows,
)

I = -100  # noqa: E741 - the ignored label, short for the hand-written tables
PAD = 0


def test_shared_score_rows_by_hand():
    # pair 0: prompt [5, 6], chosen answer [7, 8], rejected [9]; pair 1: prompt [4], chosen [3], rejected [2, 1]
    ids = torch.tensor([[5, 6, 7, 8], [4, 3, 0, 0], [5, 6, 9, 0], [4, 2, 1, 0]])  # (2B, T) chosen rows first
    labels = torch.tensor([[I, I, 7, 8], [I, 3, I, I], [I, I, 9, I], [I, 2, 1, I]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    rows = shared_score_rows(ids, labels, mask, PAD)
    assert rows["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    # ends (flattened in the (2, 5) rows): chosen 8 at 3, 3 at 5 + 1; rejected 9 at 4, 1 at 5 + 3
    assert rows["ends"].tolist() == [3, 6, 4, 8]
    attend = rows["attention_mask"][:, 0]  # (B, L, L): query row may see key column
    assert attend[0, 4].tolist() == [True, True, False, False, True]  # rejected end: prompt + itself
    assert attend[1, 3].tolist() == [True, False, True, True, False]  # pair 1's rejected: not the chosen [3]
    assert attend[1, 4].tolist() == [False, False, False, False, True]  # padding sees itself only


def test_rejected_end_inside_the_shared_prefix_reads_the_chosen_rows_token():
    # the rejected sequence [5, 6] is a prefix of the chosen [5, 6, 7] and holds no label: it ends in the prompt
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    labels = torch.tensor([[I, I, 7], [I, I, I]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rows = shared_score_rows(ids, labels, mask, PAD)
    assert rows["input_ids"].tolist() == [[5, 6, 7]]
    assert rows["ends"].tolist() == [2, 1]


def test_same_layout_as_the_score_plan_on_random_batches():
    """ids, positions and mask equal score_plan's shared layout; every end token is the padded row's last
    non-pad token, seen at the same position."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        half, width = 5, 12
        seqs, labels = [], []
        prompts = [torch.randint(3, 9, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen)
                   for _ in range(half)]
        for _side in range(2):
            for prompt in prompts:
                answer = torch.randint(3, 9, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen)
                seqs.append(torch.cat([prompt, answer]))
                labels.append(torch.cat([torch.full_like(prompt, I), answer]))
        ids = torch.full((2 * half, width), PAD)
        lab = torch.full((2 * half, width), I)
        mask = torch.zeros(2 * half, width, dtype=torch.long)
        for row, (seq, label) in enumerate(zip(seqs, labels)):
            ids[row, : len(seq)], lab[row, : len(seq)], mask[row, : len(seq)] = seq, label, 1
        rows = shared_score_rows(ids, lab, mask, PAD)
        plan = score_plan(ids, lab, mask)["shared"]
        assert torch.equal(rows["position_ids"], plan["position_ids"])
        assert torch.equal(rows["attention_mask"], plan["attention_mask"])
        real = rows["attention_mask"][:, 0, :, 0]  # (B, L): real columns see column 0
        assert torch.equal(rows["input_ids"][real], plan["input_ids"][real])
        end = last_non_pad_index(ids, PAD)
        flat_ids, flat_pos = rows["input_ids"].reshape(-1), rows["position_ids"].reshape(-1)
        assert torch.equal(flat_ids[rows["ends"]], ids[torch.arange(2 * half), end])
        assert torch.equal(flat_pos[rows["ends"]], end)


def test_collator_adds_the_rows_only_when_shared():
    features = [{"chosen_input_ids": [5, 6, 7], "chosen_labels": [I, I, 7], "rejected_input_ids": [5, 8],
                 "rejected_labels": [I, 8], "margin": 0.5}]
    plain = ScorePairCollator(PAD)(features)
    shared = ScorePairCollator(PAD, shared=True)(features)
    assert SHARED_ROWS_KEY not in plain and plain["margin"].tolist() == [0.5]
    assert shared[SHARED_ROWS_KEY]["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert torch.equal(shared["input_ids"], plain["input_ids"])
