"""AutoML search space: which train-spec fields a study searches, and how one Optuna trial samples them.

The inputs are TAO's (reference ``tao_cli.md`` §8): the generated train schema (:func:`tao_cli.schema.json_schema`)
gives each leaf's type, ``default``, ``minimum``/``maximum``/``enum`` and, under ``x-tao``, ``automl_enabled``,
``math_cond``, ``depends_on`` and ``option_weights``; ``automl_default_parameters`` is the default selection.
Values are drawn through ``trial.suggest_*`` so that Optuna's samplers (random, TPE, GP) see and learn from them,
and TAO's rules are applied on top:

==============================  ==========================================  ==========================================
case                            TAO                                         here
==============================  ==========================================  ==========================================
float with both bounds          uniform ``[min, max]``                      same; **log-uniform when min > 0 and
                                                                            max/min >= 100** (deviation: a uniform
                                                                            draw over decades almost never tries the
                                                                            small values)
float/int, one bound open       an ``inf`` bound becomes the default (an    the schema omits both unset and ``inf``
(``inf`` or not set)            unset float min is 0; an int with an unset  bounds, so they are treated alike: the
                                bound is not searched at all)               open bound becomes the default; when that
                                                                            leaves an empty or one-point range
                                                                            (default equal to the other bound) it
                                                                            becomes default x 10 (upper) or
                                                                            default / 10 (lower); default 0 -> error
float/int, no bound at all      ``[default / 10, default x 10]``            same (ordered for a negative default);
                                                                            default 0 -> error
range given as a list           log-uniform on the first element            same (``automl_range_override`` only)
float ``math_cond``             not enforced                                not enforced, except a relation to
                                                                            ``depends_on`` (below), as TAO's
                                                                            ``get_valid_range`` does for floats
int ``"/ k"``                   uniform int, then rounded **up** to a       ``suggest_int(step=k)`` over the multiples
                                multiple of k (may pass max)                of k in ``[min, max]``: the lowest is min
                                                                            rounded up, the highest max rounded down
                                                                            (so a value never breaks max)
int ``"^ k"``                   uniform over ``k**e``, e >= 1, in range     ``suggest_categorical`` over the same list
int ``"> 0"`` (a number)        ignored                                     narrows the range (``!= c`` is ignored)
``"<op> depends_on"``           draw, then clamp against the sampled        the range is narrowed to what satisfies
(``> >= < <= ==``)              parent (``>`` -> parent+1, ``>=`` ->        the relation, then drawn; only when that
                                parent, ``<`` -> parent-1, ``<=`` ->        is empty is TAO's clamp used, and the
                                parent, ``==`` -> parent)                   trial records it (user attr
                                                                            ``<key>#clamped``)
``depends_on`` + ``"/ k"``      ``parent // k``                             same (not a suggestion)
bool                            coin flip                                   ``suggest_categorical([False, True])``
categorical / ordered_int       ``np.random.choice(p=weights)`` when the    weighted: ``suggest_float("<key>#u", 0,
                                weights fit, else uniform                   1)`` mapped through the cumulative
                                                                            weights; else ``suggest_categorical``
seed                            ``hash(job_id)``: not reproducible          the Optuna sampler's seed
==============================  ==========================================  ==========================================

Searchable fields: int, float, bool, and string/int/float fields with options.  TAO's list types (``list_*``,
``subset_list``, ``optional_list``) rely on per-network helper tables and are not searched here (``list_length``
stays ``None``); nor are free strings, paths, dicts, and the ``automl`` section itself.

A value Optuna did not suggest under its own name (a weighted choice, ``parent // k``, ``== parent``, a TAO clamp)
is also stored as ``trial.user_attrs[<key>]``, so ``trial.params`` plus those attributes hold every value.
"""
from __future__ import annotations

import bisect
import difflib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from networks.common.errors import ConfigError

if TYPE_CHECKING:
    import optuna

__all__ = ["Param", "build_space", "sample", "describe", "HYPERPARAMETERS_KEY", "RANGE_OVERRIDE_KEY"]

logger = logging.getLogger(__name__)

HYPERPARAMETERS_KEY = "automl.automl_hyperparameters"
RANGE_OVERRIDE_KEY = "automl.automl_range_override"
_OVERRIDE_FIELDS = ("valid_min", "valid_max", "valid_options", "option_weights", "depends_on", "math_cond")
_RELATIONS = (">", ">=", "<", "<=", "==")
_COND = re.compile(r"^\s*(>=|<=|==|!=|>|<|/|\^)\s*(\S+)\s*$")
_DEPENDS = re.compile(r"^\s*(>=|<=|==|>|<)\s+(\S+)\s*$")  # TAO's later form: depends_on = "> dotted.key"
_LOG_SPAN = 100.0  # max/min ratio from which a positive float range is searched log-uniformly


@dataclass(frozen=True)
class Param:
    """One searched spec field.

    ``name`` is the dotted spec key; ``kind`` is ``float``, ``int``, ``bool`` or ``categorical``; ``default`` is
    the spec's value (else the schema default).  Numbers use ``low``/``high`` (already resolved: no open
    bounds; for ``"/ k"`` ints both are multiples of k) and ``log``; an ``int`` with ``"^ k"`` and every
    ``bool``/``categorical`` uses ``options`` (JSON-safe values) with ``weights`` (normalised, ``()`` =
    uniform).  ``math_cond`` and ``depends_on`` are the (possibly overridden) TAO rule; ``depends_on`` is set
    only when the parent is itself searched.  ``list_length`` is always ``None``: list fields are not searched.
    """

    name: str
    kind: str
    default: Any
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    options: tuple = ()
    weights: tuple = ()
    math_cond: str | None = None
    depends_on: str | None = None
    list_length: int | None = None


@dataclass(frozen=True)
class _Cond:
    """A parsed ``math_cond``: ``op`` is ``/``, ``^``, a relation or ``!=``; ``operand`` is the number, or
    ``None`` for a relation to the ``depends_on`` parent."""

    op: str
    operand: float | None


# ------------------------------------------------------------------------------------------------ parsing
def _parse_cond(text: str | None) -> _Cond | None:
    """``None`` for no condition; raises ``ValueError`` for text that is not one of TAO's forms."""
    if text is None or str(text).strip() == "":
        return None
    match = _COND.match(str(text))
    if not match:
        raise ValueError(f"math_cond '{text}' is not '/ k', '^ k', '<op> <number>' or '<op> depends_on'")
    op, operand = match.groups()
    if operand == "depends_on":
        if op not in _RELATIONS:
            raise ValueError(f"math_cond '{text}': only {', '.join(_RELATIONS)} may relate to depends_on")
        return _Cond(op, None)
    try:
        number = float(operand)
    except ValueError:
        raise ValueError(f"math_cond '{text}': '{operand}' is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"math_cond '{text}': the operand must be finite")
    if op == "/" and (number < 1 or not number.is_integer()):
        raise ValueError(f"math_cond '{text}': k must be an integer >= 1")
    if op == "^" and (number < 2 or not number.is_integer()):
        raise ValueError(f"math_cond '{text}': k must be an integer >= 2")
    return _Cond(op, number)


def _leaves(schema: dict) -> dict[str, dict]:
    """Every leaf sub-schema of a generated schema, keyed by dotted path (sections have ``properties``)."""
    out: dict[str, dict] = {}

    def walk(node: dict, prefix: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            if not isinstance(sub, dict):
                continue
            if "properties" in sub:
                walk(sub, f"{prefix}{name}.")
            else:
                out[prefix + name] = sub

    walk(schema, "")
    return out


def _scalar(node: dict) -> dict | None:
    """The non-null scalar schema of a leaf (Optional unwrapped): ``{type, enum, minimum, maximum}``; ``None``
    for arrays, objects and real unions."""
    tp = node.get("type")
    if isinstance(tp, list):
        rest = [t for t in tp if t != "null"]
        tp = rest[0] if len(rest) == 1 else None
    if tp is None and isinstance(node.get("anyOf"), list):
        alts = [a for a in node["anyOf"] if isinstance(a, dict) and a.get("type") != "null"]
        return _scalar(alts[0]) if len(alts) == 1 else None
    if tp not in ("boolean", "integer", "number", "string"):
        return None
    enum = node.get("enum")
    return {
        "type": tp,
        "enum": None if enum is None else [v for v in enum if v is not None],
        "minimum": node.get("minimum"),
        "maximum": node.get("maximum"),
    }


_ABSENT = object()
_DELETED = object()


def _spec_value(spec: dict | None, key: str) -> Any:
    """The value at ``key`` in the nested spec; ``_ABSENT`` when a level is missing (a partial spec: use the
    schema default); ``_DELETED`` when a section on the way is null or not a mapping (the user removed it)."""
    node: Any = spec or {}
    for part in key.split("."):
        if not isinstance(node, dict):
            return _DELETED
        if part not in node:
            return _ABSENT
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------ errors
def _hp_error(key: str, problem: str, hint: str | None = None) -> ConfigError:
    return ConfigError(HYPERPARAMETERS_KEY, f"'{key}' {problem}", hint)


def _ov_error(key: str, problem: str, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{RANGE_OVERRIDE_KEY}.{key}", problem, hint)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """Mappings and sequences (OmegaConf containers included) as plain dicts and lists, recursively."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _number_text(value: Any) -> Any:
    """A float for number-like text (YAML 1.1 reads ``1e-5`` as a string); anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# ------------------------------------------------------------------------------------------------ ranges
def _override_bound(key: str, field: str, value: Any, integer: bool, lo_schema: Any, hi_schema: Any
                    ) -> tuple[float | None, bool]:
    """(bound or ``None`` for open, log flag) from one ``valid_min``/``valid_max`` override."""
    log = False
    if isinstance(value, list):
        if len(value) != 1:
            raise _ov_error(key, f"{field} as a list must hold one number (TAO's log-uniform form), got {value}")
        value, log = value[0], True
    value = _number_text(value)
    if not _is_number(value) or not math.isfinite(value):
        if _is_number(value) and math.isinf(value):
            return None, log
        raise _ov_error(key, f"{field} must be a number, 'inf' or [number], got {value!r}")
    if integer and not float(value).is_integer():
        raise _ov_error(key, f"{field} must be an integer for this int field, got {value}")
    if integer:
        value = int(value)
    if lo_schema is not None and value < lo_schema:
        raise _ov_error(key, f"{field}={value} is below the field's minimum {lo_schema}",
                        "the spec loader would reject the sampled values")
    if hi_schema is not None and value > hi_schema:
        raise _ov_error(key, f"{field}={value} is above the field's maximum {hi_schema}",
                        "the spec loader would reject the sampled values")
    return (int(value) if integer else float(value)), log


def _close_open_bounds(key: str, lo: float | None, hi: float | None, default: Any) -> tuple[float, float]:
    """Replace open bounds by TAO's rules (see the module table)."""
    if lo is not None and hi is not None:
        return lo, hi
    if not _is_number(default) or default == 0:
        side = "no range" if lo is None and hi is None else "an open bound"
        raise _hp_error(key, f"has {side} and a default of {default!r}, so no search range can be derived",
                        f"set {RANGE_OVERRIDE_KEY}.{key}.valid_min and valid_max")
    wide_lo, wide_hi = sorted((default / 10, default * 10))
    if lo is None and hi is None:
        return wide_lo, wide_hi
    if hi is None:
        return lo, (default if default > lo else wide_hi)
    return (default if default < hi else wide_lo), hi


def _numeric_param(key: str, kind: str, info: dict, xt: dict, ov: dict, default: Any) -> Param:
    integer = kind == "int"
    lo_schema, hi_schema = info["minimum"], info["maximum"]
    lo, hi, log = lo_schema, hi_schema, False
    for field in ("valid_min", "valid_max"):
        if field in ov:
            value, is_log = _override_bound(key, field, ov[field], integer, lo_schema, hi_schema)
            log = log or is_log
            if field == "valid_min":
                lo = value
            else:
                hi = value
    lo, hi = _close_open_bounds(key, lo, hi, default)
    if integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    math_cond = ov.get("math_cond", xt.get("math_cond"))
    depends_on = ov.get("depends_on", xt.get("depends_on"))
    if isinstance(depends_on, str):
        match = _DEPENDS.match(depends_on)
        if match:  # "> parent.key": the relation travels in depends_on
            math_cond, depends_on = f"{match.group(1)} depends_on", match.group(2)
    try:
        cond = _parse_cond(math_cond)
    except ValueError as exc:
        raise (_ov_error(key, str(exc)) if "math_cond" in ov else _hp_error(key, f"has a bad schema {exc}")) \
            from None
    if cond is not None and cond.operand is None and not depends_on:
        where = _ov_error if ("math_cond" in ov or "depends_on" in ov) else _hp_error
        raise where(key, f"math_cond '{math_cond}' needs depends_on (the parent key)")
    options: tuple = ()
    if log and lo <= 0:
        raise _ov_error(key, f"a log-uniform range needs valid_min > 0, got {lo}")
    if cond is not None and integer and not depends_on:
        lo, hi, options = _int_cond(key, cond, lo, hi)
    if not log and not integer and lo > 0 and hi / lo >= _LOG_SPAN:
        log = True
    if lo > hi or (lo == hi and not depends_on):
        shown = f"[{lo}, {hi}]" + (f" with '{math_cond}'" if math_cond else "")
        raise _hp_error(key, f"has nothing to search: the range is {shown}",
                        f"widen it with {RANGE_OVERRIDE_KEY}.{key}.valid_min/valid_max")
    if options and len(options) == 1:
        raise _hp_error(key, f"has nothing to search: '{math_cond}' leaves only {options[0]} in [{lo}, {hi}]",
                        f"widen it with {RANGE_OVERRIDE_KEY}.{key}.valid_min/valid_max")
    return Param(key, kind, default, lo, hi, log and not options, options, (), math_cond,
                 depends_on if depends_on else None)


def _int_cond(key: str, cond: _Cond, lo: int, hi: int) -> tuple[int, int, tuple]:
    """Apply a condition without a parent to an int range: (low, high, options)."""
    k = cond.operand
    if cond.op == "/":
        k = int(k)
        return math.ceil(lo / k) * k, (hi // k) * k, ()
    if cond.op == "^":
        k, powers, value = int(k), [], int(k)
        while value <= hi:
            if value >= lo:
                powers.append(value)
            value *= k
        if not powers:
            raise _hp_error(key, f"has no power of {k} (exponent >= 1) in [{lo}, {hi}]",
                            f"widen it with {RANGE_OVERRIDE_KEY}.{key}.valid_min/valid_max")
        return powers[0], powers[-1], tuple(powers)
    if cond.op == ">":
        lo = max(lo, math.floor(k) + 1)
    elif cond.op == ">=":
        lo = max(lo, math.ceil(k))
    elif cond.op == "<":
        hi = min(hi, math.ceil(k) - 1)
    elif cond.op == "<=":
        hi = min(hi, math.floor(k))
    elif cond.op == "==":
        lo = hi = int(k) if float(k).is_integer() else lo
    return lo, hi, ()


def _choice_param(key: str, kind: str, info: dict, xt: dict, ov: dict, default: Any) -> Param:
    """A bool or categorical field, or a numeric field whose options were overridden."""
    if kind == "bool":
        schema_options: list = [False, True]
    elif info["enum"]:
        schema_options = list(info["enum"])
    else:
        schema_options = []
    options = schema_options
    weights: Any = xt.get("option_weights")
    if "valid_options" in ov:
        options = _check_options(key, ov["valid_options"], info, kind, schema_options)
        weights = None  # schema weights are aligned with the schema's options only
    if "option_weights" in ov:
        weights = [_number_text(w) for w in ov["option_weights"]] if isinstance(ov["option_weights"], list) \
            else ov["option_weights"]
        _check_weights(key, weights, len(options))
    elif weights is not None and not _weights_ok(weights, len(options)):
        weights = None  # TAO ignores weights of the wrong length
    if len(options) < 2:
        raise _hp_error(key, f"has nothing to search: options {options}",
                        f"give at least two in {RANGE_OVERRIDE_KEY}.{key}.valid_options")
    norm: tuple = ()
    if weights is not None:
        total = float(sum(weights))
        norm = tuple(float(w) / total for w in weights)
    out_kind = "bool" if kind == "bool" and all(isinstance(o, bool) for o in options) else "categorical"
    return Param(key, out_kind, default, options=tuple(options), weights=norm)


def _check_options(key: str, options: Any, info: dict, kind: str, schema_options: list) -> list:
    if not isinstance(options, list) or not options:
        raise _ov_error(key, f"valid_options must be a non-empty list, got {options!r}")
    if any(isinstance(o, (list, dict)) or o is None for o in options):
        raise _ov_error(key, "valid_options must hold plain values (numbers, strings, true/false)")
    if len({repr(o) for o in options}) != len(options):
        raise _ov_error(key, f"valid_options has duplicates: {options}")
    if schema_options:
        def same(a: Any, b: Any) -> bool:  # 1 == 1.0 is an option, True == 1 is not
            return a == b and isinstance(a, bool) == isinstance(b, bool) and isinstance(a, str) == isinstance(b, str)

        chosen = [next((s for s in schema_options if same(o, s)), _ABSENT) for o in options]
        bad = [o for o, c in zip(options, chosen, strict=True) if c is _ABSENT]
        if bad:
            raise _ov_error(key, f"valid_options {bad} are not options of the field",
                            "choose from " + ", ".join(map(str, schema_options)))
        return chosen
    integer = info["type"] == "integer"
    for o in options:
        if not _is_number(o) or (integer and not float(o).is_integer()):
            raise _ov_error(key, f"valid_options must be {'integers' if integer else 'numbers'}, got {o!r}")
        if info["minimum"] is not None and o < info["minimum"] or info["maximum"] is not None and o > info["maximum"]:
            raise _ov_error(key, f"valid_options value {o} is outside [{info['minimum']}, {info['maximum']}]")
    return [int(o) for o in options] if integer else [float(o) for o in options]


def _weights_ok(weights: Any, n: int) -> bool:
    return (isinstance(weights, (list, tuple)) and len(weights) == n
            and all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0)


def _check_weights(key: str, weights: Any, n: int) -> None:
    if not _weights_ok(weights, n):
        raise _ov_error(key, f"option_weights must be {n} non-negative numbers (one per option) with a "
                             f"positive sum, got {weights!r}")


# ------------------------------------------------------------------------------------------------ build
def build_space(schema: dict, spec: dict, hyperparameters: list[str] | None = None,
                range_override: dict[str, dict] | None = None, override_disabled: bool = False) -> list[Param]:
    """Searchable params in TAO's order (entries with depends_on last). `spec` is the user's train spec as a plain
    nested dict (defaults come from it where set, else the schema default; a key the user deleted is dropped).
    hyperparameters=None -> schema["automl_default_parameters"]. Unknown / unsearchable / disabled names ->
    ConfigError naming `automl.automl_hyperparameters` and the key. range_override values: valid_min, valid_max,
    valid_options, option_weights, depends_on, math_cond (validate them; bad ones -> ConfigError naming
    `automl.automl_range_override.<key>`).

    Details: ``spec`` may be partial (a missing key takes the schema default) or the full loaded spec; a key is
    "deleted" when a section on its path is null or not a mapping (a null leaf takes the schema default).
    Names are de-duplicated, keeping the first.  A field with ``depends_on`` whose parent is not searched is
    resolved now against the parent's spec value (a relation becomes a fixed bound; ``parent // k`` is one
    value, so an error).  Dependants follow their parents; a cycle is an error.
    """
    names = _plain(schema.get("automl_default_parameters", []) if hyperparameters is None else hyperparameters)
    spec = _plain(spec)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(HYPERPARAMETERS_KEY, f"must be a list of dotted spec keys, got {names!r}")
    names = list(dict.fromkeys(names))
    overrides = _plain(range_override) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(RANGE_OVERRIDE_KEY, f"must map spec keys to settings, got {overrides!r}")
    for key, ov in overrides.items():
        if key not in names:
            raise _ov_error(key, "is not one of the searched hyperparameters",
                            f"add it to {HYPERPARAMETERS_KEY} or remove the override")
        if not isinstance(ov, dict):
            raise _ov_error(key, f"must be a mapping of {', '.join(_OVERRIDE_FIELDS)}, got {ov!r}")
        unknown = sorted(set(ov) - set(_OVERRIDE_FIELDS))
        if unknown:
            raise _ov_error(key, f"unknown setting(s) {', '.join(unknown)}",
                            f"use {', '.join(_OVERRIDE_FIELDS)}")

    leaves = _leaves(schema)
    params: list[Param] = []
    for key in names:
        param = _build_one(key, leaves, spec, overrides.get(key) or {}, override_disabled)
        if param is not None:
            params.append(param)
    params = _resolve_parents(params, leaves, spec, overrides)
    return _order(params)


def _build_one(key: str, leaves: dict[str, dict], spec: dict, ov: dict, override_disabled: bool) -> Param | None:
    node = leaves.get(key)
    if node is None:
        close = difflib.get_close_matches(key, list(leaves), n=1)
        raise _hp_error(key, "is not a key of the train spec", f"did you mean '{close[0]}'?" if close else None)
    if key.split(".")[0] == "automl":
        raise _hp_error(key, "is a setting of the search itself, not a hyperparameter", "remove it from the list")
    xt = node.get("x-tao") or {}
    if not xt.get("automl_enabled") and not override_disabled:
        raise _hp_error(key, "is marked automl_enabled=false for this network",
                        "remove it, or set automl.override_automl_disabled_params=true to search it anyway")
    info = _scalar(node)
    if info is None or (info["type"] == "string" and not info["enum"]):
        raise _hp_error(key, "cannot be searched: only int, float, bool and fields with options can",
                        "remove it from the list")
    value = _spec_value(spec, key)
    if value is _DELETED:
        logger.info("AutoML: %s is not searched: a section on its path is removed from the spec", key)
        return None
    default = node.get("default") if value is _ABSENT or value is None else value
    kind = {"boolean": "bool", "integer": "int", "number": "float", "string": "categorical"}[info["type"]]
    if kind in ("bool", "categorical") or info["enum"] or "valid_options" in ov:
        for field in ("valid_min", "valid_max", "math_cond", "depends_on"):
            if field in ov:
                raise _ov_error(key, f"{field} applies to int and float ranges, not to a choice among options")
        return _choice_param(key, kind, info, xt, ov, default)
    if "option_weights" in ov:
        raise _ov_error(key, "option_weights needs options (valid_options)")
    return _numeric_param(key, kind, info, xt, ov, default)


def _resolve_parents(params: list[Param], leaves: dict[str, dict], spec: dict,
                     overrides: dict[str, dict]) -> list[Param]:
    searched = {p.name for p in params}
    out = []
    for p in params:
        if p.depends_on is None:
            out.append(p)
            continue
        where = _ov_error if "depends_on" in overrides.get(p.name, {}) else _hp_error
        if p.depends_on == p.name:
            raise where(p.name, "depends on itself")
        parent_node = leaves.get(p.depends_on)
        if parent_node is None:
            raise where(p.name, f"depends_on '{p.depends_on}' is not a key of the train spec")
        if p.depends_on in searched:
            parent_param = next(q for q in params if q.name == p.depends_on)
            if parent_param.kind == "bool" or not all(_is_number(o) for o in parent_param.options):
                raise where(p.name, f"depends_on '{p.depends_on}' is not a numeric hyperparameter")
            out.append(p)
            continue
        value = _spec_value(spec, p.depends_on)
        parent = parent_node.get("default") if value in (_ABSENT, _DELETED, None) else value
        if not _is_number(parent):
            raise where(p.name, f"depends_on '{p.depends_on}' has no numeric value ({parent!r})")
        cond = _parse_cond(p.math_cond)
        if cond is None:
            out.append(replace(p, depends_on=None))
            continue
        if cond.op == "/":
            raise _hp_error(p.name, f"is fixed at {p.depends_on} // {int(cond.operand)} because its parent is "
                                    "not searched", f"add {p.depends_on} to {HYPERPARAMETERS_KEY}")
        lo, hi = _narrow(p, cond.op, parent)
        if lo > hi or (lo == hi and cond.op != "=="):
            raise _hp_error(p.name, f"has nothing to search: '{cond.op} {p.depends_on}' with "
                                    f"{p.depends_on}={parent} leaves [{lo}, {hi}]",
                            f"add {p.depends_on} to {HYPERPARAMETERS_KEY} or widen the range")
        # the bounds now carry the relation; the parent's fixed value is in the log, not in math_cond
        logger.info("AutoML: %s %s %s (=%s, not searched): range [%s, %s]", p.name, cond.op, p.depends_on,
                    parent, lo, hi)
        out.append(replace(p, low=lo, high=hi, math_cond=None, depends_on=None, log=p.log and lo > 0))
    return out


def _order(params: list[Param]) -> list[Param]:
    """Independent params in list order, then dependants, each after its parent (stable)."""
    done = [p for p in params if p.depends_on is None]
    placed = {p.name for p in done}
    waiting = [p for p in params if p.depends_on is not None]
    while waiting:
        ready = [p for p in waiting if p.depends_on in placed]
        if not ready:
            raise _hp_error(waiting[0].name, "is part of a depends_on cycle: "
                            + " -> ".join(f"{p.name} -> {p.depends_on}" for p in waiting))
        done.extend(ready)
        placed.update(p.name for p in ready)
        waiting = [p for p in waiting if p.name not in placed]
    return done


# ------------------------------------------------------------------------------------------------ sampling
def _narrow(p: Param, op: str, parent: float) -> tuple[float, float]:
    """The part of ``[p.low, p.high]`` that satisfies ``value <op> parent``."""
    lo, hi = p.low, p.high
    if p.kind == "int":
        if op == ">":
            lo = max(lo, math.floor(parent) + 1)
        elif op == ">=":
            lo = max(lo, math.ceil(parent))
        elif op == "<":
            hi = min(hi, math.ceil(parent) - 1)
        elif op == "<=":
            hi = min(hi, math.floor(parent))
        elif op == "==":
            lo = hi = parent
        return lo, hi
    if op == ">":
        lo = max(lo, math.nextafter(parent, math.inf))
    elif op == ">=":
        lo = max(lo, parent)
    elif op == "<":
        hi = min(hi, math.nextafter(parent, -math.inf))
    elif op == "<=":
        hi = min(hi, parent)
    elif op == "==":
        lo = hi = parent
    return lo, hi


def _tao_clamp(p: Param, op: str, parent: float) -> float | int:
    """TAO's fallback when no value in range satisfies the relation (it may leave the range)."""
    if p.kind == "int":
        return {">": math.floor(parent) + 1, ">=": math.ceil(parent), "<": math.ceil(parent) - 1,
                "<=": math.floor(parent), "==": parent}[op]
    return {">": math.nextafter(parent, math.inf), "<": math.nextafter(parent, -math.inf)}.get(op, parent)


def _draw(trial: optuna.Trial, p: Param, values: dict[str, Any]) -> tuple[Any, bool]:
    """(value, whether Optuna suggested it under ``p.name``)."""
    if p.kind in ("bool", "categorical") or p.options:
        if p.weights:
            u = trial.suggest_float(f"{p.name}#u", 0.0, 1.0)
            cumulative, total = [], 0.0
            for w in p.weights:
                total += w
                cumulative.append(total)
            index = min(bisect.bisect_right(cumulative, u * total), len(p.options) - 1)
            return p.options[index], False
        return trial.suggest_categorical(p.name, list(p.options)), True
    cond = _parse_cond(p.math_cond)
    lo, hi = p.low, p.high
    if p.depends_on is not None and cond is not None:
        parent = values[p.depends_on]
        if cond.op == "/":
            return int(parent // int(cond.operand)), False
        if cond.op in _RELATIONS and cond.operand is None:
            lo, hi = _narrow(p, cond.op, parent)
            if cond.op == "==" or lo > hi:
                value = _tao_clamp(p, cond.op, parent)
                value = int(value) if p.kind == "int" else float(value)
                if cond.op != "==" or not (p.low <= value <= p.high):
                    trial.set_user_attr(f"{p.name}#clamped",
                                        f"no value in [{p.low}, {p.high}] is {cond.op} {p.depends_on}={parent}; "
                                        f"took {value} (TAO's rule)")
                return value, False
    if p.kind == "int":
        step = int(cond.operand) if cond is not None and cond.op == "/" and p.depends_on is None else 1
        return trial.suggest_int(p.name, int(lo), int(hi), step=step, log=p.log and step == 1 and lo > 0), True
    return trial.suggest_float(p.name, float(lo), float(hi), log=p.log and lo > 0), True


def sample(trial: optuna.Trial, space: list[Param]) -> dict[str, Any]:
    """dotted key -> value. Uses trial.suggest_* so Optuna samplers (TPE, GP, random) learn from it, and
    applies TAO's rules on top.

    ``space`` must be in :func:`build_space`'s order (parents first).  A value not suggested under its own
    name is also stored as ``trial.user_attrs[key]``; a TAO clamp adds ``user_attrs["<key>#clamped"]``.
    """
    values: dict[str, Any] = {}
    for p in space:
        value, suggested = _draw(trial, p, values)
        if not suggested:
            trial.set_user_attr(p.name, value)
        values[p.name] = value
    return values


# ------------------------------------------------------------------------------------------------ describe
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def describe(space: list[Param]) -> list[str]:
    """One human line per param (name, kind, range/options, rule) for the console and docs."""
    lines = []
    for p in space:
        cond = _parse_cond(p.math_cond)
        if p.options:
            shown = [_fmt(o) + (f" ({w:.0%})" if p.weights else "") for o, w in
                     zip(p.options, p.weights or [None] * len(p.options), strict=True)]
            what = "one of " + ", ".join(shown)
            if cond is not None and cond.op == "^":
                what += f" (powers of {int(cond.operand)})"
        elif p.depends_on is not None and cond is not None and cond.op == "/":
            what = f"{p.depends_on} // {int(cond.operand)}"
        else:
            scale = "log-uniform" if p.log else "uniform"
            what = f"{scale} [{_fmt(p.low)}, {_fmt(p.high)}]"
            if cond is not None and cond.op == "/" and p.depends_on is None and p.kind == "int":
                what = f"multiples of {int(cond.operand)} in [{_fmt(p.low)}, {_fmt(p.high)}]"
            elif cond is not None and cond.operand is None:
                what += f", narrowed to {cond.op} {p.depends_on} each trial"
            elif cond is not None and p.kind == "int" and cond.op in _RELATIONS:
                what += f" ({cond.op} {_fmt(cond.operand)})"
            elif cond is not None:
                what += f" (math_cond '{p.math_cond}' not enforced, as in TAO)"
        lines.append(f"{p.name}: {p.kind}, {what}; default {_fmt(p.default)}{_scale_hint(p)}")
    return lines


def _scale_hint(p: Param) -> str:
    """A warning for a float drawn uniformly from zero where that cannot search its scale, else '': far past its
    default (TAO's draw of Mask2Former's learning rate in [0, 1]: nearly every trial trains at over 10x the
    default), or only up to the default (TAO's rule for an open upper bound)."""
    if p.kind != "float" or p.log or p.options or p.depends_on is not None or not _is_number(p.default):
        return ""
    default = float(p.default)
    if p.low > 0 or default <= 0:
        return ""
    fix = (f"; set {RANGE_OVERRIDE_KEY}.{p.name}.valid_min and valid_max (a positive range {_LOG_SPAN:g}x wide "
           "or more is drawn log-uniformly)")
    if p.high >= _LOG_SPAN * default:
        return f" (uniform from 0: {1.0 - 10 * default / p.high:.1%} of the draws exceed 10x the default{fix})"
    if p.high <= default:
        return f" (uniform from 0 up to the default: no larger value is tried{fix})"
    return ""
