"""Small helpers for code that runs the same way with or without an initialised process group."""
from __future__ import annotations

from typing import Any

import torch


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` via ``all_gather_object``; ``[obj]`` without a process group."""
    if not _initialised() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def is_rank_zero() -> bool:
    """True on global rank 0, and always without a process group."""
    return not _initialised() or torch.distributed.get_rank() == 0


def gather_unique(records: list[dict], key: str, order_by: str | None = None) -> list[dict]:
    """Every rank's ``records`` gathered, de-duplicated by ``record[key]`` (a later rank's record wins; the
    distributed sampler repeats samples to even out ranks) and sorted by ``record[order_by or key]``."""
    merged = gather_dict({record[key]: record for record in records})
    by = order_by or key
    return sorted(merged.values(), key=lambda r: r[by])


def gather_dict(mapping: dict) -> dict:
    """Every rank's ``mapping`` merged into one dict in key order (numbers first, then other keys by ``str``).

    A key seen on several ranks keeps the later rank's value: the distributed sampler repeats samples to even out
    ranks, and a repeat must count once.  The key order (not the rank order) is what makes sums, COCO inputs and
    files built from the result independent of the world size.  Without a process group: ``mapping`` in key order.
    """
    merged: dict = {}
    for part in gather_objects(mapping):
        merged.update(part or {})
    return {k: merged[k] for k in sorted(merged, key=_order)}


def _order(key: Any) -> tuple[int, Any]:
    return (0, key) if isinstance(key, (int, float)) and not isinstance(key, bool) else (1, str(key))
