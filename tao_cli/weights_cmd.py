"""``tao weights inspect`` and ``tao weights convert``: what a weights file is, and our checkpoint made from it.

Both read files without running code (:func:`networks.common.weight_formats.read_source`) and know the networks
only through :mod:`tao_cli.registry` (each network's ``weight_formats``).  :func:`detect_any` is also what the
engine uses to name the network a foreign checkpoint belongs to.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from networks.common.errors import CheckpointError, ConfigError

__all__ = ["detect_any", "formats_of", "inspect_text", "convert", "TOP_GROUPS"]

#: key groups printed by ``inspect`` before "… N more"
TOP_GROUPS = 12


def formats_of(network: str) -> list:
    """The weight formats of registered network ``network`` (empty when it declares none)."""
    from tao_cli import registry

    net = registry.load(network)
    return list(net.weight_formats()) if net.weight_formats is not None else []


def detect_any(src, networks: Sequence[str] | None = None, *, exclude: str | None = None):
    """``(network, WeightFormat)`` of the first registered network (``networks``: only those) whose formats
    recognise ``src``, or None.  ``exclude`` skips one network (the engine asks "whose is it, if not mine?")."""
    from tao_cli import registry

    for name in networks or registry.names():
        if name == exclude:
            continue
        try:
            formats = formats_of(name)
        except Exception:  # noqa: BLE001 - a broken network must not hide the others
            continue
        for fmt in formats:
            try:
                if fmt.detect(src):
                    return name, fmt
            except Exception:  # noqa: BLE001 - a detector must not decide by crashing
                continue
    return None


def _dtypes(src) -> str:
    from collections import Counter

    counts = Counter(str(t.dtype).replace("torch.", "") for t in src.tensors.values())
    return ", ".join(f"{d} ({n})" for d, n in counts.most_common())


def inspect_text(path: str | Path, network: str | None = None) -> tuple[str, int]:
    """The ``tao weights inspect`` block for ``path`` and its exit code (0 recognised, 2 not recognised).

    Lines: ``file``, ``container``, ``network``/``format``/``part``/``description`` (or ``format: not
    recognised`` and the formats tried), ``parameters``, ``tensors``, ``dtypes``, the tao-cli tag/epoch/step when
    present, then ``key groups`` (depth 2, at most :data:`TOP_GROUPS`, then "… N more").
    """
    from networks.common.weight_formats import key_groups, read_source
    from tao_cli import registry

    src = read_source(path, field="FILE")
    names = [network] if network else registry.names()
    if network:
        registry.load(network)  # an unknown name is a one-line error
    lines = [f"file:        {src.path}", f"container:   {src.container}"]
    found = None
    if src.tao_model and (network is None or src.tao_model == network):
        own = [f for f in formats_of(src.tao_model) if f.part == "model"] if src.tao_model in registry.names() else []
        found = (src.tao_model, next((f for f in own if _safe_detect(f, src)), None))
    if found is None or found[1] is None:
        found = detect_any(src, names) or found
    code = 0
    if found is None:
        tried = [f"{n}:{f.name}" for n in names for f in _formats_or_empty(n)]
        lines.append("format:      not recognised")
        lines.append(f"tried:       {', '.join(tried) or 'no network declares weight formats'}")
        code = 2
    else:
        name, fmt = found
        lines.append(f"network:     {name}")
        if fmt is None:
            lines.append("format:      tao-cli checkpoint (tagged)")
        else:
            lines += [f"format:      {fmt.name}", f"part:        {fmt.part}", f"description: {fmt.description}"]
    lines.append(f"parameters:  {src.num_parameters():,}")
    lines.append(f"tensors:     {len(src.tensors)}")
    lines.append(f"dtypes:      {_dtypes(src) or '-'}")
    if src.tao_model:
        lines.append(f"tao_model:   {src.tao_model}")
        for key, label in (("epoch", "epoch:"), ("global_step", "step:")):
            if key in src.meta:
                lines.append(f"{label:<13}{src.meta[key]}")
    conv = src.meta.get("converted_from")
    if isinstance(conv, dict):
        lines.append(f"converted:   from {conv.get('path')} (format {conv.get('format')})")
        if conv.get("new_parts"):
            lines.append(f"not in it:   {', '.join(conv['new_parts'])} (newly initialised when loaded)")
    groups = key_groups(src.tensors, 2)
    lines.append("key groups:")
    lines += [f"  {prefix}  ({count})" for prefix, count in groups[:TOP_GROUPS]]
    if len(groups) > TOP_GROUPS:
        lines.append(f"  … {len(groups) - TOP_GROUPS} more")
    return "\n".join(lines), code


def _safe_detect(fmt, src) -> bool:
    try:
        return bool(fmt.detect(src))
    except Exception:  # noqa: BLE001
        return False


def _formats_or_empty(name: str) -> list:
    try:
        return formats_of(name)
    except Exception:  # noqa: BLE001
        return []


def _atomic_write(out: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``out``: a reader never sees a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(network: str, source: str | Path, out: str | Path, *, fmt_name: str | None = None,
            spec: str | Path | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """Convert ``source`` with a format of ``network`` and write our checkpoint to ``out``; returns the report
    lines.

    ``out`` ending in ``.safetensors``: keys ``<weights_prefix><key>`` (``model.<key>`` for Mask2Former and Mask
    Grounding DINO, ``student.*``/``teacher.*`` for MAL).  Otherwise a ``.pth`` dict ``{"state_dict": {same
    keys}, "tao_model": network, "converted_from": {"path", "format"}}``.  With ``spec`` (and ``overrides``) the
    spec's ``model`` section is the converter's ``model_cfg`` and the result is loaded into the network's module
    built from the spec, so shapes are checked and the report counts matched / newly initialised / unexpected /
    mismatched tensors; without it the file's own sizes are used.
    """
    from networks.common.weight_formats import detect_format, read_source
    from tao_cli import registry

    net = registry.load(network)
    out = Path(out).expanduser()
    if out.suffix not in (".safetensors", ".pth", ".pt", ".ckpt", ".tlt"):
        raise ConfigError("--out", f"{out.name} has no known suffix", "end it in .safetensors or .pth")
    formats = formats_of(network)
    if not formats:
        raise ConfigError("NET", f"{network} declares no weight formats", "nothing to convert from")
    src = read_source(source, field="SRC")
    if src.tao_model and src.tao_model != network:
        raise CheckpointError(str(src.path), f"is a '{src.tao_model}' checkpoint, not '{network}'",
                              f"convert it with `tao weights convert {src.tao_model} ...`")
    try:
        fmt = detect_format(src, formats, forced=fmt_name, field="SRC")
    except CheckpointError:
        other = detect_any(src, exclude=network) if not fmt_name else None
        if other:
            raise CheckpointError(str(src.path), f"holds {other[0]} weights ({other[1].name}: "
                                  f"{other[1].description}), not {network}",
                                  f"convert it with `tao weights convert {other[0]} ...`") from None
        raise
    cfg = None
    if spec is not None:
        from tao_cli import spec as spec_mod

        cfg = spec_mod.load_spec(net.config_class, None, spec, list(overrides), mandatory=False)
    model_cfg = cfg.model if cfg is not None and "model" in cfg else None
    import fnmatch

    state = fmt.to_state_dict(src, model_cfg)
    dropped = [k for k in state if any(fnmatch.fnmatchcase(k, p) for p in fmt.benign)]
    state = {k: v for k, v in state.items() if k not in dropped}  # known to have no slot in the model
    lines = [f"source:    {src.path} ({src.container})", f"network:   {network}",
             f"format:    {fmt.name} ({fmt.part}): {fmt.description}",
             f"converted: {len(state)} tensors, {sum(t.numel() for t in state.values() if t.is_floating_point()):,}"
             " parameters" + (f" ({len(dropped)} known-unused dropped)" if dropped else "")]
    if cfg is not None:
        report = _check_against_module(net, cfg, src, fmt, model_cfg)
        lines.append(f"checked against the spec's model: {report.counts()}")
        if report.missing:
            lines.append(f"newly initialised (train fills them): {', '.join(report.missing[:5])}"
                         + (f" (+{len(report.missing) - 5} more)" if len(report.missing) > 5 else ""))
    keyed: dict = {}
    seen: set[int] = set()
    for k, v in state.items():  # one tensor under two keys (MAL: student -> teacher) is stored twice
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        keyed[net.weights_prefix + k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic_write(out, lambda p: save_file(keyed, str(p), metadata={
            "tao_model": network, "format": fmt.name, "new_parts": ",".join(fmt.new_parts)}))
    else:
        import torch

        obj = {"state_dict": keyed, "tao_model": network,
               "converted_from": {"path": str(src.path), "format": fmt.name, "new_parts": list(fmt.new_parts)}}
        _atomic_write(out, lambda p: torch.save(obj, p))
    lines.append(f"written:   {out}")
    use = "train.pretrained_model_path" if fmt.part != "model" else \
        "train.pretrained_model_path, evaluate.checkpoint or inference.checkpoint"
    lines.append(f"use it as: {use}")
    return lines


def _check_against_module(net, cfg, src, fmt, model_cfg) -> Any:
    """Load the converted weights into the network's module built from ``cfg`` (action ``evaluate``: no
    pretrained weights are read) and return the load report."""
    from networks.common.context import RunContext
    from networks.common.weight_formats import load_converted

    with tempfile.TemporaryDirectory() as tmp:
        module = net.build_module(cfg, RunContext(action="evaluate", run_dir=Path(tmp)))
        return load_converted(module, src, fmt, model_cfg, prefix=net.weights_prefix)
