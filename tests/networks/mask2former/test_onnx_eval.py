"""Evaluate / inference from an exported ONNX file (ONNX Runtime, CPU) against the same model's checkpoint.

Each mode: a seeded tiny model is saved as a checkpoint and exported by the real ``export`` action at the test
size (64×64: ``dataset.val/test.target_size`` and ``test_min_size`` make every image exactly the graph's
input).  Then ``evaluate`` and ``inference`` run through the real ``tao`` entry point from the checkpoint and
from the ONNX file; metrics, output files, masks and scores must agree.  The dry-run cases check the
``checkpoint`` / ``onnx_file`` / ``trt_engine`` rule and the ONNX file checks (mode, channels, existence).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from .conftest import make_tiny_cfg

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64
TOL = 1e-3


def _tao(monkeypatch, capfd, *argv: str) -> tuple[int, str, str]:
    """Run ``tao <argv>`` in-process; (exit code, stdout, stderr)."""
    from tao_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["tao", *argv])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


def evaluate_each(monkeypatch, capfd, spec: Path, tmp_path: Path, sources: dict[str, str]) -> dict[str, dict]:
    """``{name: metrics.json}`` of one ``evaluate`` per ``{name: model source override}`` (each into
    ``tmp_path/<name>``); prints their mIoU."""
    metrics = {}
    for name, source in sources.items():
        code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "evaluate", "-e", str(spec),
                            f"results_dir={tmp_path / name}", source)
        assert code == 0, err[-3000:]
        metrics[name] = json.loads((tmp_path / name / "evaluate" / "metrics.json").read_text())
    with capfd.disabled():
        print("\n" + ", ".join(f"mIoU {name} {m['mIoU']:.4f}" for name, m in metrics.items()))
    return metrics


def _spec(data: dict, mode: str, root: Path) -> Path:
    cfg = make_tiny_cfg(data, mode=mode)
    cfg.results_dir = str(root / "results")
    for split in ("val", "test"):
        cfg.dataset[split].target_size = [SIZE, SIZE]
    cfg.dataset.augmentation.test_min_size = SIZE
    cfg.dataset.augmentation.test_max_size = SIZE
    cfg.evaluate.num_overlays = 2
    cfg.model.test_topk_per_image = 10
    cfg.evaluate.checkpoint = cfg.inference.checkpoint = None  # each run names its source
    cfg.export.checkpoint = cfg.export.onnx_file = "???"
    path = root / f"{mode}.yaml"
    OmegaConf.save(cfg, path)
    return path


def _checkpoint(spec: Path, path: Path) -> Path:
    """A seeded random model (class head spread out so that thresholds and top-k are not ties) as a checkpoint."""
    from networks.mask2former.module import Mask2FormerModule
    from tao_cli.engine.checkpoints import save_checkpoint_file

    cfg = OmegaConf.load(spec)
    from networks.mask2former.config import ExperimentConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg)
    torch.manual_seed(0)
    module = Mask2FormerModule(cfg)
    with torch.no_grad():
        module.model.sem_seg_head.predictor.class_embed.weight.normal_(0, 0.5)
    save_checkpoint_file({"state_dict": module.state_dict()}, path, network="mask2former")
    return path


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _rle_mask(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode()
    return mask_utils.decode(r).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _main(mp, *argv: str) -> None:
    from tao_cli.cli import main

    mp.setattr(sys, "argv", ["tao", *argv])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, f"tao {' '.join(argv[:3])} failed"


def _self_labelled_val(mode: str, inf: Path, images: Path, root: Path) -> dict:
    """``dataset.val`` whose ground truth is the checkpoint's own inference output ``inf``: a random model scores
    ~0 on the real labels, which would make every metric comparison trivial; on its own predictions the main
    KPI is high, so a runtime that predicts differently shows up in every metric."""
    from networks.common.coco_io import rle_area, rle_to_bbox

    if mode == "semantic":
        lines = [json.dumps({"img": str(p), "segm": str(inf / "semantic" / p.with_suffix(".png").name)})
                 for p in sorted(images.iterdir())]
        (root / "self_semantic.jsonl").write_text("\n".join(lines) + "\n")
        return {"type": "ade", "annot_file": str(root / "self_semantic.jsonl"), "root_dir": ""}
    if mode == "panoptic":
        doc = json.loads((inf / "panoptic.json").read_text())
        for ann in doc["annotations"]:
            ann["file_name"] = Path(ann["file_name"]).name
            ann["segments_info"] = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0,
                                     "area": s["area"]} for s in ann["segments_info"]]
        (root / "self_panoptic.json").write_text(json.dumps(doc))
        return {"type": "coco_panoptic", "panoptic_json": str(root / "self_panoptic.json"),
                "panoptic_dir": str(inf / "panoptic"), "img_dir": str(images)}
    doc = json.loads((inf / "images.json").read_text())
    doc["annotations"] = [{"id": k + 1, "image_id": d["image_id"], "category_id": d["category_id"], "iscrowd": 0,
                           "segmentation": d["segmentation"], "area": float(rle_area(d["segmentation"])),
                           "bbox": rle_to_bbox(d["segmentation"])}
                          for k, d in enumerate(json.loads((inf / "instances.json").read_text()))
                          if d["score"] > 0.3 and rle_area(d["segmentation"]) > 0]
    (root / "self_instances.json").write_text(json.dumps(doc))
    return {"type": "coco", "instance_json": str(root / "self_instances.json"), "img_dir": str(images)}


def self_label(mp, spec: Path, ckpt: Path, data: dict, mode: str, root: Path):
    """Run ``inference`` of ``ckpt`` on the val images and point ``spec``'s ``dataset.val`` at its output
    (:func:`_self_labelled_val`); returns the rewritten spec (an OmegaConf node, already saved)."""
    _main(mp, "model", "mask2former", "inference", "-e", str(spec), f"results_dir={root / ('gt_' + mode)}",
          f"inference.checkpoint={ckpt}")
    cfg = OmegaConf.load(spec)
    cfg.dataset.val = OmegaConf.merge(cfg.dataset.val, _self_labelled_val(
        mode, root / f"gt_{mode}" / "inference", Path(data["val"]["images"]), root))
    OmegaConf.save(cfg, spec)
    return cfg


def quantize_checkpoint(data: dict, root: Path, *overrides: str) -> tuple[Path, Path, Path]:
    """(spec, fp32 checkpoint, quantize run dir) after the ``quantize`` action on a seeded tiny semantic
    checkpoint whose ``dataset.val`` it labelled itself (:func:`self_label`), with ``quantize.device=cpu``, the val
    images as calibration images and ``overrides``; run in ``root``."""
    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        mp.chdir(root)
        spec = _spec(data, "semantic", root)
        ckpt = _checkpoint(spec, root / "semantic.pth")
        cfg = self_label(mp, spec, ckpt, data, "semantic", root)
        cfg.quantize.device = "cpu"
        cfg.dataset.quant_calibration_dataset.images_dir = str(Path(data["val"]["images"]))
        OmegaConf.save(cfg, spec)
        _main(mp, "model", "mask2former", "quantize", "-e", str(spec), f"results_dir={root / 'results'}",
              f"quantize.model_path={ckpt}", *overrides)
    finally:
        mp.undo()
    return spec, ckpt, root / "results" / "quantize"


def export_tiny(mp, data: dict, mode: str, root: Path, batch: int = -1) -> tuple[Path, Path, Path]:
    """(spec, checkpoint, ONNX) of a seeded tiny ``mode`` model, exported by the export action at SIZE x SIZE
    under ``root`` (the current directory)."""
    spec = _spec(data, mode, root)
    ckpt = _checkpoint(spec, root / f"{mode}.pth")
    onnx_path = root / f"{mode}.onnx"
    _main(mp, "model", "mask2former", "export", "-e", str(spec), f"results_dir={root / ('export_' + mode)}",
          f"export.checkpoint={ckpt}", f"export.onnx_file={onnx_path}", f"export.input_height={SIZE}",
          f"export.input_width={SIZE}", f"export.batch_size={batch}")
    assert onnx_path.is_file()
    return spec, ckpt, onnx_path


@pytest.fixture(scope="module")
def exported(m2f_synthetic, tmp_path_factory):
    """{mode: (spec, checkpoint, onnx)}: the ONNX written by the export action (the semantic one with a fixed
    batch of 2, for chunked runs); the spec's ``dataset.val`` is self-labelled (:func:`_self_labelled_val`)."""
    import _pytest.monkeypatch

    root = tmp_path_factory.mktemp("m2f_onnx")
    mp = _pytest.monkeypatch.MonkeyPatch()
    out = {}
    try:
        mp.chdir(root)
        for mode in ("semantic", "panoptic", "instance"):
            spec, ckpt, onnx_path = export_tiny(mp, m2f_synthetic, mode, root, 2 if mode == "semantic" else -1)
            self_label(mp, spec, ckpt, m2f_synthetic, mode, root)
            out[mode] = (spec, ckpt, onnx_path)
    finally:
        mp.undo()
    return out


def _run_both(monkeypatch, capfd, tmp_path, spec, ckpt, onnx_path, action, *extra):
    dirs = {}
    for name, source in (("pt", f"{action}.checkpoint={ckpt}"), ("ort", f"{action}.onnx_file={onnx_path}")):
        results = tmp_path / name
        code, out, err = _tao(monkeypatch, capfd, "model", "mask2former", action, "-e", str(spec),
                              f"results_dir={results}", source, *extra)
        assert code == 0, (name, err[-3000:])
        dirs[name] = results / action
    return dirs["pt"], dirs["ort"]


@pytest.mark.parametrize("mode", ["semantic", "panoptic", "instance"])
def test_evaluate_from_onnx_matches_checkpoint(exported, mode, monkeypatch, capfd, tmp_path):
    spec, ckpt, onnx_path = exported[mode]
    monkeypatch.chdir(tmp_path)
    extra = ("evaluate.batch_size=3",) if mode == "semantic" else ()  # 3 on a batch-2 graph: chunk + pad
    pt, ort = _run_both(monkeypatch, capfd, tmp_path, spec, ckpt, onnx_path, "evaluate", *extra)
    m_pt = json.loads((pt / "metrics.json").read_text())
    m_ort = json.loads((ort / "metrics.json").read_text())
    runtime = m_ort.pop("runtime")
    assert runtime["name"] == "onnxruntime" and runtime["providers"] == ["CPUExecutionProvider"]
    assert Path(runtime["onnx_file"]) == onnx_path.resolve() and runtime["input_hw"] == [SIZE, SIZE]
    assert "runtime" not in m_pt
    assert set(m_pt) == set(m_ort)
    main = {"semantic": "mIoU", "panoptic": "PQ", "instance": "AP"}[mode]
    assert main in m_pt and "mIoU" in m_pt
    assert m_pt[main] > 0.1 and m_pt["mIoU"] > 0.1  # not a degenerate all-zero comparison
    # TAO's mIoU needs the class-probability map, which only a semantic graph outputs: a panoptic/instance graph
    # reports None for it rather than a differently defined number under the same name.
    semantic_keys = ("mIoU", "ACC_all", "pixel_accuracy")
    for key, value in m_pt.items():
        if mode != "semantic" and key in semantic_keys:
            assert m_ort[key] is None, key
        elif value is None:
            assert m_ort[key] is None, key
        else:
            assert m_ort[key] == pytest.approx(value, abs=TOL), (key, value, m_ort[key])
    assert _files(pt) == _files(ort)
    assert "onnxruntime" in (ort / "evaluate.log").read_text()
    for png in sorted((pt / "overlays").glob("*.png")):  # ground truth | prediction pictures
        a, b = np.asarray(Image.open(png)), np.asarray(Image.open(ort / "overlays" / png.name))
        assert a.shape == b.shape and (a == b).all(-1).mean() > 0.99, png.name


@pytest.mark.parametrize("mode", ["semantic", "panoptic", "instance"])
def test_inference_from_onnx_writes_the_same_outputs(exported, mode, monkeypatch, capfd, tmp_path):
    spec, ckpt, onnx_path = exported[mode]
    monkeypatch.chdir(tmp_path)
    pt, ort = _run_both(monkeypatch, capfd, tmp_path, spec, ckpt, onnx_path, "inference")
    files = _files(pt)
    assert files == _files(ort)
    pngs = sorted(f for f in files if f.startswith(("semantic/", "panoptic/", "overlays/")))
    assert pngs
    for rel in pngs:
        a, b = np.asarray(Image.open(pt / rel)), np.asarray(Image.open(ort / rel))
        assert a.shape == b.shape
        same = (a == b) if a.ndim == 2 else (a == b).all(-1)
        assert same.mean() >= (0.999 if not rel.startswith("overlays/") else 0.99), rel
    if mode == "panoptic":
        a, b = (json.loads((d / "panoptic.json").read_text()) for d in (pt, ort))
        assert len(a["annotations"]) == len(b["annotations"]) == 4
        for x, y in zip(a["annotations"], b["annotations"], strict=True):
            assert len(x["segments_info"]) == len(y["segments_info"])
            for s, t in zip(x["segments_info"], y["segments_info"], strict=True):
                assert s["category_id"] == t["category_id"] and s["score"] == pytest.approx(t["score"], abs=TOL)
        assert sum(len(x["segments_info"]) for x in a["annotations"]) > 0
    if mode == "instance":
        a, b = (json.loads((d / "instances.json").read_text()) for d in (pt, ort))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
            assert x["score"] == pytest.approx(y["score"], abs=TOL)
            assert _iou(_rle_mask(x["segmentation"]), _rle_mask(y["segmentation"])) >= 0.999


# ----------------------------------------------------------------------------------------- dry-run rules
def _dry(monkeypatch, capfd, spec: Path, action: str, *extra: str) -> tuple[int, list[str], str]:
    code, out, err = _tao(monkeypatch, capfd, "model", "mask2former", action, "-e", str(spec), "--dry-run", *extra)
    return code, [line for line in err.splitlines() if line.strip()], out


@pytest.mark.parametrize("action", ["evaluate", "inference"])
@pytest.mark.parametrize("sources", [(), ("checkpoint", "onnx_file"), ("checkpoint", "trt_engine"),
                                     ("checkpoint", "onnx_file", "trt_engine")], ids=["none", "two", "two-trt",
                                                                                       "three"])
def test_exactly_one_model_source(exported, action, sources, monkeypatch, capfd, tmp_path):
    spec, ckpt, onnx_path = exported["panoptic"]
    monkeypatch.chdir(tmp_path)
    values = {"checkpoint": ckpt, "onnx_file": onnx_path, "trt_engine": tmp_path / "model.engine"}
    code, lines, _ = _dry(monkeypatch, capfd, spec, action, f"results_dir={tmp_path}",
                          *(f"{action}.{k}={values[k]}" for k in sources))
    assert code == 2 and len(lines) == 1, lines
    for key in ("checkpoint", "onnx_file", "trt_engine"):
        assert f"{action}.{key}" in lines[0]
    assert "exactly one" in lines[0]


@pytest.mark.parametrize("action", ["evaluate", "inference"])
def test_onnx_file_alone_needs_no_checkpoint(exported, action, monkeypatch, capfd, tmp_path):
    spec, _, onnx_path = exported["panoptic"]
    monkeypatch.chdir(tmp_path)
    code, lines, out = _dry(monkeypatch, capfd, spec, action, f"results_dir={tmp_path}",
                            f"{action}.onnx_file={onnx_path}")
    assert code == 0, lines
    assert f"onnx file:    {onnx_path}" in out and "checkpoint:" not in out.split("# Plan")[1]



def test_onnx_runtime_takes_the_run_thread_count(exported, monkeypatch, capfd, tmp_path):
    """The plan's intra-op thread count (here OMP_NUM_THREADS=1) reaches ONNX Runtime, whose default would be
    one thread per physical core (2 here), and metrics.json records it."""
    spec, _, onnx_path = exported["semantic"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, _, err = _tao(monkeypatch, capfd, "model", "mask2former", "evaluate", "-e", str(spec),
                        f"results_dir={tmp_path}", f"evaluate.onnx_file={onnx_path}")
    assert code == 0, err[-3000:]
    log = (tmp_path / "evaluate" / "evaluate.log").read_text()
    assert "Intra-op threads: 1 per process (from OMP_NUM_THREADS)" in log and "1 intra-op thread(s)" in log
    assert json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["runtime"]["intra_op_threads"] == 1

def test_trt_engine_alone_keeps_its_refusal(exported, monkeypatch, capfd, tmp_path):
    spec, _, _ = exported["panoptic"]
    monkeypatch.chdir(tmp_path)
    code, lines, _ = _dry(monkeypatch, capfd, spec, "evaluate", f"results_dir={tmp_path}",
                          f"evaluate.trt_engine={tmp_path / 'model.engine'}")
    assert code == 2 and len(lines) == 1 and "evaluate.trt_engine" in lines[0] and "TensorRT" in lines[0], lines


def test_onnx_of_another_mode_is_refused(exported, monkeypatch, capfd, tmp_path):
    spec, _, _ = exported["panoptic"]
    _, _, semantic_onnx = exported["semantic"]
    monkeypatch.chdir(tmp_path)
    code, lines, _ = _dry(monkeypatch, capfd, spec, "evaluate", f"results_dir={tmp_path}",
                          f"evaluate.onnx_file={semantic_onnx}")
    assert code == 2 and len(lines) == 1, lines
    assert "evaluate.onnx_file" in lines[0] and "'semantic'" in lines[0] and "'panoptic'" in lines[0]


def test_missing_or_bad_onnx_file_is_one_line(exported, monkeypatch, capfd, tmp_path):
    spec, _, _ = exported["panoptic"]
    monkeypatch.chdir(tmp_path)
    code, lines, _ = _dry(monkeypatch, capfd, spec, "inference", f"results_dir={tmp_path}",
                          f"inference.onnx_file={tmp_path / 'nope.onnx'}")
    assert code == 2 and len(lines) == 1 and "inference.onnx_file" in lines[0] and "does not exist" in lines[0]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model" * 10)
    code, lines, _ = _dry(monkeypatch, capfd, spec, "inference", f"results_dir={tmp_path}",
                          f"inference.onnx_file={junk}")
    assert code == 2 and len(lines) == 1 and "inference.onnx_file" in lines[0], lines


def test_wrong_input_channels_is_refused(exported, monkeypatch, capfd, tmp_path):
    """A graph with the panoptic output names but a 1-channel input."""
    spec, _, _ = exported["panoptic"]
    monkeypatch.chdir(tmp_path)

    class Gray(torch.nn.Module):
        def forward(self, x):
            m = x.repeat(1, 2, 1, 1)
            s = m.mean((2, 3))
            return m, m, s, s.long()

    path = tmp_path / "gray.onnx"
    torch.onnx.export(Gray(), (torch.zeros(1, 1, SIZE, SIZE),), str(path), input_names=["inputs"],
                      output_names=["prob_masks", "pred_masks", "pred_scores", "pred_classes"], opset_version=17,
                      dynamo=False)
    code, lines, _ = _dry(monkeypatch, capfd, spec, "evaluate", f"results_dir={tmp_path}",
                          f"evaluate.onnx_file={path}")
    assert code == 2 and len(lines) == 1 and "1 channels" in lines[0] and "evaluate.onnx_file" in lines[0], lines


def test_other_input_size_is_resized_and_warned(exported):
    """Images whose test size is not the graph's H×W are resized to it (the un-padded part only)."""
    from networks.mask2former.onnx_runtime import OnnxHead

    _, _, onnx_path = exported["semantic"]
    head = OnnxHead(onnx_path, "semantic")
    assert head.hw == (SIZE, SIZE) and head.batch == 2
    images = torch.zeros(3, 3, 96, 96)
    images[0, :, :32, :48] = 1.0  # image 0 is 32x48, the rest is padding
    x = head.prepare(images, [(32, 48), (96, 96), (SIZE, SIZE)])
    assert x.shape == (3, 3, SIZE, SIZE) and np.allclose(x[0], 1.0)  # padding was cropped before the resize
    out = head(images, [(32, 48), (96, 96), (SIZE, SIZE)])
    assert out["pred_masks"].shape[0] == 3 and out["pred_masks"].shape[-2:] == (SIZE, SIZE)
