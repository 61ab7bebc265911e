"""What the engine hands a network when it runs one action."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    """Run facts a network may need; built by ``tao_cli.engine.run`` and passed to the network's builders.

    ``run_dir`` is ``<results_dir>/<action>`` (already created); ``num_devices`` is the number of processes per
    node times nodes (the world size the Trainer will use); ``resuming`` is true when train resumes from a
    checkpoint (pretrained weights must then not be loaded); ``log`` is the run's logger (tee'd to
    ``<action>.log``).  ``load_checkpoint(path) -> dict`` is the engine's safe loader (weights-only
    unpickling, decryption with the spec's ``encryption_key``, ``tao_model`` tag check); networks use it for
    files they read themselves (e.g. ``export.checkpoint``); ``save_checkpoint(obj, path)`` is its writer (atomic,
    ``tao_model`` tag, encrypted with the spec's key) for checkpoints a network writes outside training.
    """

    action: str
    run_dir: Path
    num_devices: int = 1
    num_nodes: int = 1
    resuming: bool = False
    accelerator: str = "cpu"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("tao"))
    load_checkpoint: Callable[[str | Path], dict[str, Any]] | None = None
    save_checkpoint: Callable[[dict[str, Any], str | Path], Any] | None = None


def run_output_dir(ctx: RunContext | None, field: str = "inference.results_dir") -> Path:
    """``ctx.run_dir``, where a network writes its outputs; :class:`ConfigError` on ``field`` without one."""
    run_dir = getattr(ctx, "run_dir", None)
    if run_dir is None:
        from networks.common.errors import ConfigError

        raise ConfigError(field, "no run directory to write inference outputs to")
    return Path(run_dir)
