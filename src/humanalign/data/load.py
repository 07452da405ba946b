"""Load a data source (local file/folder or a `datasets` hub name) into canonical records, and mix several.

Bad records stop the load with a one-line error naming file, line and field, unless ``skip_invalid`` is set:
then each is skipped and counted by reason (nothing is dropped silently).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from humanalign.config.data import SourceSpec
from humanalign.data.images import IMAGE_DIR_OPTION, check_image_count, check_images_kept
from humanalign.data.io import DATA_SUFFIXES, iter_records
from humanalign.data.records import Record
from humanalign.data.sources import SourceContext, get_source
from humanalign.data.sources.adapters import detect_source
from humanalign.data.sources.generic import check_generic_options
from humanalign.errors import RecordError, UserError


@dataclass
class LoadResult:
    """Records from one source plus what happened on the way."""

    records: list[Record]
    skipped: Counter[str]
    path: str
    sources: list[str] = field(default_factory=list)  # adapter names used (one per file)
    read: int = 0  # raw records read, valid or not
    sampled_out: int = 0  # valid records left out by ratio / max_records
    first_errors: dict[str, str] = field(default_factory=dict)  # skip reason -> its first full message


def skip_reason(err: RecordError) -> str:
    """A short, countable reason: the field at fault, or the kind of line problem."""
    if err.field:
        return f"bad field '{err.field}'"
    return err.problem.split(" (")[0].split(",")[0]


def _iter_file(path: Path, on_error: Callable[[RecordError], None]) -> Iterator[tuple[int, dict[str, Any]]]:
    return iter_records(path, on_error)


def _iter_hub(spec: SourceSpec) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of ``datasets.load_dataset(dataset, subset, split=...)``; the 'line' is the 1-based row."""
    kwargs: dict[str, Any] = {"split": spec.split}
    for key in ("data_files", "data_dir", "cache_dir"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    try:
        dataset = datasets.load_dataset(spec.dataset, spec.subset, **kwargs)
    except Exception as exc:  # hub, network, builder and split errors all come back as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{spec.describe()}: cannot load the dataset ({type(exc).__name__}: {first})") from None
    if len(dataset) == 0:
        raise UserError(f"{spec.describe()}: the split holds no records")
    for i, row in enumerate(dataset, start=1):
        yield i, dict(row)


def data_files(path: Path) -> list[Path]:
    """The data files of a folder (not recursive), sorted; or the path itself if it is a file."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise UserError(f"{path}: not found")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
    if not files:
        raise UserError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
    return files


def load_source(
    spec: SourceSpec | str | Path, skip_invalid: bool = False, seed: int = 0, image_dir: str | None = None,
    max_images: int | None = None,
) -> LoadResult:
    """Read one source through its adapter (or the detected one for source 'auto').

    ``spec.ratio`` < 1 keeps a seeded sample of the records (in file order); ``spec.max_records`` caps them.
    ``image_dir`` is where image objects (a datasets Image column) are written as files (default: the cache).
    ``max_images`` is the most images one record may show (the model's limit per prompt; None: no limit).
    """

    if not isinstance(spec, SourceSpec):
        spec = SourceSpec(path=str(spec))
    fixed = None if spec.source == "auto" else get_source(spec.source)
    options = spec.adapter_options()
    if image_dir is not None:
        options[IMAGE_DIR_OPTION] = image_dir
    if spec.source == "generic":
        check_generic_options(spec.field_map, spec.constants, spec.record_type)
    result = LoadResult(records=[], skipped=Counter(), path=spec.describe())

    def on_error(err: RecordError) -> None:
        if not skip_invalid:
            raise err
        reason = skip_reason(err)
        result.skipped[reason] += 1
        result.first_errors.setdefault(reason, str(err))

    if spec.path is not None:
        streams = [(str(p), _iter_file(p, on_error)) for p in data_files(Path(spec.path))]
    else:
        streams = [(spec.describe(), _iter_hub(spec))]
    # Without sampling, max_records lets us stop reading early (large hub datasets).
    stop_at = spec.max_records if spec.ratio >= 1 else None
    for where, rows in streams:
        adapter, name = fixed, spec.source
        for line, raw in rows:
            if adapter is None:
                name = detect_source(raw, f"{where}:{line}")
                adapter = get_source(name)
            if name not in result.sources:
                result.sources.append(name)
            result.read += 1
            ctx = SourceContext(path=where, line=line, source=name, options=options)
            try:
                records = adapter(raw, ctx)
                check_images_kept(raw, records, ctx)
                check_image_count(raw, records, ctx, max_images)
                result.records.extend(records)
            except RecordError as err:
                on_error(err)
            if stop_at is not None and len(result.records) >= stop_at:
                break
        if stop_at is not None and len(result.records) >= stop_at:
            break
    _sample(result, spec, seed)
    return result


def _sample(result: LoadResult, spec: SourceSpec, seed: int) -> None:
    n = len(result.records)
    keep = n if spec.ratio >= 1 else round(spec.ratio * n)
    if spec.max_records is not None:
        keep = min(keep, spec.max_records)
    if keep >= n:
        return
    # A string seed hashes deterministically (random.Random uses sha512 for str), independent of PYTHONHASHSEED.
    rng = random.Random(f"{seed}:{spec.describe()}")
    chosen = sorted(rng.sample(range(n), keep)) if spec.ratio < 1 else range(keep)
    result.records = [result.records[i] for i in chosen]
    result.sampled_out = n - keep


@dataclass
class MixResult:
    """Records of several sources together, with each source's own LoadResult."""

    records: list[Record]
    results: list[LoadResult]

    @property
    def skipped(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for res in self.results:
            total.update(res.skipped)
        return total


def mix_sources(
    specs: list[SourceSpec], seed: int = 0, skip_invalid: bool = False, shuffle: bool = True,
    progress: Callable[[str], None] | None = None, image_dir: str | None = None,
) -> MixResult:
    """Load each source (its ``ratio`` / ``max_records`` applied) and put them together, shuffled with ``seed``."""
    if not specs:
        raise UserError("no data sources given")
    results = []
    for spec in specs:
        if progress:
            progress(f"reading {spec.describe()} (source: {spec.source})")
        res = load_source(spec, skip_invalid=skip_invalid, seed=seed, image_dir=image_dir)
        if progress:
            skipped = sum(res.skipped.values())
            progress(f"  {res.read} raw records -> {len(res.records)} records via {'+'.join(res.sources) or '-'}"
                     + (f", {skipped} skipped" if skipped else "")
                     + (f", {res.sampled_out} left out by ratio/max_records" if res.sampled_out else ""))
        results.append(res)
    records = [rec for res in results for rec in res.records]
    if shuffle:
        random.Random(seed).shuffle(records)
    return MixResult(records=records, results=results)
