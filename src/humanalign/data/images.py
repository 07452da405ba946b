"""Image references in records: resolving what a raw record holds, checking it, hashing it for the split.

A canonical record keeps an image as a *reference* string: an absolute local path (a relative path in a data
file is resolved against that file's folder), or a ``data:`` base64 URI kept exactly as given. Image *objects*
(a ``datasets`` Image column gives PIL images; parquet files give ``{"bytes", "path"}`` structs) are written once
to a cache folder as content-named PNG/bytes files and referenced by path, so records stay JSON.
Every image is opened and checked when it is read: a missing or unreadable one stops the load with the file,
line, field and image named, never later inside a training step.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from humanalign.data.records import IMAGE_PLACEHOLDER, Message, PreferencePair, prompt_key
from humanalign.errors import UserError
from humanalign.paths import cache_dir

if TYPE_CHECKING:  # type hints only: data.sources imports this module for its adapters
    from humanalign.data.sources import SourceContext

# Who takes images today (named in the refusal of every consumer that does not)
IMAGE_TRAINERS = ("images are taken by `train dpo`, `train sft` and `train safe-mm-dpo` with a vision-language "
                  "policy only")
IMAGE_DIR_OPTION = "image_dir"  # adapter option: where image objects are written (default: the cache)


def _short(ref: str) -> str:
    return ref if len(ref) <= 60 else ref[:40] + "..." + ref[-12:]


def _check_decodes(data: bytes, ctx: SourceContext, field: str, shown: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ctx.error(field, f"image '{shown}' is not a readable image ({type(exc).__name__})") from None


def decode_data_uri(ref: str) -> bytes:
    """The bytes of a ``data:[<mime>][;base64],<payload>`` URI (ValueError when it is not base64 data)."""
    header, comma, payload = ref.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError("expected 'data:<mime>;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 ({exc})") from None


def _local_path(value: str, ctx: SourceContext, field: str) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(ctx.path).parent / path  # relative to the data file, as ms-swift and LLaVA files mean it
    path = path.resolve()
    if not path.is_file():
        raise ctx.error(field, f"image '{value}' not found (looked for {path})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ctx.error(field, f"image '{value}' cannot be read ({exc.strerror})") from None
    _check_decodes(data, ctx, field, value)
    return str(path)


def _write_cached(data: bytes, suffix: str, ctx: SourceContext) -> str:
    """Write ``data`` once under its content hash into the image folder; returns the absolute path."""
    folder = Path(ctx.options.get(IMAGE_DIR_OPTION) or cache_dir() / "images").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not target.is_file():  # content-named: an existing file already holds these bytes
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    return str(target)


def _from_object(value: Any, ctx: SourceContext, field: str) -> str | None:
    """A PIL image, raw bytes or a datasets ``{"bytes", "path"}`` struct -> a cached file; None if none of those."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")  # lossless whatever the source format
        return _write_cached(buffer.getvalue(), ".png", ctx)
    if isinstance(value, bytes | bytearray):
        _check_decodes(bytes(value), ctx, field, f"<{len(value)} bytes>")
        return _write_cached(bytes(value), ".img", ctx)
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray):
        suffix = Path(str(value.get("path") or "")).suffix.lower() or ".img"
        _check_decodes(bytes(value["bytes"]), ctx, field, str(value.get("path") or "<bytes>"))
        return _write_cached(bytes(value["bytes"]), suffix, ctx)
    return None


def image_ref(value: Any, ctx: SourceContext, field: str) -> str:
    """One image as a raw record gives it -> a checked reference (absolute path or data: URI)."""
    if isinstance(value, dict) and value.get("bytes") is None:
        inner = value.get("path") or value.get("url") or value.get("image")
        if isinstance(inner, dict):  # {"url": {...}} nesting of some OpenAI-style exports
            inner = inner.get("url")
        if inner is not None:
            return image_ref(inner, ctx, field)
    cached = _from_object(value, ctx, field)
    if cached is not None:
        return cached
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(field, f"expected an image path, a data: URI or an image, got {type(value).__name__}")
    if value.startswith("data:"):
        try:
            data = decode_data_uri(value)
        except ValueError as exc:
            raise ctx.error(field, f"image '{_short(value)}': bad data URI ({exc})") from None
        _check_decodes(data, ctx, field, _short(value))
        return value
    if value.startswith(("http://", "https://")):
        raise ctx.error(field, f"image '{_short(value)}' is a web address; download the images and give local paths")
    return _local_path(value, ctx, field)


def images(raw: dict[str, Any], key: str, ctx: SourceContext) -> list[str]:
    """An optional image field: one image or a list of them -> references in order (``[]`` when absent)."""
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        return [image_ref(value, ctx, key)]
    return [image_ref(item, ctx, f"{key}[{i}]") for i, item in enumerate(value)]


def check_placeholders(messages: list[Message], refs: list[str], ctx: SourceContext, field: str) -> None:
    """With explicit ``<image>`` placeholders in the text, there must be exactly one per image."""
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if count == 0 or count == len(refs):
        return
    if count > len(refs):
        raise ctx.error(field, f"{count} '{IMAGE_PLACEHOLDER}' placeholders but {len(refs)} "
                               f"image{'' if len(refs) == 1 else 's'}")
    raise ctx.error(field, f"more images than '{IMAGE_PLACEHOLDER}' placeholders ({len(refs)} > {count}): image "
                           f"{count + 1} '{_short(refs[count])}' has no placeholder")


@functools.lru_cache(maxsize=65536)
def image_digest(ref: str) -> str:
    """sha256 of an image's bytes (a path's file content, a data URI's decoded payload)."""
    data = decode_data_uri(ref) if ref.startswith("data:") else Path(ref).read_bytes()
    return hashlib.sha256(data).hexdigest()


def load_image(ref: str) -> Image.Image:
    """The RGB picture a reference points to."""
    source = io.BytesIO(decode_data_uri(ref)) if ref.startswith("data:") else ref
    with Image.open(source) as img:
        return img.convert("RGB")


def split_key(pair: PreferencePair) -> str:
    """A pair's identity for splitting and deduplication: the prompt text plus its images' content hashes.

    The same picture with the same question is one key (never in two splits) whatever its file name; a
    text-only pair keeps exactly the text key it always had."""
    key = prompt_key(pair.prompt)
    if pair.images:
        key += "\x1d" + ",".join(image_digest(ref) for ref in pair.images)
    return key


IMAGE_FIELDS = ("images", "image")  # raw fields that hold pictures in every format we know


def check_images_kept(raw: dict[str, Any], records: list, ctx: SourceContext) -> None:
    """A raw record with pictures whose adapter made records without them: an error, not a silent loss."""
    field = next((k for k in IMAGE_FIELDS if raw.get(k) not in (None, [])), None)
    if field is not None and not any(getattr(rec, "images", None) for rec in records):
        raise ctx.error(field, f"source '{ctx.source}' does not read images, and this record's would be lost "
                               "(vision sources: swift, rlaif-v, pairs, conversations, minimind, ultrafeedback, "
                               "alpaca, generic with field_map images)")


MAX_IMAGES_SETTING = "max_images_per_prompt"  # the config field that raises or lowers the limit


def check_image_count(raw: dict[str, Any], records: list, ctx: SourceContext, limit: int | None,
                      parts_field: str = "images") -> None:
    """A record with more images than the model takes in one prompt (``limit``; None: no limit): an error naming
    the file, line and field (``parts_field`` when the images are content parts of the messages), here where
    they are still known rather than inside a training step."""
    if limit is None:
        return
    count = max((len(getattr(rec, "images", None) or ()) for rec in records), default=0)
    if count > limit:
        field = next((k for k in IMAGE_FIELDS if raw.get(k) not in (None, [])), parts_field)
        raise ctx.error(field, f"{count} images, the model takes at most {limit} per prompt "
                               f"(set {MAX_IMAGES_SETTING} to change)")


def reject_images(records: list, where: str, consumer: str) -> None:
    """Stop with one line when ``records`` carry images that ``consumer`` would otherwise silently drop."""
    with_images = sum(1 for rec in records if getattr(rec, "images", None))
    if with_images:
        raise UserError(f"{where}: {with_images} of {len(records)} records carry images, which {consumer} does not "
                        f"take yet ({IMAGE_TRAINERS}; see docs/multimodal.md); use text-only data")


__all__ = ["IMAGE_DIR_OPTION", "MAX_IMAGES_SETTING", "check_image_count", "check_images_kept", "reject_images", "image_ref", "images", "check_placeholders", "image_digest", "load_image",
           "split_key", "decode_data_uri"]
