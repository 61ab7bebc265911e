"""The ``quantize`` action of Mask Grounding DINO: static int8 post-training quantization of the exported ONNX
file with ONNX Runtime, written as a QDQ graph (:mod:`networks.common.onnx_quantize` does the shared work).

Inputs: ``quantize.model_path`` (the fp32 ONNX written by ``export``) and the first ``quantize.calib_images``
images of ``dataset.quant_calibration_data_sources`` (``image_dir`` and a COCO ``json_file`` whose categories
are the prompt), through exactly what ``evaluate`` from an ONNX file feeds the graph: the eval resize and
normalisation, the prompt tokenised (split into chunks when longer than the window, one graph row per chunk),
then :meth:`OnnxModel.feeds` (image resized to the graph's H×W, text padded to its T).

Kept in fp32 by default (:data:`FP32_RULES`; TAO names no layers for this network, so the choice follows where
int8 error is not averaged away):

* the text encoder's attention softmaxes and layer norms (``/model/bert/``): token features feed the
  contrastive class logits directly, and BERT's softmax/LayerNorm inputs have outliers that one per-tensor
  int8 scale cannot hold;
* every ``GridSample`` (deformable attention sampling): it reads the feature maps at predicted sub-pixel
  locations, and quantized sampling grids move the sample, not just its value;
* the heads' last layers: the contrastive class embedding (``class_embed``, a query × text product whose
  logits are thresholded directly), the last box-MLP layer (``bbox_embed.*/layers.2``, normalised coordinates
  where 1/256 is a pixel error at every size), the dynamic-mask controller (``controller``, whose outputs are the
  mask head's convolution weights) and the nodes directly under ``/model/`` (query selection, the CondInst
  dynamic mask head whose MatMul weights are activations, and the output glue).

``quantize.skip_names`` adds substrings.  ``backend: onnxruntime`` (or ``modelopt.onnx``: NVIDIA ModelOpt, whose
``skip_names`` are also ``re.match`` patterns) + ``mode: static_ptq`` runs as above;
``backend: torchao`` + ``mode: weight_only_ptq`` (TAO's default) gives the trained checkpoint
``quantize.model_path`` int8 ``nn.Linear`` weights instead (:mod:`networks.common.torchao_quantize`; no
calibration), and ``backend: modelopt.pytorch`` + ``mode: static_ptq`` ModelOpt's simulated-int8 quantizers,
calibrated on the same images (:mod:`networks.common.modelopt_torch`).  :func:`check_quantize` refuses every
other combination at load (``--dry-run`` included).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from networks.common.errors import ConfigError
from networks.common.onnx_quantize import (
    calibration_count,
    calibration_order,
    check_quantize_section,
    match_nodes,
    run_static_ptq,
)
from networks.common.torch_quantize import PYTORCH_BACKENDS, run_checkpoint_quantize

__all__ = ["FP32_RULES", "check_quantize", "excluded_nodes", "run_quantize"]

_CALIB = "dataset.quant_calibration_data_sources"
#: (name substring, operator names) → nodes kept in fp32: a node matches when its name contains the substring
#: and (when operators are given) its last path part starts with one of them.  See the module docstring.
FP32_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/model/bert/", ("Softmax", "LayerNormalization")),
    ("GridSample", ()),
    ("class_embed", ()),
    ("bbox_embed.0/layers.2", ()),
    ("bbox_embed/layers.2", ()),
    ("/model/controller/", ()),
)
#: nodes whose name is ``/model/<op>`` (no sub-module): query selection, the dynamic mask head, output glue
TOP_LEVEL = "/model/"


def _rule_matches(name: str, sub: str, ops: tuple[str, ...]) -> bool:
    return sub in name and (not ops or name.rsplit("/", 1)[-1].startswith(ops))


def excluded_nodes(node_names: list[str], skip_names: list[str], default: bool = True) -> list[str]:
    """Names of the nodes to keep in fp32, in graph order: those containing a ``skip_names`` substring and, with
    ``default``, those matching :data:`FP32_RULES` or directly under :data:`TOP_LEVEL`."""
    skipped = set(match_nodes(node_names, skip_names))
    out = []
    for n in node_names:
        top = n.startswith(TOP_LEVEL) and n.count("/") == 2
        if n in skipped or default and (top or any(_rule_matches(n, s, ops) for s, ops in FP32_RULES)):
            out.append(n)
    return out


def _check_calibration_source(cfg: Any) -> None:
    src = cfg.dataset.quant_calibration_data_sources
    if src and src.get("image_dir") and not src.get("json_file"):
        raise ConfigError(f"{_CALIB}.json_file", "is empty", "give a COCO file of the calibration images: its "
                          "categories are the prompt the graph is calibrated with (the evaluation file works)")


def check_quantize(cfg: Any) -> None:
    """:func:`~networks.common.onnx_quantize.check_quantize_section` with this network's export check (against
    ``model.max_text_len``) and ``dataset.quant_calibration_data_sources`` (image_dir and json_file)."""
    from networks.mask_grounding_dino.onnx_runtime import check_onnx_file

    src = cfg.dataset.quant_calibration_data_sources
    check_quantize_section(cfg.quantize, lambda path, field: check_onnx_file(path, int(cfg.model.max_text_len),
                                                                            field),
                           f"{_CALIB}.image_dir", src.get("image_dir") if src else None)
    if str(cfg.quantize.backend) != "torchao":
        _check_calibration_source(cfg)


def _calibration_rows(cfg: Any, count: int) -> tuple[Any, Any, Any, int]:
    """(calibration dataset through evaluate's transform, its collator (prompt chunks as rows), tokenizer, images
    used): the first ``count`` images of ``dataset.quant_calibration_data_sources``."""
    from networks.mask_grounding_dino.data import Collator, Transform, eval_dataset
    from networks.mask_grounding_dino.text import load_tokenizer

    src = cfg.dataset.quant_calibration_data_sources
    tokenizer = load_tokenizer(cfg.model.text_encoder_type)
    dataset = eval_dataset(src, _CALIB, Transform(cfg.dataset.augmentation, "eval"))
    collate = Collator(tokenizer, int(cfg.model.max_text_len), chunk=True)
    return dataset, collate, tokenizer, calibration_count(count, len(dataset), src.get("image_dir"))


def _calibration_batches(cfg: Any, model_path: str, count: int) -> tuple[Callable[[], Iterator[dict]], int]:
    """(function giving an iterator of graph feeds at each call, number of images used): the first ``count``
    calibration images (:func:`_calibration_rows`) through :meth:`OnnxModel.feeds`; a graph with a fixed batch B
    gets whole batches of rows (prompt chunks of the same image are rows too)."""
    from networks.mask_grounding_dino.onnx_runtime import OnnxModel

    dataset, collate, tokenizer, used = _calibration_rows(cfg, count)
    head = OnnxModel(model_path, int(cfg.model.max_text_len), int(tokenizer.pad_token_id or 0),
                     field="quantize.model_path")
    rows: list[dict[str, np.ndarray]] = []
    for i in range(used):  # one image at a time: each is its own padded batch, as at evaluate batch size 1
        feeds = head.feeds(collate([dataset[i]]))
        rows += [{k: v[r:r + 1] for k, v in feeds.items()} for r in range(next(iter(feeds.values())).shape[0])]
    step = head.batch or 1
    order = calibration_order(len(rows), step)

    def batches() -> Iterator[dict]:
        for start in range(0, len(order), step):
            part = [rows[j] for j in order[start:start + step]]
            yield {k: np.concatenate([p[k] for p in part]) for k in part[0]}

    return batches, used


def _torch_calibration(cfg: Any, count: int) -> Callable[[Any, Any], int]:
    """``calibrate(model, device) -> images used`` for backend modelopt.pytorch: the model run on the first
    ``count`` calibration images (:func:`_calibration_rows`), one image (all its prompt chunks) at a time."""
    from networks.mask_grounding_dino.module import TEXT_KEYS

    dataset, collate, _, used = _calibration_rows(cfg, count)

    def calibrate(model: Any, device: Any) -> int:
        for i in range(used):
            batch = collate([dataset[i]])
            model(batch["images"].to(device), batch["pixel_mask"].to(device),
                  *[batch[k].to(device) for k in TEXT_KEYS])
        return used

    return calibrate


def run_quantize(cfg: Any, ctx: Any) -> dict[str, Any]:
    """``tao model mask_grounding_dino quantize``: :func:`check_quantize` (also when called directly), then
    :func:`~networks.common.onnx_quantize.run_static_ptq` with :func:`excluded_nodes` and this network's
    calibration feeds; returns what status.json records."""
    check_quantize(cfg)
    if str(cfg.quantize.backend) in PYTORCH_BACKENDS:
        from networks.mask_grounding_dino.export import load_model_weights
        from networks.mask_grounding_dino.model import build_model

        model = build_model(cfg).eval()
        load_model_weights(model, cfg.quantize.model_path, field="quantize.model_path", loader=ctx.load_checkpoint,
                           model_cfg=cfg.model)
        return run_checkpoint_quantize(cfg.quantize, ctx, model, "mask_grounding_dino", "model.",
                                       lambda: _torch_calibration(cfg, int(cfg.quantize.calib_images)))
    skip = list(cfg.quantize.skip_names)
    rules = [f"{s} ({'/'.join(ops)})" if ops else s for s, ops in FP32_RULES]
    return run_static_ptq(
        cfg.quantize, ctx, lambda names: excluded_nodes(names, skip),
        lambda path: _calibration_batches(cfg, path, int(cfg.quantize.calib_images)),
        str(cfg.dataset.quant_calibration_data_sources.get("image_dir")),
        [*rules, f"directly under {TOP_LEVEL} (query selection, dynamic mask head)"],
        "text-encoder softmax/LayerNorm, GridSample, the heads' last layers")
