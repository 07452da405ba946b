"""Typed configuration: one pydantic schema per command, loaded from YAML with ``--set`` overrides.

Rules every schema follows (see ``ConfigBase``):
- unknown keys are errors (``extra="forbid"``);
- every field has a default and a one-line ``description``;
- aliases (the seed run-book's names, Greek included: ``λ_init``, ``β_ori``) are declared with
  ``Field(validation_alias=AliasChoices("our_name", "alias", ...))`` and normalised to our names before
  validation, so that a YAML key and a ``--set`` override for the same field never fight.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError, model_validator

from humanalign.errors import ConfigError
from humanalign.fs import atomic_write_text

T = TypeVar("T", bound="ConfigBase")


class ConfigBase(BaseModel):
    """Base of every config schema: strict keys, assignment validation, populate by name or alias."""

    # allow_inf_nan=False: `inf` / `nan` in any float field (nested ones too, every schema derives from this) is
    # a mistake the user hears about, naming the key, rather than a run that diverges or never stops.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, protected_namespaces=(), allow_inf_nan=False
    )

    # field -> 'folder' or 'file': the paths a command writes, checked by the CLI before any work
    output_fields: ClassVar[dict[str, str]] = {}

    # fields naming data files or folders every run reads: the CLI checks they exist before any work
    input_fields: ClassVar[tuple[str, ...]] = ()

    def input_targets(self) -> list[tuple[str, str]]:
        """(field, path) of each input that must exist (a list-valued field gives one pair per path)."""
        out: list[tuple[str, str]] = []
        for name in self.input_fields:
            value = getattr(self, name, None)
            for path in value if isinstance(value, list) else [value]:
                if path not in (None, ""):
                    out.append((name, str(path)))
        return out

    def output_targets(self) -> list[tuple[str, str, str]]:
        """(field, path, kind) of each output path that is set."""
        return [(name, str(getattr(self, name)), kind) for name, kind in self.output_fields.items()
                if getattr(self, name, None) not in (None, "")]

    @model_validator(mode="before")
    @classmethod
    def _yaml_words_back(cls, data: Any) -> Any:
        """YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans, so `mixed_precision: no` (or `--mixed-precision
        no`) arrives as False. For a field whose choices are words, give the word back."""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, bool):
                word = _bool_word(field.annotation, value)
                if word is not None:
                    data = {**data, name: word}
        return data

    @classmethod
    def alias_map(cls) -> dict[str, str]:
        """alias -> canonical field name, for this schema's own level."""
        out: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            va = field.validation_alias
            if isinstance(va, AliasChoices):
                for choice in va.choices:
                    if isinstance(choice, str) and choice != name:
                        out[choice] = name
            elif isinstance(va, str) and va != name:
                out[va] = name
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config (every field, defaults included) atomically."""
        return atomic_write_text(path, self.to_yaml())


def _bool_word(annotation: Any, value: bool) -> str | None:
    """The choice of a Literal-of-words field (Optional too) that YAML read as ``value``; None when it has none."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is not Literal:
        return next((w for a in args if (w := _bool_word(a, value)) is not None), None)
    words = ("yes", "on", "true") if value else ("no", "off", "false")
    return next((w for w in words if w in args), None)


def lower_default(config: ConfigBase, name: str, limit: int) -> bool:
    """Lower field ``name`` to ``limit`` when the user did not set it and its default is above the limit: a
    default must not turn a setting the user did choose (e.g. a short ``max_length``) into an error. True when
    lowered. Written past validate_assignment, as this runs inside the schema's own validator."""
    if name in config.model_fields_set or getattr(config, name) <= limit or limit < 1:
        return False
    config.__dict__[name] = limit
    return True


def check_prompt_length(config: ConfigBase) -> None:
    """max_prompt_length below max_length: an unset prompt budget is lowered to half of max_length (so that
    max_length alone is a valid setting); one the user set at or above max_length is an error."""
    if config.max_prompt_length >= config.max_length:
        lower_default(config, "max_prompt_length", config.max_length // 2)
    if config.max_prompt_length >= config.max_length:
        raise ValueError(f"max_prompt_length ({config.max_prompt_length}) must be below max_length ({config.max_length})")


def _nested_schema(schema: type[BaseModel], key: str) -> type[ConfigBase] | None:
    field = schema.model_fields.get(key)
    if field is None:
        return None
    ann = field.annotation
    for candidate in (ann, *getattr(ann, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, ConfigBase):
            return candidate
    return None


def normalize_keys(schema: type[ConfigBase], data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Rename aliases to canonical names (recursively); error when a field is given twice."""
    aliases = schema.alias_map()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in out:
            raise ConfigError(f"{where}field '{name}' is given twice (as '{key}' and another spelling)")
        sub = _nested_schema(schema, name)
        if sub is not None and isinstance(value, dict):
            value = normalize_keys(sub, value, where=f"{where}{name}.")
        out[name] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so 1e-5, true, [1, 2] and null work)."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(schema: type[ConfigBase], data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = normalize_keys(schema, data)
    for item in overrides:
        path, value = parse_override(item)
        node: dict[str, Any] = data
        current: type[ConfigBase] | None = schema
        for i, part in enumerate(path):
            if current is not None:
                part = current.alias_map().get(part, part)
            if i == len(path) - 1:
                node[part] = value
            else:
                nxt = node.get(part)
                if not isinstance(nxt, dict):
                    nxt = {} if nxt is None else nxt
                    node[part] = nxt
                node = nxt
                current = _nested_schema(current, part) if current is not None else None
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    text = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"{source}: unknown key '{loc}'"
    elif not loc:  # a check across fields: its message names them
        msg = f"{source}: {text}"
    else:
        msg = f"{source}: field '{loc}': {text}"
    more = len(err.errors()) - 1
    return msg + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


class _DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (plain YAML keeps the last
    value silently, so an edited copy of a setting would win or lose by its position)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first is not None:
                raise _DuplicateKeyError(problem=f"key '{key}' given twice (first on line {first})",
                                         problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return data


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """YAML file (optional) + ``values`` (e.g. from CLI flags) + ``--set`` overrides -> validated schema."""
    data = read_yaml(path) if path else {}
    data = normalize_keys(schema, data)
    for key, value in normalize_keys(schema, values or {}).items():
        data[key] = value
    data = apply_overrides(schema, data, overrides or [])
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path) if path else "command line")) from None
