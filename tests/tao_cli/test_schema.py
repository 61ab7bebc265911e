"""tao_cli.schema: JSON Schema 2020-12 from the spec dataclasses, templates, commented specs and the manifest.

Uses the test-only toy schema of ``test_spec``; no network package is imported.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from omegaconf import OmegaConf

from networks.common.config import TrainConfig, param
from networks.common.errors import ConfigError
from tao_cli.schema import (
    AUTOML_POLICIES,
    JSON_SCHEMA_DIALECT,
    commented_yaml,
    default_instance,
    json_schema,
    kept_sections,
    spec_template,
    write_schemas,
)
from tao_cli.spec import iter_fields, load_spec
from tests.tao_cli.test_spec import ACTIONS, ToyExperiment, toy_network

STANDARD_TYPES = {"integer", "number", "boolean", "string", "array", "object", "null"}
ALL_ACTIONS = list(ACTIONS)


def schema_for(action: str) -> dict:
    return json_schema(ToyExperiment, "toy", action, ALL_ACTIONS)


def prop(schema: dict, dotted: str) -> dict:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def walk(node, path=""):
    """(path, dict) for every sub-schema dict."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}/{i}")


def defaults_container() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(ToyExperiment), resolve=False)


# ------------------------------------------------------------------------------------------- validity
@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_schema_is_valid_2020_12_with_standard_types_and_strict_json(action):
    schema = schema_for(action)
    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    jsonschema.Draft202012Validator.check_schema(schema)
    json.loads(json.dumps(schema, allow_nan=False))  # no Infinity / NaN anywhere
    for path, node in walk(schema):
        if "type" in node and "/x-tao" not in path and isinstance(node["type"], (str, list)):
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            assert set(types) <= STANDARD_TYPES, (path, node["type"])
        if node.get("type") == "array" or node.get("type") == ["array", "null"]:
            assert "items" in node, path


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_defaults_instance_validates(action):
    validator = jsonschema.Draft202012Validator(schema_for(action))
    filtered = default_instance(ToyExperiment, action, ALL_ACTIONS)
    assert sorted(filtered) == sorted(kept_sections(ToyExperiment, action, ALL_ACTIONS))
    validator.validate(filtered)
    # one spec file holding every action's section validates for each action too
    validator.validate(default_instance(ToyExperiment))


def test_defaults_instance_is_the_structured_config_without_missing_values():
    expected = defaults_container()
    del expected["dataset"]["root"]
    for section in ("evaluate", "inference"):
        del expected[section]["checkpoint"]
    del expected["export"]["checkpoint"], expected["export"]["onnx_file"]
    assert default_instance(ToyExperiment) == expected


@pytest.mark.parametrize(
    ("dotted", "value", "override"),
    [
        ("train.num_epochs", "x", "train.num_epochs=x"),
        ("train.num_epochs", 0, "train.num_epochs=0"),
        ("train.num_gpus", 2.5, "train.num_gpus=2.5"),
        ("model.dropout", 1.5, "model.dropout=1.5"),
        ("model.backbone", "resnt", "model.backbone=resnt"),
        ("model.out_indices", [0, 5], "model.out_indices=[0,5]"),
        ("model.freeze", "bert", "model.freeze=bert"),
        ("dataset.channels", 2, "dataset.channels=2"),
        ("model.norm", "ln", "model.norm=ln"),
        ("dataset.num_classes", 0, "dataset.num_classes=0"),
        ("train.cudnn.benchmark", "maybe", "train.cudnn.benchmark=maybe"),
        ("train.lrr", 1, "train.lrr=1"),
        ("trian", {}, "+trian.x=1"),
    ],
)
def test_bad_values_fail_jsonschema_and_load_spec_alike(dotted, value, override):
    instance = default_instance(ToyExperiment, "train", ALL_ACTIONS)
    node = instance
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance, schema_for("train"), cls=jsonschema.Draft202012Validator)
    with pytest.raises(ConfigError):
        load_spec(ToyExperiment, "train", None, [override])


@pytest.mark.parametrize(("dotted", "value"), [("dataset.num_classes", None), ("model.pretrained_path", None),
                                               ("model.norm", None), ("model.norm", "gn"),
                                               ("train.optim.lr", 1), ("model.extra", {"any": {"thing": [1]}}),
                                               ("dataset.sources", [{"image_dir": "/a", "n": 3}])])
def test_good_values_pass(dotted, value):
    instance = copy.deepcopy(default_instance(ToyExperiment, "train", ALL_ACTIONS))
    node = instance
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    jsonschema.validate(instance, schema_for("train"), cls=jsonschema.Draft202012Validator)


# --------------------------------------------------------------------------------------------- mapping
def test_field_mapping_details():
    schema = schema_for("train")
    hidden = prop(schema, "model.hidden_dim")
    assert hidden == {
        "title": "Hidden dim",
        "description": "Hidden width.",
        "type": "integer",
        "minimum": 64,
        "maximum": 1024,
        "default": 256,
        "x-tao": {"automl_enabled": True, "popular": True, "math_cond": "/ 8"},
    }
    epochs = prop(schema, "train.num_epochs")
    assert epochs["minimum"] == 1 and "maximum" not in epochs and epochs["x-tao"] == {"automl_enabled": False,
                                                                                       "popular": True}
    assert prop(schema, "dataset.num_classes")["type"] == ["integer", "null"]
    assert prop(schema, "dataset.channels")["enum"] == [1, 3]
    assert prop(schema, "model.norm")["enum"] == ["bn", "gn", None]
    assert prop(schema, "model.norm")["type"] == ["string", "null"]
    assert prop(schema, "dataset.format")["enum"] == ["coco", "odvg"]
    assert prop(schema, "train.precision")["enum"] == ["fp16", "bf16", "fp32"]
    assert prop(schema, "model.out_indices")["items"] == {"type": "integer", "minimum": 0, "maximum": 3}
    assert prop(schema, "model.dropout")["maximum"] == 1.0
    assert prop(schema, "model.pretrained_path")["type"] == ["string", "null"]
    assert prop(schema, "model.extra") == {"description": "Free-form options.", "type": "object", "default": {},
                                           "x-tao": {"automl_enabled": False}}
    assert prop(schema, "dataset.sources")["items"] == {"type": "object"}
    root = prop(schema, "dataset.root")
    assert "default" not in root and root["type"] == "string" and root["x-tao"]["required"] is True
    train = prop(schema, "train")
    assert train["additionalProperties"] is False and "required" not in train
    assert prop(schema, "train.optim")["additionalProperties"] is False


def test_automl_lists_partition_the_leaves_sorted():
    schema = schema_for("train")
    assert schema["automl_default_parameters"] == ["model.backbone", "model.hidden_dim", "train.optim.lr"]
    leaves = sorted(f.key for f in iter_fields(ToyExperiment)
                    if not f.section and f.key.split(".")[0] not in ("evaluate", "inference", "export"))
    assert sorted(schema["automl_default_parameters"] + schema["automl_disabled_parameters"]) == leaves
    assert schema["automl_disabled_parameters"] == sorted(schema["automl_disabled_parameters"])


@pytest.mark.parametrize(
    ("action", "kept", "dropped"),
    [
        ("train", {"model", "dataset", "train", "wandb", "results_dir"}, {"evaluate", "inference", "export"}),
        ("evaluate", {"model", "dataset", "train", "evaluate"}, {"inference", "export"}),
        ("export", {"train", "export"}, {"evaluate", "inference"}),
    ],
)
def test_sections_of_other_actions_are_dropped(action, kept, dropped):
    schema = schema_for(action)
    template = yaml.safe_load(spec_template(ToyExperiment, action, ALL_ACTIONS))
    for names in (set(schema["properties"]), set(template)):
        assert kept <= names and not (dropped & names)
    assert "automl_disabled_parameters" not in schema["properties"]


# ------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("action", ALL_ACTIONS)
@pytest.mark.parametrize("render", [spec_template, commented_yaml])
def test_template_loads_back_to_the_defaults(tmp_path, action, render):
    path = tmp_path / f"spec_template_{action}.yaml"
    path.write_text(render(ToyExperiment, action, ALL_ACTIONS))
    cfg = load_spec(ToyExperiment, action, path, [], mandatory=False)
    assert OmegaConf.to_container(cfg) == defaults_container()
    if action == "train":  # the toy train section has no ??? values
        load_spec(ToyExperiment, action, path, [])
    else:
        with pytest.raises(ConfigError, match="a value is required"):  # ??? still marks what must be set
            load_spec(ToyExperiment, action, path, [])


def test_template_shows_missing_as_question_marks():
    text = spec_template(ToyExperiment, "evaluate", ALL_ACTIONS)
    assert "  checkpoint: ???\n" in text and "  root: ???\n" in text


def test_commented_yaml_comments_every_field():
    text = commented_yaml(ToyExperiment, "evaluate", ALL_ACTIONS)
    lines = text.splitlines()
    assert "  # Hidden width. Range: [64, 1024]. Default: 256." in lines
    assert "  # Backbone name. Options: resnet, vit, swin. Default: resnet." in lines
    assert "  # Path to the checkpoint to evaluate. Required for 'evaluate'." in lines
    assert "  # Dataset root directory. No default (???): set it when used." in lines
    assert "  # Number of classes. Range: [1, inf). Default: null." in lines
    assert "  out_indices: [1, 2, 3]" in lines
    # every key line is preceded by its comment
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), line


# ---------------------------------------------------------------------------------------------- files
def test_write_schemas_writes_every_action_and_a_manifest(tmp_path):
    paths = write_schemas(toy_network, tmp_path, "1.2.3")
    rel = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert rel == sorted(
        [f"schemas/{a}.schema.json" for a in ALL_ACTIONS]
        + [f"references/spec_template_{a}.yaml" for a in ALL_ACTIONS]
        + ["references/skill_info.yaml", "schemas/manifest.json"]
    )
    manifest = json.loads((tmp_path / "schemas" / "manifest.json").read_text())
    assert manifest["network"] == "toy" and manifest["actions"] == ALL_ACTIONS
    assert manifest["package_version"] == "1.2.3"
    assert len(manifest["files"]) == 2 * len(ALL_ACTIONS) + 1
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest

    def reject(constant):
        raise ValueError(constant)

    for action in ALL_ACTIONS:
        schema = json.loads((tmp_path / "schemas" / f"{action}.schema.json").read_text(), parse_constant=reject)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema == schema_for(action)
    # deterministic: a second run writes the same bytes and leaves no temporary files
    before = {p: p.read_bytes() for p in paths}
    write_schemas(toy_network, tmp_path, "1.2.3")
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(q for q in Path(tmp_path).rglob("*") if q.is_file()) == sorted(paths)


@dataclasses.dataclass
class _NoAutoMLExperiment:
    """A spec without any automl_enabled field."""

    train: TrainConfig = param(TrainConfig)


def test_skill_info_yaml_matches_the_train_schema(tmp_path):
    paths = write_schemas(toy_network, tmp_path, "1.2.3")
    path = tmp_path / "references" / "skill_info.yaml"
    assert path in paths
    info = yaml.safe_load(path.read_text())
    train = schema_for("train")
    assert list(info) == ["network", "automl_enabled", "automl_policy", "automl_default_parameters", "actions"]
    assert info["network"] == "toy" and info["actions"] == ALL_ACTIONS
    assert info["automl_default_parameters"] == train["automl_default_parameters"]
    assert "model.hidden_dim" in info["automl_default_parameters"] and info["automl_enabled"] is True
    assert info["automl_policy"] == "off" and info["automl_policy"] in AUTOML_POLICIES  # a string, not YAML false

    quiet = dataclasses.replace(toy_network, name="quiet", config_class=_NoAutoMLExperiment)
    write_schemas(quiet, tmp_path / "quiet", "1.2.3")
    info = yaml.safe_load((tmp_path / "quiet" / "references" / "skill_info.yaml").read_text())
    assert info["automl_enabled"] is False and info["automl_default_parameters"] == []
