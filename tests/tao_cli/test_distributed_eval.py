"""Distributed evaluate and inference (issue 14 §3): two CPU processes over gloo give the same metrics and the
same output files as one process, for every network.

The evaluation sets have an odd number of samples, so Lightning's ``DistributedSampler`` pads rank 1 with a
repeat of sample 0: a module that does not de-duplicate gathered records counts it twice (a count KPI or a
results file shows it), and one that writes from every rank or in rank order gives a different file.  Every
run is a CLI subprocess with a clean environment (Lightning DDP must not start inside pytest's process), on one
untrained checkpoint per network saved from ``build_module`` (a fixed seed makes its predictions non-trivial).
Batch size 1 everywhere: with larger batches Mask2Former and Mask Grounding DINO pad images to the largest of
the batch, which changes predictions with the batch's composition whatever the number of processes.
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from networks.common.synthetic import generate
from tao_cli.paths import configs_dir

from .engine.helpers import REPO, clean_env

pytestmark = pytest.mark.slow

TOL = 1e-9  # metrics
MASK_TOL = 1e-6  # boxes, scores, areas in results files


# ------------------------------------------------------------------------------------------------ helpers
def _both(net: str, action: str, root: Path, *overrides: str) -> tuple[Path, Path]:
    """Run ``action`` with 1 and with 2 processes (at the same time: both mostly wait on start-up); returns the
    two run directories."""
    spec = str(configs_dir() / net / "tiny.yaml")
    runs = []
    for n in (1, 2):
        run_dir = root / f"{action}_{n}"
        cmd = [sys.executable, "-m", "tao_cli", "model", net, action, "-e", spec, *overrides,
               f"{action}.num_gpus={n}", f"{action}.results_dir={run_dir}"]
        log = open(root / f"{action}_{n}.txt", "w")
        runs.append((run_dir, cmd, log, subprocess.Popen(cmd, env=clean_env(), cwd=str(REPO), stdout=log,
                                                         stderr=subprocess.STDOUT)))
    try:
        for run_dir, cmd, log, proc in runs:
            code = proc.wait(timeout=300)
            log.close()
            assert code == 0, (cmd, (root / f"{action}_{run_dir.name[-1]}.txt").read_text()[-4000:])
    finally:
        for _, _, log, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    log2 = (runs[1][0] / f"{action}.log").read_text()
    assert "world_size=2" in log2, log2[-2000:]
    return runs[0][0], runs[1][0]


def _status(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "status.json").read_text().splitlines() if line.strip()]


def _kpi_record(run_dir: Path) -> dict:
    kpis = [r["kpi"] for r in _status(run_dir) if r.get("kpi")]
    assert len(kpis) == 1, kpis  # written once, by rank 0
    return kpis[0]


def _outputs(run_dir: Path) -> dict:
    records = _status(run_dir)
    assert records[-1]["status"] == "SUCCESS"
    return records[-1].get("outputs") or {}


def _same(a, b, tol: float, where: str = "") -> None:
    """Recursive equality: ints, strings and structure exactly, floats within ``tol``."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        assert a == b, (where, a, b)
    elif isinstance(a, int) and isinstance(b, int):
        assert a == b, (where, a, b)  # counts
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol, (where, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), b if not isinstance(b, dict)
                                                                else sorted(b))
        for k in a:
            _same(a[k], b[k], tol, f"{where}.{k}")
    else:
        assert isinstance(a, list) and isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, tol, f"{where}[{i}]")


def _same_metrics(one: Path, two: Path) -> dict:
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    _same(m1, m2, TOL, "metrics.json")
    _same(_kpi_record(one), _kpi_record(two), TOL, "status kpi")
    return m1


def _canonical(records: list[dict], key) -> list[dict]:
    return sorted(records, key=lambda r: json.dumps(key(r), sort_keys=True))


def _same_records(a: list[dict], b: list[dict], key, where: str) -> None:
    """Same records within MASK_TOL (compared in canonical order), and in the same order in both files."""
    _same(_canonical(a, key), _canonical(b, key), MASK_TOL, where)
    assert [json.dumps(key(r), sort_keys=True) for r in a] == [json.dumps(key(r), sort_keys=True) for r in b], where


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _same_pngs(one: Path, two: Path, expected: set[str] | None = None) -> None:
    f1, f2 = _files(one), _files(two)
    assert f1, one
    assert sorted(f1) == sorted(f2)
    if expected is not None:
        assert set(f1) == expected
    assert f1 == f2  # pixel-identical pictures


_CHECKPOINTS: dict[str, Path] = {}


def _save_untrained(net_name: str, overrides: list[str], path: Path, tmp: Path) -> Path:
    """One untrained checkpoint per network (the model does not depend on the data paths or the mode)."""
    if net_name in _CHECKPOINTS:
        return _CHECKPOINTS[net_name]
    from networks.common.context import RunContext
    from tao_cli import registry
    from tao_cli.spec import load_spec

    net = registry.load(net_name)
    cfg = load_spec(net.config_class, "evaluate", configs_dir() / net_name / "tiny.yaml", overrides,
                    mandatory=False)
    torch.manual_seed(0)
    module = net.build_module(cfg, RunContext("evaluate", tmp, log=logging.getLogger("test")))
    torch.save({"state_dict": module.state_dict(), "tao_model": net_name, "epoch": 0, "global_step": 0}, path)
    _CHECKPOINTS[net_name] = path
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_eval")
    paths = generate(root / "synthetic", seed=3, num_train=1, num_val=5, image_size=64, referring=True)
    va = paths["val"]
    coco = json.loads(va["annotations"].read_text())
    assert len(coco["images"]) == 5
    # MAL evaluates boxes, not images: keep an odd number of them
    if len(coco["annotations"]) % 2 == 0:
        coco["annotations"] = coco["annotations"][:-1]
    assert len(coco["annotations"]) % 2 == 1
    odd = va["dir"] / "annotations_odd_boxes.json"
    odd.write_text(json.dumps(coco))
    lines = va["referring"].read_text().splitlines()
    if len(lines) % 2 == 0:
        lines = lines[:-1]
    assert len(lines) % 2 == 1
    referring = va["dir"] / "referring_odd.jsonl"
    referring.write_text("\n".join(lines) + "\n")
    return {"root": root, "val": va, "mal_boxes": odd, "referring": referring, "num_expressions": len(lines),
            "file_names": sorted(im["file_name"] for im in coco["images"])}


def _stems(names: list[str]) -> set[str]:
    return {str(Path(n).with_suffix(".png")) for n in names}


# ------------------------------------------------------------------------------------------------ the helpers
def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks holding what ``DistributedSampler`` gives them for 5 samples: rank 1 repeats 0."""
    import torch.distributed as dist

    from networks.common.distributed import gather_dict, gather_unique, is_rank_zero

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = [0, 2, 4] if rank == 0 else [1, 3, 0]
        result = {"dict": list(gather_dict({i: f"r{rank}-{i}" for i in ids}).items()),
                  "unique": gather_unique([{"id": i, "rank": rank} for i in ids], "id"),
                  "rank_zero": is_rank_zero()}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_gather_helpers_count_a_padded_repeat_once_in_sample_order(tmp_path):
    from networks.common.distributed import gather_dict, gather_unique

    torch.multiprocessing.spawn(_gather_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for res in results:  # every rank gets the same merged view
        assert [k for k, _ in res["dict"]] == [0, 1, 2, 3, 4]
        assert dict(res["dict"])[0] == "r1-0"  # the later rank's repeat wins (the same sample)
        assert [r["id"] for r in res["unique"]] == [0, 1, 2, 3, 4]
    assert [res["rank_zero"] for res in results] == [True, False]
    # without a process group: the same order, nothing gathered
    assert list(gather_dict({"b": 1, 3: 2, 1: 3, "a": 4})) == [1, 3, "a", "b"]
    assert [r["k"] for r in gather_unique([{"k": 2}, {"k": 1}, {"k": 2}], "k")] == [1, 2]


# ------------------------------------------------------------------------------------------------ MAL
def test_mal_evaluate_and_inference_match_one_process(data, tmp_path):
    va, boxes = data["val"], data["mal_boxes"]
    paths = [f"results_dir={tmp_path}", f"dataset.val_ann_path={boxes}", f"dataset.val_img_dir={va['images']}",
             f"dataset.train_ann_path={boxes}", f"dataset.train_img_dir={va['images']}",
             f"inference.ann_path={boxes}", f"inference.img_dir={va['images']}"]
    ckpt = _save_untrained("mal", paths, tmp_path / "mal.pth", tmp_path)
    one, two = _both("mal", "evaluate", tmp_path, *paths, f"evaluate.checkpoint={ckpt}", "evaluate.batch_size=1",
                     "evaluate.num_overlays=8")
    metrics = _same_metrics(one, two)
    n_boxes = len(json.loads(boxes.read_text())["annotations"])
    assert metrics["num_instances"] == n_boxes  # the padded repeat is not counted
    _same_pngs(one / "overlays", two / "overlays")
    with_boxes = {a["image_id"] for a in json.loads(boxes.read_text())["annotations"]}
    assert len(_files(one / "overlays")) == len(with_boxes) > 1

    one, two = _both("mal", "inference", tmp_path, *paths, f"inference.checkpoint={ckpt}", "inference.batch_size=1",
                     "inference.load_mask=true", "inference.num_overlays=8")
    out1, out2 = _outputs(one), _outputs(two)
    _same({k: v for k, v in out1.items() if k not in ("path", "overlays")},
          {k: v for k, v in out2.items() if k not in ("path", "overlays")}, TOL, "outputs")
    assert out1["annotations"] == n_boxes and out1["missing"] == 0 and "mean_instance_iou" in out1
    j1 = json.loads((one / "instances_val2017_mal.json").read_text())
    j2 = json.loads((two / "instances_val2017_mal.json").read_text())
    _same({k: v for k, v in j1.items() if k != "annotations"}, {k: v for k, v in j2.items() if k != "annotations"},
          0, "pseudo-label json")
    _same_records(j1["annotations"], j2["annotations"], lambda a: a["id"], "pseudo-label annotations")
    assert sorted(a["id"] for a in j1["annotations"]) == sorted({a["id"] for a in j1["annotations"]})
    _same_pngs(one / "overlays", two / "overlays")


# ------------------------------------------------------------------------------------------------ Mask2Former
def _m2f_paths(data, tmp_path) -> list[str]:
    va = data["val"]
    return [f"results_dir={tmp_path}", f"dataset.label_map={va['label_map']}",
            f"dataset.val.img_dir={va['images']}", f"dataset.val.panoptic_json={va['panoptic_json']}",
            f"dataset.val.panoptic_dir={va['panoptic_dir']}", f"dataset.val.instance_json={va['annotations']}",
            f"dataset.test.img_dir={va['images']}", "dataset.val.batch_size=1", "dataset.test.batch_size=1"]


@pytest.mark.parametrize("mode", ["panoptic", "instance"])
def test_mask2former_evaluate_and_inference_match_one_process(data, tmp_path, mode):
    """Both modes: semantic mIoU (confusion matrix) and the overlays; panoptic: PQ, then inference's
    ``panoptic.json``, its PNGs and the overlays; instance: mask AP (its inference writes ``instances.json`` from
    the same gathered, ordered records as ``panoptic.json``, so it is not run again)."""
    # the untrained model's class scores are low: keep every query so that panoptic segments exist
    paths = [*_m2f_paths(data, tmp_path), f"model.mode={mode}", "model.object_mask_threshold=0.0"]
    ckpt = _save_untrained("mask2former", paths, tmp_path / "m2f.pth", tmp_path)
    one, two = _both("mask2former", "evaluate", tmp_path, *paths, f"evaluate.checkpoint={ckpt}",
                     "evaluate.num_overlays=8")
    metrics = _same_metrics(one, two)
    assert {"mIoU", "PQ" if mode == "panoptic" else "AP"} <= set(metrics)
    assert 0.0 < metrics["mIoU"] < 1.0
    if mode == "instance":
        assert metrics["AP"] > 0.0
    names = _stems(data["file_names"])
    _same_pngs(one / "overlays", two / "overlays", names)
    if mode != "panoptic":
        return

    one, two = _both("mask2former", "inference", tmp_path, *paths, f"inference.checkpoint={ckpt}")
    out1, out2 = _outputs(one), _outputs(two)
    assert out1["num_images"] == out2["num_images"] == 5
    _same_pngs(one / "overlays", two / "overlays", names)
    p1 = json.loads((one / "panoptic.json").read_text())
    p2 = json.loads((two / "panoptic.json").read_text())
    _same(p1["categories"], p2["categories"], 0, "categories")
    _same_records(p1["images"], p2["images"], lambda r: r["file_name"], "panoptic images")
    _same_records(p1["annotations"], p2["annotations"], lambda r: r["file_name"], "panoptic annotations")
    assert len({r["file_name"] for r in p1["annotations"]}) == len(p1["annotations"]) == 5
    assert any(r["segments_info"] for r in p1["annotations"])
    _same_pngs(one / "panoptic", two / "panoptic", names)


# ------------------------------------------------------------------------------------------------ Mask Grounding DINO
def _mgd_paths(data, tmp_path, test_json: Path, data_type: str = "") -> list[str]:
    va = data["val"]
    return [f"results_dir={tmp_path}", "dataset.batch_size=1",
            f"dataset.infer_data_sources.image_dir={va['images']}",
            f"dataset.test_data_sources={{image_dir: {va['images']}, json_file: {test_json}, "
            f"data_type: '{data_type}'}}",
            f"dataset.train_data_sources=[{{image_dir: {va['images']}, json_file: {va['odvg']}, "
            f"label_map: {va['odvg_labelmap']}}}]",
            f"dataset.val_data_sources={{image_dir: {va['images']}, json_file: {va['annotations']}}}"]


def test_mask_grounding_dino_coco_evaluate_and_inference_match_one_process(data, tmp_path):
    va = data["val"]
    paths = _mgd_paths(data, tmp_path, va["annotations"])
    ckpt = _save_untrained("mask_grounding_dino", paths, tmp_path / "mgd.pth", tmp_path)
    one, two = _both("mask_grounding_dino", "evaluate", tmp_path, *paths, f"evaluate.checkpoint={ckpt}",
                     "evaluate.num_overlays=8")
    metrics = _same_metrics(one, two)
    assert {"bbox_val_mAP", "segm_val_mAP", "val_loss"} <= set(metrics)
    _same_pngs(one / "overlays", two / "overlays", _stems(data["file_names"]))

    one, two = _both("mask_grounding_dino", "inference", tmp_path, *paths, f"inference.checkpoint={ckpt}",
                     "inference.conf_threshold=0.0")
    out1, out2 = _outputs(one), _outputs(two)
    assert out1["num_images"] == out2["num_images"] == 5
    assert out1["num_detections"] == out2["num_detections"] > 0
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    _same_records(r1, r2, lambda d: (d["file_name"], d["category_id"], round(d["score"], 5),
                                     d["segmentation"]["counts"]), "results.json")
    i1 = json.loads((one / "images.json").read_text())
    i2 = json.loads((two / "images.json").read_text())
    _same(i1, i2, 0, "images.json")
    assert sorted(im["file_name"] for im in i1) == data["file_names"]
    _same_pngs(one / "overlays", two / "overlays", _stems(data["file_names"]))


def test_mask_grounding_dino_referring_evaluate_matches_one_process(data, tmp_path):
    paths = _mgd_paths(data, tmp_path, data["referring"], "VG")
    ckpt = _save_untrained("mask_grounding_dino", paths, tmp_path / "mgd.pth", tmp_path)
    one, two = _both("mask_grounding_dino", "evaluate", tmp_path, *paths, f"evaluate.checkpoint={ckpt}",
                     "evaluate.conf_threshold=0.5", "evaluate.num_overlays=0")
    metrics = _same_metrics(one, two)
    assert metrics["test_num_expressions"] == data["num_expressions"]
    name = f"{data['referring'].stem}_results.json"
    r1 = json.loads((one / name).read_text())
    r2 = json.loads((two / name).read_text())
    _same({k: v for k, v in r1.items() if k != "expressions"}, {k: v for k, v in r2.items() if k != "expressions"},
          TOL, "referring results")
    _same_records(r1["expressions"], r2["expressions"], lambda r: r["expression_id"], "expressions")
    assert len(r1["expressions"]) == data["num_expressions"]
