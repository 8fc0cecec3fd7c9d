"""An AOTInductor package served from its own process, so a slab never holds the agent's GIL.

Why a process: the package's runner holds Python's GIL for the whole inference. Measured on our 2 cores with the
lumbar window, a thread ticking every 10 ms ticked once during an 11.5 s slab, and in the demo the assembler,
starved that long, ended an acquisition while its files were still arriving. A child process has its own GIL:
the agent's threads (watcher, validator, publisher heartbeats) run while the child computes, and the parent's
engine thread waits in a blocking socket read, which releases the GIL.

How: the parent creates one anonymous shared-memory file (``memfd_create``) holding the input window and the
output, both float32, and a socket pair for requests; the child inherits both descriptors, maps the memory, loads
the package once and answers one JSON line per request. Nothing is named in ``/dev/shm``, so a crash leaves
nothing behind, and a window crosses no pipe: the only copies are the parent's into the shared input and its
reading of the shared output (tens of milliseconds for the lumbar window, against seconds of compute).

Faults: a child that dies (killed for memory, a crash in the runner) is noticed as end-of-file on the socket; the
slab in flight fails with :class:`EngineWorkerError` naming the exit status, and the next slab starts a new child
(the package loads in about a second), so one fault costs one series, not the agent. A child whose parent dies
sees end-of-file on its socket and exits.

Run as ``python -m engines.backends.aot_worker`` by :class:`AotWorker` only; the child imports torch and numpy,
never the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import torch

from sct_core.errors import SctError

logger = logging.getLogger(__name__)

#: How long a child may take from spawn to loaded package: importing torch and loading a lumbar package takes
#: a few seconds on our 2 cores; a minute means something is wrong (a full disk, a swapping machine).
READY_TIMEOUT_S = 120.0
#: How long ``close`` waits for a child to leave after being asked, before killing it.
CLOSE_TIMEOUT_S = 10.0
_FLOAT32_BYTES = 4
STDERR_FD = 2


class EngineWorkerError(SctError, RuntimeError):
    """The engine's worker process failed: it ended, did not start, or raised while computing a window."""

    def __init__(self, message: str, *, found: object = None, expected: str = "") -> None:
        super().__init__(message, attribute="engine.worker", found=found, expected=expected)


class EngineWorkerEndedError(EngineWorkerError):
    """The worker process ended while computing or before it: killed (the kernel's OOM killer sends SIGKILL),
    crashed or exited. ``exit_status`` is the process's return code (negative: the signal number)."""

    def __init__(self, message: str, *, exit_status: int) -> None:
        super().__init__(message, found=_describe_exit(exit_status), expected="a running engine worker")
        self.exit_status = exit_status


class AotWorker:
    """Parent side: one child process running the package at ``package`` on windows of ``input_shape``."""

    def __init__(
        self, package: Path, input_shape: tuple[int, int, int, int], threads: int | None, outputs: int = 1
    ) -> None:
        self.package = package
        self.input_shape = input_shape
        #: The network's output channels (HU, and the confidence where the model has one) per window position.
        self.output_shape = (outputs, *input_shape[1:])
        self.threads = threads
        #: Seconds the last child took from spawn to ready (torch import and package load).
        self.ready_s = 0.0
        #: Children started so far; more than one means a child ended and was replaced.
        self.starts = 0
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._reader: IO[bytes] | None = None
        input_bytes = math.prod(input_shape) * _FLOAT32_BYTES
        output_bytes = math.prod(self.output_shape) * _FLOAT32_BYTES
        self._memory_fd = os.memfd_create("sct-engine-window", os.MFD_CLOEXEC)
        os.ftruncate(self._memory_fd, input_bytes + output_bytes)
        self._memory = mmap.mmap(self._memory_fd, input_bytes + output_bytes)
        self._window, self._output = _views(self._memory, input_shape, outputs)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Spawn the child and wait until it has loaded the package; raise :class:`EngineWorkerError` if not."""
        with self._lock:
            self._start()

    def run(self, window: torch.Tensor) -> torch.Tensor:
        """The network output for ``window`` (float32, on the CPU); a view of shared memory reused next call."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                if self._process is not None:
                    logger.warning(
                        "engine worker (pid %s) had ended with %s; starting a new one",
                        self._process.pid,
                        _describe_exit(self._process.returncode),
                    )
                self._stop()
                self._start()
            self._window.copy_(window)
            reply = self._request({"op": "run"})
            if reply.get("ok"):
                return self._output
            raise EngineWorkerError(
                f"engine worker (pid {self.pid}) failed on a window: {reply.get('error')}",
                found=reply.get("error"),
                expected="a computed window",
            )

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._memory.close()
            os.close(self._memory_fd)

    def _start(self) -> None:
        started = time.perf_counter()
        parent, child = socket.socketpair()
        command = [
            sys.executable,
            "-m",
            __name__,
            "--package",
            str(self.package),
            "--channel-fd",
            str(child.fileno()),
            "--memory-fd",
            str(self._memory_fd),
            "--input-shape",
            ",".join(str(n) for n in self.input_shape),
            "--outputs",
            str(self.output_shape[0]),
            "--threads",
            str(self.threads or 0),
        ]
        try:
            # Its stdout goes to our stderr (the journal): our stdout may carry a protocol (the ready line).
            self._process = subprocess.Popen(
                command,
                pass_fds=(child.fileno(), self._memory_fd),
                stdin=subprocess.DEVNULL,
                stdout=STDERR_FD,
            )
        finally:
            child.close()
        self._channel = parent
        self._reader = parent.makefile("rb")
        self.starts += 1
        parent.settimeout(READY_TIMEOUT_S)
        try:
            reply = self._reply()
        except TimeoutError:
            self._stop()
            raise EngineWorkerError(
                f"engine worker did not load {self.package} within {READY_TIMEOUT_S:g} s",
                found=f"> {READY_TIMEOUT_S:g} s",
                expected=f"ready within {READY_TIMEOUT_S:g} s",
            ) from None
        except EngineWorkerError:
            self._stop()
            raise
        parent.settimeout(None)
        if not reply.get("ok"):
            self._stop()
            raise EngineWorkerError(
                f"engine worker could not load {self.package}: {reply.get('error')}",
                found=reply.get("error"),
                expected="a loadable AOTInductor package",
            )
        self.ready_s = time.perf_counter() - started
        logger.info(
            "engine worker pid %s ready in %.1f s (%s threads)", self.pid, self.ready_s, reply.get("threads")
        )

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._channel is not None
        # A child that is gone cannot take the request: its exit status is reported by _reply.
        with contextlib.suppress(OSError):
            self._channel.sendall(json.dumps(message).encode() + b"\n")
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        process = self._process
        assert self._reader is not None and process is not None
        try:
            line = self._reader.readline()
        except ConnectionResetError:
            line = b""  # the child died with our request unread in its socket
        if not line:
            status = process.wait(timeout=CLOSE_TIMEOUT_S)
            self._stop()
            raise EngineWorkerEndedError(
                f"engine worker (pid {process.pid}) ended with {_describe_exit(status)}; the next window "
                f"starts a new one",
                exit_status=status,
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _stop(self) -> None:
        process, self._process = self._process, None
        if self._channel is not None:
            assert self._reader is not None
            self._reader.close()
            self._channel.close()
            self._channel = self._reader = None
        if process is None or process.poll() is not None:
            return
        # Closing the socket is the request to leave; a child stuck in a kernel call is killed.
        try:
            process.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _views(
    memory: mmap.mmap, input_shape: tuple[int, ...], outputs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input window and the output ``[outputs, depth, rows, cols]`` as float32 tensors over one mapping."""
    count = math.prod(input_shape)
    output_shape = (outputs, *input_shape[1:])
    window = torch.frombuffer(memory, dtype=torch.float32, count=count).view(input_shape)
    output = torch.frombuffer(
        memory, dtype=torch.float32, offset=count * _FLOAT32_BYTES, count=math.prod(output_shape)
    ).view(output_shape)
    return window, output


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


def _serve(args: argparse.Namespace) -> int:
    # The parent decides when the child ends (by closing the socket): a Ctrl-C in a terminal or systemd's
    # SIGTERM to the whole service reaches both, and the parent may still be finishing the slab in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = socket.socket(fileno=args.channel_fd)
    reader = channel.makefile("rb")

    def send(message: dict[str, Any]) -> None:
        channel.sendall(json.dumps(message).encode() + b"\n")

    shape = tuple(int(n) for n in args.input_shape.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = mmap.mmap(args.memory_fd, 0)
    window, output = _views(memory, shape, args.outputs)
    try:
        runner = torch._inductor.aoti_load_package(args.package)
    except Exception as error:  # reported to the parent, which raises it
        send({"ok": False, "error": f"{type(error).__name__}: {error}"})
        return 1
    send({"ok": True, "threads": torch.get_num_threads()})
    while line := reader.readline():
        request = json.loads(line)
        if request.get("op") != "run":
            send({"ok": False, "error": f"unknown request {request!r}"})
            continue
        try:
            with torch.inference_mode():
                x = window[None].contiguous(memory_format=torch.channels_last_3d)
                out = runner(x)
                result = out[0] if isinstance(out, list | tuple) else out
                output.copy_(result[0])
        except Exception as error:  # reported to the parent, which raises it
            send({"ok": False, "error": f"{type(error).__name__}: {error}"})
            continue
        send({"ok": True})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--package", required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--memory-fd", type=int, required=True)
    parser.add_argument("--input-shape", required=True)
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    return _serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
