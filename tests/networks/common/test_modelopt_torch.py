"""networks.common.modelopt_torch on a toy model: ModelOpt's config from the layer selection, and the quantized
checkpoint's round trip through tao-cli's checkpoint writer and loader (the end-to-end runs are in the networks'
quantize tests)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("modelopt")
pytest.importorskip("requests")


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class _Wrapper(nn.Module):  # the LightningModule's place: the network under "model"
    def __init__(self):
        super().__init__()
        self.model = _Toy()


def _quantized(x):
    from networks.common.modelopt_torch import _import_modelopt, quant_config, select_quantizers

    mtq, mto = _import_modelopt()
    torch.manual_seed(0)
    model = _Toy().eval()
    q = mtq.quantize(model, quant_config(select_quantizers(model, [], [])), lambda m: m(x))
    return q, mto.modelopt_state(q)


def test_quant_config_turns_on_only_the_selected_quantizers():
    from networks.common.modelopt_torch import quant_config

    cfg = quant_config({"a.0": {"weights": 0, "inputs": False}, "b": {"weights": 1, "inputs": None}})
    assert cfg["algorithm"] == "max"
    assert cfg["quant_cfg"] == {"*": {"enable": False}, "a.0.weight_quantizer": {"num_bits": 8, "axis": 0},
                                "b.weight_quantizer": {"num_bits": 8, "axis": 1},
                                "b.input_quantizer": {"num_bits": 8, "axis": None}}


def test_checkpoint_round_trip_restores_the_same_quantized_model(tmp_path):
    """Written by the engine's writer (only plain types and tensors, loaded with weights_only) and restored by
    :func:`restore_like`: the same outputs as the quantized model, different from the fp32 model's."""
    from networks.common.modelopt_torch import restore_like
    from tao_cli.engine.checkpoints import load_checkpoint, save_checkpoint_file

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q, state = _quantized(x)
    record = {"backend": "modelopt.pytorch", "root": "model", "modelopt_state": state, "modules": ["model.conv"]}
    path = save_checkpoint_file({"state_dict": {f"model.{k}": v for k, v in q.state_dict().items()},
                                 "quantization": record}, tmp_path / "q.pth", network="toy")
    obj = load_checkpoint(path)
    wrapper = _Wrapper().eval()
    restore_like(wrapper, obj["quantization"], str(path))
    wrapper.load_state_dict(obj["state_dict"])
    with torch.no_grad():
        assert torch.equal(wrapper.model(x), q(x))
        fp32 = _Toy().eval()
        fp32.load_state_dict({k: v for k, v in q.state_dict().items() if "quantizer" not in k})
        assert not torch.equal(fp32(x), q(x))


def test_restore_into_another_model_is_a_checkpoint_error():
    from networks.common.errors import CheckpointError
    from networks.common.modelopt_torch import restore_like

    _, state = _quantized(torch.randn(1, 3, 8, 8))
    other = nn.Module()
    other.model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="do not fit"):
        restore_like(other, {"root": "model", "modelopt_state": state}, "q.pth")
