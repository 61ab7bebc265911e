"""Scale benchmark for ``tao dataset validate`` / ``stats`` on a COCO-size instance file (not a test).

Generates a random but valid COCO instances file — by default 118,287 images and 860,001 annotations (COCO
train2017's counts), each with one polygon of 6–20 points inside its image — in a temporary directory, then times
each command in a fresh child process (so the generator's memory does not count) and records the child's peak
RSS (``VmHWM``, :func:`benchmarks.memory.peak_rss_mib`).  ``validate`` runs without image decoding (no ``--images``), on the
same code path as the CLI (``tao_cli.dataset_validate.validate``); ``stats`` loads the file and runs
``networks.common.dataset_stats.coco_stats`` when that module exists.  Prints the figures and writes
``benchmarks/results/dataset_scale.json``.  Target (issue 18): each ≤ 60 s and ≤ 4 GB.

    .venv/bin/python benchmarks/dataset_scale.py [--images 118287] [--annotations 860001] [--keep DIR] [--index]

With ``--index`` (issue 14) each network's training index of the same file is timed too, in its own child:
MAL's ``load_records``, Mask2Former's instance and panoptic ``_load_records`` (the panoptic JSON holds the same
images and one segment per annotation, ~860k ``segments_info`` entries) and Mask Grounding DINO's ``read_odvg`` (on
the file converted to ODVG first), each followed by the ``SerializedList`` its dataset keeps; reported are the time, the
peak RSS and the RSS still held once the index is built.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` is importable
from benchmarks.memory import peak_rss_mib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "dataset_scale.json"
LIMIT_S, LIMIT_GB = 60.0, 4.0


def generate(path: Path, n_images: int, n_anns: int, seed: int = 0) -> None:
    """Write the synthetic instances file: sizes from COCO's common shapes, 80 categories, every polygon a
    star-shaped ring inside its image (so the file is valid and ``validate`` must find nothing)."""
    rng = np.random.default_rng(seed)
    shapes = np.array([[640, 480], [480, 640], [640, 427], [500, 375], [640, 512]])
    wh = shapes[rng.integers(0, len(shapes), n_images)]
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": int(w), "height": int(h)}
              for i, (w, h) in enumerate(wh.tolist())]
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    img_idx = rng.integers(0, n_images, n_anns)
    iw, ih = wh[img_idx, 0].astype(np.float64), wh[img_idx, 1].astype(np.float64)
    radius = rng.uniform(2.0, 150.0, n_anns)
    radius = np.minimum(radius, np.minimum(iw, ih) / 2 - 1)
    cx = rng.uniform(radius, iw - radius)
    cy = rng.uniform(radius, ih - radius)
    npts = rng.integers(6, 21, n_anns)
    cat_ids = rng.integers(1, 81, n_anns)
    anns = []
    for k in range(n_anns):
        n = int(npts[k])
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = radius[k] * rng.uniform(0.5, 1.0, n)
        xs = np.round(cx[k] + r * np.cos(ang), 2)
        ys = np.round(cy[k] + r * np.sin(ang), 2)
        x0, y0 = float(xs.min()), float(ys.min())
        ring = np.empty(2 * n)
        ring[0::2], ring[1::2] = xs, ys
        anns.append({"id": k + 1, "image_id": int(img_idx[k]) + 1, "category_id": int(cat_ids[k]),
                     "segmentation": [ring.tolist()], "area": float(np.pi * radius[k] ** 2 * 0.5),
                     "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
                     "iscrowd": 0})
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"info": {"description": "dataset_scale benchmark"}, "images": images, "annotations": anns,
                   "categories": cats}, fh, separators=(",", ":"))


def panoptic_from_instances(path: Path, out: Path) -> None:
    """Write a COCO panoptic JSON with the images of the instances file at ``path`` and one segment per annotation
    (segment id = annotation id; PNG names only, the PNGs are not written: indexing does not open them)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(
            {"id": a["id"], "category_id": a["category_id"], "bbox": a["bbox"], "area": a["area"], "iscrowd": 0})
    anns = [{"image_id": im["id"], "file_name": im["file_name"].replace(".jpg", ".png"),
             "segments_info": by_image.get(im["id"], [])} for im in data["images"]]
    cats = [{**c, "isthing": 1} for c in data["categories"]]
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"images": data["images"], "annotations": anns, "categories": cats}, fh, separators=(",", ":"))


def _child(command: str, path: str) -> None:
    """Run one command on ``path`` in this (fresh) process and print its figures as one JSON line."""
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    extra: dict = {}
    if command == "validate":
        from rich.console import Console

        from tao_cli.dataset_validate import validate

        buf = io.StringIO()
        extra["exit_code"] = validate(path, console=Console(file=buf, width=120))
        extra["output_tail"] = buf.getvalue().strip().splitlines()[-1]
    elif command == "stats":
        from networks.common.coco_io import load_coco
        from networks.common.dataset_stats import coco_stats

        stats = coco_stats(load_coco(path, field=path))
        extra["keys"] = sorted(stats)[:12]
    else:
        extra.update(_index(command, path))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_gb": round(peak_rss_mib() / 1024, 3), **extra}))


def _index(command: str, path: str) -> dict:
    """A network's training index of the file (its loader's reading and checking, then the records serialized as
    its dataset keeps them); the records count and the memory still held once the index is built."""
    import gc

    from networks.common.serialized import SerializedList

    if command == "index_mal":
        from networks.mal.data import load_records

        records = SerializedList(load_records(path, field="dataset.train_ann_path")[0])
    elif command == "index_mask2former":
        from types import SimpleNamespace

        from networks.common.coco_io import load_coco
        from networks.mask2former.data import Category, LabelMap, _load_records

        cats = [Category(c["id"], c["name"], (0, 0, 0), True) for c in load_coco(path, field=path)["categories"]]
        gc.collect()
        split = SimpleNamespace(type="coco", img_dir=str(Path(path).parent), instance_json=path)
        records = SerializedList(_load_records(split, "train", LabelMap(cats, len(cats), contiguous=True)))
    elif command == "index_mask2former_panoptic":
        from types import SimpleNamespace

        from networks.common.coco_io import load_coco
        from networks.mask2former.data import Category, LabelMap, _load_records

        pan = Path(path).with_name("panoptic_scale.json")
        cats = [Category(c["id"], c["name"], (0, 0, 0), True) for c in load_coco(pan, field=pan)["categories"]]
        gc.collect()
        split = SimpleNamespace(type="panoptic", img_dir=str(Path(path).parent), panoptic_json=str(pan),
                                panoptic_dir=str(Path(path).parent))
        records = SerializedList(_load_records(split, "train", LabelMap(cats, len(cats), contiguous=True)))
    elif command == "index_mask_grounding_dino":
        from networks.common.coco_io import load_odvg_label_map
        from networks.mask_grounding_dino.data import read_odvg

        odvg = Path(path).with_name("train_odvg.jsonl")
        label_map = load_odvg_label_map(odvg.with_name("train_odvg_labelmap.json"))
        records = SerializedList(read_odvg(odvg, label_map, "json_file"))
    else:
        raise SystemExit(f"unknown command {command}")
    gc.collect()
    with open("/proc/self/status") as fh:
        held = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return {"records": len(records), "held_after_index_gb": round(held / 1024 ** 2, 3),
            "serialized_gb": round(records.nbytes / 1024 ** 3, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=118_287)
    ap.add_argument("--annotations", type=int, default=860_001)
    ap.add_argument("--keep", type=Path, default=None, help="Write the file here instead of a temp dir.")
    ap.add_argument("--index", action="store_true", help="Also time each network's training index of the file.")
    ap.add_argument("--child", nargs=2, metavar=("COMMAND", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="dataset_scale.")
        folder = Path(tmp.name)
    else:
        folder = args.keep
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / "instances_scale.json"
    try:
        t0 = time.perf_counter()
        generate(path, args.images, args.annotations)
        gen_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1024 ** 2
        print(f"generated {path} ({size_mb:.0f} MB, {args.images} images, {args.annotations} annotations) "
              f"in {gen_s:.1f} s", flush=True)
        commands = ["validate", "stats"]
        if args.index:  # each network's training index of the same file (issue 14); ODVG converted first
            sys.path.insert(0, str(ROOT))
            from networks.common.dataset_convert import coco_to_odvg

            coco_to_odvg(path, folder / "train_odvg.jsonl", label_map_out=folder / "train_odvg_labelmap.json")
            panoptic_from_instances(path, folder / "panoptic_scale.json")
            commands += ["index_mal", "index_mask2former", "index_mask2former_panoptic", "index_mask_grounding_dino"]
        results = {}
        for command in commands:
            proc = subprocess.run([sys.executable, __file__, "--child", command, str(path)], capture_output=True,
                                  text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if command.startswith("index_"):
                results[command] = res
                print(f"{command}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB, held after "
                      f"indexing {res['held_after_index_gb']:.2f} GB ({res['records']} records, serialized "
                      f"{res['serialized_gb']:.2f} GB)", flush=True)
                continue
            res["within_target"] = res["seconds"] <= LIMIT_S and res["peak_rss_gb"] <= LIMIT_GB
            results[command] = res
            print(f"{command}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB "
                  f"({'OK' if res['within_target'] else 'OVER TARGET'})", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpu_threads": os.cpu_count(),
                    "platform": platform.platform()},
        "dataset": {"images": args.images, "annotations": args.annotations, "file_mb": round(size_mb, 1),
                    "polygon_points": "6-20 per annotation, one ring"},
        "target": {"seconds": LIMIT_S, "peak_rss_gb": LIMIT_GB},
        "results": results,
    }
    sys.path.insert(0, str(ROOT))
    from networks.common.io import atomic_write_json

    atomic_write_json(RESULT, report, indent=2)
    print(f"written {RESULT}")
    return 0 if all(r.get("within_target", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
