"""The ``gen_trt_engine`` action of Mask Grounding DINO, and evaluate/inference from the engine it builds.

:mod:`networks.common.tensorrt_engine` does the work; it needs the ``tensorrt`` package and a CUDA GPU, and says
so at load otherwise.  The engine is built from the ONNX file written by ``export`` (six inputs: the image and
five text tensors with a static text length T) or the QDQ file written by ``quantize``.

TAO's Grounding DINO engines come from tao-deploy, whose layer-precision rules the reference does not give.  The
layers forced to fp32 here are those ``quantize`` keeps in fp32, for the same reasons
(:data:`networks.mask_grounding_dino.quantize.FP32_RULES`: the text encoder's softmaxes and layer norms, the
sampling of deformable attention, the last head layers, query selection and the dynamic mask head).
"""
from __future__ import annotations

from typing import Any

from networks.common.errors import ConfigError
from networks.common.tensorrt_engine import TrtSession
from networks.mask_grounding_dino.export import INPUT_NAMES, OUTPUT_NAMES, RELA_OUTPUT_NAMES
from networks.mask_grounding_dino.onnx_runtime import OnnxModel

__all__ = ["check_engine_spec", "run_gen_trt_engine", "TrtModel"]


def _check_onnx(cfg: Any):
    from networks.mask_grounding_dino.onnx_runtime import check_onnx_file

    return lambda path, field: check_onnx_file(path, int(cfg.model.max_text_len), field)


def check_engine_spec(cfg: Any) -> None:
    """Load-time checks of ``gen_trt_engine`` (TensorRT and a GPU present, layer precisions, the ONNX file and
    its text length against ``model.max_text_len``, the batch range)."""
    from networks.common.tensorrt_engine import check_gen_trt_engine

    check_gen_trt_engine(cfg, _check_onnx(cfg))


def run_gen_trt_engine(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Build ``gen_trt_engine.trt_engine``; returns the build report recorded in status.json."""
    from networks.common import tensorrt_engine
    from networks.mask_grounding_dino.quantize import excluded_nodes

    return tensorrt_engine.run_gen_trt_engine(cfg, ctx, _check_onnx(cfg), lambda names: excluded_nodes(names, []))


class TrtModel(TrtSession):
    """A TensorRT engine built from a Mask Grounding DINO export, called like :class:`OnnxModel`: ``batch ->
    outputs`` (same feeds, same outputs, so the same chunk merging and post-processing)."""

    def __init__(self, path: str, max_text_len: int, pad_id: int = 0, field: str = "trt_engine"):
        super().__init__(path, field)
        if self.input_names != INPUT_NAMES:
            raise ConfigError(field, f"{self.path} has inputs {self.input_names}, not a Mask Grounding DINO "
                              f"export's {INPUT_NAMES}", "build it from the .onnx file written by export")
        outputs = [n for n in OUTPUT_NAMES + RELA_OUTPUT_NAMES if n in self.output_names]
        if set(self.output_names) != set(outputs) or outputs[:len(OUTPUT_NAMES)] != OUTPUT_NAMES:
            raise ConfigError(field, f"{self.path} has outputs {self.output_names}, expected {OUTPUT_NAMES} (+ "
                              f"{RELA_OUTPUT_NAMES} with the ReLA branch)")
        self.output_names = outputs
        self.text_len = int(self.engine.get_tensor_shape("input_ids")[-1])
        if self.text_len != int(max_text_len):
            raise ConfigError(field, f"{self.path} was built with {self.text_len} text tokens, but "
                              f"model.max_text_len is {max_text_len}", f"set model.max_text_len={self.text_len}")
        self.pad_id = int(pad_id)

    # the ONNX model's feeds and call, shared rather than rewritten (they use only the session interface)
    feeds = OnnxModel.feeds
    __call__ = OnnxModel.__call__
