"""One run per results dir: an exclusive lock on ``<run_dir>/.tao.lock`` for as long as the run lives.

The lock is an ``flock`` on the file, so the kernel releases it when the holder dies (even by SIGKILL): a lock
file whose pid no longer holds the lock is stale and is taken over, with a line saying so.  The file holds the
holder's pid, which the refusal names.  Only the launching process (rank 0) locks; DDP workers that Lightning
starts share rank 0's run.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from networks.common.errors import ConfigError

__all__ = ["RunDirLock", "LOCK_NAME", "lock_holder", "check_free"]

LOCK_NAME = ".tao.lock"


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _refusal(run_dir: Path, pid: int | None) -> ConfigError:
    who = f"pid {pid}" if pid else "another process"
    return ConfigError(str(run_dir), f"is in use by another tao run ({who})",
                       "wait for that run to finish, or pass a different results_dir=")


def lock_holder(run_dir: str | os.PathLike) -> int | None:
    """The pid of the live run holding ``run_dir``'s lock (0 when unknown), or None when the dir is free."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(path) or 0
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise the one-line ``ConfigError`` when a live run holds ``run_dir`` (``--dry-run`` refuses it too)."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _refusal(Path(run_dir), holder)


class RunDirLock:
    """``acquire()`` takes the lock or raises ``ConfigError`` naming the holder; returns the pid of a dead
    previous holder whose stale lock was taken over (else None).  ``release()`` removes the file and drops the lock (a killed run leaves the file, with its pid, behind)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fh = None

    def acquire(self) -> int | None:
        while True:
            fh = open(self.path, "a+")  # noqa: SIM115 - held open for the run's lifetime
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise _refusal(self.run_dir, _pid_in(self.path)) from None
            try:
                if os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()  # the file was removed by a run that just ended: lock the new one
        stale = _pid_in(self.path)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return stale if stale and stale != os.getpid() else None

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            # Removed while still locked; a run that opened it meanwhile sees the inode change and retries.
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
