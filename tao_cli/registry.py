"""The networks tao-cli knows, imported lazily so one broken network cannot break the others.

Tests (and plugins) add networks with :func:`register` or the ``TAO_EXTRA_NETWORKS`` environment variable
(``name=package.module[,name2=...]``), which subprocess-based tests use.
"""
from __future__ import annotations

import difflib
import importlib
import os
from types import ModuleType

from networks.common.errors import ConfigError

NETWORKS: dict[str, str] = {
    "mal": "networks.mal",
    "mask2former": "networks.mask2former",
    "mask_grounding_dino": "networks.mask_grounding_dino",
}

_extra: dict[str, str] = {}


def register(name: str, module_path: str) -> None:
    """Make ``tao model <name> ...`` import ``module_path`` (for tests and plugins)."""
    _extra[name] = module_path


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


def load(name: str) -> ModuleType:
    """Import and return the network package ``name``; unknown names raise ConfigError with a suggestion."""
    table = _table()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"available: {', '.join(table)}"
        raise ConfigError(f"network '{name}'", "is not a known network", hint)
    return importlib.import_module(table[name])
