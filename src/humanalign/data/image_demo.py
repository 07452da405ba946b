"""A generated vision preference set: simple pictures drawn with Pillow and questions about them.

Each record asks about one picture (the colour of a shape, how many circles, which side a square is on, what
shape it is); the correct answer is chosen and a wrong one rejected. Records are in ms-swift's format
(``query``, ``response``, ``rejected_response``, ``images`` with paths relative to the JSONL, some with
``system`` or ``history``) and the PNG files lie beside the JSONL, so the set exercises the same path as real
image data. The same seed gives the same bytes (records and PNGs).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from humanalign.data.io import atomic_write_jsonl
from humanalign.data.records import IMAGE_PLACEHOLDER

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
JSONL_NAME = "image_pairs.jsonl"
IMAGE_SUBDIR = "images"
FIXED_COLOUR = "blue"  # the circles counted and the square placed: one colour, so only the layout varies
SYSTEM = "You answer questions about a picture in one short sentence."

Shape = tuple[str, str, int, int, int]  # (shape, colour name, centre x, centre y, radius)


def draw(shapes: list[Shape], size: int) -> Image.Image:
    """A white picture with each shape drawn at its centre."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    for shape, colour, x, y, radius in shapes:
        box = (x - radius, y - radius, x + radius, y + radius)
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)
    return img


Question = Callable[[random.Random, int, str, str], tuple[list[Shape], str, str, str]]


def _jitter(rng: random.Random, size: int) -> int:
    return rng.randint(-(size // 16), size // 16)


def _big_shape(rng: random.Random, size: int, shape: str, colour: str) -> Shape:
    """One shape filling most of the picture (radius 3/8 of the side), near the centre."""
    return shape, colour, size // 2 + _jitter(rng, size), size // 2 + _jitter(rng, size), 3 * size // 8


def _colour_question(rng: random.Random, size: int, colour: str, wrong: str):
    shape = rng.choice(SHAPES)
    return ([_big_shape(rng, size, shape, colour)], "What colour is the shape?",
            f"The {shape} is {colour}.", f"The {shape} is {wrong}.")


def _quadrant_centre(size: int, quadrant: int) -> tuple[int, int]:
    return (quadrant % 2) * size // 2 + size // 4, (quadrant // 2) * size // 2 + size // 4


def _nudged(rng: random.Random, size: int, quadrant: int) -> tuple[int, int]:
    x, y = _quadrant_centre(size, quadrant)
    return x + _jitter(rng, size) // 2, y + _jitter(rng, size) // 2


def _count_question(rng: random.Random, size: int, right: str, wrong: str):
    """``right`` circles (1 to 4) of one colour, one per quarter of the picture, in a random choice of quarters."""
    shapes = [("circle", FIXED_COLOUR, *_nudged(rng, size, q), size // 4 - 1 - rng.randint(0, size // 16))
              for q in rng.sample(range(4), int(right))]
    return shapes, "How many circles are there?", _circles(int(right)), _circles(int(wrong))


def _circles(k: int) -> str:
    return "There is 1 circle." if k == 1 else f"There are {k} circles."


def _side_question(rng: random.Random, size: int, side: str, wrong: str):
    """One square filling a quarter of the picture, in the left or the right half, high or low."""
    x, y = _nudged(rng, size, rng.randrange(2) * 2 + (side == "right"))
    shapes = [("square", FIXED_COLOUR, x, y, size // 4 - 1 - rng.randint(0, size // 16))]
    return shapes, "Is the square on the left or on the right?", f"The square is on the {side}.", \
        f"The square is on the {wrong}."


def _shape_question(rng: random.Random, size: int, shape: str, wrong: str):
    colour = rng.choice(list(COLOURS))
    return ([_big_shape(rng, size, shape, colour)], "What shape is in the picture?",
            f"It is a {colour} {shape}.", f"It is a {colour} {wrong}.")


QUESTIONS: dict[str, Question] = {
    "colour": _colour_question, "count": _count_question, "side": _side_question, "shape": _shape_question,
}
# Each question's candidate answers: the right one and the wrong one are an ordered pair of these
ANSWERS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "count": ("1", "2", "3", "4"),
                                       "side": ("left", "right"), "shape": SHAPES}


class _Deck:
    """Every ordered (right, wrong) pair of a question's answers once per round, in a seeded order: so each answer
    is right (and wrong) equally often, and (a, b) is (chosen, rejected) as often as (b, a). The text alone
    then predicts nothing; only the picture tells the answers apart."""

    def __init__(self, answers: tuple[str, ...], rng: random.Random):
        self.answers, self.rng, self.left = answers, rng, []

    def draw(self) -> tuple[str, str]:
        if not self.left:
            self.left = [(a, b) for a in self.answers for b in self.answers if a != b]
            self.rng.shuffle(self.left)
        return self.left.pop()


def image_demo_records(n: int, seed: int = 0, size: int = 64, kinds: tuple[str, ...] | None = None,
                       ) -> list[tuple[dict[str, Any], Image.Image]]:
    """``n`` (ms-swift record, picture) pairs, the question kinds (``kinds``, default all of ``QUESTIONS``) in
    turn; the record's ``images`` is filled in when written."""
    rng = random.Random(seed)
    kinds = tuple(kinds or QUESTIONS)
    decks = {kind: _Deck(ANSWERS[kind], rng) for kind in kinds}
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        shapes, question, right, wrong = QUESTIONS[kind](rng, size, *decks[kind].draw())
        record: dict[str, Any] = {"query": f"{IMAGE_PLACEHOLDER}\n{question}", "response": right,
                                  "rejected_response": wrong}
        if i % 5 == 1:
            record["system"] = SYSTEM
        if i % 7 == 3:  # a text-only earlier turn: the picture belongs to the last question
            record["history"] = [["I will show you a picture.", "Please do, I will look at it carefully."]]
        out.append((record, draw(shapes, size)))
    return out


def write_image_demo(output_dir: str | Path, n: int = 200, seed: int = 0, size: int = 64,
                     kinds: tuple[str, ...] | None = None) -> Path:
    """Write ``n`` records to ``output_dir/image_pairs.jsonl`` and their PNGs to ``output_dir/images/``;
    returns the JSONL path."""
    out = Path(output_dir)
    (out / IMAGE_SUBDIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (record, picture) in enumerate(image_demo_records(n, seed, size, kinds)):
        name = f"{IMAGE_SUBDIR}/{i:05d}.png"
        picture.save(out / name, format="PNG")
        rows.append({**record, "images": [name]})
    return atomic_write_jsonl(out / JSONL_NAME, rows)


def blank_pictures(pairs_path: str | Path, blank_png: str | Path, size: int = 64) -> Path:
    """The control set: rewrite a prepared pairs file so that every image is one plain white picture
    (``blank_png``, written here). The pairs and their split stay the same; only the pixels are gone."""
    Image.new("RGB", (size, size), (255, 255, 255)).save(blank_png, format="PNG")
    rows = [json.loads(line) for line in Path(pairs_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row["images"] = [str(Path(blank_png).resolve())] * len(row.get("images", []))
    return atomic_write_jsonl(pairs_path, rows)


def image_demo_texts(path: str | Path) -> list[str]:
    """Every text of a written set (questions, answers, system prompts, earlier turns), once each: the corpus of
    a tokenizer that knows the set's words (so "yellow" is one token, not five)."""
    texts: dict[str, None] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for text in (row["query"].split("\n", 1)[-1], row["response"], row["rejected_response"], row.get("system"),
                     *(turn for pair in row.get("history", []) for turn in pair)):
            if text:
                texts[text] = None
    return list(texts)


def describe(path: str | Path) -> dict[str, int]:
    """Records per question kind in a written set (for summaries and tests)."""
    counts: dict[str, int] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        question = json.loads(line)["query"].split("\n", 1)[1]
        counts[question] = counts.get(question, 0) + 1
    return counts


__all__ = ["write_image_demo", "image_demo_records", "draw", "COLOURS", "SHAPES", "QUESTIONS", "ANSWERS", "JSONL_NAME",
           "blank_pictures", "image_demo_texts", "FIXED_COLOUR"]
