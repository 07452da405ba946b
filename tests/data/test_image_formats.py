"""Images in the data: every accepted image format, the bad-input errors, the split by image content, the card."""

from __future__ import annotations

import base64
import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from humanalign.config.data import SourceSpec
from humanalign.data.images import image_digest, split_key
from humanalign.data.load import load_source
from humanalign.data.records import PreferencePair, SFTRecord, user_prompt
from humanalign.errors import RecordError

RED, BLUE = (220, 40, 40), (40, 80, 220)


def picture(colour, size: int = 12) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


@pytest.fixture
def pics(tmp_path) -> Path:
    """tmp/raw/pics/{red,blue}.png and tmp/raw/pics/red_copy.png (the red bytes under another name)."""
    folder = tmp_path / "raw" / "pics"
    folder.mkdir(parents=True)
    picture(RED).save(folder / "red.png")
    picture(BLUE).save(folder / "blue.png")
    (folder / "red_copy.png").write_bytes((folder / "red.png").read_bytes())
    return folder


def load(path, source="auto", **kw):
    return load_source(SourceSpec(source=source, path=str(path), **kw))


def test_swift_images_resolve_against_the_data_file_and_data_uris_stay_as_given(pics, write_jsonl):
    uri = data_uri(picture(BLUE))
    path = write_jsonl(pics.parent / "swift.jsonl", [
        {"query": "<image>What colour is it?", "response": "Red.", "rejected_response": "Blue.",
         "images": ["pics/red.png"], "system": "Be brief."},
        {"query": "Compare <image> and <image>.", "response": "Red, then blue.", "rejected_response": "Same.",
         "images": ["pics/red.png", uri], "history": [["Hi", "Hello"]]},
        {"query": "<image>Describe it.", "response": "A red square.", "images": "pics/red.png"},  # SFT, one image
    ])
    res = load(path)
    assert res.sources == ["swift"]
    first, second, sft = res.records
    assert first.images == [str((pics / "red.png").resolve())]
    assert first.prompt[0] == {"role": "system", "content": "Be brief."}
    assert second.images == [str((pics / "red.png").resolve()), uri]
    assert [m["role"] for m in second.prompt] == ["user", "assistant", "user"]
    assert isinstance(sft, SFTRecord) and sft.images == [str((pics / "red.png").resolve())]
    assert sft.to_json()["images"] == sft.images
    assert first.to_json() == {"prompt": first.prompt, "chosen": "Red.", "rejected": "Blue.",
                               "images": first.images}


def test_text_only_records_serialise_exactly_as_before():
    pair = PreferencePair(user_prompt("Hi"), "Hello", "Go away")
    assert json.dumps(pair.to_json()) == '{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}'
    assert SFTRecord([{"role": "user", "content": "Hi"}]).to_json() == {"messages": [{"role": "user", "content": "Hi"}]}


def test_rlaif_v_rows_with_a_path_and_with_parquet_image_bytes(pics, write_jsonl, tmp_path):
    path = write_jsonl(pics.parent / "rlaif.jsonl", [
        {"image": "pics/blue.png", "question": "What colour?", "chosen": "Blue.", "rejected": "Red.", "idx": 3}])
    (pair,) = load(path).records
    assert load(path).sources == ["rlaif-v"]
    assert pair.prompt == user_prompt("What colour?") and pair.images == [str((pics / "blue.png").resolve())]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": png_bytes(picture(RED)), "path": "red.png"}],
                      "question": ["What colour?"], "chosen": ["Red."], "rejected": ["Blue."]})
    pq.write_table(table, pics.parent / "rlaif.parquet")
    cache = tmp_path / "image_cache"
    (pair,) = load_source(SourceSpec(path=str(pics.parent / "rlaif.parquet")), image_dir=str(cache)).records
    (written,) = pair.images
    assert Path(written).parent == cache.resolve() and Path(written).suffix == ".png"
    assert image_digest(written) == image_digest(str(pics / "red.png"))  # the very bytes of the struct


def test_datasets_image_column_is_written_to_files(monkeypatch, tmp_path):
    import datasets

    rows = {"image": [picture(RED), picture(BLUE)], "question": ["Colour?", "Colour?"],
            "chosen": ["Red.", "Blue."], "rejected": ["Blue.", "Red."]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dataset)
    res = load_source(SourceSpec(dataset="someone/vision-prefs", source="rlaif-v"), image_dir=str(tmp_path / "img"))
    refs = [p.images[0] for p in res.records]
    assert all(Path(r).is_file() and Path(r).parent == (tmp_path / "img").resolve() for r in refs)
    colours = [Image.open(r).convert("RGB").getpixel((3, 3)) for r in refs]
    assert colours == [RED, BLUE]  # each row keeps its own picture, in order


def test_openai_style_content_parts(pics, write_jsonl):
    uri = data_uri(picture(RED))
    user = {"role": "user", "content": [
        {"type": "image", "image": "pics/blue.png"},
        {"type": "text", "text": "What colour is this, and this?"},
        {"type": "image_url", "image_url": {"url": uri}},
    ]}
    path = write_jsonl(pics.parent / "minimind.jsonl", [{
        "chosen": [user, {"role": "assistant", "content": "Blue, then red."}],
        "rejected": [user, {"role": "assistant", "content": "Green."}],
    }])
    (pair,) = load(path).records
    assert pair.prompt == [{"role": "user", "content": "<image>\nWhat colour is this, and this?\n<image>"}]
    assert pair.images == [str((pics / "blue.png").resolve()), uri]
    conversations = write_jsonl(pics.parent / "conv.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "pics/red.png"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "A red square."}]}])
    (sft,) = load(conversations).records
    assert sft.images == [str((pics / "red.png").resolve())] and sft.messages[0]["content"] == "<image>\nHi"


def test_rejected_must_show_the_same_images(pics, write_jsonl):
    def turn(name):
        return {"role": "user", "content": [{"type": "image", "image": f"pics/{name}.png"},
                                            {"type": "text", "text": "Colour?"}]}
    path = write_jsonl(pics.parent / "m.jsonl", [{
        "chosen": [turn("red"), {"role": "assistant", "content": "Red."}],
        "rejected": [turn("blue"), {"role": "assistant", "content": "Blue."}]}])
    with pytest.raises(RecordError, match="m.jsonl:1: field 'rejected': its images differ"):
        load(path)


@pytest.mark.parametrize("row, match", [
    ({"images": ["pics/nope.png"]}, r"swift.jsonl:1: field 'images\[0\]': image 'pics/nope.png' not found"),
    ({"images": ["pics/broken.png"]}, r"field 'images\[0\]': image 'pics/broken.png' is not a readable image"),
    ({"images": ["data:image/png;base64,@@@"]}, r"field 'images\[0\]': image 'data:image/png;base64,@@@': bad data"),
    ({"images": ["https://example.org/a.png"]}, r"is a web address"),
    ({"images": ["pics/red.png", "pics/blue.png"]},
     r"field 'images': more images than '<image>' placeholders \(2 > 1\): image 2 '.*blue.png' has no placeholder"),
    ({"images": None, "query": "<image> and <image>?"}, r"field 'query': 2 '<image>' placeholders but 0 images"),
    ({"images": ["pics/red.png"], "query": "<image> and <image>?"},
     r"field 'images': 2 '<image>' placeholders but 1 image$"),
    ({"images": 7}, r"field 'images': expected an image path, a data: URI or an image, got int"),
])
def test_bad_images_name_file_line_field_and_image(pics, write_jsonl, row, match):
    (pics / "broken.png").write_text("not a picture")
    record = {"query": "<image>Colour?", "response": "Red.", "rejected_response": "Blue.", **row}
    path = write_jsonl(pics.parent / "swift.jsonl", [record])
    with pytest.raises(RecordError, match=match):
        load(path)


def test_bad_image_through_prepare_data_is_one_line_and_exit_2(pics, write_jsonl, cli, tmp_path):
    write_jsonl(pics.parent / "swift.jsonl", [
        {"query": "<image>Colour?", "response": "Red.", "rejected_response": "Blue.", "images": ["pics/red.png"]},
        {"query": "<image>Colour?", "response": "Red.", "rejected_response": "Blue.", "images": ["pics/gone.png"]}])
    code, _, err = cli("prepare-data", "--input-dir", pics.parent / "swift.jsonl", "--output-dir", tmp_path / "out")
    assert code == 2
    assert err.strip().count("\n") == 0 and "swift.jsonl:2: field 'images[0]': image 'pics/gone.png' not found" in err
    assert not (tmp_path / "out" / "train").exists()


def test_more_images_than_the_model_takes_stop_the_load_or_are_counted_under_skip_invalid(pics, write_jsonl):
    path = write_jsonl(pics.parent / "swift.jsonl", [
        {"query": "<image>Colour?", "response": "Red.", "rejected_response": "Blue.", "images": ["pics/red.png"]},
        {"query": "<image> or <image>?", "response": "Red.", "rejected_response": "Blue.",
         "images": ["pics/red.png", "pics/blue.png"]}])
    assert len(load_source(SourceSpec(path=str(path)), max_images=2).records) == 2
    with pytest.raises(RecordError, match=r"swift.jsonl:2: field 'images': 2 images, the model takes at most 1 "
                                          r"per prompt \(set max_images_per_prompt to change\)"):
        load_source(SourceSpec(path=str(path)), max_images=1)
    result = load_source(SourceSpec(path=str(path)), skip_invalid=True, max_images=1)
    assert len(result.records) == 1 and result.skipped == {"bad field 'images'": 1}


def test_split_key_is_prompt_plus_image_content(pics):
    red, copy, blue = (str(pics / n) for n in ("red.png", "red_copy.png", "blue.png"))
    same = PreferencePair(user_prompt("Colour?"), "Red.", "Blue.", images=[red])
    assert split_key(same) == split_key(PreferencePair(user_prompt("Colour?"), "A", "B", images=[copy]))
    assert split_key(same) != split_key(PreferencePair(user_prompt("Colour?"), "A", "B", images=[blue]))
    assert split_key(PreferencePair(user_prompt("Colour?"), "A", "B")) == split_key(
        PreferencePair(user_prompt("Colour?"), "C", "D"))  # text only: the text key alone, as before


def test_prepare_data_never_splits_a_picture_question_pair(tmp_path, write_jsonl, cli, read_jsonl):
    """40 different pictures under one question spread over the splits; each picture, asked twice under two
    file names with different answers, stays in one split; the data card counts the images."""
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    rows = []
    for i in range(40):
        img = picture((i * 6, 255 - i * 6, 90))
        img.save(raw / "img" / f"{i}.png")
        img.save(raw / "img" / f"{i}_again.png")
        rows.append({"query": "<image>What colour?", "response": f"Colour {i}.", "rejected_response": "No idea.",
                     "images": [f"img/{i}.png"]})
        rows.append({"query": "<image>What colour?", "response": f"It is colour {i}.", "rejected_response": "Grey.",
                     "images": [f"img/{i}_again.png"]})
    write_jsonl(raw / "pairs.jsonl", rows)
    out = tmp_path / "out"
    code, _, err = cli("prepare-data", "--input-dir", raw / "pairs.jsonl", "--output-dir", out, "--seed", "3")
    assert code == 0, err
    split_of_picture: dict[str, set[str]] = defaultdict(set)
    total = 0
    for split in ("train", "val", "test"):
        for line in read_jsonl(out / split / "helpful_pairs.jsonl"):
            assert line["prompt"] == "<image>What colour?" and Path(line["images"][0]).is_absolute()
            split_of_picture[image_digest(line["images"][0])].add(split)
            total += 1
    assert total == 80  # different answers: nothing deduplicated away
    assert len(split_of_picture) == 40 and all(len(s) == 1 for s in split_of_picture.values())
    assert len(set().union(*split_of_picture.values())) == 3  # the same question still reaches every split
    card = json.loads((out / "data_card.json").read_text())
    assert card["images_per_pair"]["helpful"] == {"1": 80} and card["images"]["helpful"] == 80
    assert "## Images" in (out / "data_card.md").read_text()
    # the prepared file reads back (pairs source) with the same images
    again = load(out / "train" / "helpful_pairs.jsonl", source="pairs").records
    assert all(len(p.images) == 1 and Path(p.images[0]).is_file() for p in again)


def test_same_picture_same_question_same_answers_is_a_duplicate(pics, write_jsonl, cli, tmp_path, read_jsonl):
    rows = [{"query": "<image>Colour?", "response": "Red.", "rejected_response": "Blue.", "images": [f"pics/{n}"]}
            for n in ("red.png", "red_copy.png", "blue.png")]
    write_jsonl(pics.parent / "dups.jsonl", rows)
    code, out, err = cli("prepare-data", "--input-dir", pics.parent / "dups.jsonl", "--output-dir", tmp_path / "o",
                         "--train-ratio", "1", "--val-ratio", "0", "--test-ratio", "0")
    assert code == 0, err
    kept = read_jsonl(tmp_path / "o" / "train" / "helpful_pairs.jsonl")
    assert [Path(p["images"][0]).name for p in kept] == ["red.png", "blue.png"]  # red_copy: same bytes, dropped
    assert "duplicate pair" in out


def test_text_only_consumers_refuse_images_instead_of_dropping_them(pics, write_jsonl):
    from humanalign.data.pairs import load_preference_pairs
    from humanalign.errors import UserError

    path = write_jsonl(pics.parent / "swift.jsonl", [
        {"query": "<image>Colour?", "response": "Red.", "rejected_response": "Blue.", "images": ["pics/red.png"]},
        {"query": "Hi", "response": "Hello.", "rejected_response": "Go."}])
    with pytest.raises(UserError, match=r"swift.jsonl: 1 of 2 records carry images, which training and evaluation"):
        load_preference_pairs(path)


def test_a_source_that_reads_no_images_cannot_lose_them(pics, write_jsonl):
    path = write_jsonl(pics.parent / "pku.jsonl", [{
        "prompt": "Is this safe?", "image": "pics/red.png", "response_0": "Yes.", "response_1": "No.",
        "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}])
    with pytest.raises(RecordError, match="pku.jsonl:1: field 'image': source 'pku-saferlhf' does not read images"):
        load(path)
    prompts = write_jsonl(pics.parent / "prompts.jsonl", [{"prompt": "Colour?", "images": ["pics/red.png"]},
                                                          {"query": "Colour?", "image": "pics/blue.png"}])
    # the prompts source reads images (PromptRecord.images), in our format and ms-swift's; detected as prompts
    assert [r.images for r in load(prompts).records] == [[str(pics / "red.png")], [str(pics / "blue.png")]]
