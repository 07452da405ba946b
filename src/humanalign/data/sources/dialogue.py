"""Plain preference and SFT sources: hh-rlhf, UltraFeedback, MiniMind, ms-swift, Alpaca."""

from __future__ import annotations

import re
from typing import Any

from humanalign.data.records import Message, PreferencePair, Record, SFTRecord, user_prompt
from humanalign.data.sources import SourceContext, register_source
from humanalign.data.sources import fields as F

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str, ctx: SourceContext, field: str) -> list[Message]:
    """'\\n\\nHuman: ... \\n\\nAssistant: ...' -> messages (Anthropic hh-rlhf's whole-dialogue strings)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ctx.error(field, "text before the first '\\n\\nHuman:' turn (expected an hh-rlhf dialogue)")
    if len(parts) < 3:
        raise ctx.error(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


@register_source("hh-rlhf")
def hh_rlhf(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """anthropics/hh-rlhf: chosen/rejected are whole dialogues sharing every turn but the final answer."""
    chosen = parse_hh_dialogue(F.text(raw, "chosen", ctx), ctx, "chosen")
    rejected = parse_hh_dialogue(F.text(raw, "rejected", ctx), ctx, "rejected")
    prompt, chosen_answer, rejected_answer = F.shared_prompt(chosen, rejected, ctx)
    return [PreferencePair(prompt=prompt, chosen=chosen_answer, rejected=rejected_answer, source=ctx.source)]


def _score_margin(raw: dict[str, Any], ctx: SourceContext) -> float | None:
    """score_chosen - score_rejected, top-level (HuggingFaceH4 / trl-lib) or under 'metadata'."""
    holder, prefix = raw, ""
    if raw.get("score_chosen") is None and isinstance(raw.get("metadata"), dict):
        holder, prefix = raw["metadata"], "metadata."
    chosen = F.number(holder, "score_chosen", _Prefixed(ctx, prefix))
    rejected = F.number(holder, "score_rejected", _Prefixed(ctx, prefix))
    if chosen is None or rejected is None:
        return None
    if chosen < rejected:
        raise ctx.error(f"{prefix}score_chosen", f"{chosen:g} is below score_rejected {rejected:g}")
    return chosen - rejected


class _Prefixed(SourceContext):
    """A context whose errors name nested fields (metadata.score_chosen)."""

    def __init__(self, ctx: SourceContext, prefix: str):
        super().__init__(ctx.path, ctx.line, ctx.source, ctx.options)
        self.prefix = prefix

    def error(self, field_name, problem):
        return super().error(f"{self.prefix}{field_name}" if field_name else None, problem)


@register_source("ultrafeedback")
def ultrafeedback(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """UltraFeedback binarized: prompt + chosen/rejected as strings (answers) or as message lists
    (HuggingFaceH4 / trl-lib: the user turn included); score_chosen/score_rejected give the margin."""
    prompt_value = raw.get("prompt")
    parts: list[str] = []
    prompt = F.prompt(prompt_value, ctx, "prompt", images=parts) if prompt_value is not None else None
    chosen, rejected = raw.get("chosen"), raw.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            raise ctx.error("prompt", "missing (chosen and rejected are plain answers)")
        answers = (chosen, rejected)
    else:
        prompt, *answers = _shared_with_images(raw, ctx, prompt, parts)
    return [PreferencePair(prompt=prompt, chosen=answers[0], rejected=answers[1], margin=_score_margin(raw, ctx),
                           source=ctx.source, images=F.prompt_images(raw, "images", ctx, prompt, parts))]


def _shared_with_images(
    raw: dict[str, Any], ctx: SourceContext, prompt: list[Message] | None, parts: list[str],
) -> tuple[list[Message], str, str]:
    """chosen/rejected message lists sharing their prompt turns, image parts included (appended to ``parts``
    once: the two conversations must show the same images)."""
    chosen_images: list[str] = []
    rejected_images: list[str] = []
    chosen = F.messages(ctx.require(raw, "chosen", (list, str)), ctx, "chosen", chosen_images)
    rejected = F.messages(ctx.require(raw, "rejected", (list, str)), ctx, "rejected", rejected_images)
    if chosen_images != rejected_images:
        raise ctx.error("rejected", "its images differ from those of 'chosen' (a pair shares the prompt's images)")
    shared, chosen_answer, rejected_answer = F.shared_prompt(chosen, rejected, ctx, prompt)
    if shared is not prompt:  # the prompt turns came from the conversations: their images are the prompt's
        parts[:] = chosen_images
    elif chosen_images:
        raise ctx.error("chosen", "an answer holds an image part (only prompts may hold images)")
    return shared, chosen_answer, rejected_answer


@register_source("minimind")
def minimind(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """MiniMind dpo.jsonl: chosen/rejected are message lists sharing the prompt turns."""
    ctx.require(raw, "chosen", list)
    parts: list[str] = []
    prompt, chosen_answer, rejected_answer = _shared_with_images(raw, ctx, None, parts)
    return [PreferencePair(prompt=prompt, chosen=chosen_answer, rejected=rejected_answer, source=ctx.source,
                           images=F.prompt_images(raw, "images", ctx, prompt, parts, "chosen"))]


def _with_system(msgs: list[Message], system: str | None) -> list[Message]:
    if system and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *msgs]
    return msgs


@register_source("swift")
def swift(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """ms-swift: system, query, response, rejected_response, history [[q, a], ...], images (paths relative to
    the file, data: URIs; ``<image>`` in the text marks where each goes); or (swift 3) messages ending with the
    assistant answer plus rejected_response. SFTRecord when there is no rejected_response."""
    system = F.optional_text(raw, "system", ctx)
    if raw.get("rejected_images") is not None:
        raise ctx.error("rejected_images", "a different image for the rejected answer is not supported yet")
    parts: list[str] = []
    if raw.get("messages") is not None:
        convo = F.messages(raw["messages"], ctx, "messages", parts)
        prompt, response = F.final_answer(convo, ctx, "messages")
        if not prompt or prompt[-1]["role"] != "user":
            raise ctx.error("messages", "the answer should follow a user turn")
    else:
        query = F.text(raw, "query", ctx)
        response = F.text(raw, "response", ctx)
        prompt = [*F.history(raw, "history", ctx), *user_prompt(query)]
    prompt = _with_system(prompt, system)
    images = F.prompt_images(raw, "images", ctx, prompt, parts, "messages" if raw.get("messages") else "query")
    rejected = F.optional_text(raw, "rejected_response", ctx)
    if rejected is None:
        return [SFTRecord(messages=[*prompt, {"role": "assistant", "content": response}], source=ctx.source,
                          images=images)]
    return [PreferencePair(prompt=prompt, chosen=response, rejected=rejected, source=ctx.source, images=images)]


@register_source("alpaca")
def alpaca(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """Alpaca: instruction, input, output, optional system and history -> SFTRecord. The preference variant
    (LLaMA-Factory: instruction, input, chosen, rejected) -> PreferencePair."""
    instruction = F.text(raw, "instruction", ctx)
    extra = F.optional_text(raw, "input", ctx)
    user = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    prompt = _with_system([*F.history(raw, "history", ctx), *user_prompt(user)], F.optional_text(raw, "system", ctx))
    images = F.prompt_images(raw, "images", ctx, prompt, text_field="instruction")
    if raw.get("output") is None and raw.get("chosen") is not None:
        return [PreferencePair(prompt=prompt, chosen=F.text(raw, "chosen", ctx), rejected=F.text(raw, "rejected", ctx),
                               source=ctx.source, images=images)]
    output = F.text(raw, "output", ctx)
    return [SFTRecord(messages=[*prompt, {"role": "assistant", "content": output}], source=ctx.source, images=images)]
