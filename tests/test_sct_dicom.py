"""The sCT as a DICOM CT series: what navigation systems and PACS read must hold, checked with real tools.

Each form of the simulator's MR export (classic files and one Enhanced multi-frame object) is read with the
agent's own header reader to build the image references, the phantom's CT stands in for the model's output, and
the written series is checked with dicom3tools' dciodvfy, dcm2niix + nibabel (geometry as a converter sees it),
nibabel's DICOM wrapper (geometry from IPP/IOP) and pydicom (pixels, UIDs, references, markings).
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scanner_support import DCIODVFY, needs_dciodvfy
from sct_dicom_support import MODEL_ID, MODEL_VERSION, PROTOCOL_ID, export_mr, sct_volume, small_case

from agent.dicom_out.sct_series import (
    HU_MAX,
    HU_MIN,
    SERIES_DESCRIPTION,
    SctSeriesError,
    WrittenSeries,
    write_sct_series,
)
from agent.file_labels import file_label
from agent.records import SctVolume, payload_sha256
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportSummary, OutputFormat
from sct_core.geometry import VolumeGeometry

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its readers are experimental; only its plain-geometry wrapper is used.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import dicomwrappers

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Geometry read back from the DICOM headers (text DS values) must match the grid to this, mm.
HEADER_TOLERANCE_MM = 1e-4
#: dcm2niix stores the NIfTI affine as float32: compare its affines to this, mm (the brief's bound).
NIFTI_TOLERANCE_MM = 1e-3
SERIES_NUMBER_OFFSET = 1000


def _find_dcm2niix() -> str | None:
    beside = Path(sys.executable).parent / "dcm2niix"
    return str(beside) if beside.exists() else shutil.which("dcm2niix")


DCM2NIIX = _find_dcm2niix()
needs_dcm2niix = pytest.mark.skipif(
    DCM2NIIX is None, reason="dcm2niix is not installed (pip install dcm2niix)"
)


# --------------------------------------------------------------------------------------------- helpers


def run_dciodvfy(path: Path) -> tuple[int, list[str], list[str]]:
    """(exit status, Error lines, Warning lines). IOD violations are printed with exit status 0."""
    assert DCIODVFY is not None
    result = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, encoding="latin-1", check=False, timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    return (
        result.returncode,
        [line for line in lines if "Error" in line],
        [line for line in lines if "Warning" in line],
    )


def nibabel_dicom_affine(path: Path) -> npt.NDArray[np.float64]:
    """nibabel's voxel (row, column, slice) -> LPS matrix for one DICOM image, from its IPP/IOP/PixelSpacing."""
    wrapper = dicomwrappers.wrapper_from_file(str(path))  # type: ignore[no-untyped-call]
    return np.asarray(wrapper.affine, dtype=np.float64)


def canonical(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image reoriented (axes permuted and flipped, voxels untouched) to the closest RAS+ layout."""
    result: nib.Nifti1Image = nib.as_closest_canonical(image)  # type: ignore[no-untyped-call]
    return result


def load_nifti(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image), type(image)
    return image


def grid_image(hu: npt.NDArray[np.int16], geometry: VolumeGeometry) -> nib.Nifti1Image:
    """The volume on its grid as a NIfTI: [slice, row, column] indices, LPS -> RAS."""
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine
    image: nib.Nifti1Image = nib.Nifti1Image(hu.astype(np.float32), ras_affine)  # type: ignore[no-untyped-call]
    return image


def leftovers(folder: Path) -> list[str]:
    """Hidden (temporary) entries in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


# -------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True, slots=True)
class Written:
    case: PhantomCase
    mr: ExportSummary
    volume: SctVolume
    series: WrittenSeries
    out_folder: Path


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return small_case()


@pytest.fixture(
    scope="module", params=[OutputFormat.CLASSIC, OutputFormat.ENHANCED], ids=["classic", "enhanced"]
)
def written(
    request: pytest.FixtureRequest, case: PhantomCase, tmp_path_factory: pytest.TempPathFactory
) -> Written:
    output_format: OutputFormat = request.param
    root = tmp_path_factory.mktemp(f"sct-{output_format.value}")
    mr = export_mr(case, root / "mr", output_format)
    volume = sct_volume(case, mr.paths)
    out_folder = root / "sct"
    series = write_sct_series(
        volume, out_folder, series_number_offset=SERIES_NUMBER_OFFSET, institution="Test Hospital"
    )
    return Written(case=case, mr=mr, volume=volume, series=series, out_folder=out_folder)


def read_series(series: WrittenSeries) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in series.files]


# ----------------------------------------------------------------------------------------------- tests


@needs_dciodvfy
def test_every_file_passes_dciodvfy_without_errors(written: Written) -> None:
    for path in written.series.files:
        returncode, errors, warnings = run_dciodvfy(path)
        for line in warnings:
            print(f"dciodvfy {path.name}: {line}")
        assert returncode == 0, path.name
        assert errors == [], f"{path.name}: {errors}"


def test_files_are_ct_image_storage_in_explicit_vr_little_endian(written: Written) -> None:
    series = written.series
    assert len(series.files) == written.case.geometry.shape[0]
    assert [p.parent for p in series.files] == [series.folder] * len(series.files)
    assert sorted(p.name for p in series.folder.iterdir()) == [p.name for p in series.files]
    for path, ds in zip(series.files, read_series(series), strict=True):
        with path.open("rb") as handle:
            handle.seek(128)
            assert handle.read(4) == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.ImplementationClassUID
        assert ds.Modality == "CT"


def test_hu_read_back_through_the_rescale_equal_the_volume(written: Written) -> None:
    assert written.series.clipped_voxels == 0
    for k, ds in enumerate(read_series(written.series)):
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (-1024.0, 1.0, "HU")
        assert ds.pixel_array.max() <= 4095
        hu = apply_modality_lut(ds.pixel_array, ds)
        assert np.array_equal(hu, written.volume.hu[k]), f"slice {k}"
        assert [float(v) for v in ds.WindowCenter] == [450.0, 40.0]
        assert [float(v) for v in ds.WindowWidth] == [1500.0, 400.0]


def test_patient_study_and_frame_of_reference_are_the_mrs(written: Written) -> None:
    mr = pydicom.dcmread(written.mr.paths[0], stop_before_pixels=True)
    for ds in read_series(written.series):
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyDescription",
            "FrameOfReferenceUID",
            "PositionReferenceIndicator",
            "SpecificCharacterSet",
        ):
            assert ds[keyword].value == mr[keyword].value, keyword
        assert ds.StudyInstanceUID == written.mr.study_instance_uid
        assert ds.FrameOfReferenceUID == written.mr.frame_of_reference_uid


def test_series_and_instances_are_new(written: Written) -> None:
    series = written.series
    datasets = read_series(series)
    assert series.series_instance_uid != written.mr.series_instance_uid
    assert {ds.SeriesInstanceUID for ds in datasets} == {series.series_instance_uid}
    assert tuple(ds.SOPInstanceUID for ds in datasets) == series.sop_instance_uids
    assert len(set(series.sop_instance_uids)) == len(datasets)
    mr_instances = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in written.mr.paths}
    assert not mr_instances & set(series.sop_instance_uids)
    mr_series_number = int(pydicom.dcmread(written.mr.paths[0], stop_before_pixels=True).SeriesNumber)
    assert {int(ds.SeriesNumber) for ds in datasets} == {mr_series_number + SERIES_NUMBER_OFFSET}
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(datasets) + 1))
    assert series.folder.name == f"sct-{written.volume.acquisition_id[:16]}-{mr_series_number + 1000}"


def test_series_is_marked_derived_synthetic_and_names_the_model(written: Written) -> None:
    for ds in read_series(written.series):
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == SERIES_DESCRIPTION
        assert len(ds.SeriesDescription) <= 64
        assert "SYNTHETIC" in ds.ImageComments and "NOT FOR DIAGNOSIS" in ds.ImageComments
        assert MODEL_ID in ds.ImageComments and MODEL_VERSION in ds.ImageComments
        for text in (MODEL_ID, MODEL_VERSION, PROTOCOL_ID, "Synthetic"):
            assert text in ds.DerivationDescription
        assert "DerivationCodeSequence" not in ds
        assert ds.Manufacturer == "sct-edge-agent"
        assert ds.InstitutionName == "Test Hospital"
        assert ds.BurnedInAnnotation == "NO" and ds.LossyImageCompression == "00"
        assert "KVP" in ds and ds.KVP in ("", None)
        (equipment,) = ds.ContributingEquipmentSequence
        (purpose,) = equipment.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
        assert (equipment.Manufacturer, equipment.ManufacturerModelName) == ("sct-edge-agent", MODEL_ID)
        assert equipment.SoftwareVersions == MODEL_VERSION
        assert equipment.ContributionDateTime


def test_each_slice_references_every_echo_of_its_mr_slice(written: Written) -> None:
    mr_headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in written.mr.paths}
    echoes = written.mr.shape[0]
    for k, ds in enumerate(read_series(written.series)):
        refs = written.volume.sources[k]
        assert len(refs) == echoes == 2
        items = ds.SourceImageSequence
        found = [
            (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID, item.get("ReferencedFrameNumber"))
            for item in items
        ]
        expected = [
            (
                mr_headers[ref.path].SOPClassUID,
                mr_headers[ref.path].SOPInstanceUID,
                None if ref.frame is None else ref.frame + 1,
            )
            for ref in refs
        ]
        assert found == expected, f"slice {k}"
        for item in items:
            (purpose,) = item.PurposeOfReferenceCodeSequence
            assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
        # The referenced images really are this slice of each echo: same position, ascending echo time.
        for item, ref in zip(items, refs, strict=True):
            mr = mr_headers[ref.path]
            if ref.frame is None:
                position = [float(v) for v in mr.ImagePositionPatient]
                echo_time = float(mr.EchoTime)
            else:
                frame = mr.PerFrameFunctionalGroupsSequence[int(item.ReferencedFrameNumber) - 1]
                position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
                echo_time = float(frame.MREchoSequence[0].EffectiveEchoTime)
            assert np.allclose(
                position, [float(v) for v in ds.ImagePositionPatient], atol=HEADER_TOLERANCE_MM
            )
            assert echo_time == ref.echo_time_ms
        (series_item,) = ds.ReferencedSeriesSequence
        assert series_item.SeriesInstanceUID == written.mr.series_instance_uid
        assert {i.ReferencedSOPInstanceUID for i in series_item.ReferencedInstanceSequence} == {
            sop for _, sop, _ in expected
        }


def test_geometry_is_the_mr_grid(written: Written) -> None:
    """IPP/IOP/PixelSpacing as written, and the per-slice affine nibabel's DICOM wrapper computes from them."""
    geometry = written.case.geometry
    first_echo = {ref_slice[0].path: ref_slice[0] for ref_slice in written.volume.sources}
    worst = 0.0
    for k, (path, ds) in enumerate(zip(written.series.files, read_series(written.series), strict=True)):
        assert np.allclose(
            [float(v) for v in ds.ImageOrientationPatient], geometry.image_orientation_patient, atol=1e-9
        )
        assert np.allclose([float(v) for v in ds.PixelSpacing], geometry.pixel_spacing, atol=1e-9)
        assert (
            float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == pytest.approx(geometry.spacing[0])
        )
        expected_ipp = geometry.image_position_patient(k)
        assert np.allclose(
            [float(v) for v in ds.ImagePositionPatient], expected_ipp, atol=HEADER_TOLERANCE_MM, rtol=0
        )
        # nibabel: voxel (row, column, 0) -> LPS; columns 0 and 1 are the in-plane steps, column 3 the IPP.
        affine = nibabel_dicom_affine(path)
        expected = np.column_stack(
            [
                np.asarray(geometry.column_direction) * geometry.spacing[1],
                np.asarray(geometry.row_direction) * geometry.spacing[2],
                expected_ipp,
            ]
        )
        difference = float(np.abs(affine[:3, [0, 1, 3]] - expected).max())
        worst = max(worst, difference)
        assert difference <= HEADER_TOLERANCE_MM, f"slice {k}: {difference} mm"
    if written.mr.format is OutputFormat.CLASSIC:
        # The same nibabel affine for the MR image each slice was computed from (first echo).
        for k, path in enumerate(written.series.files):
            mr_path = written.volume.sources[k][0].path
            assert mr_path in first_echo
            mr_affine = nibabel_dicom_affine(mr_path)
            sct_affine = nibabel_dicom_affine(path)
            difference = float(np.abs(mr_affine[:3, [0, 1, 3]] - sct_affine[:3, [0, 1, 3]]).max())
            worst = max(worst, difference)
            assert difference <= HEADER_TOLERANCE_MM, f"slice {k}: {difference} mm"
    print(f"{written.mr.format.value}: largest nibabel DICOM-affine difference {worst:.3g} mm")


def run_dcm2niix(folder: Path, out_dir: Path, name: str) -> list[Path]:
    assert DCM2NIIX is not None
    out_dir.mkdir(parents=True)
    result = subprocess.run(
        [DCM2NIIX, "-b", "n", "-z", "n", "-f", name, "-o", str(out_dir), str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out_dir.glob("*.nii"))


@needs_dcm2niix
def test_dcm2niix_places_the_sct_exactly_on_the_mr(written: Written, tmp_path: Path) -> None:
    """Converted by dcm2niix, the sCT and the MR's first echo have the same grid (affines within 1e-3 mm after
    nibabel brings both to the closest canonical orientation), and so does the grid itself; the voxels are the
    volume's HU."""
    mr_files = run_dcm2niix(written.mr.out_dir, tmp_path / "mr", "e%e")
    (sct_file,) = run_dcm2niix(written.series.folder, tmp_path / "sct", "sct")
    first_echo = [p for p in mr_files if p.name.startswith("e1")]
    assert len(first_echo) == 1, [p.name for p in mr_files]
    mr = canonical(load_nifti(first_echo[0]))
    sct = canonical(load_nifti(sct_file))
    expected = canonical(grid_image(written.volume.hu, written.case.geometry))
    assert mr.shape == sct.shape == expected.shape
    mr_difference = float(np.abs(sct.affine - mr.affine).max())
    grid_difference = float(np.abs(sct.affine - expected.affine).max())
    print(
        f"{written.mr.format.value}: dcm2niix affine sCT vs MR echo 1 {mr_difference:.3g} mm, "
        f"sCT vs grid {grid_difference:.3g} mm"
    )
    assert mr_difference <= NIFTI_TOLERANCE_MM
    assert grid_difference <= NIFTI_TOLERANCE_MM
    assert np.array_equal(
        np.asarray(sct.dataobj, dtype=np.float64), np.asarray(expected.dataobj, dtype=np.float64)
    )


def test_no_temporary_folder_remains(written: Written) -> None:
    assert leftovers(written.out_folder) == []
    assert [p.name for p in written.out_folder.iterdir()] == [written.series.folder.name]


def test_the_same_volume_written_again_reuses_its_complete_series(written: Written, tmp_path: Path) -> None:
    """A restart after a crash that came between writing and journalling writes the same volume again: the
    series on disk is that series (same derived UIDs), so it is returned, not written twice."""
    first = write_sct_series(written.volume, tmp_path)
    mtimes = [f.stat().st_mtime_ns for f in first.files]
    second = write_sct_series(written.volume, tmp_path)
    assert (first.reused, second.reused) == (False, True)
    assert second.folder == first.folder
    assert (second.series_instance_uid, second.sop_instance_uids) == (
        first.series_instance_uid,
        first.sop_instance_uids,
    )
    assert [f.stat().st_mtime_ns for f in second.files] == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]


def test_another_volume_of_the_same_acquisition_gets_its_own_series(written: Written, tmp_path: Path) -> None:
    first = write_sct_series(written.volume, tmp_path)
    hu = written.volume.hu.copy()
    hu[0, 0, 0] += 1
    other = replace(written.volume, hu=hu, sha256=payload_sha256(hu))
    second = write_sct_series(other, tmp_path)
    assert second.folder.name == f"{first.folder.name}-2"
    assert second.series_instance_uid != first.series_instance_uid
    assert not set(second.sop_instance_uids) & set(first.sop_instance_uids)
    assert len(list(first.folder.iterdir())) == len(list(second.folder.iterdir())) == len(first.files)
    assert leftovers(tmp_path) == []


def test_a_half_copied_series_with_the_same_uid_is_not_taken_for_the_written_one(
    written: Written, tmp_path: Path
) -> None:
    first = write_sct_series(written.volume, tmp_path)
    first.files[-1].unlink()
    second = write_sct_series(written.volume, tmp_path)
    assert not second.reused
    assert second.folder.name == f"{first.folder.name}-2"
    assert all(f.is_file() for f in second.files)


# ------------------------------------------------------------------------------------ refusals, failures


@pytest.fixture(scope="module")
def classic(case: PhantomCase, tmp_path_factory: pytest.TempPathFactory) -> ExportSummary:
    return export_mr(case, tmp_path_factory.mktemp("classic") / "mr", OutputFormat.CLASSIC)


def copy_export(mr: ExportSummary, folder: Path) -> list[Path]:
    shutil.copytree(mr.out_dir, folder)
    return [folder / p.name for p in mr.paths]


def test_out_of_range_hu_are_clipped_and_counted(
    case: PhantomCase, classic: ExportSummary, tmp_path: Path
) -> None:
    hu = case.ct_hu.copy()
    hu[0, 0, :3] = [-3000, HU_MIN - 1, HU_MAX + 1]
    hu[-1, -1, -1] = np.iinfo(np.int16).max
    series = write_sct_series(sct_volume(case, classic.paths, hu), tmp_path)
    assert series.clipped_voxels == 4
    first = pydicom.dcmread(series.files[0])
    last = pydicom.dcmread(series.files[-1])
    assert apply_modality_lut(first.pixel_array, first)[0, :3].tolist() == [HU_MIN, HU_MIN, HU_MAX]
    assert apply_modality_lut(last.pixel_array, last)[-1, -1] == HU_MAX


def test_a_missing_source_file_is_refused_and_nothing_is_written(
    case: PhantomCase, classic: ExportSummary, tmp_path: Path
) -> None:
    paths = copy_export(classic, tmp_path / "mr")
    volume = sct_volume(case, paths)
    paths[7].unlink()
    out = tmp_path / "out"
    with pytest.raises(SctSeriesError, match=rf"{file_label(paths[7])}: file: found \(missing\)"):
        write_sct_series(volume, out)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "FrameOfReferenceUID"])
def test_a_source_from_another_study_or_frame_of_reference_is_refused(
    case: PhantomCase, classic: ExportSummary, tmp_path: Path, keyword: str
) -> None:
    paths = copy_export(classic, tmp_path / "mr")
    volume = sct_volume(case, paths)
    odd = paths[5]
    ds = pydicom.dcmread(odd)
    setattr(ds, keyword, "1.2.3.4.5")
    ds.save_as(odd)
    out = tmp_path / "out"
    with pytest.raises(
        SctSeriesError,
        match=rf"{file_label(odd)}: {keyword}: found a different UID; expected the {keyword} of",
    ) as caught:
        write_sct_series(volume, out)
    assert caught.value.attribute == keyword
    # Neither the patient's identity, nor a UID, nor a file name appears in an error message.
    for identity in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate), "1.2.3.4.5", odd.name):
        assert identity not in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_replaced_source_file_is_refused(case: PhantomCase, classic: ExportSummary, tmp_path: Path) -> None:
    paths = copy_export(classic, tmp_path / "mr")
    volume = sct_volume(case, paths)
    shutil.copy(paths[2], paths[3])  # another image under a referenced name
    with pytest.raises(
        SctSeriesError, match=rf"{file_label(paths[3])}: SOPInstanceUID: found .*file replaced"
    ):
        write_sct_series(volume, tmp_path / "out")


def test_a_volume_that_disagrees_with_its_grid_or_sources_is_refused(
    case: PhantomCase, classic: ExportSummary, tmp_path: Path
) -> None:
    volume = sct_volume(case, classic.paths)
    with pytest.raises(SctSeriesError, match=r"hu: found shape \(9, 81, 81\); expected the grid's shape"):
        write_sct_series(replace(volume, hu=volume.hu[1:]), tmp_path)
    with pytest.raises(
        SctSeriesError, match=r"sources: found 9 slices; expected one entry per slice of the grid"
    ):
        write_sct_series(replace(volume, sources=volume.sources[1:]), tmp_path)
    with pytest.raises(SctSeriesError, match=r"sources: found slices with \[1, 2\] images"):
        write_sct_series(replace(volume, sources=(volume.sources[0][:1], *volume.sources[1:])), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_out_folder_that_cannot_be_created_is_refused(
    case: PhantomCase, classic: ExportSummary, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(SctSeriesError, match=r"out_folder: found .*; expected a writable folder"):
        write_sct_series(sct_volume(case, classic.paths), blocker / "sct")


_WRITE_UNDER_FILE_SIZE_LIMIT = """
import pickle, resource, sys
from pathlib import Path
from agent.dicom_out.sct_series import SctSeriesError, write_sct_series
volume = pickle.loads(Path(sys.argv[1]).read_bytes())
# Files larger than 4 KiB fail with EFBIG (Python ignores SIGXFSZ): the first slice fails halfway through.
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_sct_series(volume, Path(sys.argv[2]))
except SctSeriesError as error:
    print(error)
    sys.exit(3)
"""


def test_a_failure_halfway_through_writing_leaves_no_partial_series(
    case: PhantomCase, classic: ExportSummary, tmp_path: Path
) -> None:
    """A real write failure (the file-size limit, as a full disk would) after the temporary folder exists."""
    volume_file = tmp_path / "volume.pickle"
    volume_file.write_bytes(pickle.dumps(sct_volume(case, classic.paths)))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", _WRITE_UNDER_FILE_SIZE_LIMIT, str(volume_file), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
        timeout=120,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "file: found File too large (CT0001.dcm); expected the series written to disk" in result.stdout
    assert out.is_dir() and list(out.iterdir()) == []
