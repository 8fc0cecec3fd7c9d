"""Read what the simulator wrote back into arrays, geometry and acquisition parameters.

This is the simulator's own check that its files say what was simulated (tests compare the readback with the
:class:`PhantomCase`), and the demo's way to picture an export. It reads only the forms the simulator writes,
but reads them from the DICOM attributes alone, the way an independent reader must: echoes are told apart by
echo time, slices are ordered by position along the slice normal, and Enhanced functional groups are looked up
per frame first, then in the shared groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, MRImageStorage

from sct_core.geometry import VolumeGeometry

#: Echo times closer than this (ms) belong to the same echo.
ECHO_TIME_TOLERANCE_MS = 0.01
#: Slice positions may deviate from a uniform grid by this much (mm) before the series counts as irregular.
SLICE_POSITION_TOLERANCE_MM = 1e-3
#: Slices of different echoes must lie this close (mm) to count as the same slice.
SAME_POSITION_TOLERANCE_MM = 1e-3


@dataclass(frozen=True, slots=True)
class AcquisitionAttributes:
    """Vendor-neutral acquisition parameters as the headers state them."""

    manufacturer: str
    model_name: str
    repetition_time_ms: float
    flip_angle_deg: float
    pixel_bandwidth_hz: float
    magnetic_field_strength_t: float
    imaging_frequency_mhz: float
    mr_acquisition_type: str
    #: Siemens SequenceName (``*fl3d2``) or Philips PulseSequenceName (``T1FFE``).
    sequence_name: str
    #: ScanningSequence contains GR (classic) or EchoPulseSequence is GRADIENT/BOTH (Enhanced).
    gradient_echo: bool
    #: SequenceVariant contains SP (classic) or Spoiling is RF/RF_AND_GRADIENT (Enhanced).
    rf_spoiled: bool


@dataclass(frozen=True, slots=True, eq=False)
class MrReadback:
    """An MR series as read back: ``echoes`` is ``[echo, slice, row, column]``, echoes by increasing TE."""

    form: str  # "classic" or "enhanced"
    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    geometry: VolumeGeometry
    echo_times_ms: tuple[float, ...]
    echoes: npt.NDArray[np.uint16]
    attributes: AcquisitionAttributes


@dataclass(frozen=True, slots=True, eq=False)
class CtReadback:
    """A CT series as read back, in Hounsfield units."""

    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    geometry: VolumeGeometry
    hu: npt.NDArray[np.int16]


@dataclass(frozen=True, slots=True, eq=False)
class _Frame:
    echo_time_ms: float
    position: npt.NDArray[np.float64]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    pixels: npt.NDArray[np.uint16] | npt.NDArray[np.int16]


def read_mr_series(folder: Path) -> MrReadback:
    """Read the one MR series in ``folder`` (classic files or one Enhanced object)."""
    datasets = [
        (path, ds)
        for path, ds in _read_folder(folder)
        if ds.SOPClassUID in (MRImageStorage, EnhancedMRImageStorage)
    ]
    if not datasets:
        raise ValueError(f"{folder}: no MR Image or Enhanced MR Image files")
    series = {str(ds.SeriesInstanceUID) for _, ds in datasets}
    if len(series) != 1:
        raise ValueError(f"{folder}: expected one MR series; found {len(series)}")
    files = tuple(path for path, _ in datasets)
    first = datasets[0][1]
    if first.SOPClassUID == EnhancedMRImageStorage:
        if len(datasets) != 1:
            raise ValueError(f"{folder}: expected one Enhanced MR object; found {len(datasets)}")
        frames = _enhanced_frames(files[0], first)
        attributes = _enhanced_attributes(first)
        form = "enhanced"
    else:
        frames = [_classic_frame(path, ds) for path, ds in datasets]
        attributes = _classic_attributes(first)
        form = "classic"
    geometry, echo_times, echoes = _assemble(frames, folder, _header_slice_spacing(first))
    return MrReadback(
        form=form,
        files=files,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        geometry=geometry,
        echo_times_ms=echo_times,
        echoes=echoes.astype(np.uint16, copy=False),
        attributes=attributes,
    )


def read_ct_series(folder: Path) -> CtReadback:
    """Read the CT series in ``folder`` into int16 HU on its grid."""
    datasets = [(path, ds) for path, ds in _read_folder(folder) if ds.SOPClassUID == CTImageStorage]
    if not datasets:
        raise ValueError(f"{folder}: no CT Image files")
    frames = []
    for path, ds in datasets:
        stored = _frame_pixels(path, ds, 1)[0]
        hu = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        int16 = np.iinfo(np.int16)
        if not np.array_equal(hu, np.round(hu)) or hu.min() < int16.min or hu.max() > int16.max:
            raise ValueError(f"{path}: rescaled CT values are not int16 Hounsfield units")
        frames.append(
            _Frame(
                echo_time_ms=0.0,
                position=np.asarray([float(v) for v in ds.ImagePositionPatient]),
                orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                pixel_spacing=_spacing(ds.PixelSpacing),
                pixels=hu.astype(np.int16),
            )
        )
    first = datasets[0][1]
    geometry, _, volume = _assemble(frames, folder, _header_slice_spacing(first))
    return CtReadback(
        files=tuple(path for path, _ in datasets),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        geometry=geometry,
        hu=volume[0].astype(np.int16, copy=False),
    )


def _read_folder(folder: Path) -> list[tuple[Path, Dataset]]:
    """Every DICOM file in ``folder`` (not hidden, not recursive), by name; other files are ignored."""
    result: list[tuple[Path, Dataset]] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            continue
        result.append((path, ds))
    return result


def _frame_pixels(path: Path, ds: Dataset, frames: int) -> npt.NDArray[np.uint16]:
    """Raw unsigned 16-bit pixels ``[frame, row, column]``; short PixelData (broken transfer) is an error."""
    if int(ds.BitsAllocated) != 16 or int(ds.PixelRepresentation) != 0 or int(ds.SamplesPerPixel) != 1:
        raise ValueError(f"{path}: expected unsigned 16-bit monochrome pixels")
    rows, columns = int(ds.Rows), int(ds.Columns)
    expected = frames * rows * columns * 2
    data = ds.get("PixelData")
    if data is None or len(data) < expected:
        found = 0 if data is None else len(data)
        raise ValueError(f"{path}: pixel data holds {found} bytes; expected {expected} (file truncated?)")
    return np.frombuffer(data, dtype="<u2", count=frames * rows * columns).reshape(frames, rows, columns)


def _header_slice_spacing(ds: Dataset) -> float:
    """Slice spacing a header states, for a single-slice series where positions cannot tell it."""
    holder = ds
    if "SharedFunctionalGroupsSequence" in ds:
        holder = _macro(ds, 0, "PixelMeasuresSequence")
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if holder.get(keyword) not in (None, ""):
            return float(holder.get(keyword))
    return 1.0


def _spacing(value: Sequence[Any]) -> tuple[float, float]:
    return (float(value[0]), float(value[1]))


def _classic_frame(path: Path, ds: Dataset) -> _Frame:
    return _Frame(
        echo_time_ms=float(ds.EchoTime),
        position=np.asarray([float(v) for v in ds.ImagePositionPatient]),
        orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
        pixel_spacing=_spacing(ds.PixelSpacing),
        pixels=_frame_pixels(path, ds, 1)[0],
    )


def _macro(ds: Dataset, frame_index: int, keyword: str) -> Dataset:
    """The item of functional-group macro ``keyword`` for one frame: per-frame first, then shared."""
    per_frame = ds.PerFrameFunctionalGroupsSequence[frame_index]
    if keyword in per_frame:
        item: Dataset = per_frame[keyword].value[0]
        return item
    shared = ds.SharedFunctionalGroupsSequence[0]
    if keyword in shared:
        shared_item: Dataset = shared[keyword].value[0]
        return shared_item
    raise ValueError(f"frame {frame_index + 1}: functional group {keyword} is neither per-frame nor shared")


def _enhanced_frames(path: Path, ds: Dataset) -> list[_Frame]:
    n_frames = int(ds.NumberOfFrames)
    pixels = _frame_pixels(path, ds, n_frames)
    frames = []
    for i in range(n_frames):
        frames.append(
            _Frame(
                echo_time_ms=float(_macro(ds, i, "MREchoSequence").EffectiveEchoTime),
                position=np.asarray(
                    [float(v) for v in _macro(ds, i, "PlanePositionSequence").ImagePositionPatient]
                ),
                orientation=tuple(
                    float(v) for v in _macro(ds, i, "PlaneOrientationSequence").ImageOrientationPatient
                ),
                pixel_spacing=_spacing(_macro(ds, i, "PixelMeasuresSequence").PixelSpacing),
                pixels=pixels[i],
            )
        )
    return frames


def _tokens(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {value}
    return {str(v) for v in value}


def _classic_attributes(ds: Dataset) -> AcquisitionAttributes:
    return AcquisitionAttributes(
        manufacturer=str(ds.Manufacturer),
        model_name=str(ds.ManufacturerModelName),
        repetition_time_ms=float(ds.RepetitionTime),
        flip_angle_deg=float(ds.FlipAngle),
        pixel_bandwidth_hz=float(ds.PixelBandwidth),
        magnetic_field_strength_t=float(ds.MagneticFieldStrength),
        imaging_frequency_mhz=float(ds.ImagingFrequency),
        mr_acquisition_type=str(ds.get("MRAcquisitionType", "")),
        sequence_name=str(ds.get("SequenceName", "")),
        gradient_echo="GR" in _tokens(ds.get("ScanningSequence")),
        rf_spoiled="SP" in _tokens(ds.get("SequenceVariant")),
    )


def _enhanced_attributes(ds: Dataset) -> AcquisitionAttributes:
    timing = _macro(ds, 0, "MRTimingAndRelatedParametersSequence")
    imaging = _macro(ds, 0, "MRImagingModifierSequence")
    modifier = _macro(ds, 0, "MRModifierSequence")
    return AcquisitionAttributes(
        manufacturer=str(ds.Manufacturer),
        model_name=str(ds.ManufacturerModelName),
        repetition_time_ms=float(timing.RepetitionTime),
        flip_angle_deg=float(timing.FlipAngle),
        pixel_bandwidth_hz=float(imaging.PixelBandwidth),
        magnetic_field_strength_t=float(ds.MagneticFieldStrength),
        imaging_frequency_mhz=float(imaging.TransmitterFrequency),
        mr_acquisition_type=str(ds.get("MRAcquisitionType", "")),
        sequence_name=str(ds.get("PulseSequenceName", "")),
        gradient_echo=str(ds.get("EchoPulseSequence", "")) in ("GRADIENT", "BOTH"),
        rf_spoiled=str(modifier.get("Spoiling", "")) in ("RF", "RF_AND_GRADIENT"),
    )


def _assemble(
    frames: Sequence[_Frame], source: Path, single_slice_spacing: float
) -> tuple[VolumeGeometry, tuple[float, ...], npt.NDArray[Any]]:
    """Group frames by echo time, order each echo's slices along the normal, and check the grid is regular."""
    orientation = np.asarray(frames[0].orientation)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    for frame in frames:
        if (
            not np.allclose(frame.orientation, orientation, atol=1e-6)
            or frame.pixel_spacing != frames[0].pixel_spacing
        ):
            raise ValueError(f"{source}: frames differ in orientation or pixel spacing")

    echo_times: list[float] = []
    groups: list[list[_Frame]] = []
    for frame in sorted(frames, key=lambda f: f.echo_time_ms):
        if echo_times and abs(frame.echo_time_ms - echo_times[-1]) <= ECHO_TIME_TOLERANCE_MS:
            groups[-1].append(frame)
        else:
            echo_times.append(frame.echo_time_ms)
            groups.append([frame])
    for group in groups:
        group.sort(key=lambda f: float(np.dot(f.position, normal)))

    n_slices = len(groups[0])
    reference = np.stack([f.position for f in groups[0]])
    for te, group in zip(echo_times, groups, strict=True):
        if len(group) != n_slices:
            raise ValueError(
                f"{source}: echo at TE {te:g} ms has {len(group)} slices; the first echo has {n_slices}"
            )
        positions = np.stack([f.position for f in group])
        if not np.allclose(positions, reference, atol=SAME_POSITION_TOLERANCE_MM, rtol=0.0):
            raise ValueError(
                f"{source}: echo at TE {te:g} ms has slices at other positions than the first echo"
            )

    if n_slices > 1:
        steps = np.diff(reference @ normal)
        spacing = float(np.mean(steps))
        expected = reference[0] + np.outer(np.arange(n_slices), normal * spacing)
        if spacing <= 0 or not np.allclose(reference, expected, atol=SLICE_POSITION_TOLERANCE_MM, rtol=0.0):
            raise ValueError(
                f"{source}: slice positions are not a regular grid along the normal (steps "
                f"{np.round(steps, 4).tolist()} mm); missing or duplicate slices?"
            )
    else:
        spacing = single_slice_spacing
    rows, columns = frames[0].pixels.shape
    geometry = VolumeGeometry(
        shape=(n_slices, int(rows), int(columns)),
        spacing=(spacing, *frames[0].pixel_spacing),
        origin=(float(reference[0][0]), float(reference[0][1]), float(reference[0][2])),
        row_direction=(float(row_direction[0]), float(row_direction[1]), float(row_direction[2])),
        column_direction=(float(column_direction[0]), float(column_direction[1]), float(column_direction[2])),
        slice_direction=(float(normal[0]), float(normal[1]), float(normal[2])),
    )
    volume = np.stack([np.stack([f.pixels for f in group]) for group in groups])
    return geometry, tuple(echo_times), volume
