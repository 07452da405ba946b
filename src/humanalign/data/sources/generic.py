"""Our own formats (`pairs`: prepared helpful/harmless pairs, `prompts`) and `generic`: any flat format through
a field map from our field names to the file's."""

from __future__ import annotations

from typing import Any

from humanalign.data.records import HarmlessPair, PreferencePair, PromptRecord, Record, SFTRecord, user_prompt
from humanalign.data.sources import SourceContext, get_source, register_source
from humanalign.data.sources import fields as F
from humanalign.errors import ConfigError

SAFETY_FIELDS = ("is_chosen_safe", "is_rejected_safe")

# Our field names per record type (the generic adapter resolves exactly these through the field map).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "system", "chosen", "rejected", "margin", "images"),
    "harmless": ("prompt", "system", "chosen", "rejected", "margin", "images", *SAFETY_FIELDS),
    "safety_preference": (
        "prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "better_response_id",
        "safer_response_id", "response_0_severity_level", "response_1_severity_level",
        "response_0_harm_category", "response_1_harm_category",
    ),
    "safety_label": ("prompt", "response", "is_safe", "category"),
    "sft": ("messages", "prompt", "system", "response", "images"),
    "prompt": ("prompt", "system", "images"),
}


@register_source("pairs")
def pairs(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """Prepared pairs (prepare-data's helpful/harmless_pairs.jsonl): prompt (string or messages), chosen,
    rejected, optional margin and images, and for harmless pairs is_chosen_safe / is_rejected_safe."""
    parts: list[str] = []
    prompt = F.prompt(ctx.require(raw, "prompt", (str, list)), ctx, "prompt", F.optional_text(raw, "system", ctx),
                      parts)
    images = F.prompt_images(raw, "images", ctx, prompt, parts)
    chosen, rejected = F.text(raw, "chosen", ctx), F.text(raw, "rejected", ctx)
    margin = F.number(raw, "margin", ctx)
    if margin is not None and margin < 0:
        raise ctx.error("margin", f"should be >= 0 (chosen is the preferred response), got {margin:g}")
    harmless = (any(k in raw for k in SAFETY_FIELDS) or ctx.options.get("pair_kind") == "harmless"
                or ctx.options.get("record_type") == "harmless")
    if not harmless:
        return [PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, source=ctx.source,
                               images=images)]
    chosen_safe = F.flag(raw, "is_chosen_safe", ctx, optional=True)
    rejected_safe = F.flag(raw, "is_rejected_safe", ctx, optional=True)
    F.check_safety_order(ctx, chosen_safe, rejected_safe, "is_chosen_safe")
    return [HarmlessPair(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, source=ctx.source,
                         is_chosen_safe=chosen_safe, is_rejected_safe=rejected_safe, images=images)]


PROMPT_TEXT_FIELDS = ("prompt", "query", "question")  # ours (or OpenAI-style messages), ms-swift's, RLAIF-V's


@register_source("prompts")
def prompts(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """Prompts alone: ``prompt`` (a string, or messages ending with a user turn whose content may be OpenAI-style
    text and image parts), ms-swift's ``query`` (with its ``history``) or RLAIF-V's ``question``; optional
    ``system``, and images in ``images`` or ``image`` (the conventions of every image source)."""
    field = next((k for k in PROMPT_TEXT_FIELDS if raw.get(k) is not None), None)
    if field is None:
        raise ctx.error("prompt", "missing (each record needs a 'prompt', or ms-swift's 'query' or RLAIF-V's "
                                  "'question')")
    system = F.optional_text(raw, "system", ctx)
    parts: list[str] = []
    if field == "prompt":
        prompt = F.prompt(ctx.require(raw, "prompt", (str, list)), ctx, "prompt", system, parts)
    else:
        turns = [*F.history(raw, "history", ctx), *user_prompt(F.text(raw, field, ctx))] if field == "query" \
            else user_prompt(F.text(raw, field, ctx))
        prompt = [{"role": "system", "content": system}, *turns] if system else turns
    key = "images" if raw.get("images") is not None else "image"
    images = F.prompt_images(raw, key, ctx, prompt, parts, text_field=field)
    if not prompt[-1]["content"].strip() and not images:
        raise ctx.error(field, "empty (a prompt needs text or an image)")
    return [PromptRecord(prompt=prompt, source=ctx.source, images=images)]


@register_source("conversations")
def conversations(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """Conversations to imitate (SFT): ``messages`` with assistant turns, or ``prompt`` + ``response``."""
    return _sft(raw, ctx)


def _sft(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    parts: list[str] = []
    if raw.get("messages") is not None:
        msgs = F.messages(raw["messages"], ctx, "messages", parts)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ctx.error("messages", "no assistant turn to learn from")
    else:
        prompt = F.prompt(ctx.require(raw, "prompt", (str, list)), ctx, "prompt", F.optional_text(raw, "system", ctx),
                          parts)
        msgs = [*prompt, {"role": "assistant", "content": F.text(raw, "response", ctx)}]
    images = F.prompt_images(raw, "images", ctx, msgs, parts, "messages" if raw.get("messages") else "prompt")
    return [SFTRecord(messages=msgs, source=ctx.source, images=images)]


class _MappedContext(SourceContext):
    """Errors name the file's own field ("safer (as chosen)"), not ours."""

    def __init__(self, ctx: SourceContext, names: dict[str, str]):
        super().__init__(ctx.path, ctx.line, ctx.source, ctx.options)
        self.names = names

    def error(self, field_name, problem):
        return super().error(self.names.get(field_name, field_name) if field_name else None, problem)


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def default_record_type(field_map: dict[str, Any], constants: dict[str, Any]) -> str:
    given = set(field_map) | set(constants)
    if given & set(SAFETY_FIELDS):
        return "harmless"
    if "response_0" in given:
        return "safety_preference"
    return "preference"


def check_generic_options(field_map: dict[str, Any], constants: dict[str, Any], record_type: str | None) -> str:
    """Validate a generic source's options once, before reading; returns the record type it builds."""
    record_type = record_type or default_record_type(field_map, constants)
    if record_type not in RECORD_FIELDS:
        raise ConfigError(f"unknown record_type '{record_type}' (known: {', '.join(RECORD_FIELDS)})")
    unknown = sorted((set(field_map) | set(constants)) - set(RECORD_FIELDS[record_type]))
    if unknown:
        raise ConfigError(f"field_map/constants: '{unknown[0]}' is not a field of record_type '{record_type}' "
                          f"(fields: {', '.join(RECORD_FIELDS[record_type])})")
    bad = [k for k, v in field_map.items() if isinstance(v, list | dict)]
    if bad:
        raise ConfigError(f"field_map: '{bad[0]}' should map to a field name or a constant, not a list/mapping")
    return record_type


@register_source("generic")
def generic(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """Any flat format: options ``field_map`` (our field -> the file's field, dotted for nested; a non-string
    value is a constant), ``constants`` (our field -> value) and ``record_type``."""
    field_map: dict[str, Any] = ctx.options.get("field_map") or {}
    constants: dict[str, Any] = ctx.options.get("constants") or {}
    record_type = check_generic_options(field_map, constants, ctx.options.get("record_type"))
    view: dict[str, Any] = {}
    names: dict[str, str] = {}
    for ours in RECORD_FIELDS[record_type]:
        spec = constants[ours] if ours in constants else field_map.get(ours, ours)
        if ours in constants or not isinstance(spec, str):
            view[ours], names[ours] = spec, f"{ours} (constant)"
        else:
            value = _lookup(raw, spec)
            if value is not None:
                view[ours] = value
            names[ours] = spec if spec == ours else f"{spec} (as {ours})"
    mapped = _MappedContext(ctx, names)
    if record_type in ("preference", "harmless"):
        options = {**ctx.options, "record_type": record_type}
        return pairs(view, _MappedContext(SourceContext(ctx.path, ctx.line, ctx.source, options), names))
    if record_type == "safety_preference":
        return get_source("pku-saferlhf")(view, mapped)
    if record_type == "safety_label":
        return get_source("beavertails")(view, mapped)
    if record_type == "prompt":
        return prompts(view, mapped)
    return _sft(view, mapped)
