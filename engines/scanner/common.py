"""What every object of one simulated study shares, and how it is encoded.

The MR (classic or Enhanced) and the reference CT of one case belong to one patient, one study and one frame
of reference; building those modules in one place is what guarantees that they agree attribute for attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from engines.phantom.case import PhantomCase
from engines.scanner.clock import AcquisitionTimeline, dicom_date, dicom_time
from engines.scanner.equipment import Equipment
from engines.scanner.identity import (
    SPECIFIC_CHARACTER_SET,
    PatientIdentity,
    SiteIdentity,
    patient_identity,
    site_identity,
)
from engines.scanner.uids import IMPLEMENTATION_CLASS_UID, UidSource

#: Largest value 12 stored bits hold; images that fit are stored with BitsStored 12, as both vendors do.
MAX_12_BIT = 4095
#: Percentiles of an echo's pixel values that span the default display window.
WINDOW_PERCENTILES = (0.5, 99.5)
#: DICOM CID 4031 / PS3.16 Annex L code for the body part (BodyPartExamined defined term).
BODY_PART_EXAMINED = "LSPINE"
#: Head first, supine: how a lumbar spine is scanned on both MR and CT.
PATIENT_POSITION = "HFS"
#: Inversion time written when a deviation makes the sequence inversion-prepared without naming one (ms): a
#: typical 1.5 T MPRAGE value. Set InversionTime (classic) or InversionTimes (Enhanced) to choose another.
DEFAULT_INVERSION_TIME_MS = 1100.0

#: Maximum length of a DS (decimal string) value.
DS_MAX_CHARACTERS = 16
#: What the RIS calls the exam; the same for the MR and the reference CT.
STUDY_DESCRIPTION = "MR LWS nativ^sCT Planung"


@dataclass(frozen=True, slots=True)
class StudyContext:
    """Patient, study and frame of reference shared by every series of one simulated case."""

    patient: PatientIdentity
    site: SiteIdentity
    study_instance_uid: str
    study_id: str
    study_description: str
    frame_of_reference_uid: str
    timeline: AcquisitionTimeline


def plan_study(case: PhantomCase, uids: UidSource) -> StudyContext:
    """Patient, site, UIDs and clock of a case's study.

    With deterministic UIDs the clock is deterministic too (a seed-dependent morning); otherwise the
    acquisition is placed so that its reconstruction starts now, as if the scanner had just finished it.
    """
    timeline = (
        AcquisitionTimeline.for_seed(case.acquisition, case.seed)
        if uids.deterministic
        else AcquisitionTimeline.ending_now(case.acquisition)
    )
    study_uid = uids.uid("study")
    return StudyContext(
        patient=patient_identity(case.subject),
        site=site_identity(case.seed),
        study_instance_uid=study_uid,
        study_id=f"{1 + case.seed % 9999}",
        study_description=STUDY_DESCRIPTION,
        frame_of_reference_uid=uids.uid("frame-of-reference", study_uid),
        timeline=timeline,
    )


@dataclass(frozen=True, slots=True)
class SeriesContext:
    """One series within the study."""

    series_instance_uid: str
    series_number: int
    series_description: str
    protocol_name: str
    equipment: Equipment


def ds_number(value: float) -> str:
    """A DS string of at most 16 characters (PS3.5 Table 6.2-1), written the way consoles write numbers.

    The shortest text that reads back as the same double is used when it fits (``540``, ``0.74``, ``2.1``);
    otherwise as many significant digits as 16 characters allow.
    """
    number = float(value) + 0.0  # turns -0.0 into 0.0
    text = repr(number)
    if text.endswith(".0"):
        text = text[:-2]
    if len(text) <= DS_MAX_CHARACTERS and "e" not in text and text not in ("nan", "inf", "-inf"):
        return text
    formatted: str = format_number_as_ds(number)
    return formatted


def new_dataset(
    sop_class_uid: str, sop_instance_uid: str, equipment: Equipment, created: datetime
) -> Dataset:
    """A dataset with File Meta Information and the SOP Common module, for explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = equipment.implementation_version_name
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = SPECIFIC_CHARACTER_SET
    ds.InstanceCreationDate = dicom_date(created)
    ds.InstanceCreationTime = dicom_time(created)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def add_patient_and_study(ds: Dataset, study: StudyContext) -> None:
    """Patient, General Study and Patient Study modules."""
    patient = study.patient
    start = study.timeline.study_start
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age_on(start.date())
    ds.PatientSize = ds_number(patient.size_m)
    ds.PatientWeight = ds_number(patient.weight_kg)
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = dicom_date(start)
    ds.StudyTime = dicom_time(start)
    ds.ReferringPhysicianName = patient.referring_physician_name
    ds.StudyID = study.study_id
    ds.AccessionNumber = patient.accession_number
    ds.StudyDescription = study.study_description


def add_series(
    ds: Dataset, study: StudyContext, series: SeriesContext, modality: str, series_time: datetime
) -> None:
    """General Series module (plus the site's people), and the equipment that made the series."""
    ds.Modality = modality
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDate = dicom_date(series_time)
    ds.SeriesTime = dicom_time(series_time)
    ds.SeriesDescription = series.series_description
    ds.ProtocolName = series.protocol_name
    ds.OperatorsName = study.site.operators_name
    ds.PerformingPhysicianName = study.site.performing_physician_name
    ds.BodyPartExamined = BODY_PART_EXAMINED
    ds.PatientPosition = PATIENT_POSITION
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    equipment = series.equipment
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model_name
    ds.SoftwareVersions = (
        list(equipment.software_versions)
        if len(equipment.software_versions) > 1
        else (equipment.software_versions[0])
    )
    ds.DeviceSerialNumber = equipment.device_serial_number
    ds.StationName = equipment.station_name
    ds.InstitutionName = study.site.institution_name
    ds.InstitutionAddress = study.site.institution_address
    ds.InstitutionalDepartmentName = study.site.department_name


def add_monochrome_pixels(ds: Dataset, frames: npt.NDArray[np.uint16], *, bits_stored: int) -> None:
    """Image Pixel module for unsigned 16-bit frames ``[frame, row, column]`` or one ``[row, column]``."""
    rows, columns = frames.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(rows)
    ds.Columns = int(columns)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()


def bits_stored_for(values: npt.NDArray[np.integer]) -> int:
    """12 when every value fits in 12 bits (the usual MR and CT case), else 16."""
    return 12 if int(values.max(initial=0)) <= MAX_12_BIT else 16


def display_window(values: npt.NDArray[np.integer]) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) spanning the bulk of the values, as a console's auto-window does."""
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    width = max(float(np.round(high - low)), 1.0)
    return float(np.round((high + low) / 2.0)), width


def apply_overrides(ds: Dataset, overrides: tuple[tuple[str, object], ...]) -> None:
    """Write verbatim header overrides at the top level (a classic object keeps every attribute there)."""
    for keyword, value in overrides:
        setattr(ds, keyword, list(value) if isinstance(value, tuple) else value)


def encode(ds: Dataset) -> bytes:
    """The DICOM Part 10 file for a dataset: preamble, File Meta Information, explicit VR little endian."""
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()
