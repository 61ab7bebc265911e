"""The weight files users already have: read any of them safely, recognise its layout, convert it to ours.

A *source* is what is on disk, read without running code: a Hugging Face model directory (``config.json`` plus
``model.safetensors`` / ``pytorch_model.bin``, sharded or not), a ``.safetensors`` file, a torch file (``.pth``,
``.pt``, ``.ckpt``, ``.bin``, ``.tlt``; ``weights_only`` unpickling) or a detectron2 ``.pkl`` (numpy arrays only).
A *format* is a layout of keys inside a source — "HF Mask2Former", "IDEA Grounding DINO", "TAO-trained MAL" —
that one network knows how to convert.  Each network lists its formats (``Network.weight_formats``); this
module detects which one a source is and loads the converted tensors with a :class:`LoadReport`.

Contract of a converter: ``to_state_dict(source, model_cfg) -> {key: Tensor}`` with the keys of the network's
model (``module.model``, no ``model.`` prefix), values in the file's dtype; ``model_cfg`` is the spec's
``model`` section (or ``None`` when converting without a spec: the converter then takes sizes from the file).
"""
from __future__ import annotations

import fnmatch
import io
import json
import logging
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from networks.common.errors import CheckpointError

__all__ = ["WeightSource", "WeightFormat", "read_source", "source_from_checkpoint", "detect_format", "key_groups",
           "require_whole_model", "load_whole_model", "declared_new_parts", "OWN_LAYOUTS",
           "has_keys", "load_converted", "CONTAINERS"]

log = logging.getLogger(__name__)

#: names of the formats that are a network's own checkpoint layout (tao-cli's ``ours``, TAO's ``tao``): a tagged
#: checkpoint in one of them must match the model exactly
OWN_LAYOUTS = ("ours", "tao")
#: container kinds :func:`read_source` returns
CONTAINERS = ("hf-dir", "safetensors", "torch", "detectron2-pkl")
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".tlt")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class WeightSource:
    """One weights file or directory, read safely.

    * ``path`` — what the user gave; ``container`` — one of :data:`CONTAINERS`.
    * ``tensors`` — every tensor, flat ``{key: Tensor}`` in file order: the ``state_dict``/``model`` mapping of a
      torch file when it has one (see :func:`networks.common.weights.unwrap_state_dict`), else its top-level
      tensors; all shards of an HF directory; the numpy arrays of a ``.pkl`` as tensors.
    * ``meta`` — the non-tensor context: an HF directory's ``config.json`` under ``"config"``; a torch file's
      top-level entries that are not the weights (``tao_model``, ``epoch``, ``hyper_parameters`` ...); a ``.pkl``'s
      non-array entries (``__author__``, ``matching_heuristics``).
    * ``wrapper`` — for a torch file, the top-level key the weights were found under (``"state_dict"`` for
      Lightning/TAO, ``"model"`` for MAE/DeiT/Swin releases), None for a bare state dict and other containers.
    """

    path: Path
    container: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    wrapper: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The HF ``config.json`` (empty for other containers)."""
        return self.meta.get("config") or {}

    @property
    def tao_model(self) -> str | None:
        """The ``tao_model`` tag of a tao-cli checkpoint (None for foreign files)."""
        tag = self.meta.get("tao_model")
        return tag if isinstance(tag, str) else None

    def num_parameters(self) -> int:
        """Number of scalar values in all floating-point tensors (buffers such as index tables excluded)."""
        return sum(t.numel() for t in self.tensors.values() if t.is_floating_point())


@dataclass(frozen=True)
class WeightFormat:
    """A key layout one network can convert.

    * ``name`` — short id used by ``format=`` overrides and printed by ``tao weights inspect`` (``hf``,
      ``detectron2``, ``tao``, ``swin-microsoft`` ...); unique within a network.
    * ``network`` — the registry name of the network the weights are for; ``part`` — what they fill: ``"model"``
      (the whole network), ``"backbone"`` or ``"text_encoder"``.
    * ``description`` — one line: the layout and where such files come from.
    * ``detect(source) -> bool`` — True when the source has this layout; must not raise on other layouts.
    * ``to_state_dict(source, model_cfg)`` — the converted tensors (module contract above).
    * ``new_parts`` — fnmatch patterns of our model keys this format never carries (e.g. Grounding DINO's mask head
      from an HF detector): left at their initial values and reported as newly initialised, never an error.
    * ``optional_parts`` — patterns of keys the file may legitimately lack or carry with another shape (a class
      head for another number of classes): re-initialised and reported.  Every other missing or mismatched key
      is an error.
    * ``benign`` — patterns of converted keys that have no slot in our model and are dropped silently.
    """

    name: str
    network: str
    part: str
    description: str
    detect: Callable[[WeightSource], bool]
    to_state_dict: Callable[[WeightSource, Any], dict[str, torch.Tensor]]
    new_parts: tuple[str, ...] = ()
    optional_parts: tuple[str, ...] = ()
    benign: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------- reading
def _read_torch(path: Path, data: bytes) -> WeightSource:
    import argparse

    from networks.common.weights import safe_torch_load

    obj = safe_torch_load(data, str(path), allowed=[argparse.Namespace])
    return source_from_checkpoint(path, obj)


def source_from_checkpoint(path: str | Path, obj: Any, container: str = "torch") -> WeightSource:
    """The :class:`WeightSource` of a checkpoint object already loaded safely (e.g. by the engine's loader,
    which decrypts): weights unwrapped as :func:`read_source` does, the other entries as ``meta``."""
    from networks.common.weights import unwrap_state_dict

    path = Path(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(str(path), f"holds a {type(obj).__name__}, not a state dict",
                              "pass a file saved with torch.save(state_dict) or a checkpoint dictionary")
    tensors = {k: v for k, v in unwrap_state_dict(obj).items() if torch.is_tensor(v)}
    meta = {k: v for k, v in obj.items()
            if not torch.is_tensor(v) and not (k in ("state_dict", "model") and isinstance(v, Mapping))}
    wrapper = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)
                    and any(torch.is_tensor(v) for v in obj[k].values())), None)
    if container == "safetensors":
        wrapper = None  # the engine's loader presents a .safetensors file as {"state_dict": tensors}
    return WeightSource(path, container, tensors, meta, wrapper)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: anything else in a ``.pkl`` is refused (no code runs)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _read_pkl(path: Path, data: bytes) -> WeightSource:
    import numpy as np

    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise CheckpointError(str(path), f"cannot be loaded safely as a detectron2 .pkl ({exc})",
                              "only plain dicts of numpy arrays are accepted") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(str(path), "has no 'model' dict of arrays", "pass a detectron2 model-zoo .pkl")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in obj.items() if k != "model"} if state is not obj else {}
    return WeightSource(path, "detectron2-pkl", tensors, meta)


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` strings of a safetensors header (``tao_model`` written by ``tao weights convert``);
    the header is an 8-byte little-endian length followed by JSON.  Empty when absent or unreadable."""
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}


def _read_safetensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    try:
        return dict(load_safetensors(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(str(path), f"is not a readable safetensors file ({str(exc)[:200]})",
                              "copy or save the file again") from None


def _read_hf_dir(path: Path, field_name: str) -> WeightSource:
    from networks.common.weights import read_file_bytes

    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(config_file), f"is not readable JSON ({exc})") from None
    files: list[Path] = []
    for index_name in _HF_INDEXES:
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise CheckpointError(str(index), f"is not a weight index ({exc})") from None
            files = [path / s for s in shards]
            break
    if not files:
        files = [path / n for n in _HF_WEIGHT_FILES if (path / n).is_file()][:1]
    if not files:
        raise CheckpointError(field_name, f"{path} is a directory without model weights",
                              "pass a Hugging Face model directory (config.json + model.safetensors or "
                              "pytorch_model.bin) or a weights file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(str(f), "is listed in the weight index but missing", "download every shard")
        if f.suffix == ".safetensors":
            tensors.update(_read_safetensors(f, read_file_bytes(f)))
        else:
            tensors.update(_read_torch(f, read_file_bytes(f)).tensors)
    return WeightSource(path, "hf-dir", tensors, {"config": config})


def read_source(path: str | Path, *, field: str = "weights") -> WeightSource:
    """Read ``path`` (file or HF directory) without running code; errors name ``field`` or the file.

    Bytes come through :func:`networks.common.weights.read_file_bytes` (inside a run: decrypted with the spec's
    ``encryption_key`` when the file is encrypted).
    """
    from networks.common.weights import read_file_bytes

    p = Path(path).expanduser()
    if p.is_dir():
        return _read_hf_dir(p, field)
    if not p.is_file():
        raise CheckpointError(field, f"file not found: {p}", f"check {field}")
    if p.suffix in (".engine", ".plan", ".onnx"):
        raise CheckpointError(field, f"{p.name} is an exported model, not trainable weights",
                              "point to a .pth/.safetensors/.pkl file or a Hugging Face directory")
    data = read_file_bytes(p)
    if p.suffix == ".safetensors":
        return WeightSource(p, "safetensors", _read_safetensors(p, data), _safetensors_metadata(data))
    if p.suffix == ".pkl":
        return _read_pkl(p, data)
    return _read_torch(p, data)


# ------------------------------------------------------------------------------------------ recognising
def has_keys(source: WeightSource, *patterns: str) -> bool:
    """True when every fnmatch pattern matches at least one key of ``source`` (a cheap ``detect`` building block)."""
    keys = list(source.tensors)
    return all(any(fnmatch.fnmatchcase(k, p) for k in keys) for p in patterns)


def key_groups(keys: Iterable[str], depth: int = 2) -> list[tuple[str, int]]:
    """``[(prefix, count)]`` of the first ``depth`` dotted parts of ``keys``, in first-seen order."""
    counts: Counter[str] = Counter()
    order: list[str] = []
    for k in keys:
        prefix = ".".join(k.split(".")[:depth])
        if prefix not in counts:
            order.append(prefix)
        counts[prefix] += 1
    return [(p, counts[p]) for p in order]


def detect_format(source: WeightSource, formats: Sequence[WeightFormat], *, forced: str | None = None,
                  field: str = "weights") -> WeightFormat:
    """The format of ``source`` among ``formats`` (``forced``: the one named, checked to apply).

    No match is a :class:`CheckpointError` naming ``field``, the formats tried and the key groups seen; a tao-cli
    checkpoint of another network names that network.
    """
    if forced:
        chosen = [f for f in formats if f.name == forced]
        if not chosen:
            raise CheckpointError(field, f"unknown weights format {forced!r}",
                                  "use one of: " + ", ".join(f.name for f in formats))
        return chosen[0]
    networks = {f.network for f in formats}
    if source.tao_model and networks and source.tao_model not in networks:
        raise CheckpointError(str(source.path), f"is a '{source.tao_model}' checkpoint, not "
                              f"'{'/'.join(sorted(networks))}'",
                              f"use weights of the {'/'.join(sorted(networks))} network")
    for f in formats:
        try:
            if f.detect(source):
                return f
        except Exception:  # noqa: BLE001 - a detector must not decide for another layout by crashing
            continue
    seen = ", ".join(f"{p} ({n})" for p, n in key_groups(source.tensors, 1)[:6]) or "no tensors"
    expected = "/".join(sorted(networks)) or "this network"
    raise CheckpointError(str(source.path), f"is not {expected} weights in any known layout (keys: {seen})",
                          "known formats: " + ", ".join(f.name for f in formats)
                          + "; run `tao weights inspect` on the file")


def load_converted(model: torch.nn.Module, source: WeightSource, fmt: WeightFormat, model_cfg: Any, *,
                   prefix: str = ""):
    """Convert ``source`` with ``fmt`` and copy it into ``model`` (keys under ``prefix`` when the format fills
    a part of the model, e.g. ``"backbone."``); returns the :class:`~networks.common.weights.LoadReport`.

    Missing keys and shape mismatches are allowed only under ``fmt.new_parts`` / ``fmt.optional_parts``;
    anything else is one :class:`CheckpointError` naming the first keys.  ``report.missing`` then lists the
    newly initialised keys (log ``report.summary(f"{path} ({fmt.name})")``).
    """
    from networks.common.weights import apply_state_dict

    state = fmt.to_state_dict(source, model_cfg)
    if prefix:
        state = {prefix + k: v for k, v in state.items()}
    report = apply_state_dict(model, state, benign_patterns=tuple(prefix + p for p in fmt.benign),
                              source=str(source.path),
                              raise_on_mismatch=False, log_summary=False)
    allowed = tuple(prefix + p for p in fmt.new_parts + fmt.optional_parts + declared_new_parts(source))
    scope = (lambda k: k.startswith(prefix)) if prefix else (lambda k: True)

    def bad(key: str) -> bool:
        return scope(key) and not any(fnmatch.fnmatchcase(key, p) for p in allowed)

    mismatched = [m for m in report.mismatched if bad(m[0])]
    missing = [k for k in report.missing if bad(k)]
    if mismatched or missing or report.unexpected:
        parts = []
        if mismatched:
            k, f, m = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k}: {f} in the file vs {m} in the model")
        if missing:
            parts.append(f"{len(missing)} key(s) missing, e.g. {', '.join(missing[:3])}")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} key(s) without a place in the model, e.g. "
                         f"{', '.join(report.unexpected[:3])}")
        raise CheckpointError(str(source.path), f"({fmt.name}) does not fit the model: " + "; ".join(parts),
                              "check that the spec's model section (sizes, backbone, window size) matches the "
                              "weights")
    report.missing = [k for k in report.missing if scope(k)]
    return report


def declared_new_parts(source: WeightSource) -> tuple[str, ...]:
    """Patterns of keys a converted file says it lacks: ``tao weights convert`` records the ``new_parts`` of the
    format it converted from (a Grounding DINO release has no mask head), under ``converted_from`` in a ``.pth``
    and as a comma-separated ``new_parts`` string in ``.safetensors`` metadata."""
    conv = source.meta.get("converted_from")
    parts = conv.get("new_parts") if isinstance(conv, Mapping) else source.meta.get("new_parts")
    if isinstance(parts, str):
        parts = [p for p in parts.split(",") if p]
    return tuple(p for p in parts or () if isinstance(p, str))


def require_whole_model(fmt: WeightFormat, source: WeightSource, field: str) -> None:
    """Raise the one-line :class:`CheckpointError` when ``fmt`` fills only a part (a backbone release given where
    a trained model is needed: ``evaluate/inference/export.checkpoint``)."""
    if fmt.part != "model":
        raise CheckpointError(field, f"{source.path} holds only the {fmt.part} of a {fmt.network} model "
                              f"({fmt.name}: {fmt.description})",
                              f"set it as train.pretrained_model_path and train first; {field} needs a whole "
                              "trained model")


def load_whole_model(model: torch.nn.Module, path: str | Path, formats: Sequence[WeightFormat], model_cfg: Any, *,
                     field: str, loader: Callable[[Path], Mapping] | None = None, prefix: str = "",
                     quantized: Sequence[str] = ()):
    """Load a whole trained model from ``path`` (file or HF directory) in any of ``formats`` — the network's own
    checkpoints first among them — into ``model``; returns ``(report, format, meta)``.

    ``loader(path) -> dict`` is the engine's safe loader for files (decryption, ``tao_model`` check); without it
    files are read by :func:`read_source`.  Formats that fill only a part are refused
    (:func:`require_whole_model`); missing keys outside the format's ``new_parts``/``optional_parts`` are errors.
    A file of the ``quantize`` action is refused unless its backend is in ``quantized`` (only ``modelopt.pytorch``
    can be: ModelOpt's quantizers are put into ``model``, the bare network, before its tensors load).  Tensors
    the file lacks (newly initialised, allowed by the format) are logged as a warning.
    """
    from networks.common.weights import read_weights_file

    p = Path(path).expanduser()
    if p.is_dir() or loader is None:
        source = read_source(p, field=field)
    else:
        obj = read_weights_file(p, field=field, loader=loader)
        source = source_from_checkpoint(p, obj, "safetensors" if p.suffix == ".safetensors" else "torch")
    record = source.meta.get("quantization")
    if isinstance(record, Mapping) and record.get("backend") in quantized:
        from networks.common.torch_quantize import prepare_quantized

        prepare_quantized(model, record, str(p), root="")  # the bare network: no Lightning "model." level
    elif isinstance(record, Mapping):
        raise CheckpointError(field, f"{p} is a quantized model (quantize action, {record.get('backend')} "
                              f"{record.get('mode')}); this action needs floating-point weights",
                              f"use the checkpoint it was quantized from ({record.get('source', 'the train output')})")
    fmt = detect_format(source, formats, field=field)
    require_whole_model(fmt, source, field)
    report = load_converted(model, source, fmt, model_cfg, prefix=prefix)
    if report.missing:
        log.warning("%s (%s): %d tensors are newly initialised, e.g. %s", path, fmt.name, len(report.missing),
                    ", ".join(report.missing[:3]))
    return report, fmt, source.meta
