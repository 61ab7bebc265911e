"""Loading a state dict into a module with an explicit report instead of ``strict=True/False``.

``apply_state_dict`` loads every key whose name and shape match, raises :class:`CheckpointError` when a key
exists on both sides with different shapes (a silent partial load there hides a wrong config), and returns a
:class:`LoadReport` saying which keys were missing, which were unexpected, and which of the unexpected ones are
known to be harmless (``benign``, e.g. a classification head or a cached buffer in a release file).
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.common.errors import CheckpointError, ConfigError

__all__ = ["LoadReport", "apply_state_dict", "unwrap_state_dict", "whole_model_state", "strip_prefix", "freeze_modules", "read_weights_file",
           "safe_torch_load", "file_reader", "read_file_bytes"]

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """Outcome of a state-dict load.

    ``missing``: module keys the file did not provide (left at their initial values).
    ``unexpected``: file keys the module has no slot for and that match no benign pattern.
    ``benign``: file keys dropped on purpose (they matched a benign pattern).
    ``mismatched``: ``(key, file_shape, module_shape)``; only filled when the caller asked not to raise.
    ``loaded``: number of tensors copied.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    benign: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing is missing, unexpected (non-benign) or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def counts(self) -> str:
        """``"N matched, M newly initialised, U unexpected, K shape-mismatched"`` (the load report's one-line core;
        mismatched tensors are re-initialised, benign drops are counted when there are any)."""
        text = (f"{self.loaded} matched, {len(self.missing)} newly initialised, {len(self.unexpected)} unexpected, "
                f"{len(self.mismatched)} shape-mismatched")
        return text + (f", {len(self.benign)} known-unused dropped" if self.benign else "")

    def summary(self, what: str = "weights") -> str:
        """One paragraph describing the load, listing at most a few keys per category."""

        def few(keys: list, n: int = 5) -> str:
            keys = [k if isinstance(k, str) else k[0] for k in keys]
            more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
            return ", ".join(keys[:n]) + more

        parts = [f"Loaded {self.loaded} tensors of {what}."]
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept initial values): {few(self.missing)}.")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (ignored): {few(self.unexpected)}.")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape-mismatched (skipped): {few(self.mismatched)}.")
        if self.benign:
            parts.append(f"{len(self.benign)} known-unused keys dropped.")
        return " ".join(parts)


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a checkpoint object (entries in file order).

    Accepts a dict wrapped under ``"state_dict"`` (Lightning/TAO checkpoints) or ``"model"`` (official Swin, MAE
    and DeiT releases), looked up in that order and used when it holds a tensor, else a bare state dict (its
    tensors).  Raises :class:`CheckpointError` when no tensor mapping is found.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError("checkpoint", f"expected a dict of tensors, got {type(obj).__name__}",
                              "pass a PyTorch state dict or a file saved with torch.save({'model': ...})")
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
            return dict(inner)
    if any(torch.is_tensor(v) for v in obj.values()):
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}
    raise CheckpointError("checkpoint", "contains no tensors under 'state_dict', 'model' or at the top level",
                          "check that the file is a PyTorch weights file")


def whole_model_state(obj: Mapping, model: nn.Module, prefix: str, *, field: str, source: Any,
                      network: str) -> dict[str, Any]:
    """The state dict of the checkpoint ``obj`` (read from ``source``, named by the spec field ``field``), which
    must hold exactly ``model``'s tensors under ``prefix`` (a train checkpoint or ``tao weights convert``
    output), other entries allowed; :class:`ConfigError` naming the field otherwise (how many are missing and
    unknown)."""
    state = dict(unwrap_state_dict(obj))
    own = set(model.state_dict())
    inner = {k[len(prefix):] for k in state if k.startswith(prefix)}
    if inner != own:
        raise ConfigError(field, f"{source} is not a whole {network} checkpoint in tao-cli's layout "
                          f"({len(own - inner)} model tensors missing, {len(inner - own)} unknown)",
                          "pass a checkpoint written by the train action, or convert the file with "
                          "`tao weights convert` first")
    return state


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed when any key has it, else a copy of ``state_dict``.

    A tao-cli/TAO Lightning checkpoint holds the network as the module attribute ``model``; its other entries
    (e.g. ``criterion.*``) are dropped with the prefix.
    """
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def apply_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    benign_patterns: Iterable[str] = (),
    *,
    source: str = "weights",
    raise_on_mismatch: bool = True,
    log_summary: bool = True,
) -> LoadReport:
    """Copy ``state_dict`` into ``module`` key by key and report what happened.

    ``benign_patterns`` are ``fnmatch`` patterns (``"head.*"``, ``"*.attn_mask"``) for file keys that are known
    to have no slot in ``module``; they land in ``report.benign`` instead of ``report.unexpected``.  A key
    present on both sides with a different shape raises :class:`CheckpointError` naming ``source``, the key and
    both shapes (or is recorded in ``report.mismatched`` with ``raise_on_mismatch=False``).  Values are copied
    with the module's dtype and device.  Logs ``report.summary()`` at INFO level unless ``log_summary`` is False.
    """
    benign_patterns = tuple(benign_patterns)
    own = module.state_dict()
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            (report.benign if _matches(key, benign_patterns) else report.unexpected).append(key)
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            if raise_on_mismatch:
                raise CheckpointError(
                    source,
                    f"tensor '{key}' has shape {tuple(value.shape)} in the file but {tuple(own[key].shape)} in the model",
                    "check that the model config (sizes, window size, number of classes) matches the weights file",
                )
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
            continue
        to_load[key] = value
    skipped = {m[0] for m in report.mismatched}
    report.missing = [k for k in own if k not in to_load and k not in skipped]
    module.load_state_dict(to_load, strict=False)  # every key was checked above
    report.loaded = len(to_load)
    if log_summary:
        log.info(report.summary(source))
    return report


def freeze_modules(model: nn.Module, paths: list[str], *, strip_prefixes: tuple[str, ...] = ("model.",),
                   example: str = "backbone") -> list[str]:
    """Set ``requires_grad=False`` under each dotted path (sub-module or parameter) of ``model``.

    TAO's ``train.freeze`` names paths inside its Lightning wrapper, so leading ``strip_prefixes`` are removed
    when the path does not exist as written.  Returns the paths frozen; an unknown path is a
    :class:`ConfigError` on ``train.freeze`` naming the model's top-level modules.
    """
    frozen = []
    for raw in paths or []:
        path = raw.strip()
        for prefix in strip_prefixes:
            if path.startswith(prefix) and _resolve(model, path) is None:
                path = path[len(prefix):]
        params = _resolve(model, path)
        if params is None:
            tops = ", ".join(n for n, _ in model.named_children())
            raise ConfigError("train.freeze", f"'{raw}' is not a module or parameter of the model",
                              f"use dotted paths under: {tops} (e.g. {example})")
        for p in params:
            p.requires_grad_(False)
        frozen.append(path)
    return frozen


def _resolve(model: nn.Module, path: str) -> list[nn.Parameter] | None:
    try:
        return list(model.get_submodule(path).parameters())
    except AttributeError:
        try:
            return [model.get_parameter(path)]
        except AttributeError:
            return None


# The engine's reader of weight files (``path -> plain bytes``: decrypts with the run's encryption_key), set for
# the duration of a run by :func:`file_reader`.  Networks load pretrained weights deep inside their builders,
# which know the path but not the key; this hands them the engine's reader without a parameter in every builder.
_READER: contextvars.ContextVar[Callable[[Path], bytes] | None] = contextvars.ContextVar("tao_weights_reader",
                                                                                       default=None)


@contextlib.contextmanager
def file_reader(reader: Callable[[Path], bytes]) -> Iterator[None]:
    """While the block runs, :func:`read_file_bytes` (and so :func:`read_weights_file`) reads files with
    ``reader(path) -> bytes`` (the engine's: decryption with the run's key, one-line errors)."""
    token = _READER.set(reader)
    try:
        yield
    finally:
        _READER.reset(token)


def read_file_bytes(path: Path) -> bytes:
    """The plain bytes of a weights file: through the reader set by :func:`file_reader`, else as stored."""
    reader = _READER.get()
    if reader is not None:
        return reader(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read ({exc.strerror or exc})") from None


# Messages of torch's weights-only unpickler that mean "this file wants a global we do not allow" (a real
# pickle refused on purpose).  Every other UnpicklingError (an unknown opcode, a string running past the end)
# comes from bytes that are not a complete pickle, i.e. a truncated or corrupt file.
_REFUSAL_MARKERS = ("GLOBAL", "reduce for unrecognized function", "Can only create new object",
                    "Can only build", "must be imported to load")
_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_CORRUPT_HINT = "copy or save the file again; an interrupted copy or download leaves a partial file"


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError):  # torch's legacy reader looks the header bytes up in a table
        return "no torch checkpoint header"
    if not text:
        return "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")[:200]


def _well_formed_pickle(data: bytes) -> bool:
    """True when the (first) pickle in ``data`` — ``data.pkl`` of a torch zip archive, else the stream itself —
    is a complete sequence of valid opcodes.  ``pickletools.genops`` only parses; nothing is executed.  Random
    bytes can make the unpickler stop on an opcode that reads like a refused global; they fail this check."""
    import pickletools
    import zipfile

    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        for _ in pickletools.genops(data):
            pass
    except Exception:  # noqa: BLE001 - any parse failure means "not a complete pickle"
        return False
    return True


def _torchao_registered() -> bool:
    import sys

    return "torchao" in sys.modules


def _register_torchao() -> bool:
    """Import torchao (its import makes its quantized tensor classes loadable with ``weights_only``); False when
    it is not installed."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def safe_torch_load(data: bytes, source: str, *, allowed: Iterable[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``data`` with the extra classes ``allowed``; every failure is a
    one-line :class:`CheckpointError` on ``source``.

    Bytes that are not a torch file or a pickle (empty, random, cut short: a bad zip directory, EOF, an opcode
    that is no pickle opcode) say "is not a checkpoint, or is truncated or corrupt".  A well-formed pickle that
    wants a global outside the allow-list says it is refused because loading it would run code.  torch's own
    advice (retry with the unsafe loader) is never passed on.
    """
    import pickle
    import struct

    if not data:
        raise CheckpointError(source, "is not a checkpoint, or is truncated or corrupt (the file is empty)",
                              _CORRUPT_HINT)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not any(marker in text for marker in _REFUSAL_MARKERS) or not _well_formed_pickle(data):
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
            reason = detail.splitlines()[0][:200] if "WeightsUnpickler error:" in text and detail \
                else _first_sentence(exc)
            raise CheckpointError(source, f"is not a checkpoint, or is truncated or corrupt ({reason})",
                                  _CORRUPT_HINT) from None
        match = _GLOBAL_RE.search(text)
        what = match.group(1) if match else "an object"
        if what.startswith("torchao.") and not _torchao_registered():
            # a torchao-quantized checkpoint: torchao registers its tensor classes as safe when imported
            if _register_torchao():
                return safe_torch_load(data, source, allowed=allowed, map_location=map_location)
            raise CheckpointError(source, f"holds torchao-quantized tensors ('{what}') and torchao is not installed",
                                  "pip install 'torchao==0.18.0' (or tao-cli[quantize])") from None
        raise CheckpointError(
            source,
            f"refusing to unpickle '{what}' (this file needs arbitrary code execution to load)",
            "it cannot be loaded safely; re-save it as a plain state_dict or .safetensors",
        ) from None
    except (EOFError, ValueError, KeyError, IndexError, struct.error) as exc:
        # EOF / negative seek / a bad legacy header: the bytes end early or are not a torch file.
        raise CheckpointError(source, f"is not a checkpoint, or is truncated or corrupt ({_first_sentence(exc)})",
                              _CORRUPT_HINT) from None
    except RuntimeError as exc:
        text = str(exc)
        if any(s in text for s in ("zip archive", "EOF", "corrupt", "file might be")):
            raise CheckpointError(source, f"is not a checkpoint, or is truncated or corrupt "
                                  f"({_first_sentence(exc)})", _CORRUPT_HINT) from None
        raise CheckpointError(source, f"is not a readable checkpoint ({_first_sentence(exc)})") from None


def read_weights_file(path: str | Path, *, field: str = "weights", loader: Callable | None = None) -> Mapping:
    """Read weights safely: ``.safetensors``, or a torch file with ``weights_only=True``; returns the dict.

    ``loader(path) -> dict`` (the engine's safe loader, which also decrypts and checks the network tag) is used
    for non-safetensors files when given.  Otherwise the bytes come from :func:`read_file_bytes` (inside a run:
    the engine's reader, which decrypts an encrypted file with ``encryption_key``).  Official MAE checkpoints
    pickle an ``argparse.Namespace`` next to the weights; it is allow-listed.  A missing file names ``field``;
    anything that is not plain tensors/containers raises :class:`CheckpointError` (no arbitrary code runs).
    """
    import argparse

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(field, f"file not found: {path}", f"check {field}")
    if loader is not None and path.suffix != ".safetensors":
        return loader(path)
    data = read_file_bytes(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(str(path), f"not a readable safetensors file ({_first_sentence(exc)})") from None
    obj = safe_torch_load(data, str(path), allowed=[argparse.Namespace])
    if not isinstance(obj, Mapping):
        raise CheckpointError(str(path), f"holds a {type(obj).__name__}, not a state dict")
    return obj
