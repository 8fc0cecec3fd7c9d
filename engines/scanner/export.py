"""``sct-agent simulate``: simulate a phantom case and export it the way a scanner would.

Two steps with separate inputs. A :class:`SimulationRequest` (seed, echoes, protocol deviations, FOV) decides
the acquisition and therefore the pixels; :class:`ExportOptions` decide only how the result reaches the folder
(format, order, pace, write style, lost or broken files). Keeping them apart lets a test export one simulated
case in several ways and compare what an ingester sees.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import partial
from pathlib import Path

from pydicom.dataset import Dataset

from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition
from engines.phantom.case import PhantomCase
from engines.phantom.generate import DEFAULT_SUPERSAMPLE, generate_case
from engines.phantom.pathology import Pathology, parse_pathologies
from engines.scanner.common import SeriesContext, StudyContext, encode, plan_study
from engines.scanner.ct_series import CT_SERIES_DESCRIPTION, CtSeries
from engines.scanner.deviations import apply_settings, is_echo_time_key, parse_setting
from engines.scanner.equipment import philips_mr, siemens_ct, siemens_mr
from engines.scanner.mr_classic import ClassicMrSeries, siemens_protocol_name
from engines.scanner.mr_enhanced import (
    build_enhanced_mr,
    enhanced_file_name,
    frame_order,
    philips_protocol_name,
)
from engines.scanner.uids import UidSource
from engines.scanner.writer import (
    SLOW_WRITE_CHUNKS,
    SLOW_WRITE_PAUSE_S,
    WriteStyle,
    fsync_directory,
    write_file,
)

logger = logging.getLogger(__name__)

#: Series numbers as the consoles assign them: Siemens counts series (localisers and a T2 came first), Philips
#: multiplies by 100 and adds the reconstruction number, and the reference CT gets a number far from both.
SIEMENS_SERIES_NUMBER = 5
PHILIPS_SERIES_NUMBER = 501
CT_SERIES_NUMBER = 90
#: A file cut short by ``--truncate-one`` keeps its header and this fraction of its pixel data: the header
#: parses, the pixels end early, which is what a transfer broken mid-file leaves behind (pixel data is most of
#: the file, so this is also about this fraction of its bytes).
TRUNCATE_KEEP_FRACTION = 0.6


class OutputFormat(StrEnum):
    """Classic single-frame files (Siemens-like) or one Enhanced multi-frame object (Philips-like)."""

    CLASSIC = "classic"
    ENHANCED = "enhanced"


class EmissionOrder(StrEnum):
    """Order images leave the reconstructor: all echoes of a slice together, or one echo after the other."""

    SLICE = "slice"
    ECHO = "echo"


@dataclass(frozen=True, slots=True)
class SimulationRequest:
    """What to simulate: the seed protocol changed by FOV, voxel size, echo count and ``KEY=VALUE``s, and the
    subject's pathology (docs/phantom.md, Pathology), which changes the pixels but no header."""

    seed: int
    echoes: int | None = None
    settings: tuple[str, ...] = ()
    fov_mm: tuple[float, float, float] | None = None
    voxel_mm: tuple[float, float, float] | None = None
    supersample: int = DEFAULT_SUPERSAMPLE
    base: Acquisition = SEED_PROTOCOL
    pathologies: tuple[Pathology, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pathologies", parse_pathologies(self.pathologies))
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer; found {self.seed}")
        if self.echoes is not None and self.echoes < 1:
            raise ValueError(f"--echoes must be at least 1; found {self.echoes}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be at least 1; found {self.supersample}")

    def acquisition(self) -> Acquisition:
        """The acquisition to simulate.

        Order matters: settings other than echo times first (a longer TR makes room for more echoes), then the
        echo count, then ``EchoTimeN`` settings (``EchoTime3`` needs ``--echoes 3``).
        """
        acquisition = self.base
        geometry_changes: dict[str, tuple[float, float, float]] = {}
        if self.fov_mm is not None:
            geometry_changes["fov_mm"] = self.fov_mm
        if self.voxel_mm is not None:
            geometry_changes["voxel_mm"] = self.voxel_mm
        if geometry_changes:
            acquisition = acquisition.with_changes(**geometry_changes)
        settings = [parse_setting(text) for text in self.settings]
        echo_settings = [s for s in settings if is_echo_time_key(s.keyword)]
        acquisition = apply_settings(acquisition, [s for s in settings if not is_echo_time_key(s.keyword)])
        if self.echoes is not None:
            acquisition = acquisition.with_changes(echo_times_ms=echo_times_for(acquisition, self.echoes))
        return apply_settings(acquisition, echo_settings)


def echo_times_for(acquisition: Acquisition, count: int) -> tuple[float, ...]:
    """``count`` echo times: the protocol's own first, then more at the protocol's echo spacing.

    The seed protocol's spacing (2.1 ms) puts successive echoes alternately out of and in phase at 1.5 T.
    Echoes that would not fit before TR are refused.
    """
    times = list(acquisition.echo_times_ms[:count])
    spacing = (
        acquisition.echo_times_ms[1] - acquisition.echo_times_ms[0]
        if len(acquisition.echo_times_ms) > 1
        else acquisition.echo_times_ms[0]
    )
    while len(times) < count:
        times.append(round(times[-1] + spacing, 6))
    if times[-1] >= acquisition.repetition_time_ms:
        fitting = 1 + int((acquisition.repetition_time_ms - times[0]) / spacing - 1e-9)
        raise ValueError(
            f"--echoes {count}: echo {count} at {times[-1]:g} ms does not fit before RepetitionTime "
            f"{acquisition.repetition_time_ms:g} ms; expected at most {fitting} echoes (or a longer TR)"
        )
    return tuple(times)


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """How a simulated case is exported."""

    out_dir: Path
    format: OutputFormat = OutputFormat.CLASSIC
    #: Files per second; ``None`` writes as fast as possible.
    rate_files_per_s: float | None = None
    order: EmissionOrder = EmissionOrder.SLICE
    write_style: WriteStyle = WriteStyle.ATOMIC
    #: 0-based slice indices whose images (all echoes) are never written.
    drop_slices: tuple[int, ...] = ()
    #: Cut one file short (the middle one of the stream; the only one for Enhanced).
    truncate_one: bool = False
    #: Also write the reference CT series here (atomically, unpaced).
    ct_dir: Path | None = None
    #: Derive UIDs and timestamps from the case so that the same inputs give byte-identical files.
    deterministic_uids: bool = False

    def __post_init__(self) -> None:
        if self.rate_files_per_s is not None and not self.rate_files_per_s > 0:
            raise ValueError(
                f"--rate must be a positive number of files per second; found {self.rate_files_per_s}"
            )
        if any(k < 0 for k in self.drop_slices):
            raise ValueError(
                f"--drop-slices takes 0-based slice indices >= 0; found {list(self.drop_slices)}"
            )


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote. ``paths`` are the MR files in the order they were written; ``seconds`` is the MR
    export's wall time (planning, encoding, pacing, writing), ``ct_seconds`` the reference CT's."""

    out_dir: Path
    format: OutputFormat
    paths: tuple[Path, ...]
    file_count: int
    total_bytes: int
    images: int
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    seconds: float
    truncated_path: Path | None = None
    dropped_slices: tuple[int, ...] = ()
    ct_paths: tuple[Path, ...] = ()
    ct_bytes: int = 0
    ct_series_instance_uid: str | None = None
    ct_seconds: float = 0.0
    simulation_seconds: float = 0.0
    shape: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))
    #: Pathology in the exported pixels (none in the headers).
    pathologies: tuple[Pathology, ...] = ()


@dataclass(frozen=True, slots=True)
class _PlannedFile:
    name: str
    build: Callable[[], Dataset]


def check_request(request: SimulationRequest, options: ExportOptions) -> Acquisition:
    """The acquisition to simulate, after every check that needs no simulation (bad input fails in ms)."""
    acquisition = request.acquisition()
    _check_drop_slices(options.drop_slices, acquisition.matrix[0])
    return acquisition


def _check_drop_slices(drop_slices: Sequence[int], n_slices: int) -> None:
    dropped = sorted(set(drop_slices))
    if dropped and dropped[-1] >= n_slices:
        raise ValueError(
            f"--drop-slices: slice {dropped[-1]} does not exist; the series has slices 0..{n_slices - 1}"
        )
    if len(dropped) == n_slices:
        raise ValueError(f"--drop-slices would drop all {n_slices} slices; nothing would be exported")


def simulate(request: SimulationRequest, options: ExportOptions) -> ExportSummary:
    """Simulate the requested case and export it (``simulation_seconds`` is the phantom's share)."""
    acquisition = check_request(request, options)
    started = time.perf_counter()
    case = generate_case(
        request.seed, acquisition, supersample=request.supersample, pathologies=request.pathologies
    )
    simulation_seconds = time.perf_counter() - started
    return replace(export_case(case, options), simulation_seconds=simulation_seconds)


def export_case(case: PhantomCase, options: ExportOptions) -> ExportSummary:
    """Export an already simulated case; its acquisition (and header overrides) decide the headers."""
    n_echoes, n_slices = case.echoes.shape[0], case.echoes.shape[1]
    _check_drop_slices(options.drop_slices, n_slices)
    dropped = tuple(sorted(set(options.drop_slices)))

    started = time.perf_counter()
    uids = UidSource(run_key=_run_key(case, options.format) if options.deterministic_uids else None)
    study = plan_study(case, uids)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    if options.format is OutputFormat.CLASSIC:
        series, planned = _plan_classic(case, study, uids, options, dropped)
    else:
        series, planned = _plan_enhanced(case, study, uids, options, dropped)

    truncate_index = len(planned) // 2 if options.truncate_one else None
    written = _emit(planned, options.out_dir, options.write_style, options.rate_files_per_s, truncate_index)
    seconds = time.perf_counter() - started

    ct_started = time.perf_counter()
    ct_written: list[tuple[Path, int]] = []
    ct_series_uid: str | None = None
    if options.ct_dir is not None:
        ct_series = _ct_series_context(case, uids)
        ct_series_uid = ct_series.series_instance_uid
        ct_plan = CtSeries.plan(case, study, ct_series, uids)
        options.ct_dir.mkdir(parents=True, exist_ok=True)
        ct_files = [_PlannedFile(ct_plan.file_name(k), partial(ct_plan.dataset, k)) for k in range(n_slices)]
        ct_written = _emit(ct_files, options.ct_dir, WriteStyle.ATOMIC, None, None)
    ct_seconds = time.perf_counter() - ct_started
    paths = tuple(path for path, _ in written)
    summary = ExportSummary(
        out_dir=options.out_dir,
        format=options.format,
        paths=paths,
        file_count=len(paths),
        total_bytes=sum(size for _, size in written),
        images=(n_slices - len(dropped)) * n_echoes,
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        frame_of_reference_uid=study.frame_of_reference_uid,
        seconds=seconds,
        truncated_path=paths[truncate_index] if truncate_index is not None else None,
        dropped_slices=dropped,
        ct_paths=tuple(path for path, _ in ct_written),
        ct_bytes=sum(size for _, size in ct_written),
        ct_series_instance_uid=ct_series_uid,
        ct_seconds=ct_seconds,
        shape=(n_echoes, *case.geometry.shape),
        pathologies=case.pathologies,
    )
    logger.info(
        "simulated export: %s, %d files, %d bytes, %d of %d slices x %d echoes, %.2f s",
        options.format.value,
        summary.file_count,
        summary.total_bytes,
        n_slices - len(dropped),
        n_slices,
        n_echoes,
        seconds,
    )
    return summary


def _run_key(case: PhantomCase, output_format: OutputFormat) -> str:
    """Names the exported content: same seed, acquisition, pixels and format give the same UIDs."""
    digest = hashlib.sha256()
    digest.update(repr(case.acquisition).encode())
    digest.update(case.echoes.tobytes())
    digest.update(case.ct_hu.tobytes())
    return f"sct-sim/seed={case.seed}/{output_format.value}/{digest.hexdigest()[:32]}"


def _plan_classic(
    case: PhantomCase, study: StudyContext, uids: UidSource, options: ExportOptions, dropped: Sequence[int]
) -> tuple[SeriesContext, list[_PlannedFile]]:
    """InstanceNumber and ContentTime follow the emission order; dropped slices keep their numbers unused."""
    name = siemens_protocol_name(case.acquisition)
    series = SeriesContext(
        series_instance_uid=uids.uid("series", "mr"),
        series_number=SIEMENS_SERIES_NUMBER,
        series_description=name,
        protocol_name=name,
        equipment=siemens_mr(case.acquisition, case.seed),
    )
    plan = ClassicMrSeries.plan(case, study, series, uids)
    n_echoes, n_slices = case.echoes.shape[0], case.echoes.shape[1]
    order = frame_order(n_slices, n_echoes, echo_major=options.order is EmissionOrder.ECHO)
    skip = set(dropped)
    planned = []
    for emission_index, (slice_index, echo_index) in enumerate(order):
        if slice_index in skip:
            continue
        instance_number = emission_index + 1
        build = partial(plan.dataset, slice_index, echo_index, instance_number=instance_number,
                        emission_index=emission_index)  # fmt: skip
        planned.append(_PlannedFile(plan.file_name(instance_number), build))
    return series, planned


def _plan_enhanced(
    case: PhantomCase, study: StudyContext, uids: UidSource, options: ExportOptions, dropped: Sequence[int]
) -> tuple[SeriesContext, list[_PlannedFile]]:
    """One object; frames in emission order, dropped slices absent from it."""
    name = philips_protocol_name(case.acquisition)
    series = SeriesContext(
        series_instance_uid=uids.uid("series", "mr"),
        series_number=PHILIPS_SERIES_NUMBER,
        series_description=name,
        protocol_name=name,
        equipment=philips_mr(case.acquisition, case.seed),
    )
    n_echoes, n_slices = case.echoes.shape[0], case.echoes.shape[1]
    skip = set(dropped)
    frames = [
        (k, e)
        for k, e in frame_order(n_slices, n_echoes, echo_major=options.order is EmissionOrder.ECHO)
        if k not in skip
    ]
    build = partial(build_enhanced_mr, case, study, series, uids, frames)
    planned = [_PlannedFile(enhanced_file_name(series.series_number), build)]
    return series, planned


def _ct_series_context(case: PhantomCase, uids: UidSource) -> SeriesContext:
    return SeriesContext(
        series_instance_uid=uids.uid("series", "ct"),
        series_number=CT_SERIES_NUMBER,
        series_description=CT_SERIES_DESCRIPTION,
        protocol_name="LWS sCT reference (simulated)",
        equipment=siemens_ct(case.seed),
    )


def _truncated(data: bytes, pixel_bytes: int) -> bytes:
    """The file cut inside its pixel data, which is the last element of every object the simulator writes."""
    header_bytes = len(data) - pixel_bytes
    return data[: header_bytes + int(pixel_bytes * TRUNCATE_KEEP_FRACTION)]


def _emit(
    planned: Sequence[_PlannedFile],
    directory: Path,
    style: WriteStyle,
    rate_files_per_s: float | None,
    truncate_index: int | None,
) -> list[tuple[Path, int]]:
    """Build, encode and write each file at the requested pace; returns (path, bytes written) per file."""
    slow_pause = SLOW_WRITE_PAUSE_S
    if rate_files_per_s is not None:
        slow_pause = min(SLOW_WRITE_PAUSE_S, 1.0 / (rate_files_per_s * SLOW_WRITE_CHUNKS))
    written: list[tuple[Path, int]] = []
    start = time.monotonic()
    for index, planned_file in enumerate(planned):
        if rate_files_per_s is not None:
            delay = start + index / rate_files_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        dataset = planned_file.build()
        data = encode(dataset)
        if index == truncate_index:
            data = _truncated(data, len(dataset.PixelData))
        path = directory / planned_file.name
        write_file(path, data, style, slow_pause_s=slow_pause)
        written.append((path, len(data)))
    if style is WriteStyle.ATOMIC:
        fsync_directory(directory)
    return written
