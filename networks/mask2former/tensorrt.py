"""The ``gen_trt_engine`` action of Mask2Former: a TensorRT engine from the ONNX file written by ``export``
(:mod:`networks.common.tensorrt_engine` does the work; it needs the ``tensorrt`` package and a CUDA GPU, and says
so at load otherwise).

The layers forced to fp32 are those the ``quantize`` action keeps in fp32 (reference mask2former.md §7.2, TAO's
``set_layer_precisions``): the masked-attention cross-attention layers and the export post-processor.
"""
from __future__ import annotations

from typing import Any

from networks.common.errors import ConfigError
from networks.common.tensorrt_engine import TrtSession
from networks.mask2former.onnx_runtime import OnnxHead
from networks.mask2former.postprocess import HEAD_OUTPUTS

__all__ = ["check_engine_spec", "run_gen_trt_engine", "TrtHead"]


def _check_onnx(cfg: Any):
    from networks.mask2former.onnx_runtime import check_onnx_file

    return lambda path, field: check_onnx_file(path, str(cfg.model.mode), field)


def check_engine_spec(cfg: Any) -> None:
    """Load-time checks of ``gen_trt_engine`` (TensorRT and a GPU present, layer precisions, the ONNX file)."""
    from networks.common.tensorrt_engine import check_gen_trt_engine

    check_gen_trt_engine(cfg, _check_onnx(cfg))


def run_gen_trt_engine(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Build ``gen_trt_engine.trt_engine``; returns the build report recorded in status.json."""
    from networks.common import tensorrt_engine
    from networks.mask2former.quantize import excluded_nodes

    return tensorrt_engine.run_gen_trt_engine(cfg, ctx, _check_onnx(cfg), lambda names: excluded_nodes(names, []))


class TrtHead(TrtSession):
    """A TensorRT engine built from a Mask2Former export, called like :class:`OnnxHead`: ``(images,
    image_sizes) -> {output name: tensor}`` (same preparation, same outputs, so the same post-processing)."""

    def __init__(self, path: str, mode: str, field: str = "trt_engine"):
        super().__init__(path, field)
        if set(self.output_names) != set(HEAD_OUTPUTS[mode]):
            raise ConfigError(field, f"{self.path} has outputs {self.output_names}, not those of a model.mode "
                              f"'{mode}' export {HEAD_OUTPUTS[mode]}", "build it from an export of this mode")
        self.output_names = list(HEAD_OUTPUTS[mode])
        self.mode = mode

    # the ONNX head's preparation and call, shared rather than rewritten (they use only the session interface)
    prepare = OnnxHead.prepare
    __call__ = OnnxHead.__call__
