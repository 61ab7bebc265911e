"""networks.common.onnx_export parity: output names, then shapes (never broadcast), then inf-aware values.

A tiny two-output wrapper is exported for real; parity is then run against wrappers and name lists that differ
from the file in one way each.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from networks.common.onnx_export import ParityError, compare_outputs, export_onnx_file, onnx_parity

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NAMES = ["scores", "boxes"]


class TwoOut(nn.Module):
    """``x [B, 4] -> (x·2 [B, 4], x + 1 [B, 4])``."""

    def forward(self, x):
        return x * 2, x + 1


class FirstRowOnly(TwoOut):
    """Exported with a dynamic batch axis but always returns batch 1 for ``scores`` (a baked-in batch size)."""

    def forward(self, x):
        return x[:1] * 2, x + 1


class OneOut(nn.Module):
    def forward(self, x):
        return (x * 2,)


class ThreeOut(nn.Module):
    def forward(self, x):
        return x * 2, x + 1, x


def _export(module: nn.Module, path, names=NAMES):
    return export_onnx_file(module, (torch.zeros(2, 4),), path, ["x"], names, dynamic_batch="batch")


@pytest.fixture(scope="module")
def two_out_onnx(tmp_path_factory):
    return _export(TwoOut(), tmp_path_factory.mktemp("parity") / "two.onnx")


def _x(batch=2):
    return (torch.arange(batch * 4, dtype=torch.float32).reshape(batch, 4),)


def test_equal_outputs_pass_with_zero_diff(two_out_onnx):
    diffs = onnx_parity(TwoOut(), two_out_onnx, _x(), ["x"], NAMES)
    assert list(diffs) == NAMES
    assert all(d < 1e-6 for d in diffs.values()), diffs


def test_values_that_differ_are_reported(two_out_onnx):
    class Off(TwoOut):
        def forward(self, x):
            return x * 2, x + 1.5

    diffs = onnx_parity(Off(), two_out_onnx, _x(), ["x"], NAMES)
    assert diffs["scores"] < 1e-6 and diffs["boxes"] == pytest.approx(0.5)


def test_batch1_output_against_batch2_expectation_is_an_error(tmp_path):
    # the file returns [1, 4] for scores while PyTorch gives [2, 4]: broadcasting would make the diff look fine
    # (row 0 matches); the check must name the output and both shapes instead
    path = _export(FirstRowOnly(), tmp_path / "first.onnx")
    with pytest.raises(ParityError) as err:
        onnx_parity(TwoOut(), path, _x(), ["x"], NAMES)
    msg = str(err.value)
    assert "'scores'" in msg and "(1, 4)" in msg and "(2, 4)" in msg


def test_pytorch_side_with_another_shape_is_an_error(two_out_onnx):
    class Wide(TwoOut):
        def forward(self, x):
            return x * 2, (x + 1).repeat(1, 2)

    with pytest.raises(ParityError, match=r"'boxes'.*\(2, 4\).*\(2, 8\)"):
        onnx_parity(Wide(), two_out_onnx, _x(), ["x"], NAMES)


def test_missing_or_extra_output_name_is_an_error(two_out_onnx, tmp_path):
    # the signature names an output the file does not have
    with pytest.raises(ParityError, match=r"ONNX Runtime .*missing \['masks'\]"):
        onnx_parity(ThreeOut(), two_out_onnx, _x(), ["x"], [*NAMES, "masks"])
    # the file has an output the signature leaves out (the PyTorch wrapper returns only one tensor)
    with pytest.raises(ParityError, match=r"extra \['boxes'\]"):
        onnx_parity(OneOut(), two_out_onnx, _x(), ["x"], ["scores"])
    # the wrapper returns fewer tensors than the signature has names: no silent zip truncation
    one = export_onnx_file(OneOut(), (torch.zeros(2, 4),), tmp_path / "one.onnx", ["x"], ["scores"])
    with pytest.raises(ParityError, match="1 outputs"):
        onnx_parity(OneOut(), one, _x(), ["x"], NAMES)
    # same names in another order would pair each output with the wrong reference
    with pytest.raises(ParityError, match="order"):
        onnx_parity(TwoOut(), two_out_onnx, _x(), ["x"], NAMES[::-1])


def test_compare_outputs_names_shapes_values():
    a = np.array([[0.0, -np.inf, 1.0]])
    assert compare_outputs({"s": a}, {"s": a.copy()}, ["s"]) == {"s": 0.0}
    assert compare_outputs({"s": a + [[0.25, 0.0, 0.0]]}, {"s": a}, ["s"]) == {"s": pytest.approx(0.25)}
    # a non-finite entry that became finite is an infinite difference, not skipped
    assert compare_outputs({"s": np.array([[0.0, 5.0, 1.0]])}, {"s": a}, ["s"])["s"] == float("inf")
    with pytest.raises(ParityError, match=r"'s'.*\(1, 3\).*\(2, 3\)"):
        compare_outputs({"s": a}, {"s": np.repeat(a, 2, axis=0)}, ["s"])
    with pytest.raises(ParityError, match=r"missing \['t'\]"):
        compare_outputs({"s": a}, {"s": a, "t": a}, ["s", "t"])
    with pytest.raises(ParityError, match=r"extra \['t'\]"):
        compare_outputs({"s": a, "t": a}, {"s": a}, ["s"])
