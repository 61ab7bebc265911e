"""Helpers shared by the networks: config look-up, ONNX parity diff, batch padding, prediction gather, run dir."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from networks.common.config import cfg_get
from networks.common.context import RunContext, run_output_dir
from networks.common.distributed import gather_unique
from networks.common.errors import ConfigError
from networks.common.onnx_export import check_export_args, max_abs_diff
from networks.ops.padding import pad_images


def test_cfg_get_defaults_for_absent_none_and_unset_values():
    cfg = OmegaConf.create({"train": {"lr": 0.1, "freeze": None, "path": "???"}})
    OmegaConf.set_struct(cfg, True)
    assert cfg_get(cfg, "train.lr") == 0.1 and cfg_get(cfg.train, "lr", 5) == 0.1
    assert cfg_get(cfg, "train.freeze", []) == [] and cfg_get(cfg, "train.path", "x") == "x"
    assert cfg_get(cfg, "train.nope", 3) == 3 and cfg_get(None, "lr", 4) == 4
    assert cfg_get({"a": 0}, "a", 9) == 0  # a falsy value is a value
    assert cfg_get(type("HF", (), {"depths": [2, 2]})(), "depths") == [2, 2]


def test_max_abs_diff_is_inf_aware():
    e = np.array([1.0, -np.inf, 3.0])
    assert max_abs_diff(e + np.array([0.5, 0.0, -0.25]), e) == pytest.approx(0.5)
    assert max_abs_diff(np.array([1.0, 0.0, 3.0]), e) == float("inf")  # -inf became finite
    assert max_abs_diff(e[:2], e) == float("inf")
    assert max_abs_diff(np.full(2, -np.inf), np.full(2, -np.inf)) == 0.0


def test_check_export_args():
    assert check_export_args(17, (64, 96)) == (64, 96)
    with pytest.raises(ConfigError, match="opset"):
        check_export_args(16, (64, 64))
    with pytest.raises(ConfigError, match="multiple of 32 in both"):
        check_export_args(17, (60, 64), size_hint=" in both dimensions")


def test_pad_images_pixel_mask_true_on_valid_pixels():
    a, b = torch.ones(3, 40, 50), torch.full((3, 70, 20), 2.0)
    batch, mask = pad_images([a, b], 32)
    assert batch.shape == (2, 3, 96, 64) and mask.shape == (2, 96, 64) and mask.dtype == torch.bool
    assert mask[0, :40, :50].all() and not mask[0, 40:].any() and not mask[0, :, 50:].any()
    assert int(mask[1].sum()) == 70 * 20 and (batch[1, :, :70, :20] == 2).all()
    assert (batch[0][:, ~mask[0]] == 0).all()


def test_gather_unique_dedups_and_orders_without_process_group():
    recs = [{"file_name": "b.jpg", "image_id": 1, "v": 0}, {"file_name": "a.jpg", "image_id": 2, "v": 1},
            {"file_name": "b.jpg", "image_id": 1, "v": 2}]
    assert [r["v"] for r in gather_unique(recs, "file_name")] == [1, 2]
    assert [r["image_id"] for r in gather_unique(recs, "file_name", order_by="image_id")] == [1, 2]


def test_run_output_dir(tmp_path: Path):
    assert run_output_dir(RunContext("inference", tmp_path)) == tmp_path
    with pytest.raises(ConfigError, match="inference.results_dir"):
        run_output_dir(None)
