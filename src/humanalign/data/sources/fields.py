"""Typed field readers shared by the adapters: each names the file, line and field of what it rejects."""

from __future__ import annotations

import math
from typing import Any

from humanalign.data.images import check_placeholders, image_ref, images
from humanalign.data.records import IMAGE_PLACEHOLDER, ROLES, Message, user_prompt
from humanalign.data.sources import SourceContext

# ShareGPT-style role names, read as ours.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def text(raw: dict[str, Any], key: str, ctx: SourceContext) -> str:
    return ctx.require(raw, key, str)


def optional_text(raw: dict[str, Any], key: str, ctx: SourceContext) -> str | None:
    if raw.get(key) is None:
        return None
    return ctx.require(raw, key, str)


def flag(raw: dict[str, Any], key: str, ctx: SourceContext, *, optional: bool = False) -> bool | None:
    """A true/false label. JSON booleans only: a string 'false' would read as true in Python."""
    if optional and raw.get(key) is None:
        return None
    return ctx.require(raw, key, bool)


def response_id(raw: dict[str, Any], key: str, ctx: SourceContext, *, optional: bool = False) -> int | None:
    """0 or 1; an integral float (pandas turns int columns with gaps into floats) is accepted."""
    if optional and raw.get(key) is None:
        return None
    value = ctx.require(raw, key, (int, float))
    if isinstance(value, bool):
        raise ctx.error(key, "expected 0 or 1, got bool")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ctx.error(key, f"expected 0 or 1, got {value}")
        value = int(value)
    if value not in (0, 1):
        raise ctx.error(key, f"expected 0 or 1, got {value}")
    return value


def number(raw: dict[str, Any], key: str, ctx: SourceContext, *, optional: bool = True) -> float | None:
    if optional and raw.get(key) is None:
        return None
    value = ctx.require(raw, key, (int, float))
    if isinstance(value, bool) or not math.isfinite(value):
        raise ctx.error(key, f"expected a finite number, got {value!r}")
    return float(value)


def severity(raw: dict[str, Any], key: str, ctx: SourceContext) -> int | None:
    if raw.get(key) is None:
        return None
    value = response_id_like(raw, key, ctx)
    if not 0 <= value <= 3:
        raise ctx.error(key, f"expected a severity level 0..3, got {value}")
    return value


def response_id_like(raw: dict[str, Any], key: str, ctx: SourceContext) -> int:
    value = ctx.require(raw, key, (int, float))
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ctx.error(key, f"expected an integer, got {value!r}")
    return int(value)


def categories(raw: dict[str, Any], key: str, ctx: SourceContext) -> dict[str, bool] | None:
    """A harm-category dict {name: bool} (PKU-SafeRLHF v1, BeaverTails)."""
    if raw.get(key) is None:
        return None
    value = ctx.require(raw, key, dict)
    for name, flagged in value.items():
        if not isinstance(flagged, bool):
            raise ctx.error(key, f"category '{name}' should be true/false, got {type(flagged).__name__}")
    return {str(k): bool(v) for k, v in value.items()}


def messages(value: Any, ctx: SourceContext, field: str, images: list[str] | None = None) -> list[Message]:
    """A message list [{role, content}] (ShareGPT {from, value} accepted) -> our messages.

    Content may be a string or an OpenAI-style list of parts (``{"type": "text", "text"}``, ``{"type": "image",
    "image"}``, ``{"type": "image_url", "image_url": {"url"}}``): the text parts are joined by newlines, each image
    part leaves an ``<image>`` placeholder where it stood and its reference is appended to ``images`` (a caller
    that passes no list accepts no images)."""
    if not isinstance(value, list):
        raise ctx.error(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise ctx.error(field, "empty message list")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ctx.error(field, f"message {i} is {type(msg).__name__}, expected an object with role and content")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if not isinstance(role, str):
            raise ctx.error(field, f"message {i} has no string 'role'")
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise ctx.error(field, f"message {i} has role '{role}' (expected one of {', '.join(ROLES)})")
        if isinstance(content, list):
            content = _content_parts(content, ctx, f"{field}[{i}].content", images)
        if not isinstance(content, str):
            raise ctx.error(field, f"message {i} content should be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _content_parts(parts: list[Any], ctx: SourceContext, field: str, images: list[str] | None) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image", "image_url"):
            if images is None:
                raise ctx.error(field, f"part {j} is an image, which source '{ctx.source}' does not take here")
            raw = part.get(kind, part.get("url", part.get("path")))
            images.append(image_ref(raw, ctx, f"{field}[{j}]"))
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise ctx.error(field, f"part {j} should be {{'type': 'text'|'image'|'image_url', ...}}, got {part!r:.60}")
    return "\n".join(texts)


def prompt(value: Any, ctx: SourceContext, field: str, system: str | None = None,
           images: list[str] | None = None) -> list[Message]:
    """A prompt given as a string or as a message list ending with a user turn (image parts go to ``images``)."""
    if isinstance(value, str):
        return user_prompt(value, system)
    msgs = messages(value, ctx, field, images)
    if msgs[-1]["role"] != "user":
        raise ctx.error(field, f"a prompt must end with a user turn, ends with '{msgs[-1]['role']}'")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def final_answer(msgs: list[Message], ctx: SourceContext, field: str) -> tuple[list[Message], str]:
    """Split a conversation into (prompt turns, final assistant answer)."""
    if msgs[-1]["role"] != "assistant":
        raise ctx.error(field, f"the conversation should end with an assistant answer, ends with '{msgs[-1]['role']}'")
    return msgs[:-1], msgs[-1]["content"]


def shared_prompt(
    chosen: list[Message], rejected: list[Message], ctx: SourceContext, prompt_value: list[Message] | None = None,
    fields: tuple[str, str] = ("chosen", "rejected"),
) -> tuple[list[Message], str, str]:
    """Two conversations that share every turn but the last -> (prompt, chosen answer, rejected answer).

    ``prompt_value`` is a separately given prompt (UltraFeedback's ``prompt``), used when the conversations
    hold only the answer.
    """
    chosen_prompt, chosen_answer = final_answer(chosen, ctx, fields[0])
    rejected_prompt, rejected_answer = final_answer(rejected, ctx, fields[1])
    if _turns(chosen_prompt) != _turns(rejected_prompt):
        raise ctx.error(fields[1], f"the conversation differs from '{fields[0]}' before the final answer")
    if not chosen_prompt:
        if prompt_value is None:
            raise ctx.error(fields[0], "the conversation holds only an answer and no 'prompt' field is given")
        chosen_prompt = prompt_value
    elif prompt_value is not None and _turns(prompt_value)[-1:] != _turns(chosen_prompt)[-1:]:
        raise ctx.error("prompt", f"differs from the last user turn of '{fields[0]}'")
    if chosen_prompt[-1]["role"] != "user":
        raise ctx.error(fields[0], "the turn before the final answer should be a user turn")
    return chosen_prompt, chosen_answer, rejected_answer


def _turns(msgs: list[Message]) -> list[tuple[str, str]]:
    return [(m["role"], " ".join(m["content"].split())) for m in msgs]


def history(raw: dict[str, Any], key: str, ctx: SourceContext) -> list[Message]:
    """[[query, answer], ...] (Alpaca / ms-swift history) -> alternating user/assistant messages."""
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(key, f"expected a list of [query, answer] pairs, got {type(value).__name__}")
    out: list[Message] = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ctx.error(key, f"turn {i} should be a [query, answer] pair of strings")
        out += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return out


def check_safety_order(ctx: SourceContext, chosen_safe: bool | None, rejected_safe: bool | None, field: str) -> None:
    """The safer (chosen) response may not be labelled unsafe while the other one is labelled safe."""
    if chosen_safe is False and rejected_safe is True:
        raise ctx.error(field, "the safer response is labelled unsafe while the other one is labelled safe")


def prompt_images(raw: dict[str, Any], key: str, ctx: SourceContext, msgs: list[Message],
                  from_parts: list[str] | None = None, text_field: str = "prompt") -> list[str]:
    """A record's images: those from image content parts, then the ``key`` field's; ``<image>`` placeholders
    in ``msgs`` are checked against them (one each, when the text uses any). An error names the ``key`` field,
    or ``text_field`` (where the placeholders are) when the record has no ``key``."""
    refs = [*(from_parts or []), *images(raw, key, ctx)]
    check_placeholders(msgs, refs, ctx, key if raw.get(key) is not None else text_field)
    return refs
