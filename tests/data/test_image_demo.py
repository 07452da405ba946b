"""The generated vision preference set: deterministic, correct answers chosen, readable by the swift adapter."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

from humanalign.data.image_demo import (
    ANSWERS,
    COLOURS,
    FIXED_COLOUR,
    QUESTIONS,
    image_demo_records,
    image_demo_texts,
    write_image_demo,
)
from humanalign.data.load import load_source


def digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    write_image_demo(tmp_path / "a", n=24, seed=5)
    write_image_demo(tmp_path / "b", n=24, seed=5)
    write_image_demo(tmp_path / "c", n=24, seed=6)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 24


def test_colour_answers_match_the_pixels():
    """The chosen colour is drawn in the picture and the rejected colour is not."""
    checked = 0
    for record, picture in image_demo_records(40, seed=1):
        if not record["query"].endswith("What colour is the shape?"):
            continue
        pixels = set(picture.getdata())
        chosen = re.search(r"is (\w+)\.$", record["response"]).group(1)
        rejected = re.search(r"is (\w+)\.$", record["rejected_response"]).group(1)
        assert COLOURS[chosen] in pixels and COLOURS[rejected] not in pixels
        checked += 1
    assert checked == 10


def test_side_and_count_answers_match_the_pixels():
    checked = {"side": 0, "count": 0}
    for record, picture in image_demo_records(40, seed=2):
        question = record["query"].split("\n", 1)[1]
        coloured = [(i % picture.width, i // picture.width) for i, c in enumerate(picture.getdata())
                    if c != (255, 255, 255)]
        assert {c for c in picture.getdata()} <= {(255, 255, 255), *COLOURS.values()}
        if question.startswith("Is the square"):
            # one square, in one half: its pixels' mean x says which
            x = sum(x for x, _ in coloured) / len(coloured)
            side = "left" if x < picture.width / 2 else "right"
            assert record["response"] == f"The square is on the {side}." != record["rejected_response"]
            assert {picture.getpixel(p) for p in coloured} == {COLOURS[FIXED_COLOUR]}
            checked["side"] += 1
        if question.startswith("How many circles"):
            n = int(re.search(r"(\d+) circle", record["response"]).group(1))
            wrong = int(re.search(r"(\d+) circle", record["rejected_response"]).group(1))
            assert 1 <= n <= 4 and 1 <= wrong <= 4 and wrong != n
            # circles sit one per quarter of the picture: count the quarters whose centre is coloured
            q = picture.width // 4
            centres = [picture.getpixel((x, y)) for x in (q, 3 * q) for y in (q, 3 * q)]
            assert sum(c == COLOURS[FIXED_COLOUR] for c in centres) == n
            checked["count"] += 1
    assert checked == {"side": 10, "count": 10}


def test_a_shape_fills_most_of_its_picture():
    """Legible to a tiny random-init tower: the colour and shape questions' shape covers a quarter or more of the
    picture, the placed square a tenth or more (half to nearly all of its quarter)."""
    for record, picture in image_demo_records(40, seed=4, size=32):
        share = sum(c != (255, 255, 255) for c in picture.getdata()) / (32 * 32)
        question = record["query"].split("\n", 1)[1]
        if question.startswith(("What colour", "What shape")):
            assert share >= 0.25, question
        elif question.startswith("Is the square"):
            assert share >= 0.1, question


def test_the_swift_adapter_reads_it_with_resolved_images(tmp_path):
    path = write_image_demo(tmp_path / "demo", n=len(QUESTIONS) * 3, seed=0)
    res = load_source(str(path))
    assert res.sources == ["swift"] and len(res.records) == 12
    for rec, line in zip(res.records, path.read_text().splitlines()):
        raw = json.loads(line)
        assert rec.images == [str((path.parent / raw["images"][0]).resolve())]
        assert rec.prompt[-1]["content"].startswith("<image>\n") and rec.chosen == raw["response"]
    assert any(len(rec.prompt) == 3 for rec in res.records)  # history records
    assert any(rec.prompt[0]["role"] == "system" for rec in res.records)


def test_text_alone_cannot_tell_the_answers_apart():
    """Per question, each candidate answer is chosen as often as rejected, and each ordered (chosen, rejected)
    pair of answers as often as its reverse: only the picture says which answer is right."""
    records = image_demo_records(len(QUESTIONS) * 120, seed=3)
    for kind, answers in ANSWERS.items():
        pairs = Counter()
        for record, _ in records:
            if record["query"] == f"<image>\n{QUESTIONS[kind](random.Random(0), 64, *answers[:2])[1]}":
                pairs[(answer_word(record["response"], answers), answer_word(record["rejected_response"], answers))] += 1
        assert sum(pairs.values()) == 120
        chosen = Counter(c for (c, _), n in pairs.items() for _ in range(n))
        rejected = Counter(r for (_, r), n in pairs.items() for _ in range(n))
        assert chosen == rejected and len(set(chosen.values())) == 1, kind
        assert all(pairs[(a, b)] == pairs[(b, a)] for a, b in pairs), kind


def answer_word(text: str, answers) -> str:
    found = [a for a in answers if re.search(rf"\b{a}\b", text)]
    return found[-1]


def test_blank_control_keeps_the_pairs_and_whitens_the_pictures(tmp_path):
    from PIL import Image

    from humanalign.data.image_demo import blank_pictures

    path = write_image_demo(tmp_path / "set", n=8, seed=0)
    before = [json.loads(line) for line in path.read_text().splitlines()]
    blank_pictures(path, tmp_path / "blank.png", 32)
    after = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{**r, "images": None} for r in after] == [{**r, "images": None} for r in before]
    assert {img for r in after for img in r["images"]} == {str((tmp_path / "blank.png").resolve())}
    assert set(Image.open(tmp_path / "blank.png").getdata()) == {(255, 255, 255)}


def test_texts_list_every_question_and_answer_once(tmp_path):
    path = write_image_demo(tmp_path / "set", n=24, seed=0)
    texts = image_demo_texts(path)
    assert len(texts) == len(set(texts))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        assert {row["query"].split("\n", 1)[1], row["response"], row["rejected_response"]} <= set(texts)
