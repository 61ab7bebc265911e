"""Issue 10, part 3: every documented example loads and passes ``--dry-run`` (exit 0: the run would start).

* every ``tao model ...`` command in the ``bash`` blocks of README.md and docs/{mal,mask2former,
  mask_grounding_dino}.md, run as written (backslash continuations joined, shell quoting honoured) in a directory
  holding the synthetic set at ``data/synthetic`` and an (empty) file at each checkpoint path it names;
* TAO 5.5's MAL example spec (``tests/tao_cli/data/mal_tao55_spec.yaml``; not under configs/, whose specs must
  validate against the JSON Schema, which has no ``strategy``) verbatim, top-level ``strategy:`` included:
  it loads with one warning naming the key, and with its paths pointed at the synthetic set the dry-run passes;
* the documented Grounding DINO inference source ``{image_dir, captions: inference.jsonl, classmap}``.

The commands are read from the documents, so an example that stops working fails here.
"""
from __future__ import annotations

import logging
import re
import shlex
import sys
from pathlib import Path

import pytest

from tao_cli.paths import configs_dir

REPO = Path(__file__).resolve().parents[2]
TAO55_MAL_SPEC = Path(__file__).resolve().parent / "data" / "mal_tao55_spec.yaml"
DOCS = ["README.md", "docs/mal.md", "docs/mask2former.md", "docs/mask_grounding_dino.md"]
#: documented commands that cannot run as written, and why (matched by a substring of the command)
NOT_RUNNABLE = {
    "export.checkpoint=...": "a placeholder checkpoint path",
    "-e spec.yaml": "'spec.yaml' stands for the user's own spec",
}
#: override keys whose value is a file the dry-run checks exists (a checkpoint): an empty file is made there
_FILE_KEYS = (".checkpoint", "pretrained_model_path")


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv after 'tao')`` of every ``tao model`` command in the bash blocks of :data:`DOCS`."""
    out = []
    for doc in DOCS:
        text = (REPO / doc).read_text(encoding="utf-8")
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if not line.startswith("tao model "):
                    continue
                words = shlex.split(line, comments=True)
                if len(words) < 4 or {"--help", "-h"} & set(words) or any(k in line for k in NOT_RUNNABLE):
                    continue
                out.append((f"{doc}: {line[:90]}", words[1:]))
    return out


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from networks.common.synthetic import generate

    root = tmp_path_factory.mktemp("seed_data")
    generate(root / "synthetic", seed=5, num_train=6, num_val=4, image_size=96)
    return root / "synthetic"


def _workdir(tmp_path: Path, synthetic: Path, monkeypatch) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "synthetic").symlink_to(synthetic, target_is_directory=True)
    monkeypatch.chdir(work)
    return work


def _tao(monkeypatch, capfd, argv: list[str]) -> tuple[int, str, str]:
    from tao_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["tao", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capfd.readouterr()
    return int(exc.value.code or 0), out, err


def test_the_documents_hold_examples_for_every_network():
    nets = {argv[1] for _, argv in COMMANDS}
    assert nets == {"mal", "mask2former", "mask_grounding_dino"}, COMMANDS
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_passes_dry_run(where, argv, synthetic, tmp_path, monkeypatch, capfd):
    _workdir(tmp_path, synthetic, monkeypatch)
    for word in argv:
        key, eq, value = word.partition("=")
        if eq and key.endswith(_FILE_KEYS) and value and not Path(value).exists():
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            Path(value).write_bytes(b"")
    # -e configs/... is relative to the repository in the documents
    argv = [str(REPO / w) if w.startswith("configs/") else w for w in argv]
    code, out, err = _tao(monkeypatch, capfd, [*argv, "--dry-run"])
    assert code == 0, f"{where}\n{err[-2000:]}"
    assert "# Plan" in out


def test_tao55_mal_spec_loads_verbatim_with_one_warning_for_strategy(caplog):
    from networks.mal.config import ExperimentConfig
    from tao_cli.spec import load_spec

    spec = TAO55_MAL_SPEC
    assert spec.read_text().count("\nstrategy: ") == 1
    with caplog.at_level(logging.WARNING):
        cfg = load_spec(ExperimentConfig, "train", spec, [])
    warnings = [r.getMessage() for r in caplog.records if "strategy" in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0] and "mal_tao55_spec.yaml:4" in warnings[0]
    assert cfg.train.checkpoint_interval == 5 and cfg.dataset.crop_size == 512


def test_tao55_mal_spec_passes_dry_run(synthetic, tmp_path, monkeypatch, capfd):
    _workdir(tmp_path, synthetic, monkeypatch)
    syn = synthetic
    paths = [f"results_dir={tmp_path / 'results'}",
             f"dataset.train_ann_path={syn / 'train' / 'annotations.json'}",
             f"dataset.train_img_dir={syn / 'train' / 'images'}",
             f"dataset.val_ann_path={syn / 'val' / 'annotations.json'}",
             f"dataset.val_img_dir={syn / 'val' / 'images'}"]
    spec = str(TAO55_MAL_SPEC)
    code, out, err = _tao(monkeypatch, capfd, ["model", "mal", "train", "-e", spec, *paths, "--dry-run"])
    assert code == 0, err
    assert "vit-mae-base/16" in out and "strategy: " not in out.split("# Plan")[0]
    assert not (tmp_path / "results").exists()


def test_documented_inference_source_passes_dry_run(synthetic, tmp_path, monkeypatch, capfd):
    """``infer_data_sources: {image_dir, captions: inference.jsonl, classmap}`` (TAO's VG lines, label_map.txt)."""
    work = _workdir(tmp_path, synthetic, monkeypatch)
    (work / "label_map.txt").write_text("circle\nsquare\ntriangle\n")
    (work / "model.pth").write_bytes(b"")
    source = ("dataset.infer_data_sources={image_dir: data/synthetic/val/images, "
              "captions: data/synthetic/val/annotations_vg.jsonl, classmap: label_map.txt}")
    spec = str(configs_dir() / "mask_grounding_dino" / "tiny.yaml")
    argv = ["model", "mask_grounding_dino", "inference", "-e", spec, f"results_dir={work / 'r'}",
            "inference.checkpoint=model.pth", source]
    code, out, err = _tao(monkeypatch, capfd, [*argv, "--dry-run"])
    assert code == 0, err
    assert "annotations_vg.jsonl" in out and "label_map.txt" in out
    # a misspelt key of the source is refused, naming it
    code, _, err = _tao(monkeypatch, capfd, [*argv, source.replace("classmap", "clasmap"), "--dry-run"])
    assert code == 2 and "dataset.infer_data_sources.clasmap" in err and "classmap" in err
    # the captions file is an input path: a missing one is refused by the dry-run
    code, _, err = _tao(monkeypatch, capfd, [*argv, source.replace("annotations_vg.jsonl", "nope.jsonl"),
                                             "--dry-run"])
    assert code == 2 and "dataset.infer_data_sources.captions" in err and "nope.jsonl" in err


def test_trt_engine_without_tensorrt_is_one_line_without_a_checkpoint(synthetic, tmp_path, monkeypatch, capfd):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    _workdir(tmp_path, synthetic, monkeypatch)
    spec = str(configs_dir() / "mal" / "demo.yaml")
    code, _, err = _tao(monkeypatch, capfd, ["model", "mal", "evaluate", "-e", spec, f"results_dir={tmp_path}/r",
                                             "evaluate.trt_engine=model.engine", "--dry-run"])
    lines = [x for x in err.splitlines() if x.startswith("ERROR")]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("ERROR: evaluate.trt_engine:") and "TensorRT" in lines[0]


@pytest.mark.parametrize("net, spec, override, key", [
    ("mal", "mal/demo.yaml", "train.validation_interval=21", "train.validation_interval"),
    ("mal", "mal/demo.yaml", "model.arch=fan_small", "model.arch"),
    ("mask_grounding_dino", "mask_grounding_dino/tiny.yaml", "model.backbone=resnet_50", "model.backbone"),
    ("mask2former", "mask2former/tiny.yaml", "model.backbone.type=efficientvit", "model.backbone.type"),
    ("mask2former", "mask2former/tiny.yaml", "train.distributed_strategy=fsdp", "train.distributed_strategy"),
])
def test_refused_at_dry_run(net, spec, override, key, synthetic, tmp_path, monkeypatch, capfd):
    """TAO's rules and unbuildable backbones are refused by the dry-run (so exit 0 means the run starts)."""
    if "fsdp" in override:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fsdp runs where CUDA is visible")
    _workdir(tmp_path, synthetic, monkeypatch)
    code, _, err = _tao(monkeypatch, capfd, ["model", net, "train", "-e", str(configs_dir() / spec),
                                             f"results_dir={tmp_path}/r", override, "--dry-run"])
    assert code == 2 and f"ERROR: {key}:" in err, err
    assert not (tmp_path / "r").exists()


def _seed_overrides(net: str) -> list[str]:
    """The TAO seed overrides of issues 4 and 5 (Mask2Former, Grounding DINO), ``...`` paths -> the synthetic set."""
    s = "data/synthetic"
    if net == "mask2former":
        return ["model.sem_seg_head.num_classes=90", "dataset.contiguous_id=True",
                f"dataset.train.img_dir={s}/train/images.tar.gz", f"dataset.label_map={s}/train/label_map.json",
                f"dataset.train.instance_json={s}/train/annotations.json",
                f"dataset.train.panoptic_json={s}/train/annotations_panoptic.json",
                f"dataset.train.panoptic_dir={s}/train/images_panoptic.tar.gz", f"dataset.val.img_dir={s}/val/images",
                f"dataset.test.img_dir={s}/val/images",
                "train.num_gpus=1", "train.num_epochs=10", "train.checkpoint_interval=10",
                "train.validation_interval=10"]
    return ["train.num_gpus=1", "train.num_epochs=10", "train.checkpoint_interval=10", "train.validation_interval=10",
            "model.num_region_queries=100",
            f"dataset.train_data_sources=[{{image_dir: {s}/train/images.tar.gz, json_file: "
            f"{s}/train/annotations_odvg.jsonl, label_map: {s}/train/annotations_odvg_labelmap.json}}]",
            f"dataset.val_data_sources={{image_dir: {s}/val/images.tar.gz, json_file: {s}/val/annotations.json}}"]


@pytest.mark.parametrize("net", ["mask2former", "mask_grounding_dino"])
def test_tao_seed_overrides_pass_dry_run(net, synthetic, tmp_path, monkeypatch, capfd):
    work = _workdir(tmp_path, synthetic, monkeypatch)
    spec = str(configs_dir() / net / "tiny.yaml")
    code, out, err = _tao(monkeypatch, capfd, ["model", net, "train", "-e", spec, f"results_dir={work / 'r'}",
                                               *_seed_overrides(net), "--dry-run"])
    assert code == 0, err
    assert "num_epochs: 10" in out and "# Plan" in out


@pytest.mark.parametrize("key", ["model.crop_size", "model.load_mask"])
def test_mal_model_crop_size_and_load_mask_point_at_dataset(key):
    """The skill documentation's ``model.crop_size``/``model.load_mask`` live under ``dataset.`` in TAO."""
    from networks.common.errors import ConfigError
    from networks.mal.config import ExperimentConfig
    from tao_cli.spec import load_spec

    with pytest.raises(ConfigError) as exc:
        load_spec(ExperimentConfig, "train", None, [f"{key}=1"])
    assert f"did you mean 'dataset.{key.split('.')[1]}'?" in str(exc.value)
