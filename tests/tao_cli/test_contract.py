"""The engine ↔ network contract: every network exports one ``Network``; a package that breaks the contract is
refused when it is registered, with a message that names the part, never an AttributeError mid-run."""
from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from networks.common.network import Network, NetworkContractError, TrainerTraits, trainer_traits_of
from tao_cli import registry

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(registry.NETWORKS))
def test_every_network_exports_a_network(name):
    net = registry.load(name)
    assert isinstance(net, Network) and net.name == name
    assert {"train", "evaluate", "inference"} <= set(net.actions)
    kpi, mode = net.main_kpi(_cfg_for(net))
    assert isinstance(kpi, str) and mode in ("max", "min")
    assert net.sample_drawer is not None


def _cfg_for(net: Network):
    from omegaconf import OmegaConf

    return OmegaConf.structured(net.config_class)


def _parts(**change):
    parts = dict(name="tiny", title="Tiny", checkpoint_name="tiny_model", config_class=_TinyConfig,
                 actions={"train": "t", "evaluate": "e", "inference": "i"},
                 check=lambda cfg, action: None, input_paths=lambda cfg, action: {},
                 build_module=lambda cfg, ctx: None, build_datamodule=lambda cfg, ctx: None,
                 main_kpi=lambda cfg: ("loss", "min"))
    parts.update(change)
    return parts


@dataclass
class _TinyConfig:
    results_dir: str = ""


@pytest.mark.parametrize("change, words", [
    ({"name": ""}, "name must be a non-empty string"),
    ({"config_class": dict}, "config_class must be the ExperimentConfig dataclass"),
    ({"build_module": lambda cfg: None}, "build_module must be a function of 2 argument(s)"),
    ({"main_kpi": "mIoU"}, "main_kpi must be a function of 1 argument(s)"),
    ({"actions": {"train": "t", "export": "x"}}, "actions ['export'] have no function in extra_actions"),
    ({"extra_actions": {"export": lambda cfg, ctx: {}}}, "extra action 'export' must be listed in actions"),
    ({"extra_actions": {"train": lambda cfg, ctx: {}}}, "'train' is run by the engine"),
    ({"actions": {"train": "t", "quantize": "q"}, "deploy_actions": ("quantize",),
      "extra_actions": {"quantize": lambda cfg, ctx: {}}}, "deploy action 'quantize' must be listed in actions only"),
])
def test_a_broken_network_is_refused_with_the_part_named(change, words):
    with pytest.raises(NetworkContractError, match=re.escape(words)):
        Network(**_parts(**change))


def test_a_part_left_out_fails_at_registration_not_at_run_time(tmp_path, monkeypatch):
    pkg = tmp_path / "half_net"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from networks.common.network import Network
        NETWORK = Network(name="half", title="Half", checkpoint_name="half_model", config_class=dict,
                          actions={"train": "t"}, check=None, input_paths=None, build_module=None,
                          build_datamodule=None)
    """))
    (tmp_path / "no_net").mkdir()
    (tmp_path / "no_net" / "__init__.py").write_text("NAME = 'no_net'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="main_kpi"):
        registry.register("half", "half_net")
    with pytest.raises(NetworkContractError, match="no_net does not export NETWORK"):
        registry.register("no_net", "no_net")
    assert "half" not in registry.names() and "no_net" not in registry.names()
    sys.modules.pop("half_net", None)
    sys.modules.pop("no_net", None)


def test_a_module_without_trainer_traits_is_a_contract_error():
    class Bare:
        pass

    class Declared:
        trainer_traits = TrainerTraits(find_unused_parameters=True)

    with pytest.raises(NetworkContractError, match="Bare has no trainer_traits"):
        trainer_traits_of(Bare())
    assert trainer_traits_of(Declared()).find_unused_parameters is True


def test_the_engine_reads_networks_only_through_the_contract():
    offenders = []
    for path in (REPO / "tao_cli").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(getattr|hasattr)\(net\b", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders
