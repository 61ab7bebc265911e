"""resolve_dir: directories, archive extraction into the cache, safety checks, concurrency."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from networks.common import sources
from networks.common.errors import DataError
from networks.common.sources import cache_root, resolve_dir, resolve_member


def _targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _leftovers(root: Path) -> list[str]:
    """Everything in the cache except lock files."""
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_directory_is_returned_as_is(tmp_path):
    assert resolve_dir(tmp_path, field="dataset.img_dir") == tmp_path


def test_missing_path_names_the_field(tmp_path):
    with pytest.raises(DataError) as ei:
        resolve_dir(tmp_path / "nope", field="dataset.train.img_dir")
    assert ei.value.subject == "dataset.train.img_dir"
    assert "does not exist" in ei.value.problem


def test_empty_value_is_refused():
    with pytest.raises(DataError, match="is empty"):
        resolve_dir("", field="dataset.val_img_dir")


def test_plain_file_is_refused(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(DataError, match="neither a directory nor a supported archive"):
        resolve_dir(f, field="img_dir")


def test_cache_root_honours_env(cache_dir):
    assert cache_root() == cache_dir
    assert cache_dir.is_dir()


def test_targz_files_at_root_extract_once(tmp_path, cache_dir):
    arc = _targz(tmp_path / "images.tar.gz", {"a.jpg": b"A", "sub/b.jpg": b"BB"})
    out = resolve_dir(arc, field="img_dir")
    assert out.parent == cache_dir and out.name.endswith("-images")
    assert (out / "a.jpg").read_bytes() == b"A"
    assert (out / "sub" / "b.jpg").read_bytes() == b"BB"
    marker = out / sources.COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns
    assert resolve_dir(arc, field="img_dir") == out
    assert marker.stat().st_mtime_ns == stamp  # not re-extracted
    # A modified archive gets a new cache entry.
    time.sleep(0.01)
    _targz(arc, {"a.jpg": b"changed"})
    out2 = resolve_dir(arc, field="img_dir")
    assert out2 != out and (out2 / "a.jpg").read_bytes() == b"changed"


def test_single_top_directory_is_entered(tmp_path, cache_dir):
    arc = _targz(tmp_path / "data.tgz", {"images/1.jpg": b"1", "images/2.jpg": b"2"})
    out = resolve_dir(arc, field="img_dir")
    assert out.name == "images" and sorted(p.name for p in out.iterdir()) == ["1.jpg", "2.jpg"]
    # Records may name files relative to the extraction root or to the entered directory.
    assert resolve_member(out, "1.jpg").read_bytes() == b"1"
    assert resolve_member(out, "images/2.jpg").read_bytes() == b"2"
    assert resolve_member(out, "missing.jpg") == out / "missing.jpg"


def test_zip_and_plain_tar(tmp_path, cache_dir):
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x/1.jpg", b"one")
        zf.writestr("y.jpg", b"why")
    out = resolve_dir(z, field="img_dir")
    assert (out / "x" / "1.jpg").read_bytes() == b"one" and (out / "y.jpg").read_bytes() == b"why"
    t = tmp_path / "imgs.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("./q.jpg")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"q"))
    assert (resolve_dir(t, field="img_dir") / "q.jpg").read_bytes() == b"q"


def _tar_with(path: Path, bad: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("good.jpg")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        tf.addfile(bad, io.BytesIO(data) if bad.isreg() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member, needle",
    [
        (_member("/etc/evil", size=1), "absolute path"),
        (_member("../evil", size=1), "outside the archive"),
        (_member("a/../../evil", size=1), "outside the archive"),
        (_member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "is a link"),
        (_member("hard", tarfile.LNKTYPE, linkname="good.jpg"), "is a link"),
        (_member("fifo", tarfile.FIFOTYPE), "special file"),
        (_member("dev", tarfile.CHRTYPE), "special file"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, cache_dir, member, needle):
    arc = _tar_with(tmp_path / "bad.tar.gz", member, b"x" * member.size)
    with pytest.raises(DataError) as ei:
        resolve_dir(arc, field="img_dir")
    assert ei.value.subject == str(arc)
    assert member.name in ei.value.problem and needle in ei.value.problem
    assert _leftovers(cache_dir) == []
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


@pytest.mark.parametrize("name, needle", [("../evil", "outside"), ("/abs", "absolute"), ("lnk", "is a link")])
def test_unsafe_zip_members_are_refused(tmp_path, cache_dir, name, needle):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("good.jpg", b"ok")
        info = zipfile.ZipInfo(name)
        if name == "lnk":
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, b"target")
    with pytest.raises(DataError, match=needle):
        resolve_dir(z, field="img_dir")
    assert _leftovers(cache_dir) == []


def test_corrupt_archive_is_a_data_error(tmp_path, cache_dir):
    arc = tmp_path / "broken.tar.gz"
    good = _targz(tmp_path / "g.tar.gz", {"a": b"x" * 5000})
    arc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="cannot be extracted"):
        resolve_dir(arc, field="img_dir")
    assert _leftovers(cache_dir) == []


def _worker(arc: str, log: str, barrier, queue):
    real_extract = sources._extract

    def counting_extract(archive, target):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # widen the window in which the other process could race
        real_extract(archive, target)

    sources._extract = counting_extract
    barrier.wait()
    queue.put(str(resolve_dir(arc, field="img_dir")))


def test_concurrent_processes_extract_once(tmp_path, cache_dir):
    arc = _targz(tmp_path / "images.tar.gz", {f"{i}.jpg": bytes([i]) * 100 for i in range(20)})
    log = tmp_path / "extract.log"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(arc), str(log), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len(log.read_text().split()) == 1
    assert len(list(Path(results[0]).glob("*.jpg"))) == 20
    assert _leftovers(cache_dir) == [Path(results[0]).name]
