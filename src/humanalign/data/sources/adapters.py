"""The built-in adapters (importing this module registers them) and format detection for source 'auto'.

Adapters live by family: ``safety`` (pku-saferlhf, beavertails), ``dialogue`` (hh-rlhf, ultrafeedback, minimind,
swift, alpaca), ``vision`` (rlaif-v), ``generic`` (generic, prompts, pairs, conversations). Each is ``(raw dict, SourceContext) -> list[Record]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Importing the adapter modules registers their adapters.
from humanalign.data.sources import dialogue, generic, safety, source_names, vision  # noqa: F401
from humanalign.errors import UserError

_SCORES = ("score_chosen", "score_rejected")
# Fields a prompt-only file may carry beside the prompt (BeaverTails-Evaluation has a category, ids are common).
_PROMPT_ONLY_EXTRAS = {"system", "id", "prompt_id", "category", "source", "prompt_source", "metadata", "label",
                       "images", "image"}


def _prompt_only(r: dict[str, Any]) -> bool:
    """Our prompt files, and ms-swift (``query``) or RLAIF-V (``question``) records without their answers."""
    if "prompt" in r:
        return set(r) - {"prompt"} <= _PROMPT_ONLY_EXTRAS
    if "query" in r:
        return not {"response", "rejected_response", "messages"} & r.keys()
    return "question" in r and not {"chosen", "rejected"} & r.keys()


def _has_scores(raw: dict[str, Any]) -> bool:
    meta = raw.get("metadata")
    return any(k in raw for k in _SCORES) or (isinstance(meta, dict) and any(k in meta for k in _SCORES))


def _is_hh_dialogue(value: Any) -> bool:
    return isinstance(value, str) and ("\n\nAssistant:" in value or value.lstrip().startswith("Human:"))


def _pair_like(raw: dict[str, Any]) -> bool:
    return "chosen" in raw and "rejected" in raw and "instruction" not in raw


# name -> test on the first record; the tests are written to be mutually exclusive on the known formats, so
# a record matching two of them is a genuinely ambiguous file.
DETECTORS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "pku-saferlhf": lambda r: {"response_0", "response_1"} <= r.keys()
    and bool({"better_response_id", "safer_response_id"} & r.keys()),
    "beavertails": lambda r: {"prompt", "response", "is_safe"} <= r.keys(),
    "hh-rlhf": lambda r: _pair_like(r) and "prompt" not in r and _is_hh_dialogue(r["chosen"]),
    "minimind": lambda r: _pair_like(r) and "prompt" not in r and isinstance(r["chosen"], list) and not _has_scores(r),
    "ultrafeedback": lambda r: _pair_like(r) and (_has_scores(r) or ("prompt" in r and isinstance(r["chosen"], list))),
    "pairs": lambda r: _pair_like(r) and "prompt" in r and isinstance(r["chosen"], str) and not _has_scores(r),
    "swift": lambda r: ({"query", "response"} <= r.keys()) or ({"messages", "rejected_response"} <= r.keys()),
    "rlaif-v": lambda r: {"question", "chosen", "rejected"} <= r.keys() and bool({"image", "images"} & r.keys()),
    "alpaca": lambda r: "instruction" in r and ("output" in r or "chosen" in r),
    "prompts": _prompt_only,
    "conversations": lambda r: ("messages" in r and not {"chosen", "rejected", "rejected_response"} & r.keys())
    or ({"prompt", "response"} <= r.keys() and "is_safe" not in r and "rejected_response" not in r),
}


def detect_source(raw: dict[str, Any], where: str) -> str:
    """The adapter name for a record's shape, or a UserError saying why none (or several) fit."""
    matches = [name for name, test in DETECTORS.items() if test(raw)]
    if len(matches) == 1:
        return matches[0]
    fields = ", ".join(sorted(raw)) or "none"
    if not matches:
        raise UserError(
            f"{where}: cannot tell the format from the first record's fields ({fields}); name it with "
            f"source (known: {', '.join(source_names())}), or use source 'generic' with a field_map"
        )
    raise UserError(
        f"{where}: ambiguous format, the first record's fields ({fields}) fit {' and '.join(matches)}; "
        "name the source explicitly"
    )


__all__ = ["DETECTORS", "detect_source"]
