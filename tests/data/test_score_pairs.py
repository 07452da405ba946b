"""The pairs a reward / cost model trains on: read through the config's source, capped and counted."""

from __future__ import annotations

import json

from humanalign.config.base import load_config
from humanalign.config.rm import RewardModelConfig
from humanalign.data.records import HarmlessPair, user_prompt
from humanalign.data.score_pairs import count_labelled, load_pairs, pair_length


def test_load_pairs_caps_at_the_limit_and_counts_the_rest(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(5)))
    cfg = load_config(RewardModelConfig, values={"train_helpful_path": str(path)})
    pairs, skipped = load_pairs(cfg, str(path), limit=3)
    assert [p.prompt for p in pairs] == [user_prompt(f"q{i}") for i in range(3)]
    assert skipped == {"beyond the first 3 (max samples)": 2}
    assert len(load_pairs(cfg, str(path), limit=None)[0]) == 5


def test_pair_length_and_labelled_pairs():
    assert pair_length({"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2]}) == 3
    prompt = user_prompt("q")
    pairs = [HarmlessPair(prompt=prompt, chosen="a", rejected="b", is_chosen_safe=True, is_rejected_safe=False),
             HarmlessPair(prompt=prompt, chosen="a", rejected="b", is_chosen_safe=True),
             HarmlessPair(prompt=prompt, chosen="a", rejected="b")]
    assert count_labelled(pairs) == 1  # both labels needed
