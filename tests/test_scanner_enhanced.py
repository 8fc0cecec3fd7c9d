"""Enhanced MR export: one Philips-style multi-frame object, equivalent to the classic export of the same case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scanner_support import AFFINE_TOLERANCE_MM, dciodvfy, export_small, needs_dciodvfy, small_request

from engines.phantom.generate import generate_case
from engines.scanner.export import EmissionOrder, ExportSummary, OutputFormat
from engines.scanner.readback import read_mr_series


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory: pytest.TempPathFactory) -> ExportSummary:
    return export_small(
        tmp_path_factory.mktemp("enhanced"), format=OutputFormat.ENHANCED, deterministic_uids=True
    )


@pytest.fixture(scope="module")
def enhanced_ds(enhanced: ExportSummary) -> Dataset:
    return pydicom.dcmread(enhanced.paths[0])


def test_one_object_holds_every_frame(enhanced: ExportSummary, enhanced_ds: Dataset) -> None:
    assert enhanced.file_count == 1 and enhanced.images == 20
    assert enhanced.paths[0].name == "MR.501.1.dcm"
    assert enhanced_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    assert int(enhanced_ds.NumberOfFrames) == 20
    assert (enhanced_ds.Manufacturer, enhanced_ds.ManufacturerModelName) == ("Philips", "Ingenia")


def test_shared_groups_hold_the_acquisition_and_per_frame_groups_the_echo(enhanced_ds: Dataset) -> None:
    ds = enhanced_ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    for macro in (
        "PixelMeasuresSequence",
        "PlaneOrientationSequence",
        "MRTimingAndRelatedParametersSequence",
        "MRFOVGeometrySequence",
        "MRModifierSequence",
        "MRImagingModifierSequence",
        "MRReceiveCoilSequence",
        "MRTransmitCoilSequence",
        "MRAveragesSequence",
        "PixelValueTransformationSequence",
        "FrameAnatomySequence",
    ):
        assert macro in shared, macro
    assert shared.MRModifierSequence[0].Spoiling == "RF"
    assert float(shared.MRImagingModifierSequence[0].PixelBandwidth) == 540.0
    assert shared.MRImagingModifierSequence[0].TransmitterFrequency == pytest.approx(63.866, abs=1e-3)
    timing = shared.MRTimingAndRelatedParametersSequence[0]
    assert (float(timing.RepetitionTime), float(timing.FlipAngle), timing.GradientEchoTrainLength) == (
        7.0,
        10.0,
        2,
    )
    assert shared.MRFOVGeometrySequence[0].MRAcquisitionPhaseEncodingStepsOutOfPlane == 8
    assert (ds.EchoPulseSequence, ds.MRAcquisitionType, ds.PulseSequenceName) == ("GRADIENT", "3D", "T1FFE")
    assert ds.SteadyStatePulseSequence == "LONGITUDINAL" and ds.ComplexImageComponent == "MAGNITUDE"
    frames = ds.PerFrameFunctionalGroupsSequence
    echo_times = [f.MREchoSequence[0].EffectiveEchoTime for f in frames]
    assert echo_times[:4] == [2.1, 4.2, 2.1, 4.2]
    indices = [list(f.FrameContentSequence[0].DimensionIndexValues) for f in frames]
    assert indices[:3] == [[1, 1, 1], [1, 1, 2], [1, 2, 1]]
    assert min(min(i) for i in indices) == 1
    assert all(f.MRImageFrameTypeSequence[0].ComplexImageComponent == "MAGNITUDE" for f in frames)
    pointers = [int(item.DimensionIndexPointer) for item in ds.DimensionIndexSequence]
    assert pointers == [0x00209056, 0x00209057, 0x00189082]


def test_round_trip_and_equivalence_with_the_classic_export(enhanced: ExportSummary, tmp_path: Path) -> None:
    request = small_request()
    case = generate_case(request.seed, request.acquisition())
    from_enhanced = read_mr_series(enhanced.out_dir)
    from_classic = read_mr_series(export_small(tmp_path).out_dir)
    assert from_enhanced.form == "enhanced" and from_classic.form == "classic"
    assert np.array_equal(from_enhanced.echoes, case.echoes)
    assert np.array_equal(from_enhanced.echoes, from_classic.echoes)
    assert np.allclose(
        from_enhanced.geometry.affine, case.geometry.affine, atol=AFFINE_TOLERANCE_MM, rtol=0.0
    )
    assert np.allclose(
        from_enhanced.geometry.affine, from_classic.geometry.affine, atol=AFFINE_TOLERANCE_MM, rtol=0.0
    )
    assert from_enhanced.echo_times_ms == from_classic.echo_times_ms == (2.1, 4.2)
    vendor_neutral = (
        "repetition_time_ms",
        "flip_angle_deg",
        "pixel_bandwidth_hz",
        "magnetic_field_strength_t",
        "imaging_frequency_mhz",
        "mr_acquisition_type",
        "gradient_echo",
        "rf_spoiled",
    )
    for name in vendor_neutral:
        assert getattr(from_enhanced.attributes, name) == getattr(from_classic.attributes, name), name


def test_echo_order_changes_the_frame_order_not_the_volume(tmp_path: Path) -> None:
    summary = export_small(tmp_path, format=OutputFormat.ENHANCED, order=EmissionOrder.ECHO)
    ds = pydicom.dcmread(summary.paths[0], stop_before_pixels=True)
    echo_times = [f.MREchoSequence[0].EffectiveEchoTime for f in ds.PerFrameFunctionalGroupsSequence]
    assert echo_times == [2.1] * 10 + [4.2] * 10
    request = small_request()
    assert np.array_equal(
        read_mr_series(tmp_path).echoes, generate_case(request.seed, request.acquisition()).echoes
    )


def test_header_deviations_land_where_the_enhanced_iod_keeps_them(tmp_path: Path) -> None:
    request = small_request(
        settings=(
            "MRAcquisitionType=2D",
            "ScanningSequence=SE",
            "ReceiveCoilName=Spine_32",
            "SequenceVariant=SK",
        )
    )
    summary = export_small(tmp_path, request, format=OutputFormat.ENHANCED)
    ds = pydicom.dcmread(summary.paths[0], stop_before_pixels=True)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert ds.MRAcquisitionType == "2D"
    assert ds.EchoPulseSequence == "SPIN" and ds.MultipleSpinEcho == "YES"
    assert "ScanningSequence" not in ds
    assert shared.MRReceiveCoilSequence[0].ReceiveCoilName == "Spine_32"
    assert "ReceiveCoilName" not in ds
    assert shared.MRModifierSequence[0].Spoiling == "NONE"
    assert ds.SegmentedKSpaceTraversal == "PARTIAL"
    assert read_mr_series(tmp_path).attributes.mr_acquisition_type == "2D"


@needs_dciodvfy
def test_dciodvfy_finds_no_errors_in_the_enhanced_object(enhanced: ExportSummary) -> None:
    returncode, errors = dciodvfy(enhanced.paths[0])
    assert returncode == 0
    assert errors == []
