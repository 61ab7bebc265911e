"""Evaluate / inference of Mask Grounding DINO from an ONNX file written by the ``export`` action (ONNX Runtime).

The graph is :mod:`networks.mask_grounding_dino.export`'s: the image ``inputs`` [B, 3, H, W] and five text
tensors [B, T] / [B, T, T] → ``pred_logits`` [B, Q, T], ``pred_boxes``, ``pred_masks`` (plus the ReLA outputs
when the model has that branch), with static H×W and T.  :func:`check_onnx_file` validates a file without
starting a session (spec load, ``--dry-run``); :class:`OnnxModel` runs it on an evaluation/inference batch (one
row per prompt chunk when the label map is longer than the window) and returns the outputs the PyTorch model
returns for post-processing, so :func:`~networks.mask_grounding_dino.chunking.merge_views` and
:func:`~networks.mask_grounding_dino.postprocess.postprocess` run unchanged.

Preprocessing: the batch is the PyTorch path's (eval resize, normalisation, padding to a multiple of 32, the
prompt tokenised and cut to ``model.max_text_len``).  Each image's un-padded part is resized bilinearly to the
graph's H×W (the graph has no pixel mask: every pixel is valid), and post-processing treats H×W as the image.
The text tensors are padded to T: padding tokens are masked out (``attention_mask`` False, a self-only row in
``text_token_mask``), as the exported prompt's own padding is, so they change no real token's output.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from networks.common.errors import ConfigError
from networks.common.onnx_runtime import OnnxGraphInfo, OnnxSession, describe_onnx, static_image_hw
from networks.mask_grounding_dino.export import INPUT_NAMES, OUTPUT_NAMES, RELA_OUTPUT_NAMES

__all__ = ["OnnxModel", "check_onnx_file", "text_feeds"]

_RESIZE_HINT = "set dataset.augmentation.test_random_resize / random_resize_max_size (evaluate) or " \
               "inference.input_width/input_height so they match"


def check_onnx_file(path: str | os.PathLike, max_text_len: int, field: str) -> OnnxGraphInfo:
    """:func:`describe_onnx`, then: TAO's six input names in order, outputs ``pred_logits, pred_boxes,
    pred_masks`` (optionally followed by the ReLA outputs), image input [B, 3, H, W] with static H and W, and a
    static text length equal to ``model.max_text_len``.  One-line :class:`ConfigError` on ``field``."""
    info = describe_onnx(path, field)
    if list(info.inputs) != INPUT_NAMES:
        raise ConfigError(field, f"{path} has inputs {list(info.inputs)}, not a Mask Grounding DINO export's "
                          f"{INPUT_NAMES}", "point it at the .onnx file written by mask_grounding_dino export")
    outputs = list(info.output_names)
    if outputs not in (OUTPUT_NAMES, OUTPUT_NAMES + RELA_OUTPUT_NAMES):
        raise ConfigError(field, f"{path} has outputs {outputs}, expected {OUTPUT_NAMES} (+ {RELA_OUTPUT_NAMES} "
                          "with the ReLA branch)")
    static_image_hw(info, path, field)
    t = info.inputs["input_ids"][-1] if len(info.inputs["input_ids"]) == 2 else None
    if not isinstance(t, int) or t <= 0:
        raise ConfigError(field, f"{path}: input_ids has shape {list(info.inputs['input_ids'])}, expected [B, T] "
                          "with a static T")
    if t != int(max_text_len):
        raise ConfigError(field, f"{path} was exported with {t} text tokens, but model.max_text_len is "
                          f"{max_text_len}", f"set model.max_text_len={t} (the export's) or export again")
    return info


def text_feeds(batch: dict, text_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The graph's five text inputs for the batch's tokens [B, L] (L <= ``text_len``), padded to ``text_len``:
    ``input_ids`` with ``pad_id``, masks False (a padding token attends only to itself, as in the export's
    own prompt), positions and token types 0."""
    ids = batch["input_ids"]
    B, L = ids.shape
    T = int(text_len)
    if L > T:
        raise ValueError(f"the batch's prompt has {L} tokens, more than the graph's {T}")
    out_ids = torch.full((B, T), int(pad_id), dtype=torch.int64)
    out_ids[:, :L] = ids.cpu()
    attn = torch.zeros(B, T, dtype=torch.bool)
    attn[:, :L] = batch["attention_mask"].cpu().bool()
    pos = torch.zeros(B, T, dtype=torch.int64)
    pos[:, :L] = batch["position_ids"].cpu()
    ttype = torch.zeros(B, T, dtype=torch.int64)
    ttype[:, :L] = batch["token_type_ids"].cpu()
    block = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    block[:, :L, :L] = batch["text_self_attention_masks"].cpu().bool()
    return {"input_ids": out_ids.numpy(), "attention_mask": attn.numpy(), "position_ids": pos.numpy(),
            "token_type_ids": ttype.numpy(), "text_token_mask": block.numpy()}


class OnnxModel(OnnxSession):
    """An ONNX Runtime session over a Mask Grounding DINO export: ``batch -> outputs`` as the PyTorch model's
    evaluation forward returns them (``pred_logits``, ``pred_boxes``, ``pred_masks``, ReLA outputs when the
    graph has them, and ``text_token_mask`` — the batch's own padding mask), torch tensors on the batch's
    device.  Post-processing must use :attr:`hw` as every image's un-padded and padded size."""

    def __init__(self, path: str | os.PathLike, max_text_len: int, pad_id: int = 0, want_gpu: bool = False,
                 field: str = "onnx_file"):
        super().__init__(path, check_onnx_file(path, max_text_len, field), want_gpu=want_gpu, field=field)
        self.text_len = int(self.info.inputs["input_ids"][-1])
        self.pad_id = int(pad_id)

    def feeds(self, batch: dict) -> dict[str, np.ndarray]:
        """All six graph inputs of ``batch`` (see the module docstring)."""
        feeds = {"inputs": self.prepare_images(batch["images"], batch["image_sizes"], _RESIZE_HINT)}
        feeds.update(text_feeds(batch, self.text_len, self.pad_id))
        return feeds

    def __call__(self, batch: dict) -> dict[str, Any]:
        device = batch["images"].device
        got = self.run(self.feeds(batch))
        out: dict[str, Any] = {n: torch.from_numpy(np.ascontiguousarray(v)).to(device) for n, v in got.items()}
        out["text_token_mask"] = batch["attention_mask"].bool()
        return out
