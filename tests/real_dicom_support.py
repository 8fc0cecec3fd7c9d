"""Where the real scanner exports live for tests: ../shared/dicom beside the project root, read in place.

The folder is never copied into the repository. CI has it; where it is absent the tests that need it skip with
a reason that says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DICOM = REPO_ROOT.parent / "shared" / "dicom"
#: A test-only protocol matching the real Philips 3D T1-FFE dual-echo export (catalog #1 and #2).
PHILIPS_TEST_PROTOCOL = Path(__file__).resolve().parent / "protocols" / "philips_t1ffe_3mm_3t.toml"

PHILIPS_CLASSIC = "dcm_qa_philips_enh/2001_fcMRI_FieldMap_3D_T1FFE_2echo_classic"
PHILIPS_ENHANCED = "dcm_qa_philips_enh/2001_fcMRI_FieldMap_3D_T1FFE_2echo_enhanced"
PHILIPS_RAW = "dcm_qa_philips_enh/2001_fcMRI_FieldMap_RawDataStorage"
SIEMENS_SPLIT_ECHO1 = "dcm_qa_xa30i/9001_gre_field_mapping_2D_echo1_mag"
SIEMENS_SPLIT_ECHO2 = "dcm_qa_xa30i/9002_gre_field_mapping_2D_echo2_mag"
#: A small real classic file (64 x 64, Siemens E11) to damage in bad-input tests.
SIEMENS_2D_MAGNITUDE = "dcm_qa_fmap/Siemens_2_gre_field_mapping_2D_2echo_mag"


def shared_dicom() -> Path:
    """The folder, or a skip naming what is missing."""
    if not SHARED_DICOM.is_dir():
        pytest.skip(
            f"real scanner DICOM not found at {SHARED_DICOM} (../shared/dicom beside the project root)"
        )
    return SHARED_DICOM


def series_files(folder: str) -> list[Path]:
    return sorted(p for p in (shared_dicom() / folder).iterdir() if p.is_file())
