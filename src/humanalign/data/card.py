"""The data card prepare-data writes beside its splits: counts, safe/unsafe mix, lengths, where data came from."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from humanalign import __version__ as version
from humanalign.data.records import (
    SPLITS,
    HarmlessPair,
    PreferencePair,
    SafetyLabel,
    SafetyPreference,
    prompt_key,
)


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(ordered), 1), "median": float(statistics.median(ordered)),
            "p95": float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]), "max": float(ordered[-1])}


def _words(text: str) -> int:
    return len(text.split())


def _safety_mix(pairs: list[PreferencePair]) -> dict[str, int]:
    mix: Counter[str] = Counter()
    for p in pairs:
        if not isinstance(p, HarmlessPair) or p.is_chosen_safe is None or p.is_rejected_safe is None:
            mix["unlabelled"] += 1
        elif p.is_chosen_safe and not p.is_rejected_safe:
            mix["chosen safe, rejected unsafe"] += 1
        elif p.is_chosen_safe:
            mix["both safe"] += 1
        else:
            mix["both unsafe"] += 1
    return dict(mix)


def _source_stats(records: list) -> dict[str, Any]:
    """Label statistics of the raw records that carry safety judgements."""
    responses: Counter[str] = Counter()
    severity: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    both_ids = disagree = 0
    for rec in records:
        if isinstance(rec, SafetyPreference):
            for i in (0, 1):
                label = rec.is_safe[i]
                responses["unlabelled" if label is None else "safe" if label else "unsafe"] += 1
                if rec.severity[i] is not None:
                    severity[str(rec.severity[i])] += 1
                categories.update(name for name, on in (rec.harm_categories[i] or {}).items() if on)
            if rec.better_id is not None and rec.safer_id is not None:
                both_ids += 1
                disagree += rec.better_id != rec.safer_id
        elif isinstance(rec, SafetyLabel):
            responses["safe" if rec.is_safe else "unsafe"] += 1
            categories.update(name for name, on in rec.harm_categories.items() if on)
    return {"responses": responses, "severity": severity, "categories": categories,
            "both_ids": both_ids, "disagree": disagree}


def build_card(cfg, mix, buckets, skipped) -> dict[str, Any]:
    kinds = list(buckets)
    all_records = [rec for res in mix.results for rec in res.records]
    stats = _source_stats(all_records)
    card: dict[str, Any] = {
        "humanalign_version": version,
        "split_rule": "sha256(seed, normalised prompt) -> uniform u; train if u < train_ratio, val if u < "
        "train_ratio + val_ratio, else test (no prompt in two splits; stable when data grows)",
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        "ratios": {"train": cfg.train_ratio, "val": cfg.val_ratio, "test": cfg.test_ratio},
        "sources": [
            {"name": res.path, "adapters": res.sources, "raw_records": res.read, "records": len(res.records),
             "left_out_by_ratio_or_max_records": res.sampled_out, "skipped": dict(res.skipped),
             "first_errors": res.first_errors}
            for res in mix.results
        ],
        "pairs": {k: {s: len(buckets[k][s]) for s in SPLITS} for k in kinds},
        "prompts": {s: len({prompt_key(p.prompt) for k in kinds for p in buckets[k][s]}) for s in SPLITS},
        "skipped": {"records": dict(mix.skipped), **{k: dict(skipped[k]) for k in kinds}},
        "harmless_safety_mix": {s: _safety_mix(buckets["harmless"][s]) for s in SPLITS} if "harmless" in buckets
        else {},
        "response_safety_labels": dict(stats["responses"]),
        "severity_levels": dict(sorted(stats["severity"].items())),
        "harm_categories": dict(stats["categories"].most_common()),
        "helpful_harmless_disagreement": round(stats["disagree"] / stats["both_ids"], 4) if stats["both_ids"] else None,
        "length_words": {},
        "multi_turn_or_system_prompts": {},
        "pairs_with_margin": {},
    }
    for k in kinds:
        pairs = [p for s in SPLITS for p in buckets[k][s]]
        card["length_words"][k] = {
            "prompt": _length_stats([sum(_words(m["content"]) for m in p.prompt) for p in pairs]),
            "chosen": _length_stats([_words(p.chosen) for p in pairs]),
            "rejected": _length_stats([_words(p.rejected) for p in pairs]),
        }
        card["multi_turn_or_system_prompts"][k] = sum(len(p.prompt) > 1 for p in pairs)
        card["pairs_with_margin"][k] = sum(p.margin is not None for p in pairs)
    images = {k: Counter(len(p.images) for s in SPLITS for p in buckets[k][s]) for k in kinds}
    if any(n for counts in images.values() for n in counts):  # only vision data gets the section
        card["images_per_pair"] = {k: {str(n): c for n, c in sorted(counts.items())} for k, counts in images.items()}
        card["images"] = {k: sum(n * c for n, c in counts.items()) for k, counts in images.items()}
        card["split_rule"] += "; a prompt with images is keyed by its text plus the sha256 of each image's bytes"
    return card


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def card_markdown(card: dict[str, Any]) -> str:
    splits = list(card["ratios"])
    lines = ["# Data card", "", f"Made by humanalign {card['humanalign_version']} `prepare-data`, seed {card['seed']}.",
             f"Split rule: {card['split_rule']}.", "", "## Pairs per split", ""]
    lines += _md_table(["kind", *splits, "total"],
                       [[k, *c.values(), sum(c.values())] for k, c in card["pairs"].items()])
    lines += ["", f"Distinct prompts per split: {', '.join(f'{s} {n}' for s, n in card['prompts'].items())}.", ""]
    lines += ["## Sources", ""]
    lines += _md_table(["source", "adapters", "raw records", "records", "left out by ratio", "skipped"],
                       [[s["name"], "+".join(s["adapters"]), s["raw_records"], s["records"],
                         s["left_out_by_ratio_or_max_records"], sum(s["skipped"].values())] for s in card["sources"]])
    rows = [[group, reason, n] for group, reasons in card["skipped"].items() for reason, n in reasons.items()]
    lines += ["", "## Skipped", ""] + (_md_table(["stage", "reason", "count"], rows) if rows else ["Nothing skipped."])
    if card["harmless_safety_mix"]:
        labels = sorted({lab for mix in card["harmless_safety_mix"].values() for lab in mix})
        lines += ["", "## Harmless pairs: safety labels", ""]
        lines += _md_table(["split", *labels],
                           [[s, *(mix.get(lab, 0) for lab in labels)] for s, mix in card["harmless_safety_mix"].items()])
    if card["response_safety_labels"]:
        lines += ["", "Raw responses by safety label: "
                  + ", ".join(f"{k} {v}" for k, v in card["response_safety_labels"].items()) + "."]
    if card["helpful_harmless_disagreement"] is not None:
        lines += [f"Records where the more helpful response is not the safer one: "
                  f"{100 * card['helpful_harmless_disagreement']:.1f}%."]
    if card["severity_levels"]:
        lines += ["Severity levels (0 = safe): " + ", ".join(f"{k}: {v}" for k, v in card["severity_levels"].items()) + "."]
    if card["harm_categories"]:
        lines += ["Harm categories flagged: " + ", ".join(f"{k} {v}" for k, v in card["harm_categories"].items()) + "."]
    if card.get("images_per_pair"):
        lines += ["", "## Images", ""]
        lines += _md_table(["kind", "images", "pairs by images per pair"],
                           [[k, card["images"][k], ", ".join(f"{n}: {c}" for n, c in per.items())]
                            for k, per in card["images_per_pair"].items()])
    lines += ["", "## Lengths (words)", ""]
    rows = [[k, part, *(st.get(x, "-") for x in ("mean", "median", "p95", "max"))]
            for k, parts in card["length_words"].items() for part, st in parts.items()]
    lines += _md_table(["kind", "part", "mean", "median", "p95", "max"], rows)
    return "\n".join(lines) + "\n"
