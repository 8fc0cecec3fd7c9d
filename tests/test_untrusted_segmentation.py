"""The DICOM Segmentation of the regions not to trust, written with the sCT series from a real simulated MR
export: it passes dciodvfy, references the sCT images the agent wrote (same study and frame of reference), is
marked as derived from synthetic data, its mask read back equals the regions found, a volume with nothing
flagged gets none, and C-STORE sends it with the series."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import SegmentationStorage
from scanner_support import DCIODVFY, needs_dciodvfy
from sct_dicom_support import (
    PEER_AE,
    StartStorescp,
    export_mr,
    free_port,
    needs_storescp,
    received,
    sct_volume,
    small_case,
    storescp_launcher,
)

from agent.dicom_out.c_store import StorePeer, store_series
from agent.dicom_out.sct_series import WrittenSeries, write_sct_series
from agent.dicom_out.untrusted_segmentation import SEGMENT_LABEL, SEGMENTATION_FILE
from agent.inference.untrusted_regions import flag_report
from agent.records import SctVolume, confidence_sha256
from engines.confidence.spec import ConfidenceSpec
from engines.scanner.export import OutputFormat

SPEC = ConfidenceSpec(method="feature-mahalanobis", threshold=64, min_region_mm3=2.0)
TRUSTED = 230


@dataclass(frozen=True, slots=True)
class Flagged:
    volume: SctVolume
    series: WrittenSeries
    expected_mask: npt.NDArray[np.bool_]


def checked(volume: SctVolume, confidence: npt.NDArray[np.uint8]) -> SctVolume:
    """``volume`` with its confidence and the regions the agent's search finds in it."""
    return replace(
        volume,
        confidence=confidence,
        confidence_sha256=confidence_sha256(confidence),
        confidence_method=SPEC.method,
        confidence_threshold=SPEC.threshold,
        flagged=flag_report(confidence, SPEC, volume.geometry.spacing),
    )


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory) -> Flagged:
    root = tmp_path_factory.mktemp("seg")
    case = small_case()
    mr = export_mr(case, root / "mr", OutputFormat.CLASSIC)
    volume = sct_volume(case, mr.paths)
    confidence = np.full(volume.geometry.shape, TRUSTED, dtype=np.uint8)
    slices = volume.geometry.shape[0]
    confidence[1 : slices - 1, 10:30, 12:20] = 20  # a screw-like bar across slices
    confidence[2:4, 40:44, 30:34] = 50  # a small second region
    confidence[0, 0, 0] = 10  # one isolated voxel: below min_region_mm3, not flagged
    volume = checked(volume, confidence)
    assert volume.flagged is not None and volume.flagged.count == 2
    expected = np.zeros(volume.geometry.shape, dtype=bool)
    expected[1 : slices - 1, 10:30, 12:20] = True
    expected[2:4, 40:44, 30:34] = True
    series = write_sct_series(volume, root / "sct")
    return Flagged(volume, series, expected)


def test_the_segmentation_is_written_in_the_series_folder_and_sent_with_it(flagged: Flagged) -> None:
    assert flagged.series.segmentation == flagged.series.folder / SEGMENTATION_FILE
    assert flagged.series.segmentation.is_file()
    assert flagged.series.all_files == (*flagged.series.files, flagged.series.segmentation)


@needs_dciodvfy
def test_the_segmentation_passes_dciodvfy(flagged: Flagged) -> None:
    assert DCIODVFY is not None and flagged.series.segmentation is not None
    import subprocess  # noqa: PLC0415 - only with dciodvfy

    result = subprocess.run(
        [DCIODVFY, str(flagged.series.segmentation)],
        capture_output=True,
        encoding="latin-1",
        check=False,
        timeout=120,
    )
    lines = (result.stdout + result.stderr).splitlines()
    for line in lines:
        if "Warning" in line:
            print(f"dciodvfy: {line}")
    assert result.returncode == 0
    assert not [line for line in lines if "Error" in line]


def test_its_mask_read_back_equals_the_flagged_regions(flagged: Flagged) -> None:
    assert flagged.series.segmentation is not None
    seg = hd.seg.segread(flagged.series.segmentation)
    cts = [pydicom.dcmread(path, stop_before_pixels=True) for path in flagged.series.files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ct.SOPInstanceUID) for ct in cts],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    mask = np.asarray(pixels[..., 0] > 0)
    assert mask.shape == flagged.expected_mask.shape
    assert np.array_equal(mask, flagged.expected_mask)
    assert flagged.volume.flagged is not None
    assert np.array_equal(mask, flagged.volume.flagged.mask)


def test_it_references_the_sct_images_in_their_study_and_frame_of_reference(flagged: Flagged) -> None:
    assert flagged.series.segmentation is not None
    seg = pydicom.dcmread(flagged.series.segmentation)
    ct = pydicom.dcmread(flagged.series.files[0], stop_before_pixels=True)
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG"
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (ct.StudyInstanceUID, ct.FrameOfReferenceUID)
    assert (seg.PatientID, seg.PatientName) == (ct.PatientID, ct.PatientName)
    assert seg.SeriesInstanceUID not in (ct.SeriesInstanceUID,)
    referenced = {item.SeriesInstanceUID: item for item in seg.ReferencedSeriesSequence}
    assert list(referenced) == [flagged.series.series_instance_uid]
    instances = {
        i.ReferencedSOPInstanceUID for i in referenced[ct.SeriesInstanceUID].ReferencedInstanceSequence
    }
    assert instances <= set(flagged.series.sop_instance_uids) and instances
    # Each frame names the sCT image it lies on.
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID in flagged.series.sop_instance_uids


def test_it_says_it_is_derived_from_synthetic_ct_and_names_the_model_and_threshold(flagged: Flagged) -> None:
    assert flagged.series.segmentation is not None
    seg = pydicom.dcmread(flagged.series.segmentation, stop_before_pixels=True)
    assert "SYNTHETIC" in seg.SeriesDescription and "NOT FOR DIAGNOSIS" in seg.SeriesDescription
    assert "NOT FOR DIAGNOSIS" in seg.ImageComments and "threshold 64" in seg.ImageComments
    assert flagged.volume.model_id in seg.ImageComments
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == SEGMENT_LABEL and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "111207"
    assert segment.SegmentAlgorithmName == flagged.volume.model_id
    models = [e.get("ManufacturerModelName") for e in seg.ContributingEquipmentSequence]
    assert flagged.volume.model_id in models
    assert seg.SegmentationType == "BINARY"


def test_the_same_volume_written_again_reuses_series_and_segmentation(
    flagged: Flagged, tmp_path: Path
) -> None:
    again = write_sct_series(flagged.volume, flagged.series.folder.parent)
    assert again.reused and again.segmentation == flagged.series.segmentation


def test_a_volume_with_nothing_flagged_gets_no_segmentation(flagged: Flagged, tmp_path: Path) -> None:
    clear = checked(flagged.volume, np.full(flagged.volume.geometry.shape, TRUSTED, dtype=np.uint8))
    assert clear.flagged is not None and clear.flagged.count == 0
    series = write_sct_series(replace(clear, sha256="0" * 64), tmp_path)
    assert series.segmentation is None
    assert sorted(p.name for p in series.folder.iterdir()) == [p.name for p in series.files]


@pytest.fixture
def storescp(tmp_path: Path) -> object:
    with storescp_launcher(tmp_path) as start:
        yield start


@needs_storescp
def test_c_store_sends_the_segmentation_with_the_series(flagged: Flagged, storescp: StartStorescp) -> None:
    port = free_port()
    folder = storescp(port)
    result = store_series(
        flagged.series.all_files, StorePeer(PEER_AE, "127.0.0.1", port), calling_ae="SCTEDGE"
    )
    stored = received(folder)
    assert result.stored == len(flagged.series.all_files) == len(stored)
    assert sum(str(ds.SOPClassUID) == SegmentationStorage for ds in stored.values()) == 1
