"""Fixtures for the data-layer tests: the raw-format fixture folder, a CLI runner, a jsonl writer, and for the
image tests the tiny vision-language families and coloured pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from humanalign.cli import main
from humanalign.models.tiny_vision import tiny_llava, tiny_qwen2_vl

FIXTURES = Path(__file__).parent / "fixtures"
# what the tiny vision-language models' tokenizers are trained on
COLOUR_CORPUS = [f"User {i} asks what colour the {shape} is. The assistant says it is {colour}."
                 for i in range(30) for shape in ("circle", "square") for colour in ("red", "blue", "green")]


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def cli(capsys):
    """Run `humanalign ARGS...` in-process -> (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture():
    return write_jsonl


@pytest.fixture(name="read_jsonl")
def read_jsonl_fixture():
    return read_jsonl


@pytest.fixture
def colour_corpus() -> list[str]:
    return list(COLOUR_CORPUS)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family(request):
    """(name, the tiny model in eval mode, its processor) of the tiny LLaVA and the tiny Qwen2-VL."""
    build = tiny_llava if request.param == "llava" else tiny_qwen2_vl
    model, processor = build(COLOUR_CORPUS, vocab_size=400)
    model.eval()
    return request.param, model, processor


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    """Plain red, blue and green 56x56 PNGs: name -> path."""
    folder = tmp_path_factory.mktemp("pics")
    paths = {}
    for name, colour in (("red", (220, 40, 40)), ("blue", (40, 80, 220)), ("green", (40, 170, 60))):
        Image.new("RGB", (56, 56), colour).save(folder / f"{name}.png")
        paths[name] = str(folder / f"{name}.png")
    return paths
