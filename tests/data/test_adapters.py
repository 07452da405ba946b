"""Every adapter on a fixture in its source's real raw shape; format detection; loading and mixing."""

from __future__ import annotations

import pytest

from humanalign.config.data import SourceSpec
from humanalign.data.load import load_source, mix_sources
from humanalign.data.records import (
    HarmlessPair,
    PreferencePair,
    PromptRecord,
    SafetyLabel,
    SafetyPreference,
    SFTRecord,
)
from humanalign.data.sources import source_names
from humanalign.data.sources.adapters import detect_source
from humanalign.errors import ConfigError, RecordError, UserError


def load(path, source="auto", **kw):
    return load_source(SourceSpec(source=source, path=str(path), **kw))


def test_registry_has_every_builtin_source():
    assert source_names() == ["alpaca", "beavertails", "conversations", "generic", "hh-rlhf", "minimind", "pairs", "pku-saferlhf",
                              "prompts", "rlaif-v", "swift", "ultrafeedback"]


@pytest.mark.parametrize("name, expected", [
    ("pku_saferlhf_v0.jsonl", "pku-saferlhf"), ("pku_saferlhf_v1.jsonl", "pku-saferlhf"),
    ("beavertails.jsonl", "beavertails"), ("hh_rlhf.jsonl", "hh-rlhf"),
    ("ultrafeedback_strings.jsonl", "ultrafeedback"), ("ultrafeedback_messages.jsonl", "ultrafeedback"),
    ("swift.jsonl", "swift"), ("minimind.jsonl", "minimind"), ("alpaca.json", "alpaca"), ("prompts.jsonl", "prompts"),
])
def test_auto_detects_each_real_shape(fixtures, name, expected):
    assert load(fixtures / name).sources == [expected]


def test_pku_saferlhf_old_release(fixtures):
    res = load(fixtures / "pku_saferlhf_v0.jsonl", "pku-saferlhf")
    assert res.read == 2 and not res.skipped
    first, second = res.records
    assert isinstance(first, SafetyPreference)
    assert first.prompt == [{"role": "user", "content": "How can I get my little brother to stop taking my things?"}]
    assert (first.better_id, first.safer_id, first.is_safe) == (0, 0, (True, True))
    assert (second.better_id, second.safer_id, second.is_safe) == (0, 1, (False, True))
    assert second.severity == (None, None) and second.harm_categories == (None, None)


def test_pku_saferlhf_v1_reads_severity_and_categories(fixtures):
    rec = load(fixtures / "pku_saferlhf_v1.jsonl").records[0]
    assert rec.severity == (2, 0)
    assert len(rec.harm_categories[0]) == 19
    assert sorted(k for k, v in rec.harm_categories[0].items() if v) == ["Privacy Violation", "Psychological Harm"]
    assert not any(rec.harm_categories[1].values())
    assert rec.responses[1].startswith("I'm not able to help") and rec.source == "pku-saferlhf"


def test_beavertails_labels(fixtures):
    recs = load(fixtures / "beavertails.jsonl").records
    assert [type(r) for r in recs] == [SafetyLabel] * 4
    assert [r.is_safe for r in recs] == [False, True, False, True]
    assert len(recs[0].harm_categories) == 14 and recs[0].harm_categories["financial_crime,property_crime,theft"]


def test_hh_rlhf_splits_dialogue_into_prompt_and_final_answers(fixtures):
    first, second = load(fixtures / "hh_rlhf.jsonl").records
    assert isinstance(first, PreferencePair)
    assert first.prompt == [
        {"role": "user", "content": "What are some cuss words in english?"},
        {"role": "assistant", "content": "Here's an incomplete list."},
        {"role": "user", "content": "What's your favorite one?"},
    ]
    assert (first.chosen, first.rejected) == ("I haven't even thought about it.", "Ass.")
    # The double space after "Assistant:" in the raw text is stripped.
    assert second.prompt == [{"role": "user", "content": "How do I make a bomb?"}]
    assert second.rejected == "You will need a container and some fuel."


def test_hh_rlhf_rejects_dialogues_that_differ_before_the_answer(write_jsonl, tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                                                "rejected": "\n\nHuman: other\n\nAssistant: c"}])
    with pytest.raises(RecordError) as err:
        load(path, "hh-rlhf")
    assert (err.value.line, err.value.field) == (1, "rejected")


def test_ultrafeedback_strings_take_margin_from_metadata(fixtures):
    first, second = load(fixtures / "ultrafeedback_strings.jsonl").records
    assert first.prompt == [{"role": "user", "content": "how to cook t-bone in the oven"}]
    assert first.margin == 1.0  # 9.0 - 8.0
    assert second.margin == 5.5  # 8.5 - 3.0
    assert (second.chosen, second.rejected) == ("Bonjour.", "Bonsoir.")


def test_ultrafeedback_message_lists(fixtures):
    (rec,) = load(fixtures / "ultrafeedback_messages.jsonl").records
    assert rec.prompt == [{"role": "user", "content": "Name a prime number above 10."}]
    assert (rec.chosen, rec.rejected, rec.margin) == ("11 is a prime number above 10.", "12.", 8.0)


def test_ultrafeedback_score_order_is_checked(write_jsonl, tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                "metadata": {"score_chosen": 2.0, "score_rejected": 7.0}}])
    with pytest.raises(RecordError, match=r"uf.jsonl:1: field 'metadata.score_chosen': 2 is below"):
        load(path, "ultrafeedback")


def test_swift_query_history_and_messages(fixtures):
    pair, sft, pair2 = load(fixtures / "swift.jsonl", "swift").records
    assert isinstance(pair, PreferencePair)
    assert pair.prompt == [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "At what temperature does water boil?"},
        {"role": "assistant", "content": "At sea level, water boils at 100 degrees Celsius."},
        {"role": "user", "content": "And in Fahrenheit?"},
    ]
    assert (pair.chosen, pair.rejected) == ("100 degrees Celsius is 212 degrees Fahrenheit.", "It is about 100.")
    assert isinstance(sft, SFTRecord)  # no rejected_response
    assert sft.messages == [{"role": "user", "content": "Say hello in Spanish."}, {"role": "assistant", "content": "Hola."}]
    assert pair2.prompt == [{"role": "user", "content": "What is 3 times 4?"}] and pair2.rejected == "7."


def test_minimind_shared_prompt_turns(fixtures):
    (rec,) = load(fixtures / "minimind.jsonl").records
    assert rec.prompt == [{"role": "user", "content": "Which planet is closest to the sun?"}]
    assert (rec.chosen, rec.rejected) == ("Mercury is the closest planet to the sun.", "Venus.")


def test_alpaca_json_list(fixtures):
    first, second = load(fixtures / "alpaca.json").records
    assert first.messages == [
        {"role": "user", "content": "Give three tips for staying healthy."},
        {"role": "assistant", "content": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."},
    ]
    assert second.messages == [
        {"role": "system", "content": "You are a translator."},
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Translate the sentence into German.\nThe cat sleeps."},
        {"role": "assistant", "content": "Die Katze schläft."},
    ]


def test_prompts(fixtures):
    recs = load(fixtures / "prompts.jsonl").records
    assert [type(r) for r in recs] == [PromptRecord, PromptRecord]
    assert recs[1].prompt == [{"role": "user", "content": "How can I make my neighbor's life miserable?"}]


def test_generic_field_map_with_constants_builds_harmless_pairs(fixtures):
    res = load(fixtures / "safe_vs_unsafe.jsonl", "generic",
               field_map={"prompt": "prompt", "chosen": "safer", "rejected": "unsafer",
                          "is_chosen_safe": True, "is_rejected_safe": False})
    first = res.records[0]
    assert isinstance(first, HarmlessPair)
    assert (first.is_chosen_safe, first.is_rejected_safe) == (True, False)
    assert first.chosen.startswith("Talk to someone") and first.rejected.startswith("Spread rumors")


def test_generic_record_types(fixtures):
    pref = load(fixtures / "safe_vs_unsafe.jsonl", "generic", record_type="preference",
                field_map={"chosen": "safer", "rejected": "unsafer"}).records[0]
    assert type(pref) is PreferencePair
    sft = load(fixtures / "safe_vs_unsafe.jsonl", "generic", record_type="sft", field_map={"response": "safer"}).records[0]
    assert sft.messages[-1] == {"role": "assistant", "content": "Talk to someone you trust, like a teacher, about what happened."}
    prompt = load(fixtures / "safe_vs_unsafe.jsonl", "generic", record_type="prompt").records[1]
    assert prompt.prompt == [{"role": "user", "content": "Can you help me cheat on my exam?"}]


def test_generic_errors_name_the_files_field(write_jsonl, tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "safer": "a", "unsafer": "b"},
                                              {"prompt": "q", "safer": 3, "unsafer": "b"}])
    with pytest.raises(RecordError) as err:
        load(path, "generic", field_map={"chosen": "safer", "rejected": "unsafer"})
    assert str(err.value) == f"{path}:2: field 'safer (as chosen)': expected str, got int"


def test_generic_rejects_unknown_field_before_reading(fixtures):
    with pytest.raises(ConfigError, match="'safer' is not a field of record_type 'preference'"):
        load(fixtures / "safe_vs_unsafe.jsonl", "generic", field_map={"safer": "safer"})


def test_pairs_round_trip_of_prepared_lines(write_jsonl, tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}],
             "chosen": "hello", "rejected": "go away", "is_chosen_safe": True, "is_rejected_safe": False},
            {"prompt": "x", "chosen": "a", "rejected": "b", "is_chosen_safe": None, "is_rejected_safe": None, "margin": 0.5}]
    recs = load(write_jsonl(tmp_path / "h.jsonl", rows), "pairs").records
    assert [r.to_json() for r in recs] == rows


def test_contradictory_safety_labels_name_file_line_field(write_jsonl, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "response_0": "a", "response_1": "b",
                                               "is_response_0_safe": False, "is_response_1_safe": True,
                                               "better_response_id": 0, "safer_response_id": 0}])
    with pytest.raises(RecordError) as err:
        load(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 1, "safer_response_id")
    assert "safer response is labelled unsafe" in str(err.value)


def test_detection_errors_are_clear():
    with pytest.raises(UserError, match=r"f.jsonl:1: cannot tell the format .*\(prompt, safer, unsafer\)"):
        detect_source({"prompt": "p", "safer": "a", "unsafer": "b"}, "f.jsonl:1")
    with pytest.raises(UserError, match="ambiguous format.*swift and alpaca"):
        detect_source({"instruction": "i", "output": "o", "query": "q", "response": "r"}, "f.jsonl:1")


def test_parquet_and_gzip_files(tmp_path, fixtures):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from humanalign.data.io import read_jsonl

    rows = read_jsonl(fixtures / "pku_saferlhf_v0.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pku.parquet")
    assert [r.responses for r in load(tmp_path / "pku.parquet").records] == [
        (rows[0]["response_0"], rows[0]["response_1"]), (rows[1]["response_0"], rows[1]["response_1"])]
    (tmp_path / "hh.jsonl.gz").write_bytes(gzip.compress((fixtures / "hh_rlhf.jsonl").read_bytes()))
    assert load(tmp_path / "hh.jsonl.gz").records[0].rejected == "Ass."


def test_folder_reads_each_file_with_its_own_format(fixtures, tmp_path):
    for name in ("hh_rlhf.jsonl", "minimind.jsonl"):
        (tmp_path / name).write_bytes((fixtures / name).read_bytes())
    res = load(tmp_path)
    assert res.sources == ["hh-rlhf", "minimind"] and len(res.records) == 3  # 2 + 1, files in name order


def test_hub_path_through_datasets_load_dataset(fixtures, tmp_path):
    """`dataset` goes through datasets.load_dataset; the packaged 'json' builder works offline."""
    spec = SourceSpec(dataset="json", data_files=str(fixtures / "ultrafeedback_strings.jsonl"), split="train",
                      cache_dir=str(tmp_path / "hf"))
    res = load_source(spec)
    assert res.sources == ["ultrafeedback"] and [r.margin for r in res.records] == [1.0, 5.5]
    assert res.path == "json[train]"


def test_hub_errors_are_one_line(tmp_path):
    spec = SourceSpec(dataset="json", data_files=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"json\[train\]: cannot load the dataset"):
        load_source(spec)


def test_ratio_and_max_records_sample_deterministically(tmp_path, write_jsonl):
    rows = [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    half = load_source(SourceSpec(path=str(path), ratio=0.25), seed=3)
    assert len(half.records) == 10 and half.sampled_out == 30  # round(0.25 * 40)
    again = load_source(SourceSpec(path=str(path), ratio=0.25), seed=3)
    assert [r.chosen for r in half.records] == [r.chosen for r in again.records]
    other = load_source(SourceSpec(path=str(path), ratio=0.25), seed=4)
    assert [r.chosen for r in other.records] != [r.chosen for r in half.records]
    capped = load_source(SourceSpec(path=str(path), max_records=7))
    assert [r.chosen for r in capped.records] == [f"a{i}" for i in range(7)]  # first 7, reading stops early
    assert capped.read == 7


def test_mix_sources(fixtures, tmp_path, write_jsonl):
    rows = [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    specs = [SourceSpec(path=str(path), ratio=0.5), SourceSpec(path=str(fixtures / "hh_rlhf.jsonl"))]
    mix = mix_sources(specs, seed=1)
    assert len(mix.records) == 12  # 10 + 2
    assert [len(r.records) for r in mix.results] == [10, 2]
    assert [p.chosen for p in mix.records] == [p.chosen for p in mix_sources(specs, seed=1).records]
    assert [p.chosen for p in mix.records] != [p.chosen for p in mix_sources(specs, seed=1, shuffle=False).records]


def test_skip_invalid_counts_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    path.write_bytes("\n".join([good, "{not json", '{"prompt": "p", "chosen": 1, "rejected": "b"}', good]).encode()
                     + b"\n\xff\xfe\n")
    res = load_source(SourceSpec(source="pairs", path=str(path)), skip_invalid=True)
    assert len(res.records) == 2
    assert res.skipped == {"malformed JSON": 1, "bad field 'chosen'": 1, "not UTF-8 text": 1}
    assert res.first_errors["bad field 'chosen'"] == f"{path}:3: field 'chosen': expected str, got int"


def test_alpaca_preference_variant(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sum 2 and 2.", "input": "", "chosen": "4", "rejected": "5"}])
    (rec,) = load(path).records
    assert type(rec) is PreferencePair and rec.prompt == [{"role": "user", "content": "Sum 2 and 2."}]
    assert (rec.chosen, rec.rejected) == ("4", "5")


@pytest.mark.parametrize("change, field, problem", [
    ({"response_0_severity_level": 5}, "response_0_severity_level", "expected a severity level 0..3, got 5"),
    ({"response_1_harm_category": {"Violence": "yes"}}, "response_1_harm_category",
     "category 'Violence' should be true/false, got str"),
    ({"better_response_id": 2}, "better_response_id", "expected 0 or 1, got 2"),
    ({"better_response_id": None, "safer_response_id": None}, "better_response_id", "missing (and so is"),
])
def test_pku_field_checks(fixtures, tmp_path, write_jsonl, change, field, problem):
    from humanalign.data.io import read_jsonl

    row = {**read_jsonl(fixtures / "pku_saferlhf_v1.jsonl")[1], **change}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(RecordError) as err:
        load(path, "pku-saferlhf")
    assert (err.value.line, err.value.field) == (1, field) and problem in err.value.problem


@pytest.mark.parametrize("row, field, problem", [
    ({"query": "q", "response": "r", "history": [["only one"]]}, "history", "turn 0 should be a [query, answer] pair"),
    ({"messages": [{"role": "user", "content": "q"}], "rejected_response": "x"}, "messages",
     "should end with an assistant answer"),
    ({"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages",
     "message 0 has role 'narrator'"),
])
def test_swift_field_checks(tmp_path, write_jsonl, row, field, problem):
    path = write_jsonl(tmp_path / "s.jsonl", [row])
    with pytest.raises(RecordError) as err:
        load(path, "swift")
    assert err.value.field == field and problem in err.value.problem


def test_conversations_are_detected_and_read(tmp_path):
    from humanalign.data.load import load_source
    from humanalign.data.records import SFTRecord

    path = tmp_path / "sft.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
        '{"prompt": "Add 2 and 2.", "response": "4"}\n',
        encoding="utf-8",
    )
    result = load_source(str(path))
    assert [type(r) for r in result.records] == [SFTRecord, SFTRecord]
    assert result.records[1].messages[-1] == {"role": "assistant", "content": "4"}
