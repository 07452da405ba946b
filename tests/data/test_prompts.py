"""Prompt files (one file's prompts, several files merged, duplicates counted) and the ptx stream's batches."""

from __future__ import annotations

import pytest

from humanalign.data.prompts import PtxStream, load_prompts, load_ptx_examples, read_prompts
from humanalign.engine.data import StepBatchSampler
from humanalign.errors import RecordError


def test_read_prompts_counts_duplicates_and_names_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n{"prompt": "a "}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    prompts, duplicates = read_prompts(good)
    assert duplicates == 1  # "a " is "a" after whitespace normalisation
    assert prompts == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: field 'prompt'"):
        read_prompts(bad)


def test_prompts_and_ptx_data_with_images_are_refused_not_dropped(tmp_path):
    """A record with images stops the read with one line naming file, line and field (nothing is dropped)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "images": ["x.png"]}\n')
    with pytest.raises(RecordError, match=r"p.jsonl:2: field 'images': a prompt file does not take images"):
        read_prompts(prompts)
    prompts.write_text('{"prompt": "a", "image": "x.png"}\n')
    with pytest.raises(RecordError, match=r"p.jsonl:1: field 'image'"):
        read_prompts(prompts)
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text('{"messages": [{"role": "user", "content": "a"}], "images": ["x.png"]}\n')
    with pytest.raises(RecordError, match=r"ptx.jsonl:1: field 'images': ptx data does not take images"):
        load_ptx_examples(str(ptx), "auto", tokenizer=None, max_length=16)


def test_load_prompts_merges_files_and_keeps_each_prompt_once(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prompt": "say good"}\n{"prompt": "say  good"}\n{"prompt": [{"role": "user", "content": "x"}]}\n')
    b.write_text('{"prompt": "say good", "chosen": "good good", "rejected": "bad"}\n')
    notes = []
    prompts = load_prompts([str(a), str(b)], log=notes.append)
    # "say  good" is "say good" up to whitespace and b's prompt repeats it: 2 distinct prompts, 2 duplicates
    assert prompts == [[{"role": "user", "content": "say good"}], [{"role": "user", "content": "x"}]]
    assert notes and "2 duplicate prompts" in notes[0]
    assert load_prompts(str(a), max_prompts=1, log=notes.append) == prompts[:1]


def _stream(examples, seed: int) -> PtxStream:
    sampler = StepBatchSampler(len(examples), 2, accumulation=2, seed=seed)
    return PtxStream(examples, sampler, pad_id=0)


def test_ptx_stream_is_a_function_of_the_step():
    examples = [{"input_ids": [i, i + 1], "labels": [-100, i + 1]} for i in range(1, 8)]
    a, b = _stream(examples, seed=3), _stream(examples, seed=3)
    seen = [a.batch(step, micro)["input_ids"].tolist() for step in range(4) for micro in range(2)]
    assert [b.batch(3, 1)["input_ids"].tolist(), b.batch(0, 0)["input_ids"].tolist()] == [seen[7], seen[0]]
    firsts = {row[0] for batch in seen[:4] for row in batch}  # one epoch = 2 steps x 2 micro x 2 = 8 >= 7 examples
    assert firsts == set(range(1, 8))
