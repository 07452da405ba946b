"""Preference pairs for the trainers: helpful pairs (ordered by helpfulness) and harmless pairs (ordered by
safety, with each response's is_safe label when the source has one).

``records_to_pairs`` turns any canonical records into pairs of one kind (``prepare-data`` uses it too);
``load_preference_pairs`` reads a prepared file (or any source) straight into them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from humanalign.config.data import SourceSpec
from humanalign.data.images import reject_images
from humanalign.data.load import load_source
from humanalign.data.records import (
    HarmlessPair,
    PreferencePair,
    PromptRecord,
    Record,
    SafetyLabel,
    SafetyPreference,
    SFTRecord,
    prompt_key,
)
from humanalign.errors import UserError

Kind = Literal["helpful", "harmless"]
KINDS: tuple[Kind, ...] = ("helpful", "harmless")


def normalized(text: str) -> str:
    return " ".join(text.split())


def pair_problem(pair: PreferencePair) -> str | None:
    """Why a pair teaches nothing (and is skipped), or None."""
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "empty response"
    if normalized(pair.chosen) == normalized(pair.rejected):
        return "identical responses"
    return None


def _from_safety_preference(rec: SafetyPreference, kind: Kind, skipped: Counter[str]) -> PreferencePair | None:
    if kind == "helpful":
        if rec.better_id is None:
            skipped["no helpfulness ordering"] += 1
            return None
        b = rec.better_id
        return PreferencePair(prompt=rec.prompt, chosen=rec.responses[b], rejected=rec.responses[1 - b], source=rec.source)
    if rec.safer_id is None:
        skipped["no safety ordering"] += 1
        return None
    s = rec.safer_id
    return HarmlessPair(prompt=rec.prompt, chosen=rec.responses[s], rejected=rec.responses[1 - s], source=rec.source,
                        is_chosen_safe=rec.is_safe[s], is_rejected_safe=rec.is_safe[1 - s])


def _as_harmless(pair: PreferencePair) -> HarmlessPair:
    if isinstance(pair, HarmlessPair):
        return pair
    return HarmlessPair(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected, margin=pair.margin,
                        source=pair.source, images=pair.images)


def _pair_safety_labels(labels: list[SafetyLabel], skipped: Counter[str]) -> list[HarmlessPair]:
    """BeaverTails-style single labelled answers -> (safe, unsafe) pairs per prompt, in file order."""
    groups: dict[str, tuple[list[SafetyLabel], list[SafetyLabel]]] = {}
    for lab in labels:
        safe, unsafe = groups.setdefault(prompt_key(lab.prompt), ([], []))
        (safe if lab.is_safe else unsafe).append(lab)
    out = []
    for safe, unsafe in groups.values():
        for good, bad in zip(safe, unsafe):
            out.append(HarmlessPair(prompt=good.prompt, chosen=good.response, rejected=bad.response,
                                    source=good.source, is_chosen_safe=True, is_rejected_safe=False))
        leftover = abs(len(safe) - len(unsafe))
        if leftover:
            skipped["safety label without an opposite label for its prompt"] += leftover
    return out


def records_to_pairs(
    records: Iterable[Record], kind: Kind, skipped: Counter[str], plain_kind: Kind = "helpful",
    elsewhere: Counter[str] | None = None,
) -> list[PreferencePair]:
    """Pairs of ``kind`` from canonical records; everything left out is counted in ``skipped`` by reason.

    SafetyPreference gives a helpful pair (by better_id) and a harmless pair (by safer_id). Plain
    PreferencePairs feed ``plain_kind`` (harmless pairs made from them carry no is_safe labels). HarmlessPairs
    feed harmless only; SafetyLabels are paired safe-vs-unsafe per prompt (harmless only). Records that belong
    to the other kind (or to no kind: SFT, prompts) are counted in ``elsewhere`` when given (prepare-data
    routes every record to its kind), else in ``skipped``.
    """
    elsewhere = skipped if elsewhere is None else elsewhere
    out: list[PreferencePair] = []
    labels: list[SafetyLabel] = []
    for rec in records:
        pair: PreferencePair | None = None
        if isinstance(rec, SafetyPreference):
            pair = _from_safety_preference(rec, kind, skipped)
        elif isinstance(rec, HarmlessPair):
            if kind == "harmless":
                pair = rec
            else:
                elsewhere["harmless pair (no helpfulness ordering)"] += 1
        elif isinstance(rec, PreferencePair):
            if kind == plain_kind:
                pair = _as_harmless(rec) if kind == "harmless" else rec
            else:
                elsewhere[f"plain preference pair (used as {plain_kind})"] += 1
        elif isinstance(rec, SafetyLabel):
            if kind == "harmless":
                labels.append(rec)
            else:
                elsewhere["safety label (no helpfulness ordering)"] += 1
        elif isinstance(rec, SFTRecord | PromptRecord):
            elsewhere[f"not a preference record ({type(rec).__name__})"] += 1
        if pair is not None:
            out.append(pair)
    out.extend(_pair_safety_labels(labels, skipped))
    kept = []
    for pair in out:
        problem = pair_problem(pair)
        if problem:
            skipped[problem] += 1
        else:
            kept.append(pair)
    return kept


def has_safety_labels(pairs: Iterable[PreferencePair]) -> bool:
    """True when every pair is a HarmlessPair with both is_safe labels (a cost model's classification term
    needs them; without them the caller should warn and train on the ordering alone)."""
    return all(isinstance(p, HarmlessPair) and p.is_chosen_safe is not None and p.is_rejected_safe is not None
               for p in pairs)


def load_preference_pairs(
    path: str | Path | SourceSpec, *, kind: Kind = "helpful", skip_invalid: bool = False, allow_empty: bool = False,
    allow_images: bool = False, max_images: int | None = None,
) -> tuple[list[PreferencePair], Counter[str]]:
    """Pairs of ``kind`` from a prepared *_pairs.jsonl (or any source a SourceSpec names), plus skip counts.

    Pairs whose responses are empty or identical are skipped and counted; bad records raise RecordError
    (file, line, field) unless ``skip_invalid``, contradictory safety labels included. Harmless pairs from a
    source without is_safe labels come back with None labels (see ``has_safety_labels``). Pairs with images are
    refused unless ``allow_images`` (a consumer that feeds them to a vision-language model: `train dpo`); a pair
    with more than ``max_images`` images (the model's limit per prompt) is a bad record.
    """
    if kind not in KINDS:
        raise UserError(f"unknown pair kind '{kind}' (helpful or harmless)")
    spec = path if isinstance(path, SourceSpec) else SourceSpec(path=str(path))
    result = load_source(spec, skip_invalid=skip_invalid, max_images=max_images)
    skipped: Counter[str] = Counter(result.skipped)
    plain_kind: Kind = kind if spec.pair_kind == "auto" else spec.pair_kind
    pairs = records_to_pairs(result.records, kind, skipped, plain_kind=plain_kind)
    if not allow_images:
        reject_images(pairs, spec.describe(), "training and evaluation on pairs with a text model")
    if not pairs and not allow_empty:
        why = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common()) or "no records"
        raise UserError(f"{spec.describe()}: no usable {kind} pairs ({why})")
    return pairs, skipped
