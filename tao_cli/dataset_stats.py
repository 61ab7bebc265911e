"""Rendering for ``tao dataset stats`` and ``tao dataset subset``: Rich tables and the JSON report.

The numbers come from :mod:`networks.common.dataset_stats` / :mod:`networks.common.dataset_subset`; this module
only loads the file, formats, and writes the optional outputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from networks.common.coco_io import load_coco
from networks.common.dataset_stats import coco_stats, plot_stats
from networks.common.errors import DataError
from networks.common.io import atomic_write_json


def dataset_stats(path: str | os.PathLike, *, plot_dir: str | os.PathLike | None = None,
                  json_out: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Statistics of the COCO instance or panoptic file ``path`` (see ``coco_stats``); with ``plot_dir`` the PNG
    histograms are written there, with ``json_out`` the statistics as JSON.  Returns ``(stats, written files)``."""
    if Path(path).suffix.lower() in (".jsonl", ".ndjson"):
        raise DataError(str(path), "is a JSON-lines (ODVG) file; stats reads COCO instance or panoptic JSON",
                        "run `tao dataset stats` on the COCO file the ODVG file was made from")
    stats = coco_stats(load_coco(path, field="FILE"), path)
    written: list[Path] = []
    if plot_dir is not None:
        written += plot_stats(stats, plot_dir)
    if json_out is not None:
        written.append(atomic_write_json(json_out, {"file": str(path), **stats}, indent=2))
    return stats, written


def print_stats(stats: dict[str, Any], path: str | os.PathLike, console: Console) -> None:
    """Two Rich tables: the summary and the per-class counts."""
    summary = Table(title=f"{path} ({stats['format']})", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    bpi = stats["boxes_per_image"]
    rows = [
        ("images", stats["images"]),
        ("annotations", stats["annotations"]),
        ("crowd (iscrowd: 1)", stats["crowd"]),
        ("empty images (no annotation)", stats["empty_images"]),
        ("small (area ≤ 32², non-crowd)", stats["sizes"]["small"]),
        ("medium (32² ≤ area ≤ 96²)", stats["sizes"]["medium"]),
        ("large (area ≥ 96²)", stats["sizes"]["large"]),
        ("boxes per image min / median / max",
         "-" if bpi is None else f"{bpi['min']} / {bpi['median']:g} / {bpi['max']}"),
    ]
    if stats["orphan_image"]:
        rows.append(("annotations with an unknown image_id", stats["orphan_image"]))
    if stats["unknown_category"]:
        rows.append(("annotations with an unknown category_id", stats["unknown_category"]))
    for what, value in rows:
        summary.add_row(what, str(value))
    console.print(summary)
    classes = Table(title="per class")
    for col, justify in (("id", "right"), ("name", "left"), ("instances", "right"), ("crowd", "right"),
                         ("images", "right")):
        classes.add_column(col, justify=justify)
    for c in stats["classes"]:
        classes.add_row(str(c["id"]), c["name"], str(c["instances"]), str(c["crowd"]), str(c["images"]))
    console.print(classes)
