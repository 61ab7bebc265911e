"""Mask2Former declares DDP's find_unused_parameters on the module it builds, and the engine's Trainer uses it:
TAO's rule is plain DDP with activation checkpointing, find_unused_parameters otherwise."""
from __future__ import annotations

from pathlib import Path

import pytest
from pytorch_lightning.strategies import DDPStrategy

from networks.common.context import RunContext
from networks.mask2former import NETWORK
from tao_cli.engine.devices import DevicePlan
from tao_cli.engine.trainer import build_trainer

from .conftest import make_tiny_cfg


@pytest.mark.parametrize("activation_checkpoint, find_unused", [(True, False), (False, True)])
def test_ddp_strategy_follows_the_module(m2f_synthetic, tmp_path, activation_checkpoint, find_unused):
    cfg = make_tiny_cfg(m2f_synthetic)
    cfg.train.activation_checkpoint = activation_checkpoint
    module = NETWORK.build_module(cfg, RunContext(action="train", run_dir=Path(tmp_path)))
    assert module.trainer_traits.find_unused_parameters is find_unused
    two_cpu_processes = DevicePlan("cpu", 2, 1, [], 2, [], False)
    trainer = build_trainer(cfg, "train", two_cpu_processes, tmp_path, [], module)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is find_unused
