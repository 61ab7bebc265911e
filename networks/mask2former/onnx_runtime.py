"""Evaluate / inference of Mask2Former from an ONNX file written by the ``export`` action, with ONNX Runtime.

The file's graph is ``inputs`` [B, 3, H, W] (normalised image, static H×W, batch dynamic or fixed) → TAO's
export outputs (:data:`networks.mask2former.postprocess.HEAD_OUTPUTS`), whose names tell the mode.
:func:`check_onnx_file` validates a file against the spec without starting a session (spec load, ``--dry-run``);
:class:`OnnxHead` runs it on an evaluation/inference batch and hands back the same tensors the PyTorch path
computes with :func:`~networks.mask2former.postprocess.head_outputs`.

Preprocessing: the data pipeline is the PyTorch path's (test resize, normalisation, padding).  Each image's
un-padded part is then resized bilinearly to the graph's H×W, and post-processing treats that H×W as the image
(masks are resized to the original resolution from there).  When the test resize already yields H×W (e.g.
``dataset.val.target_size: [W, H]``, ``test_min_size: min(H, W)``), this resize is the identity and the input
is exactly the PyTorch path's.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from networks.common.errors import ConfigError
from networks.mask2former.postprocess import HEAD_OUTPUTS

__all__ = ["ONNX_SOURCES", "OnnxGraphInfo", "OnnxHead", "check_onnx_file", "describe_onnx", "onnx_file_of",
           "choose_providers"]

log = logging.getLogger(__name__)

#: The keys of an evaluate/inference section that name what to run; exactly one must be set.
ONNX_SOURCES = ("checkpoint", "onnx_file", "trt_engine")


def onnx_file_of(cfg: Any, action: str | None) -> str | None:
    """``<action>.onnx_file`` when ``action`` is evaluate/inference and it is set, else None."""
    if action not in ("evaluate", "inference") or action not in cfg:
        return None
    value = cfg[action].get("onnx_file")
    return str(value) if value not in (None, "") else None


@dataclass(frozen=True)
class OnnxGraphInfo:
    """Input name and shape (ints, or the symbolic name of a dynamic axis), and output names of a graph."""

    input_name: str
    input_shape: tuple[int | str, ...]
    output_names: tuple[str, ...]


def describe_onnx(path: str | os.PathLike, field: str) -> OnnxGraphInfo:
    """Read the graph's inputs/outputs without the weights; :class:`ConfigError` on ``field`` for a missing or
    unreadable file or a graph that does not have exactly one input."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(field, f"{path} does not exist", "point it at the .onnx file written by the export action")
    try:
        import onnx

        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file, said in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(field, f"{path} is not a readable ONNX file ({first[:200]})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(field, f"{path} has {len(inputs)} inputs {[i.name for i in inputs]}; a Mask2Former "
                          "export has one ('inputs')")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in inputs[0].type.tensor_type.shape.dim)
    return OnnxGraphInfo(inputs[0].name, dims, tuple(o.name for o in model.graph.output))


def check_onnx_file(path: str | os.PathLike, mode: str, field: str) -> OnnxGraphInfo:
    """:func:`describe_onnx`, then: the output names must be ``HEAD_OUTPUTS[mode]`` (an export of another mode
    names it), the input [B, 3, H, W] with static H and W.  One-line :class:`ConfigError` on ``field``."""
    info = describe_onnx(path, field)
    outputs = list(info.output_names)
    if outputs != HEAD_OUTPUTS[mode]:
        other = [m for m, names in HEAD_OUTPUTS.items() if names == outputs]
        what = f"was exported for model.mode '{other[0]}'" if other else f"has outputs {outputs}"
        raise ConfigError(field, f"{path} {what}, but model.mode is '{mode}'",
                          f"export with model.mode={mode}, or set model.mode to the file's mode")
    shape = info.input_shape
    if len(shape) != 4:
        raise ConfigError(field, f"{path}: input '{info.input_name}' has shape {list(shape)}, expected [B, 3, H, W]")
    if shape[1] != 3:
        raise ConfigError(field, f"{path}: input '{info.input_name}' has {shape[1]} channels, expected 3 (RGB)")
    if not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise ConfigError(field, f"{path}: input height/width {list(shape[2:])} must be static",
                          "export with export.input_height/input_width")
    return info


def choose_providers(want_gpu: bool) -> list[str]:
    """CUDA then CPU when ``want_gpu`` and this onnxruntime build has the CUDA provider; else CPU only."""
    import onnxruntime as ort

    if want_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxHead:
    """An ONNX Runtime session over a Mask2Former export: ``(images, image_sizes) -> {output name: tensor}``.

    ``images`` [B, 3, Hp, Wp] is an evaluation/inference batch (normalised, padded; ``image_sizes`` the
    un-padded (h, w) of each); the outputs are torch tensors on ``images.device``, batch B, maps at the graph's
    :attr:`hw`.  A graph with a fixed batch size runs in chunks of that size (the last one zero-padded).
    """

    def __init__(self, path: str | os.PathLike, mode: str, want_gpu: bool = False, field: str = "onnx_file"):
        import onnxruntime as ort

        info = check_onnx_file(path, mode, field)
        self.path = str(Path(os.path.expanduser(str(path))).resolve())
        self.mode = mode
        self.hw = (int(info.input_shape[2]), int(info.input_shape[3]))
        batch = info.input_shape[0]
        self.batch = int(batch) if isinstance(batch, int) and batch > 0 else None
        self.session = ort.InferenceSession(self.path, providers=choose_providers(want_gpu))
        self.input_name = info.input_name
        self.output_names = list(info.output_names)
        self.providers = list(self.session.get_providers())
        self.version = ort.__version__
        self._warned_resize = False

    def describe(self) -> dict[str, Any]:
        """What ran, for the log and metrics.json: runtime, version, providers, ONNX path, input size."""
        return {"name": "onnxruntime", "version": self.version, "providers": self.providers,
                "onnx_file": self.path, "input_hw": list(self.hw)}

    def prepare(self, images: torch.Tensor, image_sizes: list) -> np.ndarray:
        """float32 [B, 3, H, W] graph input: each image's un-padded part, resized bilinearly to :attr:`hw`
        when it has another size (warned once)."""
        out = []
        for i, (h, w) in enumerate(image_sizes):
            x = images[i, :, : int(h), : int(w)].float()
            if (int(h), int(w)) != self.hw:
                if not self._warned_resize:
                    log.warning("Images are resized from the test size %dx%d to the ONNX input %dx%d; set "
                                "dataset.<split>.target_size / augmentation.test_min_size so they match for "
                                "results identical to the checkpoint's", int(h), int(w), *self.hw)
                    self._warned_resize = True
                x = F.interpolate(x[None], size=self.hw, mode="bilinear", align_corners=False)[0]
            out.append(x)
        return torch.stack(out).cpu().numpy().astype(np.float32, copy=False)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The session on a prepared batch, in chunks of a fixed graph batch size; ``{name: array}``."""
        if self.batch is None:
            return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: x}),
                            strict=True))
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start:start + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), chunk.dtype)])
            for name, arr in zip(self.output_names, self.session.run(self.output_names, {self.input_name: chunk}),
                                 strict=True):
                parts[name].append(arr[:n])
        return {n: np.concatenate(v) for n, v in parts.items()}

    def __call__(self, images: torch.Tensor, image_sizes: list) -> dict[str, torch.Tensor]:
        got = self.run(self.prepare(images, image_sizes))
        return {n: torch.from_numpy(np.ascontiguousarray(v)).to(images.device) for n, v in got.items()}
