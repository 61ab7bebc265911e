"""Checkpoints: TAO naming, atomic (optionally encrypted) saving, the ``*_latest.pth`` link, resume lookup,
RNG state capture/restore, and safe loading.

Files are ``model_epoch_<EEE>_step_<SSSSS>.pth`` (0-based epoch, global step), the names TAO's AutoML tooling
searches for, and ``<CHECKPOINT_NAME>_latest.pth`` is a relative symlink to the newest one (a copy where the
filesystem has no symlinks).  ``<CHECKPOINT_NAME>_best.pth`` is a full checkpoint of the validation with the best
main KPI (the network's ``main_kpi(cfg)``), rewritten whenever the KPI improves.  ``train.keep_checkpoints: N``
(N ≥ 1) deletes the oldest periodic files beyond N after each save, never the one the latest or best file
points at.  Every file is written to a temporary name in the same directory, fsync'ed and renamed, so a crash
leaves the previous files intact.  Every checkpoint carries ``tao_model: <net.NAME>``.

Loading never runs arbitrary pickle code: ``torch.load(weights_only=True)`` with a short explicit allow-list.
"""
from __future__ import annotations

import io
import logging
import math
import os
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from networks.common.errors import CheckpointError, ConfigError
from networks.common.io import atomic_write_bytes
from networks.common.weights import safe_torch_load, unwrap_state_dict

from . import crypto

__all__ = [
    "CHECKPOINT_RE",
    "checkpoint_filename",
    "save_checkpoint_file",
    "update_latest_link",
    "best_filename",
    "prune_checkpoints",
    "find_latest",
    "resolve_resume",
    "load_checkpoint",
    "load_weights",
    "checkpoint_reader",
    "collect_rng_states",
    "restore_rng_states",
    "to_plain",
    "TaoCheckpointIO",
    "TaoCheckpoint",
]

log = logging.getLogger("tao.checkpoints")

CHECKPOINT_RE = re.compile(r"^model_epoch_(\d{3,})_step_(\d{5,})\.pth$")
RESUME_SUFFIXES = (".pth", ".tlt", ".ckpt")


def checkpoint_filename(epoch: int, step: int) -> str:
    """``model_epoch_<EEE>_step_<SSSSS>.pth`` for a 0-based ``epoch`` and global ``step``."""
    return f"model_epoch_{epoch:03d}_step_{step:05d}.pth"


def best_filename(checkpoint_name: str) -> str:
    """``<checkpoint_name>_best.pth``: the checkpoint with the best main KPI (named like the latest link)."""
    return f"{checkpoint_name}_best.pth"


# ---------------------------------------------------------------------------------------------- saving


def to_plain(obj: Any) -> Any:
    """Turn config containers, attribute dicts, paths and numpy values into plain Python/tensors.

    Applied to everything we save so that every checkpoint loads with ``weights_only=True``.  Objects with a
    ``state_dict()`` are replaced by it; anything else unknown is stored as its ``str()`` (it could not be
    loaded safely anyway).
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return to_plain(OmegaConf.to_container(obj, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (torch.Tensor, torch.dtype, torch.device)) or obj is None or \
            isinstance(obj, (bool, int, float, str, bytes)):  # dtypes and devices: ModelOpt's quantizer state
        return obj
    if isinstance(obj, OrderedDict):  # torch state_dicts; allowed by weights_only
        return OrderedDict((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        seq = [to_plain(v) for v in obj]
        return seq if isinstance(obj, list) else tuple(seq)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return to_plain(obj.state_dict())
    return str(obj)


def save_checkpoint_file(checkpoint: dict, path: str | os.PathLike, *, key: str | None = None,
                         network: str | None = None) -> Path:
    """Serialise ``checkpoint`` to ``path`` atomically; encrypted (whole file) when ``key`` is set.

    ``network`` is written as ``checkpoint["tao_model"]``.  Non-tensor objects are converted by :func:`to_plain`.
    """
    data = to_plain(dict(checkpoint))
    if network:
        data["tao_model"] = network
    buf = io.BytesIO()
    torch.save(data, buf)
    payload = buf.getvalue()
    if key:
        payload = crypto.encrypt_bytes(payload, key)
    return atomic_write_bytes(path, payload)


def update_latest_link(run_dir: str | os.PathLike, checkpoint_name: str, target: str | os.PathLike) -> Path:
    """Point ``<run_dir>/<checkpoint_name>_latest.pth`` at ``target`` atomically (temp link + rename).

    The link is relative, so a moved results directory keeps working.  Where symlinks are not supported, the
    file is copied (also through a temporary file and rename).
    """
    run_dir = Path(run_dir)
    link = run_dir / f"{checkpoint_name}_latest.pth"
    tmp = run_dir / f".{link.name}.{os.getpid()}.tmp"
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(Path(target).resolve(), run_dir.resolve()), tmp)
    except OSError:
        shutil.copyfile(target, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, link)
    return link


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, protect: tuple[str, ...] = ()) -> list[Path]:
    """Delete the oldest periodic ``model_epoch_*_step_*.pth`` files in ``run_dir`` beyond the newest ``keep``.

    ``keep <= 0`` keeps everything (TAO's behaviour).  Age is the global step (then the epoch) in the name, not
    the file time, so files of a resumed run sort with the run they continue.  A periodic file that a name in
    ``protect`` resolves to (the latest and best links; copies resolve to themselves) is never deleted, even
    when it is older than the newest ``keep``.  Returns the deleted paths.
    """
    if keep <= 0:
        return []
    run_dir = Path(run_dir)
    protected = {os.path.realpath(run_dir / name) for name in protect if (run_dir / name).exists()}
    periodic = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_file() and not path.is_symlink():
            periodic.append(((int(match.group(2)), int(match.group(1))), path))
    periodic.sort()
    removed = []
    for _, path in periodic[: max(0, len(periodic) - keep)]:
        if os.path.realpath(path) in protected:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        log.info("Removed checkpoint %s (train.keep_checkpoints=%d)", path.name, keep)
    return removed


def find_latest(run_dir: str | os.PathLike, checkpoint_name: str | None = None) -> Path | None:
    """The checkpoint the ``*_latest.pth`` link in ``run_dir`` points to (resolved), or None.

    ``<checkpoint_name>_latest.pth`` is preferred; otherwise a single ``*_latest.pth`` is used.  Several
    candidates or a dangling link are ``CheckpointError`` (TAO picks an arbitrary one silently).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    preferred = run_dir / f"{checkpoint_name}_latest.pth" if checkpoint_name else None
    if preferred is not None and (preferred.exists() or preferred.is_symlink()):
        candidates = [preferred]
    else:
        candidates = sorted(p for p in run_dir.glob("*_latest.pth") if not p.name.startswith("."))
    if not candidates:
        return None
    if len(candidates) > 1:
        raise CheckpointError(str(run_dir), f"holds several latest links {[c.name for c in candidates]}",
                              "set train.resume_training_checkpoint_path to choose one")
    target = Path(os.path.realpath(candidates[0]))
    if not target.is_file():
        raise CheckpointError(str(candidates[0]), f"points to {target}, which does not exist",
                              "remove the link or set train.resume_training_checkpoint_path")
    return target


def resolve_resume(cfg, run_dir: str | os.PathLike, checkpoint_name: str | None) -> Path | None:
    """Resume checkpoint for train: ``train.resume_training_checkpoint_path`` if set, else the latest in ``run_dir``.

    The explicit path must exist and end in .pth/.tlt/.ckpt (``ConfigError`` otherwise).
    """
    explicit = None
    if "train" in cfg and cfg.train is not None and "resume_training_checkpoint_path" in cfg.train:
        explicit = cfg.train.resume_training_checkpoint_path
    if explicit:
        path = Path(str(explicit)).expanduser()
        if path.suffix not in RESUME_SUFFIXES:
            raise ConfigError("train.resume_training_checkpoint_path",
                              f"{explicit} must end in {', '.join(RESUME_SUFFIXES)}")
        if not path.is_file():
            raise ConfigError("train.resume_training_checkpoint_path", f"{explicit} does not exist")
        return path.resolve()
    return find_latest(run_dir, checkpoint_name)


# ---------------------------------------------------------------------------------------------- RNG


def collect_rng_states() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and python ``random``, as tensors/lists (weights_only-safe)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of :func:`collect_rng_states` (missing parts are left alone)."""
    import numpy as np

    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "numpy" in states:
        s = states["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "python" in states:
        s = states["python"]
        random.setstate((s["version"], tuple(s["state"]), s["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


# ---------------------------------------------------------------------------------------------- loading


def _safe_globals() -> list:
    """Non-tensor classes that Lightning checkpoints written by other tools contain (ours are plain).

    Lightning 2.6 itself stores plain dicts, but ``save_hyperparameters()`` keeps whatever the module was given:
    OmegaConf containers (which pickle their nodes, metadata, ``typing.Any``, builtin type objects and a
    ``defaultdict``), paths, and Lightning's ``AttributeDict``.  All are data containers whose unpickling runs
    no user code.  Anything else is refused.
    """
    import builtins
    import collections
    import pathlib
    import typing

    allowed: list = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                     typing.Any, collections.defaultdict, collections.OrderedDict,
                     builtins.list, builtins.dict, builtins.int, builtins.float, builtins.str, builtins.bool,
                     builtins.tuple, builtins.set]
    try:
        from lightning_fabric.utilities.data import AttributeDict

        allowed.append(AttributeDict)
    except ImportError:  # pragma: no cover
        pass
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import (
            AnyNode,
            BooleanNode,
            BytesNode,
            FloatNode,
            IntegerNode,
            PathNode,
            StringNode,
        )

        allowed += [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, BytesNode,
                    FloatNode, IntegerNode, PathNode, StringNode]
    except ImportError:  # pragma: no cover
        pass
    return allowed


def _read_bytes(path: Path, key: str | None) -> bytes:
    """The plain bytes of ``path``: decrypted with ``key`` when the file is encrypted (``CheckpointError``
    naming the file for a missing/unreadable file, a missing or wrong key, a tampered file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(str(path), "does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if crypto.is_encrypted(data):
        return crypto.decrypt_bytes(data, key, source=str(path))
    if key:
        log.warning("%s is not encrypted although encryption_key is set; loading it as a plain file", path)
    return data


def checkpoint_reader(key: str | None) -> Callable[[Path], bytes]:
    """``path -> plain bytes`` with the run's ``key``: what the engine hands to
    :func:`networks.common.weights.file_reader`, so that pretrained weights a network reads itself
    (``train.pretrained_model_path``, backbone weights) are decrypted like every other checkpoint."""
    return lambda path: _read_bytes(Path(path), key)


def _torch_load(data: bytes, source: str, map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` of ``data`` with :func:`_safe_globals`; errors are one-line
    ``CheckpointError``s (see :func:`networks.common.weights.safe_torch_load`): a refused global says it needs
    arbitrary code execution, anything that is not a complete torch file says "truncated or corrupt"."""
    return safe_torch_load(data, source, allowed=_safe_globals(), map_location=map_location)


def _check_network(obj: Any, expected: str | None, source: str) -> None:
    if expected and isinstance(obj, dict):
        tag = obj.get("tao_model")
        if tag is not None and tag != expected:
            raise CheckpointError(source, f"is a '{tag}' checkpoint, not '{expected}'",
                                  f"use a checkpoint trained with the {expected} network")


def load_checkpoint(path: str | os.PathLike, *, key: str | None = None, expected_network: str | None = None,
                    map_location: Any = "cpu") -> dict:
    """Load a checkpoint without arbitrary unpickling (decrypting it when it is encrypted).

    Raises ``CheckpointError`` for a missing file, an unsafe pickle, a wrong/missing key, a tampered file, or a
    ``tao_model`` tag that differs from ``expected_network``.  ``.safetensors`` files return
    ``{"state_dict": tensors}``.
    """
    path = Path(path)
    data = _read_bytes(path, key)
    if path.suffix == ".safetensors":
        return {"state_dict": _safetensors_from_bytes(data, str(path))}
    obj = _torch_load(data, str(path), map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(str(path), f"holds a {type(obj).__name__}, not a checkpoint dictionary")
    _check_network(obj, expected_network, str(path))
    return obj


def _safetensors_from_bytes(data: bytes, source: str) -> dict:
    try:
        from safetensors.torch import load as st_load

        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(source, f"is not a readable .safetensors file ({exc})") from None




def load_weights(path: str | os.PathLike, *, key: str | None = None,
                 expected_network: str | None = None) -> dict[str, torch.Tensor]:
    """``{name: Tensor}`` from a .pth/.ckpt/.tlt checkpoint or a .safetensors file (safe loading)."""
    obj = load_checkpoint(path, key=key, expected_network=expected_network)
    weights = unwrap_state_dict(obj)
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- Lightning glue

try:
    import pytorch_lightning as pl
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from pytorch_lightning.callbacks import Checkpoint
except ImportError:  # pragma: no cover - Lightning is a hard dependency; keep import errors readable
    pl = None
    CheckpointIO = object  # type: ignore[assignment,misc]
    Checkpoint = object  # type: ignore[assignment,misc]


class TaoCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO plugin: atomic, tagged, optionally encrypted saves and safe loads."""

    def __init__(self, network: str, key: str | None = None):
        self.network = network
        self.key = key or None

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` (see :func:`save_checkpoint_file`)."""
        save_checkpoint_file(checkpoint, path, key=self.key, network=self.network)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Load with :func:`load_checkpoint` (``weights_only`` is always on)."""
        return load_checkpoint(path, key=self.key, expected_network=self.network,
                               map_location=map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path) -> None:
        """Delete ``path`` if it exists."""
        Path(path).unlink(missing_ok=True)


class TaoCheckpoint(Checkpoint):
    """Periodic TAO-named checkpoints, the latest link, the best checkpoint, retention, RNG capture, and a
    checkpoint on interruption.

    ``unit`` is ``"epoch"`` (save after every ``interval``-th epoch, after validation) or ``"step"`` (every
    ``interval`` global steps).  The last epoch is always saved so a re-run with more epochs continues from it.
    On KeyboardInterrupt/SIGTERM during fit the current state is saved too.  The callback's own state holds the
    RNG states at save time; on resume they are restored before the train dataloader is iterated, so a run
    resumed from an epoch-end checkpoint draws the same shuffles and dropout masks as an uninterrupted one.

    ``main_kpi`` is ``(key, "max"|"min")``: after each validation (not the sanity check) ``pl_module.kpi[key]``
    is compared with the best so far; a strictly better, finite value rewrites ``<checkpoint_name>_best.pth``
    (the full checkpoint, through the Trainer's CheckpointIO: atomic, tagged, encrypted like the others) and
    calls ``on_best(info)`` on rank 0 with ``info = {path, kpi, value, mode, epoch, step}``.  A NaN, inf or None
    value never becomes best.  The best value, epoch and step are part of the callback state, so they survive
    resume (they are forgotten when the best file is no longer in ``dirpath``, e.g. a resume from another
    directory, or when the main KPI changed).  ``keep > 0`` deletes the oldest periodic files beyond ``keep``
    after each save (:func:`prune_checkpoints`).
    """

    def __init__(self, dirpath: str | os.PathLike, checkpoint_name: str, interval: int = 1, unit: str = "epoch",
                 *, main_kpi: tuple[str, str] | None = None, keep: int = 0,
                 on_best: Callable[[dict], None] | None = None):
        if unit not in ("epoch", "step"):
            raise ConfigError("train.checkpoint_interval_unit", f"{unit!r} must be 'epoch' or 'step'")
        if main_kpi is not None and main_kpi[1] not in ("max", "min"):
            raise ValueError(f"main_kpi mode must be 'max' or 'min', got {main_kpi[1]!r}")
        self.dirpath = Path(dirpath)
        self.checkpoint_name = checkpoint_name
        self.interval = max(1, int(interval))
        self.unit = unit
        self.main_kpi = tuple(main_kpi) if main_kpi is not None else None
        self.keep = int(keep or 0)
        self.on_best = on_best
        self.best: dict | None = None  # {"value", "epoch", "step"} of the best validation so far
        self.saved: list[Path] = []
        self.interrupt_path: Path | None = None
        self._last_saved_step = -1
        self._warned_missing = False

    @property
    def best_path(self) -> Path:
        """``<dirpath>/<checkpoint_name>_best.pth`` (it exists once a validation produced the main KPI)."""
        return self.dirpath / best_filename(self.checkpoint_name)

    def best_info(self) -> dict | None:
        """``{path, kpi, value, mode, epoch, step}`` of the best checkpoint, or None (no main KPI value yet)."""
        if self.best is None or self.main_kpi is None:
            return None
        return {"path": str(self.best_path), "kpi": self.main_kpi[0], "value": self.best["value"],
                "mode": self.main_kpi[1], "epoch": self.best["epoch"], "step": self.best["step"]}

    # Lightning callback state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """RNG states at the moment the checkpoint is written, and the best main-KPI value so far."""
        state = {"rng": collect_rng_states(), "unit": self.unit, "interval": self.interval}
        if self.best is not None and self.main_kpi is not None:
            state["best"] = {"kpi": self.main_kpi[0], "mode": self.main_kpi[1], **self.best}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the saved RNG states at once, and the best main-KPI value.

        Lightning restores callback state before it sets up the train dataloader (whose first ``iter()`` draws
        the shuffle seed from torch's global RNG), and the sanity check in between runs under ``isolate_rng``,
        so the resumed run draws exactly what the uninterrupted run drew.
        """
        rng = state_dict.get("rng")
        if rng is not None:
            restore_rng_states(rng)
        best = state_dict.get("best")
        if best is None or self.main_kpi is None:
            return
        if (best.get("kpi"), best.get("mode")) != self.main_kpi:
            log.info("Best checkpoint was chosen by %s (%s); now by %s (%s): starting a new best",
                     best.get("kpi"), best.get("mode"), *self.main_kpi)
        elif not self.best_path.is_file():
            log.info("Resumed best %s=%s has no %s in %s; starting a new best", best["kpi"], best["value"],
                     self.best_path.name, self.dirpath)
        else:
            self.best = {"value": float(best["value"]), "epoch": int(best["epoch"]), "step": int(best["step"])}

    # saving -----------------------------------------------------------------------------------------
    def _path(self, trainer) -> Path:
        return self.dirpath / checkpoint_filename(trainer.current_epoch, trainer.global_step)

    def _prune(self) -> None:
        if self.keep > 0:
            prune_checkpoints(self.dirpath, self.keep,
                              protect=(f"{self.checkpoint_name}_latest.pth", best_filename(self.checkpoint_name)))

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        if trainer.global_step == self._last_saved_step:
            return
        path = self._path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero:
            update_latest_link(self.dirpath, self.checkpoint_name, path)
            self.saved.append(path)
            log.info("Saved checkpoint %s", path)
            self._prune()

    def _improves(self, value: Any) -> bool:
        if value is None or isinstance(value, bool):
            return False
        try:
            value = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.main_kpi[1] == "max" else value < self.best["value"]

    def on_validation_end(self, trainer, pl_module) -> None:
        """Rewrite the best checkpoint when this validation's main KPI beats the best so far."""
        if self.main_kpi is None or trainer.fast_dev_run or trainer.sanity_checking:
            return
        key = self.main_kpi[0]
        kpi = getattr(pl_module, "kpi", None) or {}
        if key not in kpi and not self._warned_missing and trainer.is_global_zero:
            self._warned_missing = True
            log.warning("Main KPI '%s' is not among the validation metrics %s; no best checkpoint this time",
                        key, sorted(kpi))
        value = kpi.get(key)
        # Every rank must take the same branch (save_checkpoint has a barrier): rank 0 decides.
        improved = bool(trainer.strategy.broadcast(self._improves(value), src=0))
        if not improved:
            return
        value = float(trainer.strategy.broadcast(float(value) if value is not None else float("nan"), src=0))
        self.best = {"value": value, "epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        trainer.save_checkpoint(self.best_path, weights_only=False)
        if trainer.is_global_zero:
            info = self.best_info()
            # The console counts epochs from 1 (status.json keeps TAO's 0-based epoch).
            log.info("New best checkpoint %s: %s=%.4g (epoch %d/%d, step %d)", self.best_path, key, value,
                     info["epoch"] + 1, trainer.max_epochs, info["step"])
            if self.on_best is not None:
                self.on_best(info)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.unit == "step" and trainer.global_step > 0 and trainer.global_step % self.interval == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        last = trainer.max_epochs is not None and trainer.max_epochs >= 0 and \
            trainer.current_epoch + 1 >= trainer.max_epochs
        if last or (self.unit == "epoch" and (trainer.current_epoch + 1) % self.interval == 0):
            self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Save the current state when fit is interrupted (Ctrl-C or SIGTERM); other errors save nothing."""
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == 0:
            return
        if not trainer.is_global_zero:
            return
        path = self._path(trainer)
        try:
            # No barrier here: the other ranks are being torn down, so save from rank 0 alone.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            update_latest_link(self.dirpath, self.checkpoint_name, path)
            self.interrupt_path = path
            log.warning("Interrupted: saved checkpoint %s", path)
            self._prune()
        except Exception as exc:  # never mask the interruption itself
            log.error("Interrupted: could not save a checkpoint (%s: %s)", type(exc).__name__, exc)
