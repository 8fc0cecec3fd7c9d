"""Enhanced MR Image Storage: one Philips-style multi-frame object holding every frame of every echo.

Philips consoles on release 5.x export a multi-echo 3D FFE as a single Enhanced MR object whose frames are
indexed by stack, in-stack position and effective echo time. Values common to all frames sit in the shared
functional groups, values that change per frame (position, echo time, window) in the per-frame groups; the
structure copies a real Ingenia Elition X export (the ``dcm_qa_philips_enh`` series of the real-DICOM test
corpus, docs/vendors.md), minus the private groups, plus the attributes that export omits or gets wrong
(DimensionIndexValues start at 1 here).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage

from engines.phantom.acquisition import Acquisition
from engines.phantom.case import PhantomCase
from engines.scanner.clock import dicom_date, dicom_datetime, dicom_time, scan_duration_s
from engines.scanner.common import (
    SeriesContext,
    StudyContext,
    add_monochrome_pixels,
    add_patient_and_study,
    add_series,
    bits_stored_for,
    display_window,
    ds_number,
    new_dataset,
)
from engines.scanner.enhanced_placement import apply_enhanced_overrides
from engines.scanner.mr_classic import (
    acquisition_matrix,
    phase_field_of_view_percent,
    specific_absorption_rate,
)
from engines.scanner.uids import UidSource
from sct_core.geometry import Orientation

#: Original, primary, T1-weighted flavour, no derived pixel contrast: FrameType of every magnitude frame.
PHILIPS_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "T1", "NONE")
#: Philips' pulse sequence name for an RF-spoiled T1-weighted fast field echo.
PHILIPS_PULSE_SEQUENCE_NAME = "T1FFE"
PHILIPS_RECEIVE_COIL = "dS Posterior"
PHILIPS_TRANSMIT_COIL = "B"
#: Chemical shift between water and the main methylene fat peak, as Philips computes the water-fat shift.
WATER_FAT_SHIFT_PPM = 3.4
#: Private creator of the Philips MR imaging block that carries scanning technique and water-fat shift.
PHILIPS_PRIVATE_CREATOR = "Philips Imaging DD 001"

#: SNOMED CT code of the lumbar spine, for FrameAnatomySequence (CID 4031).
LUMBAR_SPINE_CODE = ("122496007", "SCT", "Lumbar spine")

_ORIENTATION_LABEL = {Orientation.SAGITTAL: "SAG", Orientation.CORONAL: "COR", Orientation.AXIAL: "TRA"}


def philips_protocol_name(acquisition: Acquisition) -> str:
    """The ExamCard entry name a Philips user would give the sCT scan."""
    return f"sCT_T1FFE_3D_dualecho_{_ORIENTATION_LABEL[acquisition.orientation]}"


def water_fat_shift_pixels(acquisition: Acquisition) -> float:
    """Philips' bandwidth setting: the fat displacement in pixels, Δf_wf / PixelBandwidth (docs/vendors.md)."""
    return WATER_FAT_SHIFT_PPM * acquisition.imaging_frequency_mhz / acquisition.pixel_bandwidth_hz


def frame_order(n_slices: int, n_echoes: int, *, echo_major: bool) -> tuple[tuple[int, int], ...]:
    """(slice, echo) of each frame: slice-major with echoes interleaved (Philips' order), or echo-major."""
    if echo_major:
        return tuple((k, e) for e in range(n_echoes) for k in range(n_slices))
    return tuple((k, e) for k in range(n_slices) for e in range(n_echoes))


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def build_enhanced_mr(
    case: PhantomCase,
    study: StudyContext,
    series: SeriesContext,
    uids: UidSource,
    frames: Sequence[tuple[int, int]],
) -> Dataset:
    """The Enhanced MR Image object holding ``frames`` ((slice, echo) pairs, in the order stored)."""
    acquisition = case.acquisition
    geometry = case.geometry
    timeline = study.timeline
    created = timeline.reconstruction_start
    n_echoes = len(acquisition.echo_times_ms)

    sop_instance_uid = uids.uid("mr-enhanced", series.series_instance_uid)
    ds = new_dataset(EnhancedMRImageStorage, sop_instance_uid, series.equipment, created)
    ds.ImageType = list(PHILIPS_IMAGE_TYPE)
    add_patient_and_study(ds, study)
    add_series(ds, study, series, "MR", created)
    ds.ContentDate = dicom_date(created)
    ds.ContentTime = dicom_time(created)
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1

    # Enhanced MR Image module and its MR Image Description macro.
    ds.AcquisitionDateTime = dicom_datetime(timeline.acquisition_start)
    ds.AcquisitionDuration = scan_duration_s(acquisition)
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = ds_number(acquisition.field_strength_t)
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])

    # MR Pulse Sequence module: a Cartesian, RF-spoiled, multi-echo gradient-echo volume.
    slices_acquired, _, _ = acquisition.acquired_matrix
    matrix, phase_direction, phase_steps, phase_matrix = acquisition_matrix(acquisition)
    frequency_steps = max(matrix[0], matrix[1])
    ds.PulseSequenceName = PHILIPS_PULSE_SEQUENCE_NAME
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "LONGITUDINAL"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = phase_steps * slices_acquired

    # Philips private block: scanning technique and the water-fat shift the console sets bandwidth with.
    block = ds.private_block(0x2001, PHILIPS_PRIVATE_CREATOR, create=True)
    block.add_new(0x14, "SL", n_echoes)
    block.add_new(0x20, "LO", PHILIPS_PULSE_SEQUENCE_NAME)
    block.add_new(0x22, "FL", water_fat_shift_pixels(acquisition))

    # Shared functional groups: everything that is the same for every frame.
    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(
        _item(
            PixelSpacing=[ds_number(v) for v in geometry.pixel_spacing],
            SliceThickness=ds_number(geometry.spacing[0]),
            SpacingBetweenSlices=ds_number(geometry.spacing[0]),
        )
    )
    shared.PlaneOrientationSequence = _seq(
        _item(ImageOrientationPatient=[ds_number(v) for v in geometry.image_orientation_patient])
    )
    code_value, scheme, meaning = LUMBAR_SPINE_CODE
    shared.FrameAnatomySequence = _seq(
        _item(
            AnatomicRegionSequence=_seq(
                _item(CodeValue=code_value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)
            ),
            FrameLaterality="U",
        )
    )
    shared.PixelValueTransformationSequence = _seq(
        _item(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")
    )
    shared.MRTimingAndRelatedParametersSequence = _seq(
        _item(
            RepetitionTime=ds_number(acquisition.repetition_time_ms),
            FlipAngle=ds_number(acquisition.flip_angle_deg),
            EchoTrainLength=n_echoes,
            RFEchoTrainLength=0,
            GradientEchoTrainLength=n_echoes,
            SpecificAbsorptionRateSequence=_seq(
                _item(
                    SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                    SpecificAbsorptionRateValue=specific_absorption_rate(acquisition),
                )
            ),
            GradientOutputType="DB_DT",
            GradientOutput=55.0,
            OperatingModeSequence=_seq(
                _item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"),
                _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL"),
                _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
            ),
        )
    )
    shared.MRFOVGeometrySequence = _seq(
        _item(
            InPlanePhaseEncodingDirection="COLUMN" if phase_direction == "COL" else "ROW",
            MRAcquisitionFrequencyEncodingSteps=frequency_steps,
            MRAcquisitionPhaseEncodingStepsInPlane=phase_steps,
            MRAcquisitionPhaseEncodingStepsOutOfPlane=slices_acquired,
            PercentSampling=ds_number(100.0 * phase_steps / phase_matrix),
            PercentPhaseFieldOfView=ds_number(phase_field_of_view_percent(acquisition)),
        )
    )
    shared.MRModifierSequence = _seq(
        _item(
            InversionRecovery="NO",
            FlowCompensation="NONE",
            Spoiling="RF",
            T2Preparation="NO",
            SpectrallySelectedExcitation="NONE",
            SpatialPresaturation="NONE",
            PartialFourier="NO",
            ParallelAcquisition="NO",
        )
    )
    shared.MRImagingModifierSequence = _seq(
        _item(
            PixelBandwidth=ds_number(acquisition.pixel_bandwidth_hz),
            TransmitterFrequency=acquisition.imaging_frequency_mhz,
            MagnetizationTransfer="NONE",
            BloodSignalNulling="NO",
            Tagging="NONE",
        )
    )
    shared.MRReceiveCoilSequence = _seq(
        _item(
            ReceiveCoilName=PHILIPS_RECEIVE_COIL,
            ReceiveCoilManufacturerName="Philips",
            ReceiveCoilType="MULTICOIL",
            QuadratureReceiveCoil="NO",
            MultiCoilDefinitionSequence=_seq(
                _item(MultiCoilElementName="MULTI ELEMENT", MultiCoilElementUsed="YES")
            ),
        )
    )
    shared.MRTransmitCoilSequence = _seq(
        _item(
            TransmitCoilName=PHILIPS_TRANSMIT_COIL,
            TransmitCoilManufacturerName="Philips",
            TransmitCoilType="BODY",
        )
    )
    shared.MRAveragesSequence = _seq(_item(NumberOfAverages=ds_number(acquisition.number_of_averages)))
    ds.SharedFunctionalGroupsSequence = _seq(shared)

    # Per-frame functional groups: position, echo time, window and frame content of each frame.
    windows = [display_window(echo) for echo in case.echoes]
    duration_ms = scan_duration_s(acquisition) * 1000.0
    frame_reference = timeline.acquisition_start + timedelta(seconds=timeline.acquisition_duration_s / 2.0)
    per_frame = []
    for slice_index, echo_index in frames:
        center, width = windows[echo_index]
        per_frame.append(
            _item(
                FrameContentSequence=_seq(
                    _item(
                        FrameAcquisitionNumber=1,
                        FrameAcquisitionDateTime=dicom_datetime(timeline.acquisition_start),
                        FrameReferenceDateTime=dicom_datetime(frame_reference),
                        FrameAcquisitionDuration=duration_ms,
                        StackID="1",
                        InStackPositionNumber=slice_index + 1,
                        DimensionIndexValues=[1, slice_index + 1, echo_index + 1],
                    )
                ),
                PlanePositionSequence=_seq(
                    _item(
                        ImagePositionPatient=[
                            ds_number(v) for v in geometry.image_position_patient(slice_index)
                        ]
                    )
                ),
                MREchoSequence=_seq(_item(EffectiveEchoTime=float(acquisition.echo_times_ms[echo_index]))),
                MRImageFrameTypeSequence=_seq(
                    _item(
                        FrameType=list(PHILIPS_IMAGE_TYPE),
                        PixelPresentation="MONOCHROME",
                        VolumetricProperties="VOLUME",
                        VolumeBasedCalculationTechnique="NONE",
                        ComplexImageComponent="MAGNITUDE",
                        AcquisitionContrast="T1",
                    )
                ),
                FrameVOILUTSequence=_seq(_item(WindowCenter=ds_number(center), WindowWidth=ds_number(width))),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)

    # Multi-frame Dimension module: frames are indexed by stack, position in the stack and echo time.
    organization_uid = uids.uid("dimension-organization", series.series_instance_uid)
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=organization_uid))
    ds.DimensionIndexSequence = _seq(
        _item(
            DimensionOrganizationUID=organization_uid,
            DimensionIndexPointer=0x00209056,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=organization_uid,
            DimensionIndexPointer=0x00209057,
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
        _item(
            DimensionOrganizationUID=organization_uid,
            DimensionIndexPointer=0x00189082,
            FunctionalGroupPointer=0x00189114,
            DimensionDescriptionLabel="Effective Echo Time",
        ),
    )

    ds.NumberOfFrames = len(frames)
    pixels = np.stack([case.echoes[echo_index, slice_index] for slice_index, echo_index in frames])
    add_monochrome_pixels(ds, pixels, bits_stored=bits_stored_for(case.echoes))

    apply_enhanced_overrides(ds, acquisition.header_overrides)
    return ds


def enhanced_file_name(series_number: int) -> str:
    """``MR.<SeriesNumber>.1.dcm``: the single object of the series, named like the classic files."""
    return f"MR.{series_number}.1.dcm"
