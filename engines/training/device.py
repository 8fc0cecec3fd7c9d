"""Where training runs: ``cpu`` or ``cuda[:index]``, checked before any work starts.

The recipe does not name a device: the same recipe trains to statistically the same model on either, and a
checkpoint written on one resumes on the other (checkpoints hold CPU tensors and load with ``map_location``).
"""

from __future__ import annotations

import re

import torch

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
