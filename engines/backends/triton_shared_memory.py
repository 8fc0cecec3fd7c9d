"""Windows through system shared memory, for an agent and a Triton server on one host (``triton.shared_memory``).

Over gRPC a window is serialised, copied through the kernel's loopback and deserialised on each side, both ways:
on our CPU about 0.8 s for the shipped model's 83 MB window (docs/scale-out.md), nothing beside a CPU pass but
40 times a GPU's. With shared memory the agent writes the window once into a region the server has mapped and
reads the output from another, and only the request's few hundred bytes travel by gRPC.

Two regions per backend (input and output, sized for its window shape), named after the process and the backend
so that agents on one host never share one, created when the link connects, registered with the server under
the same names, and unregistered and unlinked when the link closes or reconnects. A server on another host cannot
open them: registration fails and the link refuses at once, naming the setting to turn off.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from engines.serving.contract import IDENTITY_OUTPUT, OUTPUTS_OUTPUT, WINDOW_INPUT

F32 = npt.NDArray[np.float32]

#: Where Linux keeps POSIX shared memory objects.
SHM_FOLDER: Final = Path("/dev/shm")
#: Owner and group read and write: the server's user must be in the agent's group (docs/scale-out.md).
REGION_MODE: Final = 0o660
#: Patience for registering and unregistering a region: nothing is computed.
REGISTER_TIMEOUT_S: Final = 10.0
_SERIAL = itertools.count()


@dataclass(slots=True)
class _Region:
    name: str
    handle: Any
    nbytes: int


class SharedMemoryWindows:
    """The two regions of one backend's window shape; owned by the engine thread, like the backend."""

    def __init__(self, input_shape: tuple[int, ...], outputs: int) -> None:
        import tritonclient.utils.shared_memory as shm  # noqa: PLC0415 - optional dependency

        self._shm = shm
        self.input_shape = (1, *input_shape)
        self.output_shape = (1, outputs, *input_shape[1:])
        tag = f"sct-{os.getpid()}-{next(_SERIAL)}"
        self._regions: list[_Region] = []
        try:
            for suffix, shape in (("window", self.input_shape), ("outputs", self.output_shape)):
                name = f"{tag}-{suffix}"
                nbytes = 4 * int(np.prod(shape))
                handle = shm.create_shared_memory_region(name, f"/{name}", nbytes, create_only=True)
                self._regions.append(_Region(name, handle, nbytes))
                # Python creates it 0600: let a server running as another user of the agent's group map it.
                with contextlib.suppress(OSError):
                    (SHM_FOLDER / name).chmod(REGION_MODE)
        except BaseException:
            self.close()
            raise

    @property
    def window(self) -> _Region:
        return self._regions[0]

    @property
    def outputs(self) -> _Region:
        return self._regions[1]

    def register(self, client: Any, headers: dict[str, str], call: Any) -> None:
        """Tell the server about both regions (through ``call``, the backend's timed and classified call)."""
        for region in self._regions:
            call(
                partial(
                    client.register_system_shared_memory,
                    region.name,
                    f"/{region.name}",
                    region.nbytes,
                    headers=headers,
                    client_timeout=REGISTER_TIMEOUT_S,
                )
            )

    def unregister(self, client: Any, headers: dict[str, str]) -> None:
        """Best effort: a server that is gone has nothing to forget."""
        for region in self._regions:
            try:
                client.unregister_system_shared_memory(region.name, headers=headers, client_timeout=2.0)
            except Exception:
                continue

    def request(self, host: F32) -> tuple[Any, list[Any]]:
        """The request's input and outputs, the window written into its region."""
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        self._shm.set_shared_memory_region(self.window.handle, [host])
        request = grpcclient.InferInput(WINDOW_INPUT, list(self.input_shape), "FP32")
        request.set_shared_memory(self.window.name, self.window.nbytes)
        outputs = grpcclient.InferRequestedOutput(OUTPUTS_OUTPUT)
        outputs.set_shared_memory(self.outputs.name, self.outputs.nbytes)
        return request, [outputs, grpcclient.InferRequestedOutput(IDENTITY_OUTPUT)]

    def result(self) -> F32:
        """A copy of the output region (the next window overwrites it)."""
        view = self._shm.get_contents_as_numpy(self.outputs.handle, np.float32, list(self.output_shape))
        return np.array(view, dtype=np.float32, copy=True)

    def close(self) -> None:
        for region in self._regions:
            self._shm.destroy_shared_memory_region(region.handle)
        self._regions.clear()
