"""Peak memory of the current process, without importing torch (the dataset benches measure light processes)."""
from __future__ import annotations

import os
import resource


def rss_mib() -> float:
    """This process's resident set size now (MiB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB): ``VmHWM``, the high-water mark of its own address space.
    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``exec`` from the parent's address space, so in a
    child started by a big process it reports the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: the best there is
