"""Shared helpers for the sCT DICOM tests (series writer, C-STORE, the DICOM output stage): a small simulated MR
export, an SctVolume that references it, and dcmtk's storescp on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from scanner_support import small_request

from agent.ingest.grouping import acquisition_id_for
from agent.ingest.header_reader import read_header
from agent.records import ImageRef, SctVolume, SourceImages
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportOptions, ExportSummary, OutputFormat, export_case
from sct_core.geometry import VolumeGeometry

MODEL_ID = "sct-unet-test"
MODEL_VERSION = "9.8.7"
PROTOCOL_ID = "test_small_fov_lumbar_1p5t"

#: The AE title storescp answers to.
PEER_AE = "SCTPACS"
#: How long storescp may take to start listening before the test fails (s); it normally takes milliseconds.
STORESCP_START_S = 20.0


# ----------------------------------------------------------------------------------- MR export and volume


def source_images(paths: Sequence[Path], geometry: VolumeGeometry) -> tuple[SourceImages, str]:
    """Each slice's image of each echo (ascending TE), from the agent's header reader; and the acquisition id."""
    origin = float(np.dot(geometry.origin, geometry.slice_direction))
    slots: dict[int, list[ImageRef]] = {}
    acquisition_id = ""
    for path in paths:
        parsed = read_header(path)
        acquisition_id = acquisition_id_for(parsed.header)
        for frame in parsed.frames:
            position = float(np.dot(frame.position, geometry.slice_direction))
            k = round((position - origin) / geometry.spacing[0])
            slots.setdefault(k, []).append(
                ImageRef(path, frame.frame, frame.echo_time_ms, position, frame.instance_key)
            )
    assert sorted(slots) == list(range(geometry.shape[0]))
    sources = tuple(
        tuple(sorted(slots[k], key=lambda ref: ref.echo_time_ms)) for k in range(geometry.shape[0])
    )
    return sources, acquisition_id


def sct_volume(
    case: PhantomCase, paths: Sequence[Path], hu: npt.NDArray[np.int16] | None = None
) -> SctVolume:
    """An SctVolume for the exported MR whose HU are the phantom's CT (or ``hu``)."""
    sources, acquisition_id = source_images(paths, case.geometry)
    values = np.ascontiguousarray(case.ct_hu if hu is None else hu)
    return SctVolume(
        acquisition_id=acquisition_id,
        protocol_id=PROTOCOL_ID,
        model_id=MODEL_ID,
        model_version=MODEL_VERSION,
        geometry=case.geometry,
        hu=values,
        sha256=hashlib.sha256(values.tobytes()).hexdigest(),
        slab_count=1,
        produced_at=time.time(),
        sources=sources,
    )


def small_case() -> PhantomCase:
    request = small_request()
    return generate_case(request.seed, request.acquisition(), supersample=request.supersample)


def export_mr(case: PhantomCase, out_dir: Path, output_format: OutputFormat) -> ExportSummary:
    return export_case(case, ExportOptions(out_dir=out_dir, format=output_format))


# ----------------------------------------------------------------------------------------------- storescp


def dcmtk_storescp() -> str | None:
    """dcmtk's storescp: the virtual environment may also hold pynetdicom's app of the same name."""
    for folder in os.get_exec_path():
        candidate = Path(folder) / "storescp"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            result = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            continue
        if "dcmtk" in (result.stdout + result.stderr).lower():
            return str(candidate)
    return None


STORESCP = dcmtk_storescp()
needs_storescp = pytest.mark.skipif(
    STORESCP is None, reason="dcmtk's storescp is not installed (apt install dcmtk)"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


#: ``start(port, *options)``: starts storescp on ``port`` and returns the folder it stores into.
StartStorescp = Callable[..., Path]


@contextmanager
def storescp_launcher(tmp_path: Path) -> Iterator[StartStorescp]:
    """Starts dcmtk storescp on a port (extra options allowed) with its output folder in ``tmp_path``; every
    storescp started is killed on exit. Test modules wrap this in their ``storescp`` fixture."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int, *options: str) -> Path:
        assert STORESCP is not None
        folder = tmp_path / f"received-{len(processes)}"
        folder.mkdir()
        process = subprocess.Popen(
            [STORESCP, "-od", str(folder), "-aet", PEER_AE, *options, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        deadline = time.monotonic() + STORESCP_START_S
        while True:
            assert process.poll() is None, f"storescp exited with status {process.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return folder
            except OSError:
                assert time.monotonic() < deadline, (
                    f"storescp not listening on {port} after {STORESCP_START_S} s"
                )
                time.sleep(0.05)

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def received(folder: Path) -> dict[str, Dataset]:
    """What storescp stored in ``folder``, by SOP Instance UID."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}
