"""Which reduced precisions this CPU runs natively, and which it runs *faster* than fp32.

Emulated fp16 is far slower than fp32, so a backend refuses it. Native is not the same as fast: on an AMD EPYC
with AVX512-BF16 but no AMX, compiled bf16 measured only 3 % faster than compiled fp32 (bench/engine.py, 4.47 vs
4.62 s per slab) for a mean error of 0.9 HU. Reduced precision pays only with matrix units (AMX) or AVX512-FP16,
and ``auto`` only considers those.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from engines.backends.base import Precision

_CPUINFO = Path("/proc/cpuinfo")
#: ISA flags (as /proc/cpuinfo spells them) with which oneDNN runs each precision without emulation.
NATIVE_FLAGS: dict[Precision, frozenset[str]] = {
    Precision.FP16: frozenset({"avx512_fp16", "amx_fp16"}),
    Precision.BF16: frozenset({"avx512_bf16", "amx_bf16"}),
}
#: Flags with which the precision is also clearly faster than fp32 for our convolutions.
ACCELERATED_FLAGS: dict[Precision, frozenset[str]] = {
    Precision.FP16: frozenset({"avx512_fp16", "amx_fp16"}),
    Precision.BF16: frozenset({"amx_bf16"}),
}


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_precisions() -> tuple[Precision, ...]:
    """fp32 always; fp16/bf16 when the CPU has instructions for them."""
    flags = cpu_flags()
    return (Precision.FP32, *(p for p, need in NATIVE_FLAGS.items() if flags & need))


def accelerated_precisions() -> tuple[Precision, ...]:
    """Reduced precisions that are worth their error on this CPU (fp32 is always listed)."""
    flags = cpu_flags()
    return (Precision.FP32, *(p for p, need in ACCELERATED_FLAGS.items() if flags & need))
