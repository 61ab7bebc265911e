"""Reduced-precision helpers that depend on what the device computes natively."""
from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

#: /proc/cpuinfo flags of CPUs whose matrix units take bf16 directly (x86 AVX512-BF16 or AMX; Arm's BF16 extension)
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether the first ``flags`` (x86) or ``Features`` (Arm) line of a ``/proc/cpuinfo`` text names a bf16
    matrix instruction set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(_CPU_BF16_FLAGS & set(value.split()))
    return False


@functools.cache
def _cpu_has_native_bf16() -> bool:
    # torch's own check (mkldnn._is_mkldnn_bf16_supported) is also true on AVX512 CPUs that only emulate bf16,
    # where autocast is slower than fp32; the kernel's CPU flags say what the hardware does.
    if platform.system() != "Linux":
        return False
    try:
        return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` runs bf16 matrix products in hardware (CUDA compute capability >= 8.0; a CPU with
    AVX512-BF16, AMX-BF16 or Arm BF16), i.e. when bf16 autocast is faster than fp32 rather than emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def bf16_autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` and no autocast is already active there (an enclosing
    mixed-precision context is left in charge); otherwise a no-op context."""
    device_type = torch.device(device).type
    if not enabled or torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)
