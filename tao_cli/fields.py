"""Field introspection of spec dataclasses: the dotted keys, resolved types, defaults and metadata of a schema.

Shared by :mod:`tao_cli.spec` (loading and validation) and :mod:`tao_cli.schema` (JSON Schema, templates,
manifest).  Everything here reads the dataclasses only; nothing touches a loaded config.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, OmegaConf

from networks.common.config import metadata_of

__all__ = [
    "FieldInfo",
    "iter_fields",
    "all_keys",
    "field_map",
    "lookup",
    "split_optional",
    "element_type",
    "scalar_type",
    "cast_option",
    "valid_options",
    "bound",
]


@dataclass(frozen=True)
class FieldInfo:
    """One field of a spec dataclass.

    ``key`` is the dotted path from the root (``train.optim.lr``); ``type`` the resolved annotation;
    ``base`` the annotation without ``Optional``; ``default`` the default value as plain Python (``"???"`` for
    MISSING; a dict of defaults for a section); ``section`` is true for nested dataclasses; ``metadata`` is
    :func:`networks.common.config.metadata_of` of the field (every key present, ``None`` where unset).
    """

    key: str
    name: str
    type: Any
    base: Any
    optional: bool
    default: Any
    metadata: dict[str, Any]
    section: bool
    section_cls: type | None = None

    @property
    def missing(self) -> bool:
        """True when the default is MISSING (``???``): the value must come from the spec."""
        return isinstance(self.default, str) and self.default == MISSING

    @property
    def depth(self) -> int:
        """Nesting level: 0 for a top-level field."""
        return self.key.count(".")


# ---------------------------------------------------------------------------------------------- types
def split_optional(tp: Any) -> tuple[Any, bool]:
    """``(annotation without None, whether None was allowed)``; a Union of several types stays a Union."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007 - a real Union object is needed here
    return tp, False


def element_type(tp: Any) -> Any:
    """Element annotation of a list/tuple field, value annotation of a dict field, else ``Any``."""
    base, _ = split_optional(tp)
    args = typing.get_args(base)
    origin = typing.get_origin(base)
    if origin in (list, tuple) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return Any


def scalar_type(tp: Any) -> Any:
    """The innermost element annotation of (nested, optional) lists: ``list[list[int] | None]`` → ``int``."""
    base, _ = split_optional(tp)
    while typing.get_origin(base) in (list, tuple):
        args = typing.get_args(base)
        base, _ = split_optional(args[0] if args else Any)
    return base


# ------------------------------------------------------------------------------------------- metadata
def cast_option(option: Any, tp: Any) -> Any:
    """A ``valid_options`` entry converted to the field's scalar type (``"true"`` → True, ``"3"`` → 3); entries
    that do not convert are returned unchanged."""
    try:
        if tp is bool and isinstance(option, str):
            return option.strip().lower() in ("true", "yes", "1", "on")
        if tp in (int, float, str) and not isinstance(option, tp):
            return tp(option)
    except (TypeError, ValueError):
        pass
    return option


def valid_options(meta: dict[str, Any]) -> list[Any]:
    """``valid_options`` of a field as a list (metadata may hold a comma-separated string); ``[]`` when unset."""
    options = meta["valid_options"]
    if isinstance(options, str):
        options = [o.strip() for o in options.split(",") if o.strip()]
    return list(options or [])


def bound(value: Any) -> float | None:
    """A ``valid_min``/``valid_max`` value as a float; ``None`` when unset, infinite (``"inf"``) or not a number."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isinf(number) or math.isnan(number) else number


# --------------------------------------------------------------------------------------------- fields
def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _plain(value: Any) -> Any:
    """Dataclass instances, lists and dicts → plain Python containers (MISSING stays ``"???"``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return OmegaConf.to_container(OmegaConf.structured(value), resolve=False, enum_to_str=True)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _walk(cls: type, prefix: str) -> Iterator[FieldInfo]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, Any)
        base, optional = split_optional(tp)
        default = _field_default(f)
        key = f"{prefix}{f.name}"
        section_cls = None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            section_cls = type(default)
        elif isinstance(base, type) and dataclasses.is_dataclass(base):
            section_cls = base
        if section_cls is not None:
            if default is MISSING or default is None:
                plain_default = default
            elif dataclasses.is_dataclass(default):
                plain_default = _plain(default)
            else:
                plain_default = _plain(section_cls())
            yield FieldInfo(key, f.name, tp, section_cls, optional, plain_default, metadata_of(f), True,
                            section_cls)
            yield from _walk(section_cls, key + ".")
        else:
            yield FieldInfo(key, f.name, tp, base, optional, _plain(default), metadata_of(f), False)


@functools.lru_cache(maxsize=64)
def _fields(schema_cls: type) -> tuple[FieldInfo, ...]:
    # Cached: building section defaults goes through OmegaConf and dominates load time otherwise.
    return tuple(_walk(schema_cls, ""))


@functools.lru_cache(maxsize=64)
def field_map(schema_cls: type) -> dict[str, FieldInfo]:
    """``{dotted key: FieldInfo}`` of ``schema_cls`` in declaration order (cached and shared: do not mutate;
    :func:`iter_fields` gives copies)."""
    return {f.key: f for f in _fields(schema_cls)}


def iter_fields(schema_cls: type) -> Iterator[FieldInfo]:
    """Every field of ``schema_cls``, sections before their children, in declaration order (defaults are
    fresh copies: callers may mutate them)."""
    for f in _fields(schema_cls):
        yield dataclasses.replace(f, default=copy.deepcopy(f.default), metadata=dict(f.metadata))


def all_keys(schema_cls: type) -> list[str]:
    """All dotted keys of ``schema_cls`` (sections and leaves), in declaration order."""
    return [f.key for f in _fields(schema_cls)]


def _is_free_container(tp: Any) -> bool:
    """A leaf whose value may hold keys the schema does not list (dicts, lists, ``Any``)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp) or tp
    return origin in (dict, list, tuple, typing.Dict, typing.List)  # noqa: UP006


def lookup(schema_cls: type, key: str) -> tuple[FieldInfo | None, bool]:
    """Find ``key`` in the schema.

    Returns ``(field, inside)``: ``field`` is the schema field at ``key`` (``inside`` False), or the free-form
    dict/list field that ``key`` points into (``inside`` True), or ``None`` when the key is not in the schema.
    """
    fields = field_map(schema_cls)
    if key in fields:
        return fields[key], False
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = fields.get(".".join(parts[:i]))
        if parent is not None:
            if not parent.section and _is_free_container(parent.base):
                return parent, True
            return None, False
    return None, False
