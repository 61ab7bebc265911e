"""Mask2Former LightningModule: training losses, optimiser/schedule, evaluation metrics and inference outputs.

* Training: ``criterion`` terms weighted here (the one place; ``class_weight``, ``mask_weight``,
  ``dice_weight`` for the final and every aux prediction); every term is logged (``train/<term>``), plus ``train/loss``.
* Optimiser (TAO / original ``train_net.py``): AdamW (or SGD), backbone lr × ``backbone_multiplier``, weight
  decay 0 for norm layers, embeddings, ``relative_position_bias_table`` and ``absolute_pos_embed``.
  Schedules: ``MultiStep`` (milestones in epochs) or ``WarmupPoly`` (per step, ``(1 - it/max_it)^0.9``, no
  warmup as TAO) where ``max_it`` is the real number of optimiser steps (after distributed sharding) — TAO counts
  before sharding and under-decays on several GPUs.  Gradient clipping is the Trainer's (engine) business.
* Evaluation (validate/test): losses, then post-processing at the **original image resolution**; metrics:
  mIoU / pixel accuracy in every mode (``mIoU``, ``ACC_all`` = TAO's name, ``pixel_accuracy``), plus PQ/SQ/RQ
  (panoptic) or COCO mask AP (instance).  Per-image results are gathered to every rank and de-duplicated by
  image id (the distributed sampler repeats images to even out ranks) before the metrics are computed.
* Inference: overlay PNGs plus machine-readable results under ``ctx.run_dir`` (see :meth:`predict_step`).
* Runtimes: evaluate/inference run the PyTorch model, or — with ``<action>.onnx_file`` — an exported ONNX file
  under ONNX Runtime (:class:`~networks.mask2former.onnx_runtime.OnnxHead`, no PyTorch model is built), or — with
  ``<action>.trt_engine`` — a TensorRT engine (:class:`~networks.mask2former.tensorrt.TrtHead`, same calls).  All
  produce TAO's export outputs (:func:`~networks.mask2former.postprocess.head_outputs`) and share everything
  after them (:func:`~networks.mask2former.postprocess.finish_image`, metrics, files).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl  # type: ignore

from networks.common.context import run_output_dir
from networks.common.distributed import gather_dict, gather_unique, is_rank_zero
from networks.common.errors import ConfigError
from networks.common.network import TrainerTraits
from networks.common.train_logging import MONITOR_METRICS, log_train_losses
from networks.common.weights import freeze_modules
from networks.mask2former.criterion import Mask2FormerCriterion, loss_weights
from networks.mask2former.data import LabelMap, load_label_map
from networks.mask2former.postprocess import HEAD_OUTPUTS, eval_extras, finish_image, head_outputs
from networks.ops.losses import weighted_sum
from networks.ops.matcher import HungarianMatcher, mask2former_cost_terms
from networks.ops.optim import fused_option

__all__ = ["Mask2FormerModule", "load_pretrained_model", "load_detectron2_pkl", "param_groups", "freeze_modules"]

log = logging.getLogger(__name__)

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


# ------------------------------------------------------------------------------------------- helpers
def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_multiplier: float) -> list[dict]:
    """Trainable parameters bucketed into (lr, weight_decay) groups, as TAO's per-tensor rules.

    lr × ``backbone_multiplier`` for parameters of modules whose name contains ``backbone``; weight decay 0 for
    norm layers, ``nn.Embedding`` and the Swin position tables.  Each group has a ``name`` for logging.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_backbone = "backbone" in module_name
            no_decay = isinstance(module, (*_NORM_TYPES, nn.Embedding)) or any(n in pname for n in _NO_DECAY_NAMES)
            buckets.setdefault((is_backbone, no_decay), []).append(p)
    groups = []
    for (is_backbone, no_decay), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        groups.append({
            "params": params,
            "lr": lr * (backbone_multiplier if is_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'backbone' if is_backbone else 'head'}{'_no_decay' if no_decay else ''}",
        })
    return groups


def load_detectron2_pkl(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a detectron2 ``.pkl`` (original Mask2Former model zoo), in tao-cli/TAO key and class layout.

    Read without running code (:func:`networks.common.weight_formats.read_source`: numpy arrays only, anything
    else raises :class:`CheckpointError`), converted by the ``detectron2`` format: ``static_query`` becomes
    ``query_feat`` and the class head rows are rolled so that no-object is index 0.
    """
    from networks.common.weight_formats import read_source
    from networks.mask2former.weight_formats import formats

    src = read_source(path, field="train.pretrained_model_path")
    fmt = next(f for f in formats() if f.name == "detectron2")
    return fmt.to_state_dict(src, None)


def _backbone_cfg(model: nn.Module, model_cfg: Any) -> Any:
    """``model_cfg``, or (without a spec) the window size of ``model.backbone`` in spec shape."""
    if model_cfg is not None:
        return model_cfg
    return {"backbone": {"swin": {"window_size": int(model.backbone.layers[0].window_size)}}}


def load_pretrained_model(model: nn.Module, path: str | Path, model_cfg: Any = None, *,
                          field: str = "train.pretrained_model_path", weights_format: str | None = None) -> Any:
    """Load ``train.pretrained_model_path`` into ``model`` in any format of
    :func:`networks.mask2former.weight_formats.formats` (auto-detected, or ``weights_format`` by name).

    Full-model formats fill ``model``; a Swin backbone release fills ``model.backbone`` (the head and the
    per-stage norms are reported as newly initialised).
    ``model_cfg`` (the spec's ``model`` section) lets the ``hf`` format check ``config.json`` against the spec.
    The class head and query embeddings are re-initialised (and reported) when their sizes differ; any other
    missing, unexpected or shape-mismatched key raises :class:`CheckpointError`.  Returns the
    :class:`~networks.common.weights.LoadReport` (``mismatched`` lists the re-initialised tensors).
    """
    from networks.common.weight_formats import detect_format, load_converted, read_source
    from networks.mask2former.weight_formats import formats

    src = read_source(path, field=field)
    fmt = detect_format(src, formats(), forced=weights_format, field=field)
    report = load_converted(model, src, fmt, _backbone_cfg(model, model_cfg) if fmt.part == "backbone" else model_cfg)
    if report.mismatched:
        log.info("Re-initialised %s: the file's shapes %s differ from the model's %s (another number of classes "
                 "or queries).", ", ".join(m[0] for m in report.mismatched),
                 [m[1] for m in report.mismatched], [m[2] for m in report.mismatched])
    log.info(report.summary(f"{path} ({fmt.name})"))
    return report


# -------------------------------------------------------------------------------------------- module
class Mask2FormerModule(pl.LightningModule):
    """Mask2Former train/evaluate/inference logic around a :class:`~networks.mask2former.model.Mask2FormerModel`.

    Args:
        cfg: the validated spec (``DictConfig``).
        ctx: the engine's :class:`~networks.common.context.RunContext` (or None in tests).
        model: a built model (default: ``build_model(cfg.model)``).
        label_map: classes (default: read from ``dataset.label_map`` when set).
    """

    def __init__(self, cfg: Any, ctx: Any = None, model: nn.Module | None = None,
                 label_map: LabelMap | None = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        from networks.mask2former.config import clip_norm_type

        #: norm of gradient clipping (``train.clip_grad_norm_type``; read by :meth:`configure_gradient_clipping`)
        self.clip_norm_type = clip_norm_type(cfg.train.clip_grad_norm_type)
        # TAO: plain DDP with activation checkpointing, else find_unused_parameters (e.g. frozen parts).
        self.trainer_traits = TrainerTraits(find_unused_parameters=not bool(cfg.train.activation_checkpoint))
        mc = cfg.model
        from networks.mask2former.onnx_runtime import onnx_file_of

        #: the ONNX Runtime head when ``<action>.onnx_file`` is set (then there is no PyTorch model)
        self.onnx = None
        action = getattr(ctx, "action", None)
        onnx_file = onnx_file_of(cfg, action) if model is None else None
        trt_engine = onnx_file_of(cfg, action, "trt_engine") if model is None else None
        if onnx_file:
            from networks.mask2former.onnx_runtime import OnnxHead

            self.onnx = OnnxHead(onnx_file, str(mc.mode), want_gpu=getattr(ctx, "accelerator", None) == "gpu",
                                 field=f"{ctx.action}.onnx_file")
            self.onnx.log_start(log)
        elif trt_engine:
            from networks.mask2former.tensorrt import TrtHead

            # a TensorRT engine takes the ONNX head's place: same inputs, outputs and post-processing
            self.onnx = TrtHead(trt_engine, str(mc.mode), field=f"{action}.trt_engine")
            self.onnx.log_start(log)
        elif model is None:
            from networks.mask2former.model import build_model

            model = build_model(mc, activation_checkpoint=bool(cfg.train.activation_checkpoint))
        self.model = model
        mf = mc.mask_former
        self.num_classes = int(mc.sem_seg_head.num_classes)
        matcher = HungarianMatcher(mask2former_cost_terms(mf.class_weight, mf.mask_weight, mf.dice_weight,
                                                          mf.train_num_points))
        self.criterion = Mask2FormerCriterion(self.num_classes, matcher, mf.no_object_weight, mf.train_num_points,
                                              mf.oversample_ratio, mf.importance_sample_ratio, mf.deep_supervision)
        num_aux = max(int(mf.dec_layers) - 1, 0) if mf.deep_supervision else 0
        self.loss_weights = loss_weights(mf.class_weight, mf.mask_weight, mf.dice_weight, num_aux)
        if label_map is None and cfg.dataset.label_map:
            label_map = load_label_map(cfg.dataset.label_map, self.num_classes, cfg.dataset.contiguous_id)
        self.label_map = label_map
        self.kpi: dict[str, float] = {}
        self.outputs: dict[str, Any] = {}
        self._eval_records: dict[Any, dict] = {}
        self._predictions: list[dict] = []
        action = getattr(ctx, "action", None)
        if action == "train":
            frozen = freeze_modules(self.model, list(cfg.train.freeze or []),
                                    example="backbone, sem_seg_head.pixel_decoder")
            if frozen:
                log.info("Froze modules: %s", frozen)
            if not getattr(ctx, "resuming", False):
                self._load_pretrained()

    # -- weights -------------------------------------------------------------------------------------
    def _load_pretrained(self) -> None:
        tr = self.cfg.train
        if tr.pretrained_model_path:
            # As TAO: full-model weights take precedence over the backbone file.
            load_pretrained_model(self.model, tr.pretrained_model_path, self.cfg.model)
        elif self.cfg.model.backbone.pretrained_weights:
            from networks.mask2former.model import load_backbone_weights

            load_backbone_weights(self.model, self.cfg.model.backbone.pretrained_weights, self.cfg.model)

    # -- training ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """Model forward: images [B, 3, H, W] normalised and padded → model outputs."""
        return self.model(images)

    def _weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(losses, self.loss_weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Weighted loss of one batch; logs ``train/loss`` and every term (``train/loss_ce``, ``train/loss_ce_0``, ...)
        per step, ``train/loss_epoch`` (epoch mean), ``train/lr`` (head) and ``train/lr_backbone``."""
        outputs = self.model(batch["images"])
        losses = self.criterion(outputs, batch["targets"])
        for k, v in losses.items():
            if not torch.isfinite(v):
                raise FloatingPointError(f"Mask2Former loss term '{k}' is {v.item()} at step {self.global_step}; "
                                         "lower train.optim.lr, use fp32/bf16, or check the data")
        total = self._weighted(losses)
        bs = len(batch["targets"])
        log_train_losses(self, total, losses, bs)
        opt = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        if opt is not None:
            self.log("train/lr", opt.param_groups[-1]["lr"], on_step=True, on_epoch=False, batch_size=bs)
            self.log("train/lr_backbone", opt.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=bs)
        return total

    def configure_optimizers(self):
        """AdamW/SGD over :func:`param_groups`, with a MultiStep (per epoch) or WarmupPoly (per step) schedule."""
        o = self.cfg.train.optim
        groups = param_groups(self.model, o.lr, o.weight_decay, o.backbone_multiplier)
        fused = fused_option(groups, getattr(self._trainer, "precision", None))
        if o.type.lower() == "sgd":
            optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **fused)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, **fused)
        if o.lr_scheduler.lower() == "warmuppoly":
            max_iter = self._poly_max_iter()
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda it: max(1.0 - min(it, max_iter) / max_iter, 0.0) ** 0.9)
            interval = "step"
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(o.milestones),
                                                             gamma=o.gamma)
            interval = "epoch"
        # TAO returns optim.monitor_name as the scheduler's monitor (what a ReduceLROnPlateau-style scheduler
        # would watch), under this project's metric names.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval,
                                                         "monitor": MONITOR_METRICS[o.monitor_name]}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the global gradient norm at ``train.clip_grad_norm`` (the Trainer's ``gradient_clip_val``) in the
        norm of ``train.clip_grad_norm_type`` (2 = L2, ``inf`` = max-abs), which Lightning's own clipping cannot
        choose (always L2)."""
        if not gradient_clip_val:
            return
        if self.clip_norm_type == 2.0:  # Lightning's own L2 clipping (strategy-aware, e.g. FSDP's sharded norm)
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val), norm_type=self.clip_norm_type)

    def _poly_max_iter(self) -> int:
        tr = self.cfg.train
        if tr.iters_per_epoch:
            return int(tr.iters_per_epoch) * int(tr.num_epochs) + 1
        steps = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        if not math.isfinite(steps):
            raise ConfigError("train.iters_per_epoch", "cannot infer the number of steps for WarmupPoly",
                              "set train.iters_per_epoch")
        return int(steps) + 1

    # -- evaluation ----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_records = {}

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()
        self._overlays = self._overlay_writer()

    def _overlay_writer(self):
        """Writer of ``<run_dir>/overlays/<image>.png`` (ground truth | prediction) for the first
        ``evaluate.num_overlays`` images; disabled without a run directory."""
        from networks.common.visualize import SideBySideWriter

        run_dir = getattr(self.ctx, "run_dir", None)
        num = int(self.cfg.evaluate.get("num_overlays", 0) or 0) if "evaluate" in self.cfg else 0
        return SideBySideWriter(Path(run_dir) / "overlays" if run_dir is not None else None, num)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss (``val/loss``) and per-image results at the original resolution for the metrics."""
        self._eval_step(batch, "val/loss")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """As :meth:`validation_step` (``evaluate`` runs on ``dataset.val``)."""
        results = self._eval_step(batch, "test/loss")
        overlays = getattr(self, "_overlays", None)
        if overlays is not None and overlays.wanted and results is not None:
            for i, gt in enumerate(batch["gts"]):
                if gt is not None and overlays.wanted:
                    left, right = self._eval_pictures(batch, i, results[i])
                    overlays.add(batch["image_ids"][i], batch["file_names"][i], left, right)

    def _eval_pictures(self, batch: dict, i: int, result: dict) -> tuple[np.ndarray, np.ndarray]:
        """(ground truth, prediction) pictures of image ``i`` at its original resolution; the image is the
        un-normalised network input resized back."""
        from PIL import Image

        from networks.common.visualize import denormalize
        from networks.mask2former.visualize import draw_segments, ground_truth_segments

        ds = self.cfg.dataset
        h, w = (int(v) for v in batch["image_sizes"][i])
        H0, W0 = (int(v) for v in batch["orig_sizes"][i])
        image = denormalize(batch["images"][i][:, :h, :w], ds.pixel_mean, ds.pixel_std)
        if (h, w) != (H0, W0):
            image = np.asarray(Image.fromarray(image).resize((W0, H0), Image.BILINEAR))
        gt_masks, gt_classes = ground_truth_segments(batch["gts"][i], self.cfg.model.mode, self.label_map)
        left = draw_segments(image, gt_masks, gt_classes, self.label_map, self.num_classes)
        masks, classes, scores = self._shown_segments(result)
        right = draw_segments(image, masks, classes, self.label_map, self.num_classes, scores)
        return left, right

    def _shown_segments(self, result: dict) -> tuple[list[np.ndarray], list[int], list[float] | None]:
        """(masks, class indices, scores or None) that pictures show of one image's results: the semantic map
        split by class; the panoptic segments; the instances scoring above ``object_mask_threshold``."""
        mode = self.cfg.model.mode
        if mode == "semantic":
            sem = result["semantic"].cpu().numpy()
            classes = [int(c) for c in np.unique(sem)]
            return [sem == c for c in classes], classes, None
        if mode == "panoptic":
            pan = result["panoptic"].cpu().numpy()
            segs = result["segments"]
            return [pan == s["id"] for s in segs], [int(s["category"]) for s in segs], [float(s["score"]) for s in segs]
        inst = result["instances"]
        shown = [(m.cpu().numpy(), int(lab), float(s)) for m, s, lab in
                 zip(inst["masks"], inst["scores"].tolist(), inst["labels"].tolist(), strict=True)
                 if s > float(self.cfg.model.object_mask_threshold)]
        return [m for m, _, _ in shown], [c for _, c, _ in shown], [s for _, _, s in shown]

    def _thing_classes(self, device) -> torch.Tensor | None:
        if self.label_map is None:
            return None
        return torch.as_tensor(self.label_map.thing_classes(), device=device)

    def _category_id(self, class_index: int) -> int:
        return self.label_map.category_id(class_index) if self.label_map is not None else int(class_index)

    def _head(self, batch: dict, evaluating: bool = False) -> tuple[dict | None, dict[str, torch.Tensor], list]:
        """(model outputs or None, TAO's export outputs of the batch, per-image un-padded size in those maps).

        PyTorch: the model, then :func:`head_outputs` at the padded input size, plus the :func:`eval_extras` that
        keep the original panoptic test and (``evaluating``) TAO's mIoU in every mode.  ONNX: the graph (its own H×W,
        which is then each image's size)."""
        images = batch["images"]
        if self.onnx is not None:
            return None, self.onnx(images, batch["image_sizes"]), [self.onnx.hw] * images.shape[0]
        outputs = self.model(images)
        mc = self.cfg.model
        hw = tuple(images.shape[-2:])
        head = dict(zip(HEAD_OUTPUTS[mc.mode], head_outputs(mc.mode, outputs["pred_logits"], outputs["pred_masks"],
                                                             hw, int(mc.test_topk_per_image)), strict=True))
        head.update(eval_extras(mc.mode, outputs["pred_logits"], outputs["pred_masks"], hw,
                                float(mc.object_mask_threshold), semantic=evaluating))
        return outputs, head, list(batch["image_sizes"])

    def _finish(self, head: dict[str, torch.Tensor], i: int, image_hw, orig_hw, thing: torch.Tensor | None,
                semantic: bool) -> dict[str, Any]:
        """Image ``i``'s results at its original resolution (:func:`finish_image` with the spec's thresholds;
        thing-only instances and stuff merging when the label map has stuff classes)."""
        mc = self.cfg.model
        has_stuff = self.label_map is not None and self.label_map.has_stuff()
        return finish_image(mc.mode, {k: v[i] for k, v in head.items()}, image_hw, orig_hw,
                            num_classes=self.num_classes, object_mask_threshold=float(mc.object_mask_threshold),
                            overlap_threshold=float(mc.overlap_threshold), topk=int(mc.test_topk_per_image),
                            thing_classes=thing if has_stuff else None, semantic=semantic)

    def _eval_step(self, batch: dict, loss_name: str) -> list[dict | None] | None:
        """Loss (PyTorch runtime only) and metric records of one batch; returns each image's results (None for
        an image without ground truth; None for the whole batch during the sanity check)."""
        outputs, head, sizes = self._head(batch, evaluating=True)
        if outputs is not None:
            losses = self.criterion(outputs, batch["targets"])
            if self._trainer is not None:
                self.log(loss_name, self._weighted(losses), on_step=False, on_epoch=True, sync_dist=True,
                         batch_size=len(batch["targets"]))
                if self.trainer.sanity_checking:
                    return None
        from networks.common.coco_io import mask_to_rle

        mode = self.cfg.model.mode
        C = self.num_classes
        thing = self._thing_classes(batch["images"].device)
        # TAO's mIoU needs the class-probability map: the semantic graph's output, or the PyTorch extras.  A
        # panoptic/instance ONNX graph lacks it, so there mIoU and pixel accuracy are not computed (None).
        semantic = mode == "semantic" or "semantic_probs" in head
        results: list[dict | None] = []
        for i, gt in enumerate(batch["gts"]):
            if gt is None:
                results.append(None)
                continue
            res = self._finish(head, i, sizes[i], batch["orig_sizes"][i], thing, semantic=semantic)
            results.append(res)
            rec: dict[str, Any] = {}
            if semantic:
                sem = res["semantic"] - 1
                gt_sem = torch.as_tensor(gt["sem_seg"], device=sem.device) - 1
                valid = (gt_sem >= 0) & (gt_sem < C)
                counts = torch.bincount(gt_sem[valid] * C + sem[valid], minlength=C * C)
                nz = torch.nonzero(counts).flatten()
                rec["conf"] = (nz.cpu().numpy(), counts[nz].cpu().numpy())
            if mode == "panoptic":
                rec["pq"] = self._panoptic_stats(gt, res["panoptic"].cpu().numpy(), res["segments"],
                                                 batch["image_ids"][i])
            elif mode == "instance":
                inst = res["instances"]
                image_id = batch["image_ids"][i]
                rec["dets"] = [{"image_id": image_id, "category_id": self._category_id(int(lab)),
                                "score": float(s), "segmentation": mask_to_rle(m.cpu().numpy())}
                               for m, s, lab in zip(inst["masks"], inst["scores"], inst["labels"], strict=False)]
                rec["gt_instances"] = gt["instances"]
                rec["image"] = {"id": image_id, "height": gt["height"], "width": gt["width"],
                                "file_name": batch["file_names"][i]}
            self._eval_records[batch["image_ids"][i]] = rec
        return results

    def _categories(self) -> list[dict]:
        if self.label_map is not None:
            return self.label_map.coco_categories()
        return [{"id": k, "name": str(k), "isthing": 1} for k in range(1, self.num_classes + 1)]

    def _panoptic_stats(self, gt: dict, pan: np.ndarray, segs: list[dict], image_id: Any) -> dict:
        from networks.common.metrics import PanopticQuality

        pq = PanopticQuality(self._categories())
        pred_segments = [{"id": s["id"], "category_id": self._category_id(s["category"]),
                          "isthing": int(s["isthing"])} for s in segs]
        pq.update(gt["pan_ids"], gt["segments"], pan, pred_segments, image=image_id)
        return {cid: st for cid, st in pq.stats.items() if st["tp"] or st["fp"] or st["fn"]}

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        self._finish_eval()

    def on_test_epoch_end(self) -> None:
        self._finish_eval()
        overlays = getattr(self, "_overlays", None)
        if overlays is not None:
            written = overlays.finish()
            if written:
                log.info("Wrote %d ground truth | prediction pictures to %s", len(written), written[0].parent)

    def _finish_eval(self) -> None:
        from networks.common.metrics import (
            PanopticQuality,
            as_metrics,
            coco_mask_ap,
            defined_metrics,
            format_metrics,
            miou_from_confusion,
        )

        merged = gather_dict(self._eval_records)  # one record per image, in image-id order
        self._eval_records = {}
        C = self.num_classes
        conf = np.zeros(C * C, dtype=np.int64)
        with_conf = [rec["conf"] for rec in merged.values() if "conf" in rec]
        for idx, cnt in with_conf:
            conf[idx] += cnt
        sem = miou_from_confusion(conf.reshape(C, C)) if with_conf or not merged else \
            {"mIoU": None, "pixel_accuracy": None}
        if merged and not with_conf:
            log.info("mIoU and pixel accuracy are not computed: a %s-mode ONNX graph has no class-probability "
                     "map (TAO's export outputs); evaluate the checkpoint or a semantic-mode graph for them",
                     self.cfg.model.mode)
        kpi = {"mIoU": sem["mIoU"], "ACC_all": sem["pixel_accuracy"], "pixel_accuracy": sem["pixel_accuracy"]}
        mode = self.cfg.model.mode
        if mode == "panoptic" and merged:
            pq = PanopticQuality(self._categories())
            for rec in merged.values():
                for cid, st in rec.get("pq", {}).items():
                    for k in st:
                        pq.stats[cid][k] += st[k]
            res = pq.compute()
            kpi.update({k: res[k] for k in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th",
                                            "PQ_st", "SQ_st", "RQ_st")})  # None for an empty thing/stuff group
        elif mode == "instance" and merged:
            images, gts, dets = [], [], []
            for rec in merged.values():
                images.append(rec["image"])
                dets.extend(rec["dets"])
                for a in rec["gt_instances"]:
                    gts.append(dict(a, id=len(gts) + 1))
            gt_json = {"images": images, "annotations": gts, "categories": self._categories()}
            if gts:
                kpi.update(coco_mask_ap(gt_json, dets, backend=self.cfg.evaluate.coco_backend))
            else:
                log.warning("No instance ground truth in the evaluation set; mask AP not computed.")
        if self._trainer is not None:
            prefix = "test" if self.trainer.testing else "val"
            for k, v in defined_metrics(kpi).items():  # an undefined (None) metric is not logged
                self.log(f"{prefix}/{k}", float(v), rank_zero_only=True)
        self.kpi = as_metrics(kpi)
        log.info("Evaluation on %d images: %s", len(merged), format_metrics(self.kpi))
        if self.onnx is not None:  # metrics.json says what produced the numbers (the PyTorch path: a checkpoint)
            self.kpi["runtime"] = self.onnx.describe()

    # -- inference -----------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Write per-image outputs under ``ctx.run_dir``.

        Every mode: ``overlays/<name>.png`` (RGB overlay in label-map colours).  ``semantic``:
        ``semantic/<name>.png`` (dataset category id per pixel, 8- or 16-bit).  ``panoptic``:
        ``panoptic/<name>.png`` (COCO panoptic RGB id encoding); segments go to ``panoptic.json``.
        ``instance``: detections go to ``instances.json`` (COCO results, RLE).  JSON files are written at the
        end of the run (:meth:`on_predict_epoch_end`).
        """
        from PIL import Image

        from networks.common.coco_io import id2rgb, mask_to_rle
        from networks.common.visualize import colorize_semantic, overlay_masks, palette, save_png

        out_dir = run_output_dir(self.ctx)
        _, head, sizes = self._head(batch)
        mode = self.cfg.model.mode
        colors = self.label_map.colors() if self.label_map is not None else None
        thing = self._thing_classes(batch["images"].device)
        for i in range(batch["images"].shape[0]):
            res = self._finish(head, i, sizes[i], batch["orig_sizes"][i], thing, semantic=mode == "semantic")
            rel = Path(batch["file_names"][i]).with_suffix(".png")
            with Image.open(batch["paths"][i]) as im:
                image = np.asarray(im.convert("RGB"))
            record: dict[str, Any] = {"file_name": batch["file_names"][i], "image_id": batch["image_ids"][i],
                                      "height": int(image.shape[0]), "width": int(image.shape[1])}
            if mode == "semantic":
                sem = res["semantic"].cpu().numpy()
                lut = np.array([0] + [self._category_id(k) for k in range(1, self.num_classes + 1)])
                cat_map = lut[sem]
                save_png(out_dir / "semantic" / rel,
                         cat_map.astype(np.uint8 if cat_map.max(initial=0) < 256 else np.uint16))
                color = colorize_semantic(sem, colors if colors is not None else palette(self.num_classes + 1))
                overlay = (0.5 * image + 0.5 * color).astype(np.uint8)
                record["semantic_png"] = str(Path("semantic") / rel)
            elif mode == "panoptic":
                segs = res["segments"]
                pan_np = res["panoptic"].cpu().numpy()
                save_png(out_dir / "panoptic" / rel, id2rgb(pan_np))
                record["segments_info"] = [{"id": s["id"], "category_id": self._category_id(s["category"]),
                                            "isthing": int(s["isthing"]), "score": s["score"], "area": s["area"]}
                                           for s in segs]
                record["panoptic_png"] = str(Path("panoptic") / rel)
                seg_masks = [pan_np == s["id"] for s in segs]
                overlay = overlay_masks(image, seg_masks, [tuple(colors[s["category"]]) for s in segs]
                                        if colors is not None else None,
                                        labels=[self._name(s["category"]) for s in segs])
            else:
                inst = res["instances"]
                dets = []
                shown = []
                for m, s, lab in zip(inst["masks"], inst["scores"], inst["labels"], strict=False):
                    m_np = m.cpu().numpy()
                    rle = mask_to_rle(m_np)
                    dets.append({"image_id": batch["image_ids"][i], "category_id": self._category_id(int(lab)),
                                 "score": float(s), "segmentation": rle})
                    if float(s) > self.cfg.model.object_mask_threshold:
                        shown.append((m_np, int(lab), float(s)))
                record["instances"] = dets
                overlay = overlay_masks(image, [m for m, _, _ in shown],
                                        [tuple(colors[lab]) for _, lab, _ in shown] if colors is not None else None,
                                        labels=[f"{self._name(lab)} {s:.2f}" for _, lab, s in shown])
            save_png(out_dir / "overlays" / rel, overlay)
            self._predictions.append(record)

    def _name(self, class_index: int) -> str:
        return self.label_map.name(class_index) if self.label_map is not None else str(class_index)

    def on_predict_epoch_end(self) -> None:
        """Gather the per-image records and write ``panoptic.json`` / ``instances.json`` (rank 0, atomically)."""
        from networks.common.io import atomic_write_json

        ordered = gather_unique(self._predictions, "file_name", order_by="image_id")
        self._predictions = []
        mode = self.cfg.model.mode
        out_dir = run_output_dir(self.ctx)
        summary: dict[str, Any] = {"num_images": len(ordered), "overlays": str(out_dir / "overlays")}
        if is_rank_zero():
            images = [{"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
                       "width": r["width"]} for r in ordered]
            if mode == "panoptic":
                path = out_dir / "panoptic.json"
                atomic_write_json(path, {
                    "images": images,
                    "annotations": [{"image_id": r["image_id"], "file_name": r["panoptic_png"],
                                     "segments_info": r["segments_info"]} for r in ordered],
                    "categories": self._categories()})
                summary["panoptic_json"] = str(path)
            elif mode == "instance":
                path = out_dir / "instances.json"
                dets = [d for r in ordered for d in r["instances"]]
                atomic_write_json(path, dets)
                atomic_write_json(out_dir / "images.json", {"images": images, "categories": self._categories()})
                summary["instances_json"] = str(path)
            else:
                summary["semantic_dir"] = str(out_dir / "semantic")
        if self.onnx is not None:
            summary["runtime"] = self.onnx.describe()
        self.outputs = summary
