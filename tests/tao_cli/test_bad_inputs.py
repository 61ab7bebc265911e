"""Bad input, table-driven: each case exits non-zero with ONE stderr line naming the problem, no traceback,
and leaves no output file behind (nothing at all is written unless the run had already started, and then
only the run records: experiment.yaml, status.json and the log).

Runs the real ``tao`` entry point in-process (``tao_cli.cli.main``) against the test-only ``boring`` network,
plus a few MAL cases for dataset files.
"""
from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tao_cli import registry
from tao_cli.engine.checkpoints import save_checkpoint_file

RUN_RECORDS = {"experiment.yaml", "status.json"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A scratch directory with a good spec, checkpoints of every kind, and an unsafe archive."""
    registry.register("boring", "boring_net")
    for var in ("WORLD_SIZE", "NODE_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "NUM_GPU_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text("results_dir: out\ndataset:\n  num_samples: 8\n  batch_size: 4\n")
    (tmp_path / "typo.yaml").write_text("results_dir: out\ntrain:\n  num_epoch: 3\n")
    (tmp_path / "badtype.yaml").write_text("results_dir: out\ntrain:\n  num_epochs: many\n")
    (tmp_path / "syntax.yaml").write_text("results_dir: out\ntrain:\n  num_epochs: [1, 2\n  seed: 3\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "adir").mkdir()
    boring_state = {"state_dict": {"net.weight": torch.zeros(1, 8), "net.bias": torch.zeros(1)}}
    save_checkpoint_file(dict(boring_state), tmp_path / "mal.pth", network="mal")
    save_checkpoint_file(dict(boring_state), tmp_path / "enc.pth", network="boring", key="right-key")
    data = bytearray((tmp_path / "enc.pth").read_bytes())
    data[-40] ^= 0xFF
    (tmp_path / "tampered.pth").write_bytes(bytes(data))
    torch.save({"state_dict": {}, "payload": _Evil()}, tmp_path / "evil.pth")
    (tmp_path / "ckpt.txt").write_text("not a checkpoint")
    with tarfile.open(tmp_path / "unsafe.tar.gz", "w:gz") as tar:
        payload = b"x"
        info = tarfile.TarInfo("../escape.jpg")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "ann.json").write_text(
        '{"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],'
        ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,'
        ' "iscrowd": 0}], "categories": [{"id": 1, "name": "thing"}]}')
    return tmp_path


def _mal(*extra: str) -> tuple[str, ...]:
    return ("model", "mal", "train", "results_dir=out", "model.arch=vit-deit-tiny/16", "dataset.crop_size=32",
            "dataset.train_ann_path=ann.json", "dataset.val_ann_path=ann.json", "dataset.train_img_dir=adir",
            "dataset.val_img_dir=adir", "dataset.min_obj_size=0", *extra)


B = ("model", "boring")
CASES = [
    # (id, argv, env, expected substring of the single stderr line)
    ("unknown-key-cli", B + ("train", "-e", "good.yaml", "train.num_epoch=3"), {}, "did you mean 'train.num_epochs'"),
    ("unknown-key-yaml", B + ("train", "-e", "typo.yaml"), {}, "train.num_epoch"),
    ("unknown-section", B + ("train", "-e", "good.yaml", "trian.num_epochs=1"), {}, "trian"),
    ("plus-outside-schema", B + ("train", "-e", "good.yaml", "+train.new_knob=1"), {}, "outside the schema"),
    ("wrong-type-cli", B + ("train", "-e", "good.yaml", "train.num_epochs=abc"), {}, "train.num_epochs"),
    ("wrong-type-yaml", B + ("train", "-e", "badtype.yaml"), {}, "train.num_epochs"),
    ("float-for-int", B + ("train", "-e", "good.yaml", "train.num_epochs=2.5"), {}, "train.num_epochs"),
    ("below-minimum", B + ("train", "-e", "good.yaml", "train.num_epochs=0"), {}, "train.num_epochs"),
    ("above-maximum", B + ("train", "-e", "good.yaml", "model.dropout=1.5"), {}, "model.dropout"),
    ("not-an-option", B + ("train", "-e", "good.yaml", "train.checkpoint_interval_unit=hour"), {},
     "train.checkpoint_interval_unit"),
    ("list-element-type", B + ("train", "-e", "good.yaml", "train.gpu_ids=[a]"), {}, "train.gpu_ids"),
    ("missing-checkpoint-evaluate", B + ("evaluate", "-e", "good.yaml"), {}, "evaluate.checkpoint"),
    ("missing-checkpoint-inference", B + ("inference", "-e", "good.yaml"), {}, "inference.checkpoint"),
    ("yaml-syntax", B + ("train", "-e", "syntax.yaml"), {}, "syntax.yaml:"),
    ("spec-not-found", B + ("train", "-e", "nope.yaml"), {}, "nope.yaml"),
    ("spec-is-dir", B + ("train", "-e", "adir"), {}, "adir"),
    ("spec-not-mapping", B + ("train", "-e", "list.yaml"), {}, "mapping"),
    ("bad-override-grammar", B + ("train", "-e", "good.yaml", "train.gpu_ids=[0,"), {}, "train.gpu_ids"),
    ("eval-resolver", B + ("train", "-e", "good.yaml", "model.dropout=${eval:'0.1+0.1'}"), {}, "model.dropout"),
    ("dangling-interpolation", B + ("train", "-e", "good.yaml", "train.num_epochs=${train.nope}"), {},
     "train.num_epochs"),
    ("unknown-network", ("model", "nosuchnet", "train"), {}, "nosuchnet"),
    ("unknown-action", B + ("trian", "-e", "good.yaml"), {}, "did you mean 'train'"),
    ("unknown-flag", B + ("train", "-e", "good.yaml", "--gpus"), {}, "--gpus"),
    ("no-results-dir", B + ("train", "-e", "good.yaml", "results_dir="), {}, "results_dir"),
    ("cross-field-check", B + ("train", "-e", "good.yaml", "dataset.batch_size=64"), {}, "dataset.batch_size"),
    ("input-path-missing", B + ("train", "-e", "good.yaml", "dataset.train_ann_path=missing.json"), {},
     "missing.json"),
    ("resume-missing", B + ("train", "-e", "good.yaml", "train.resume_training_checkpoint_path=gone.pth"), {},
     "gone.pth"),
    ("resume-bad-extension", B + ("train", "-e", "good.yaml", "train.resume_training_checkpoint_path=ckpt.txt"),
     {}, "ckpt.txt"),
    ("pickled-code-checkpoint", B + ("evaluate", "-e", "good.yaml", "evaluate.checkpoint=evil.pth"), {},
     "refusing to unpickle"),
    ("wrong-network-checkpoint", B + ("evaluate", "-e", "good.yaml", "evaluate.checkpoint=mal.pth"), {},
     "'mal' checkpoint"),
    ("encrypted-without-key", B + ("evaluate", "-e", "good.yaml", "evaluate.checkpoint=enc.pth"), {}, "enc.pth"),
    ("wrong-encryption-key", B + ("evaluate", "-e", "good.yaml", "evaluate.checkpoint=enc.pth",
                                  "encryption_key=wrong-key"), {}, "encryption_key"),
    ("tampered-encrypted", B + ("evaluate", "-e", "good.yaml", "evaluate.checkpoint=tampered.pth",
                                "encryption_key=right-key"), {}, "modified"),
    ("multinode-missing-master", B + ("train", "-e", "good.yaml"), {"WORLD_SIZE": "2", "NODE_RANK": "0"},
     "MASTER_ADDR"),
    ("multinode-rank-out-of-range", B + ("train", "-e", "good.yaml"),
     {"WORLD_SIZE": "2", "NODE_RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}, "NODE_RANK"),
    ("multinode-bad-port", B + ("train", "-e", "good.yaml"),
     {"WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "80"}, "MASTER_PORT"),
    ("multinode-world-size-not-int", B + ("train", "-e", "good.yaml"), {"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ("mal-fan-arch", _mal("model.arch=fan_tiny_12_p16_224"), {}, "vit-deit-tiny/16"),
    ("mal-unsafe-archive", _mal("dataset.train_img_dir=unsafe.tar.gz"), {}, "unsafe.tar.gz"),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, env_vars, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_nonzero_with_one_line(env, monkeypatch, capfd, argv, env_vars, needle):
    from tao_cli.cli import main

    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)
    before = _files(env)
    monkeypatch.setattr(sys, "argv", ["tao", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capfd.readouterr()
    assert exc.value.code == 2, (out, err)  # documented: 2 = bad input (1 would mean an internal failure)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ERROR:") and needle in lines[0], lines[0]
    assert "Traceback" not in err + out
    created = _files(env) - before
    stray = {p for p in created if Path(p).name not in RUN_RECORDS and not p.endswith(".log")}
    assert not stray, f"files left behind: {sorted(stray)}"
    assert not any(".tmp" in p for p in created)


@pytest.mark.parametrize("argv", [B + ("train", "-e", "good.yaml"), _mal()], ids=["boring", "mal"])
def test_baseline_the_cases_perturb_is_accepted(env, monkeypatch, capfd, argv):
    """Control: the commands the table changes one thing in pass ``--dry-run``, so each case's error comes from
    its bad input, not from a broken baseline."""
    from tao_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["tao", *argv[:3], "--dry-run", *argv[3:]])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    _, err = capfd.readouterr()
    assert code == 0, err
