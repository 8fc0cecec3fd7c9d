"""Sample publications for the wire, publisher and listen tests: one builder, so every test file sends the same
kind of record and a change to the records is made once; and the small helpers those tests share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from agent.records import (
    FlagReport,
    SctSlab,
    SctVolume,
    UntrustedRegion,
    confidence_sha256,
    payload_sha256,
)
from sct_core.geometry import VolumeGeometry

if TYPE_CHECKING:
    from agent.publish.publisher import Publisher

PROTOCOL_ID = "lumbar-dual-echo-v1"
#: Generous bound on anything that should take milliseconds (two shared CPU cores).
SUPPORT_WAIT_S = 10.0
MODEL_ID = "sct-unet"
MODEL_VERSION = "1.2.0"


def random_hu(
    shape: tuple[int, ...], seed: int = 0, low: int = -1024, high: int = 3000
) -> npt.NDArray[np.int16]:
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.int16)


def sample_slab(
    geometry: VolumeGeometry,
    hu: npt.NDArray[np.int16],
    *,
    start: int,
    index: int,
    count: int,
    acquisition_id: str = "acq-1f3e",
    digest: str | None = None,
) -> SctSlab:
    """A slab whose payload ``hu`` covers slices ``[start, start + len(hu))`` of ``geometry``."""
    return SctSlab(
        acquisition_id=acquisition_id,
        protocol_id=PROTOCOL_ID,
        model_id=MODEL_ID,
        model_version=MODEL_VERSION,
        geometry=geometry,
        slab_index=index,
        slab_count=count,
        start=start,
        size=int(hu.shape[0]),
        hu=hu,
        sha256=digest or payload_sha256(hu),
        inference_s=0.5,
        inputs_complete_at=1000.25,
        produced_at=1001.5,
    )


def sample_volume(
    geometry: VolumeGeometry, hu: npt.NDArray[np.int16], *, slab_count: int, acquisition_id: str = "acq-1f3e"
) -> SctVolume:
    return SctVolume(
        acquisition_id=acquisition_id,
        protocol_id=PROTOCOL_ID,
        model_id=MODEL_ID,
        model_version=MODEL_VERSION,
        geometry=geometry,
        hu=hu,
        sha256=payload_sha256(hu),
        slab_count=slab_count,
        produced_at=1002.0,
    )


def slabs_and_volume(
    geometry: VolumeGeometry, hu: npt.NDArray[np.int16], *, acquisition_id: str = "acq-1f3e"
) -> list[SctSlab | SctVolume]:
    """Two slabs (first half, second half) and the volume they make."""
    half = geometry.shape[0] // 2
    return [
        sample_slab(geometry, hu[:half], start=0, index=0, count=2, acquisition_id=acquisition_id),
        sample_slab(geometry, hu[half:], start=half, index=1, count=2, acquisition_id=acquisition_id),
        sample_volume(geometry, hu, slab_count=2, acquisition_id=acquisition_id),
    ]


@contextmanager
def running(publisher: Publisher) -> Iterator[Publisher]:
    """A started publisher, stopped (thread joined) on the way out."""
    publisher.start()
    try:
        yield publisher
    finally:
        publisher.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float = SUPPORT_WAIT_S) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


def kernel_tcp_buffer_bytes() -> int:
    """Most bytes the kernel can hold for one loopback connection (receive plus send buffer maxima)."""
    try:
        return sum(
            int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
            for name in ("tcp_rmem", "tcp_wmem")
        )
    except (OSError, ValueError, IndexError):
        return 64 * 2**20


def with_confidence(
    publication: SctSlab | SctVolume,
    confidence: npt.NDArray[np.uint8],
    *,
    threshold: int = 64,
    method: str = "feature-mahalanobis",
    regions: tuple[UntrustedRegion, ...] | None = None,
) -> SctSlab | SctVolume:
    """``publication`` with a confidence array (schema 1.4); a volume also gets the regions found in it."""
    fields = {
        "confidence": confidence,
        "confidence_sha256": confidence_sha256(confidence),
        "confidence_method": method,
        "confidence_threshold": threshold,
    }
    if isinstance(publication, SctVolume):
        found = regions if regions is not None else ()
        flagged = FlagReport(method, threshold, 50.0, found, confidence < threshold)
        return replace(publication, flagged=flagged, **fields)  # type: ignore[arg-type]
    return replace(publication, **fields)  # type: ignore[arg-type]
