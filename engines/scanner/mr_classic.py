"""Classic MR Image Storage: one Siemens-style single-frame file per slice and echo.

This is what a syngo MR E11 console exports for a 3D multi-echo FLASH: every echo of every partition is its
own MR Image object in one series, the echo told apart only by EchoTime/EchoNumbers, all images sharing the 3D
acquisition's AcquisitionTime while ContentTime advances as the reconstructor emits them. Values that are not
published for our protocol (SAR, coil names) are plausible choices; everything a protocol check reads follows
from the :class:`Acquisition` the pixels were simulated with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from engines.phantom.acquisition import Acquisition
from engines.phantom.case import PhantomCase
from engines.scanner.clock import dicom_date, dicom_time
from engines.scanner.common import (
    DEFAULT_INVERSION_TIME_MS,
    SeriesContext,
    StudyContext,
    add_monochrome_pixels,
    add_patient_and_study,
    add_series,
    apply_overrides,
    bits_stored_for,
    display_window,
    ds_number,
    new_dataset,
)
from engines.scanner.uids import UidSource
from sct_core.geometry import Orientation

#: Original magnitude, not distortion-corrected, prescan-normalised: a Siemens product reconstruction.
SIEMENS_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")
#: Siemens coil names as the E11 console writes them for a spine exam.
SIEMENS_RECEIVE_COIL = "Spine_32"
SIEMENS_TRANSMIT_COIL = "Body"

_ORIENTATION_ABBREVIATION = {
    Orientation.SAGITTAL: "sag",
    Orientation.CORONAL: "cor",
    Orientation.AXIAL: "tra",
}

#: Whole-body SAR of the seed protocol at 1.5 T (W/kg), scaled with flip angle², B0² and 1/TR. A plausible
#: number for the header, not a safety model.
_REFERENCE_SAR_W_PER_KG = 0.03


def _tokens(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return set(value.split("\\"))
    return {str(v) for v in value}


def siemens_protocol_name(acquisition: Acquisition) -> str:
    """The protocol name a technologist would save the sCT acquisition under on a syngo console."""
    return f"t1_fl3d_{_ORIENTATION_ABBREVIATION[acquisition.orientation]}_dual_echo_sCT"


def siemens_sequence_name(acquisition: Acquisition) -> str:
    """Siemens' internal name: ``*fl3d`` plus the number of echoes (``*fl3d2`` for two)."""
    return f"*fl3d{len(acquisition.echo_times_ms)}"


def classic_file_name(series_number: int, instance_number: int) -> str:
    """``MR.<SeriesNumber>.<InstanceNumber>.dcm``, unpadded, the way a console export to a folder names files.

    Unpadded numbers do not sort lexically (``MR.5.10`` before ``MR.5.2``), as in the field: readers must
    order images by their headers, never by name.
    """
    return f"MR.{series_number}.{instance_number}.dcm"


def acquisition_matrix(acquisition: Acquisition) -> tuple[list[int], str, int, int]:
    """(AcquisitionMatrix, InPlanePhaseEncodingDirection, phase steps acquired, phase steps reconstructed).

    AcquisitionMatrix is frequency rows\\frequency columns\\phase rows\\phase columns; both vendors fill it as
    ``[Nf, 0, 0, Np]`` when phase encoding runs along the columns (COL) and ``[0, Nf, Np, 0]`` along the rows.
    """
    _, acquired_rows, acquired_columns = acquisition.acquired_matrix
    _, rows, columns = acquisition.matrix
    if acquisition.readout_axis == "row":
        return [acquired_columns, 0, 0, acquired_rows], "COL", acquired_rows, rows
    return [0, acquired_rows, acquired_columns, 0], "ROW", acquired_columns, columns


def phase_field_of_view_percent(acquisition: Acquisition) -> float:
    """PercentPhaseFieldOfView: phase FOV over frequency FOV, in percent."""
    if acquisition.readout_axis == "row":
        return 100.0 * acquisition.fov_mm[0] / acquisition.fov_mm[1]
    return 100.0 * acquisition.fov_mm[1] / acquisition.fov_mm[0]


def specific_absorption_rate(acquisition: Acquisition) -> float:
    """A plausible whole-body SAR for the header (W/kg)."""
    return (
        _REFERENCE_SAR_W_PER_KG
        * (acquisition.flip_angle_deg / 10.0) ** 2
        * (acquisition.field_strength_t / 1.5) ** 2
        * (7.0 / acquisition.repetition_time_ms)
    )


@dataclass(frozen=True, slots=True, eq=False)
class ClassicMrSeries:
    """The plan of one classic MR series; :meth:`dataset` builds any one of its images on demand.

    Images are built one at a time so that a paced export writes its first file immediately and never holds
    more than one image's header in memory.
    """

    case: PhantomCase
    study: StudyContext
    series: SeriesContext
    uids: UidSource
    bits_stored: int
    windows: tuple[tuple[float, float], ...]

    @classmethod
    def plan(
        cls, case: PhantomCase, study: StudyContext, series: SeriesContext, uids: UidSource
    ) -> ClassicMrSeries:
        """Series-wide values: one BitsStored for the series and one display window per echo."""
        return cls(
            case=case,
            study=study,
            series=series,
            uids=uids,
            bits_stored=bits_stored_for(case.echoes),
            windows=tuple(display_window(echo) for echo in case.echoes),
        )

    @property
    def images_in_acquisition(self) -> int:
        """Slices × echoes: what the acquisition produces, whether or not every image arrives."""
        return int(self.case.echoes.shape[0] * self.case.echoes.shape[1])

    def sop_instance_uid(self, slice_index: int, echo_index: int) -> str:
        """The image's SOPInstanceUID (fresh or derived, as the UID source decides)."""
        return self.uids.uid("mr-image", self.series.series_instance_uid, slice_index, echo_index)

    def dataset(
        self, slice_index: int, echo_index: int, *, instance_number: int, emission_index: int
    ) -> Dataset:
        """The MR Image object for one slice of one echo.

        ``instance_number`` is the image's number within the series and ``emission_index`` its place in the
        reconstructor's output stream (it sets ContentTime).
        """
        case = self.case
        acquisition = case.acquisition
        geometry = case.geometry
        timeline = self.study.timeline
        created = timeline.image_time(emission_index)
        pixels = case.echoes[echo_index, slice_index]

        ds = new_dataset(
            MRImageStorage, self.sop_instance_uid(slice_index, echo_index), self.series.equipment, created
        )
        ds.ImageType = list(SIEMENS_IMAGE_TYPE)
        add_patient_and_study(ds, self.study)
        add_series(ds, self.study, self.series, "MR", timeline.reconstruction_start)
        ds.AcquisitionDate = dicom_date(timeline.acquisition_start)
        ds.AcquisitionTime = dicom_time(timeline.acquisition_start)
        ds.ContentDate = dicom_date(created)
        ds.ContentTime = dicom_time(created)

        # MR Image module: the sequence, as Siemens labels a 3D RF-spoiled multi-echo FLASH.
        matrix, phase_direction, phase_steps, phase_matrix = acquisition_matrix(acquisition)
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SequenceName = siemens_sequence_name(acquisition)
        ds.AngioFlag = "N"
        ds.SliceThickness = ds_number(geometry.spacing[0])
        ds.RepetitionTime = ds_number(acquisition.repetition_time_ms)
        ds.EchoTime = ds_number(acquisition.echo_times_ms[echo_index])
        ds.NumberOfAverages = ds_number(acquisition.number_of_averages)
        ds.ImagingFrequency = ds_number(acquisition.imaging_frequency_mhz)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = echo_index + 1
        ds.MagneticFieldStrength = ds_number(acquisition.field_strength_t)
        ds.SpacingBetweenSlices = ds_number(geometry.spacing[0])
        ds.NumberOfPhaseEncodingSteps = phase_steps
        ds.EchoTrainLength = len(acquisition.echo_times_ms)
        ds.PercentSampling = ds_number(100.0 * phase_steps / phase_matrix)
        ds.PercentPhaseFieldOfView = ds_number(phase_field_of_view_percent(acquisition))
        ds.PixelBandwidth = ds_number(acquisition.pixel_bandwidth_hz)
        ds.ReceiveCoilName = SIEMENS_RECEIVE_COIL
        ds.TransmitCoilName = SIEMENS_TRANSMIT_COIL
        ds.AcquisitionMatrix = matrix
        ds.InPlanePhaseEncodingDirection = phase_direction
        ds.FlipAngle = ds_number(acquisition.flip_angle_deg)
        ds.VariableFlipAngleFlag = "N"
        ds.SAR = ds_number(specific_absorption_rate(acquisition))
        ds.dBdt = "0"

        # General Image and Image Plane modules.
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_number
        ds.ImagesInAcquisition = self.images_in_acquisition
        position = geometry.image_position_patient(slice_index)
        ds.ImagePositionPatient = [ds_number(v) for v in position]
        ds.ImageOrientationPatient = [ds_number(v) for v in geometry.image_orientation_patient]
        ds.SliceLocation = ds_number(float(np.dot(position, geometry.slice_direction)))
        ds.PixelSpacing = [ds_number(v) for v in geometry.pixel_spacing]

        add_monochrome_pixels(ds, pixels, bits_stored=self.bits_stored)
        ds.SmallestImagePixelValue = int(pixels.min())
        ds.LargestImagePixelValue = int(pixels.max())
        center, width = self.windows[echo_index]
        ds.WindowCenter = ds_number(center)
        ds.WindowWidth = ds_number(width)
        ds.WindowCenterWidthExplanation = "Algo1"

        ds.PerformedProcedureStepStartDate = dicom_date(timeline.study_start)
        ds.PerformedProcedureStepStartTime = dicom_time(timeline.study_start)
        ds.PerformedProcedureStepID = (
            f"MR{dicom_date(timeline.study_start)}{dicom_time(timeline.study_start)[:6]}"
        )
        ds.PerformedProcedureStepDescription = self.study.study_description

        apply_overrides(ds, acquisition.header_overrides)
        if "IR" in _tokens(ds.get("ScanningSequence")) and "InversionTime" not in ds:
            # An inversion-recovery scan has an inversion time (type 2C); see DEFAULT_INVERSION_TIME_MS.
            ds.InversionTime = ds_number(DEFAULT_INVERSION_TIME_MS)
        return ds

    def file_name(self, instance_number: int) -> str:
        """The exported file's name."""
        return classic_file_name(self.series.series_number, instance_number)
