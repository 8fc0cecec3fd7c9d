"""Reference CT series: same patient, study and frame of reference as the MR, on the MR grid, HU exact."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scanner_support import AFFINE_TOLERANCE_MM, dciodvfy, export_small, needs_dciodvfy, small_request

from engines.phantom.generate import generate_case
from engines.scanner.export import ExportSummary, OutputFormat
from engines.scanner.readback import read_ct_series, read_mr_series


@pytest.fixture(scope="module")
def with_ct(tmp_path_factory: pytest.TempPathFactory) -> ExportSummary:
    root = tmp_path_factory.mktemp("with_ct")
    return export_small(root / "mr", format=OutputFormat.ENHANCED, ct_dir=root / "ct")


def test_ct_reads_back_to_the_phantom_hu_on_the_mr_grid(with_ct: ExportSummary) -> None:
    request = small_request()
    case = generate_case(request.seed, request.acquisition())
    ct = read_ct_series(with_ct.ct_paths[0].parent)
    assert len(with_ct.ct_paths) == case.geometry.shape[0]
    assert ct.hu.dtype == np.int16
    assert np.array_equal(ct.hu, case.ct_hu)
    assert np.allclose(ct.geometry.affine, case.geometry.affine, atol=AFFINE_TOLERANCE_MM, rtol=0.0)


def test_ct_shares_patient_study_and_frame_of_reference_but_not_the_series(with_ct: ExportSummary) -> None:
    mr = read_mr_series(with_ct.out_dir)
    ct = read_ct_series(with_ct.ct_paths[0].parent)
    assert ct.study_instance_uid == mr.study_instance_uid == with_ct.study_instance_uid
    assert ct.frame_of_reference_uid == mr.frame_of_reference_uid
    assert ct.series_instance_uid == with_ct.ct_series_instance_uid != mr.series_instance_uid
    mr_ds = pydicom.dcmread(with_ct.paths[0], stop_before_pixels=True)
    ct_ds = pydicom.dcmread(with_ct.ct_paths[0], stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID"):
        assert ct_ds[keyword].value == mr_ds[keyword].value, keyword
    assert ct_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert "SIMULATED" in ct_ds.SeriesDescription
    assert list(ct_ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (float(ct_ds.RescaleIntercept), float(ct_ds.RescaleSlope), ct_ds.RescaleType) == (
        -1024.0,
        1.0,
        "HU",
    )
    assert float(ct_ds.KVP) == 120.0


@needs_dciodvfy
def test_dciodvfy_finds_no_errors_in_ct_files(with_ct: ExportSummary) -> None:
    for path in (with_ct.ct_paths[0], with_ct.ct_paths[-1]):
        returncode, errors = dciodvfy(path)
        assert returncode == 0
        assert errors == []
