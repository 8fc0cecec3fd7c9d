"""Which reduced precisions this CPU runs natively; emulated fp16 is slower than fp32, so it must be known."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from engines.backends.base import Precision

_CPUINFO = Path("/proc/cpuinfo")
#: ISA flags (as /proc/cpuinfo spells them) that make each precision fast in oneDNN convolutions.
NATIVE_FLAGS: dict[Precision, frozenset[str]] = {
    Precision.FP16: frozenset({"avx512_fp16", "amx_fp16"}),
    Precision.BF16: frozenset({"avx512_bf16", "amx_bf16"}),
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
