"""Where the packaged spec files live (the ``configs/`` tree), in a checkout or an installed wheel."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def configs_dir() -> Path:
    """The ``configs/`` directory: the checkout's when running from source, else the installed package data."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("tao_cli") / "configs"))


def packaged_spec(network: str, action: str) -> Path | None:
    """``configs/<network>/<action>.yaml`` if it exists, else None (the dataclass defaults are used)."""
    path = configs_dir() / network / f"{action}.yaml"
    return path if path.is_file() else None
