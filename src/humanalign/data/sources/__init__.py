"""Source adapters: one per raw format, registered by name, each turning a raw dict into canonical records.

An adapter is a function ``(raw: dict, ctx: SourceContext) -> list[Record]``. It raises ``RecordError`` (via
``ctx.error(field, problem)``) for a record it cannot read; ``load_source`` turns that into a counted skip when
the user asked for ``skip_invalid``. Register new formats with ``@register_source("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from humanalign.data.records import Record
from humanalign.errors import RecordError, UserError

Adapter = Callable[[dict[str, Any], "SourceContext"], list[Record]]
_REGISTRY: dict[str, Adapter] = {}


@dataclass
class SourceContext:
    """Where a raw record came from, plus adapter options (the generic adapter's field mapping)."""

    path: str
    line: int | None
    source: str
    options: dict[str, Any] = field(default_factory=dict)

    def error(self, field_name: str | None, problem: str) -> RecordError:
        return RecordError(self.path, self.line, field_name, problem)

    def require(self, raw: dict[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
        """Fetch ``raw[key]`` and check its type, or raise an error naming the file, line and field."""
        if key not in raw or raw[key] is None:
            raise self.error(key, "missing")
        value = raw[key]
        if kind is not None and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(key, f"expected {names}, got {type(value).__name__}")
        return value


def register_source(name: str) -> Callable[[Adapter], Adapter]:
    def deco(fn: Adapter) -> Adapter:
        if name in _REGISTRY:
            raise ValueError(f"source '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_source(name: str) -> Adapter:
    if name not in _REGISTRY:
        raise UserError(f"unknown source '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def source_names() -> list[str]:
    return sorted(_REGISTRY)


# Importing the built-in adapter modules registers them; they import the registry above, so this comes last.
from humanalign.data.sources import adapters  # noqa: E402,F401
