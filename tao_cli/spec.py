"""Load a spec: dataclass defaults < YAML file < command-line overrides, validated, in struct mode.

The precedence and the override grammar are TAO's (Hydra 1.3: ``OmegaConf.merge(schema, yaml)`` then the
overrides, parsed by Hydra's own ``OverridesParser``).  On top of that this module enforces what TAO only
declares: the field metadata ``valid_min``/``valid_max``/``valid_options`` and the mandatory (``???``) values of
the action being run.  Every problem is a :class:`networks.common.errors.ConfigError` whose one line names the
dotted key (or ``file:line``), the value and what to do.

Override grammar (one argv word per override; words are never joined and re-split):

* ``a.b=v``      set a schema key (``v`` in Hydra's value grammar: ``[0,1]``, ``[{k: v}]``, ``'x y'``, ``null``).
* ``+a.b=v``     the same as ``a.b=v`` when ``a.b`` is in the schema; a key outside the schema is an error
                 (TAO/Hydra would silently add it; a typo there is never what the user wants).
* ``++a.b=v``    the same as ``a.b=v``.
* ``~a.b``       reset ``a.b`` (a key or a whole section) to its dataclass default (Hydra deletes the key, which
                 for a structured config amounts to the same thing); ``~a.b=v`` only when the current value is v.
                 Inside a free-form dict field, ``~`` deletes the entry.

Interpolations (``${train.num_epochs}``, ``${oc.env:HOME}``) are resolved before validation.  No ``eval``
resolver is registered: TAO's ``${eval:...}`` ran Python on spec text.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationKeyError,
    InterpolationResolutionError,
    InterpolationToMissingValueError,
    InterpolationValidationError,
    OmegaConfBaseException,
    UnsupportedInterpolationType,
    ValidationError,
)

from networks.common.errors import ConfigError
from tao_cli.fields import (
    FieldInfo,
    all_keys,
    bound,
    cast_option,
    element_type,
    field_map,
    iter_fields,
    lookup,
    scalar_type,
    split_optional,
    valid_options,
)
from tao_cli.redact import REDACTED, redact_container

__all__ = ["FieldInfo", "load_spec", "iter_fields", "all_keys", "lookup", "to_yaml", "REDACTED"]

_NO_DEFAULT = object()


# --------------------------------------------------------------------------------------------- messages
def _type_phrase(tp: Any, optional: bool = False) -> str:
    base, opt = split_optional(tp)
    optional = optional or opt
    origin = typing.get_origin(base) or base
    if base is bool:
        text = "a boolean (true/false)"
    elif base is int:
        text = "an integer"
    elif base is float:
        text = "a number"
    elif base is str:
        text = "a string"
    elif isinstance(base, type) and issubclass(base, enum.Enum):
        text = "one of " + ", ".join(m.name for m in base)
    elif isinstance(base, type) and dataclasses.is_dataclass(base):
        text = "a section (a mapping of keys)"
    elif origin in (list, tuple, typing.List):  # noqa: UP006
        args = typing.get_args(base)
        text = f"a list of {_type_phrase(args[0]).removeprefix('a ').removeprefix('an ')}s" if args and args[0] is not Any else "a list"
    elif origin in (dict, typing.Dict):  # noqa: UP006
        text = "a mapping"
    else:
        text = "a value"
    return text + (" or null" if optional else "")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected_for(schema_cls: type, full_key: str) -> tuple[str, Any, bool]:
    """(dotted key, annotation, optional) of the field a (possibly indexed) OmegaConf key refers to."""
    key = re.sub(r"\[(\d+)\]", r".\1", full_key)
    indexes = 0
    while key:
        field, inside = lookup(schema_cls, key)
        if field is not None and not inside:
            tp = field.type
            optional = field.optional
            for _ in range(indexes):
                tp, optional = element_type(tp), False
                tp, opt = split_optional(tp)
                optional = opt
            return key, tp, optional
        if "." not in key:
            break
        key, _, _ = key.rpartition(".")
        indexes += 1
    return full_key, Any, False


def _suggest(schema_cls: type, key: str) -> str | None:
    """A ``did you mean`` candidate for an unknown dotted key: a close name in the same section; for a misspelt
    section, a close key at the same depth; else the same (or a close) leaf name under another section."""
    fields = field_map(schema_cls)
    parts = key.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    keys = [k for k in fields if k not in ancestors]
    parent, _, leaf = key.rpartition(".")
    if not parent or (parent in fields and fields[parent].section):
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.75)
        if close:
            return f"{parent}.{close[0]}" if parent else close[0]
    elif parent not in fields:
        same_depth = [k for k in keys if k.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.8)
        if close:
            return close[0]
    by_depth = sorted(keys, key=lambda k: (k.count("."), k))
    same_leaf = [k for k in by_depth if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    leaves: dict[str, str] = {}
    for k in by_depth:
        leaves.setdefault(k.rpartition(".")[2], k)
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return leaves[close[0]] if close else None


def _unknown_key(schema_cls: type, key: str, problem: str) -> ConfigError:
    fields = field_map(schema_cls)
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        holder = fields.get(".".join(parts[:i]))
        if holder is not None and not holder.section:
            return ConfigError(key, problem, f"'{holder.key}' holds a value, not a section")
    guess = _suggest(schema_cls, key)
    if guess:
        return ConfigError(key, problem, f"did you mean '{guess}'?")
    # Name the keys of the deepest section of ``key`` that exists.
    section = ""
    for i in range(len(parts) - 1, 0, -1):
        cand = ".".join(parts[:i])
        if cand in fields and fields[cand].section:
            section = cand
            break
    names = [k.rpartition(".")[2] for k in fields if k.rpartition(".")[0] == section]
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    where = f"'{section}'" if section else "the top level"
    return ConfigError(key, problem, f"valid keys in {where}: {shown}")


def _type_error(schema_cls: type, full_key: str, value: Any) -> ConfigError:
    key, tp, optional = _expected_for(schema_cls, full_key or "")
    if value is None and not optional:
        return ConfigError(full_key or key, f"null is not allowed, expected {_type_phrase(tp)}")
    return ConfigError(full_key or key, f"{_show(value)} is not {_type_phrase(tp, optional)}")


def _omegaconf_error(schema_cls: type, exc: OmegaConfBaseException, where: str,
                     source: str | None = None) -> ConfigError:
    """Turn an OmegaConf merge/assignment error into a one-line ConfigError (``source``: ``spec.yaml:N``)."""
    full_key = getattr(exc, "full_key", "") or ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return _unknown_key(schema_cls, full_key, f"unknown key {where}")
    if isinstance(exc, ValidationError):
        err = _type_error(schema_cls, full_key, getattr(exc, "value", None))
        if source:
            err = ConfigError(err.subject, f"{err.problem} ({source})", err.hint)
        return err
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    return ConfigError(full_key or where, msg)


# ------------------------------------------------------------------------------------------------- YAML
def _yaml_loader() -> type:
    try:  # OmegaConf's loader: what Hydra uses (it reads `1e-4` as a float, rejects duplicate keys)
        from omegaconf._utils import get_yaml_loader

        return get_yaml_loader()
    except ImportError:  # pragma: no cover - omegaconf layout changed
        return yaml.SafeLoader


#: Most YAML nodes a spec may expand to once aliases are followed (TAO's largest specs have a few hundred).
MAX_YAML_NODES = 100_000


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in ``root`` with every alias expanded, counted without expanding (aliases share node objects);
    stops counting once past ``limit``."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = limit + 1  # a node reached again while being counted (a cycle) is over the limit
        total = 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(node)] = min(total, limit + 1)
        return sizes[id(node)]

    return size(root)


def _key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the composed YAML (best effort).  Each node is walked once, so
    aliases cost nothing."""
    lines: dict[str, int] = {}
    seen: set[int] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode) and id(node) not in seen:
            seen.add(id(node))
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = f"{prefix}{key_node.value}"
                    lines.setdefault(key, key_node.start_mark.line + 1)
                    walk(value_node, key + ".")

    walk(root, "")
    return lines


def _read_yaml(spec_path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    path = Path(spec_path)
    if not path.exists():
        raise ConfigError(str(path), "spec file not found", "check the -e path")
    if not path.is_file():
        raise ConfigError(str(path), "spec path is not a file", "check the -e path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the spec file ({exc})", "check the -e path") from None
    try:
        # tao-cli's experiment.yaml carries the run record as a second document: only the first is the spec
        loader = _yaml_loader()(text)  # a SafeLoader subclass
        try:
            root = loader.get_node() if loader.check_node() else None
            if root is not None and _expanded_size(root, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise ConfigError(str(path), f"the YAML expands to more than {MAX_YAML_NODES} nodes through its "
                                  "anchors and aliases", "write the values out, or use fewer nested aliases")
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(str(exc.problem or "invalid YAML").split())
        if exc.context:
            problem += f" ({' '.join(str(exc.context).split())})"
        raise ConfigError(line, f"YAML syntax error: {problem}", "fix the spec file at that line") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"YAML error: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"the spec must be a mapping of keys at the top level, not {type(data).__name__}",
                          "write the spec as `section:` / `  key: value` lines")
    return data, _key_lines(root)


def _where(name: str, lines: dict[str, int], key: str) -> str:
    """``spec.yaml:12`` for the line of ``key`` (or of its nearest listed parent), else ``spec.yaml``."""
    key = re.sub(r"\[(\d+)\]", r".\1", key)
    while key:
        if key in lines:
            return f"{name}:{lines[key]}"
        key = key.rpartition(".")[0]
    return name


def _check_yaml_keys(schema_cls: type, data: dict, prefix: str, fields: dict[str, FieldInfo], source: str,
                     lines: dict[str, int]) -> None:
    """Reject keys outside the schema before merging, so the message names the full dotted key.  A null
    section (every child commented out) is read as an empty section."""
    for k in list(data):
        key = f"{prefix}{k}"
        field = fields.get(key)
        if field is None:
            raise _unknown_key(schema_cls, key, f"unknown key in {_where(source, lines, key)}")
        value = data[k]
        if field.section:
            if value is None:
                if not field.optional:
                    data[k] = {}
            elif isinstance(value, dict):
                _check_yaml_keys(schema_cls, value, key + ".", fields, source, lines)
            elif not (isinstance(value, str) and ("${" in value or value == MISSING)):
                raise ConfigError(key, f"{_show(value)} is not a section (a mapping of keys) in {_where(source, lines, key)}",
                                  f"write `{k}:` followed by indented `key: value` lines")


#: Top-level keys of TAO spec files that TAO documents but never reads: accepted (with one warning) so those
#: files load verbatim.  ``strategy`` is in TAO 5.5's MAL example spec; the code picks the strategy itself.
TAO_IGNORED_TOP_LEVEL = {
    "strategy": "TAO documents it but never reads it; the strategy is picked from the devices "
                "(train.distributed_strategy where the network has it)",
}


def _drop_ignored_keys(schema_cls: type, data: dict, source: str, lines: dict[str, int]) -> None:
    """Remove the top-level keys of :data:`TAO_IGNORED_TOP_LEVEL` that the schema does not have from ``data``,
    logging one warning per key (``spec.yaml:1: 'strategy: ddp' is ignored (...)``)."""
    import logging

    fields = field_map(schema_cls)
    for key, why in TAO_IGNORED_TOP_LEVEL.items():
        if key in data and key not in fields:
            value = data.pop(key)
            logging.getLogger("tao").warning("%s: '%s: %s' is ignored (%s)", _where(source, lines, key), key,
                                             _clip(value, 40), why)


# --------------------------------------------------------------------------------------------- overrides
def _parse_overrides(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except OverrideParseException as exc:
            first = " ".join(str(exc).splitlines()[0].split())
            raise ConfigError(text, f"cannot parse the override ({first})",
                              "use key=value; quote a value with spaces or commas: key='a, b'") from None
        if ov.is_sweep_override():
            raise ConfigError(text, "sweeps (several values) are not supported",
                              "give one value; for a list write key=[a,b], for text with commas quote it") from None
        if ov.package is not None:
            raise ConfigError(text, "package overrides (key@package) are not supported", "write key=value")
        parsed.append(ov)
    return parsed


def _is_interp(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _apply_override(cfg: DictConfig, base: DictConfig, schema_cls: type, ov: Any) -> None:
    from hydra.core.override_parser.types import OverrideType

    key: str = ov.key_or_group
    text: str = ov.input_line or key
    field, inside = lookup(schema_cls, key)
    if field is None:
        if ov.type is OverrideType.ADD:
            raise _unknown_key(schema_cls, key, f"may not add keys outside the schema ('{text}')")
        raise _unknown_key(schema_cls, key, f"unknown key in override '{text}'")

    if ov.type is OverrideType.DEL:
        current = OmegaConf.select(cfg, key, default=_NO_DEFAULT, throw_on_missing=False,
                                   throw_on_resolution_failure=False)
        if current is _NO_DEFAULT and inside:
            raise ConfigError(key, f"nothing to delete ('{text}')")
        expected = ov.value()
        if expected is not None:
            cur = OmegaConf.to_container(current) if isinstance(current, (DictConfig, ListConfig)) else current
            if cur != expected:
                raise ConfigError(key, f"cannot reset: the value is {_show(cur)}, not {_show(expected)} ('{text}')",
                                  f"write ~{key} to reset it whatever its value")
        if inside:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key)
            if isinstance(parent, DictConfig):
                del parent[leaf]
            else:
                raise ConfigError(key, f"only dict entries can be deleted ('{text}')")
            return
        default = OmegaConf.select(base, key, throw_on_missing=False)
        if isinstance(default, (DictConfig, ListConfig)):
            default = default.copy()  # a typed copy: a section is replaced wholesale, not merged
        _set(cfg, schema_cls, key, default, text, merge=False)
        return

    value = ov.value()
    if field.section and not inside and not isinstance(value, dict) and not _is_interp(value) \
            and not (value is None and field.optional):
        raise ConfigError(key, f"{_show(value)} is not a section (a mapping of keys) ('{text}')",
                          f"set its keys one by one, e.g. {key}.<name>=<value>")
    _set(cfg, schema_cls, key, value, text, merge=True)


def _set(cfg: DictConfig, schema_cls: type, key: str, value: Any, text: str, merge: bool) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=merge)
    except (ConfigKeyError, ConfigAttributeError) as exc:
        full = getattr(exc, "full_key", "") or key
        raise _unknown_key(schema_cls, full, f"unknown key in override '{text}'") from None
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(schema_cls, exc, f"in override '{text}'") from None


# ------------------------------------------------------------------------------------ interpolation, checks
#: Longest value (in characters) an interpolation may produce, each ``${...}`` expansion counted as one more
#: character (a chain of references to an empty string costs time too).  Paths and names are far shorter; the
#: limit is there because ``${a}${a}...`` chains grow geometrically: 7 fields x 9 references reach 4 M
#: characters, and OmegaConf re-resolves every reference (about 20 µs each), so the time grows the same way.
MAX_INTERPOLATED_CHARS = 50_000
#: Most characters of one part of an error message (key, problem, hint) that echo user text.
MAX_ECHO_CHARS = 300


def _clip(text: Any, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (``...`` and the full length marking the cut)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 30, 10)]}... ({len(text)} characters)"


def _short_error(exc: ConfigError) -> ConfigError:
    """``exc`` with every part capped at ``MAX_ECHO_CHARS``: whatever a spec holds, the error stays one short line."""
    parts = (exc.subject, exc.problem, exc.hint)
    if all(p is None or len(p) <= MAX_ECHO_CHARS for p in parts):
        return exc
    subject, problem, hint = (None if p is None else _clip(p, MAX_ECHO_CHARS) for p in parts)
    return type(exc)(subject, problem, hint)


def _spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each outermost ``${...}`` in ``text`` (``end`` past the closing brace)."""
    spans, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text.startswith("${", i):
            if depth == 0:
                start = i
            depth += 1
            i += 2
            continue
        if text[i] == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
        i += 1
    return spans


def _raw_node(cfg: DictConfig, container: Any, ref: str) -> Any:
    """The unresolved node ``${ref}`` names (absolute, or relative to ``container`` with leading dots), or None."""
    node = cfg
    if ref.startswith("."):
        dots = len(ref) - len(ref.lstrip("."))
        node, ref = container, ref[dots:]
        for _ in range(dots - 1):
            node = node._get_parent() if node is not None else None
    for part in [p for p in re.split(r"[.\[\]]", ref) if p]:
        if not isinstance(node, (DictConfig, ListConfig)) or node._is_none() or node._is_missing() \
                or node._is_interpolation():
            return None
        try:
            node = node._get_node(int(part) if isinstance(node, ListConfig) else part)
        except (ValueError, KeyError, IndexError, OmegaConfBaseException):
            return None
    return node


def _expanded_chars(cfg: DictConfig, node: Any, memo: dict[int, int], active: set[int]) -> int:
    """Characters ``node`` would take once every interpolation in it is resolved, computed without resolving
    (each node once, so a fan-out costs nothing).  An upper estimate for plain ``${key}`` references (and
    ``oc.select``/``oc.env``); a resolver's result counts as its expression text."""
    if node is None:
        return 0
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:  # a cycle: OmegaConf reports it when resolving
        return 0
    active.add(id(node))
    try:
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_interpolation():
            if node._is_none() or node._is_missing():
                total = 4
            else:
                keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
                total = sum(len(str(k)) + 2 + _expanded_chars(cfg, node._get_node(k), memo, active) for k in keys)
        else:
            raw = node._value()
            if isinstance(raw, str) and "${" in raw:
                total = _expr_chars(cfg, raw, node._get_parent(), memo, active)
            else:
                total = len(str(raw))
    finally:
        active.discard(id(node))
    memo[id(node)] = total
    return total


def _expr_chars(cfg: DictConfig, text: str, container: Any, memo: dict[int, int], active: set[int]) -> int:
    total, last = 0, 0
    for start, end in _spans(text):
        total += start - last
        last = end
        inner = text[start + 2:end - 1]
        name, colon, args = inner.partition(":")
        if colon and "${" not in name:  # a resolver call
            total += len(inner) + _expr_chars(cfg, args, container, memo, active)
            first = args.split(",")[0].strip()
            if name == "oc.select":
                total += 1 + _expanded_chars(cfg, _raw_node(cfg, container, first), memo, active)
            elif name == "oc.env":
                total += len(os.environ.get(first, ""))
        elif "${" in inner:  # a key computed from another interpolation: count the parts
            total += len(inner) + _expr_chars(cfg, inner, container, memo, active)
        else:
            total += 1 + _expanded_chars(cfg, _raw_node(cfg, container, inner.strip()), memo, active)
    return total + len(text) - last


def _iter_nodes(node: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[DictConfig | ListConfig, Any, str]]:
    """(container, key, dotted path) for every child of ``node``, depth first, containers before children."""
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for k in keys:
        path = f"{prefix}{k}" if isinstance(node, DictConfig) else f"{prefix.rstrip('.')}[{k}]"
        yield node, k, path
        if OmegaConf.is_interpolation(node, k) or OmegaConf.is_missing(node, k):
            continue
        child = node._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            yield from _iter_nodes(child, path + ".")


def _resolve(cfg: DictConfig, schema_cls: type) -> None:
    """Resolve every interpolation in place.  One that points at a MISSING value is left as it is (and reported
    by the mandatory check when it sits in the action section).  A value that would grow past
    ``MAX_INTERPOLATED_CHARS`` is refused before OmegaConf expands it."""
    memo: dict[int, int] = {}
    for container, k, path in list(_iter_nodes(cfg, "")):
        if not OmegaConf.is_interpolation(container, k):
            continue
        expr = container._get_node(k)._value()
        if _expanded_chars(cfg, container._get_node(k), memo, set()) > MAX_INTERPOLATED_CHARS:
            raise ConfigError(path, f"the interpolated value of {_clip(expr)} would exceed "
                              f"{MAX_INTERPOLATED_CHARS} characters",
                              "write the value out, or use fewer nested ${...} references")
        expr = _clip(expr)
        try:
            value = container[k]
        except InterpolationToMissingValueError:
            continue
        except InterpolationValidationError as exc:
            raise ConfigError(path, f"{expr} gives {_show(getattr(exc, 'value', None))}, which is not "
                              f"{_type_phrase(_expected_for(schema_cls, path)[1])}") from None
        except UnsupportedInterpolationType as exc:
            found = re.search(r"interpolation type (\S+)", str(getattr(exc, "msg", exc)))
            name = found.group(1) if found else "?"
            raise ConfigError(path, f"cannot resolve {expr}: unsupported resolver '{name}'",
                              "resolvers such as ${eval:...} are not supported; write the value itself") from None
        except InterpolationKeyError as exc:
            msg = str(getattr(exc, "msg", exc)).splitlines()[0]
            raise ConfigError(path, f"cannot resolve {expr}: {msg}", "point the ${...} at an existing key") from None
        except (InterpolationResolutionError, OmegaConfBaseException) as exc:
            msg = " ".join(str(getattr(exc, "msg", exc)).splitlines()[0].split())
            raise ConfigError(path, f"cannot resolve {expr}: {msg}") from None
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            container[k] = value
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(schema_cls, exc, f"(from {expr})") from None


def _conform(value: Any, tp: Any, path: str) -> tuple[str, Any, Any] | None:
    """First element of ``value`` (a resolved plain value) that does not match the annotation ``tp``, as
    (path, value, expected annotation); ``None`` when it all matches.  OmegaConf checks scalars itself but lets a
    nested list into a ``list[str]`` field."""
    base, optional = split_optional(tp)
    if value is None:
        return None if optional or base is Any else (path, value, tp)
    if isinstance(value, str) and value == MISSING:
        return None
    origin = typing.get_origin(base) or base
    args = typing.get_args(base)
    if base is Any or isinstance(base, typing.TypeVar):
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return path, value, tp
        for i, v in enumerate(value):
            bad = _conform(v, args[0] if args else Any, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return path, value, tp
        for k, v in value.items():
            bad = _conform(v, args[1] if len(args) == 2 else Any, f"{path}.{k}")
            if bad:
                return bad
        return None
    if base is bool:
        return None if isinstance(value, bool) else (path, value, tp)
    if base is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else (path, value, tp)
    if base is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else (path, value, tp)
    if base is str:
        return None if isinstance(value, str) else (path, value, tp)
    return None


def _check_types(cfg: DictConfig, schema_cls: type) -> None:
    """Element types of list/dict leaves (OmegaConf already enforced the scalar leaves)."""
    for field in field_map(schema_cls).values():
        if field.section or typing.get_origin(field.base) not in (list, tuple, dict):
            continue
        try:
            value = OmegaConf.select(cfg, field.key, default=None, throw_on_missing=False)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:
            continue
        bad = _conform(value, field.type, field.key)
        if bad:
            path, v, tp = bad
            raise ConfigError(path, f"{_show(v)} is not {_type_phrase(tp)}")


def _fmt_bound(b: float | None, integer: bool, low: bool) -> str:
    if b is None:
        return "-inf" if low else "inf"
    return str(int(b)) if integer and float(b).is_integer() else repr(float(b))


def _elements(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _elements(v, f"{path}[{i}]")
    else:
        yield path, value


def _check_metadata(cfg: DictConfig, schema_cls: type) -> None:
    """valid_min / valid_max / valid_options of every leaf (each element of list fields); None and MISSING skip."""
    for field in field_map(schema_cls).values():
        meta = field.metadata
        if field.section or (meta["valid_min"] is None and meta["valid_max"] is None and not meta["valid_options"]):
            continue
        try:
            value = OmegaConf.select(cfg, field.key, default=None, throw_on_missing=False,
                                     throw_on_resolution_failure=False)
        except OmegaConfBaseException:
            continue
        if value is None or (isinstance(value, str) and value == MISSING):
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        scalar = scalar_type(field.type)
        lo, hi = bound(meta["valid_min"]), bound(meta["valid_max"])
        options = valid_options(meta)
        options = [cast_option(o, scalar) for o in options] if options else None
        for path, v in _elements(value, field.key):
            if v is None:
                continue
            if options is not None and v not in options:
                hint = None
                if isinstance(v, str):
                    close = difflib.get_close_matches(v, [str(o) for o in options], n=1, cutoff=0.6)
                    hint = f"did you mean '{close[0]}'?" if close else None
                raise ConfigError(path, f"{_show(v)} is not one of {options!r}", hint)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                integer = scalar is int
                rng = f"[{_fmt_bound(lo, integer, True)}, {_fmt_bound(hi, integer, False)}]"
                rng = rng.replace("[-inf", "(-inf").replace("inf]", "inf)")
                raise ConfigError(path, f"{_show(v)} is out of range {rng}")


def _required_hint(field_name: str, key: str, examples: Any) -> str:
    if examples:
        return f"set {key}={examples[0]}"
    if field_name.endswith("checkpoint") or field_name.endswith("_path") and "checkpoint" in field_name:
        return f"set {key}=/path/to.pth"
    if field_name.endswith("onnx_file"):
        return f"set {key}=/path/to.onnx"
    if field_name.endswith("trt_engine") or field_name.endswith("engine_file"):
        return f"set {key}=/path/to.engine"
    if field_name.endswith(("_dir", "_path", "_file", "_json")):
        return f"set {key}=/path/to/{field_name}"
    return f"set {key}=<value>"


def _check_mandatory(cfg: DictConfig, schema_cls: type, action: str) -> None:
    if action not in cfg or not isinstance(cfg._get_node(action), DictConfig) or cfg._get_node(action)._is_none():
        return
    fields = field_map(schema_cls)
    section = cfg[action]
    # A TensorRT engine replaces the checkpoint: the engine refuses it with what is missing (TensorRT), so
    # the user is not first asked for a checkpoint they do not mean to use.
    engine_set = "trt_engine" in section and not OmegaConf.is_missing(section, "trt_engine") \
        and section.get("trt_engine") not in (None, "")
    for container, k, path in _iter_nodes(section, f"{action}."):
        if engine_set and path == f"{action}.checkpoint":
            continue
        missing = OmegaConf.is_missing(container, k)
        if not missing and OmegaConf.is_interpolation(container, k):
            try:
                container[k]
            except InterpolationToMissingValueError:
                missing = True
            except OmegaConfBaseException:
                pass
        if missing:
            field = fields.get(path)
            examples = field.metadata.get("examples") if field is not None else None
            raise ConfigError(path, f"a value is required for '{action}'",
                              _required_hint(str(k), path, examples))


# ------------------------------------------------------------------------------------------------- public
def load_spec(
    schema_cls: type,
    action: str | None,
    spec_path: str | Path | None,
    overrides: list[str],
    *,
    mandatory: bool = True,
    check: Callable[[DictConfig, str], None] | None = None,
) -> DictConfig:
    """Build the validated config of one run.

    Order: ``OmegaConf.structured(schema_cls)`` < the YAML at ``spec_path`` < ``overrides`` (Hydra grammar, one
    argv word each).  Then interpolations are resolved, ``valid_min``/``valid_max``/``valid_options`` are checked,
    and — when ``mandatory`` — every ``???`` left inside the ``action`` section is an error.  ``check(cfg, action)``
    runs last (a network's cross-field checks).  Returns a struct-mode ``DictConfig``; raises ``ConfigError``.
    """
    if isinstance(overrides, str):  # a single string would be iterated character by character
        raise TypeError("overrides must be a list of argv words, not one string")
    try:
        return _load_spec(schema_cls, action, spec_path, overrides, mandatory, check)
    except ConfigError as exc:
        raise _short_error(exc) from None


def _load_spec(schema_cls: type, action: str | None, spec_path: str | Path | None, overrides: list[str],
               mandatory: bool, check: Callable[[DictConfig, str], None] | None) -> DictConfig:
    base = OmegaConf.structured(schema_cls)
    cfg = base.copy()
    if spec_path is not None:
        data, lines = _read_yaml(spec_path)
        name = Path(spec_path).name
        _drop_ignored_keys(schema_cls, data, name, lines)
        _check_yaml_keys(schema_cls, data, "", field_map(schema_cls), name, lines)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as exc:
            where = _where(name, lines, getattr(exc, "full_key", "") or "")
            raise _omegaconf_error(schema_cls, exc, f"in {where}", where) from None
    for ov in _parse_overrides(list(overrides)):
        _apply_override(cfg, base, schema_cls, ov)
    _resolve(cfg, schema_cls)
    _check_types(cfg, schema_cls)
    _check_metadata(cfg, schema_cls)
    if mandatory and action:
        _check_mandatory(cfg, schema_cls, action)
    OmegaConf.set_struct(cfg, True)
    if check is not None:
        check(cfg, action)
    return cfg


def to_yaml(cfg: DictConfig, redact: tuple[str, ...] = ("encryption_key",)) -> str:
    """The config as YAML with interpolations resolved and every key named in ``redact`` (a leaf name anywhere,
    or a full dotted key) that has a value replaced by ``*****``.  MISSING values print as ``???``."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    except OmegaConfBaseException:  # an interpolation to a MISSING value: show it unresolved
        data = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    data = redact_container(data, tuple(redact))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
