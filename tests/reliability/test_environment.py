"""The environment, refused at plan time in one line (exit 2) instead of failing mid-run with an ``OSError``:
a results dir that cannot be written, a path longer than the file system allows, and an encrypted file whose
header asks scrypt for more work than tao-cli ever writes.

Runs the real ``tao`` entry point in-process against the test-only ``boring`` network (no data needed).
"""
from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from networks.common.errors import CheckpointError
from tao_cli import registry
from tao_cli.engine import crypto
from tao_cli.engine.checkpoints import save_checkpoint_file
from tests.reliability.cli import tao_exit_code as _tao

pytestmark = pytest.mark.reliability

NOBODY = 65534


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture()
def boring(tmp_path, monkeypatch):
    registry.register("boring", "boring_net")
    for var in ("WORLD_SIZE", "NODE_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text("results_dir: out\ndataset:\n  num_samples: 8\n  batch_size: 4\n")
    return tmp_path


# --------------------------------------------------------------------------------------- read-only results dir
@pytest.fixture()
def shared_dir():
    """A directory other users may enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tao-ro-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def _run_as_unprivileged(argv: list[str]) -> int:
    """Exit code of ``tao argv`` run in a forked child that cannot override file permissions (root drops to
    ``nobody``: root may write into a mode-555 directory, so the case only exists for other users)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 3
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            code = _tao(*argv)
        except BaseException as exc:  # noqa: BLE001 - anything escaping is an internal failure
            sys.stderr.write(f"child: {type(exc).__name__}: {exc}\n")
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("where", ["parent", "results-dir"])
def test_read_only_results_dir_is_refused_before_any_work(boring, shared_dir, capfd, dry_run, where):
    flag = ["--dry-run"] if dry_run else []
    spec = shared_dir / "good.yaml"
    shutil.copy(boring / "good.yaml", spec)
    spec.chmod(0o644)
    # warm-up in this process: the child (as nobody) cannot read modules that are only imported on first use
    assert _tao("model", "boring", "train", "-e", str(spec), "--dry-run", f"results_dir={shared_dir}/warm") == 0
    capfd.readouterr()
    locked = shared_dir / "ro"
    if where == "parent":
        locked.mkdir()
        results, named = locked / "res", locked
    else:
        (locked / "train").mkdir(parents=True)
        results, named = locked, locked / "train"
    named.chmod(0o555)
    before = sorted(p.name for p in named.iterdir())
    code = _run_as_unprivileged(["model", "boring", "train", "-e", str(spec), *flag, f"results_dir={results}"])
    out, err = capfd.readouterr()
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, (code, err)
    assert f"{named} is not writable" in lines[0] or f"results dir {named} is not writable" in lines[0], lines[0]
    assert lines[0].startswith("ERROR: results_dir:"), lines[0]
    assert sorted(p.name for p in named.iterdir()) == before


# ------------------------------------------------------------------------------------------ path lengths
LONG = "y" * 300


@pytest.mark.parametrize("override, field", [
    (f"results_dir=out/{LONG}", "results_dir"),
    (f"train.results_dir=out/{LONG}", "train.results_dir"),
    ("results_dir=" + "/".join(["/tmp"] + ["d" * 200] * 25), "results_dir"),  # 5 kB: every part fits, the whole does not
    (f"dataset.train_ann_path=data/{LONG}.json", "dataset.train_ann_path"),
    (f"train.resume_training_checkpoint_path=ckpt/{LONG}.pth", "train.resume_training_checkpoint_path"),
], ids=["component", "action-results-dir", "whole-path", "input-path", "resume-path"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_path_too_long_is_refused_naming_the_field(boring, capfd, override, field, dry_run):
    flag = ["--dry-run"] if dry_run else []
    code = _tao("model", "boring", "train", "-e", "good.yaml", *flag, override)
    _, err = capfd.readouterr()
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, (code, err[:2000])
    assert lines[0].startswith(f"ERROR: {field}:") and "limit" in lines[0], lines[0]
    assert len(lines[0]) < 1000
    assert not (boring / "out").exists()  # nothing created


# ------------------------------------------------------------------------------------------- scrypt header
def _crafted(log2_n: int, r: int, p: int, kdf: int = crypto.KDF_SCRYPT) -> bytes:
    header = struct.pack(">6sBBIII16s12s", crypto.MAGIC, crypto.VERSION, kdf, log2_n, r, p, b"s" * 16, b"n" * 12)
    return header + b"\0" * 64


@pytest.fixture()
def no_derivation(monkeypatch):
    """Key derivation fails the test at once (before the fix a maximal header took 48 s and 3.4 GB)."""
    calls = []

    def derive(*args):
        calls.append(args[2:])
        raise AssertionError(f"scrypt ran with header parameters {args[2:]}")

    monkeypatch.setattr(crypto, "_derive", derive)
    return calls


@pytest.mark.parametrize("params", [(20, 16, 4), (16, 8, 1), (15, 16, 1), (15, 8, 2), (14, 8, 1)],
                         ids=["maximal", "n", "r", "p", "weaker"])
def test_scrypt_parameters_other_than_ours_are_refused_before_derivation(no_derivation, params):
    with pytest.raises(CheckpointError, match="unsupported key-derivation parameters") as err:
        crypto.decrypt_bytes(_crafted(*params), "any-key", source="crafted.pth")
    assert not no_derivation and "\n" not in err.value.one_line()


def test_crafted_scrypt_header_through_the_cli_is_one_line(boring, capfd, no_derivation):
    (boring / "crafted.pth").write_bytes(_crafted(20, 16, 4))
    code = _tao("model", "boring", "evaluate", "-e", "good.yaml", "evaluate.checkpoint=crafted.pth",
                "encryption_key=some-key")
    _, err = capfd.readouterr()
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "crafted.pth" in lines[0], err
    assert "key-derivation" in lines[0] and not no_derivation


def test_files_we_write_still_decrypt(tmp_path):
    """Control: the one accepted parameter set is the one ``encrypt_bytes`` writes."""
    path = save_checkpoint_file({"state_dict": {"w": torch.ones(2)}}, tmp_path / "enc.pth", key="k")
    header = path.read_bytes()[:crypto.HEADER_SIZE]
    assert struct.unpack(">6sBBIII16s12s", header)[3:6] == (15, 8, 1)
    assert crypto.decrypt_bytes(path.read_bytes(), "k", source=str(path))
