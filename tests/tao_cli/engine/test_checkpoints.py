"""Checkpoint files: naming, atomic saves and the latest link, resume lookup, RNG capture, safe loading, encryption."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from networks.common.errors import CheckpointError, ConfigError
from tao_cli.engine import crypto
from tao_cli.engine.checkpoints import (
    checkpoint_filename,
    collect_rng_states,
    find_latest,
    load_checkpoint,
    load_weights,
    resolve_resume,
    restore_rng_states,
    save_checkpoint_file,
    update_latest_link,
)

from .helpers import REPO, clean_env, make_cfg


def _ckpt(value: float = 1.0) -> dict:
    return {"epoch": 0, "global_step": 3, "state_dict": {"w": torch.full((2, 2), value)}}


def test_names():
    assert checkpoint_filename(0, 6) == "model_epoch_000_step_00006.pth"
    assert checkpoint_filename(12, 123456) == "model_epoch_012_step_123456.pth"


def test_save_tags_network_and_loads_weights_only(tmp_path):
    path = save_checkpoint_file(_ckpt(), tmp_path / "a.pth", network="boring")
    obj = torch.load(path, weights_only=True)
    assert obj["tao_model"] == "boring"
    assert torch.equal(load_weights(path)["w"], torch.ones(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no temp file left


def test_latest_link_is_relative_and_replaced(tmp_path):
    a = save_checkpoint_file(_ckpt(1), tmp_path / checkpoint_filename(0, 3))
    b = save_checkpoint_file(_ckpt(2), tmp_path / checkpoint_filename(1, 6))
    link = update_latest_link(tmp_path, "boring_model", a)
    assert link.is_symlink() and os.readlink(link) == a.name
    update_latest_link(tmp_path, "boring_model", b)
    assert find_latest(tmp_path, "boring_model") == b.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name, link.name])


def test_find_latest_errors(tmp_path):
    assert find_latest(tmp_path / "nope", "x") is None
    assert find_latest(tmp_path, "x") is None
    os.symlink("gone.pth", tmp_path / "x_latest.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_latest(tmp_path, "x")


def test_resolve_resume_precedence(tmp_path):
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    latest = save_checkpoint_file(_ckpt(), run_dir / checkpoint_filename(0, 3))
    update_latest_link(run_dir, "boring_model", latest)
    assert resolve_resume(make_cfg(), run_dir, "boring_model") == latest.resolve()
    explicit = save_checkpoint_file(_ckpt(), tmp_path / "other.ckpt")
    cfg = make_cfg({"train.resume_training_checkpoint_path": str(explicit)})
    assert resolve_resume(cfg, run_dir, "boring_model") == explicit.resolve()
    with pytest.raises(ConfigError, match=r"train.resume_training_checkpoint_path: .*does not exist"):
        resolve_resume(make_cfg({"train.resume_training_checkpoint_path": str(tmp_path / "no.pth")}), run_dir, "b")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"must end in \.pth, \.tlt, \.ckpt"):
        resolve_resume(make_cfg({"train.resume_training_checkpoint_path": str(tmp_path / "weights.bin")}), run_dir, "b")


def test_rng_states_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    states = collect_rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint_file({"rng": states}, tmp_path / "r.pth")
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng_states(load_checkpoint(tmp_path / "r.pth")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle 'posix.system' \(this file needs arbitrary "
                                              r"code execution to load\).*re-save it as a plain state_dict"):
        load_checkpoint(path)


def test_unknown_class_is_refused(tmp_path):
    path = tmp_path / "cls.pth"
    torch.save({"obj": _Evil.__new__(_Evil).__class__}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)


def test_wrong_network_is_refused(tmp_path):
    path = save_checkpoint_file(_ckpt(), tmp_path / "m.pth", network="mal")
    with pytest.raises(CheckpointError, match=r"is a 'mal' checkpoint, not 'mask2former'"):
        load_checkpoint(path, expected_network="mask2former")
    assert load_checkpoint(path, expected_network="mal")["tao_model"] == "mal"


def test_lightning_checkpoint_with_config_hyperparameters_loads(tmp_path):
    """What Lightning 2.6 stores when a module saved an OmegaConf config and a Path as hyper-parameters."""
    from omegaconf import OmegaConf

    ckpt = {"state_dict": {"w": torch.ones(1)}, "pytorch-lightning_version": "2.6.6",
            "hyper_parameters": {"cfg": OmegaConf.create({"a": 1, "b": [1, 2], "c": {"d": "x"}}),
                                 "path": Path("/tmp")},
            "loops": {"fit_loop": {"state_dict": {}}}, "callbacks": {"ModelCheckpoint{}": {"best_model_score": None}}}
    torch.save(ckpt, tmp_path / "l.ckpt")
    obj = load_checkpoint(tmp_path / "l.ckpt")
    assert obj["hyper_parameters"]["cfg"].c.d == "x"


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(4.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], torch.arange(4.0))


def test_unwraps_model_key(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "m.pth")
    assert list(load_weights(tmp_path / "m.pth")) == ["w"]


# ------------------------------------------------------------------------------------------ encryption


def test_encrypted_round_trip_and_layout(tmp_path):
    path = save_checkpoint_file(_ckpt(3.0), tmp_path / "e.pth", key="s3cret", network="boring")
    raw = path.read_bytes()
    assert raw[:6] == b"TAOENC" and raw[6] == 1 and raw[7] == 1
    assert int.from_bytes(raw[8:12], "big") == 15 and int.from_bytes(raw[12:16], "big") == 8
    assert b"state_dict" not in raw  # the whole file is encrypted, not just the weights
    obj = load_checkpoint(path, key="s3cret", expected_network="boring")
    assert torch.equal(obj["state_dict"]["w"], torch.full((2, 2), 3.0))


def test_encrypted_errors_are_distinct(tmp_path):
    path = save_checkpoint_file(_ckpt(), tmp_path / "e.pth", key="s3cret")
    with pytest.raises(CheckpointError, match="is encrypted but no encryption_key was given"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="wrong encryption_key or the file was modified"):
        load_checkpoint(path, key="other")
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0x01
    (tmp_path / "t.pth").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="wrong encryption_key or the file was modified"):
        load_checkpoint(tmp_path / "t.pth", key="s3cret")
    header_tampered = bytearray(path.read_bytes())
    header_tampered[25] ^= 0x01  # a salt byte: authenticated as associated data
    with pytest.raises(CheckpointError, match="wrong encryption_key or the file was modified"):
        crypto.decrypt_bytes(bytes(header_tampered), "s3cret")
    with pytest.raises(CheckpointError, match="unsupported encrypted checkpoint version 2"):
        crypto.decrypt_bytes(b"TAOENC\x02" + bytes(raw[7:]), "s3cret")
    with pytest.raises(CheckpointError, match=r"not an encrypted tao checkpoint \(truncated header\)"):
        crypto.decrypt_bytes(b"TAOENC\x01\x01", "s3cret")
    with pytest.raises(CheckpointError, match=r"not an encrypted tao checkpoint \(bad magic\)"):
        crypto.decrypt_bytes(b"PK\x03\x04" + bytes(60), "s3cret")


def test_plain_file_with_key_loads_with_warning(tmp_path, caplog):
    path = save_checkpoint_file(_ckpt(), tmp_path / "p.pth")
    with caplog.at_level("WARNING"):
        obj = load_checkpoint(path, key="s3cret")
    assert "w" in obj["state_dict"] and "not encrypted" in caplog.text


def test_encrypted_safetensors(tmp_path):
    from safetensors.torch import save as st_save

    (tmp_path / "w.safetensors").write_bytes(crypto.encrypt_bytes(st_save({"w": torch.ones(2)}), "k"))
    assert torch.equal(load_weights(tmp_path / "w.safetensors", key="k")["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------ crash safety


def test_sigkill_mid_save_leaves_previous_latest_intact(tmp_path):
    """A process killed while writing a temp checkpoint (before the rename) leaves the old latest loadable."""
    good = save_checkpoint_file(_ckpt(1.0), tmp_path / checkpoint_filename(0, 3), network="boring")
    update_latest_link(tmp_path, "boring_model", good)
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        from tao_cli.engine.checkpoints import save_checkpoint_file, update_latest_link
        import pathlib
        def half_then_stall(self, data):
            with open(self, "wb") as fh:  # a partial temp file, then the process is killed
                fh.write(data[: len(data) // 2])
                fh.flush()
            print("WRITTEN", flush=True)
            time.sleep(600)
        pathlib.Path.write_bytes = half_then_stall
        p = save_checkpoint_file({{"state_dict": {{"w": torch.zeros(512, 512)}}}}, {str(tmp_path)!r} + "/model_epoch_001_step_00006.pth")
        update_latest_link({str(tmp_path)!r}, "boring_model", p)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert temps and 400_000 < temps[0].stat().st_size < 1_000_000  # half of a 1 MiB tensor file
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert find_latest(tmp_path, "boring_model") == good.resolve()
    assert torch.equal(load_weights(tmp_path / "boring_model_latest.pth")["w"], torch.ones(2, 2))
    assert not (tmp_path / "model_epoch_001_step_00006.pth").exists()
