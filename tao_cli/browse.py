"""``tao dataset browse``: pictures of dataset samples exactly as the network receives them (after augmentation).

The check to run before a long training: are the boxes, masks, classes and prompts where they should be after
flips, crops and resizes?  The spec is loaded like ``tao model <net> <action>``; the network's own datamodule
builds the dataset; ``networks.<net>.visualize.sample_drawer(cfg, datamodule)`` turns a sample into a picture.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from networks.common.context import RunContext
from networks.common.errors import ConfigError, DataError
from networks.common.visualize import save_png
from tao_cli import registry
from tao_cli.paths import packaged_spec

__all__ = ["browse", "BROWSE_ACTIONS"]

#: --action → (spec action, datamodule stage, dataset attribute)
BROWSE_ACTIONS = {
    "train": ("fit", "train_dataset"),
    "evaluate": ("test", "val_dataset"),
}

_log = logging.getLogger("tao")


def browse(network: str, spec_path: Path | None, action: str, out: Path, num: int = 8,
           overrides: list[str] | None = None) -> list[Path]:
    """Write pictures of ``num`` samples of ``network``'s ``action`` dataset to ``out`` and return their paths.

    ``action`` ``train`` draws training samples after augmentation (what the model trains on, in a seeded
    random order: ``train.seed``); ``evaluate`` draws the evaluation samples in order.  ``spec_path`` (default:
    the packaged ``<action>.yaml``) and ``overrides`` (``key=value`` words) are read as by ``tao model``; the
    evaluate checkpoint is not required.  Files are ``out/<index>_<image stem>.png`` (``index`` = position in
    the dataset), written atomically.  Bad input raises ``ConfigError`` / ``DataError``.
    """
    if action not in BROWSE_ACTIONS:
        raise ConfigError("--action", f"'{action}' cannot be browsed", f"use one of: {', '.join(BROWSE_ACTIONS)}")
    if int(num) < 1:
        raise ConfigError("--num", f"must be at least 1, got {num}")
    net = registry.load(network)
    actions, config_class = net.actions, net.config_class
    if action not in actions:
        raise ConfigError("--action", f"{network} has no action '{action}'", f"actions: {', '.join(actions)}")
    drawer_factory = _sample_drawer(net, network)

    from tao_cli import spec as spec_mod

    path = Path(spec_path) if spec_path else packaged_spec(network, action)
    cfg = spec_mod.load_spec(config_class, action, path, list(overrides or []),
                             mandatory=action == "train", check=net.check)
    stage, attr = BROWSE_ACTIONS[action]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(action=action, run_dir=out, log=_log)
    seed = _seed(cfg)
    datamodule = net.build_datamodule(cfg, ctx)
    datamodule.setup(stage)
    dataset = getattr(datamodule, attr, None)
    if dataset is None or len(dataset) == 0:
        raise DataError(f"{action} dataset", "holds no samples", "check the dataset paths of the spec")
    draw = drawer_factory(cfg, datamodule)
    order = list(range(len(dataset)))
    if action == "train":
        random.Random(seed).shuffle(order)
    written = []
    for index in order[: int(num)]:
        sample = dataset[index]
        picture = draw(sample)
        name = _stem(dataset, index, sample)
        written.append(save_png(out / f"{index:05d}_{name}.png", picture))
    _log.info("Wrote %d %s samples to %s", len(written), action, out)
    return written


def _sample_drawer(net, network: str):
    """The network's ``sample_drawer(cfg, datamodule)``; ConfigError when the network has none."""
    if net.sample_drawer is None:
        raise ConfigError(f"network '{network}'", "cannot draw its samples (its NETWORK has no sample_drawer)")
    return net.sample_drawer



def _seed(cfg) -> int:
    """Seed Python, NumPy and torch from ``train.seed`` (0 when negative or absent) so pictures repeat."""
    seed = 0
    try:
        seed = max(int(cfg.train.seed), 0)
    except Exception:  # a network without train.seed: fixed seed
        pass
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def _stem(dataset, index: int, sample: dict) -> str:
    """A file-name stem for a sample: its image's stem (plus the annotation id for per-box samples)."""
    name = sample.get("file_name") if isinstance(sample, dict) else None
    records = getattr(dataset, "records", None)
    extra = ""
    if name is None and records is not None and index < len(records):
        rec = records[index]
        name = getattr(rec, "file_name", None)
        if getattr(rec, "ann_id", None) is not None:
            extra = f"_ann{rec.ann_id}"
    stem = Path(str(name)).stem if name else "sample"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return f"{safe}{extra}"
