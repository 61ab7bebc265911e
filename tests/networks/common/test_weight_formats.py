"""Shared weight-format glue: sources built from loaded checkpoints, report counts, the random-init warning."""
from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf


def test_source_from_checkpoint_unwraps_and_records_wrapper(tmp_path):
    from networks.common.weight_formats import read_source, source_from_checkpoint

    w = {"a.weight": torch.ones(2, 3), "a.idx": torch.arange(4)}
    src = source_from_checkpoint(tmp_path / "x.pth", {"model": w, "args": "ns", "epoch": 3})
    assert src.wrapper == "model" and set(src.tensors) == set(w) and src.meta == {"args": "ns", "epoch": 3}
    assert src.num_parameters() == 6  # the int64 index table is not a parameter
    assert source_from_checkpoint(tmp_path / "y.pth", w).wrapper is None
    torch.save({"state_dict": w, "tao_model": "mal"}, tmp_path / "z.pth")
    read = read_source(tmp_path / "z.pth")
    assert read.wrapper == "state_dict" and read.tao_model == "mal" and read.container == "torch"


def test_safetensors_tag_is_read_and_another_networks_weights_are_named(tmp_path):
    """``tao weights convert`` tags a .safetensors file in its header metadata; a tagged file of another network is
    refused by name, and an untagged unknown layout names the network that was expected."""
    import pytest
    from safetensors.torch import save_file

    from networks.common.errors import CheckpointError
    from networks.common.weight_formats import detect_format, read_source
    from networks.mask2former.weight_formats import formats

    save_file({"student.x": torch.ones(2)}, str(tmp_path / "w.safetensors"), metadata={"tao_model": "mal"})
    src = read_source(tmp_path / "w.safetensors")
    assert src.tao_model == "mal"
    with pytest.raises(CheckpointError, match="is a 'mal' checkpoint, not 'mask2former'"):
        detect_format(src, formats())
    save_file({"foo.bar": torch.ones(2)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(CheckpointError, match="is not mask2former weights in any known layout"):
        detect_format(read_source(tmp_path / "u.safetensors"), formats())


def test_load_report_counts_line():
    from networks.common.weights import LoadReport

    r = LoadReport(missing=["h.w", "h.b"], unexpected=[], mismatched=[("c", (1,), (2,))], benign=["d"], loaded=7)
    assert r.counts() == "7 matched, 2 newly initialised, 0 unexpected, 1 shape-mismatched, 1 known-unused dropped"


def _net(**kw):
    import networks.mal as mal

    return dataclasses.replace(mal.NETWORK, **kw)


def _cfg(**train):
    import networks.mal as mal

    cfg = OmegaConf.structured(mal.ExperimentConfig)
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def test_random_init_warning_threshold_and_fields():
    from networks.common.network import random_init_warning

    net = _net()
    line = random_init_warning(net, _cfg(lr=1e-6))
    assert line and "train.pretrained_model_path" in line and "train.lr=1e-06" in line and "\n" not in line
    assert random_init_warning(net, _cfg(lr=1e-6), resuming=True) is None
    assert random_init_warning(net, _cfg(lr=1e-6, pretrained_model_path="/w.pth")) is None
    assert random_init_warning(net, _cfg(lr=1e-4)) is None  # a from-scratch learning rate: no warning
    always = _net(random_init_lr=None)
    assert "training from random weights; set train.pretrained_model_path" in random_init_warning(always, _cfg(lr=1))
    assert random_init_warning(_net(pretrained_fields=(), random_init_lr=None), _cfg()) is None


def test_contract_refuses_unknown_pretrained_field_and_lazy_weight_formats_has_no_arguments():
    import pytest

    from networks.common.network import NetworkContractError, lazy

    with pytest.raises(NetworkContractError, match="not a spec field"):
        _net(pretrained_fields=("train.no_such_key",))
    formats = lazy("networks.mal.weight_formats:weight_formats")()
    assert [f.name for f in formats] == ["tao", "convstem", "mae", "deit", "timm-vit"]
