"""networks.ops.precision: native bf16 detection and the bf16 autocast that defers to an enclosing one."""
from __future__ import annotations

import torch

from networks.ops.precision import bf16_autocast, cpuinfo_has_bf16

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq\n"
SAPPHIRE = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics\n"


def test_cpuinfo_bf16_flags():
    assert cpuinfo_has_bf16(ZEN4) and cpuinfo_has_bf16(SAPPHIRE) and cpuinfo_has_bf16(NEOVERSE_V1)
    # AVX512 without the bf16 instructions emulates bf16 (slower than fp32), as does an Arm core without BF16
    assert not cpuinfo_has_bf16(SKYLAKE) and not cpuinfo_has_bf16(GRAVITON2) and not cpuinfo_has_bf16("")


def test_bf16_autocast_runs_bf16_and_leaves_an_enclosing_autocast_in_charge():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with bf16_autocast("cpu", True):
        assert (a @ b).dtype == torch.bfloat16
    with bf16_autocast("cpu", False):
        assert (a @ b).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.float16), bf16_autocast("cpu", True):
        assert (a @ b).dtype == torch.float16
