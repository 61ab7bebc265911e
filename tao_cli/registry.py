"""The networks tao-cli knows, imported lazily so one broken network cannot break the others.

A network is a package that exports ``NETWORK``, a :class:`networks.common.network.Network`; :func:`load`
returns it and refuses a package that does not (a developer error, :class:`NetworkContractError`).  Tests (and
plugins) add networks with :func:`register` or the ``TAO_EXTRA_NETWORKS`` environment variable
(``name=package.module[,name2=...]``), which subprocess-based tests use.
"""
from __future__ import annotations

import difflib
import importlib
import os

from networks.common.errors import ConfigError
from networks.common.network import Network, NetworkContractError

NETWORKS: dict[str, str] = {
    "mal": "networks.mal",
    "mask2former": "networks.mask2former",
    "mask_grounding_dino": "networks.mask_grounding_dino",
}

_extra: dict[str, str] = {}


def register(name: str, module_path: str) -> Network:
    """Make ``tao model <name> ...`` use the package ``module_path`` (for tests and plugins).

    The package is imported and checked now, so a package that breaks the contract fails here.
    """
    net = _network_of(name, module_path)
    _extra[name] = module_path
    return net


def _table() -> dict[str, str]:
    table = dict(NETWORKS)
    for item in filter(None, os.environ.get("TAO_EXTRA_NETWORKS", "").split(",")):
        name, _, path = item.partition("=")
        if name and path:
            table[name.strip()] = path.strip()
    table.update(_extra)
    return table


def names() -> list[str]:
    """Registered network names, in registration order."""
    return list(_table())


def _network_of(name: str, module_path: str) -> Network:
    module = importlib.import_module(module_path)
    net = module.__dict__.get("NETWORK")
    if not isinstance(net, Network):
        raise NetworkContractError(f"{module_path} does not export NETWORK = networks.common.network.Network(...)"
                                   f" (registered as {name!r}); see docs/architecture.md")
    if net.name != name:
        raise NetworkContractError(f"{module_path}.NETWORK is named {net.name!r} but is registered as {name!r}")
    return net


def load(name: str) -> Network:
    """The :class:`Network` registered as ``name``; unknown names raise ConfigError with a suggestion."""
    table = _table()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"available: {', '.join(table)}"
        raise ConfigError(f"network '{name}'", "is not a known network", hint)
    return _network_of(name, table[name])
