"""tao_cli.automl.space: the AutoML search space and TAO's sampling rules on Optuna trials.

Rule tests use small synthetic schemas in the shape :func:`tao_cli.schema.json_schema` emits; the last tests run
the real train schemas of the three networks end to end through ``tao_cli.spec.load_spec``.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import optuna
import pytest
from omegaconf import OmegaConf

from networks.common.errors import ConfigError
from tao_cli import registry
from tao_cli.automl.space import Param, build_space, describe, sample
from tao_cli.schema import default_instance, json_schema
from tao_cli.spec import load_spec

optuna.logging.set_verbosity(optuna.logging.ERROR)

NETWORKS = ("mal", "mask2former", "mask_grounding_dino")


# --------------------------------------------------------------------------------------------- helpers
def leaf(tp: str | list, default, minimum=None, maximum=None, enum=None, automl=True, **xt) -> dict:
    node: dict = {"type": tp, "default": default, "x-tao": {"automl_enabled": automl, **xt}}
    if minimum is not None:
        node["minimum"] = minimum
    if maximum is not None:
        node["maximum"] = maximum
    if enum is not None:
        node["enum"] = enum
    return node


def make_schema(leaves: dict[str, dict], default_list: list[str] | None = None) -> dict:
    """A generated-schema-like dict with one leaf per dotted key."""
    root: dict = {"type": "object", "properties": {}}
    for key, node in leaves.items():
        parts = key.split(".")
        at = root
        for part in parts[:-1]:
            at = at["properties"].setdefault(part, {"type": "object", "properties": {},
                                                    "additionalProperties": False})
        at["properties"][parts[-1]] = node
    root["automl_default_parameters"] = sorted(k for k, v in leaves.items() if v["x-tao"]["automl_enabled"]) \
        if default_list is None else default_list
    return root


def one(node: dict, key: str = "s.x", spec: dict | None = None, **kw) -> Param:
    (param,) = build_space(make_schema({key: node}), spec or {}, [key], **kw)
    return param


def draws(space: list[Param], n: int, seed: int = 0, sampler=None) -> list[tuple[dict, optuna.Trial]]:
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((sample(trial, space), trial))
    return out


def values(space: list[Param], key: str, n: int = 300, seed: int = 0) -> list:
    return [v[key] for v, _ in draws(space, n, seed)]


def expect_error(match: str, subject: str = "automl.automl_hyperparameters"):
    return pytest.raises(ConfigError, match=rf"^{subject}.*{match}")


# --------------------------------------------------------------------------------------------- floats
def test_float_with_both_bounds_is_uniform():
    p = one(leaf("number", 0.5, 0.0, 1.0))
    assert (p.kind, p.low, p.high, p.log) == ("float", 0.0, 1.0, False)
    xs = values([p], "s.x", 400)
    assert all(0.0 <= x <= 1.0 for x in xs)
    assert abs(sum(xs) / len(xs) - 0.5) < 0.06  # a log or default-centred draw would not average 0.5
    assert sum(x < 0.1 for x in xs) > 20


def test_float_spanning_two_decades_from_a_positive_minimum_is_log_uniform():
    p = one(leaf("number", 1e-3, 1e-5, 1e-1))
    assert p.log
    xs = values([p], "s.x", 400)
    below = sum(x < 1e-3 for x in xs) / len(xs)
    assert 0.4 < below < 0.6  # uniform would put ~1 % below 1e-3
    assert not one(leaf("number", 0.2, 0.1, 5.0)).log  # a 50x span stays uniform
    assert not one(leaf("number", 0.2, 0.0, 1e3)).log  # low 0 cannot be log


def test_float_open_upper_bound_becomes_the_default_or_ten_times_it():
    assert (one(leaf("number", 0.2, 0.0)).low, one(leaf("number", 0.2, 0.0)).high) == (0.0, 0.2)
    p = one(leaf("number", 0.2, 0.2))  # default equal to the other bound: the range would be empty
    assert (p.low, p.high) == (0.2, pytest.approx(2.0))
    with expect_error("default of 0"):
        one(leaf("number", 0.0, 0.0))


def test_float_open_lower_bound_becomes_the_default_or_a_tenth_of_it():
    p = one(leaf("number", 0.5, None, 1.0))
    assert (p.low, p.high) == (0.5, 1.0)
    p = one(leaf("number", 0.5, None, 0.5))
    assert (p.low, p.high) == (pytest.approx(0.05), 0.5)


def test_float_without_range_spans_a_tenth_to_ten_times_the_default():
    p = one(leaf("number", 0.01))
    assert (p.low, p.high) == (pytest.approx(1e-3), pytest.approx(0.1)) and p.log
    xs = values([p], "s.x", 200)
    assert all(1e-3 <= x <= 0.1 for x in xs) and min(xs) < 5e-3 and max(xs) > 0.05
    p = one(leaf("number", -2.0))
    assert (p.low, p.high) == (pytest.approx(-20.0), pytest.approx(-0.2)) and not p.log
    with expect_error("no range and a default of 0", "automl.automl_hyperparameters"):
        one(leaf("number", 0))


def test_float_numeric_math_cond_is_not_enforced_as_in_tao():
    p = one(leaf("number", 0.5, 0.0, 1.0, math_cond="> 0.5"))
    assert (p.low, p.high) == (0.0, 1.0)
    assert any(x < 0.5 for x in values([p], "s.x", 50))
    assert "not enforced" in describe([p])[0]


def test_nullable_number_uses_the_non_null_type():
    p = one(leaf(["number", "null"], 0.5, 0.0, 1.0))
    assert p.kind == "float" and (p.low, p.high) == (0.0, 1.0)
    p = one({"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}], "default": 3,
             "x-tao": {"automl_enabled": True}})
    assert (p.kind, p.low, p.high) == ("int", 1, 9)


# --------------------------------------------------------------------------------------------- ints
def test_int_uniform_over_the_whole_range():
    p = one(leaf("integer", 5, 1, 10))
    xs = values([p], "s.x", 300)
    assert set(xs) == set(range(1, 11))
    assert all(isinstance(x, int) for x in xs)


def test_int_open_maximum_becomes_the_default():
    p = one(leaf("integer", 3, 1))
    assert (p.low, p.high) == (1, 3)
    assert set(values([p], "s.x", 100)) == {1, 2, 3}
    p = one(leaf("integer", 1, 1))  # default at the minimum: ten times the default
    assert (p.low, p.high) == (1, 10)


def test_int_multiple_of_k_is_a_stepped_grid_rounded_up_and_within_range():
    p = one(leaf("integer", 256, 60, 130, math_cond="/ 8"))
    assert (p.low, p.high) == (64, 128)  # 60 rounds up to 64; 130 down to 128 (TAO could give 136 > max)
    draws_ = draws([p], 300)
    xs = [v["s.x"] for v, _ in draws_]
    assert set(xs) == set(range(64, 129, 8))
    dist = draws_[0][1].distributions["s.x"]
    assert isinstance(dist, optuna.distributions.IntDistribution) and dist.step == 8
    assert "multiples of 8" in describe([p])[0]


def test_int_multiple_of_k_without_a_multiple_in_range_is_refused():
    with expect_error("nothing to search"):
        one(leaf("integer", 12, 9, 15, math_cond="/ 8"))


def test_int_power_of_k_samples_only_powers_in_range():
    p = one(leaf("integer", 8, 3, 40, math_cond="^ 2"))
    assert p.options == (4, 8, 16, 32)
    draws_ = draws([p], 200)
    assert {v["s.x"] for v, _ in draws_} == {4, 8, 16, 32}
    assert isinstance(draws_[0][1].distributions["s.x"], optuna.distributions.CategoricalDistribution)
    assert "powers of 2" in describe([p])[0]
    # TAO's exponents start at 1: 1 = 2**0 is never drawn
    assert one(leaf("integer", 4, 1, 16, math_cond="^ 2")).options == (2, 4, 8, 16)
    with expect_error("no power of 2"):
        one(leaf("integer", 6, 5, 7, math_cond="^ 2"))


@pytest.mark.parametrize("cond, low, high", [("> 0", 1, 5), (">= 2", 2, 5), ("< 0", -5, -1), ("<= -2", -5, -2)])
def test_int_numeric_relation_narrows_the_range(cond, low, high):
    p = one(leaf("integer", 1, -5, 5, math_cond=cond))
    assert (p.low, p.high) == (low, high)
    assert set(values([p], "s.x", 150)) == set(range(low, high + 1))


# ------------------------------------------------------------------------------------------ depends_on
def pair(op: str, parent=(1, 10), child=(1, 12), kind: str = "integer") -> list[Param]:
    schema = make_schema({
        "a.parent": leaf(kind, parent[0], parent[0], parent[1], parent_param=True),
        "a.child": leaf(kind, child[0], child[0], child[1], math_cond=f"{op} depends_on", depends_on="a.parent"),
    })
    return build_space(schema, {}, ["a.child", "a.parent"])


_OPS = {">": lambda c, p: c > p, ">=": lambda c, p: c >= p, "<": lambda c, p: c < p, "<=": lambda c, p: c <= p,
        "==": lambda c, p: c == p}


@pytest.mark.parametrize("op", list(_OPS))
def test_relation_to_parent_holds_or_is_clamped_like_tao(op):
    space = pair(op)
    assert [p.name for p in space] == ["a.parent", "a.child"]
    clamp = {">": 1, ">=": 0, "<": -1, "<=": 0, "==": 0}[op]
    for v, trial in draws(space, 150):
        parent, child = v["a.parent"], v["a.child"]
        satisfiable = {">": parent + 1 <= 12, ">=": True, "<": parent - 1 >= 1, "<=": True, "==": True}[op]
        if satisfiable:
            assert _OPS[op](child, parent)
            assert 1 <= child <= 12
            assert "a.child#clamped" not in trial.user_attrs
        else:
            assert child == parent + clamp
            assert "a.child#clamped" in trial.user_attrs
        if op == "==":
            assert trial.user_attrs["a.child"] == child and "a.child" not in trial.params


def test_relation_narrows_the_draw_instead_of_clamping_it():
    # TAO draws over the whole range and clamps, which piles values on parent+1 (~54 % here); narrowing gives ~20 %
    vals = [v for v, _ in draws(pair(">"), 400)]
    at_edge = sum(v["a.child"] == v["a.parent"] + 1 for v in vals) / len(vals)
    assert at_edge < 0.35
    assert max(v["a.child"] for v in vals) == 12


def test_relation_with_no_room_left_takes_taos_clamp_and_records_it():
    space = pair(">", parent=(10, 12), child=(1, 11))
    seen = 0
    for v, trial in draws(space, 100):
        if v["a.parent"] >= 11:
            seen += 1
            assert v["a.child"] == v["a.parent"] + 1
            assert "TAO" in trial.user_attrs["a.child#clamped"] and trial.user_attrs["a.child"] == v["a.child"]
        else:
            assert v["a.child"] == 11
    assert seen > 20


def test_float_relation_to_parent_is_enforced():
    space = pair(">", parent=(0.0, 1.0), child=(0.0, 1.0), kind="number")
    vals = [v for v, _ in draws(space, 200)]
    assert all(v["a.child"] > v["a.parent"] for v in vals)


def test_depends_on_with_multiple_of_k_is_parent_floor_divided():
    schema = make_schema({
        "a.parent": leaf("integer", 64, 16, 256),
        "a.child": leaf("integer", 16, 1, 64, math_cond="/ 4", depends_on="a.parent"),
    })
    space = build_space(schema, {}, ["a.child", "a.parent"])
    for v, trial in draws(space, 60):
        assert v["a.child"] == v["a.parent"] // 4
        assert "a.child" not in trial.params and trial.user_attrs["a.child"] == v["a.child"]
    assert "a.parent // 4" in describe(space)[1]


def test_depends_on_order_puts_parents_first_and_refuses_cycles():
    schema = make_schema({
        "s.c": leaf("integer", 3, 1, 20, math_cond="> depends_on", depends_on="s.b"),
        "s.b": leaf("integer", 2, 1, 20, math_cond="> depends_on", depends_on="s.a"),
        "s.a": leaf("integer", 1, 1, 20),
        "s.x": leaf("number", 0.5, 0.0, 1.0),
    })
    space = build_space(schema, {}, ["s.c", "s.b", "s.a", "s.x"])
    assert [p.name for p in space] == ["s.a", "s.x", "s.b", "s.c"]
    for v, _ in draws(space, 50):
        if v["s.a"] <= 18:
            assert v["s.a"] < v["s.b"] < v["s.c"] or v["s.b"] >= 20
    cyclic = make_schema({
        "s.a": leaf("integer", 1, 1, 20, math_cond="> depends_on", depends_on="s.b"),
        "s.b": leaf("integer", 2, 1, 20, math_cond="> depends_on", depends_on="s.a"),
    })
    with expect_error("cycle"):
        build_space(cyclic, {}, ["s.a", "s.b"])


def test_depends_on_an_unsearched_parent_uses_its_spec_value():
    schema = make_schema({
        "a.parent": leaf("integer", 5, 1, 10, automl=False),
        "a.child": leaf("integer", 6, 1, 10, math_cond="> depends_on", depends_on="a.parent"),
        "a.div": leaf("integer", 1, 1, 10, math_cond="/ 2", depends_on="a.parent"),
    })
    (p,) = build_space(schema, {"a": {"parent": 7}}, ["a.child"])
    assert (p.low, p.high, p.depends_on) == (8, 10, None)
    with expect_error("add a.parent"):
        build_space(schema, {}, ["a.div"])


# --------------------------------------------------------------------------------------------- choices
def test_bool_is_a_categorical_suggestion():
    p = one(leaf("boolean", False))
    assert p.kind == "bool" and p.options == (False, True)
    draws_ = draws([p], 60)
    assert {v["s.x"] for v, _ in draws_} == {False, True}
    assert draws_[0][1].distributions["s.x"] == optuna.distributions.CategoricalDistribution([False, True])


def test_categorical_without_weights_uses_the_enum_without_null():
    p = one(leaf(["string", "null"], "a", enum=["a", "b", "c", None]))
    assert p.kind == "categorical" and p.options == ("a", "b", "c") and p.weights == ()
    draws_ = draws([p], 90)
    assert {v["s.x"] for v, _ in draws_} == {"a", "b", "c"}
    assert "s.x" in draws_[0][1].params


def test_ordered_int_options_are_categorical_ints():
    p = one(leaf("integer", 3, enum=[1, 3, 5]))
    assert p.kind == "categorical" and p.options == (1, 3, 5)
    assert set(values([p], "s.x", 60)) == {1, 3, 5}


def test_option_weights_are_honoured():
    p = one(leaf("string", "a", enum=["a", "b", "c"], option_weights=[6, 3, 1]))
    assert p.weights == pytest.approx((0.6, 0.3, 0.1))
    draws_ = draws([p], 2000, seed=7)
    counts = Counter(v["s.x"] for v, _ in draws_)
    expected = {"a": 1200, "b": 600, "c": 200}
    chi2 = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi2 < 13.8, counts  # chi-square, 2 dof, p = 0.001; uniform or reversed weights give > 500
    trial = draws_[0][1]
    assert "s.x#u" in trial.params and trial.user_attrs["s.x"] == draws_[0][0]["s.x"]
    assert "60%" in describe([p])[0]


def test_schema_weights_of_the_wrong_length_are_ignored_like_tao():
    p = one(leaf("string", "a", enum=["a", "b", "c"], option_weights=[1, 1]))
    assert p.weights == ()


# ------------------------------------------------------------------------------------- selection errors
def test_default_list_comes_from_the_schema():
    schema = make_schema({"s.a": leaf("number", 0.5, 0.0, 1.0), "s.b": leaf("integer", 2, 1, 4),
                          "s.off": leaf("number", 0.5, 0.0, 1.0, automl=False)})
    assert [p.name for p in build_space(schema, {})] == ["s.a", "s.b"]
    assert build_space(schema, {}, []) == []


def test_unknown_disabled_and_unsearchable_names_are_refused():
    schema = make_schema({
        "s.lr": leaf("number", 0.5, 0.0, 1.0),
        "s.off": leaf("number", 0.5, 0.0, 1.0, automl=False),
        "s.path": leaf("string", "x"),
        "s.ids": {"type": "array", "items": {"type": "integer"}, "default": [0], "x-tao": {"automl_enabled": True}},
        "s.kw": {"type": "object", "default": {}, "x-tao": {"automl_enabled": True}},
        "automl.metric": leaf("string", "kpi", enum=["kpi", "loss"]),
    })
    with expect_error(r"'s\.lx' is not a key.*did you mean 's\.lr'"):
        build_space(schema, {}, ["s.lx"])
    with expect_error(r"'s\.off' is marked automl_enabled=false"):
        build_space(schema, {}, ["s.off"])
    assert build_space(schema, {}, ["s.off"], override_disabled=True)[0].name == "s.off"
    for key in ("s.path", "s.ids", "s.kw"):
        with expect_error(rf"'{key}' cannot be searched"):
            build_space(schema, {}, [key])
    with expect_error("not a hyperparameter"):
        build_space(schema, {}, ["automl.metric"], override_disabled=True)
    with expect_error("must be a list"):
        build_space(schema, {}, "s.lr")


def test_defaults_come_from_the_spec_and_deleted_keys_are_dropped():
    schema = make_schema({"s.a": leaf("integer", 3, 1), "t.b": leaf("number", 0.5, 0.0, 1.0)})
    (a, b) = build_space(schema, {"s": {"a": 6}}, ["s.a", "t.b"])
    assert (a.default, a.high) == (6, 6 * 1) and b.default == 0.5  # open max -> the spec's value
    assert [p.name for p in build_space(schema, {"t": None}, ["s.a", "t.b"])] == ["s.a"]
    assert build_space(schema, {"s": {"a": None}}, ["s.a"])[0].default == 3


# -------------------------------------------------------------------------------------- range_override
def _ovr(node: dict, override: dict, key: str = "s.x") -> Param:
    return one(node, key, range_override={key: override})


def test_range_override_bounds_replace_the_schema_range_within_its_limits():
    p = _ovr(leaf("number", 0.5, 0.0, 1.0), {"valid_min": 0.2, "valid_max": 0.4})
    assert (p.low, p.high) == (0.2, 0.4)
    assert all(0.2 <= x <= 0.4 for x in values([p], "s.x", 50))
    with expect_error("above the field's maximum", r"automl\.automl_range_override\.s\.x"):
        _ovr(leaf("number", 0.5, 0.0, 1.0), {"valid_max": 2.0})
    with expect_error("must be an integer", r"automl\.automl_range_override\.s\.x"):
        _ovr(leaf("integer", 5, 1, 10), {"valid_max": 7.5})
    p = _ovr(leaf("integer", 5, 1), {"valid_max": "inf"})  # explicit inf: TAO's default rule
    assert (p.low, p.high) == (1, 5)


def test_omegaconf_containers_and_yaml_number_text_are_accepted():
    # the driver reads these from a loaded spec; YAML 1.1 reads 1e-5 (no dot) as a string
    schema = make_schema({"s.x": leaf("number", 1e-3, 0.0, 1.0), "s.c": leaf("string", "a", enum=["a", "b"])})
    spec = OmegaConf.create({"s": {"x": 0.002}})
    override = OmegaConf.create({"s.x": {"valid_min": "1e-5", "valid_max": 0.1},
                                 "s.c": {"valid_options": ["b", "a"], "option_weights": [1, 3]}})
    x, c = build_space(schema, spec, OmegaConf.create(["s.x", "s.c"]), override)
    assert (x.low, x.high, x.log, x.default) == (1e-5, 0.1, True, 0.002)
    assert c.options == ("b", "a") and c.weights == (0.25, 0.75)


def test_range_override_list_bound_means_log_uniform():
    p = _ovr(leaf("number", 0.5, 0.0, 1.0), {"valid_min": [0.1], "valid_max": [0.5]})
    assert p.log and (p.low, p.high) == (0.1, 0.5)
    with expect_error("valid_min > 0", r"automl\.automl_range_override\.s\.x"):
        _ovr(leaf("number", 0.5, 0.0, 1.0), {"valid_min": [0.0]})


def test_range_override_options_weights_and_conditions():
    enum = leaf("string", "a", enum=["a", "b", "c"], option_weights=[1, 1, 8])
    p = _ovr(enum, {"valid_options": ["c", "a"]})
    assert p.options == ("c", "a") and p.weights == ()  # schema weights belong to the schema's options
    p = _ovr(enum, {"valid_options": ["c", "a"], "option_weights": [3, 1]})
    assert p.weights == pytest.approx((0.75, 0.25))
    with expect_error("not options of the field", r"automl\.automl_range_override\.s\.x"):
        _ovr(enum, {"valid_options": ["a", "z"]})
    with expect_error("option_weights must be 3", r"automl\.automl_range_override\.s\.x"):
        _ovr(enum, {"option_weights": [1, 2]})
    with expect_error("option_weights must be 3", r"automl\.automl_range_override\.s\.x"):
        _ovr(enum, {"option_weights": [1, -1, 1]})
    p = _ovr(leaf("integer", 4, 1, 64), {"valid_options": [2, 8, 32]})
    assert p.kind == "categorical" and p.options == (2, 8, 32)
    with expect_error("outside", r"automl\.automl_range_override\.s\.x"):
        _ovr(leaf("integer", 4, 1, 64), {"valid_options": [2, 128]})
    p = _ovr(leaf("integer", 64, 1, 100), {"math_cond": "/ 16"})
    assert (p.low, p.high) == (16, 96)
    with expect_error("math_cond '% 3'", r"automl\.automl_range_override\.s\.x"):
        _ovr(leaf("integer", 64, 1, 100), {"math_cond": "% 3"})
    with expect_error("applies to int and float ranges", r"automl\.automl_range_override\.s\.x"):
        _ovr(enum, {"valid_min": 1})


def test_range_override_depends_on_and_key_checks():
    schema = make_schema({"a.p": leaf("integer", 3, 1, 10), "a.c": leaf("integer", 5, 1, 12)})
    space = build_space(schema, {}, ["a.c", "a.p"], range_override={"a.c": {"depends_on": "> a.p"}})
    assert [p.name for p in space] == ["a.p", "a.c"] and space[1].math_cond == "> depends_on"
    assert all(v["a.c"] > v["a.p"] for v, _ in draws(space, 80))
    with expect_error("not one of the searched", r"automl\.automl_range_override\.a\.p"):
        build_space(schema, {}, ["a.c"], range_override={"a.p": {"valid_min": 2}})
    with expect_error("unknown setting.*disable_list", r"automl\.automl_range_override\.a\.c"):
        build_space(schema, {}, ["a.c"], range_override={"a.c": {"disable_list": []}})
    with expect_error("is not a key", r"automl\.automl_range_override\.a\.c"):
        build_space(schema, {}, ["a.c"], range_override={"a.c": {"depends_on": "> a.nope"}})


# ------------------------------------------------------------------------------------------ reproducible
def _mixed_space() -> list[Param]:
    schema = make_schema({
        "m.lr": leaf("number", 1e-3, 1e-5, 1e-1),
        "m.dim": leaf("integer", 64, 16, 256, math_cond="/ 16"),
        "m.pow": leaf("integer", 8, 2, 64, math_cond="^ 2"),
        "m.heads": leaf("integer", 4, 1, 32, math_cond="> depends_on", depends_on="m.pow"),
        "m.opt": leaf("string", "adam", enum=["adam", "sgd", "lamb"], option_weights=[5, 3, 2]),
        "m.flag": leaf("boolean", True),
    })
    return build_space(schema, {})


def _run(sampler, n: int) -> list[dict]:
    study = optuna.create_study(sampler=sampler, direction="minimize")
    out = []
    for _ in range(n):
        trial = study.ask()
        v = sample(trial, _mixed_space())
        out.append(v)
        study.tell(trial, math.log10(v["m.lr"]) ** 2 + v["m.dim"] / 100 + (v["m.opt"] == "sgd") + v["m.heads"] / 10)
    return out


@pytest.mark.parametrize("make", [lambda s: optuna.samplers.RandomSampler(seed=s),
                                  lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=4)],
                         ids=["random", "tpe"])
def test_same_sampler_seed_gives_the_same_sequence(make):
    first, again, other = _run(make(3), 12), _run(make(3), 12), _run(make(4), 12)
    assert first == again
    assert first != other
    assert len({json.dumps(v, sort_keys=True) for v in first}) > 6


# -------------------------------------------------------------------------------------------- describe
def test_describe_has_one_line_per_param_naming_it():
    space = _mixed_space()
    lines = describe(space)
    assert len(lines) == len(space)
    for p, line in zip(space, lines, strict=True):
        assert line.startswith(p.name + ": " + p.kind)
    by_name = dict(zip([p.name for p in space], lines, strict=True))
    assert "log-uniform [1e-05, 0.1]" in by_name["m.lr"] and "narrowed to > m.pow" in by_name["m.heads"]
    assert "multiples of 16 in [16, 256]" in by_name["m.dim"] and "50%" in by_name["m.opt"]
    assert space[-1].name == "m.heads"


# ---------------------------------------------------------------------------------------- real schemas
def _overrides(vals: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in vals.items()]


@pytest.mark.parametrize("net_name", NETWORKS)
def test_real_schema_default_lists_sample_specs_that_load(net_name):
    net = registry.load(net_name)
    schema = json_schema(net.config_class, net.name, "train", net.actions)
    spec = default_instance(net.config_class, "train", net.actions)
    space = build_space(schema, spec)
    assert [p.name for p in space] and {p.name for p in space} == set(schema["automl_default_parameters"])
    changed = set()
    for sampler in (optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(seed=1, n_startup_trials=2)):
        study = optuna.create_study(sampler=sampler)
        for i in range(4):
            trial = study.ask()
            vals = sample(trial, space)
            cfg = load_spec(net.config_class, "train", None, _overrides(vals), mandatory=False)
            for key, value in vals.items():
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert node == pytest.approx(value)
                changed |= {key} if value != next(p.default for p in space if p.name == key) else set()
            study.tell(trial, float(i))
    assert changed == {p.name for p in space}


@pytest.mark.parametrize("net_name", NETWORKS)
def test_real_schema_every_buildable_field_samples_loadable_values(net_name):
    # with override_disabled, every field build_space accepts must give values the spec loader accepts
    net = registry.load(net_name)
    schema = json_schema(net.config_class, net.name, "train", net.actions)
    spec = default_instance(net.config_class, "train", net.actions)
    keys = schema["automl_default_parameters"] + schema["automl_disabled_parameters"]
    ok = []
    for key in keys:
        try:
            build_space(schema, spec, [key], override_disabled=True)
        except ConfigError:
            continue
        ok.append(key)
    assert len(ok) > 40
    space = build_space(schema, spec, ok, override_disabled=True)
    for vals, _ in draws(space, 3, seed=5):
        load_spec(net.config_class, "train", None, _overrides(vals), mandatory=False)


def test_describe_warns_of_a_uniform_draw_from_zero_far_past_the_default():
    """Mask2Former's schema gives ``train.optim.lr`` (default 2e-4) TAO's [0, 1]: drawn uniformly, as TAO does,
    but the plan says what that means and how to get a log-uniform range."""
    wide = one(leaf("number", 2e-4, 0, 1), "train.optim.lr")
    (line,) = describe([wide])
    assert "uniform [0, 1]" in line and "99.8% of the draws exceed 10x the default" in line
    assert "automl.automl_range_override.train.optim.lr.valid_min and valid_max" in line
    narrowed = one(leaf("number", 2e-4, 0, 1), "train.optim.lr",
                   range_override={"train.optim.lr": {"valid_min": 1e-5, "valid_max": 1e-3}})
    assert narrowed.log and "exceed" not in describe([narrowed])[0]
    assert "uniform from 0" not in describe([one(leaf("number", 0.5, 0, 1), "s.p")])[0]  # a probability
    # TAO's open upper bound becomes the default: [0, default] never tries a larger value
    (capped,) = describe([one(leaf("number", 2e-4, 0, None, valid_max="inf"), "train.lr")])
    assert "uniform [0, 0.0002]" in capped and "no larger value is tried" in capped
