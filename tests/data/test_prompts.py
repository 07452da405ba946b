"""Prompt files (one file's prompts with their images, several files merged, duplicates counted, the refusals of
text-only consumers) and the ptx stream's batches."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from humanalign.config.ppo import PPOConfig
from humanalign.data.prompts import (
    PtxStream,
    encode_prompts,
    load_online_prompts,
    load_prompts,
    load_ptx_examples,
    prompt_hash,
    read_prompt_records,
    read_prompts,
)
from humanalign.engine.data import StepBatchSampler
from humanalign.errors import RecordError
from humanalign.models.load import load_tokenizer


def test_read_prompts_counts_duplicates_and_names_bad_lines(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n{"prompt": "a "}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    prompts, duplicates = read_prompts(good)
    assert duplicates == 1  # "a " is "a" after whitespace normalisation
    assert prompts == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: field 'prompt': missing"):
        read_prompts(bad)
    bad.write_text('{"prompt": "  "}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:1: field 'prompt': empty"):
        read_prompts(bad)
    bad.write_text('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:1: field 'prompt': a prompt must end with a user turn"):
        read_prompts(bad)


@pytest.fixture
def pics(tmp_path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (8, 8), (220, 40, 40)).save(folder / "red.png")
    Image.new("RGB", (8, 8), (40, 80, 220)).save(folder / "blue.png")
    return folder


def test_prompt_records_carry_their_images_in_every_prompt_format(pics, write_jsonl):
    green = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 200, 40)).save(green, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(green.getvalue()).decode()
    path = write_jsonl(pics.parent / "p.jsonl", [
        {"prompt": "<image>What colour?", "images": ["pics/red.png"], "category": "colour"},  # ours
        {"query": "What colour?", "images": ["pics/blue.png"], "system": "Be brief.",  # ms-swift, no answer
         "history": [["Hi", "Hello"]]},
        {"question": "What colour?", "image": uri},  # RLAIF-V style, a data: URI
        {"prompt": [{"role": "user", "content": [{"type": "image", "image": "pics/red.png"},  # OpenAI parts
                                                 {"type": "text", "text": "Same?"},
                                                 {"type": "image_url", "image_url": {"url": "pics/blue.png"}}]}]},
        {"prompt": "What colour?"},  # text only
        {"prompt": "What colour?", "images": ["pics/blue.png"]},  # same text, another picture: another prompt
        {"prompt": "What  colour?", "images": ["pics/blue.png"]},  # the same prompt again: a duplicate
    ])
    records, duplicates = read_prompt_records(path)
    red, blue = str(pics / "red.png"), str(pics / "blue.png")
    assert duplicates == 1 and len(records) == 6
    assert [r.images for r in records] == [[red], [blue], [uri], [red, blue], [], [blue]]
    assert records[1].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What colour?"}]
    assert records[3].prompt == [{"role": "user", "content": "<image>\nSame?\n<image>"}]
    assert records[0].to_json() == {"prompt": "<image>What colour?", "images": [red]}
    assert records[4].to_json() == {"prompt": "What colour?"}  # text-only records are written as before
    # The hash of a text prompt is unchanged; the same text with a picture is another prompt.
    assert prompt_hash(records[4].prompt) == prompt_hash(records[4].prompt, records[4].images)
    assert len({prompt_hash(r.prompt, r.images) for r in records}) == 6
    assert read_prompt_records(path, limit=2)[0] == records[:2]


def test_parquet_prompt_files_with_image_structs_write_the_pictures_to_the_cache(pics, monkeypatch, tmp_path):
    """A parquet export of a datasets Image column ({"bytes", "path"} structs): the bytes become a cached file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HUMANALIGN_CACHE", str(tmp_path / "cache"))
    red = (pics / "red.png").read_bytes()
    pq.write_table(pa.table({"image": [{"bytes": red, "path": "red.png"}], "question": ["What colour?"]}),
                   pics.parent / "prompts.parquet")
    (record,), _ = read_prompt_records(pics.parent / "prompts.parquet")
    (written,) = record.images
    assert Path(written).parent == (tmp_path / "cache" / "images").resolve() and Path(written).read_bytes() == red


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "x", "images": ["pics/gone.png"]}, r"p.jsonl:1: field 'images\[0\]': image 'pics/gone.png' not found"),
    ({"prompt": "<image> <image>", "images": ["pics/red.png"]}, r"p.jsonl:1: field 'images': 2 '<image>' placeholders"),
    ({"question": "x", "image": "https://x.org/a.png"}, r"p.jsonl:1: field 'image': image 'https://x.org/a.png' is a"),
    ({"prompt": "x", "images": ["data:image/png;base64,@@"]}, r"field 'images\[0\]': image .* bad data URI"),
    ({"prompt": "x", "images": ["p.jsonl"]}, r"field 'images\[0\]': image 'p.jsonl' is not a readable image"),
])
def test_bad_images_in_prompt_files_name_file_line_field_and_image(pics, write_jsonl, row, expected):
    path = write_jsonl(pics.parent / "p.jsonl", [row])
    with pytest.raises(RecordError, match=expected):
        read_prompt_records(path)


def test_a_prompt_with_more_images_than_the_model_takes_names_file_line_and_field(pics, write_jsonl):
    two = ["pics/red.png", "pics/blue.png"]
    path = write_jsonl(pics.parent / "p.jsonl", [{"prompt": "a", "images": ["pics/red.png"]},
                                                 {"query": "b", "images": two}])
    assert [len(r.images) for r in read_prompt_records(path, max_images=2)[0]] == [1, 2]
    with pytest.raises(RecordError, match=r"p.jsonl:2: field 'images': 2 images, the model takes at most 1 per "
                                          r"prompt \(set max_images_per_prompt to change\)"):
        read_prompt_records(path, max_images=1)
    parts = [{"type": "image", "image": p} for p in two]
    write_jsonl(path, [{"prompt": [{"role": "user", "content": [*parts, {"type": "text", "text": "Which?"}]}]}])
    with pytest.raises(RecordError, match=r"p.jsonl:1: field 'prompt': 2 images, the model takes at most 1"):
        read_prompt_records(path, max_images=1)


def test_text_only_consumers_refuse_image_prompts_naming_the_commands_that_take_them(pics, write_jsonl):
    """PPO/GRPO rollouts (load_prompts), any text-only read_prompts and PPO's ptx data: one line, never a drop."""
    path = write_jsonl(pics.parent / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "images": ["pics/red.png"]}])
    takes = "they are taken by `generate`, `eval arena` and `distill` with a vision-language model"
    with pytest.raises(RecordError, match=rf"p.jsonl:2: field 'images': prompts with images are not taken by PPO "
                                          rf"and GRPO rollouts \(text only\); {takes}"):
        load_prompts(str(path))
    write_jsonl(path, [{"question": "a", "image": "pics/gone.png"}])  # refused before the image is even looked for
    with pytest.raises(RecordError, match=r"p.jsonl:1: field 'image': prompts with images are not taken by this"):
        read_prompts(path)
    write_jsonl(path, [{"prompt": [{"role": "user", "content": [{"type": "image", "image": "pics/red.png"}]}]}])
    with pytest.raises(RecordError, match=r"p.jsonl:1: field 'prompt': prompts with images are not taken by `train x`"):
        read_prompts(path, consumer="`train x`")
    ptx = pics.parent / "ptx.jsonl"
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


def test_load_online_prompts_reads_encodes_and_holds_out(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"prompt": "a b c d e f g h"}\n{"prompt": "x"}\n{"prompt": "x"}\n{"prompt": "y"}\n')
    held.write_text('{"prompt": "p"}\n{"prompt": "q"}\n')
    tokenizer, notes = load_tokenizer("tiny"), []
    cfg = PPOConfig(reward_fn="m:f", prompts_path=str(train), max_prompts=2, max_prompt_length=8)
    prompts, ids, held_out = load_online_prompts(cfg, tokenizer, notes.append, "ppo")
    assert prompts == load_prompts(str(train), 2, log=notes.append)
    assert [p[0]["content"] for p in prompts] == ["a b c d e f g h", "x"]  # the duplicate skipped, then cut at 2
    assert ids == encode_prompts(tokenizer, prompts, 8, notes.append, "ppo") and max(map(len, ids)) <= 8
    assert held_out == []  # no eval_prompts_path
    cfg = cfg.model_copy(update={"eval_prompts_path": str(held), "eval_max_prompts": 1})
    assert [p[0]["content"] for p in load_online_prompts(cfg, tokenizer, notes.append, "ppo")[2]] == ["p"]


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
