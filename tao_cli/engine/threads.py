"""How many intra-op threads each process of a run gets.

torch starts with one intra-op thread per core in *every* process.  Two DDP processes on a CPU node, or one
process next to eight DataLoader workers, then oversubscribe the cores and run slower than with fewer threads.
The engine therefore chooses the count from the plan and says so (``--dry-run`` and the log):

* ``OMP_NUM_THREADS`` set → that value (the user decided; Slurm and most launchers set it);
* otherwise the cores this process may use (its CPU affinity) divided by the processes per node, minus up to
  half of that share for DataLoader workers (they decode and augment on the same cores), at least 1.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["choose_threads", "loader_workers"]

#: the DataLoader-workers field of each network's ``dataset`` section (MGD, Mask2Former, MAL)
_WORKER_FIELDS = ("workers", "num_workers", "num_workers_per_gpu")


def loader_workers(cfg: Any) -> int:
    """DataLoader workers per process from the spec's ``dataset`` section (0 when it has none)."""
    dataset = cfg.get("dataset") if hasattr(cfg, "get") else None
    for name in _WORKER_FIELDS:
        if dataset is not None and name in dataset and dataset.get(name) is not None:
            return max(0, int(dataset.get(name)))
    return 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(processes_per_node: int, workers: int, env: Mapping[str, str] | None = None,
                   cores: int | None = None) -> tuple[int, str]:
    """``(threads, why)`` for one process of a run with ``processes_per_node`` processes per node and
    ``workers`` DataLoader workers each (see the module docstring)."""
    env = os.environ if env is None else env
    raw = str(env.get("OMP_NUM_THREADS", "")).strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value > 0:
            return value, "from OMP_NUM_THREADS"
    cores = _cores() if cores is None else int(cores)
    procs = max(1, int(processes_per_node))
    share = max(1, cores // procs)
    reserve = min(max(0, int(workers)), share // 2)
    threads = max(1, share - reserve)
    why = f"{cores} cores / {procs} process(es) per node"
    if reserve:
        why += f", {reserve} left to {workers} DataLoader worker(s)"
    return threads, why
