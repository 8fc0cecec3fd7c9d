"""The regions stage: find the regions of a finished sCT volume its confidence says not to trust, then send it.

The search (connected voxels below the model's calibrated threshold, ``engines.confidence.regions``) runs once on
the whole volume, because an implant or a lesion crosses slab boundaries and must be reported once, with the
slices it spans and its volume. On a 100 x 338 x 338 volume it takes 0.3-0.9 s of CPU on the reference machine:
too long for the engine's thread, whose next slab (of the next series) must not wait for it, so it has a thread
of its own (``sct-regions``), between the engine and the outputs. When the regions are found the volume goes on
with them as the engine would have sent it (:class:`~agent.inference.volume_delivery.VolumeDelivery`: committed,
the ``flagged`` status, published, then to the DICOM writer), so everything downstream (the wire, the status, the
page, the DICOM Segmentation, the journal, the metrics) sees the volume and its regions together.

A model without a confidence output never sends a volume here: the engine delivers it at once, and the
``flagged`` status says it was not checked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from agent.inference.volume_delivery import VolumeDelivery
from agent.records import FlagReport, UntrustedRegion, VolumeToCheck
from agent.vocabulary import LogEvent
from engines.confidence.regions import find_flagged_regions
from engines.confidence.spec import ConfidenceSpec

logger = logging.getLogger(__name__)


def flag_report(
    confidence: npt.NDArray[np.uint8], spec: ConfidenceSpec, spacing_mm: tuple[float, float, float]
) -> FlagReport:
    """The regions of ``confidence`` (``[slice, row, column]``) below the spec's threshold, as a record."""
    started = time.perf_counter()
    found = find_flagged_regions(confidence, spec, spacing_mm)
    regions = tuple(
        UntrustedRegion(
            index=r.index,
            slice_start=r.slice_start,
            slice_stop=r.slice_stop,
            row_start=r.row_start,
            row_stop=r.row_stop,
            col_start=r.col_start,
            col_stop=r.col_stop,
            voxels=r.voxels,
            volume_ml=r.volume_ml,
            min_confidence=r.min_confidence,
        )
        for r in found.regions
    )
    mask = found.mask
    mask.flags.writeable = False
    return FlagReport(
        method=spec.method,
        threshold=spec.threshold,
        min_region_mm3=float(spec.min_region_mm3),
        regions=regions,
        mask=mask,
        search_s=time.perf_counter() - started,
    )


class RegionSearch:
    """Owned by the regions stage's thread: one finished volume at a time."""

    def __init__(self, spec: ConfidenceSpec, delivery: VolumeDelivery) -> None:
        self._spec = spec
        self._delivery = delivery

    def handle(self, item: VolumeToCheck) -> None:
        volume = item.volume
        if volume.confidence is None:
            raise ValueError(
                f"acquisition {volume.acquisition_id}: volume without confidence; expected one from a model "
                "with a confidence output"
            )
        report = flag_report(volume.confidence, self._spec, volume.geometry.spacing)
        logger.info(
            "acquisition %s: confidence checked in %.2f s: %s",
            volume.acquisition_id,
            report.search_s,
            f"{report.count} region(s) flagged, {report.volume_ml:.2f} mL"
            if report.regions
            else "none flagged",
            extra={"event": LogEvent.FLAGGED, "stage": "regions", "acquisition_id": volume.acquisition_id},
        )
        self._delivery.deliver(replace(volume, flagged=report), item.committed)


def stored_regions(
    confidence: npt.NDArray[np.uint8],
    spacing_mm: tuple[float, float, float],
    method: str,
    threshold: int,
    min_region_mm3: float,
) -> FlagReport:
    """The regions of a volume kept across a restart (agent.publish.volume_archive), found again from its stored
    confidence with the numbers it was checked with: the same search, so the same regions."""
    return flag_report(confidence, ConfidenceSpec(method, threshold, min_region_mm3), spacing_mm)
