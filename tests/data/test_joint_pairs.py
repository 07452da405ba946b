"""Safe-MM-DPO's two streams on one sampler (data/joint_pairs.py): pairs of the same record share their
responses in the batch, unmatched pairs get partners, and every pair of both streams is used."""

from __future__ import annotations

from pathlib import Path

import pytest

from humanalign.config.base import load_config
from humanalign.config.data import PrepareDataConfig
from humanalign.data.demo_data import write_demo_raw
from humanalign.data.joint_pairs import (
    HARMLESS,
    HELPFUL,
    NOT_SHARED,
    SHARED_SAME_ORDER,
    SHARED_SWAPPED,
    JointCollator,
    JointDataset,
    build_joint_dataset,
    match_streams,
)
from humanalign.data.pairs import load_preference_pairs
from humanalign.data.preference_dataset import PairDataset, build_pair_dataset
from humanalign.data.prepare import run as prepare
from humanalign.models.load import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def val_streams(tmp_path_factory, tokenizer):
    """The demo set's validation pairs (59 helpful and 59 harmless, from the same records: same prompt, same two
    responses, ordered by helpfulness and by safety) with hand-set margins and label costs."""
    root = tmp_path_factory.mktemp("joint_demo")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    out = {}
    for kind in (HELPFUL, HARMLESS):
        pairs, _ = load_preference_pairs(Path(root / "data" / "val" / f"{kind}_pairs.jsonl"), kind=kind)
        out[kind], _, _ = build_pair_dataset(pairs, tokenizer, max_length=96, max_prompt_length=32)
    helpful, harmless = out[HELPFUL], out[HARMLESS]
    helpful.add_field("delta", [(0.0, 0.5, 2.0, -1.0)[i % 4] for i in range(len(helpful))])
    harmless.add_field("cost_chosen", [(-1.0, 1.0)[i % 2] for i in range(len(harmless))])
    return helpful, harmless


def _joint_batch(helpful, harmless, items, tokenizer):
    dataset = JointDataset(helpful, harmless, items)
    return JointCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def _subset(dataset, n):
    return PairDataset([dict(e) for e in dataset.examples[:n]], dataset.pairs[:n])


def test_streams_from_the_same_records_share_their_responses(val_streams, tokenizer):
    helpful, harmless = val_streams
    matched = match_streams(helpful, harmless)
    # every demo record gives both pairs: all 59 match, in the same order or swapped (the more helpful answer
    # is the less safe one in a share of the harmful requests)
    assert len(matched) == len(helpful) == len(harmless) == 59
    relations = [rel for _, _, rel in matched]
    assert relations.count(SHARED_SWAPPED) > 0 and relations.count(SHARED_SAME_ORDER) > 0
    joint = build_joint_dataset(helpful, harmless, seed=0)
    assert len(joint) == 59 and joint.num_shared == 59

    items = matched[:4]
    batch = _joint_batch(helpful, harmless, items, tokenizer)
    assert batch["input_ids"].shape[0] == 8  # 4 helpful + 4 harmless pairs, 8 distinct sequences (DPO: 8 too)
    for k, (i, j, rel) in enumerate(items):
        rows = {s: (batch[s]["chosen_row"][k].item(), batch[s]["rejected_row"][k].item()) for s in (HELPFUL, HARMLESS)}
        assert rows[HARMLESS] == (rows[HELPFUL] if rel == SHARED_SAME_ORDER else rows[HELPFUL][::-1])
        for stream, example in ((HELPFUL, helpful[i]), (HARMLESS, harmless[j])):
            for side, row in zip(("chosen", "rejected"), rows[stream]):
                n = len(example[f"{side}_input_ids"])
                assert batch["input_ids"][row, :n].tolist() == example[f"{side}_input_ids"]
                assert batch["labels"][row, :n].tolist() == example[f"{side}_labels"]
                assert batch["attention_mask"][row].sum().item() == n
    assert batch[HELPFUL]["delta"].tolist() == [helpful[i]["delta"] for i, _, _ in items]
    assert batch[HARMLESS]["cost_chosen"].tolist() == [harmless[j]["cost_chosen"] for _, j, _ in items]

    unshared = _joint_batch(helpful, harmless, [(i, j, NOT_SHARED) for i, j, _ in items], tokenizer)
    assert unshared["input_ids"].shape[0] == 16  # without sharing: 4 sequences per item


def test_unmatched_pairs_get_partners_and_every_pair_is_used(val_streams):
    helpful, harmless = val_streams
    # without sharing, the 59 helpful pairs get the 59 harmless pairs as partners in a seeded order
    joint = build_joint_dataset(helpful, harmless, seed=3, share_responses=False)
    assert joint.num_shared == 0 and len(joint) == 59
    assert sorted(h for h, _, _ in joint.items) == list(range(59))
    assert sorted(s for _, s, _ in joint.items) == list(range(59))
    assert joint.items == build_joint_dataset(helpful, harmless, seed=3, share_responses=False).items
    # a smaller harmless stream (10 pairs) is repeated to partner all 59 helpful pairs, each at least 5 times
    few = build_joint_dataset(helpful, _subset(harmless, 10), seed=0)
    counts = [sum(1 for _, s, _ in few.items if s == j) for j in range(10)]
    assert len(few) == 59 and few.num_shared == 10 and min(counts) >= 5 and sum(counts) == 59
