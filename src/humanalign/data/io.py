"""Reading raw records with precise error locations, and atomic writes.

Every reader yields ``(line_number, record_dict)`` so that adapters can name the file and line of a bad record.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet as pq

from humanalign.errors import RecordError, UserError
from humanalign.fs import atomic_write_json, atomic_write_jsonl, atomic_write_text, publish_dir

# the atomic writers live in humanalign.fs (below config, which saves resolved configs with them)
__all__ = ["DATA_SUFFIXES", "iter_jsonl", "iter_json", "iter_parquet", "iter_records", "read_jsonl",
           "atomic_write_text", "atomic_write_jsonl", "atomic_write_json", "publish_dir"]

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


# what reading a damaged .gz raises: not gzip at all (BadGzipFile), cut short (EOFError), corrupt (zlib.error)
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _gzip_error(path: Path, line: int | None, exc: BaseException) -> UserError:
    where = f"{path}:{line}" if line else str(path)
    if isinstance(exc, gzip.BadGzipFile):
        return UserError(f"{where}: not a gzip file ({exc}); rename it without .gz if it is plain text")
    if isinstance(exc, EOFError):
        return UserError(f"{where}: the gzip data ends early (a truncated or partly copied file?)")
    return UserError(f"{where}: corrupt gzip data ({exc})")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line, raw bytes) of a file, gzip or not; a damaged .gz is a UserError naming the line it
    reached (the lines before it were read normally)."""
    line_no = 0
    try:
        with _open_text(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                yield line_no, raw
    except GZIP_ERRORS as exc:
        raise _gzip_error(path, line_no + 1, exc) from None


def _read_bytes(path: Path) -> bytes:
    try:
        with _open_text(path) as fh:
            return fh.read()
    except GZIP_ERRORS as exc:
        raise _gzip_error(path, None, exc) from None


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
    for line_no, raw in _lines(path):
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
    raw = _read_bytes(path)
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
    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable parquet file ({first})") from None
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


def check_output_path(path: str | Path, key: str, kind: str = "folder") -> Path:
    """Before any work: ``path`` (a ``kind``, 'folder' or 'file') can be created or written; else a one-line
    UserError naming the config ``key``. Catches an output under a regular file, a file where a folder goes
    (or the reverse) and a place we may not write in (read-only, no permission), by creating and removing a
    probe folder in the nearest existing folder: a real test, right for root and read-only mounts alike."""
    path = Path(path)
    where = f"{path} ({key})"
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise UserError(f"{where}: is a file, not a folder")
        if kind == "file" and path.is_dir():
            raise UserError(f"{where}: is a folder, not a file")
        probe_in = path if kind == "folder" else path.absolute().parent
    else:
        probe_in = next(p for p in path.absolute().parents if p.exists())
        if not probe_in.is_dir():
            raise UserError(f"{where}: cannot be created: {probe_in} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".humanalign-probe-", dir=probe_in))
    except OSError as exc:
        raise UserError(f"{where}: cannot write in {probe_in} ({exc.strerror or exc})") from None
    return path

