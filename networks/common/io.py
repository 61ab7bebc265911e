"""File I/O shared by the networks: atomic writes and checked JSON reads.

Writes go to a temporary file in the destination directory, are fsync'ed, then renamed: a crash mid-write
therefore leaves either the old file or nothing, never a half-written one.  :func:`read_json` turns every way a
user's JSON file can be wrong into one :class:`DataError` line.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from networks.common.errors import DataError


@contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on clean exit it is renamed onto ``dest``, else removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically and return ``dest``."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``dest`` atomically and return ``dest``."""
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise ``obj`` as JSON to ``dest`` atomically and return ``dest``."""
    return atomic_write_text(dest, json.dumps(obj, indent=indent))


def read_json(path: str | os.PathLike, *, field: str, hint: str | None = None, invalid_hint: str | None = None) -> Any:
    """The parsed content of the JSON file ``path`` (``~`` expanded).

    Raises :class:`DataError`: subject ``field`` (with ``hint``) when the file is missing or is a directory;
    ``<path>:<line>:<col>`` (with ``invalid_hint``) for invalid JSON; ``<path>`` when it is not UTF-8 text.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        what = "is a directory, not a JSON file" if p.is_dir() else "does not exist"
        raise DataError(field, f"'{path}' {what}", hint)
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}:{exc.colno}", f"invalid JSON: {exc.msg}", invalid_hint) from exc
    except UnicodeDecodeError as exc:
        raise DataError(str(p), "is not UTF-8 text", "save the file as UTF-8 JSON") from exc


def json_lines(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, obj)`` for each non-blank line of the JSON-lines file ``path`` (``where`` = ``<path>:<line>``);
    a line that is not valid JSON gives its :class:`json.JSONDecodeError` as ``obj`` (for a caller that reports
    every bad line).  Undecodable bytes are replaced, so they surface as a JSON error on their line."""
    p = Path(os.path.expanduser(str(path)))
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"{p}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{p}:{lineno}", exc


def iter_json_lines(path: str | os.PathLike, *, hint: str) -> Iterator[tuple[str, Any]]:
    """``(where, obj)`` for each non-blank line of the JSON-lines file ``path``; ``where`` is ``<path>:<line>``.

    A line that is not valid JSON is a :class:`DataError` naming ``<path>:<line>`` with ``hint`` (what a line
    must look like).  The caller checks that the file exists.
    """
    for where, obj in json_lines(path):
        if isinstance(obj, json.JSONDecodeError):
            raise DataError(where, f"not valid JSON ({obj.msg})", hint) from None
        yield where, obj
