"""Vision-language preference sources: RLAIF-V / MM-RLHF style rows (image, question, chosen, rejected)."""

from __future__ import annotations

from typing import Any

from humanalign.data.records import PreferencePair, Record, user_prompt
from humanalign.data.sources import SourceContext, register_source
from humanalign.data.sources import fields as F


@register_source("rlaif-v")
def rlaif_v(raw: dict[str, Any], ctx: SourceContext) -> list[Record]:
    """openbmb/RLAIF-V-Dataset, MM-RLHF and alike: ``image`` (a path relative to the file, a data: URI, a
    datasets Image / ``{"bytes", "path"}`` struct, or a list of them; ``images`` is read the same way),
    ``question`` (``<image>`` placeholders optional), ``chosen``, ``rejected``, optional ``system``."""
    key = "image" if raw.get("image") is not None else "images"
    if raw.get(key) is None:
        raise ctx.error("image", "missing (a vision preference record needs its picture)")
    prompt = user_prompt(F.text(raw, "question", ctx), F.optional_text(raw, "system", ctx))
    images = F.prompt_images(raw, key, ctx, prompt, text_field="question")
    return [PreferencePair(prompt=prompt, chosen=F.text(raw, "chosen", ctx), rejected=F.text(raw, "rejected", ctx),
                           source=ctx.source, images=images)]
