"""Group arriving images into acquisitions and echoes, place them on the slice grid, and decide completion.

Peers wait 5 to 300 s of silence before they call a series complete; we decide from the
acquisition itself: ImagesInAcquisition and EchoTrainLength (classic) or the frames of an Enhanced object give
the number of echoes and of slices per echo, so the image that completes the grid completes the acquisition.
The quiet-period timer only ends acquisitions whose counts are never reached (lost files) or never stated.

The slice grid is placed as soon as it can be, so that the streamer can start slabs before the series is
complete: the first image anchors it and the second distinct position tells the direction in which the
reconstructor emits slices (every vendor we know emits a 3D slab in slice order from one end). If a later
image falls outside the grid so placed, the anchor was wrong: the grid is withdrawn until the acquisition
ends and then placed from the extreme positions, and the streamer restarts (see streamer).

Admission: when the pipeline passes ``admit``, a new acquisition starts only if ``admit(acquisition_id)`` says
so (the agent checks free disk space there: agent.ops.disk_space). The files of one refused are held, not
recorded as handled, and read again from ``tick`` once ``admit`` agrees; acquisitions already open are never
refused, so a series in flight finishes. Held files are bounded (``MAX_HELD_FILES``): an acquisition that would
pass the bound is left whole for the next start of the agent, which finds its files still in the export folder,
rather than processed with files missing.

One module on purpose: grouping, grid placement and completion are one state machine per acquisition; each
decision (a new echo, a grid placed again, the last image) changes what the others must do next.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.file_labels import error_text, file_label
from agent.ingest.acquisition_facts import LENGTH_DECIMALS, TIME_DECIMALS, AcquisitionFacts, facts_for
from agent.ingest.grouping import acquisition_id_for
from agent.ingest.header_reader import (
    FrameHeader,
    NotAnImageError,
    ObjectHeader,
    ParsedFile,
    read_header,
)
from agent.ingest.header_values import HeaderError
from agent.ingest.siemens_protocol import read_siemens_protocol
from agent.ingest.vendor_conventions import image_flags
from agent.records import AcquisitionUpdate, AcquisitionView, ArrivedFile, ImageRef
from agent.vocabulary import EndedBy, FileOutcome, ImageKind, LogEvent, UpdateKind, Vendor
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Echo times closer than this (ms) are the same echo (headers round TE to 0.01 ms or finer).
ECHO_TIME_TOLERANCE_MS = 0.01
#: Positions along the normal are compared on this grid (mm): two images closer than this are one slice.
POSITION_RESOLUTION_MM = 1e-3
#: An image lies on the slice grid when its distance to the nearest grid position is below this fraction of
#: the slice spacing.
GRID_TOLERANCE_FRACTION = 0.05
#: A file that fails to parse is read once more after this pause before it is declared bad (a writer may not
#: have finished what a stability check took for complete).
RETRY_DELAY_S = 1.0
#: Ended acquisitions remembered to recognise late files (bounded: memory must not grow with series count).
ENDED_MEMORY = 1024
#: Distinct header inconsistencies kept per acquisition: enough to explain, bounded against a corrupt export.
MAX_INCONSISTENCIES = 20
#: Positions in a view are rounded to POSITION_RESOLUTION_MM.
POSITION_DECIMALS = 3
#: Files of refused acquisitions held for a later read (a path and a few numbers each: about 20 MB at most).
MAX_HELD_FILES = 50_000


#: (file, outcome, reason, acquisition id) for each file the assembler finishes with.
FileCallback = Callable[[ArrivedFile, str, str, str | None], None]


@dataclass(slots=True)
class _Echo:
    echo_time_ms: float
    #: Position key (along the normal, in POSITION_RESOLUTION_MM units) -> image.
    images: dict[int, ImageRef] = field(default_factory=dict)
    #: Images that arrived for a position already holding one (other SOP instances: a second image set such
    #: as GE's field map with the same ImageType, or a time series), and the first such position.
    repeats: int = 0
    first_repeat_mm: float | None = None


@dataclass(slots=True)
class _ImageSet:
    """The images of one kind (magnitude, phase, ...), by echo time."""

    echoes: list[_Echo] = field(default_factory=list)
    image_type: tuple[str, ...] = ()
    flags: set[str] = field(default_factory=set)

    def echo_for(self, echo_time_ms: float) -> tuple[_Echo, bool]:
        for echo in self.echoes:
            if abs(echo.echo_time_ms - echo_time_ms) <= ECHO_TIME_TOLERANCE_MS:
                return echo, False
        # Rounded once here, so the view's echo times and the images' (which the streamer matches) agree.
        echo = _Echo(round(echo_time_ms, TIME_DECIMALS))
        self.echoes.append(echo)
        self.echoes.sort(key=lambda e: e.echo_time_ms)
        return echo, True

    @property
    def count(self) -> int:
        return sum(len(e.images) + e.repeats for e in self.echoes)


@dataclass(slots=True)
class _Acquisition:
    acquisition_id: str
    header: ObjectHeader
    facts: AcquisitionFacts
    normal: np.ndarray
    first_image_at: float
    last_image_at: float
    last_activity: float
    #: Image kind -> its images. The model's input is the magnitude set; the echoes of the view come from it,
    #: or, in an acquisition without magnitude images, from its largest set (so a phase-only series shows
    #: its echoes and is rejected for being phase).
    sets: dict[ImageKind, _ImageSet] = field(default_factory=dict)
    series_numbers: set[int] = field(default_factory=set)
    instance_keys: set[str] = field(default_factory=set)
    inconsistencies: list[str] = field(default_factory=list)
    anchor_position: tuple[float, float, float] | None = None
    #: ImagePositionPatient of the first magnitude image at each position key: the grid's origin is the
    #: stated position of its first slice when that image is present, whatever image anchored the grid.
    stated_positions: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    anchor_mm: float | None = None
    direction: int = 0
    grid_broken: bool = False
    #: (origin along the normal, slice count) once the anchor has placed the grid; later images are checked
    #: against it one by one instead of re-checking every position on every update.
    placed: tuple[float, int] | None = None
    new_images: list[ImageRef] = field(default_factory=list)
    first_of_echo: list[float] = field(default_factory=list)
    touched: bool = False

    @property
    def magnitude(self) -> _ImageSet:
        found = self.sets.get(ImageKind.MAGNITUDE)
        if found is None:
            found = self.sets[ImageKind.MAGNITUDE] = _ImageSet()
        return found

    def primary(self) -> tuple[ImageKind, _ImageSet]:
        """The set the view describes: magnitude images if any, else the largest other set."""
        magnitude = self.sets.get(ImageKind.MAGNITUDE)
        if magnitude is not None and magnitude.echoes:
            return ImageKind.MAGNITUDE, magnitude
        others = [(kind, images) for kind, images in self.sets.items() if images.echoes]
        if not others:
            return ImageKind.MAGNITUDE, self.magnitude
        return max(others, key=lambda item: item[1].count)

    @property
    def echoes(self) -> list[_Echo]:
        """The magnitude echoes: what the grid is placed from and the streamer reads."""
        return self.magnitude.echoes


class Assembler:
    """Not thread-safe: one stage thread owns it (see pipeline)."""

    def __init__(
        self,
        emit: Callable[[AcquisitionUpdate], object],
        *,
        quiet_period_s: float,
        on_file: FileCallback | None = None,
        already_finished: set[str] | frozenset[str] = frozenset(),
        admit: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._quiet_period_s = quiet_period_s
        self._on_file = on_file
        self._clock = clock
        self._open: dict[str, _Acquisition] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._retries: list[tuple[float, ArrivedFile]] = []
        #: Acquisitions the journal says were finished before a restart: their files are not processed again,
        #: so nothing is published twice.
        self._finished_before = frozenset(already_finished)
        self._admit = admit
        #: Files of acquisitions ``admit`` refused, in arrival order, to be read again when it agrees.
        self._held: dict[str, list[ArrivedFile]] = {}
        self._held_count = 0
        #: Acquisitions whose held files passed MAX_HELD_FILES: left for the next start (module docstring).
        self._left_for_restart: OrderedDict[str, None] = OrderedDict()

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def held_count(self) -> int:
        """Files waiting for their acquisition to be admitted."""
        return self._held_count

    def add_file(self, arrived: ArrivedFile, *, retry: bool = False) -> None:
        """Parse one complete file and add its images; updates are emitted by :meth:`flush`."""
        try:
            parsed = read_header(arrived.path)
        except NotAnImageError as error:
            self._file(arrived, FileOutcome.SKIPPED, str(error), None)
            return
        except HeaderError as error:
            if not retry:
                self._retries.append((self._clock() + RETRY_DELAY_S, arrived))
                logger.info(
                    "%s; reading it again in %.1f s",
                    error,
                    RETRY_DELAY_S,
                    extra={"event": LogEvent.FILE, "stage": "assembler", "file": file_label(arrived.path)},
                )
                return
            self._file(arrived, FileOutcome.BAD, str(error), None)
            return
        except Exception as error:  # one file must never stop the stage
            label = file_label(arrived.path)
            logger.exception("file %s: unexpected error reading its header", label)
            reason = f"{label}: unreadable header ({error_text(error, arrived.path)})"
            self._file(arrived, FileOutcome.BAD, reason, None)
            return
        try:
            self._add_parsed(arrived, parsed)
        except Exception as error:  # a defect here must cost one file, not the stage
            label = file_label(arrived.path)
            logger.exception("file %s: unexpected error adding its images", label)
            reason = f"{label}: images not added ({error_text(error, arrived.path)})"
            self._file(arrived, FileOutcome.BAD, reason, None)

    def flush(self) -> None:
        """Emit one update for each acquisition that changed since the last flush."""
        for acquisition in list(self._open.values()):
            if not acquisition.touched:
                continue
            acquisition.touched = False
            view = self._view(acquisition, ended_by=EndedBy.OPEN)
            if view.complete:
                view = self._view(acquisition, ended_by=EndedBy.COUNT)
                self._end(acquisition, UpdateKind.COMPLETE, view)
            else:
                self._send(acquisition, UpdateKind.IMAGES, view)

    def tick(self) -> None:
        """Retry files due for a second read, take held acquisitions now admitted, and end acquisitions quiet
        for the quiet period."""
        if self._held:
            self._release_held()
        now = self._clock()
        due = [item for item in self._retries if item[0] <= now]
        if due:
            self._retries = [item for item in self._retries if item[0] > now]
            for _, arrived in due:
                self.add_file(arrived, retry=True)
            self.flush()
        for acquisition in list(self._open.values()):
            if now - acquisition.last_activity >= self._quiet_period_s:
                view = self._view(acquisition, ended_by=EndedBy.QUIET)
                self._end(acquisition, UpdateKind.QUIET, view)

    def end_all(self) -> None:
        """End every open acquisition now, as the quiet period would: nothing more will come (``sct-agent
        check`` after reading a whole folder). Files waiting for a second read are read first."""
        for _, arrived in self._retries:
            self.add_file(arrived, retry=True)
        self._retries.clear()
        self.flush()
        for acquisition in list(self._open.values()):
            view = self._view(acquisition, ended_by=EndedBy.QUIET)
            self._end(acquisition, UpdateKind.QUIET, view)

    # ------------------------------------------------------------------------------------------ internals

    def _add_parsed(self, arrived: ArrivedFile, parsed: ParsedFile) -> None:
        header = parsed.header
        acquisition_id = acquisition_id_for(header)
        if acquisition_id in self._finished_before:
            self._file(
                arrived,
                FileOutcome.SKIPPED,
                f"acquisition {acquisition_id} finished before a restart",
                acquisition_id,
            )
            return
        if acquisition_id in self._ended:
            # Phase images of a Philips export often follow the last magnitude image that completed the
            # acquisition: expected, so not worth a warning. A late magnitude image is.
            companion = all(f.kind is not ImageKind.MAGNITUDE for f in parsed.frames)
            self._file(
                arrived,
                FileOutcome.SKIPPED,
                f"acquisition {acquisition_id} already ended"
                + (" (a non-magnitude image, not used)" if companion else ""),
                acquisition_id,
                quiet=companion,
            )
            return
        acquisition = self._open.get(acquisition_id)
        if acquisition is None:
            if self._hold(arrived, acquisition_id):
                return
            siemens = None
            if header.vendor is Vendor.SIEMENS and not header.sequence.enhanced:
                siemens = read_siemens_protocol(arrived.path)
            acquisition = _Acquisition(
                acquisition_id=acquisition_id,
                header=header,
                facts=facts_for(header, siemens),
                normal=_orthonormal(header.image_orientation)[2],
                first_image_at=arrived.detected_at,
                last_image_at=arrived.detected_at,
                last_activity=self._clock(),
            )
            self._open[acquisition_id] = acquisition
        else:
            self._check_consistent(acquisition, header)
        if header.series_number is not None:
            acquisition.series_numbers.add(header.series_number)
        added = 0
        for frame in parsed.frames:
            added += self._add_frame(acquisition, parsed.path, frame)
        if added == 0:
            self._file(arrived, FileOutcome.DUPLICATE, "every image already received", acquisition_id)
            return
        acquisition.last_image_at = max(acquisition.last_image_at, arrived.detected_at)
        acquisition.last_activity = self._clock()
        acquisition.touched = True
        self._file(arrived, FileOutcome.ACCEPTED, "", acquisition_id)

    def _hold(self, arrived: ArrivedFile, acquisition_id: str) -> bool:
        """Hold ``arrived`` when its (new) acquisition may not start now; True when held or left for restart."""
        if self._admit is None:
            return False
        if acquisition_id in self._left_for_restart:
            return True
        if acquisition_id not in self._held and self._admit(acquisition_id):
            return False
        if self._held_count >= MAX_HELD_FILES:
            self._held_count -= len(self._held.pop(acquisition_id, []))
            self._left_for_restart[acquisition_id] = None
            while len(self._left_for_restart) > ENDED_MEMORY:
                self._left_for_restart.popitem(last=False)
            logger.error(
                "acquisition %s: more than %d files wait for disk space; it is left whole for the next start of "
                "the agent (its files stay in the export folder)",
                acquisition_id,
                MAX_HELD_FILES,
            )
            return True
        self._held.setdefault(acquisition_id, []).append(arrived)
        self._held_count += 1
        return True

    def _release_held(self) -> None:
        """Read again the files of held acquisitions that ``admit`` now takes, in their arrival order."""
        assert self._admit is not None
        released = False
        for acquisition_id in list(self._held):
            if not self._admit(acquisition_id):
                continue
            files = self._held.pop(acquisition_id)
            self._held_count -= len(files)
            logger.info(
                "acquisition %s: taken now, %d files waited for disk space", acquisition_id, len(files)
            )
            for arrived in files:
                self.add_file(arrived)
            released = True
        if released:
            self.flush()

    def _add_frame(self, acquisition: _Acquisition, path: Path, frame: FrameHeader) -> int:
        if frame.instance_key in acquisition.instance_keys:
            return 0
        acquisition.instance_keys.add(frame.instance_key)
        position_mm = float(np.dot(frame.position, acquisition.normal))
        key = round(position_mm / POSITION_RESOLUTION_MM)
        images = acquisition.sets.get(frame.kind)
        if images is None:
            images = acquisition.sets[frame.kind] = _ImageSet(image_type=frame.image_type)
        if not images.image_type:
            images.image_type = frame.image_type
        images.flags.update(_flags(frame.image_type))
        echo, new_echo = images.echo_for(frame.echo_time_ms)
        if key in echo.images:
            echo.repeats += 1
            if echo.first_repeat_mm is None:
                echo.first_repeat_mm = position_mm
            return 1
        ref = ImageRef(
            path=path,
            frame=frame.frame,
            echo_time_ms=echo.echo_time_ms,
            position_mm=position_mm,
            instance_key=frame.instance_key,
        )
        echo.images[key] = ref
        if frame.kind is not ImageKind.MAGNITUDE:
            # Only magnitude images go to the streamer, place the grid and trigger first-of-echo verdicts.
            return 1
        acquisition.new_images.append(ref)
        acquisition.stated_positions.setdefault(key, frame.position)
        if new_echo:
            acquisition.first_of_echo.append(echo.echo_time_ms)
        if acquisition.anchor_mm is None:
            acquisition.anchor_mm = position_mm
            acquisition.anchor_position = frame.position
        elif acquisition.direction == 0 and abs(position_mm - acquisition.anchor_mm) > POSITION_RESOLUTION_MM:
            acquisition.direction = 1 if position_mm > acquisition.anchor_mm else -1
        return 1

    def _check_consistent(self, acquisition: _Acquisition, header: ObjectHeader) -> None:
        first = acquisition.header
        for name, a, b in (
            ("Rows", first.rows, header.rows),
            ("Columns", first.columns, header.columns),
            ("PixelSpacing", first.pixel_spacing_mm, header.pixel_spacing_mm),
            ("ImageOrientationPatient", first.image_orientation, header.image_orientation),
            ("RepetitionTime", first.repetition_time_ms, header.repetition_time_ms),
            ("FlipAngle", first.flip_angle_deg, header.flip_angle_deg),
            ("PixelBandwidth", first.pixel_bandwidth_hz, header.pixel_bandwidth_hz),
            ("MRAcquisitionType", first.mr_acquisition_type, header.mr_acquisition_type),
            ("MagneticFieldStrength", first.magnetic_field_strength_t, header.magnetic_field_strength_t),
        ):
            if not _same(a, b):
                text = f"{name}: {a} in the first image, {b} in a later one"
                if (
                    text not in acquisition.inconsistencies
                    and len(acquisition.inconsistencies) < MAX_INCONSISTENCIES
                ):
                    acquisition.inconsistencies.append(text)

    def _view(self, acquisition: _Acquisition, *, ended_by: EndedBy) -> AcquisitionView:
        facts = acquisition.facts
        kind, images = acquisition.primary()
        ended = bool(ended_by)
        is_magnitude = kind is ImageKind.MAGNITUDE and bool(images.echoes)
        # Counts announced by the headers describe the acquired images; a phase-difference series has one echo
        # whatever the protocol's contrast count says, so they apply to the magnitude set only.
        expected_echoes = facts.expected_echoes if is_magnitude else None
        expected_slices = facts.expected_slices
        counts = tuple(len(e.images) for e in images.echoes)
        by_count = (
            is_magnitude
            and expected_echoes is not None
            and expected_slices is not None
            and len(counts) == expected_echoes
            and all(c == expected_slices for c in counts)
        )
        # A quiet period ends an acquisition that never stated its size as complete, one that did as not.
        complete = by_count or (ended_by is EndedBy.QUIET and (expected_slices is None or not is_magnitude))
        grid = self._grid(acquisition, expected_slices, ended=ended or complete) if is_magnitude else None
        # No magnitude image: undecided while images arrive, then False, or still None when no image of the
        # acquisition states its kind (the validator then says so).
        magnitude: bool | None = True
        if not is_magnitude:
            magnitude = False if (ended or complete) and kind is not ImageKind.UNSTATED else None
        others = tuple(
            (str(k), s.count) for k, s in sorted(acquisition.sets.items()) if s is not images and s.count
        )
        inconsistencies = list(acquisition.inconsistencies)
        inconsistencies.extend(
            f"ImagePositionPatient: {e.repeats} more image{'s' if e.repeats > 1 else ''} at positions already "
            f"holding one at TE {e.echo_time_ms:g} ms (first at {e.first_repeat_mm:.3f} mm): a second image set "
            "or a time series in one acquisition"
            for e in images.echoes
            if e.repeats
        )
        return AcquisitionView(
            acquisition_id=acquisition.acquisition_id,
            sop_class=acquisition.header.sop_class,
            manufacturer=facts.manufacturer,
            model_name=facts.model_name,
            magnetic_field_strength_t=facts.magnetic_field_strength_t,
            mr_acquisition_type=facts.mr_acquisition_type,
            scanning_sequence=facts.scanning_sequence,
            sequence_variant=facts.sequence_variant,
            sequence_name=facts.sequence_name,
            inversion_time_ms=facts.inversion_time_ms,
            image_type=images.image_type,
            magnitude=magnitude,
            repetition_time_ms=facts.repetition_time_ms,
            flip_angle_deg=facts.flip_angle_deg,
            pixel_bandwidth_hz=facts.pixel_bandwidth_hz,
            echo_times_ms=tuple(e.echo_time_ms for e in images.echoes),
            expected_echoes=expected_echoes,
            pixel_spacing_mm=facts.pixel_spacing_mm,
            slice_spacing_mm=facts.slice_spacing_mm,
            slice_thickness_mm=facts.slice_thickness_mm,
            rows=facts.rows,
            columns=facts.columns,
            image_orientation=facts.image_orientation,
            expected_slices=expected_slices,
            slices_per_echo=counts,
            positions_mm=tuple(
                tuple(sorted(round(r.position_mm, POSITION_DECIMALS) for r in e.images.values()))
                for e in images.echoes
            ),
            inconsistencies=tuple(inconsistencies),
            grid=grid,
            complete=complete,
            ended_by=ended_by if ended_by else (EndedBy.COUNT if complete else EndedBy.OPEN),
            first_image_at=acquisition.first_image_at,
            last_image_at=acquisition.last_image_at,
            vendor=str(facts.vendor),
            software_versions=facts.software_versions,
            series_numbers=tuple(sorted(acquisition.series_numbers)),
            series_description=acquisition.header.series_description,
            sequence_family=facts.sequence_family,
            sequence_evidence=facts.sequence_evidence,
            image_kind=str(kind),
            image_flags=tuple(sorted(images.flags | set(facts.scan_option_flags))),
            other_images=others,
            water_fat_shift_px=facts.water_fat_shift_px,
            counts_source=facts.counts_source,
        )

    def _grid(self, acquisition: _Acquisition, n_slices: int | None, *, ended: bool) -> VolumeGeometry | None:
        """The full-volume grid, or None while it cannot be placed (see module docstring)."""
        header = acquisition.header
        spacing = acquisition.facts.slice_spacing_mm
        if acquisition.anchor_mm is None or acquisition.anchor_position is None:
            return None
        placed: tuple[float, int] | None = None
        if spacing and n_slices and acquisition.direction and not acquisition.grid_broken:
            if acquisition.placed is not None:
                to_check = [r.position_mm for r in acquisition.new_images]
                origin_mm = acquisition.placed[0]
            else:
                to_check = _positions(acquisition)
                origin_mm = acquisition.anchor_mm - (
                    0 if acquisition.direction > 0 else (n_slices - 1) * spacing
                )
            if _on_grid(to_check, origin_mm, spacing, n_slices):
                placed = acquisition.placed = (origin_mm, n_slices)
            else:
                acquisition.grid_broken = True
                acquisition.placed = None
        if placed is None and ended:
            # The anchor could not place the grid: place it from the extreme positions instead.
            positions = _positions(acquisition)
            spacing = spacing or _median_step(positions)
            if spacing is None:
                return None
            low, high = min(positions), max(positions)
            count = n_slices or round((high - low) / spacing) + 1
            if _on_grid(positions, low, spacing, count):
                placed = (low, count)
        if placed is None or spacing is None:
            return None
        origin_mm, count = placed
        row, column, normal = _orthonormal(header.image_orientation)
        origin = np.asarray(acquisition.anchor_position) + (origin_mm - acquisition.anchor_mm) * normal
        origin_key = round(origin_mm / POSITION_RESOLUTION_MM)
        for key in (origin_key, origin_key - 1, origin_key + 1):
            if key in acquisition.stated_positions:
                origin = np.asarray(acquisition.stated_positions[key])
                break
        return VolumeGeometry(
            shape=(count, header.rows, header.columns),
            spacing=(float(spacing), header.pixel_spacing_mm[0], header.pixel_spacing_mm[1]),
            # Rounded (0.1 µm) so that the same grid placed from different anchor images compares equal.
            origin=(
                round(float(origin[0]), LENGTH_DECIMALS),
                round(float(origin[1]), LENGTH_DECIMALS),
                round(float(origin[2]), LENGTH_DECIMALS),
            ),
            row_direction=(float(row[0]), float(row[1]), float(row[2])),
            column_direction=(float(column[0]), float(column[1]), float(column[2])),
            slice_direction=(float(normal[0]), float(normal[1]), float(normal[2])),
        )

    def _send(self, acquisition: _Acquisition, kind: UpdateKind, view: AcquisitionView) -> None:
        update = AcquisitionUpdate(
            kind=kind,
            view=view,
            new_images=tuple(acquisition.new_images),
            first_of_echo=tuple(acquisition.first_of_echo),
        )
        acquisition.new_images.clear()
        acquisition.first_of_echo.clear()
        self._emit(update)

    def _end(self, acquisition: _Acquisition, kind: UpdateKind, view: AcquisitionView) -> None:
        del self._open[acquisition.acquisition_id]
        self._ended[acquisition.acquisition_id] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        self._send(acquisition, kind, view)

    def _file(
        self,
        arrived: ArrivedFile,
        outcome: str,
        reason: str,
        acquisition_id: str | None,
        *,
        quiet: bool = False,
    ) -> None:
        if outcome in (FileOutcome.BAD, FileOutcome.SKIPPED):
            label = file_label(arrived.path)
            # A HeaderError's reason starts with the label already; other reasons get it in front.
            named = reason if reason.startswith(f"{label}: ") else f"{label}: {reason}"
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "file %s: %s",
                outcome,
                named,
                extra={
                    "event": LogEvent.FILE,
                    "stage": "assembler",
                    "outcome": str(outcome),
                    "file": label,
                    "acquisition_id": acquisition_id,
                },
            )
        if self._on_file is not None:
            self._on_file(arrived, outcome, reason, acquisition_id)


def _orthonormal(orientation: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column cosines made exactly orthonormal (headers round them), and their normal."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    row /= np.linalg.norm(row)
    column = np.asarray(orientation[3:6], dtype=np.float64)
    column -= row * float(row @ column)
    column /= np.linalg.norm(column)
    return row, column, np.cross(row, column)


def _positions(acquisition: _Acquisition) -> list[float]:
    return [r.position_mm for e in acquisition.echoes for r in e.images.values()]


def _on_grid(positions: list[float], origin_mm: float, spacing: float, count: int) -> bool:
    for p in positions:
        k = (p - origin_mm) / spacing
        if not math.isfinite(k) or abs(k - round(k)) > GRID_TOLERANCE_FRACTION or not 0 <= round(k) < count:
            return False
    return True


def _median_step(positions: list[float]) -> float | None:
    unique = sorted(set(round(p / POSITION_RESOLUTION_MM) for p in positions))
    if len(unique) < 2:
        return None
    return float(np.median(np.diff(unique))) * POSITION_RESOLUTION_MM


def _flags(image_type: tuple[str, ...]) -> tuple[str, ...]:
    flags = _FLAG_CACHE.get(image_type)
    if flags is None:
        if len(_FLAG_CACHE) >= _FLAG_CACHE_SIZE:
            _FLAG_CACHE.clear()
        flags = _FLAG_CACHE[image_type] = image_flags(image_type)
    return flags


#: ImageType tuples repeat for every image of a series: their flags are computed once (bounded, so that a
#: stream of corrupt headers cannot grow it).
_FLAG_CACHE: dict[tuple[str, ...], tuple[str, ...]] = {}
_FLAG_CACHE_SIZE = 256


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b
