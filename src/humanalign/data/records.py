"""The few canonical record types every source adapter produces and every trainer consumes.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``.
A *prompt* is a conversation that ends with a user turn; a *response* is the assistant's next answer.

Images (vision-language data) travel beside the text: ``images`` lists image references in order (an absolute
local path, or a ``data:`` base64 URI kept as given), and a message's text may mark where each one goes with
``IMAGE_PLACEHOLDER``; without placeholders the images belong before the first user turn's text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")  # the splits `prepare-data` writes
IMAGE_PLACEHOLDER = "<image>"


def user_prompt(text: str, system: str | None = None) -> list[Message]:
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": text})
    return msgs


def prompt_to_jsonable(prompt: list[Message]) -> str | list[Message]:
    """A single user turn is written as a plain string; anything longer stays a message list."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return prompt


def prompt_from_jsonable(value: str | list[Message]) -> list[Message]:
    return user_prompt(value) if isinstance(value, str) else [dict(m) for m in value]


def prompt_key(prompt: list[Message]) -> str:
    """Identity of a prompt for splitting and deduplication (whitespace-normalised)."""
    return "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].split())}" for m in prompt)


@dataclass
class SFTRecord:
    """A conversation to imitate; the loss falls on assistant turns."""

    messages: list[Message]
    source: str = ""
    images: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.messages}
        if self.images:  # only when present: text-only outputs stay byte-identical
            out["images"] = list(self.images)
        return out


@dataclass
class PreferencePair:
    """One prompt, a preferred and a dispreferred response; ``margin`` is an optional strength (>= 0)."""

    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = ""
    images: list[str] = field(default_factory=list)  # the prompt's images; chosen and rejected share them

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": prompt_to_jsonable(self.prompt), "chosen": self.chosen, "rejected": self.rejected}
        if self.margin is not None:
            out["margin"] = self.margin
        if self.images:  # only when present: text-only outputs stay byte-identical
            out["images"] = list(self.images)
        return out


@dataclass
class HarmlessPair(PreferencePair):
    """A preference pair ordered by safety: ``chosen`` is the safer response; both carry ``is_safe``."""

    is_chosen_safe: bool | None = None
    is_rejected_safe: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["is_chosen_safe"] = self.is_chosen_safe
        out["is_rejected_safe"] = self.is_rejected_safe
        return out


@dataclass
class SafetyPreference:
    """Two responses to one prompt with a helpfulness and a safety judgement (PKU-SafeRLHF's shape).

    ``better_id`` / ``safer_id`` are 0 or 1 (``None`` when a source gives no such judgement);
    ``is_safe`` holds each response's safety label (``None`` when unlabelled).
    """

    prompt: list[Message]
    responses: tuple[str, str]
    better_id: int | None
    safer_id: int | None
    is_safe: tuple[bool | None, bool | None] = (None, None)
    severity: tuple[int | None, int | None] = (None, None)
    harm_categories: tuple[dict[str, bool] | None, dict[str, bool] | None] = (None, None)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": prompt_to_jsonable(self.prompt),
            "response_0": self.responses[0],
            "response_1": self.responses[1],
            "better_response_id": self.better_id,
            "safer_response_id": self.safer_id,
            "is_response_0_safe": self.is_safe[0],
            "is_response_1_safe": self.is_safe[1],
        }


@dataclass
class SafetyLabel:
    """A single response with a safety label (BeaverTails QA)."""

    prompt: list[Message]
    response: str
    is_safe: bool
    harm_categories: dict[str, bool] = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"prompt": prompt_to_jsonable(self.prompt), "response": self.response, "is_safe": self.is_safe,
                "category": self.harm_categories}


@dataclass
class PromptRecord:
    """A prompt alone (for generation, PPO rollouts, red-teaming), with the images it shows, if any."""

    prompt: list[Message]
    source: str = ""
    images: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": prompt_to_jsonable(self.prompt)}
        if self.images:  # only when present: text-only outputs stay byte-identical
            out["images"] = list(self.images)
        return out


Record = SFTRecord | PreferencePair | HarmlessPair | SafetyPreference | SafetyLabel | PromptRecord


def record_to_json(record: Record) -> dict[str, Any]:
    return record.to_json()


__all__ = [
    "Message", "IMAGE_PLACEHOLDER", "SFTRecord", "PreferencePair", "HarmlessPair", "SafetyPreference", "SafetyLabel", "PromptRecord",
    "Record", "user_prompt", "prompt_to_jsonable", "prompt_from_jsonable", "prompt_key", "record_to_json", "asdict",
]
