"""Loading a state dict into a module with an explicit report instead of ``strict=True/False``.

``apply_state_dict`` loads every key whose name and shape match, raises :class:`CheckpointError` when a key
exists on both sides with different shapes (a silent partial load there hides a wrong config), and returns a
:class:`LoadReport` saying which keys were missing, which were unexpected, and which of the unexpected ones are
known to be harmless (``benign``, e.g. a classification head or a cached buffer in a release file).
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from networks.common.errors import CheckpointError, ConfigError

__all__ = ["LoadReport", "apply_state_dict", "unwrap_state_dict", "strip_prefix", "freeze_modules", "read_weights_file"]

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


def read_weights_file(path: str | Path, *, field: str = "weights", loader: Callable | None = None) -> Mapping:
    """Read weights safely: ``.safetensors``, or a torch file with ``weights_only=True``; returns the dict.

    ``loader(path) -> dict`` (the engine's safe loader, which also decrypts and checks the network tag) is used
    for non-safetensors files when given.  Official MAE checkpoints pickle an ``argparse.Namespace`` next to
    the weights; it is allow-listed.  A missing file names ``field``; anything that is not plain
    tensors/containers raises :class:`CheckpointError` (no arbitrary code runs).
    """
    import argparse
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(field, f"file not found: {path}", f"check {field}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(str(path), f"not a readable safetensors file ({exc})") from None
    if loader is not None:
        return loader(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(str(path), f"cannot be loaded safely as weights ({first})",
                              "save the weights as a plain state dict or .safetensors") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(str(path), f"holds a {type(obj).__name__}, not a state dict")
    return obj
