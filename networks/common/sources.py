"""Dataset locations that may be a directory or an archive (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``).

TAO's sample datasets ship image folders as ``images.tar.gz``; a spec field such as ``img_dir`` may point at
the folder or straight at the archive.  :func:`resolve_dir` turns either into a directory:

* a directory is returned as is;
* an archive is extracted once into ``cache_root()/<key>-<name>`` where ``key`` is the first 16 hex digits of
  the SHA-256 of (real path, size, mtime in ns), so an edited archive gets a fresh extraction;
* the extraction root is returned, except when it holds exactly one directory and no files, in which case that
  directory is returned (``images.tar.gz`` holding ``images/...`` therefore resolves to the ``images`` folder).
  Record paths (``file_name``) are resolved relative to the returned directory.

Extraction is safe and concurrency-safe: every member is checked before anything is written (absolute paths,
``..`` components, links, devices and FIFOs are refused with a :class:`DataError` naming the archive and the
member); several processes (DDP ranks) may call :func:`resolve_dir` at once: an ``fcntl`` lock beside the target
serialises them, the archive is unpacked into a temporary directory that is renamed into place, and a
``.complete`` marker inside the target says the extraction finished.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps

from networks.common.errors import DataError

__all__ = ["ARCHIVE_SUFFIXES", "IMAGE_EXTENSIONS", "cache_root", "is_archive", "resolve_dir", "resolve_member",
           "archive_key", "list_images", "read_rgb"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
#: File suffixes (lower case) that count as images when a folder is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
COMPLETE_MARKER = ".complete"
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


def cache_root() -> Path:
    """Directory that holds extracted archives: ``$TAO_CACHE_DIR/archives`` if the variable is set, else
    ``platformdirs.user_cache_dir("tao-cli")/archives``.  Created on demand."""
    base = os.environ.get("TAO_CACHE_DIR")
    if base:
        root = Path(base).expanduser() / "archives"
    else:
        import platformdirs

        root = Path(platformdirs.user_cache_dir("tao-cli")) / "archives"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError("TAO_CACHE_DIR", f"cannot create the archive cache '{root}': {exc.strerror}",
                        "set TAO_CACHE_DIR to a writable directory") from exc
    return root


def is_archive(path: str | os.PathLike) -> bool:
    """True when the file name ends with a supported archive suffix (case-insensitive)."""
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "archive"
    return name


def archive_key(path: str | os.PathLike) -> str:
    """Cache directory name of an archive: ``<sha256(realpath, size, mtime_ns)[:16]>-<stem>``."""
    real = os.path.realpath(path)
    st = os.stat(real)
    digest = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{digest}-{_archive_stem(Path(real))}"


def resolve_dir(path: str | os.PathLike, *, field: str) -> Path:
    """Return a directory for ``path`` (a directory or an archive), extracting archives into the cache.

    ``field`` is the spec key that named the path; it is the subject of any :class:`DataError` (missing path,
    a file that is not an archive).  Unsafe or unreadable archives raise :class:`DataError` naming the archive.
    """
    if path is None or not str(path).strip():
        # An empty spec value would otherwise resolve to the working directory.
        raise DataError(field, "is empty", "set it to a directory or an archive")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataError(field, f"'{path}' does not exist", "check the path in the spec or on the command line")
    if p.is_dir():
        return p
    if not is_archive(p):
        raise DataError(
            field,
            f"'{path}' is neither a directory nor a supported archive",
            f"point it at a directory or a {', '.join(ARCHIVE_SUFFIXES)} file",
        )
    root = cache_root()
    target = root / archive_key(p)
    if not (target / COMPLETE_MARKER).is_file():
        with _locked(target.with_name(target.name + ".lock")):
            # Another rank may have finished while this one waited for the lock.
            if not (target / COMPLETE_MARKER).is_file():
                _extract(p, target)
    return _content_root(target)


def resolve_member(root: str | os.PathLike, rel: str) -> Path:
    """Path of a record's relative ``rel`` (e.g. a COCO ``file_name``) under a :func:`resolve_dir` result.

    Normally ``root / rel``.  When ``root`` is the single top directory that :func:`resolve_dir` stepped into and
    ``rel`` only exists relative to the extraction root (``file_name: images/1.jpg`` with an archive holding
    ``images/``), that path is returned instead.  Existence is not required otherwise: callers report missing
    files with their own context.
    """
    root = Path(root)
    direct = root / rel
    if direct.exists():
        return direct
    parent = root.parent
    if (parent / COMPLETE_MARKER).is_file() and (parent / rel).exists():
        return parent / rel
    return direct


def _content_root(target: Path) -> Path:
    # macOS zips carry a __MACOSX resource-fork folder beside the real content; it does not count.
    entries = [e for e in target.iterdir() if e.name not in (COMPLETE_MARKER, "__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return target


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_name(archive: Path, name: str) -> PurePosixPath | None:
    """Validated relative path of a member, or None for entries that name the root itself ("./")."""
    if name.startswith("/") or name.startswith("\\") or _DRIVE.match(name):
        raise DataError(str(archive), f"member '{name}' has an absolute path", "rebuild the archive with relative paths")
    parts = [q for q in name.replace("\\", "/").split("/") if q not in ("", ".")]
    if ".." in parts:
        raise DataError(str(archive), f"member '{name}' points outside the archive ('..')",
                        "rebuild the archive without '..' components")
    if not parts:
        return None
    return PurePosixPath(*parts)


def _tar_plan(archive: Path, tf: tarfile.TarFile) -> list[tuple[PurePosixPath, tarfile.TarInfo]]:
    plan = []
    for m in tf.getmembers():
        rel = _check_name(archive, m.name)
        if m.issym() or m.islnk():
            raise DataError(str(archive), f"member '{m.name}' is a link", "archives with links are refused; store files")
        if not (m.isreg() or m.isdir()):
            raise DataError(str(archive), f"member '{m.name}' is a device, FIFO or other special file",
                            "archives may contain only regular files and directories")
        if rel is not None:
            plan.append((rel, m))
    return plan


def _zip_plan(archive: Path, zf: zipfile.ZipFile) -> list[tuple[PurePosixPath, zipfile.ZipInfo]]:
    plan = []
    for info in zf.infolist():
        rel = _check_name(archive, info.filename)
        # Unix mode in the high 16 bits; many writers leave the file-type bits at 0, which means "regular".
        mode = stat.S_IFMT(info.external_attr >> 16)
        if mode and stat.S_ISLNK(mode):
            raise DataError(str(archive), f"member '{info.filename}' is a link", "archives with links are refused; store files")
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise DataError(str(archive), f"member '{info.filename}' is a device, FIFO or other special file",
                            "archives may contain only regular files and directories")
        if rel is not None:
            plan.append((rel, info))
    return plan


def _extract(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into ``target`` via a temporary sibling; on any error nothing is left behind."""
    if target.exists():  # left by an interrupted older run without the marker
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for rel, info in _zip_plan(archive, zf):
                        dest = tmp.joinpath(*rel.parts)
                        if info.is_dir():
                            dest.mkdir(parents=True, exist_ok=True)
                            continue
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out, _CHUNK)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    for rel, member in _tar_plan(archive, tf):
                        dest = tmp.joinpath(*rel.parts)
                        if member.isdir():
                            dest.mkdir(parents=True, exist_ok=True)
                            continue
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        src = tf.extractfile(member)
                        assert src is not None  # regular file
                        with src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out, _CHUNK)
        except DataError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise DataError(str(archive), f"cannot be extracted: {exc}",
                            "check that the archive is complete and not corrupted") from exc
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``: recursive, sorted, by :data:`IMAGE_EXTENSIONS` (case-insensitive), hidden
    files (``.name``) skipped."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def read_rgb(path: str | os.PathLike, *, where: str | None = None, hint: str | None = None,
             exif_transpose: bool = False) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (decoded now, file closed).

    ``exif_transpose`` applies the EXIF orientation.  A missing or unreadable file is a :class:`DataError`
    whose subject is ``where`` (a record's ``file:line``) when given, else the path; ``hint`` goes with the
    missing-file error.
    """
    path = Path(path)
    if where is None:
        where, missing, unreadable = str(path), "image file does not exist", "cannot be read as an image"
    else:
        missing, unreadable = f"image '{path}' does not exist", f"image '{path}' cannot be read"
    if not path.is_file():
        raise DataError(where, missing, hint)
    try:
        with Image.open(path) as im:
            return (ImageOps.exif_transpose(im) if exif_transpose else im).convert("RGB")
    except OSError as exc:
        raise DataError(where, f"{unreadable}: {exc}") from exc
