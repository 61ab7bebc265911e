"""``experiment.yaml``: the resolved spec a run used (secrets redacted) and how it was started.

The first YAML document is a valid spec for ``-e experiment.yaml``; the second records the command line,
date, host, versions, devices and the resume checkpoint.
"""
from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from tao_cli.redact import SECRET_FIELDS, mask, redact_argv, secrets_of

from .devices import DevicePlan

__all__ = ["experiment_yaml", "redacted_yaml", "versions"]


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved spec as YAML with secret fields replaced by ``*****``."""
    from tao_cli.spec import to_yaml

    return to_yaml(cfg, redact=SECRET_FIELDS)


def versions() -> dict[str, str]:
    """Versions of tao-cli, torch, Lightning, Hydra, OmegaConf and Python."""
    from importlib import metadata

    import torch

    import tao_cli

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "tao_cli": tao_cli.__version__,
        "torch": str(torch.__version__),
        "lightning": dist("pytorch-lightning"),
        "hydra": dist("hydra-core"),
        "omegaconf": dist("omegaconf"),
        "python": platform.python_version(),
    }


def experiment_yaml(cfg: DictConfig, argv: Sequence[str], key: str | None, devices: DevicePlan,
                    resume: Path | None) -> str:
    """The text of ``experiment.yaml`` (see the module docstring)."""
    import yaml

    run = {
        "_run": {
            "argv": redact_argv(list(argv), key),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(),
            "versions": versions(),
            "devices": devices.describe(),
            "resume_checkpoint": str(resume) if resume else None,
        }
    }
    text = mask(redacted_yaml(cfg), secrets_of(key))
    # Second YAML document: the first one stays a valid spec for ``-e experiment.yaml``.
    return text + "---\n" + yaml.safe_dump(run, sort_keys=False)
