"""Mask Grounding DINO LightningModule: losses, optimiser/schedule, COCO bbox+segm evaluation, inference outputs.

* Training: the model is called with the criterion's matcher as ``match_fn`` (it predicts masks only for
  matched queries, per decoder layer); the criterion's unweighted terms are weighted **here** (the one place;
  :func:`~networks.mask_grounding_dino.criterion.loss_weights`) into ``train/loss``; every term is logged
  (``train/<term>``).
* Optimiser (TAO §7.1): AdamW over trainable parameters in three groups by name substring —
  ``model.backbone_names`` → ``lr_backbone``, ``model.linear_proj_names`` → ``lr · lr_linear_proj_mult``, the rest
  → ``lr`` — all with ``weight_decay``; MultiStepLR (``lr_steps``) or StepLR (``lr_step_size``), per epoch.
* ``train.freeze`` freezes dotted sub-modules (``backbone.0``, ``bert``, ...); ``train.pretrained_model_path``
  (full model) or ``model.pretrained_backbone_path`` (Swin only) are loaded unless the run resumes.
* Evaluation: ``val/loss`` (KPI ``val_loss``; no mask terms, as TAO) and COCO AP through pycocotools for ``bbox``
  and ``segm`` on the images seen (gathered over ranks): ``bbox_val_mAP``, ``bbox_val_mAP50``, ``bbox_val_mAP75``
  and the same for ``segm_``.  Detections use ``evaluate.{conf,nms}_threshold``.  A referring val/test source
  (:func:`~networks.mask_grounding_dino.data.eval_kind`) is scored per expression instead
  (:mod:`networks.common.referring_metrics`, TAO's names ``<stage>_mIoU`` (gIoU), ``<stage>_overall_IoU`` (cIoU),
  ``<stage>_T_acc``, ``<stage>_N_acc``, ``<stage>_Pr@0.7/0.8/0.9``, ``<stage>_mAP50``, ``<stage>_mAP``, with
  ``<stage>`` = ``val`` or ``test``); ``evaluate`` also writes ``<run_dir>/<json_file stem>_results.json``.
* Inference: ``overlays/<image>.png`` per image and one ``results.json`` (COCO results + ``file_name``,
  ``category_name``, ``phrase``) under ``ctx.run_dir``, written atomically.
* Runtimes: evaluate/inference run the PyTorch model, or — with ``<action>.onnx_file`` — the exported ONNX file
  under ONNX Runtime (:class:`~networks.mask_grounding_dino.onnx_runtime.OnnxModel`; no PyTorch model is
  built), or — with ``<action>.trt_engine`` — a TensorRT engine
  (:class:`~networks.mask_grounding_dino.tensorrt.TrtModel`, same calls).  All feed the same chunk merge and post-processing; the ONNX path has no auxiliary outputs, so its
  ``val_loss`` is None (undefined) rather than a differently defined number, and metrics.json / the inference
  outputs carry a ``runtime`` record (ONNX Runtime version, providers, file, input size).
"""
from __future__ import annotations

import logging
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
from networks.mask_grounding_dino.criterion import MaskGDinoCriterion, build_matcher, loss_weights
from networks.mask_grounding_dino.postprocess import detection_phrases, postprocess
from networks.ops.losses import weighted_sum
from networks.ops.optim import fused_option

__all__ = ["MaskGDinoModule", "param_groups", "freeze_modules", "strip_lightning_prefix", "load_full_weights",
           "TEXT_KEYS"]

log = logging.getLogger(__name__)

#: Batch keys of the tokenised prompt, in the model's argument order after images/pixel_mask.
TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "text_self_attention_masks")


def param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float,
                 backbone_names: list[str], linear_proj_names: list[str]) -> list[dict]:
    """TAO's three AdamW groups over trainable parameters, by substring of the parameter name (backbone first)."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "linear_proj": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(k in name for k in backbone_names):
            groups["backbone"].append(p)
        elif any(k in name for k in linear_proj_names):
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    lrs = {"rest": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def strip_lightning_prefix(obj: Any) -> dict[str, torch.Tensor]:
    """State dict of a checkpoint object; a tao-cli Lightning checkpoint's ``model.`` prefix is removed (TAO's
    ``model.model.`` and bare/IDEA layouts are left for ``model.load_pretrained`` to remap)."""
    from networks.common.weights import strip_prefix, unwrap_state_dict

    state = unwrap_state_dict(obj)
    if state and all(k.startswith("model.") for k in state) and not any(k.startswith("model.model.") for k in state):
        state = strip_prefix(state)
    return state


def load_full_weights(model: nn.Module, path: str | Path, field: str = "train.pretrained_model_path",
                      model_cfg: Any = None, weights_format: str | None = None) -> Any:
    """Load whole-model weights of any layout :mod:`networks.mask_grounding_dino.weight_formats` knows (tao-cli,
    TAO, IDEA GroundingDINO, Hugging Face directory) into ``model`` and return the ``LoadReport``.

    The file is read without running code; its format is detected (``weights_format`` forces one by name); an
    HF config is checked against ``model_cfg`` (the spec's ``model`` section).  Only the mask head and the ReLA
    branch may be absent (newly initialised, logged); any other missing, unexpected or mis-shaped key is one
    :class:`~networks.common.errors.CheckpointError`.
    """
    from networks.common.weight_formats import detect_format, load_converted, read_source
    from networks.mask_grounding_dino.weight_formats import formats

    source = read_source(path, field=field)
    fmt = detect_format(source, formats(), forced=weights_format, field=field)
    report = load_converted(model, source, fmt, model_cfg)
    log.info(report.summary(f"{path} ({fmt.name}: {fmt.description})"))
    new_head = [k for k in report.missing if k.startswith(("controller.", "mask_head."))]
    if new_head:
        log.info("%s has no mask head: controller/mask_head (%d tensors) are newly initialised", path,
                 len(new_head))
    return report


def _xywh(box: list[float]) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


class MaskGDinoModule(pl.LightningModule):
    """Train/evaluate/inference logic around :class:`~networks.mask_grounding_dino.model.MaskGDinoModel`.

    Args:
        cfg: the validated spec (``DictConfig``).
        ctx: the engine's :class:`~networks.common.context.RunContext` (or None in tests).
        model: a built model (default ``build_model(cfg)``).
    """

    def __init__(self, cfg: Any, ctx: Any = None, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        #: what the engine's Trainer must know (DDP with find_unused_parameters, as before)
        self.trainer_traits = TrainerTraits(find_unused_parameters=True)
        mc = cfg.model
        self._tokenizer = None
        from networks.common.onnx_runtime import onnx_file_of

        #: the ONNX Runtime model when ``<action>.onnx_file`` is set, the TensorRT engine when ``trt_engine`` is
        #: (then there is no PyTorch model)
        self.onnx = None
        action = getattr(ctx, "action", None)
        onnx_file = onnx_file_of(cfg, action) if model is None else None
        trt_engine = onnx_file_of(cfg, action, "trt_engine") if model is None else None
        if onnx_file:
            from networks.mask_grounding_dino.onnx_runtime import OnnxModel

            self.onnx = OnnxModel(onnx_file, int(mc.max_text_len), int(self.tokenizer.pad_token_id or 0),
                                  want_gpu=getattr(ctx, "accelerator", None) == "gpu", field=f"{ctx.action}.onnx_file")
            self.onnx.log_start(log)
        elif trt_engine:
            from networks.mask_grounding_dino.tensorrt import TrtModel

            # a TensorRT engine takes the ONNX model's place: same feeds, outputs and post-processing
            self.onnx = TrtModel(trt_engine, int(mc.max_text_len), int(self.tokenizer.pad_token_id or 0),
                                 field=f"{action}.trt_engine")
            self.onnx.log_start(log)
        elif model is None:
            from networks.mask_grounding_dino.model import build_model

            model = build_model(cfg)
        self.model = model
        if hasattr(model, "set_activation_checkpoint") and getattr(ctx, "action", None) == "train":
            model.set_activation_checkpoint(bool(cfg.train.activation_checkpoint))
        self.criterion = MaskGDinoCriterion(build_matcher(mc), mc.focal_alpha, mc.focal_gamma,
                                            list(mc.loss_types))  # "rela": ReLA terms when the branch exists
        num_aux = int(mc.dec_layers) - 1 if mc.aux_loss else 0
        self.loss_weights = loss_weights(mc, num_aux)
        self.kpi: dict[str, float] = {}
        self.outputs: dict[str, Any] = {}
        self._records: dict[Any, dict] = {}
        self._val_loss: dict[tuple, tuple[float, int]] = {}  # batch's sample keys -> (loss × batch size, size)
        self._predictions: list[dict] = []
        self._tokenizer = None
        from networks.mask_grounding_dino.text_cache import TextCache

        size = int(mc.get("text_cache_size", 64) or 0)
        self._text_cache = TextCache(size) if size > 0 else None
        if getattr(ctx, "action", None) == "train":
            frozen = freeze_modules(self.model, list(cfg.train.freeze or []),
                                    strip_prefixes=("model.model.", "model."), example="backbone.0, bert")
            if frozen:
                log.info("Froze modules: %s", frozen)
            if not getattr(ctx, "resuming", False):
                self._load_pretrained()

    def _load_pretrained(self) -> None:
        if self.cfg.train.pretrained_model_path:
            load_full_weights(self.model, self.cfg.train.pretrained_model_path, model_cfg=self.cfg.model)
        elif self.cfg.model.pretrained_backbone_path:
            from networks.mask_grounding_dino.model import load_backbone_weights

            load_backbone_weights(self.model, self.cfg.model.pretrained_backbone_path, model_cfg=self.cfg.model)

    @property
    def tokenizer(self):
        """The prompt tokenizer (for phrase decoding), loaded on first use."""
        if self._tokenizer is None:
            from networks.mask_grounding_dino.text import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model.text_encoder_type)
        return self._tokenizer

    # -- forward / training ---------------------------------------------------------------------------
    def forward(self, batch: dict, match: bool = False) -> dict[str, Any]:
        """Model outputs for a collated batch; ``match`` passes targets and the matcher (training masks).  With an
        ONNX file: the graph's outputs (:class:`~networks.mask_grounding_dino.onnx_runtime.OnnxModel`)."""
        if self.onnx is not None:
            return self.onnx(batch)
        args = [batch[k] for k in TEXT_KEYS]
        if match:
            return self.model(batch["images"], batch["pixel_mask"], *args, targets=batch["targets"],
                              match_fn=self.criterion.match)
        return self.model(batch["images"], batch["pixel_mask"], *args)

    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight · term over the terms that have a weight."""
        return weighted_sum(losses, self.loss_weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Weighted loss of one batch; logs ``train/loss`` and every term (``train/loss_ce``, ``train/loss_ce_0``,
        ``train/loss_ce_interm``, ...) per step, ``train/loss_epoch`` (epoch mean), ``train/lr`` and
        ``train/lr_backbone``."""
        outputs = self(batch, match=True)
        losses = self.criterion(outputs, batch["targets"], batch["attention_mask"])
        total = self.weighted_loss(losses)
        if not torch.isfinite(total):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"Mask Grounding DINO loss is not finite at step {self.global_step} "
                                     f"(terms {bad}); lower train.optim.lr, use fp32/bf16, or check the data")
        bs = len(batch["targets"])
        log_train_losses(self, total, losses, bs)
        if self._trainer is not None and self.trainer.optimizers:
            lrs = {g.get("name"): g["lr"] for g in self.trainer.optimizers[0].param_groups}
            self.log("train/lr", lrs.get("rest", self.trainer.optimizers[0].param_groups[-1]["lr"]), on_step=True,
                     on_epoch=False, batch_size=bs)
            if "backbone" in lrs:
                self.log("train/lr_backbone", lrs["backbone"], on_step=True, on_epoch=False, batch_size=bs)
        return total

    def configure_optimizers(self):
        """AdamW with TAO's three parameter groups and a per-epoch MultiStep/StepLR schedule."""
        o = self.cfg.train.optim
        mc = self.cfg.model
        groups = param_groups(self.model, float(o.lr), float(o.lr_backbone), float(o.lr_linear_proj_mult),
                              list(mc.backbone_names), list(mc.linear_proj_names))
        optimizer = torch.optim.AdamW(groups, lr=float(o.lr), weight_decay=float(o.weight_decay),
                                      **fused_option(groups, getattr(self._trainer, "precision", None)))
        if o.lr_scheduler == "StepLR":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(o.lr_step_size), gamma=float(o.lr_decay))
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(o.lr_steps),
                                                             gamma=float(o.lr_decay))
        # TAO returns optim.monitor_name as the scheduler's monitor (under this project's metric names)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch",
                                                         "monitor": MONITOR_METRICS[o.monitor_name]}}

    # -- text cache ------------------------------------------------------------------------------------
    def _attach_text_cache(self) -> None:
        """Serve repeated prompts from the text cache for this evaluation/inference pass (training never sees it:
        the cache is detached at the end of the pass)."""
        if self._text_cache is not None and hasattr(self.model, "text_cache"):
            self.model.text_cache = self._text_cache

    def _detach_text_cache(self) -> None:
        cache = getattr(self.model, "text_cache", None)
        if cache is None:
            return
        self.model.text_cache = None
        hits, misses = cache.reset_counts()
        cache.clear()
        if hits + misses:
            log.info("Text encoder: %d prompt rows encoded, %d served from the text cache", misses, hits)

    # -- evaluation ------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        from networks.common.referring_metrics import ReferringMetrics

        self._attach_text_cache()
        self._records = {}
        self._val_loss = {}
        self._referring = ReferringMetrics()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()
        from networks.common.visualize import SideBySideWriter

        # <run_dir>/overlays/<image>.png (ground truth | prediction) for the first evaluate.num_overlays images.
        run_dir = getattr(self.ctx, "run_dir", None)
        self._overlays = SideBySideWriter(Path(run_dir) / "overlays" if run_dir is not None else None,
                                          int(self.cfg.evaluate.get("num_overlays", 0) or 0))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """``val/loss`` and the batch's detections for COCO AP."""
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """As :meth:`validation_step` (``evaluate`` runs on the test or val COCO file), plus the overlay pictures."""
        result = self._eval_step(batch)
        overlays = getattr(self, "_overlays", None)
        if result is None or overlays is None or not overlays.wanted:
            return
        from networks.mask_grounding_dino.visualize import eval_pair

        outputs, dets, batch = result
        aug = self.cfg.dataset.augmentation
        for i, det in enumerate(dets):
            if not overlays.wanted:
                break
            names = batch["names"][i]
            phrases = detection_phrases(det, outputs["pred_logits"][i], batch["input_ids"][i],
                                        batch["targets"][i]["positive_map"], names, self.tokenizer,
                                        float(self.cfg.evaluate.text_threshold))
            left, right = eval_pair(batch, i, det, phrases, aug.input_mean, aug.input_std)
            overlays.add(batch["image_ids"][i], batch["file_names"][i], left, right)

    def _eval_step(self, batch: dict) -> tuple[dict, list[dict], dict] | None:
        """Loss and detection records of one batch; returns (outputs, detections, batch) with a chunked prompt's
        views merged per image (None during the sanity check).  The loss of a chunked prompt is the mean over
        its views, each against the objects of its own chunk."""
        from networks.common.coco_io import mask_to_rle
        from networks.mask_grounding_dino.chunking import merge_views

        outputs = self(batch)
        bs = len(batch["targets"])
        if self.onnx is None:  # the graph has no auxiliary outputs: its loss would be another quantity
            losses = self.criterion(outputs, batch["targets"], batch["attention_mask"], with_masks=False,
                                    across_ranks=False)
            loss = self.weighted_loss(losses)
            # keyed by the batch's samples: a batch the distributed sampler repeats on another rank counts once
            keys = [r["expression_id"] for r in batch["referring"]] if "referring" in batch else batch["image_ids"]
            self._val_loss[tuple(keys)] = (float(loss) * bs, bs)
        if self._trainer is not None and self.onnx is None:
            self.log("test/loss" if self.trainer.testing else "val/loss", loss, on_step=False, on_epoch=True,
                     sync_dist=True, batch_size=bs)
            if self.trainer.sanity_checking:
                return None
        outputs, batch = merge_views(outputs, batch)
        ev = self.cfg.evaluate
        image_sizes, padded_hw = self._sizes(batch)
        dets = postprocess(outputs, [t["positive_map"] for t in batch["targets"]], image_sizes,
                           batch["orig_sizes"], padded_hw, int(self.cfg.model.num_select),
                           float(ev.conf_threshold), float(ev.nms_threshold), ioi_threshold=float(ev.ioi_threshold))
        if "referring" in batch:
            self._referring_step(batch, outputs, dets)
            return outputs, dets, batch
        for i, det in enumerate(dets):
            cat_ids = batch["category_ids"][i]
            rows = []
            masks = det["masks"].cpu().numpy()
            for j, (s, lab, box) in enumerate(zip(det["scores"].tolist(), det["labels"].tolist(),
                                                  det["boxes"].tolist(), strict=True)):
                rows.append({"image_id": batch["image_ids"][i], "category_id": cat_ids[lab], "score": float(s),
                             "bbox": _xywh(box), "segmentation": mask_to_rle(masks[j])})
            self._records[batch["image_ids"][i]] = rows
        return outputs, dets, batch

    def _sizes(self, batch: dict) -> tuple[list, tuple[int, int]]:
        """(per-image un-padded size, padded size) of the input the outputs were computed on: the batch's, or
        the ONNX graph's H×W for every image (each image was resized to it)."""
        if self.onnx is not None:
            return [self.onnx.hw] * len(batch["orig_sizes"]), self.onnx.hw
        return list(batch["image_sizes"]), tuple(batch["images"].shape[-2:])

    def _referring_step(self, batch: dict, outputs: dict, dets: list[dict]) -> None:
        """Per expression: the merged mask of every kept instance (none kept ⇒ predicted no-target) against the
        merged ground truth, both at the original size; under ``evaluate`` also the kept instances' phrases
        (tokens above ``evaluate.text_threshold``) for the results file."""
        from networks.common.coco_io import ann_to_mask
        from networks.common.referring_metrics import ReferringMetrics

        if getattr(self, "_referring", None) is None:
            self._referring = ReferringMetrics()
        testing = self._trainer is not None and self.trainer.testing
        for i, det in enumerate(dets):
            ref = batch["referring"][i]
            H0, W0 = (int(v) for v in batch["orig_sizes"][i])
            gt = ann_to_mask(ref["gt_union"], H0, W0)
            masks = det["masks"]
            pred = masks.any(0).cpu().numpy() if masks.shape[0] else np.zeros((H0, W0), dtype=bool)
            score = float(det["scores"].float().mean()) if det["scores"].numel() else None
            extra = {"expression_id": ref["expression_id"], "file_name": batch["file_names"][i],
                     "caption": ref["caption"], "num_instances": int(det["scores"].numel())}
            if testing:
                extra["phrases"] = sorted(set(detection_phrases(
                    det, outputs["pred_logits"][i], batch["input_ids"][i], batch["targets"][i]["positive_map"],
                    batch["names"][i], self.tokenizer, float(self.cfg.evaluate.text_threshold))))
            self._referring.update(ref["expression_id"], gt, pred, score, **extra)

    def _finish_referring(self, source: Any, prefix: str) -> dict[str, Any]:
        """Referring KPIs (``<prefix>_<name>``) over the gathered expressions; ``evaluate`` writes
        ``<run_dir>/<json_file stem>_results.json`` (rank 0, atomically)."""
        from networks.common.io import atomic_write_json
        from networks.common.referring_metrics import ReferringMetrics

        rows = gather_unique(self._referring.rows(), "key")  # a repeated expression once, in key order
        self._referring = ReferringMetrics()
        if not rows:
            return {}
        metrics = ReferringMetrics.from_rows(rows).compute(coco_backend=self.cfg.evaluate.coco_backend)
        run_dir = getattr(self.ctx, "run_dir", None)
        if prefix == "test" and run_dir is not None and is_rank_zero():
            name = Path(str(source.get("json_file"))).stem
            expressions = [{k: v for k, v in r.items() if k not in ("gt_rle", "pred_rle", "key")}
                           for r in sorted(rows, key=lambda r: r["key"])]
            atomic_write_json(Path(run_dir) / f"{name}_results.json",
                              {"dataset": name, "json_file": str(source.get("json_file")),
                               "data_type": str(source.get("data_type") or ""), "metrics": metrics,
                               "expressions": expressions}, indent=1)
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def on_validation_epoch_end(self) -> None:
        self._detach_text_cache()
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        self._finish_eval(self.cfg.dataset.val_data_sources)

    def on_test_epoch_end(self) -> None:
        from networks.mask_grounding_dino.config import eval_source

        self._detach_text_cache()
        self._finish_eval(eval_source(self.cfg)[1])
        overlays = getattr(self, "_overlays", None)
        if overlays is not None:
            written = overlays.finish()
            if written:
                log.info("Wrote %d ground truth | prediction pictures to %s", len(written), written[0].parent)
            self._overlays = None

    def _finish_eval(self, source: Any) -> None:
        from networks.common.coco_io import load_coco
        from networks.common.metrics import as_metrics, coco_eval_stats, format_metrics

        merged = gather_dict(self._records)  # one entry per image, in image-id order
        losses = gather_dict(self._val_loss).values()
        loss_sum, loss_n = sum(s for s, _ in losses), sum(n for _, n in losses)
        self._records, self._val_loss = {}, {}
        kpi: dict[str, float] = {}
        if loss_n:
            kpi["val_loss"] = loss_sum / loss_n
        elif self.onnx is not None:
            kpi["val_loss"] = None
        if merged:
            gt = load_coco(source.get("json_file"), field="json_file")
            seen = set(merged)
            gt = {**gt, "images": [im for im in gt["images"] if im["id"] in seen],
                  "annotations": [a for a in gt["annotations"] if a.get("image_id") in seen]}
            dets = [d for rows in merged.values() for d in rows]
            if gt["annotations"]:
                for iou_type in ("bbox", "segm"):
                    stats = coco_eval_stats(gt, dets, iou_type, backend=self.cfg.evaluate.coco_backend)
                    kpi[f"{iou_type}_val_mAP"] = max(stats[0], 0.0)
                    kpi[f"{iou_type}_val_mAP50"] = max(stats[1], 0.0)
                    kpi[f"{iou_type}_val_mAP75"] = max(stats[2], 0.0)
            else:
                log.warning("No ground-truth instances in the evaluated images; AP not computed.")
        prefix = "test" if self._trainer is not None and self.trainer.testing else "val"
        if getattr(self, "_referring", None) is not None:
            kpi.update(self._finish_referring(source, prefix))
        kpi = as_metrics(kpi)
        if self._trainer is not None:
            for k, v in kpi.items():
                if k != "val_loss" and v is not None:  # loss: logged per batch as <prefix>/loss
                    # referring KPIs carry TAO's stage prefix (val_mIoU): logged as val/mIoU
                    self.log(f"{prefix}/{k.removeprefix(prefix + '_')}", float(v), rank_zero_only=True)
        self.kpi = kpi
        log.info("Evaluation on %d images: %s", len(merged) or int(kpi.get(f"{prefix}_num_expressions") or 0),
                 format_metrics(self.kpi))
        if self.onnx is not None:  # metrics.json says what produced the numbers (the PyTorch path: a checkpoint)
            self.kpi["runtime"] = self.onnx.describe()

    # -- inference -------------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._attach_text_cache()
        self._predictions = []

    def _colors(self, names: list[str]) -> list[tuple[int, int, int]]:
        from PIL import ImageColor

        from networks.common.visualize import palette

        base = palette(max(len(names), 1))
        cmap = dict(self.cfg.inference.color_map or {})
        out = []
        for k, n in enumerate(names):
            try:
                out.append(tuple(ImageColor.getrgb(cmap[n])) if n in cmap else tuple(base[k]))
            except ValueError:
                raise ConfigError(f"inference.color_map.{n}", f"'{cmap[n]}' is not a colour",
                                  "use a name (red) or #rrggbb") from None
        return out

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Write ``overlays/<image>.png`` per image and collect its detections for ``results.json``."""
        from PIL import Image

        from networks.common.coco_io import mask_to_rle
        from networks.common.visualize import overlay_masks, save_png
        from networks.mask_grounding_dino.chunking import merge_views

        inf = self.cfg.inference
        outputs, batch = merge_views(self(batch), batch)
        image_sizes, padded_hw = self._sizes(batch)
        dets = postprocess(outputs, [t["positive_map"] for t in batch["targets"]], image_sizes,
                           batch["orig_sizes"], padded_hw, int(self.cfg.model.num_select),
                           float(inf.conf_threshold), float(inf.nms_threshold),
                           ioi_threshold=float(inf.ioi_threshold))
        out_dir = run_output_dir(self.ctx)
        for i, det in enumerate(dets):
            names = batch["names"][i]
            phrases = detection_phrases(det, outputs["pred_logits"][i], batch["input_ids"][i],
                                        batch["targets"][i]["positive_map"], names, self.tokenizer,
                                        float(inf.text_threshold))
            masks = det["masks"].cpu().numpy()
            rows = []
            for j, (s, lab, box) in enumerate(zip(det["scores"].tolist(), det["labels"].tolist(),
                                                  det["boxes"].tolist(), strict=True)):
                rows.append({"image_id": batch["image_ids"][i], "file_name": batch["file_names"][i],
                             "category_id": int(lab), "category_name": names[lab], "phrase": phrases[j],
                             "score": float(s), "bbox": _xywh(box), "segmentation": mask_to_rle(masks[j])})
            with Image.open(batch["paths"][i]) as im:
                from PIL import ImageOps

                image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            colors = self._colors(names)
            overlay = overlay_masks(image, list(masks), [colors[lab] for lab in det["labels"].tolist()],
                                    boxes=det["boxes"].cpu().numpy(),
                                    labels=[f"{p} {s:.2f}" for p, s in zip(phrases, det["scores"].tolist(), strict=True)],
                                    alpha=0.4, box_width=int(inf.outline_width))
            save_png(out_dir / "overlays" / Path(batch["file_names"][i]).with_suffix(".png"), overlay)
            self._predictions.append({"file_name": batch["file_names"][i], "image_id": batch["image_ids"][i],
                                      "height": int(image.shape[0]), "width": int(image.shape[1]),
                                      "captions": list(names), "detections": rows})

    def on_predict_epoch_end(self) -> None:
        """Gather the per-image records and write ``results.json`` (rank 0, atomically)."""
        from networks.common.io import atomic_write_json

        self._detach_text_cache()
        ordered = gather_unique(self._predictions, "file_name")
        self._predictions = []
        out_dir = run_output_dir(self.ctx)
        path = out_dir / "results.json"
        if is_rank_zero():
            atomic_write_json(path, [d for r in ordered for d in r["detections"]])
            atomic_write_json(out_dir / "images.json", [{k: r[k] for k in ("image_id", "file_name", "height",
                                                                              "width", "captions")} for r in ordered])
        self.outputs = {"num_images": len(ordered), "results_json": str(path), "overlays": str(out_dir / "overlays"),
                        "num_detections": sum(len(r["detections"]) for r in ordered)}
        if self.onnx is not None:
            self.outputs["runtime"] = self.onnx.describe()
