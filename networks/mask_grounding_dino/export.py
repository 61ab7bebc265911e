"""ONNX export of Mask Grounding DINO with TAO's input/output names, standard ONNX operators only.

Inputs (TAO §6; note TAO's naming swap — ``attention_mask`` is the [B, T] padding mask and ``text_token_mask``
the [B, T, T] phrase block mask):

=====================  ======================  ==========================================================
name                   shape / dtype           meaning
=====================  ======================  ==========================================================
``inputs``             [B, 3, H, W] float32    image normalised with ``dataset.augmentation.input_mean/std``
``input_ids``          [B, T] int64            token ids of the prompt, padded to T = ``model.max_text_len``
``attention_mask``     [B, T] bool             True = real token
``position_ids``       [B, T] int64            positions restarting at 0 per phrase
``token_type_ids``     [B, T] int64            zeros
``text_token_mask``    [B, T, T] bool          phrase block-diagonal self-attention mask
=====================  ======================  ==========================================================

Outputs: ``pred_logits`` [B, Q, T] (−inf on padding tokens), ``pred_boxes`` [B, Q, 4] (normalised cxcywh),
``pred_masks`` [B, Q, 1, H/4, W/4] mask logits, and with the ReLA branch (``num_region_queries > 0`` and
``rela`` in ``model.loss_types``) ``no_targets`` [B, 2] no-target logits and ``union_mask_logits``
[B, 2, H/8, W/8] (background, foreground) as TAO's newer export.  H, W and T are static; the batch axis is dynamic when
``export.batch_size`` is −1.  The image has no padding (the model sees an all-valid pixel mask).  Deformable
attention is the pure-PyTorch ``grid_sample`` path (ONNX ``GridSample``): no TensorRT plugin is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.common.onnx_export import MIN_OPSET, check_export_args, export_onnx_file
from networks.common.onnx_export import onnx_parity as shared_parity
from networks.mask_grounding_dino.text import phrase_masks

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "RELA_OUTPUT_NAMES", "output_names", "MIN_OPSET", "ExportWrapper", "text_inputs", "export_onnx",
           "onnx_parity", "load_model_weights", "run_export"]


INPUT_NAMES = ["inputs", "input_ids", "attention_mask", "position_ids", "token_type_ids", "text_token_mask"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes", "pred_masks"]
#: extra outputs of a model with the ReLA branch
RELA_OUTPUT_NAMES = ["no_targets", "union_mask_logits"]
#: TAO's dummy prompt for tracing.
DUMMY_CAPTION = "the running dog ."


def output_names(model: nn.Module) -> list[str]:
    """ONNX output names of ``model``: :data:`OUTPUT_NAMES`, plus :data:`RELA_OUTPUT_NAMES` with the ReLA branch."""
    return OUTPUT_NAMES + (RELA_OUTPUT_NAMES if getattr(model, "rela", None) is not None else [])


class ExportWrapper(nn.Module):
    """``model`` with TAO's ONNX signature: forward(inputs, input_ids, attention_mask, position_ids,
    token_type_ids, text_token_mask) → the tensors named by :func:`output_names` (in that order)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = output_names(model)

    def forward(self, inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask):
        out = self.model(inputs, None, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask)
        return tuple(out[k] for k in self.names)


def text_inputs(tokenizer, captions: list[str], text_len: int) -> dict[str, torch.Tensor]:
    """Prompt tensors padded to exactly ``text_len`` tokens (cut if longer), as the exported graph expects."""
    enc = tokenizer(list(captions), padding="max_length", max_length=max(text_len, 1), truncation=False,
                    return_tensors="pt")
    ids = enc["input_ids"].long()
    special = {int(tokenizer.convert_tokens_to_ids(t)) for t in ("[CLS]", "[SEP]", ".", "?")}
    block, pos = phrase_masks(ids, special)
    ttype = enc.get("token_type_ids")
    ttype = torch.zeros_like(ids) if ttype is None else ttype.long()
    return {"input_ids": ids[:, :text_len], "attention_mask": enc["attention_mask"][:, :text_len].bool(),
            "position_ids": pos[:, :text_len], "token_type_ids": ttype[:, :text_len],
            "text_token_mask": block[:, :text_len, :text_len]}


def _example(tokenizer, batch: int, hw: tuple[int, int], text_len: int, seed: int = 0,
             captions: list[str] | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, int(hw[0]), int(hw[1]), generator=g)
    caps = captions or [DUMMY_CAPTION] * batch
    t = text_inputs(tokenizer, caps, text_len)
    return (image,) + tuple(t[k] for k in INPUT_NAMES[1:])


def export_onnx(model: nn.Module, tokenizer, out_path: str | Path, input_hw: tuple[int, int], text_len: int,
                batch_size: int = -1, opset: int = MIN_OPSET, verbose: bool = False) -> Path:
    """Write ``model`` (eval mode) as ONNX to ``out_path`` atomically; checked with ``onnx.checker``."""
    H, W = check_export_args(opset, input_hw, size_hint=" in both dimensions")
    b = 1 if batch_size in (None, -1) else int(batch_size)
    return export_onnx_file(ExportWrapper(model), _example(tokenizer, b, (H, W), text_len), out_path, INPUT_NAMES,
                            output_names(model), opset=opset, dynamic_batch="batch_size" if batch_size in (None, -1) else None,
                            verbose=verbose)


def onnx_parity(model: nn.Module, onnx_path: str | Path, example: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Max |ONNX Runtime − PyTorch| per output on ``example`` (finite entries; a differing ±inf pattern → inf)."""
    return shared_parity(ExportWrapper(model), onnx_path, example, INPUT_NAMES, output_names(model))


def load_model_weights(model: nn.Module, checkpoint: str | Path, field: str = "export.checkpoint",
                       loader: Any = None, model_cfg: Any = None, quantized: tuple[str, ...] = ()) -> Any:
    """Load a whole trained model into ``model``: a tao-cli checkpoint or any whole-model layout of
    :func:`networks.mask_grounding_dino.weight_formats.formats` (file or Hugging Face directory), every model tensor present
    except parts the layout never has (reported).  ``loader(path) -> dict`` is the engine's safe loader
    (decryption, network tag check); ``quantized``: the quantize backends whose output is accepted
    (:func:`~networks.common.weight_formats.load_whole_model`).  Returns the load report."""
    from networks.common.weight_formats import load_whole_model
    from networks.mask_grounding_dino.weight_formats import formats

    return load_whole_model(model, checkpoint, formats(), model_cfg, field=field, loader=loader,
                            quantized=quantized)[0]


def run_export(cfg: Any, ctx: Any) -> dict[str, Any]:
    """The ``export`` action: build the model, load ``export.checkpoint``, write ``export.onnx_file``, then run
    it in onnxruntime on a random image + the dummy prompt and report the max abs difference per output."""
    from networks.mask_grounding_dino.model import build_model
    from networks.mask_grounding_dino.text import load_tokenizer

    ex = cfg.export
    model = build_model(cfg).eval()
    # a ModelOpt-quantized checkpoint exports as a QDQ graph (its quantizers become QuantizeLinear/DequantizeLinear)
    load_model_weights(model, ex.checkpoint, loader=getattr(ctx, "load_checkpoint", None), model_cfg=cfg.model,
                       quantized=("modelopt.pytorch",))
    tokenizer = load_tokenizer(cfg.model.text_encoder_type)
    T = int(cfg.model.max_text_len)
    out = export_onnx(model, tokenizer, ex.onnx_file, (ex.input_height, ex.input_width), T, ex.batch_size,
                      ex.opset_version, ex.verbose)
    b = 1 if ex.batch_size in (None, -1) else int(ex.batch_size)
    diffs = onnx_parity(model, out, _example(tokenizer, b, (ex.input_height, ex.input_width), T))
    batch = "batch_size" if ex.batch_size in (None, -1) else b
    inputs = {"inputs": [batch, 3, ex.input_height, ex.input_width], "input_ids": [batch, T],
              "attention_mask": [batch, T], "position_ids": [batch, T], "token_type_ids": [batch, T],
              "text_token_mask": [batch, T, T]}
    names = output_names(model)
    ctx.log.info("ONNX written to %s; inputs %s; outputs %s; onnxruntime max |diff| vs PyTorch: %s",
                 out, inputs, names, diffs)
    return {"onnx_file": str(out), "inputs": inputs, "outputs": names,
            "max_abs_diff": max(diffs.values()) if diffs else 0.0, "per_output_diff": diffs}
