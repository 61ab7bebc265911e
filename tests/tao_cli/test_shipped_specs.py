"""Every spec shipped under configs/ validates against its generated JSON Schema (jsonschema), loads through the
spec loader, and every generated spec template loads back unchanged (issue 2, acceptance 5)."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from omegaconf import OmegaConf

from tao_cli import registry, schema, spec
from tao_cli.paths import configs_dir

NETWORKS = ["mal", "mask2former", "mask_grounding_dino"]


def _shipped():
    for net in NETWORKS:
        for path in sorted((configs_dir() / net).glob("*.yaml")):
            yield net, path


def _action(net_module, path) -> str:
    return path.stem if path.stem in net_module.actions else "train"


@pytest.mark.parametrize("net, path", list(_shipped()), ids=[f"{n}/{p.name}" for n, p in _shipped()])
def test_shipped_spec_validates_against_its_schema(net, path):
    module = registry.load(net)
    action = _action(module, path)
    doc = yaml.safe_load(path.read_text())
    js = schema.json_schema(module.config_class, net, action, list(module.actions))
    jsonschema.Draft202012Validator.check_schema(js)
    jsonschema.validate(doc, js)
    cfg = spec.load_spec(module.config_class, action, path, [], mandatory=False)
    assert OmegaConf.is_struct(cfg)


@pytest.mark.parametrize("net", NETWORKS)
def test_written_templates_load_back_unchanged(net, tmp_path):
    module = registry.load(net)
    paths = schema.write_schemas(module, tmp_path, "test")
    manifest = json.loads((tmp_path / "schemas" / "manifest.json").read_text())
    assert manifest["network"] == net and sorted(manifest["actions"]) == sorted(module.actions)
    for action in module.actions:
        template = tmp_path / "references" / f"spec_template_{action}.yaml"
        assert template in paths
        loaded = spec.load_spec(module.config_class, action, template, [], mandatory=False)
        defaults = spec.load_spec(module.config_class, action, None, [], mandatory=False)
        written = yaml.safe_load(template.read_text())
        for section, value in written.items():
            assert OmegaConf.to_container(loaded)[section] == OmegaConf.to_container(defaults)[section] == value \
                or value == "???", (action, section)
        js = json.loads((tmp_path / "schemas" / f"{action}.schema.json").read_text())
        jsonschema.Draft202012Validator.check_schema(js)


@pytest.mark.parametrize("net, name", [(n, f) for n in ("mask2former", "mask_grounding_dino")
                                       for f in ("train", "evaluate", "inference", "export", "tiny")])
def test_packaged_configs_load_with_their_checks(net, name):
    module = registry.load(net)
    action = "train" if name == "tiny" else name
    cfg = spec.load_spec(module.config_class, action, configs_dir() / net / f"{name}.yaml", [], check=module.check)
    assert cfg.model_name == net
