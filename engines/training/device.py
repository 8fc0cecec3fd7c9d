"""Where training runs: ``cpu`` or ``cuda[:index]``, checked before any work starts.

The recipe does not name a device: the same recipe trains to statistically the same model on either, and a
checkpoint written on one resumes on the other (checkpoints hold CPU tensors and load with ``map_location``).

A recipe's ``bf16_autocast`` allows bf16 where the device runs it natively. A CPU without bf16 instructions
would emulate it, far slower than fp32 (measured on an AVX2-only EPYC: 13 CPU-seconds for a step fp32 does in
1.3), so there the run trains in fp32 and its training record says so.
"""

from __future__ import annotations

import re

import torch

from engines.backends.base import Precision
from engines.backends.cpu_features import native_precisions
from engines.backends.torch_cuda import cuda_unavailable_reason
from sct_core.errors import SctError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
EXPECTED = "cpu, cuda or cuda:INDEX"


class TrainingDeviceError(SctError, ValueError):
    """The training device is malformed or not present on this machine."""


def training_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``; an error names the device and why it is unusable."""
    match = _DEVICE.match(text.strip())
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise TrainingDeviceError(
            f"training device {text!r} is not one of {EXPECTED}",
            attribute="training device",
            found=text,
            expected=EXPECTED,
        )
    if match.group(1) == "cpu":
        return torch.device("cpu")
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise TrainingDeviceError(
            f"training device {text!r}: CUDA is not available ({reason}); train with --device cpu, or on a machine with a CUDA GPU",
            attribute="training device",
            found=text,
            expected="a visible CUDA GPU",
        )
    count = torch.cuda.device_count()
    index = int(match.group(2)) if match.group(2) is not None else torch.cuda.current_device()
    if index >= count:
        raise TrainingDeviceError(
            f"training device {text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}",
            attribute="training device",
            found=text,
            expected=f"cuda:0 to cuda:{count - 1}",
        )
    return torch.device("cuda", index)


def bf16_autocast(allowed: bool, device: torch.device) -> tuple[bool, str]:
    """Whether to train with bf16 autocast on ``device``, and the precision as the training record states it."""
    if not allowed:
        return False, "fp32 (the recipe has no bf16 autocast)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, "bf16 autocast"
        return False, f"fp32 ({torch.cuda.get_device_name(device)} has no native bf16)"
    if Precision.BF16 in native_precisions():
        return True, "bf16 autocast"
    return False, "fp32 (this CPU has no bf16 instructions; emulated bf16 is slower than fp32)"
