"""Write a finished synthetic CT volume as a DICOM CT Image Storage series, atomically.

Navigation systems and PACS do not subscribe to our ZeroMQ stream: they import DICOM. The agent therefore
writes the sCT as an ordinary CT series in the MR's study and frame of reference, on exactly the MR's voxel
grid, so that a navigation system registers it to the patient the same way it registers the MR and a PACS files
it next to the MR. Because the images are computed, not acquired, every object says so where a person or a
program looks: ImageType ``DERIVED\\SECONDARY``, a SeriesDescription and ImageComments that say "SYNTHETIC" and
"NOT FOR DIAGNOSIS", a DerivationDescription naming the model, version and sequence protocol, a
SourceImageSequence naming every MR image each slice was computed from, and a ContributingEquipmentSequence
naming the model as the processing equipment.

The patient, study and frame-of-reference attributes are copied from one source MR header, after checking that
every source file belongs to the same study and frame of reference. Patient identity and UIDs go into the files
only: log lines and exception messages name the acquisition by its id and a source file by its label
(:func:`agent.file_labels.file_label`), never by a UID, a file name or anything about the patient.

A volume with regions its confidence says not to trust also gets a DICOM Segmentation of them
(:mod:`agent.dicom_out.untrusted_segmentation`), written in the same folder and the same atomic step, so the sCT
images are never on disk without the mark of where not to trust them.

A series is written into a hidden temporary folder inside ``out_folder``, every file and the folder are
fsynced, and only then is the folder renamed to its final name in one step, so that a reader (a DICOM sender,
a PACS import folder, a person) never sees a half-written series. On any failure the temporary folder is
removed and :class:`SctSeriesError` raised.

One module on purpose: every attribute the CT series carries is set here, in IOD order, so one read shows an
auditor (or dciodvfy's complaint) the whole object, and the atomic write beside it is what makes a partly
written series impossible.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from agent.dicom_out.untrusted_segmentation import SEGMENTATION_FILE, SERIES_NUMBER_OFFSET, segmentation_of
from agent.file_labels import file_label
from agent.records import ImageRef, SctVolume
from agent.vocabulary import LogEvent
from sct_core.errors import SctError
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: HU range a CT stores in 12 unsigned bits with RescaleIntercept -1024 (stored 0..4095). Values outside are
#: clipped and counted (:attr:`WrittenSeries.clipped_voxels`).
HU_MIN: Final = -1024
HU_MAX: Final = 3071
RESCALE_INTERCEPT: Final = -1024
BITS_STORED: Final = 12
#: Display presets (centre, width, explanation) in HU; the first is the one a viewer opens with. Bone first:
#: the series exists for navigated spine surgery.
WINDOWS: Final = ((450, 1500, "BONE"), (40, 400, "SOFT TISSUE"))

#: The safety marking every object carries (SeriesDescription is LO: at most 64 characters).
SERIES_DESCRIPTION: Final = "SYNTHETIC CT from MR - NOT FOR DIAGNOSIS"
MANUFACTURER: Final = "sct-edge-agent"
#: Identifies the software that wrote the files (PS3.7 Annex D.3.3.2). A ``2.25.<UUID>`` UID (PS3.5 §B.2),
#: which needs no registered organisation root; generated once for this writer and fixed forever.
IMPLEMENTATION_CLASS_UID: Final = "2.25.266879474893671165165777676910901426548"
#: A series folder name and its numbered variants ``-2`` ... ``-9999``.
_MAX_NAME_VARIANTS: Final = 10_000

#: DCM 121322, CID 7202: why each SourceImageSequence item is referenced.
SOURCE_IMAGE_PURPOSE: Final = ("121322", "DCM", "Source image for image processing operation")
#: DCM 109102, CID 7005. "Processing Equipment" is equipment that processed composite instances to create new
#: ones; "Modifying Equipment" (109103) is for equipment that changed existing instances without creating new
#: ones (a de-identifier, a tag-morphing router). The agent creates new instances with new SOP Instance UIDs
#: from the MR images, so it is processing equipment.
CONTRIBUTING_EQUIPMENT_PURPOSE: Final = ("109102", "DCM", "Processing Equipment")
#: No DCM code of CID 7203 (Image Derivation) describes "synthetic CT computed from MR by a learned model"
#: (the nearest, "Spatial resampling" or "Pixel by pixel ..." would mislead), so DerivationCodeSequence is left
#: out and the free-text DerivationDescription says what was done.

#: Patient and study attributes copied from the source MR header (absent type 2 attributes are written empty).
_COPIED_TYPE_2: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PositionReferenceIndicator",
    # General Series 2C: required for CT images without a Patient Orientation Code Sequence.
    "PatientPosition",
)
#: Copied only when the MR has them (type 3); IssuerOfPatientID keeps the PatientID unambiguous in a PACS.
_COPIED_IF_PRESENT: Final = (
    "SpecificCharacterSet",
    "IssuerOfPatientID",
    "StudyDescription",
    "BodyPartExamined",
)
#: Attributes read from every source file to check that it belongs with the others.
_CHECKED_TAGS: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "SeriesInstanceUID",
    "NumberOfFrames",
)
#: What is read from the one MR header the series copies from (top level only: an Enhanced object's functional
#: groups are skipped, not parsed).
_TEMPLATE_TAGS: Final = (*_CHECKED_TAGS, *_COPIED_TYPE_2, *_COPIED_IF_PRESENT, "SeriesNumber")
#: Longest LO value (PS3.5 Table 6.2-1); the model id and version go into LO attributes.
_LO_MAX: Final = 64
#: Longest DS value.
_DS_MAX: Final = 16
#: Direction cosines and positions closer to zero than this are written as 0 (float noise such as 1e-17).
_DS_ZERO: Final = 1e-10


class SctSeriesError(SctError):
    """The sCT series could not be written; nothing was left behind.

    ``attribute`` names the DICOM attribute (or "file", "hu", "sources", "out_folder"), ``found`` the value
    found and ``expected`` what was expected; ``file`` is the label of the source file concerned, or the
    name of the file being written, if any; ``errno`` the operating system's error number when writing failed
    (``errno.ENOSPC``: the disk is full). No patient identity, UID or source file name is ever part of the
    message.
    """

    def __init__(
        self, attribute: str, found: str, expected: str, *, file: str | None = None, errno: int | None = None
    ) -> None:
        self.file = file
        self.errno = errno
        where = f"{file}: " if file else ""
        super().__init__(
            f"{where}{attribute}: found {found}; expected {expected}",
            attribute=attribute,
            found=found,
            expected=expected,
        )


@dataclass(frozen=True, slots=True)
class WrittenSeries:
    """A series on disk under its final name."""

    #: The final folder holding the series.
    folder: Path
    #: One file per slice, slice order.
    files: tuple[Path, ...]
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    #: Voxels whose HU lay outside [HU_MIN, HU_MAX] and were clipped (should be 0).
    clipped_voxels: int
    seconds: float
    #: The series was already complete on disk (written before a restart) and was not written again.
    reused: bool = False
    #: The DICOM Segmentation of the regions not to trust, in the same folder; None when none was flagged.
    segmentation: Path | None = None

    @property
    def all_files(self) -> tuple[Path, ...]:
        """Every file of the folder, what C-STORE sends: the CT images, then the Segmentation if any."""
        return self.files if self.segmentation is None else (*self.files, self.segmentation)


@dataclass(frozen=True, slots=True)
class _SourceFile:
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def agent_version() -> str:
    """The installed package version (General Equipment SoftwareVersions)."""
    try:
        return importlib.metadata.version("sct-edge-agent")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def write_sct_series(
    volume: SctVolume,
    out_folder: Path,
    *,
    series_number_offset: int = 1000,
    institution: str | None = None,
) -> WrittenSeries:
    """Write ``volume`` as a CT Image Storage series in a new folder inside ``out_folder``.

    The folder is named ``sct-<acquisition id (16 characters)>-<SeriesNumber>``. The Series and SOP Instance
    UIDs are derived from the acquisition, the model and the volume's sha256 (:func:`derived_uid`), so the same
    volume always makes the same series: if a complete series with this Series Instance UID is already in the
    folder (written before a crash that came before the journal heard of it), it is returned as it is
    (``reused``) instead of being written twice. If the name is taken by another series (another volume of the
    same acquisition), the new one is not written over it: it gets the first free name among ``...-2``,
    ``...-3``, ..., so both series stay complete.
    SeriesNumber is the MR's SeriesNumber plus ``series_number_offset``; ``institution``, if given, is written
    as InstitutionName of the agent's equipment.

    Raises :class:`SctSeriesError` (and leaves nothing in ``out_folder``) when the volume and its sources do not
    agree, a source file cannot be read or belongs to another study or frame of reference, or writing fails.
    """
    started = time.perf_counter()
    geometry = volume.geometry
    _check_inputs(volume, institution)
    template, files = _read_sources(volume)
    stored, clipped = _stored_pixels(volume.hu)

    mr_series_number = _int_or_none(template.get("SeriesNumber"))
    series_number = (mr_series_number or 0) + series_number_offset
    series_uid = derived_uid(volume, "series")
    sop_uids = tuple(derived_uid(volume, f"instance {k}") for k in range(geometry.shape[0]))
    names = [f"CT{k + 1:04d}.dcm" for k in range(geometry.shape[0])]
    flagged = volume.flagged if volume.flagged is not None and volume.flagged.regions else None
    segmentation_name = SEGMENTATION_FILE if flagged is not None else None
    base = f"sct-{volume.acquisition_id[:16]}-{series_number}"
    existing = _written_before(out_folder, base, series_uid, [*names, *filter(None, [segmentation_name])])
    if existing is not None:
        logger.info(
            "sCT series for acquisition %s already complete in %s (written before a restart); not written again",
            volume.acquisition_id,
            existing.name,
        )
        return WrittenSeries(
            folder=existing,
            files=tuple(existing / name for name in names),
            series_instance_uid=series_uid,
            sop_instance_uids=sop_uids,
            clipped_voxels=clipped,
            seconds=time.perf_counter() - started,
            reused=True,
            segmentation=existing / segmentation_name if segmentation_name else None,
        )
    produced = datetime.fromtimestamp(volume.produced_at or time.time()).astimezone()
    shared = _series_dataset(volume, template, series_uid, series_number, produced, institution)

    try:
        out_folder.mkdir(parents=True, exist_ok=True)
        # Named by the acquisition, not the series UID: the name shows up in error messages and log lines.
        temp = out_folder / f".sct-{volume.acquisition_id[:16]}-{secrets.token_hex(4)}.partial"
        temp.mkdir()
    except OSError as error:
        raise SctSeriesError(
            "out_folder", _os_error(error, None), "a writable folder", errno=error.errno
        ) from error
    current = temp.name
    images: list[Dataset] = []
    try:
        for k, name in enumerate(names):
            ds = _slice_dataset(shared, geometry, k, sop_uids[k], stored[k], volume.sources[k], files)
            current = name
            _write_dataset(ds, temp / name)
            del ds.PixelData  # the Segmentation needs the images' attributes, not their pixels
            images.append(ds)
        if flagged is not None and segmentation_name is not None:
            current = segmentation_name
            _write_dataset(
                segmentation_of(
                    volume,
                    flagged,
                    images,
                    series_uid=derived_uid(volume, "segmentation series"),
                    instance_uid=derived_uid(volume, "segmentation instance"),
                    series_number=series_number + SERIES_NUMBER_OFFSET,
                    software_version=agent_version(),
                    produced=produced,
                ),
                temp / segmentation_name,
            )
        current = temp.name
        _fsync_directory(temp)
        final = _rename_free(temp, out_folder, base)
        _fsync_directory(out_folder)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, SctSeriesError):
            raise
        if isinstance(error, OSError):
            raise SctSeriesError(
                "file", _os_error(error, current), "the series written to disk", errno=error.errno
            ) from error
        if isinstance(error, Exception):
            # Only the type: an encoder's message may quote the value it refused, a patient's name or a UID.
            raise SctSeriesError(
                "file", f"{type(error).__name__} while encoding {current}", "the series written to disk"
            ) from error
        raise

    seconds = time.perf_counter() - started
    if clipped:
        logger.warning(
            "sCT series for acquisition %s: %d voxels outside [%d, %d] HU were clipped",
            volume.acquisition_id,
            clipped,
            HU_MIN,
            HU_MAX,
            extra={"event": LogEvent.DICOM, "stage": "dicom", "acquisition_id": volume.acquisition_id},
        )
    logger.info(
        "sCT series written: acquisition %s, folder %s, %d slices, series number %d, %.2f s",
        volume.acquisition_id,
        final.name,
        len(names),
        series_number,
        seconds,
        extra={"event": LogEvent.DICOM, "stage": "dicom", "acquisition_id": volume.acquisition_id},
    )
    return WrittenSeries(
        folder=final,
        files=tuple(final / name for name in names),
        series_instance_uid=series_uid,
        sop_instance_uids=sop_uids,
        clipped_voxels=clipped,
        seconds=seconds,
        segmentation=final / segmentation_name if segmentation_name else None,
    )


def _write_dataset(ds: Dataset, path: Path) -> None:
    """Encoded in memory first, so that an I/O error is the operating system's, not wrapped by pydicom; then
    written to a new file and fsynced."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with path.open("xb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------- checks


def _check_inputs(volume: SctVolume, institution: str | None) -> None:
    shape = volume.geometry.shape
    if volume.hu.shape != shape:
        raise SctSeriesError("hu", f"shape {volume.hu.shape}", f"the grid's shape {shape}")
    if not np.issubdtype(volume.hu.dtype, np.integer):
        raise SctSeriesError("hu", f"dtype {volume.hu.dtype}", "integer HU (int16)")
    if len(volume.sources) != shape[0]:
        raise SctSeriesError(
            "sources", f"{len(volume.sources)} slices", f"one entry per slice of the grid ({shape[0]})"
        )
    echoes = {len(refs) for refs in volume.sources}
    if len(echoes) != 1 or 0 in echoes:
        raise SctSeriesError(
            "sources", f"slices with {sorted(echoes)} images", "the same number (>= 1) for every slice"
        )
    for keyword, value in (("model_id", volume.model_id), ("model_version", volume.model_version)):
        if not value or len(value) > _LO_MAX:
            raise SctSeriesError(keyword, repr(value), f"1 to {_LO_MAX} characters")
    if institution is not None and len(institution) > _LO_MAX:
        raise SctSeriesError("InstitutionName", f"{len(institution)} characters", f"at most {_LO_MAX}")


def _read_sources(volume: SctVolume) -> tuple[Dataset, dict[Path, _SourceFile]]:
    """The template header (first image of the first slice) and the checked identity of every source file."""
    refs = [ref for refs in volume.sources for ref in refs]
    template_path = refs[0].path
    template = _read(template_path, _TEMPLATE_TAGS)
    study_uid = _required_uid(template, "StudyInstanceUID", template_path)
    for_uid = _required_uid(template, "FrameOfReferenceUID", template_path)

    files: dict[Path, _SourceFile] = {}
    frames: dict[Path, int | None] = {}
    for path in dict.fromkeys(ref.path for ref in refs):
        ds = template if path == template_path else _read(path, _CHECKED_TAGS)
        for keyword, expected in (("StudyInstanceUID", study_uid), ("FrameOfReferenceUID", for_uid)):
            found = _required_uid(ds, keyword, path)
            if found != expected:
                wanted = f"the {keyword} of {file_label(template_path)} (one study and frame of reference)"
                raise SctSeriesError(keyword, "a different UID", wanted, file=file_label(path))
        files[path] = _SourceFile(
            sop_class_uid=_required_uid(ds, "SOPClassUID", path),
            sop_instance_uid=_required_uid(ds, "SOPInstanceUID", path),
            series_instance_uid=_required_uid(ds, "SeriesInstanceUID", path),
        )
        frames[path] = _int_or_none(ds.get("NumberOfFrames"))

    for ref in refs:
        source = files[ref.path]
        key_uid = ref.instance_key.split("#", 1)[0]
        if key_uid != source.sop_instance_uid:
            raise SctSeriesError(
                "SOPInstanceUID",
                "another instance's UID",
                "the instance the image reference names (file replaced?)",
                file=file_label(ref.path),
            )
        n_frames = frames[ref.path]
        if ref.frame is not None and not (n_frames is not None and 0 <= ref.frame < n_frames):
            raise SctSeriesError(
                "NumberOfFrames",
                "(absent)" if n_frames is None else str(n_frames),
                f"a multi-frame object holding frame index {ref.frame}",
                file=file_label(ref.path),
            )
    return template, files


def _read(path: Path, tags: Sequence[str]) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
    except FileNotFoundError as error:
        raise SctSeriesError(
            "file", "(missing)", "the source MR image file", file=file_label(path)
        ) from error
    except Exception as error:  # pydicom fails in many ways on a damaged file (warnings too, under "error")
        raise SctSeriesError(
            "file", f"unreadable ({type(error).__name__})", "a readable DICOM file", file=file_label(path)
        ) from error


def _required_uid(ds: Dataset, keyword: str, path: Path) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise SctSeriesError(keyword, "(absent)", "a UID", file=file_label(path))
    return value


# -------------------------------------------------------------------------------------------- datasets


def _stored_pixels(hu: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint16], int]:
    wide = hu.astype(np.int32, copy=False)
    clipped = int(np.count_nonzero((wide < HU_MIN) | (wide > HU_MAX)))
    stored = (np.clip(wide, HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype("<u2")
    return stored, clipped


def _series_dataset(
    volume: SctVolume,
    template: Dataset,
    series_uid: str,
    series_number: int,
    produced: datetime,
    institution: str | None,
) -> Dataset:
    """Everything that is the same for every slice."""
    version = agent_version()
    ds = Dataset()
    for keyword in _COPIED_IF_PRESENT:
        if keyword in template:
            ds[keyword] = template[keyword]
    for keyword in _COPIED_TYPE_2:
        if keyword in template:
            ds[keyword] = template[keyword]
        else:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = template.StudyInstanceUID
    ds.FrameOfReferenceUID = template.FrameOfReferenceUID

    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = produced.strftime("%Y%m%d")
    ds.SeriesTime = produced.strftime("%H%M%S.%f")
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ContentDate = ds.SeriesDate
    ds.ContentTime = ds.SeriesTime

    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = version
    if institution:
        ds.InstitutionName = institution

    # CT Image module: value 3 is required and is AXIAL or LOCALIZER; AXIAL means "a cross-sectional image"
    # (as opposed to a scout), whatever the slice orientation, so a sagittal sCT is AXIAL too.
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.ImageComments = (
        f"SYNTHETIC CT computed from MR by model {volume.model_id} version {volume.model_version} "
        f"(sequence protocol {volume.protocol_id}). NOT FOR DIAGNOSIS."
    )
    ds.DerivationDescription = (
        f"Synthetic CT computed from the dual-echo MR images referenced in SourceImageSequence by the "
        f"deep-learning model {volume.model_id} version {volume.model_version} (sct-edge-agent {version}, "
        f"sequence protocol {volume.protocol_id}); not an X-ray acquisition"
    )
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionNumber = 1
    ds.KVP = ""

    equipment = Dataset()
    equipment.PurposeOfReferenceCodeSequence = DicomSequence([_code(*CONTRIBUTING_EQUIPMENT_PURPOSE)])
    equipment.Manufacturer = MANUFACTURER
    if institution:
        equipment.InstitutionName = institution
    equipment.ManufacturerModelName = volume.model_id
    equipment.SoftwareVersions = volume.model_version
    equipment.ContributionDateTime = produced.strftime("%Y%m%d%H%M%S.%f%z")
    equipment.ContributionDescription = (
        f"Synthetic CT inference from MR (sct-edge-agent {version}, sequence protocol {volume.protocol_id})"
    )
    ds.ContributingEquipmentSequence = DicomSequence([equipment])

    geometry = volume.geometry
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.image_orientation_patient]
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.SliceThickness = _ds(geometry.spacing[0])
    ds.SpacingBetweenSlices = _ds(geometry.spacing[0])

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.shape[1]
    ds.Columns = geometry.shape[2]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = [_ds(c) for c, _, _ in WINDOWS]
    ds.WindowWidth = [_ds(w) for _, w, _ in WINDOWS]
    ds.WindowCenterWidthExplanation = [name for _, _, name in WINDOWS]
    return ds


def _slice_dataset(
    shared: Dataset,
    geometry: VolumeGeometry,
    k: int,
    sop_uid: str,
    stored: npt.NDArray[np.uint16],
    refs: Sequence[ImageRef],
    files: dict[Path, _SourceFile],
) -> Dataset:
    now = datetime.now()
    ds = Dataset()
    ds.update(shared)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    ds.InstanceNumber = k + 1
    position = geometry.image_position_patient(k)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    normal = np.cross(geometry.row_direction, geometry.column_direction)
    ds.SliceLocation = _ds(float(np.dot(position, normal)))

    items = []
    for ref in refs:
        source = files[ref.path]
        item = Dataset()
        item.ReferencedSOPClassUID = source.sop_class_uid
        item.ReferencedSOPInstanceUID = source.sop_instance_uid
        if ref.frame is not None:
            item.ReferencedFrameNumber = ref.frame + 1
        item.PurposeOfReferenceCodeSequence = DicomSequence([_code(*SOURCE_IMAGE_PURPOSE)])
        # Same grid as the MR: every pixel sits where the MR pixel it was computed from sits.
        item.SpatialLocationsPreserved = "YES"
        items.append(item)
    ds.SourceImageSequence = DicomSequence(items)
    ds.ReferencedSeriesSequence = _referenced_series([files[ref.path] for ref in refs])
    ds.PixelData = np.ascontiguousarray(stored).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CTImageStorage)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = f"SCTEDGE_{agent_version()}"[:16]
    ds.file_meta = meta
    return ds


def _referenced_series(sources: Sequence[_SourceFile]) -> DicomSequence:
    """Common Instance Reference module (a user option of the CT Image IOD; once present, ReferencedSeriesSequence
    is required because the slice references instances of its own study): the referenced MR instances grouped by
    series, so that an archive can fetch the MR a slice was computed from without opening every item."""
    by_series: dict[str, dict[str, str]] = {}
    for source in sources:
        by_series.setdefault(source.series_instance_uid, {})[source.sop_instance_uid] = source.sop_class_uid
    series_items = []
    for series_uid, instances in by_series.items():
        instance_items = []
        for instance_uid, class_uid in instances.items():
            instance = Dataset()
            instance.ReferencedSOPClassUID = class_uid
            instance.ReferencedSOPInstanceUID = instance_uid
            instance_items.append(instance)
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedInstanceSequence = DicomSequence(instance_items)
        series_items.append(series)
    return DicomSequence(series_items)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds(value: float) -> str:
    """A DS string of at most 16 characters with as many significant digits as fit (pydicom's formatter):
    positions to better than 1e-9 mm, direction cosines to 1e-14."""
    number = float(value)
    if abs(number) < _DS_ZERO:
        number = 0.0
    text: str = format_number_as_ds(number)
    if text.endswith(".0"):
        text = text[:-2]
    assert len(text) <= _DS_MAX, text
    return text


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- atomic


def derived_uid(volume: SctVolume, role: str) -> str:
    """A UID that the same volume of the same acquisition by the same model always gets (``2.25.<UUID>``).

    Why not a random UID: a crash after the series is on disk but before the journal recorded it makes the agent
    write the series again after the restart; with random UIDs a PACS that received both would hold two
    different series of one sCT. Derived from the acquisition id (itself a digest: no UID of the patient's study
    can be recovered from it), the model and the sha256 of the HU, so another volume never shares them.
    """
    text = "|".join(
        ("sct-edge-agent", volume.acquisition_id, volume.model_id, volume.model_version, volume.sha256, role)
    )
    digest = hashlib.sha256(text.encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def _written_before(out_folder: Path, base: str, series_uid: str, names: Sequence[str]) -> Path | None:
    """The complete series folder holding ``series_uid`` under ``base`` or a numbered variant, if any.

    Only renamed folders are candidates, and a folder is renamed only once every file is fsynced, so a folder
    with every expected file is complete; its first file's SeriesInstanceUID tells whose it is.
    """
    for n in range(1, _MAX_NAME_VARIANTS):
        folder = out_folder / (base if n == 1 else f"{base}-{n}")
        if not folder.is_dir():
            return None
        first = folder / names[0]
        try:
            found = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (OSError, InvalidDicomError):
            continue
        if str(found.get("SeriesInstanceUID", "")) == series_uid and all(
            (folder / n).is_file() for n in names
        ):
            return folder
    return None


def _rename_free(temp: Path, out_folder: Path, base: str) -> Path:
    """Rename ``temp`` to ``base``, or ``base-2``, ``base-3``, ... whichever is free first.

    ``os.rename`` refuses a non-empty target folder (ENOTEMPTY/EEXIST), so a series already there is never
    replaced even if another writer takes the name between the check and the rename; an empty folder of that
    name holds no series and is checked for first.
    """
    for n in range(1, _MAX_NAME_VARIANTS):
        final = out_folder / (base if n == 1 else f"{base}-{n}")
        if final.exists():
            continue
        try:
            temp.rename(final)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return final
    raise SctSeriesError(
        "out_folder", f"{base} and {_MAX_NAME_VARIANTS - 2} numbered variants taken", "a free folder name"
    )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(error: OSError, name: str | None) -> str:
    """The operating system's reason and the base name of the file concerned (never a full path)."""
    if isinstance(error.filename, str):
        name = Path(error.filename).name
    detail = error.strerror or str(error) or type(error).__name__
    return f"{detail} ({name})" if name else detail
