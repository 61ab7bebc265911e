"""Referring-expression segmentation metrics (GRES style), shared and torch-free.

One *expression* is one (image, referring sentence) pair.  Its ground truth is the **merged** mask of every
object it names (all-zero for a no-target expression); its prediction is the merged mask of every instance the
model kept (all-zero when it kept none or flagged the expression as no-target), both at the original image size.
Per expression: ``I = |gt ∩ pred|``, ``U = |gt ∪ pred|`` and ``IoU = I / U``, with the GRES convention that an
empty ground truth predicted empty has IoU 1 (and a wrong empty/non-empty call has IoU 0).

:class:`ReferringMetrics` accumulates expressions and reports, under TAO's names (tao-core metric patterns
``(val|test)_(mIoU|overall_IoU|mAP50|mAP|T_acc|N_acc)``):

* ``mIoU`` — gIoU, the mean per-expression IoU;
* ``overall_IoU`` — cIoU, ``ΣI / ΣU`` over all expressions (large objects weigh more);
* ``T_acc`` — fraction of expressions *with* a target whose prediction is not empty;
* ``N_acc`` — fraction of no-target expressions predicted empty;
* ``Pr@0.7``, ``Pr@0.8``, ``Pr@0.9`` — fraction of expressions whose IoU is ≥ the threshold;
* ``mAP50``, ``mAP`` — mask AP at IoU 0.5 and over 0.5:0.95 (COCOeval of ``coco_backend``), one detection per
  expression (its merged mask, confidence = mean score of its kept instances) against one ground truth per
  expression with a target; a prediction on a no-target expression is a false positive;
* counts ``num_expressions``, ``num_no_target``.

A rate whose denominator is 0 (``N_acc`` with no no-target expression, ``mAP`` with no target at all) is None.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["PRECISION_THRESHOLDS", "ReferringMetrics", "expression_iou", "referring_metric_names"]

#: IoU thresholds of the ``Pr@k`` metrics (GRES / ReLA).
PRECISION_THRESHOLDS: tuple[float, ...] = (0.7, 0.8, 0.9)


def referring_metric_names() -> list[str]:
    """The metric keys :meth:`ReferringMetrics.compute` returns, in order (without a ``val_``/``test_`` prefix)."""
    return (["mIoU", "overall_IoU", "T_acc", "N_acc"] + [f"Pr@{t}" for t in PRECISION_THRESHOLDS]
            + ["mAP50", "mAP", "num_expressions", "num_no_target"])


def _as_bool(mask: Any) -> np.ndarray:
    return np.asarray(mask) > 0


def expression_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[float, int, int]:
    """``(IoU, I, U)`` of one expression's merged masks (same shape, nonzero = foreground).

    Both empty ⇒ IoU 1.0 (a correct no-target answer), I = U = 0.
    """
    g, p = _as_bool(gt), _as_bool(pred)
    if g.shape != p.shape:
        raise ValueError(f"expression_iou: shapes differ, gt {g.shape} vs pred {p.shape}")
    inter = int(np.count_nonzero(g & p))
    union = int(np.count_nonzero(g | p))
    return (1.0 if union == 0 else inter / union), inter, union


class ReferringMetrics:
    """Accumulates expressions (see module doc); :meth:`rows` / :meth:`from_rows` carry them across ranks."""

    def __init__(self) -> None:
        self._rows: dict[Any, dict] = {}

    def update(self, key: Any, gt_mask: np.ndarray, pred_mask: np.ndarray, score: float | None = None,
               **extra: Any) -> dict:
        """Add one expression under ``key`` (a later update of the same key replaces it: a distributed sampler may
        repeat samples).  ``gt_mask``/``pred_mask`` are the merged H×W masks at the original size; ``score`` the
        confidence of the prediction (mean score of its kept instances; ignored when ``pred_mask`` is empty).
        ``extra`` fields (file name, caption, ...) are kept in the row.  Returns the row."""
        from networks.common.coco_io import mask_to_rle

        iou, inter, union = expression_iou(gt_mask, pred_mask)
        g, p = _as_bool(gt_mask), _as_bool(pred_mask)
        row = {**extra, "key": key, "gt_empty": not g.any(), "pred_empty": not p.any(), "iou": float(iou),
               "I": inter, "U": union, "score": float(score) if score is not None and p.any() else None,
               "gt_rle": mask_to_rle(g) if g.any() else None, "pred_rle": mask_to_rle(p) if p.any() else None,
               "size": [int(g.shape[0]), int(g.shape[1])]}
        self._rows[key] = row
        return row

    def rows(self) -> list[dict]:
        """The accumulated rows (plain, picklable dicts), in insertion order."""
        return list(self._rows.values())

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> ReferringMetrics:
        """Rebuild from :meth:`rows` (e.g. the concatenation over ranks)."""
        obj = cls()
        for r in rows:
            obj._rows[r["key"]] = dict(r)
        return obj

    def __len__(self) -> int:
        return len(self._rows)

    def _mask_ap(self, rows: Sequence[dict], coco_backend: str) -> tuple[float | None, float | None]:
        """(mAP over IoU .5:.95, mAP50) by COCOeval of ``coco_backend``: one image per expression, one
        category."""
        from networks.common.coco_io import rle_area, rle_to_bbox
        from networks.common.metrics import coco_eval_stats

        images, anns, dets = [], [], []
        for i, r in enumerate(rows, start=1):
            images.append({"id": i, "height": r["size"][0], "width": r["size"][1]})
            if r["gt_rle"] is not None:
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                             "segmentation": r["gt_rle"], "area": float(rle_area(r["gt_rle"])),
                             "bbox": rle_to_bbox(r["gt_rle"])})
            if r["pred_rle"] is not None:
                dets.append({"image_id": i, "category_id": 1, "segmentation": r["pred_rle"],
                             "score": float(r["score"] if r["score"] is not None else 1.0)})
        if not anns:
            return None, None
        gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "referred"}]}
        stats = coco_eval_stats(gt, dets, "segm", backend=coco_backend)
        return (None if stats[0] < 0 else stats[0]), (None if stats[1] < 0 else stats[1])

    def compute(self, *, coco_backend: str = "faster_coco_eval") -> dict[str, float | int | None]:
        """The metrics of the module doc, keyed by :func:`referring_metric_names`; ``coco_backend`` (the spec's
        ``evaluate.coco_backend``, see :func:`networks.common.metrics.coco_eval_stats`) computes the mask AP."""
        rows = self.rows()
        n = len(rows)
        target = [r for r in rows if not r["gt_empty"]]
        no_target = [r for r in rows if r["gt_empty"]]
        ious = np.asarray([r["iou"] for r in rows], dtype=np.float64)
        sum_i = sum(r["I"] for r in rows)
        sum_u = sum(r["U"] for r in rows)
        out: dict[str, float | int | None] = {
            "mIoU": float(ious.mean()) if n else None,
            # all expressions correct-empty ⇒ ΣU = 0: nothing was segmented nor should have been
            "overall_IoU": (sum_i / sum_u if sum_u else (1.0 if n else None)),
            "T_acc": (sum(not r["pred_empty"] for r in target) / len(target)) if target else None,
            "N_acc": (sum(r["pred_empty"] for r in no_target) / len(no_target)) if no_target else None,
        }
        for t in PRECISION_THRESHOLDS:
            out[f"Pr@{t}"] = float((ious >= t).mean()) if n else None
        out["mAP"], out["mAP50"] = self._mask_ap(rows, coco_backend) if n else (None, None)
        out = {k: out[k] for k in referring_metric_names() if k in out}
        out["num_expressions"] = n
        out["num_no_target"] = len(no_target)
        return out
