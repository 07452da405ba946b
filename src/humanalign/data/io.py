"""Reading raw records with precise error locations, and atomic writes.

Every reader yields ``(line_number, record_dict)`` so that adapters can name the file and line of a bad record.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from humanalign.errors import RecordError, UserError
from humanalign.fs import atomic_write_json, atomic_write_jsonl, atomic_write_text, publish_dir

# the atomic writers live in humanalign.fs (below config, which saves resolved configs with them)
__all__ = ["DATA_SUFFIXES", "iter_jsonl", "iter_json", "iter_parquet", "iter_records", "read_jsonl",
           "atomic_write_text", "atomic_write_jsonl", "atomic_write_json", "publish_dir"]

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _raise(err: RecordError) -> None:
    raise err


def iter_jsonl(
    path: str | Path, on_error: Callable[[RecordError], None] = _raise
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line, object) for each non-blank line; errors name the file and line.

    A bad line goes to ``on_error``: the default raises; a caller that counts skips passes a function that records
    the error and returns, and reading goes on with the next line.
    """
    path = Path(path)
    any_line = False
    with _open_text(path) as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                any_line = True
                on_error(RecordError(path, line_no, None, f"not UTF-8 text (byte {exc.start})"))
                continue
            if not text:
                continue
            any_line = True
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                on_error(RecordError(path, line_no, None, f"malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                on_error(RecordError(path, line_no, None, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            yield line_no, obj
    if not any_line:
        raise UserError(f"{path}: the file holds no records")


def iter_json(
    path: str | Path, on_error: Callable[[RecordError], None] = _raise
) -> Iterator[tuple[int, dict[str, Any]]]:
    """A JSON file holding a list of objects; the 'line' is the 1-based index in the list."""
    path = Path(path)
    with _open_text(path) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(path, None, None, f"not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise UserError(f"{path}: the file holds no records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(path, exc.lineno, None, f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or a single object
        wrapped = [data[k] for k in ("data", "train", "records", "rows") if isinstance(data.get(k), list)]
        data = wrapped[0] if wrapped else [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list of records")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            on_error(RecordError(path, i, None, f"record {i} is not a JSON object"))
            continue
        yield i, obj


def iter_parquet(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise UserError(f"{path}: the file holds no records")
    yield from enumerate(table.to_pylist(), start=1)


def iter_records(
    path: str | Path, on_error: Callable[[RecordError], None] = _raise
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Dispatch on the file suffix (.jsonl, .json, .parquet, optionally .gz); see ``iter_jsonl`` for on_error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return iter_jsonl(path, on_error)
    if name.endswith((".json", ".json.gz")):
        return iter_json(path, on_error)
    if name.endswith(".parquet"):
        return iter_parquet(path)
    raise UserError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .jsonl.gz)")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]
