"""ONNX export of Mask2Former with TAO's per-mode outputs, standard ONNX ops only.

The graph input is ``inputs`` float [B, 3, H, W]: an image already normalised with ``dataset.pixel_mean/std``
(no normalisation inside the graph, as TAO) and H, W static multiples of 32.  Mask outputs are upsampled
bilinearly to (H, W).  Outputs per ``model.mode`` (TAO ``scripts/export.py``):

* ``semantic``: ``pred_masks`` [B, C, H, W] class probabilities (channel k = class index k+1).
* ``instance``: ``pred_masks`` [B, K, H, W] {0, 1}, ``pred_scores`` [B, K], ``pred_classes`` [B, K] int64
  0-based (K = min(test_topk_per_image, Q·C)).
* ``panoptic``: ``prob_masks`` [B, Q, H, W] (score · sigmoid), ``pred_masks`` [B, Q, H, W] (sigmoid),
  ``pred_scores`` [B, Q] (best real-class probability), ``pred_classes`` [B, Q] int64 0-based.  The panoptic
  merge is not in the graph.

Deformable attention is exported as the pure-PyTorch ``grid_sample`` path (ONNX ``GridSample``), so no custom
op or TensorRT plugin is needed; opset 17 or higher.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.common.errors import ConfigError
from networks.common.onnx_export import MIN_OPSET, check_export_args, export_onnx_file
from networks.common.onnx_export import onnx_parity as shared_parity
from networks.mask2former.postprocess import HEAD_OUTPUTS, head_outputs

__all__ = ["OUTPUT_NAMES", "ExportWrapper", "export_onnx", "onnx_parity", "load_model_weights", "run_export"]


#: Output names per ``model.mode`` (the post-processor's, shared with evaluate/inference from ONNX).
OUTPUT_NAMES: dict[str, list[str]] = HEAD_OUTPUTS


class ExportWrapper(nn.Module):
    """``model`` + TAO's export post-processor for ``mode``; forward(inputs [B,3,H,W]) → tuple per OUTPUT_NAMES.

    ``model(inputs)`` must return ``pred_logits`` [B, Q, C+1] (index 0 = no-object) and ``pred_masks``
    [B, Q, h, w] logits.
    """

    def __init__(self, model: nn.Module, mode: str, topk: int = 100):
        super().__init__()
        if mode not in OUTPUT_NAMES:
            raise ConfigError("model.mode", f"'{mode}' is not one of {sorted(OUTPUT_NAMES)}")
        self.model = model
        self.mode = mode
        self.topk = int(topk)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(inputs)
        return head_outputs(self.mode, out["pred_logits"], out["pred_masks"], inputs.shape[-2:], self.topk)


def export_onnx(model: nn.Module, mode: str, out_path: str | Path, input_hw: tuple[int, int],
                batch_size: int = -1, opset: int = MIN_OPSET, topk: int = 100, verbose: bool = False) -> Path:
    """Write ``model`` wrapped in :class:`ExportWrapper` to ``out_path`` (atomically) and return the path.

    ``input_hw`` (H, W) is static; ``batch_size`` −1 makes the batch axis dynamic (traced with batch 1).
    Raises :class:`ConfigError` for opset < 17 or a size that is not a multiple of 32.
    """
    H, W = check_export_args(opset, input_hw)
    wrapper = ExportWrapper(model, mode, topk).eval()
    b = 1 if batch_size in (None, -1) else int(batch_size)
    ref = next(model.parameters(), None)
    dummy = torch.ones(b, 3, H, W, device=ref.device if ref is not None else None)
    return export_onnx_file(wrapper, (dummy,), out_path, ["inputs"], OUTPUT_NAMES[mode], opset=opset,
                            dynamic_batch="batch" if batch_size in (None, -1) else None, verbose=verbose,
                            ignore_warnings=torch.jit.TracerWarning)


def onnx_parity(model: nn.Module, mode: str, onnx_path: str | Path, inputs: torch.Tensor, topk: int = 100
                ) -> dict[str, float]:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on ``inputs``; ``{output name: max |diff|}``."""
    return shared_parity(ExportWrapper(model, mode, topk), onnx_path, (inputs,), ["inputs"], OUTPUT_NAMES[mode])


def load_model_weights(model: nn.Module, checkpoint: str | Path, field: str = "export.checkpoint",
                       loader: Any = None, model_cfg: Any = None, quantized: tuple[str, ...] = ()) -> Any:
    """Load a whole trained model into ``model``: a tao-cli checkpoint or any whole-model layout of
    :func:`networks.mask2former.weight_formats.formats` (file or Hugging Face directory), every model tensor present
    except parts the layout never has (reported).  ``loader(path) -> dict`` is the engine's safe loader
    (decryption, network tag check); ``quantized``: the quantize backends whose output is accepted
    (:func:`~networks.common.weight_formats.load_whole_model`).  Returns the load report."""
    from networks.common.weight_formats import load_whole_model
    from networks.mask2former.weight_formats import formats

    return load_whole_model(model, checkpoint, formats(), model_cfg, field=field, loader=loader,
                            quantized=quantized)[0]


def run_export(cfg: Any, ctx: Any) -> dict[str, Any]:
    """The ``export`` action: build the model from ``cfg.model``, load ``export.checkpoint``, write
    ``export.onnx_file``, then check it with onnxruntime on random input and report the max abs difference."""
    from networks.mask2former.model import build_model

    ex = cfg.export
    if ex.opset_version < MIN_OPSET:
        raise ConfigError("export.opset_version", f"{ex.opset_version} is too low", f"use {MIN_OPSET} or higher")
    model = build_model(cfg.model).eval()
    # a ModelOpt-quantized checkpoint exports as a QDQ graph (its quantizers become QuantizeLinear/DequantizeLinear)
    load_model_weights(model, ex.checkpoint, loader=getattr(ctx, "load_checkpoint", None), model_cfg=cfg.model,
                       quantized=("modelopt.pytorch",))
    out = export_onnx(model, cfg.model.mode, ex.onnx_file, (ex.input_height, ex.input_width), ex.batch_size,
                      ex.opset_version, cfg.model.test_topk_per_image, ex.verbose)
    b = 1 if ex.batch_size in (None, -1) else int(ex.batch_size)
    sample = torch.randn(b, 3, ex.input_height, ex.input_width, generator=torch.Generator().manual_seed(0))
    diffs = onnx_parity(model, cfg.model.mode, out, sample, cfg.model.test_topk_per_image)
    inputs = {"inputs": [("batch" if ex.batch_size in (None, -1) else b), 3, ex.input_height, ex.input_width]}
    ctx.log.info("ONNX written to %s; inputs %s; outputs %s; onnxruntime max |diff| vs PyTorch: %s",
                 out, inputs, OUTPUT_NAMES[cfg.model.mode], diffs)
    return {"onnx_file": str(out), "inputs": inputs, "outputs": OUTPUT_NAMES[cfg.model.mode],
            "max_abs_diff": max(diffs.values()) if diffs else 0.0, "per_output_diff": diffs}
