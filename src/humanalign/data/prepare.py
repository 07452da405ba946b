"""`humanalign prepare-data`: raw preference data -> {train,val,test}/{helpful,harmless}_pairs.jsonl + data card.

Helpful pairs are ordered by helpfulness (better_response_id), harmless pairs by safety (safer_response_id) with
each response's is_safe label. Prompts are assigned to splits by a seeded hash of the prompt, so no prompt sits
in two splits and a prompt keeps its split when the data grows. Nothing is written until everything is read and
checked; then all files are written to temporary names and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from humanalign.config.data import PrepareDataConfig
from humanalign.data.card import build_card, card_markdown
from humanalign.data.images import split_key
from humanalign.data.load import MixResult, mix_sources
from humanalign.data.pairs import KINDS, Kind, normalized, records_to_pairs
from humanalign.data.records import SPLITS, PreferencePair, PromptRecord, SFTRecord
from humanalign.errors import RecordError, UserError
from humanalign.fs import temp_file_beside

PAIR_FILE = "{kind}_pairs.jsonl"
CARD_FILES = ("data_card.json", "data_card.md")
IMAGE_FOLDER = "images"  # image objects (datasets Image columns, parquet bytes) are written here as files


def output_paths(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    pairs = [out / split / PAIR_FILE.format(kind=kind) for split in SPLITS for kind in KINDS]
    return pairs + [out / name for name in CARD_FILES]


def split_of(key: str, seed: int, ratios: tuple[float, float, float]) -> str:
    """The split of a prompt: a uniform number from sha256(seed, prompt) against the cumulative ratios.

    Depends only on the prompt and the seed, so adding data never moves an existing prompt."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    cumulative = 0.0
    for split, ratio in zip(SPLITS, ratios):
        cumulative += ratio
        if u < cumulative:
            return split
    return [s for s, r in zip(SPLITS, ratios) if r > 0][-1]  # float round-off at the top end


def deduplicate(pairs: list[PreferencePair], skipped: Counter[str]) -> list[PreferencePair]:
    """Drop repeats of (prompt, chosen, rejected), and pairs that reverse an earlier one (a contradiction
    that would cancel out in training); both counted."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for pair in pairs:
        key = (split_key(pair), normalized(pair.chosen), normalized(pair.rejected))
        if key in seen:
            skipped["duplicate pair"] += 1
        elif (key[0], key[2], key[1]) in seen:
            skipped["reverses an earlier pair"] += 1
        else:
            seen.add(key)
            kept.append(pair)
    return kept


def pair_line(pair: PreferencePair) -> dict[str, Any]:
    line = pair.to_json()
    if pair.source:
        line["source"] = pair.source
    return line


def _check_paths(cfg: PrepareDataConfig) -> list[Path]:
    out = Path(cfg.output_dir)
    for spec in cfg.source_specs():
        if spec.path is not None and Path(spec.path).resolve() == out.resolve():
            raise UserError(f"input '{spec.path}' and output_dir '{cfg.output_dir}' are the same folder; "
                            "keep raw files in a folder of their own (e.g. data/raw)")
    targets = output_paths(out)
    existing = [p for p in targets if p.exists()]
    if existing and not cfg.overwrite:
        more = f" (and {len(existing) - 1} more output files)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}; pass --overwrite to replace")
    return targets


def build_splits(
    mix: MixResult, cfg: PrepareDataConfig,
) -> tuple[dict[Kind, dict[str, list[PreferencePair]]], dict[Kind, Counter[str]]]:
    ratios = (cfg.train_ratio, cfg.val_ratio, cfg.test_ratio)
    specs = cfg.source_specs()
    buckets: dict[Kind, dict[str, list[PreferencePair]]] = {k: {s: [] for s in SPLITS} for k in KINDS}
    skipped: dict[Kind, Counter[str]] = {k: Counter() for k in KINDS}
    split_cache: dict[str, str] = {}
    for res in mix.results:  # records that feed no kind of pair are skipped once, at the record stage
        for rec in res.records:
            if isinstance(rec, SFTRecord | PromptRecord):
                res.skipped[f"not a preference record ({type(rec).__name__})"] += 1
    for kind in KINDS:
        pairs: list[PreferencePair] = []
        for spec, res in zip(specs, mix.results):
            plain: Kind = "helpful" if spec.pair_kind == "auto" else spec.pair_kind
            pairs += records_to_pairs(res.records, kind, skipped[kind], plain_kind=plain, elsewhere=Counter())
        if cfg.deduplicate:
            pairs = deduplicate(pairs, skipped[kind])
        for pair in pairs:
            key = split_key(pair)  # the prompt text, plus its images' content hashes when it has images
            if key not in split_cache:
                split_cache[key] = split_of(key, cfg.seed, ratios)
            buckets[kind][split_cache[key]].append(pair)
    return buckets, skipped


def _write_all(contents: dict[Path, str]) -> None:
    """Every file to a temporary name first; rename only once all are written (no half-written outputs)."""
    temps: dict[Path, str] = {}
    try:
        for path, text in contents.items():
            fd, tmp = temp_file_beside(path)
            temps[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def format_table(buckets, skipped: dict[Kind, Counter[str]], mix: MixResult) -> str:
    lines = [f"{'pairs':<10}" + "".join(f"{s:>9}" for s in SPLITS) + f"{'total':>9}"]
    for kind in KINDS:
        counts = [len(buckets[kind][s]) for s in SPLITS]
        lines.append(f"{kind:<10}" + "".join(f"{n:>9}" for n in counts) + f"{sum(counts):>9}")
    rows = [(f"records: {r}", n) for r, n in mix.skipped.most_common()]
    rows += [(f"{kind}: {r}", n) for kind in KINDS for r, n in skipped[kind].most_common()]
    lines.append("")
    if rows:
        width = max(len(r) for r, _ in rows) + 2
        lines.append(f"{'skipped (reason)':<{width}}{'count':>7}")
        lines += [f"{r:<{width}}{n:>7}" for r, n in rows]
    else:
        lines.append("skipped: none")
    return "\n".join(lines)


def run(cfg: PrepareDataConfig) -> dict[str, Any]:
    targets = _check_paths(cfg)  # before reading or writing anything
    try:
        mix = mix_sources(cfg.source_specs(), seed=cfg.seed, skip_invalid=cfg.skip_invalid, shuffle=False,
                          progress=lambda msg: print(f"[prepare-data] {msg}", flush=True),
                          image_dir=str(Path(cfg.output_dir) / IMAGE_FOLDER))
    except RecordError as err:
        hint = " (--skip-invalid skips and counts such records)"
        raise RecordError(err.path, err.line, err.field, err.problem + hint) from None
    buckets, skipped = build_splits(mix, cfg)
    total = sum(len(b) for kind in KINDS for b in buckets[kind].values())
    if total == 0:
        why = {**{f"records: {k}": v for k, v in mix.skipped.items()},
               **{f"{kind}: {k}": v for kind in KINDS for k, v in skipped[kind].items()}}
        inputs = ", ".join(spec.describe() for spec in cfg.source_specs())
        raise UserError(f"{inputs}: no usable pairs (skipped: {json.dumps(why) if why else 'nothing'})")
    card = build_card(cfg, mix, buckets, skipped)
    contents: dict[Path, str] = {}
    for split in SPLITS:
        for kind in KINDS:
            rows = buckets[kind][split]
            path = Path(cfg.output_dir) / split / PAIR_FILE.format(kind=kind)
            contents[path] = "".join(json.dumps(pair_line(p), ensure_ascii=False) + "\n" for p in rows)
    out = Path(cfg.output_dir)
    contents[out / "data_card.json"] = json.dumps(card, ensure_ascii=False, indent=2) + "\n"
    contents[out / "data_card.md"] = card_markdown(card)
    assert set(contents) == set(targets)
    _write_all(contents)
    print(format_table(buckets, skipped, mix))
    for kind in KINDS:
        for split, ratio in zip(SPLITS, (cfg.train_ratio, cfg.val_ratio, cfg.test_ratio)):
            if ratio > 0 and not buckets[kind][split] and any(buckets[kind].values()):
                print(f"[prepare-data] warning: no {kind} pairs landed in {split} (too few prompts for the ratios)")
    print(f"[prepare-data] wrote {out}/{{train,val,test}}/{{helpful,harmless}}_pairs.jsonl and {out}/data_card.md")
    summary: dict[str, Any] = {f"{kind}_{split}": len(buckets[kind][split]) for kind in KINDS for split in SPLITS}
    summary["skipped"] = sum(mix.skipped.values()) + sum(sum(c.values()) for c in skipped.values())
    if card.get("helpful_harmless_disagreement") is not None:
        summary["disagreement"] = card["helpful_harmless_disagreement"]
    return summary
