"""The records the agent's stages hand each other.

Stages run in threads joined by bounded queues (docs/architecture.md); what crosses a queue is one of these
frozen dataclasses, so no stage can change what another stage is looking at. Each record carries only what the
next stage needs, and none of them carries a patient name, ID or birth date: ``acquisition_id`` is an opaque
digest of the study, series and SOP class UIDs, safe for logs, metrics and the wire.

Times named ``*_at`` are wall-clock seconds (``time.time()``) so that they can be compared across processes on
one machine (the simulator, the agent and a subscriber in the benchmark); durations are measured with
``time.perf_counter()`` inside one stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from agent.vocabulary import ArrivalSource, EndedBy, Outcome, StreamAction, UpdateKind
from sct_core.geometry import VolumeGeometry

if TYPE_CHECKING:
    # Only a type here: records stay importable without torch (the robot client imports this package).
    from engines.inference.device_volume import DeviceVolume

# --------------------------------------------------------------------------------------------------- watcher


@dataclass(frozen=True, slots=True)
class ArrivedFile:
    """A file in the export folder that is complete and may be read."""

    path: Path
    size: int
    mtime_ns: int
    #: When the watcher declared the file complete (wall clock).
    detected_at: float
    source: ArrivalSource


# ------------------------------------------------------------------------------------------------- assembler


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where one image's pixels are: a classic file, or one frame of an Enhanced multi-frame object."""

    path: Path
    #: 0-based frame index inside an Enhanced object; ``None`` for a single-frame file.
    frame: int | None
    echo_time_ms: float
    #: Position of the image along the slice normal (row x column direction cosines), mm.
    position_mm: float
    #: The image's unique key: SOPInstanceUID, plus ``#frame`` for a frame of an Enhanced object.
    instance_key: str


@dataclass(frozen=True, slots=True)
class AcquisitionView:
    """What the headers say about one acquisition so far, vendor conventions already resolved.

    The same view comes from a classic and an Enhanced export of one scan: fields that only say how the scan
    was exported (the SOP class, the raw ImageType tokens, the opaque id derived from the UIDs, arrival times,
    where a count was read from) are left out of equality (``compare=False``), so ``==`` between two views asks
    "is this the same acquisition, described the same way?".

    Parameters are ``None`` where the headers seen do not state them. ``echo_times_ms`` lists the distinct echo
    times of the images the model would take (magnitude images; see ``image_kind``), ascending;
    ``slices_per_echo`` counts them for each echo time in the same order. Numbers are rounded to the precision
    consoles state them with (see assembler), so that a DS string and an FD float of one value agree.
    """

    acquisition_id: str = field(compare=False)
    #: "MR Image Storage" or "Enhanced MR Image Storage".
    sop_class: str = field(compare=False)
    manufacturer: str
    model_name: str
    magnetic_field_strength_t: float | None
    #: MRAcquisitionType: "2D" or "3D".
    mr_acquisition_type: str | None
    #: ScanningSequence and SequenceVariant tokens (classic), or their Enhanced equivalents mapped onto the same
    #: tokens (EchoPulseSequence GRADIENT -> GR, Spoiling RF -> SP, InversionRecovery YES -> IR), after the
    #: vendor conventions of agent.ingest.vendor_conventions (e.g. SP for a Siemens FLASH whose export dropped it).
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    sequence_name: str
    inversion_time_ms: float | None
    #: ImageType values of the images the echoes are made of, upper case, as exported (classic ImageType or
    #: Enhanced FrameType: they differ between the two forms, hence not compared).
    image_type: tuple[str, ...] = field(compare=False)
    #: Whether the echoes are magnitude images: False once the acquisition has ended without any, None while
    #: none has arrived yet (a Philips export may send a slice's phase image before its magnitude image).
    magnitude: bool | None
    repetition_time_ms: float | None
    flip_angle_deg: float | None
    #: PixelBandwidth, Hz per pixel.
    pixel_bandwidth_hz: float | None
    echo_times_ms: tuple[float, ...]
    #: Echoes the acquisition will produce, as announced by the headers (see vendor_conventions).
    expected_echoes: int | None
    #: PixelSpacing (row spacing, column spacing), mm.
    pixel_spacing_mm: tuple[float, float] | None
    #: Distance between neighbouring slice centres, mm (SpacingBetweenSlices, else SliceThickness).
    slice_spacing_mm: float | None
    slice_thickness_mm: float | None
    rows: int | None
    columns: int | None
    #: ImageOrientationPatient: row direction cosines, then column direction cosines.
    image_orientation: tuple[float, float, float, float, float, float] | None
    #: Slices each echo will have, as announced by the headers (see vendor_conventions).
    expected_slices: int | None
    slices_per_echo: tuple[int, ...]
    #: For each echo (same order as ``echo_times_ms``), the sorted positions along the slice normal, mm.
    positions_mm: tuple[tuple[float, ...], ...]
    #: Attributes that differ between images of one acquisition (e.g. "ImageOrientationPatient", "Rows"),
    #: each with a short description of the two values seen. Empty when every image agrees.
    inconsistencies: tuple[str, ...]
    #: The full-volume grid once the assembler can place slice 0 (see assembler), else ``None``.
    grid: VolumeGeometry | None
    #: True once every expected image is present (or the quiet period ended it; see ``ended_by``).
    complete: bool
    #: "count" when completion came from the acquisition's own counts, "quiet" from the quiet-period timer,
    #: "" while still open.
    ended_by: EndedBy
    first_image_at: float = field(compare=False)
    last_image_at: float = field(compare=False)
    #: "Siemens", "GE", "Philips" or "other" (agent.ingest.vendor_conventions.Vendor).
    vendor: str = "other"
    software_versions: str = ""
    #: SeriesNumber of every series the images came from (more than one when an export split the echoes).
    series_numbers: tuple[int, ...] = field(default=(), compare=False)
    #: SeriesDescription of the acquisition's first image ("" when absent): the console's name for the series.
    series_description: str = field(default="", compare=False)
    #: "gradient echo", "spin echo", "echo planar", ... (agent.ingest.vendor_conventions.sequence_family).
    sequence_family: str = ""
    #: Why the sequence tokens say what they say where a vendor convention decided it, for a person to check.
    sequence_evidence: tuple[str, ...] = field(default=(), compare=False)
    #: The kind of the images the echoes are made of ("magnitude", "phase", "field map", ...).
    image_kind: str = "magnitude"
    #: Normalised flags of those images: DERIVED, REFORMAT, PROJECTION, MOSAIC, WATER, FAT, IN_PHASE, ...
    image_flags: tuple[str, ...] = ()
    #: Images of other kinds in the same acquisition (the phase images of a Philips export), as
    #: (kind, count) pairs; they are never given to the model.
    other_images: tuple[tuple[str, int], ...] = ()
    #: Fat-water chemical shift in pixels (Philips states it; otherwise from bandwidth and field).
    water_fat_shift_px: float | None = None
    #: Where ``expected_echoes`` and ``expected_slices`` were read from ("" when not stated).
    counts_source: tuple[str, str] = field(default=("", ""), compare=False)

    @property
    def echoes(self) -> tuple[tuple[float, int], ...]:
        """(echo time ms, slices present) for each echo, in order of echo time."""
        return tuple(zip(self.echo_times_ms, self.slices_per_echo, strict=True))


@dataclass(frozen=True, slots=True)
class AcquisitionUpdate:
    """One step in the life of an acquisition, as the assembler sees it."""

    kind: UpdateKind
    view: AcquisitionView
    #: Images that arrived since the previous update of this acquisition.
    new_images: tuple[ImageRef, ...]
    #: Echo times (ms) whose first image is among ``new_images``: each triggers a provisional verdict.
    first_of_echo: tuple[float, ...]

    @property
    def acquisition_id(self) -> str:
        return self.view.acquisition_id


# ------------------------------------------------------------------------------------------------- validator


@dataclass(frozen=True, slots=True)
class Reason:
    """One failed rule: enough for a technologist to fix the protocol on the console."""

    protocol_id: str
    #: The DICOM keyword (or derived attribute such as ``EchoTime2`` or ``VoxelSize``) the rule reads.
    attribute: str
    found: str
    required: str
    #: A bounded label for metrics: "sequence", "echoes", "timing", "bandwidth", "field", "geometry",
    #: "image", "completeness", "consistency".
    category: str

    def text(self) -> str:
        return f"{self.attribute}: found {self.found}, required {self.required} (protocol {self.protocol_id})"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of checking one acquisition against one protocol."""

    acquisition_id: str
    protocol_id: str
    protocol_version: str
    outcome: Outcome
    #: False for a provisional verdict from the first image(s); True once the acquisition has ended.
    final: bool
    reasons: tuple[Reason, ...]
    #: Rules that could not be evaluated yet (e.g. "EchoTime2" before the second echo arrived).
    pending: tuple[str, ...]
    decided_at: float


@dataclass(frozen=True, slots=True)
class ValidatedUpdate:
    """An assembler update with the verdict that decides whether the streamer may run the model on it."""

    update: AcquisitionUpdate
    #: The verdict for the protocol the engine may run (the model's validated protocol that passed, or the
    #: first active protocol's failing verdict).
    verdict: Verdict
    #: True when the verdict passes, nothing is pending, and the model's manifest lists the protocol.
    infer: bool

    @property
    def acquisition_id(self) -> str:
        return self.update.view.acquisition_id


# -------------------------------------------------------------------------------------- streamer and engine


@dataclass(frozen=True, slots=True, eq=False)
class SlabRequest:
    """The pixels one slab window needs, read from disk, for the engine stage."""

    acquisition_id: str
    protocol_id: str
    geometry: VolumeGeometry
    slab_index: int
    slab_count: int
    #: ``[echo, slice, row, column]`` with the full volume's slice count, on the engine's device; only the slices
    #: the window needs (and the normalisation's leading slices) are filled.
    volume: DeviceVolume
    #: Intensity scale of the volume (from its leading slices), identical for every slab of it.
    scale: float
    #: The last image needed by this slab arrived at (wall clock); for latency metrics.
    inputs_complete_at: float
    read_s: float


#: The MR images a volume was computed from: for each slice of the grid (in slice order), the image of each
#: echo (ascending echo time, the model's channel order). The sCT DICOM series references them.
SourceImages = tuple[tuple[ImageRef, ...], ...]


@dataclass(frozen=True, slots=True)
class StreamControl:
    acquisition_id: str
    action: StreamAction
    reason: str = ""
    #: Wall-clock time of the acquisition's last image (for last-image-to-volume latency).
    last_image_at: float = 0.0
    #: With FINALIZE: the images the volume was computed from.
    sources: SourceImages = ()


@dataclass(frozen=True, slots=True, eq=False)
class SctSlab:
    """One slab of synthetic CT in HU, with the geometry of the whole volume it belongs to."""

    acquisition_id: str
    protocol_id: str
    model_id: str
    model_version: str
    geometry: VolumeGeometry
    slab_index: int
    slab_count: int
    #: First slice of the volume this slab covers, and how many slices.
    start: int
    size: int
    #: ``[size, rows, columns]`` int16 HU.
    hu: npt.NDArray[np.int16]
    #: sha256 of ``hu`` as little-endian bytes, computed where the slab is made (end-to-end integrity).
    sha256: str
    inference_s: float
    inputs_complete_at: float
    produced_at: float
    #: ``[size, rows, columns]`` uint8 confidence of the same voxels (255 = as typical as the calibration data,
    #: 0 = far outside it), computed in the same network pass; None when the model has no confidence output.
    confidence: npt.NDArray[np.uint8] | None = None
    #: sha256 of ``confidence``'s bytes ("" without confidence), computed where the slab is made, like ``sha256``.
    confidence_sha256: str = ""
    #: The manifest's confidence method and calibrated threshold (what a receiver compares ``confidence`` with).
    confidence_method: str = ""
    confidence_threshold: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class SctVolume:
    """A finished synthetic CT volume: every slab of one acquisition stitched."""

    acquisition_id: str
    protocol_id: str
    model_id: str
    model_version: str
    geometry: VolumeGeometry
    #: ``[slice, row, column]`` int16 HU.
    hu: npt.NDArray[np.int16]
    sha256: str
    slab_count: int
    produced_at: float
    #: Wall-clock time of the acquisition's last image (for last-image-to-volume latency).
    last_image_at: float = 0.0
    #: The MR images it was computed from (never sent on the wire; the DICOM writer references them).
    sources: SourceImages = ()
    #: Published again by a restarted agent from its archive (agent.publish.volume_archive), not newly computed.
    republished: bool = False
    #: ``[slice, row, column]`` uint8 confidence of every voxel (see ``SctSlab.confidence``); None when the model
    #: has no confidence output.
    confidence: npt.NDArray[np.uint8] | None = None
    confidence_sha256: str = ""
    confidence_method: str = ""
    confidence_threshold: int = 0
    #: The regions the sCT should not be trusted in, found once on the whole volume; None when nothing was
    #: checked (the model has no confidence output), an empty ``regions`` when it was checked and none was found.
    flagged: FlagReport | None = None


@dataclass(frozen=True, slots=True)
class UntrustedRegion:
    """One connected region whose confidence is below the model's calibrated threshold.

    Voxel indices of the volume, 0-based, ``*_stop`` exclusive (Python slices); regions are numbered from 1,
    largest first. A copy of ``engines.confidence.regions.FlaggedRegion`` that the records (and with them the
    robot's client library, which must not import scipy) can hold.
    """

    index: int
    slice_start: int
    slice_stop: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    voxels: int
    volume_ml: float
    #: Lowest confidence inside the region (0-255).
    min_confidence: int

    def as_json(self) -> dict[str, Any]:
        """The region as the wire states it: ranges ``[start, stop)`` of 0-based voxel indices."""
        return {
            "index": self.index,
            "slices": [self.slice_start, self.slice_stop],
            "rows": [self.row_start, self.row_stop],
            "columns": [self.col_start, self.col_stop],
            "voxels": self.voxels,
            "volume_ml": round(self.volume_ml, 3),
            "min_confidence": self.min_confidence,
        }


@dataclass(frozen=True, slots=True, eq=False)
class FlagReport:
    """What the confidence check found on one volume: the regions, and the mask they were cut from.

    ``method``, ``threshold`` (voxels below it are untrusted) and ``min_region_mm3`` (smaller connected sets are
    not flagged) come from the model's manifest, where calibration put them.
    """

    method: str
    threshold: int
    min_region_mm3: float
    regions: tuple[UntrustedRegion, ...]
    #: ``[slice, row, column]``, True inside a flagged region (what the DICOM Segmentation and the preview draw).
    mask: npt.NDArray[np.bool_]
    #: Seconds the search took (on the regions stage's thread).
    search_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.regions)

    @property
    def volume_ml(self) -> float:
        return sum(r.volume_ml for r in self.regions)


@dataclass(frozen=True, slots=True, eq=False)
class VolumeToCheck:
    """A finished volume with confidence, from the engine stage to the regions stage, which finds the regions not
    to trust before it is sent."""

    volume: SctVolume
    #: sha256 of the volume committed before a restart (it is then not sent again), else None.
    committed: str | None = None

    @property
    def acquisition_id(self) -> str:
        return self.volume.acquisition_id


@dataclass(frozen=True, slots=True)
class DicomStoreRequest:
    """A written sCT series for the C-STORE stage (dicom writer -> dicom store): its folder's name (what
    status events quote) and its files, in slice order."""

    acquisition_id: str
    series_folder: str
    files: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A message for the status topic: verdicts, progress and errors, for technologists and IT."""

    #: "verdict", "progress", "complete", "error", "skipped".
    kind: str
    acquisition_id: str | None
    body: Mapping[str, Any] = field(default_factory=dict)
    at: float = 0.0


#: What the publisher stage accepts.
Publication = StatusEvent | SctSlab | SctVolume


#: How HU voxels travel and are hashed: little-endian int16, C order (the wire format's payload dtype).
PAYLOAD_DTYPE: Final = "<i2"


#: How confidence voxels travel and are hashed: unsigned bytes (numpy's notation; byte order does not apply).
CONFIDENCE_DTYPE: Final = "|u1"


def confidence_sha256(confidence: npt.NDArray[np.uint8]) -> str:
    """sha256 of a confidence array as it travels (uint8, C order): what ``SctSlab.confidence_sha256`` holds."""
    return hashlib.sha256(np.ascontiguousarray(confidence, dtype=CONFIDENCE_DTYPE).data).hexdigest()


def payload_sha256(hu: npt.NDArray[np.int16]) -> str:
    """sha256 of an HU array as it travels: little-endian int16, C order. What ``SctSlab.sha256`` must hold.

    Here rather than in the wire format because the engine stage computes it where the slab is made, and the
    publisher, the archive and every subscriber check the same digest (end-to-end integrity).
    """
    return hashlib.sha256(np.ascontiguousarray(hu, dtype=PAYLOAD_DTYPE).data).hexdigest()
