"""`humanalign prepare-data` on a hand-made fixture (answers worked out by hand) and on the shared real data."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from humanalign.data.prepare import split_of
from humanalign.data.records import SPLITS, prompt_key, user_prompt
from humanalign.paths import shared_data_dir

BREAD = "Mix flour, water and yeast, let it rise, then bake it for 30 minutes."
REFUSE = "I can't help with that."
P1, P2, P5 = "How do I bake bread?", "How do I pick a lock to rob a house?", "How do I make meth?"


def test_split_rule_is_the_documented_hash():
    # u = first 8 bytes of sha256(f"{seed}\x00{prompt_key}") / 2**64; with seed 14:
    # P1 -> 0.3735 (< 0.5: train), P2 -> 0.6609 (< 0.75: val), P5 -> 0.8328 (test)
    for prompt, u, split in ((P1, 0.3735, "train"), (P2, 0.6609, "val"), (P5, 0.8328, "test")):
        key = prompt_key(user_prompt(prompt))
        digest = hashlib.sha256(f"14\x00{key}".encode()).digest()
        assert int.from_bytes(digest[:8], "big") / 2**64 == pytest.approx(u, abs=1e-4)
        assert split_of(key, 14, (0.5, 0.25, 0.25)) == split
    # whitespace does not change a prompt's identity, so it cannot leak into two splits that way
    assert prompt_key(user_prompt("How do  I bake\nbread?")) == prompt_key(user_prompt(P1))


def test_hand_made_fixture(cli, fixtures, tmp_path, read_jsonl):
    """prepare_handmade.jsonl (PKU-SafeRLHF old release), record by record:
    1 P1 bread/refusal, better 0, safer 0, both safe      -> helpful (bread > refusal), harmless (bread > refusal)
    2 P2 lockpick(unsafe)/refusal(safe), better 0, safer 1 -> helpful (lockpick > refusal), harmless (refusal > lockpick)
    3 P2 refusal(safe)/window(unsafe), better 0, safer 0   -> helpful and harmless: refusal > window
    4 P3 "4" vs " 4 "                                       -> identical responses (skipped in both kinds)
    5 P4 "" vs answer                                       -> empty response (skipped in both kinds)
    6 = record 1                                            -> duplicate pair in both kinds
    7 P5 both unsafe, better 1, safer 0                    -> helpful (r1 > r0), harmless (r0 > r1, both unsafe)
    8 P1 bread/refusal, better 1, safer 0                  -> helpful: reverses pair 1 (skipped); harmless: duplicate
    Kept: 4 helpful + 4 harmless. Seed 14 puts P1 in train, P2 in val, P5 in test (see the test above).
    """
    out = tmp_path / "data"
    code, stdout, err = cli("prepare-data", "--input-dir", fixtures / "prepare_handmade.jsonl", "--output-dir", out,
                            "--seed", "14", "--train-ratio", "0.5", "--val-ratio", "0.25", "--test-ratio", "0.25")
    assert code == 0, err
    helpful = {s: read_jsonl(out / s / "helpful_pairs.jsonl") for s in SPLITS}
    harmless = {s: read_jsonl(out / s / "harmless_pairs.jsonl") for s in SPLITS}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o666 & ~umask}  # not 0600
    src = {"source": "pku-saferlhf"}
    assert helpful["train"] == [{"prompt": P1, "chosen": BREAD, "rejected": REFUSE, **src}]
    assert helpful["val"] == [
        {"prompt": P2, "chosen": "Insert a tension wrench and rake the pins until the lock turns.",
         "rejected": "I won't help with breaking into homes.", **src},
        {"prompt": P2, "chosen": "Sorry, I can't help you rob a house.",
         "rejected": "Wait until night and break the back window.", **src},
    ]
    assert helpful["test"] == [{"prompt": P5, "chosen": "Mix the chemicals in a closed room.",
                                "rejected": "Buy cold medicine and cook it down.", **src}]
    assert harmless["train"] == [{"prompt": P1, "chosen": BREAD, "rejected": REFUSE,
                                  "is_chosen_safe": True, "is_rejected_safe": True, **src}]
    assert [(p["chosen"], p["is_chosen_safe"], p["is_rejected_safe"]) for p in harmless["val"]] == [
        ("I won't help with breaking into homes.", True, False), ("Sorry, I can't help you rob a house.", True, False)]
    assert [(p["chosen"], p["is_chosen_safe"], p["is_rejected_safe"]) for p in harmless["test"]] == [
        ("Buy cold medicine and cook it down.", False, False)]

    card = json.loads((out / "data_card.json").read_text())
    assert card["pairs"] == {"helpful": {"train": 1, "val": 2, "test": 1}, "harmless": {"train": 1, "val": 2, "test": 1}}
    assert card["prompts"] == {"train": 1, "val": 1, "test": 1}
    assert card["skipped"] == {
        "records": {},
        "helpful": {"identical responses": 1, "empty response": 1, "duplicate pair": 1, "reverses an earlier pair": 1},
        "harmless": {"identical responses": 1, "empty response": 1, "duplicate pair": 2},
    }
    assert card["harmless_safety_mix"]["val"] == {"chosen safe, rejected unsafe": 2}
    # 16 responses: unsafe are lockpick, window, and both meth answers = 4
    assert card["response_safety_labels"] == {"safe": 12, "unsafe": 4}
    # better != safer in records 2, 7 and 8 out of 8
    assert card["helpful_harmless_disagreement"] == 0.375
    # the printed table ends the run: pair counts per split and every skip reason
    assert "helpful           1        2        1        4" in stdout
    assert "helpful: reverses an earlier pair" in stdout and "harmless: duplicate pair" in stdout
    md = (out / "data_card.md").read_text()
    assert "| helpful | 1 | 2 | 1 | 4 |" in md and "37.5%" in md


def test_no_prompt_in_two_splits_and_same_result_for_same_seed(cli, tmp_path, read_jsonl):
    from humanalign.data.demo_data import write_demo_raw

    raw = write_demo_raw(tmp_path / "raw", n=600, seed=1)
    outs = []
    for name in ("a", "b"):
        code, _, err = cli("prepare-data", "--input-dir", raw.parent, "--output-dir", tmp_path / name, "--seed", "5")
        assert code == 0, err
        outs.append({(s, k): (tmp_path / name / s / f"{k}_pairs.jsonl").read_bytes()
                     for s in SPLITS for k in ("helpful", "harmless")})
    assert outs[0] == outs[1]
    prompts = {s: {json.dumps(p["prompt"]) for k in ("helpful", "harmless")
                   for p in read_jsonl(tmp_path / "a" / s / f"{k}_pairs.jsonl")} for s in SPLITS}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    counts = {s: len(read_jsonl(tmp_path / "a" / s / "helpful_pairs.jsonl")) for s in SPLITS}
    assert sum(counts.values()) == 600  # demo records have no duplicates, empty or identical answers
    assert 0.7 < counts["train"] / 600 < 0.9  # about 80% (by prompt, so not exact)


def test_growing_data_keeps_each_prompts_split(cli, tmp_path, read_jsonl, write_jsonl):
    rows = [{"prompt": f"question {i}", "chosen": "good", "rejected": "bad"} for i in range(60)]
    write_jsonl(tmp_path / "small" / "p.jsonl", rows[:30])
    write_jsonl(tmp_path / "big" / "p.jsonl", rows)
    where = []
    for name in ("small", "big"):
        assert cli("prepare-data", "--input-dir", tmp_path / name, "--output-dir", tmp_path / f"out_{name}")[0] == 0
        where.append({p["prompt"]: s for s in SPLITS for p in read_jsonl(tmp_path / f"out_{name}" / s / "helpful_pairs.jsonl")})
    assert all(where[1][prompt] == split for prompt, split in where[0].items())
    assert len(where[0]) == 30 and len(where[1]) == 60


def test_sources_list_with_pair_kind_and_ratio(cli, fixtures, tmp_path, read_jsonl):
    cfg = tmp_path / "prepare_data.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'data'}\ntrain_ratio: 1.0\nval_ratio: 0.0\ntest_ratio: 0.0\nsources:\n"
        f"  - path: {fixtures / 'hh_rlhf.jsonl'}\n    pair_kind: harmless\n"
        f"  - path: {fixtures / 'ultrafeedback_strings.jsonl'}\n"
        f"  - path: {fixtures / 'beavertails.jsonl'}\n"
        f"  - path: {fixtures / 'swift.jsonl'}\n    source: swift\n"
    )
    code, stdout, err = cli("prepare-data", "--config", cfg)
    assert code == 0, err
    helpful = read_jsonl(tmp_path / "data" / "train" / "helpful_pairs.jsonl")
    harmless = read_jsonl(tmp_path / "data" / "train" / "harmless_pairs.jsonl")
    # helpful: 2 ultrafeedback (with margins) + 2 swift pairs; the swift SFT record is counted, not used
    assert [p.get("margin") for p in helpful] == [1.0, 5.5, None, None]
    assert helpful[2]["prompt"][0] == {"role": "system", "content": "You are a careful assistant."}
    # harmless: 2 hh-rlhf (no labels) + BeaverTails: the theft prompt has 1 safe and 2 unsafe answers -> 1 pair,
    # 1 unsafe left over; the Paris answer has no unsafe counterpart -> 2 labels without a pair
    assert [(p["is_chosen_safe"], p["is_rejected_safe"]) for p in harmless] == [(None, None)] * 2 + [(True, False)]
    assert harmless[2]["rejected"].startswith("Wear loose clothing")
    card = json.loads((tmp_path / "data" / "data_card.json").read_text())
    assert card["skipped"]["records"] == {"not a preference record (SFTRecord)": 1}
    assert card["skipped"]["harmless"] == {"safety label without an opposite label for its prompt": 2}
    assert card["pairs_with_margin"] == {"helpful": 2, "harmless": 0}
    assert card["multi_turn_or_system_prompts"] == {"helpful": 1, "harmless": 1}


SHARED = shared_data_dir() / "pku-saferlhf" / "safe_vs_unsafe_pairs.jsonl"


@pytest.mark.skipif(not SHARED.is_file(), reason="shared PKU-SafeRLHF slice not present")
def test_shared_safe_vs_unsafe_through_generic_field_map(cli, tmp_path, read_jsonl):
    cfg = tmp_path / "prepare_data.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'data'}\nseed: 0\nsources:\n  - source: generic\n    path: {SHARED}\n"
        "    field_map: {prompt: prompt, chosen: safer, rejected: unsafer, is_chosen_safe: true, "
        "is_rejected_safe: false}\n"
    )
    code, stdout, err = cli("prepare-data", "--config", cfg)
    assert code == 0, err
    card = json.loads((tmp_path / "data" / "data_card.json").read_text())
    raw = sum(1 for line in SHARED.open(encoding="utf-8") if line.strip())
    assert card["sources"][0]["raw_records"] == card["sources"][0]["records"] == raw
    kept = sum(card["pairs"]["harmless"].values())
    # every record is a kept pair or a counted skip (duplicates: PKU annotates some pairs more than once)
    assert kept + sum(card["skipped"]["harmless"].values()) == raw
    assert sum(card["pairs"]["helpful"].values()) == 0
    pairs = [p for s in SPLITS for p in read_jsonl(tmp_path / "data" / s / "harmless_pairs.jsonl")]
    assert len(pairs) == kept and all(p["is_chosen_safe"] is True and p["is_rejected_safe"] is False for p in pairs)
    prompts = [{p["prompt"] for p in read_jsonl(tmp_path / "data" / s / "harmless_pairs.jsonl")} for s in SPLITS]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert sum(len(p) for p in prompts) == card["prompts"]["train"] + card["prompts"]["val"] + card["prompts"]["test"]


def test_field_map_from_the_command_line(cli, fixtures, tmp_path, read_jsonl):
    out = tmp_path / "data"
    code, _, err = cli("prepare-data", "--input-dir", fixtures / "safe_vs_unsafe.jsonl", "--output-dir", out,
                       "--source", "generic", "--record-type", "harmless", "--set", "field_map.chosen=safer",
                       "--set", "field_map.rejected=unsafer", "--train-ratio", "1", "--val-ratio", "0",
                       "--test-ratio", "0")
    assert code == 0, err
    pairs = read_jsonl(out / "train" / "harmless_pairs.jsonl")
    assert [p["chosen"][:7] for p in pairs] == ["Talk to", "I can't"]
    assert all(p["is_chosen_safe"] is None for p in pairs)  # no labels mapped: the ordering alone
