"""Lightning module for MAL: box-supervised training (MIL + mean-field CRF losses, EMA teacher), evaluation
(TAO's class-averaged per-instance mIoU plus COCO mask AP) and pseudo-label prediction.

Differences from TAO, on purpose:

* automatic optimisation, so ``train.accum_grad_batches > 1`` works; the EMA update runs after each real
  optimizer step and the LR schedule is a per-step ``LambdaLR`` (checkpointed, so resume is exact);
* the optimiser holds the student's trainable parameters only (TAO also passes the teacher's, which never get
  gradients, so AdamW skipped them anyway);
* the teacher forward runs without grad and in eval mode, and by default (``train.teacher_precision: auto``)
  under bf16 autocast in an fp32 run on a device with bf16 hardware: its masks only seed the CRF target;
* the step counter for the epoch-0 loss warm-ups is the global optimizer step, which survives resume;
* the first optimizer step uses the warmed-up LR ``lr(0)`` (0 with warm-up) instead of the unscheduled LR;
* the LR is scaled by the world size (processes x nodes) times the per-device batch;
* evaluation de-duplicates instances padded in by the distributed sampler and also reports COCO mask AP.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from networks.common.coco_io import mask_to_rle
from networks.common.distributed import gather_unique
from networks.common.metrics import InstanceIoU, as_metrics, coco_mask_ap, defined_metrics, mask_iou
from networks.common.network import TrainerTraits
from networks.mal.criterion import MeanField, mal_losses
from networks.mal.model import area_bin, build_mal_networks, ema_update
from networks.ops.optim import fused_option
from networks.ops.precision import bf16_autocast, native_bf16

__all__ = ["MALModule", "warmup_cosine_lr"]

_log = logging.getLogger("tao")

KPI_KEYS = ("mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75", "APs", "APm", "APl")


def warmup_cosine_lr(epoch: float, *, base_lr: float, min_lr: float, warmup_epochs: float, num_epochs: float,
                     num_wave: float = 1.0) -> float:
    """TAO's schedule on a fractional epoch: linear 0 -> ``base_lr`` over ``warmup_epochs``, then
    ``min_lr + (base_lr - min_lr)·½(1 + cos(π·(e-W)/(E-W)·num_wave))``.  With ``E <= W`` there is no cosine
    phase (TAO divides by zero) and the LR stays at ``base_lr`` after warm-up."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = num_epochs - warmup_epochs
    if span <= 0:
        return base_lr
    progress = (epoch - warmup_epochs) / span
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress * num_wave))


def _thresholds(mask_thres: Sequence[float]) -> tuple[float, float, float]:
    values = [float(t) for t in mask_thres]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        from networks.common.errors import ConfigError

        raise ConfigError("train.mask_thres", f"needs 1 or 3 values, got {len(values)}",
                          "give one threshold for all sizes or [small, medium, large]")
    return values[0], values[1], values[2]


def teacher_bf16(policy: str, device: torch.device) -> bool:
    """Whether the teacher's training forward runs under bf16 autocast for ``train.teacher_precision`` =
    ``policy`` on ``device`` (an enclosing mixed-precision autocast, i.e. ``use_amp``, always stays in charge:
    see :func:`networks.ops.precision.bf16_autocast`)."""
    return policy == "bf16" or (policy == "auto" and native_bf16(device))


class MALModule(pl.LightningModule):
    """Student/teacher MAL training and evaluation.

    Train batch: ``image``/``timage`` [B,3,S,S] (student / teacher views), ``mask`` [B,1,S,S] crop-space box
    mask, ``bbox`` [B,4] original-image xyxy.  Eval/predict batch: ``image``, ``boxmask``, ``bbox``,
    ``ext_box`` [B,4] int crop window (original pixels, exclusive end), ``image_hw`` [B,2] (H, W), ids and
    ``gt_mask`` (list of uint8 H×W or None).  ``lr`` is the already scaled LR (base × devices × batch).
    After each validation/test epoch ``kpi`` holds ``mIoU``, ``mIoU_small/medium/large`` with their instance
    counts ``num_instances``/``num_small/medium/large`` and COCO mask ``AP, AP50, AP75, APs, APm, APl``
    (fractions; None where a bin or area range is empty); ``outputs`` holds the pseudo-label summary after
    predict (``mean_instance_iou``: plain mean over instances, when the input has masks).
    """

    def __init__(self, cfg: Any, ctx: Any):
        """Build the module from the validated spec (TAO field names) and the run context (``ctx.action``,
        ``ctx.num_devices``, ``ctx.resuming``, ``ctx.run_dir``, ``ctx.log``).

        Pretrained weights (``train.pretrained_model_path``) are loaded for ``train`` unless ``ctx.resuming``.
        No annotation file is read here: category ids come with each sample and the schedule length comes from
        the Trainer (:meth:`_steps_per_epoch`).
        """
        super().__init__()
        tr, ev = cfg.train, cfg.evaluate
        action = getattr(ctx, "action", "train")
        #: the teacher and timm's unused classifier never receive gradients (read by the engine for DDP)
        self.trainer_traits = TrainerTraits(find_unused_parameters=True)
        load_pretrained = action == "train" and not getattr(ctx, "resuming", False)
        self.student, self.teacher = build_mal_networks(cfg, resuming=not load_pretrained,
                                                        log=getattr(ctx, "log", None))
        self.mean_field = MeanField(int(tr.crf_kernel_size), float(tr.crf_zeta), int(tr.crf_num_iter),
                                    float(tr.crf_value_low_thres), float(tr.crf_value_high_thres))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        devices = max(1, int(getattr(ctx, "num_devices", 1)))
        self.lr = float(tr.lr) * devices * int(tr.batch_size)  # base × world size × per-device batch
        # Cosine floor: train.min_lr when set (> 0), else TAO's lr_scaled x min_lr_rate (TAO always overwrites
        # min_lr with the latter, so a TAO spec, which leaves min_lr at 0, trains exactly as in TAO).
        self.min_lr = float(tr.min_lr) if float(tr.min_lr) > 0 else self.lr * float(tr.min_lr_rate)
        self.wd = float(tr.wd)
        self.optim_eps = float(tr.optim_eps)
        self.optim_betas = tuple(float(b) for b in tr.optim_betas)
        self.warmup_epochs = float(tr.warmup_epochs)
        self.num_epochs = float(int(tr.num_epochs))
        self.num_wave = float(tr.num_wave)
        #: optimizer steps per epoch when no Trainer is attached (else the Trainer's estimate is used)
        self.steps_per_epoch: int | None = None
        self.teacher_momentum = float(cfg.model.teacher_momentum)
        self.teacher_precision = str(tr.teacher_precision)
        self.loss_kw = dict(loss_mil_weight=float(tr.loss_mil_weight), loss_crf_weight=float(tr.loss_crf_weight),
                            loss_mil_step=int(tr.loss_mil_step), loss_crf_step=int(tr.loss_crf_step),
                            crf_size_ratio=int(tr.crf_size_ratio))
        self.mask_thres = _thresholds(list(tr.mask_thres))
        self.use_mixed_model_test = bool(ev.use_mixed_model_test)
        self.use_teacher_test = bool(ev.use_teacher_test)
        self.use_flip_test = bool(ev.use_flip_test)
        #: COCOeval implementation of the mask AP in :meth:`compute_kpi` (``evaluate.coco_backend``)
        self.coco_backend = str(ev.coco_backend)
        self.label_dump_path: Path | None = None
        self.num_overlays = int(ev.get("num_overlays", 0) or 0) if action == "evaluate" else 0
        if action == "inference":
            from networks.mal.postprocess import resolve_label_dump_path

            self.label_dump_path = resolve_label_dump_path(cfg.inference.label_dump_path, ctx.run_dir)
            self.num_overlays = int(cfg.inference.get("num_overlays", 0) or 0)
        #: where overlay PNGs go (``<run_dir>/overlays`` for evaluate/inference; else beside the pseudo-label JSON)
        self.overlay_dir: Path | None = None
        if action in ("inference", "evaluate") and getattr(ctx, "run_dir", None) is not None:
            self.overlay_dir = Path(ctx.run_dir) / "overlays"
        self.kpi: dict[str, float] = {}
        self.outputs: dict[str, Any] = {}
        self._ema_seen_step = 0
        self._records: list[dict] = []
        self._predictions: list[dict] = []

    def train(self, mode: bool = True):
        """Lightning toggles train/eval; the teacher always stays in eval mode (deterministic targets)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------ optimisation
    def _steps_per_epoch(self) -> int:
        trainer = self._trainer
        if trainer is not None:
            try:
                total = trainer.estimated_stepping_batches
                epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else self.num_epochs
                if math.isfinite(total) and total > 0:
                    return max(1, int(round(total / epochs)))
            except Exception:  # no loader yet (e.g. building outside fit)
                pass
        return max(1, int(self.steps_per_epoch or 1))

    def lr_at_step(self, step: int, steps_per_epoch: int) -> float:
        """LR used by the ``step``-th (0-based, global) optimizer step."""
        return warmup_cosine_lr(step / steps_per_epoch, base_lr=self.lr, min_lr=self.min_lr,
                                warmup_epochs=self.warmup_epochs, num_epochs=self.num_epochs,
                                num_wave=self.num_wave)

    def configure_optimizers(self):
        """AdamW over the student's trainable parameters + per-step warm-up/cosine ``LambdaLR``."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        fused = fused_option(params, getattr(self._trainer, "precision", None))
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.optim_betas, eps=self.optim_eps, weight_decay=self.wd,
                                **fused)
        spe = self._steps_per_epoch()
        base = self.lr

        def factor(step: int) -> float:
            return self.lr_at_step(step, spe) / base if base > 0 else 0.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Student on ``image``, teacher (no grad) on ``timage``; returns ``loss_mil + loss_crf``."""
        image, bbox = batch["image"], batch["bbox"]
        timage = batch.get("timage", image)
        s_logits = self.student(image, bbox)
        with torch.no_grad(), bf16_autocast(image.device, teacher_bf16(self.teacher_precision, image.device)):
            t_logits = self.teacher(timage, bbox)
        step = int(self.trainer.global_step) if self._trainer is not None else 0
        losses = mal_losses(s_logits, t_logits, image, batch["mask"], self.mean_field,
                            epoch=int(self.current_epoch), step_in_epoch=step, **self.loss_kw)
        loss = losses["loss_mil"] + losses["loss_crf"]
        b = image.shape[0]
        # Naming shared by every network: train/<term> per step, train/loss_epoch (epoch mean), train/lr.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=b)
        for key, value in losses.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, prog_bar=True, batch_size=b)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=b)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                     batch_size=b)
        return loss

    def on_train_start(self) -> None:
        self._ema_seen_step = int(self.trainer.global_step)
        if str(self.trainer.precision).startswith("32") and teacher_bf16(self.teacher_precision, self.device):
            _log.info("Teacher forward under bf16 autocast (train.teacher_precision=%s; its masks only seed the CRF "
                      "target; 'run' keeps it in fp32)", self.teacher_precision)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EMA-update the teacher once per optimizer step actually taken (not per accumulated batch)."""
        step = int(self.trainer.global_step)
        if step != self._ema_seen_step:
            ema_update(self.teacher, self.student, self.teacher_momentum)
            self._ema_seen_step = step

    # ------------------------------------------------------------------------------------------ evaluation
    def _logits(self, image: torch.Tensor, bbox: torch.Tensor, *, student_only: bool = False) -> torch.Tensor:
        if student_only:
            return self.student(image, bbox).float()
        if self.use_mixed_model_test:
            return (self.student(image, bbox).float() + self.teacher(image, bbox).float()) / 2
        net = self.teacher if self.use_teacher_test else self.student
        return net(image, bbox).float()

    def crop_probs(self, batch: dict, *, student_only: bool = False, flip: bool | None = None) -> torch.Tensor:
        """Crop-space probabilities ``[B,S,S]``: logits (student / teacher / mean per flags, optional flip TTA
        averaged in logit space) -> bilinear to S x S -> sigmoid -> x ``boxmask``."""
        image, bbox = batch["image"], batch["bbox"]
        segs = self._logits(image, bbox, student_only=student_only)
        if self.use_flip_test if flip is None else flip:
            flipped = self._logits(torch.flip(image, [3]), bbox, student_only=student_only)
            segs = (segs + torch.flip(flipped, [3])) / 2
        segs = F.interpolate(segs, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return (torch.sigmoid(segs) * batch["boxmask"].float())[:, 0]

    def _instances(self, batch: dict, probs: torch.Tensor) -> list[dict]:
        """Full-image probability and binary mask per instance, plus ids, box area and IoU when GT exists."""
        from networks.mal.postprocess import paste_back

        full = paste_back(probs, batch["ext_box"], batch["image_hw"])
        bins = area_bin(batch["bbox"].float()).tolist()
        boxes = batch["bbox"].float().cpu().numpy()
        gts = batch.get("gt_mask") or [None] * len(full)
        out = []
        for i, prob in enumerate(full):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            mask = prob > self.mask_thres[bins[i]]
            rec = {
                "ann_id": int(batch["ann_id"][i]), "image_id": int(batch["image_id"][i]),
                "category_id": int(batch["category_id"][i]),
                "compact_category_id": int(batch["compact_category_id"][i]),
                "iscrowd": int(batch["iscrowd"][i]) if "iscrowd" in batch else 0,
                "bbox_xywh": [x0, y0, x1 - x0, y1 - y0], "box_area": (x1 - x0) * (y1 - y0),
                "prob": prob, "mask": mask,
            }
            gt = gts[i] if i < len(gts) else None
            if gt is not None:
                rec["iou"] = mask_iou(mask, gt)
                rec["gt"] = gt
            out.append(rec)
        return out

    def _eval_step(self, batch: dict) -> None:
        probs = self.crop_probs(batch)
        for rec in self._instances(batch, probs):
            if "gt" not in rec:
                continue
            mask, prob = rec["mask"], rec["prob"]
            area = int(mask.sum())
            self._records.append({
                "ann_id": rec["ann_id"], "image_id": rec["image_id"], "category_id": rec["category_id"],
                "compact_category_id": rec["compact_category_id"], "iscrowd": rec["iscrowd"],
                "bbox": rec["bbox_xywh"], "box_area": rec["box_area"], "iou": rec["iou"],
                "hw": list(mask.shape), "pred": mask_to_rle(mask), "gt": mask_to_rle(rec["gt"]),
                "score": float(prob[mask].mean()) if area else 0.0,
            })

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Accumulate per-instance IoUs and COCO records (instances without a GT mask are skipped)."""
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Same as :meth:`validation_step`."""
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._records = []

    def on_test_epoch_start(self) -> None:
        self._records = []

    def compute_kpi(self, records: Sequence[dict]) -> dict[str, float | int | None]:
        """mIoU (TAO: class-averaged per-instance IoU, size bins by box area) with the instance count of each bin,
        and COCO mask AP from records; a bin without instances is None (``mIoU_small: None, num_small: 0``)."""
        uniq: dict[int, dict] = {}
        for r in records:
            uniq.setdefault(int(r["ann_id"]), r)  # DistributedSampler pads with duplicates
        if not uniq:
            return {}
        acc = InstanceIoU()
        for r in uniq.values():
            acc.update(r["iou"], r["compact_category_id"], r["box_area"])
        stats = acc.compute()
        kpi = dict(stats)  # mIoU, mIoU_<bin>, num_instances, num_<bin>
        images, cats, anns, results = {}, {}, [], []
        for r in uniq.values():
            h, w = r["hw"]
            images[r["image_id"]] = {"id": r["image_id"], "height": h, "width": w}
            cats[r["category_id"]] = {"id": r["category_id"], "name": str(r["category_id"])}
            anns.append({"id": r["ann_id"], "image_id": r["image_id"], "category_id": r["category_id"],
                         "segmentation": r["gt"], "iscrowd": r["iscrowd"], "bbox": r["bbox"]})
            results.append({"image_id": r["image_id"], "category_id": r["category_id"],
                            "segmentation": r["pred"], "score": r["score"]})
        gt = {"images": list(images.values()), "categories": list(cats.values()), "annotations": anns}
        kpi.update(coco_mask_ap(gt, results, "segm", backend=self.coco_backend))
        return as_metrics(kpi)

    def _epoch_end(self, prefix: str) -> None:
        records = gather_unique(self._records, "ann_id")  # box order (and overlay colours) as with one process
        self._records = []
        if prefix == "test":
            self._gathered = records  # read by on_test_epoch_end for the overlay pictures
        kpi = self.compute_kpi(records)
        if not kpi:
            _log.warning("MAL %s: no instance with a ground-truth mask; no metrics (set dataset.load_mask=true "
                         "and give segmentations to get mIoU/AP)", prefix)
            self.kpi = {}
            return
        self.kpi = kpi
        for key, value in defined_metrics(kpi).items():  # an undefined (None) metric is not logged
            self.log(f"{prefix}/{key}", value, on_epoch=True, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")
        records, self._gathered = getattr(self, "_gathered", []), []
        self._write_eval_overlays(records)

    def _write_eval_overlays(self, records: Sequence[dict]) -> list[Path]:
        """Rank 0: ``overlay_dir/<image>.png`` (ground truth | prediction masks per box) for the first
        ``num_overlays`` evaluated images that have ground-truth masks."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ds = getattr(dm, "val_dataset", None)
        if self.num_overlays <= 0 or self.overlay_dir is None or self.global_rank != 0 or not records or ds is None:
            return []
        from networks.common.visualize import SideBySideWriter
        from networks.mal.visualize import eval_pairs

        coco = dm.coco.get("val", {})
        names = {c["id"]: str(c.get("name", c["id"])) for c in coco.get("categories", [])}
        writer = SideBySideWriter(self.overlay_dir, self.num_overlays)
        for image_id, file_name, left, right in eval_pairs(records, coco.get("images", []), ds.img_root,
                                                           self.num_overlays, names):
            writer.add(image_id, file_name, left, right)
        written = writer.finish(gather=False)
        if written:
            _log.info("Wrote %d ground truth | prediction pictures to %s", len(written), self.overlay_dir)
        return written

    # ------------------------------------------------------------------------------------------ prediction
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Pseudo-labels from the student without TTA (as TAO): compact per-annotation records
        ``{ann_id, image_id, segmentation (RLE, full image), area, score, [iou]}`` (see ``postprocess.py``)."""
        from networks.mal.postprocess import encode_prediction

        probs = self.crop_probs(batch, student_only=True, flip=False)
        out = []
        for rec in self._instances(batch, probs):
            pred = {"ann_id": rec["ann_id"], "image_id": rec["image_id"], "prob": rec["prob"], "mask": rec["mask"]}
            if "iou" in rec:
                pred["iou"] = rec["iou"]
            out.append(encode_prediction(pred, rec["bbox_xywh"], self.mask_thres))
        self._predictions.extend(out)
        return out

    def on_predict_epoch_end(self) -> None:
        """Gather predictions and, on rank 0, write the pseudo-label JSON (and overlays) atomically."""
        preds = gather_unique(self._predictions, "ann_id")  # box order: sums do not depend on the world size
        self._predictions = []
        if self.label_dump_path is None or self.global_rank != 0:
            return
        dm = getattr(self.trainer, "datamodule", None)
        coco = getattr(dm, "coco", {}).get("inference") if dm is not None else None
        if coco is None:
            _log.warning("MAL inference: no input COCO json on the datamodule; %d predictions not written",
                         len(preds))
            return
        from networks.mal.postprocess import write_pseudo_labels

        summary = write_pseudo_labels(coco, preds, self.label_dump_path, mask_thres=self.mask_thres)
        if self.num_overlays > 0 and getattr(dm, "predict_dataset", None) is not None:
            import json

            from networks.mal.postprocess import write_overlays

            with open(self.label_dump_path, encoding="utf-8") as fh:
                written = json.load(fh)
            overlay_dir = self.overlay_dir or self.label_dump_path.parent / "overlays"
            paths = write_overlays(written, dm.predict_dataset.img_root, overlay_dir, self.num_overlays)
            summary["overlays"] = [str(p) for p in paths]
        ious = [p["iou"] for p in preds if p.get("iou") is not None]
        if ious:
            # Plain mean over instances: not evaluate's class-averaged mIoU, hence another name.
            summary["mean_instance_iou"] = float(np.mean(ious))
        self.outputs = summary
