"""Spec dataclasses and their field metadata → JSON Schema 2020-12, spec templates, commented specs, manifest.

TAO's own generator (tao-core ``generate_schema``) emits TAO type names (``int``, ``categorical``, ...) and the
non-JSON literal ``Infinity``; it writes nothing to disk.  Here the schema uses standard JSON-Schema types so any
validator can use it, and TAO's extra metadata (AutoML hints) sits in an ``x-tao`` object per field:

* a leaf: ``type`` (``[T, "null"]`` when Optional), ``minimum``/``maximum`` (``"inf"`` bounds omitted; on the
  items of a list of numbers), ``enum`` (from ``valid_options``; on the items of a list), ``default`` (absent
  for MISSING ``???`` values, which are also not ``required``), ``title``, ``description``, ``examples``;
* a section (nested dataclass): ``type: object`` with ``properties`` and ``additionalProperties: false``; free
  ``dict`` fields accept any keys;
* top level: ``automl_default_parameters`` (dotted leaves with ``automl_enabled``) and
  ``automl_disabled_parameters`` (the other leaves), both sorted.

Like TAO's ``filter_schema``, the schema and the template of action A keep every top-level field that is not an
action, plus ``train`` and A; the sections of the other actions are not described, but their names are still
accepted at the top level (``propertyNames``), so one spec file holding every section validates for each action.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf

from networks.common.io import atomic_write_text
from networks.common.network import Network
from tao_cli.fields import (
    FieldInfo,
    bound,
    cast_option,
    iter_fields,
    scalar_type,
    split_optional,
    valid_options,
)

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "json_schema",
    "spec_template",
    "commented_yaml",
    "field_notes",
    "FieldSummary",
    "field_summaries",
    "default_instance",
    "kept_sections",
    "write_schemas",
    "skill_info",
    "AUTOML_POLICIES",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_X_TAO_KEYS = ("popular", "math_cond", "depends_on", "option_weights", "parent_param", "relaxed_from", "required")


# ------------------------------------------------------------------------------------------------ helpers
def kept_sections(schema_cls: type, action: str, actions: list[str] | dict[str, str]) -> list[str]:
    """Top-level field names kept for ``action``: every non-action field, ``train`` and ``action`` itself;
    ``automl`` (read by ``tao automl`` and the train policy) only for ``train``."""
    others = (set(actions) - {action, "train"}) | ({"automl"} if action != "train" else set())
    return [f.name for f in dataclasses.fields(schema_cls) if f.name not in others]


def _defaults(schema_cls: type) -> dict[str, Any]:
    """Plain defaults of the whole schema; MISSING shows as ``???``; interpolations are kept as text."""
    return OmegaConf.to_container(OmegaConf.structured(schema_cls), resolve=False, enum_to_str=True)


def _filtered_defaults(schema_cls: type, action: str, actions: list[str] | dict[str, str]) -> dict[str, Any]:
    keep = kept_sections(schema_cls, action, actions)
    return {k: v for k, v in _defaults(schema_cls).items() if k in keep}


def _drop_missing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_missing(v) for k, v in value.items() if not (isinstance(v, str) and v == MISSING)}
    if isinstance(value, list):
        return [_drop_missing(v) for v in value]
    return value


def default_instance(schema_cls: type, action: str | None = None,
                     actions: list[str] | dict[str, str] = ()) -> dict[str, Any]:
    """The defaults as a plain dict with MISSING values removed and interpolations resolved where they can be;
    restricted to the sections kept for ``action`` when it is given.  It validates against :func:`json_schema`."""
    cfg = OmegaConf.structured(schema_cls)
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    except Exception:  # noqa: BLE001 - an interpolation to a MISSING value: keep the text
        data = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    if action is not None:
        keep = kept_sections(schema_cls, action, actions)
        data = {k: v for k, v in data.items() if k in keep}
    return _drop_missing(data)


def _children(fields: list[FieldInfo], parent: str) -> list[FieldInfo]:
    depth = parent.count(".") + 1 if parent else 0
    prefix = parent + "." if parent else ""
    return [f for f in fields if f.key.startswith(prefix) and f.depth == depth]


def _as_type(number: float, integer: bool) -> int | float:
    return int(number) if integer and float(number).is_integer() else number


def _json_safe(value: Any) -> Any:
    """``value`` if it is valid strict JSON (no NaN/Infinity, no exotic objects), else the marker ``_UNSAFE``."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return _UNSAFE
    return value


_UNSAFE = object()


# ------------------------------------------------------------------------------------------- JSON Schema
def _type_schema(tp: Any) -> dict[str, Any]:
    """The JSON-Schema fragment for a Python annotation (without Optional handling)."""
    base, optional = split_optional(tp)
    if optional:
        return _nullable(_type_schema(base))
    origin = typing.get_origin(base) or base
    args = typing.get_args(base)
    if base is bool:
        return {"type": "boolean"}
    if base is int:
        return {"type": "integer"}
    if base is float:
        return {"type": "number"}
    if base is str:
        return {"type": "string"}
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return {"type": "string", "enum": [m.name for m in base]}
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return _section_schema(list(iter_fields(base)), "", base)
    if origin in (list, tuple):
        item = args[0] if args and args[0] is not Ellipsis else Any
        return {"type": "array", "items": _type_schema(item)}
    if origin is dict:
        value_tp = args[1] if len(args) == 2 else Any
        out: dict[str, Any] = {"type": "object"}
        if value_tp is not Any:
            out["additionalProperties"] = _type_schema(value_tp)
        return out
    if origin is typing.Union:
        return {"anyOf": [_type_schema(a) for a in args]}
    return {}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    schema = dict(schema)
    if "type" in schema:
        t = schema["type"]
        schema["type"] = (t if isinstance(t, list) else [t]) + ([] if "null" in (t if isinstance(t, list) else [t])
                                                              else ["null"])
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
    elif "anyOf" in schema:
        schema["anyOf"] = [*schema["anyOf"], {"type": "null"}]
    return schema


def _innermost(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of the scalars of a (nested) list schema; the schema itself for a scalar."""
    while schema.get("type") in ("array", ["array", "null"]) and isinstance(schema.get("items"), dict):
        schema = schema["items"]
    return schema


def _x_tao(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"automl_enabled": bool(meta.get("automl_enabled"))}
    for key in _X_TAO_KEYS:
        value = meta.get(key)
        if value is None or value is False or value == "" or value == [] or value == {}:
            continue
        value = _json_safe(value)
        if value is not _UNSAFE:
            out[key] = value
    return out


def _leaf_schema(field: FieldInfo) -> dict[str, Any]:
    meta = field.metadata
    base_schema = _type_schema(field.base)
    scalar = scalar_type(field.type)
    is_list = (typing.get_origin(field.base) or field.base) in (list, tuple)
    target = _innermost(base_schema)
    integer = scalar is int
    lo, hi = bound(meta["valid_min"]), bound(meta["valid_max"])
    if scalar in (int, float) and lo is not None:
        target["minimum"] = _as_type(lo, integer)
    if scalar in (int, float) and hi is not None:
        target["maximum"] = _as_type(hi, integer)
    options = valid_options(meta)
    if options:
        enum_values = [_json_safe(cast_option(o, scalar)) for o in options]
        target["enum"] = [v for v in enum_values if v is not _UNSAFE]
    schema = _nullable(base_schema) if field.optional else base_schema
    if field.optional and not is_list and "enum" in schema and None not in schema["enum"]:
        schema["enum"] = [*schema["enum"], None]
    out: dict[str, Any] = {}
    if meta.get("display_name"):
        out["title"] = meta["display_name"]
    if meta.get("description"):
        out["description"] = meta["description"]
    out.update(schema)
    default = field.default
    if not field.missing and not (isinstance(default, str) and "${" in default):
        default = _json_safe(default)
        if default is not _UNSAFE:
            out["default"] = default
    if meta.get("examples"):
        examples = _json_safe(list(meta["examples"]))
        if examples is not _UNSAFE:
            out["examples"] = examples
    out["x-tao"] = _x_tao(meta)
    return out


def _class_description(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    # dataclasses invent "Name(field: type, ...)" when there is no docstring: not a description
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def _section_schema(fields: list[FieldInfo], parent: str, cls: type | None = None,
                    meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema for the children of ``parent`` in ``fields`` (keys relative to the same root)."""
    out: dict[str, Any] = {}
    if meta and meta.get("display_name"):
        out["title"] = meta["display_name"]
    description = (meta or {}).get("description")
    if not description and cls is not None:
        description = _class_description(cls)
    if description:
        out["description"] = description
    properties: dict[str, Any] = {}
    for child in _children(fields, parent):
        if child.section:
            sub = _section_schema(fields, child.key, child.section_cls, child.metadata)
            if child.optional:
                sub["type"] = ["object", "null"]
            properties[child.name] = sub
        else:
            properties[child.name] = _leaf_schema(child)
    out.update({"type": "object", "properties": properties, "additionalProperties": False})
    if meta is not None:
        out["x-tao"] = _x_tao(meta)
    return out


def json_schema(schema_cls: type, network: str, action: str, actions: list[str] | dict[str, str]) -> dict:
    """JSON Schema 2020-12 of the spec of ``network`` ``action`` (see the module docstring for the mapping)."""
    fields = list(iter_fields(schema_cls))
    keep = set(kept_sections(schema_cls, action, actions))
    fields = [f for f in fields if f.key.split(".")[0] in keep]
    body = _section_schema(fields, "", None, None)
    leaves = [f for f in fields if not f.section]
    automl_on = sorted(f.key for f in leaves if f.metadata.get("automl_enabled"))
    automl_off = sorted(f.key for f in leaves if not f.metadata.get("automl_enabled"))
    all_top = [f.name for f in dataclasses.fields(schema_cls)]
    schema: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"urn:tao-cli:{network}:{action}",
        "title": f"{network} {action} spec",
        "description": f"Spec of `tao model {network} {action}` (defaults < YAML < key=value overrides).",
        "type": "object",
        "properties": body["properties"],
        # Other actions' sections are not described but may appear (one spec file for every action).
        "propertyNames": {"enum": all_top},
        "automl_default_parameters": automl_on,
        "automl_disabled_parameters": automl_off,
        "x-tao": {"network": network, "action": action, "actions": list(actions)},
    }
    return schema


# ------------------------------------------------------------------------------------------------- YAML
def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def spec_template(schema_cls: type, action: str, actions: list[str] | dict[str, str]) -> str:
    """YAML of the defaults kept for ``action`` (``???`` marks values that must be set)."""
    header = f"# Spec template for '{action}': every value is the default; ??? marks a value you must set.\n"
    return header + _dump(_filtered_defaults(schema_cls, action, actions))


def _flow(value: Any) -> str:
    """One-line YAML for a value (flow style for lists and dicts)."""
    if isinstance(value, str) and value == MISSING:
        return "???"
    text = yaml.safe_dump({"k": value}, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return text[len("{k: "):-1]


def _range_text(meta: dict[str, Any], integer: bool) -> str | None:
    lo, hi = bound(meta["valid_min"]), bound(meta["valid_max"])
    if lo is None and hi is None:
        return None
    left = "(-inf" if lo is None else f"[{_as_type(lo, integer)}"
    right = "inf)" if hi is None else f"{_as_type(hi, integer)}]"
    return f"{left}, {right}"


def _description(field: FieldInfo) -> str:
    description = str(field.metadata.get("description") or "").strip()
    if not description and field.section_cls is not None:
        description = _class_description(field.section_cls)
    return description


def _comment(field: FieldInfo, action: str, note: str | None = None) -> str:
    meta = field.metadata
    parts = [_description(field)]
    if note:
        parts.append(note[0].upper() + note[1:] + ".")
    if not field.section:
        rng = _range_text(meta, scalar_type(field.type) is int)
        if rng:
            parts.append(f"Range: {rng}.")
        options = valid_options(meta)
        if options:
            parts.append("Options: " + ", ".join(str(o) for o in options) + ".")
        if field.missing:
            in_action = field.key.split(".")[0] == action
            parts.append(f"Required for '{action}'." if in_action else "No default (???): set it when used.")
        else:
            parts.append(f"Default: {_flow(field.default)}.")
    return " ".join(p for p in parts if p)


def field_notes(net: Network) -> dict[str, str]:
    """``{dotted key: note}`` for the fields ``net`` does not act on: ``unsupported: <reason>`` and
    ``ignored: <reason>`` (a key may name a whole section)."""
    notes = {key: f"unsupported: {reason}" for key, reason in net.unsupported.items()}
    notes.update({key: f"ignored: {reason}" for key, reason in net.tao_ignored.items()})
    return notes


def commented_yaml(schema_cls: type, action: str, actions: list[str] | dict[str, str],
                   notes: dict[str, str] | None = None) -> str:
    """The default spec of ``action`` as YAML with a comment above each field (description, range, options,
    default).  Loads back to the defaults; what ``tao spec <net> <action>`` prints.  ``notes`` (see
    :func:`field_notes`) are appended to the comment of the field or section they name."""
    notes = notes or {}
    fields = list(iter_fields(schema_cls))
    keep = set(kept_sections(schema_cls, action, actions))
    fields = [f for f in fields if f.key.split(".")[0] in keep]
    values = _filtered_defaults(schema_cls, action, actions)
    lines = [
        f"# Default spec for '{action}'. Values marked 'Required' must be set (in this file or as key=value).",
        "",
    ]

    def emit(parent: str, data: dict[str, Any], indent: int) -> None:
        pad = "  " * indent
        for child in _children(fields, parent):
            if child.name not in data:
                continue
            value = data[child.name]
            comment = _comment(child, action, notes.get(child.key))
            if comment:
                for line in textwrap.wrap(comment, width=max(40, 110 - len(pad) - 2)):
                    lines.append(f"{pad}# {line}")
            if child.section and isinstance(value, dict) and value:
                lines.append(f"{pad}{child.name}:")
                emit(child.key, value, indent + 1)
            else:
                lines.append(f"{pad}{child.name}: {_flow(value)}")
            if indent == 0:
                lines.append("")

    emit("", values, 0)
    return "\n".join(lines).rstrip("\n") + "\n"


@dataclasses.dataclass(frozen=True)
class FieldSummary:
    """One leaf of an action's spec, as ``tao model <net> <action> --help`` lists it and shell completion offers it.

    ``type`` is a short name (``int``, ``float|null``, ``list[int]``); ``default`` is one-line YAML (``???`` when
    the value must come from the spec); ``limits`` is the range (``[1, inf)``) or the options (``a|b``), or ``""``;
    ``options`` are the values a shell may offer after ``key=`` (valid options, enum names, true/false).
    """

    key: str
    type: str
    default: str
    limits: str
    description: str
    required: bool
    options: tuple[str, ...]


def _type_name(tp: Any) -> str:
    """A short, Python-like name of an annotation for one-line listings."""
    base, optional = split_optional(tp)
    origin = typing.get_origin(base) or base
    args = typing.get_args(base)
    if base in (bool, int, float, str):
        name = base.__name__
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        name = "str"
    elif origin in (list, tuple):
        item = args[0] if args and args[0] is not Ellipsis else Any
        name = "list" if item is Any else f"list[{_type_name(item)}]"
    elif origin is dict:
        name = "dict"
    elif origin is typing.Union:
        name = "|".join(_type_name(a) for a in args)
    else:
        name = "any"
    return name + ("|null" if optional else "")


def field_summaries(schema_cls: type, action: str, actions: list[str] | dict[str, str]) -> list[FieldSummary]:
    """Every leaf field kept for ``action`` (the same fields and metadata as :func:`commented_yaml`), in
    declaration order."""
    keep = set(kept_sections(schema_cls, action, actions))
    out: list[FieldSummary] = []
    for field in iter_fields(schema_cls):
        if field.section or field.key.split(".")[0] not in keep:
            continue
        meta = field.metadata
        scalar = scalar_type(field.type)
        options = [str(_flow(cast_option(o, scalar))) for o in valid_options(meta)]
        if not options and isinstance(field.base, type) and issubclass(field.base, enum.Enum):
            options = [m.name for m in field.base]
        limits = "|".join(options) if options else (_range_text(meta, scalar is int) or "")
        if not options and field.base is bool:
            options = ["true", "false"]
        required = field.missing and field.key.split(".")[0] == action
        out.append(FieldSummary(field.key, _type_name(field.type), _flow(field.default), limits,
                                " ".join(_description(field).split()), required, tuple(options)))
    return out


# ------------------------------------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


AUTOML_POLICIES = ("off", "auto")


def skill_info(net: Network) -> dict[str, Any]:
    """What ``references/skill_info.yaml`` holds: ``network``; ``automl_enabled`` (the train spec has at least one
    field marked automl_enabled); ``automl_policy`` (the spec default of ``automl.automl_policy``, else ``off``;
    one of :data:`AUTOML_POLICIES`); ``automl_default_parameters`` (the train schema's list); ``actions``."""
    train = json_schema(net.config_class, net.name, "train", list(net.actions))
    policy_node = train["properties"].get("automl", {}).get("properties", {}).get("automl_policy", {})
    policy = policy_node.get("default", "off")
    return {
        "network": net.name,
        "automl_enabled": bool(train["automl_default_parameters"]),
        "automl_policy": policy if policy in AUTOML_POLICIES else "off",
        "automl_default_parameters": list(train["automl_default_parameters"]),
        "actions": list(net.actions),
    }


def write_schemas(net: Network, out_dir: Path, version: str) -> list[Path]:
    """Write ``schemas/<action>.schema.json`` and ``references/spec_template_<action>.yaml`` for every action of
    ``net`` (its name, actions and config class), ``references/skill_info.yaml`` (:func:`skill_info`) and
    ``schemas/manifest.json`` (network, actions, package_version, sha256 of each other file keyed by its path
    relative to ``out_dir``).  Atomic writes; the output is deterministic (no timestamps).  Returns the written
    paths, the manifest last."""
    out_dir = Path(out_dir)
    name = net.name
    actions = list(net.actions)
    cls = net.config_class
    written: list[Path] = []
    for action in actions:
        schema = json_schema(cls, name, action, actions)
        written.append(atomic_write_text(out_dir / "schemas" / f"{action}.schema.json",
                                         json.dumps(schema, indent=2, allow_nan=False) + "\n"))
        written.append(atomic_write_text(out_dir / "references" / f"spec_template_{action}.yaml",
                                         spec_template(cls, action, actions)))
    written.append(atomic_write_text(out_dir / "references" / "skill_info.yaml", _dump(skill_info(net))))
    manifest = {
        "network": name,
        "actions": actions,
        "package_version": version,
        "files": {p.relative_to(out_dir).as_posix(): _sha256(p) for p in written},
    }
    written.append(atomic_write_text(out_dir / "schemas" / "manifest.json",
                                     json.dumps(manifest, indent=2, allow_nan=False) + "\n"))
    return written
