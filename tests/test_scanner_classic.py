"""Classic MR export: Siemens-style single-frame files that read back to exactly the simulated case."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scanner_support import (
    AFFINE_TOLERANCE_MM,
    SMALL_FOV_MM,
    dciodvfy,
    export_small,
    needs_dciodvfy,
    small_request,
)

from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.generate import generate_case
from engines.scanner.export import ExportSummary, OutputFormat, SimulationRequest
from engines.scanner.readback import read_mr_series


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> ExportSummary:
    return export_small(tmp_path_factory.mktemp("classic"), deterministic_uids=True)


def test_one_file_per_slice_and_echo_named_like_a_console_export(classic: ExportSummary) -> None:
    n_echoes, n_slices = classic.shape[:2]
    assert classic.file_count == n_echoes * n_slices == 20
    names = sorted(p.name for p in classic.out_dir.iterdir())
    assert names == sorted(f"MR.5.{n}.dcm" for n in range(1, 21))
    assert classic.total_bytes == sum(p.stat().st_size for p in classic.paths)


def test_round_trip_keeps_values_geometry_and_echo_times(classic: ExportSummary) -> None:
    request = small_request()
    case = generate_case(request.seed, request.acquisition())
    readback = read_mr_series(classic.out_dir)
    assert readback.form == "classic"
    assert readback.echo_times_ms == case.acquisition.echo_times_ms
    assert readback.echoes.dtype == np.uint16
    assert np.array_equal(readback.echoes, case.echoes)
    assert readback.geometry.shape == case.geometry.shape
    assert np.allclose(readback.geometry.affine, case.geometry.affine, atol=AFFINE_TOLERANCE_MM, rtol=0.0)
    attributes = readback.attributes
    assert (attributes.manufacturer, attributes.model_name) == ("SIEMENS", "Avanto_fit")
    assert attributes.repetition_time_ms == case.acquisition.repetition_time_ms
    assert attributes.flip_angle_deg == case.acquisition.flip_angle_deg
    assert attributes.pixel_bandwidth_hz == case.acquisition.pixel_bandwidth_hz
    assert attributes.magnetic_field_strength_t == case.acquisition.field_strength_t
    assert attributes.imaging_frequency_mhz == pytest.approx(case.acquisition.imaging_frequency_mhz, abs=1e-6)
    assert (attributes.mr_acquisition_type, attributes.sequence_name) == ("3D", "*fl3d2")
    assert attributes.gradient_echo and attributes.rf_spoiled


def test_headers_follow_siemens_conventions(classic: ExportSummary) -> None:
    datasets = [pydicom.dcmread(p) for p in classic.paths]
    first = datasets[0]
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    assert (first.ScanningSequence, first.SequenceVariant, first.MRAcquisitionType) == ("GR", "SP", "3D")
    assert first.SoftwareVersions == "syngo MR E11"
    assert first.BodyPartExamined == "LSPINE" and first.PatientPosition == "HFS"
    assert first.SpecificCharacterSet == "ISO_IR 100"
    assert first.InPlanePhaseEncodingDirection == "COL"
    assert list(first.AcquisitionMatrix) == [81, 0, 0, 69]
    assert float(first.PercentSampling) == pytest.approx(100 * 69 / 81)
    assert first.EchoTrainLength == 2 and first.BitsStored == 12
    for ds in datasets:
        assert ds.ImagesInAcquisition == 20
        assert ds.SeriesInstanceUID == first.SeriesInstanceUID
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert ds.AcquisitionTime == first.AcquisitionTime
        assert ds.EchoNumbers == (1 if float(ds.EchoTime) == 2.1 else 2)
        assert ds.SmallestImagePixelValue <= ds.LargestImagePixelValue
    assert len({ds.SOPInstanceUID for ds in datasets}) == 20
    by_instance = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    assert [int(ds.InstanceNumber) for ds in by_instance] == list(range(1, 21))
    content_times = [str(ds.ContentTime) for ds in by_instance]
    assert content_times == sorted(content_times) and len(set(content_times)) == 20
    # Slice order: both echoes of slice k (instances 2k+1, 2k+2) share a position; the position advances by k.
    assert by_instance[0].ImagePositionPatient == by_instance[1].ImagePositionPatient
    assert by_instance[0].ImagePositionPatient != by_instance[2].ImagePositionPatient


def test_three_tesla_claims_a_prisma_and_its_larmor_frequency(tmp_path: Path) -> None:
    summary = export_small(tmp_path, small_request(settings=("MagneticFieldStrength=3",)))
    ds = pydicom.dcmread(summary.paths[0], stop_before_pixels=True)
    assert (ds.ManufacturerModelName, float(ds.MagneticFieldStrength)) == ("Prisma_fit", 3.0)
    assert float(ds.ImagingFrequency) == pytest.approx(127.732, abs=1e-3)


@needs_dciodvfy
def test_dciodvfy_finds_no_errors_in_classic_files(classic: ExportSummary) -> None:
    for path in (classic.paths[0], classic.paths[-1]):
        returncode, errors = dciodvfy(path)
        assert returncode == 0
        assert errors == []


def test_dcmdump_reads_classic_files(classic: ExportSummary) -> None:
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.skip("dcmtk's dcmdump is not installed")
    result = subprocess.run(
        [dcmdump, str(classic.paths[0])], capture_output=True, encoding="latin-1", check=False
    )
    assert result.returncode == 0
    assert "*fl3d2" in result.stdout


@pytest.mark.parametrize("output_format", list(OutputFormat))
@pytest.mark.parametrize(
    "changes",
    [
        {"oblique_deg": 12.0, "readout_axis": "column"},
        {"orientation": "axial"},
        {"orientation": "coronal", "oblique_deg": -7.0},
    ],
)
def test_oblique_and_other_orientations_round_trip(
    tmp_path: Path, output_format: OutputFormat, changes: dict[str, object]
) -> None:
    request = SimulationRequest(seed=2, base=SEED_PROTOCOL.with_changes(fov_mm=SMALL_FOV_MM, **changes))
    export_small(tmp_path, request, format=output_format)
    case = generate_case(request.seed, request.acquisition())
    readback = read_mr_series(tmp_path)
    assert np.array_equal(readback.echoes, case.echoes)
    assert np.allclose(readback.geometry.affine, case.geometry.affine, atol=AFFINE_TOLERANCE_MM, rtol=0.0)
