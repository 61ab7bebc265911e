"""Evaluate / inference of Mask2Former from an ONNX file written by the ``export`` action, with ONNX Runtime.

The file's graph is ``inputs`` [B, 3, H, W] (normalised image, static H×W, batch dynamic or fixed) → TAO's
export outputs (:data:`networks.mask2former.postprocess.HEAD_OUTPUTS`), whose names tell the mode.
:func:`check_onnx_file` validates a file against the spec without starting a session (spec load, ``--dry-run``);
:class:`OnnxHead` runs it on an evaluation/inference batch and hands back the same tensors the PyTorch path
computes with :func:`~networks.mask2former.postprocess.head_outputs`.  Session, providers, chunking of a fixed
batch and the resize to the graph's size are :mod:`networks.common.onnx_runtime`'s.

Preprocessing: the data pipeline is the PyTorch path's (test resize, normalisation, padding).  Each image's
un-padded part is then resized bilinearly to the graph's H×W, and post-processing treats that H×W as the image
(masks are resized to the original resolution from there).  When the test resize already yields H×W (e.g.
``dataset.val.target_size: [W, H]``, ``test_min_size: min(H, W)``), this resize is the identity and the input
is exactly the PyTorch path's.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from networks.common.errors import ConfigError
from networks.common.onnx_runtime import (
    ONNX_SOURCES,
    OnnxGraphInfo,
    OnnxSession,
    choose_providers,
    describe_onnx,
    onnx_file_of,
    static_image_hw,
)
from networks.mask2former.postprocess import HEAD_OUTPUTS

__all__ = ["ONNX_SOURCES", "OnnxGraphInfo", "OnnxHead", "check_onnx_file", "describe_onnx", "onnx_file_of",
           "choose_providers"]

_RESIZE_HINT = "set dataset.<split>.target_size / augmentation.test_min_size so they match"


def check_onnx_file(path: str | os.PathLike, mode: str, field: str) -> OnnxGraphInfo:
    """:func:`describe_onnx`, then: one input, the output names must be ``HEAD_OUTPUTS[mode]`` (an export of
    another mode names it), the input [B, 3, H, W] with static H and W.  One-line :class:`ConfigError` on
    ``field``."""
    info = describe_onnx(path, field)
    if len(info.inputs) != 1:
        raise ConfigError(field, f"{path} has {len(info.inputs)} inputs {list(info.inputs)}; a Mask2Former "
                          "export has one ('inputs')")
    outputs = list(info.output_names)
    if outputs != HEAD_OUTPUTS[mode]:
        other = [m for m, names in HEAD_OUTPUTS.items() if names == outputs]
        what = f"was exported for model.mode '{other[0]}'" if other else f"has outputs {outputs}"
        raise ConfigError(field, f"{path} {what}, but model.mode is '{mode}'",
                          f"export with model.mode={mode}, or set model.mode to the file's mode")
    static_image_hw(info, path, field)
    return info


class OnnxHead(OnnxSession):
    """An ONNX Runtime session over a Mask2Former export: ``(images, image_sizes) -> {output name: tensor}``.

    ``images`` [B, 3, Hp, Wp] is an evaluation/inference batch (normalised, padded; ``image_sizes`` the
    un-padded (h, w) of each); the outputs are torch tensors on ``images.device``, batch B, maps at the graph's
    :attr:`hw`.  A graph with a fixed batch size runs in chunks of that size.
    """

    def __init__(self, path: str | os.PathLike, mode: str, want_gpu: bool = False, field: str = "onnx_file"):
        super().__init__(path, check_onnx_file(path, mode, field), want_gpu=want_gpu, field=field)
        self.mode = mode

    def prepare(self, images: torch.Tensor, image_sizes: list) -> np.ndarray:
        """float32 [B, 3, H, W] graph input (see :meth:`OnnxSession.prepare_images`)."""
        return self.prepare_images(images, image_sizes, _RESIZE_HINT)

    def __call__(self, images: torch.Tensor, image_sizes: list) -> dict[str, torch.Tensor]:
        got = self.run({self.input_name: self.prepare(images, image_sizes)})
        return {n: torch.from_numpy(np.ascontiguousarray(v)).to(images.device) for n, v in got.items()}
