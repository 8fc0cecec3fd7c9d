"""Pathology in the phantom: each changes what it should and only near its object, with the physics' scaling,
deterministically, while a normal case stays bit-identical; the simulator exports it and the agent accepts it.

Cases are small FOVs at 1 mm voxels around the objects of seed 1, noiseless unless noise matters: with the same
seed and acquisition, a pathological and a normal case differ only by what the pathology did.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from scipy import ndimage

from agent.cli import check, main
from engines.model.normalisation import Normalisation
from engines.phantom.acquisition import Acquisition
from engines.phantom.case import CT_HU_MAX, PhantomCase
from engines.phantom.generate import generate_case
from engines.phantom.mr_signal import RECEIVER_GAIN
from engines.phantom.pathology import PATHOLOGIES, Pathology, parse_pathologies
from engines.phantom.pathology.ct_metal import filtered_back_projection, project
from engines.phantom.pathology.mr_effects import FOOTPRINT_SIGNAL
from engines.phantom.pathology.placement import motion_pattern
from engines.phantom.pathology.susceptibility import b0_in_array_axes, dipole_field_ppm
from engines.phantom.tissues import Tissue
from engines.scanner.export import ExportOptions, SimulationRequest, simulate
from engines.training.cases import prepare_case, training_acquisition
from engines.training.hard_cases import training_subject
from engines.training.recipe import TRAIN_SEED_BASE, TrainingRecipe
from sct_core.geometry import VolumeGeometry

#: sha256 over echoes, CT and labels of two small cases, recorded on ``main`` before pathology existed.
NORMAL_HASHES = {
    (11, (120.0, 120.0, 27.0)): "2fbc38c3a1684e97a61bc8dc4c6bcfc459514c1649c4ec58f81bb89a228e3169",
    (7, (60.0, 60.0, 9.0)): "1f573cc2c00437d2bd9d9a57d0a6ff08bf3b61792348bc341e2cf3aac65a60ad",
}
SEED = 1
#: Seed 1's L4-L5 construct, its lesion and metastases, and air in front of and behind the body for motion.
SCREW_FOV = Acquisition(fov_mm=(200.0, 130.0, 50.0), voxel_mm=(1.0, 1.0, 1.0), noise_scale=0.0)
LESION_FOV = Acquisition(fov_mm=(120.0, 90.0, 40.0), voxel_mm=(1.0, 1.0, 1.0), noise_scale=0.0)
MOTION_FOV = Acquisition(fov_mm=(80.0, 250.0, 18.0), voxel_mm=(1.0, 1.0, 1.0), noise_scale=0.0)
LESIONS = (Pathology.CALCIFIED_LESION, Pathology.SCLEROTIC_METASTASIS, Pathology.LYTIC_METASTASIS)
#: The footprint threshold in stored MR values.
FOOTPRINT_STORED = FOOTPRINT_SIGNAL * RECEIVER_GAIN


def _hash(case: PhantomCase) -> str:
    digest = hashlib.sha256()
    for array in (case.echoes, case.ct_hu, case.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _object_mask(case: PhantomCase, name_prefix: str) -> npt.NDArray[np.bool_]:
    labels = [o.label for o in case.anomaly_objects if o.name.startswith(name_prefix)]
    assert labels, f"no {name_prefix!r} in {[o.name for o in case.anomaly_objects]}"
    return np.isin(case.anomaly, labels)


def _voxel(case: PhantomCase, point_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    index = np.rint(np.linalg.inv(case.geometry.affine) @ np.array([*point_mm, 1.0]))[:3].astype(int)
    return int(index[0]), int(index[1]), int(index[2])


def _mr_change(case: PhantomCase, normal: PhantomCase) -> npt.NDArray[np.int64]:
    return np.asarray(np.abs(case.echoes.astype(np.int64) - normal.echoes))


@pytest.fixture(scope="module")
def screws() -> dict[str, tuple[PhantomCase, PhantomCase]]:
    """(with screws, without) per acquisition: 1.5 T 540 Hz/px, 3 T, 300 and 800 Hz/px, all of k-space."""
    variants = {
        "1.5T": SCREW_FOV,
        "3T": SCREW_FOV.with_changes(field_strength_t=3.0),
        "300Hz": SCREW_FOV.with_changes(pixel_bandwidth_hz=300.0),
        "800Hz": SCREW_FOV.with_changes(pixel_bandwidth_hz=800.0),
        "full k-space": SCREW_FOV.with_changes(sampling_fraction=(1.0, 1.0, 1.0)),
    }
    return {
        name: (generate_case(SEED, acq, pathologies=(Pathology.SCREWS,)), generate_case(SEED, acq))
        for name, acq in variants.items()
    }


@pytest.fixture(scope="module")
def lesions() -> tuple[PhantomCase, PhantomCase]:
    return generate_case(SEED, LESION_FOV, pathologies=LESIONS), generate_case(SEED, LESION_FOV)


# --- the normal phantom and the contract ------------------------------------------------------------------------


#: The hashes were pinned with OpenBLAS's Haswell (AVX2) kernels. OpenBLAS picks its kernels for the CPU it finds,
#: and its AVX-512 kernels round some sums differently: so the normal cases are generated under the same kernels
#: (a child process, as OPENBLAS_CORETYPE is read when the library loads), on any x86-64 CPU with AVX2.
PINNED_BLAS_KERNELS = {"OPENBLAS_CORETYPE": "Haswell"}
_NORMAL_CASE_SCRIPT = """
import json, sys
from engines.phantom.acquisition import Acquisition
from engines.phantom.generate import generate_case
sys.path.insert(0, "tests")
from test_phantom_pathology import _hash
seed, fov = json.loads(sys.argv[1])
case = generate_case(seed, Acquisition(fov_mm=tuple(fov)), pathologies=())
print(json.dumps([_hash(case), list(case.pathologies), len(case.anomaly_objects), bool(case.anomaly.any()),
                  list(case.anomaly.shape) == list(case.geometry.shape)]))
"""


@pytest.mark.parametrize(("seed", "fov"), list(NORMAL_HASHES))
def test_normal_case_is_bit_identical_to_the_phantom_before_pathology(
    seed: int, fov: tuple[float, float, float]
) -> None:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(
            f"the hashes were pinned with OpenBLAS's x86-64 Haswell kernels; this is {platform.machine()}"
        )
    result = subprocess.run(
        [sys.executable, "-c", _NORMAL_CASE_SCRIPT, json.dumps([seed, fov])],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **PINNED_BLAS_KERNELS},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    digest, pathologies, objects, any_anomaly, anomaly_on_grid = json.loads(result.stdout.splitlines()[-1])
    assert digest == NORMAL_HASHES[(seed, fov)]
    assert pathologies == [] and objects == 0
    assert anomaly_on_grid and not any_anomaly


def test_pathology_names_are_the_command_line_spelling_and_unknown_ones_are_refused() -> None:
    assert [p.value for p in PATHOLOGIES] == [
        "screws",
        "calcified-lesion",
        "sclerotic-metastasis",
        "lytic-metastasis",
        "motion",
    ]
    assert parse_pathologies(["motion", "screws", "motion"]) == (Pathology.SCREWS, Pathology.MOTION)
    with pytest.raises(
        ValueError, match=r"pathology: found 'rods'; expected one of screws, calcified-lesion"
    ):
        generate_case(SEED, LESION_FOV, pathologies=("rods",))


def test_same_seed_and_pathologies_give_the_same_case_and_workers_do_not_matter() -> None:
    acq = LESION_FOV.with_changes(noise_scale=1.0)
    a = generate_case(SEED, acq, pathologies=LESIONS, workers=2)
    b = generate_case(SEED, acq, pathologies=LESIONS, workers=1)
    for name in ("echoes", "ct_hu", "labels", "anomaly"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.anomaly_objects == b.anomaly_objects
    other = generate_case(SEED + 1, acq, pathologies=LESIONS)
    assert [o.centre_mm for o in other.anomaly_objects] != [o.centre_mm for o in a.anomaly_objects]


def test_adding_a_pathology_does_not_move_another(lesions: tuple[PhantomCase, PhantomCase]) -> None:
    alone = generate_case(SEED, LESION_FOV, pathologies=(Pathology.CALCIFIED_LESION,))
    together = {o.name: o.centre_mm for o in lesions[0].anomaly_objects}
    (lesion,) = alone.anomaly_objects
    assert together[lesion.name] == lesion.centre_mm


def test_anomaly_labels_number_the_described_objects(lesions: tuple[PhantomCase, PhantomCase]) -> None:
    case, normal = lesions
    assert case.pathologies == LESIONS
    assert [o.kind for o in case.anomaly_objects] == list(LESIONS)
    for k, obj in enumerate(case.anomaly_objects, start=1):
        assert obj.label == k
        assert obj.voxels == int((case.anomaly == k).sum()) > 0
        assert obj.level in {"L1", "L2", "L3", "L4"}
    assert int(case.anomaly.max()) == len(case.anomaly_objects)
    assert np.array_equal(case.labels, normal.labels)  # labels stay the subject's own anatomy


# --- screws ----------------------------------------------------------------------------------------------------


def test_screws_and_rods_are_metal_on_ct_and_void_on_mr(
    screws: dict[str, tuple[PhantomCase, PhantomCase]],
) -> None:
    case, normal = screws["1.5T"]
    names = [o.name for o in case.anomaly_objects]
    assert names == [
        "screw L4 left",
        "screw L4 right",
        "screw L5 left",
        "screw L5 right",
        "rod left",
        "rod right",
    ]
    for obj in case.anomaly_objects:
        k, r, c = _voxel(case, obj.centre_mm)
        if 0 <= k < case.ct_hu.shape[0]:
            assert case.ct_hu[k, r, c] == CT_HU_MAX, obj.name  # titanium clips at the top of 12 bits
        if obj.name.startswith("screw"):
            assert obj.size_mm in (40.0, 45.0, 50.0)
    metal = case.ct_hu == CT_HU_MAX
    assert metal.sum() > 2000
    for echo in (0, 1):  # no protons: what is left is ringing and signal displaced into the void
        assert case.echoes[echo][metal].mean() < 0.15 * normal.echoes[echo][metal].mean()


def test_ct_streaks_lie_in_the_axial_planes_of_the_metal_and_are_dark_and_bright(
    screws: dict[str, tuple[PhantomCase, PhantomCase]],
) -> None:
    case, normal = screws["1.5T"]
    metal = case.ct_hu == CT_HU_MAX
    change = case.ct_hu.astype(np.int64) - normal.ct_hu
    metal_rows = np.flatnonzero(metal.any(axis=(0, 2)))  # sagittal grid: rows are the axial planes
    far_rows = np.ones(case.ct_hu.shape[1], dtype=bool)
    far_rows[max(metal_rows[0] - 4, 0) : metal_rows[-1] + 5] = False  # beyond the CT point-spread
    assert far_rows.any()
    assert not change[:, far_rows, :].any()
    away = ~ndimage.binary_dilation(metal, iterations=6)
    streak = change[away]
    assert (streak < -100).sum() > 200 and (streak > 100).sum() > 200


def test_screw_footprint_grows_with_field_shrinks_with_bandwidth_and_is_larger_on_echo_2(
    screws: dict[str, tuple[PhantomCase, PhantomCase]],
) -> None:
    """The field offset scales with B0, so displacement and dephasing do; the displacement (Δf/BW pixels)
    shrinks with bandwidth; dephasing grows with TE. Measured on the images and on the ground truth."""
    footprint = {
        name: (_mr_change(*pair) > FOOTPRINT_STORED).sum(axis=(1, 2, 3)) for name, pair in screws.items()
    }
    truth = {name: int((pair[0].anomaly > 0).sum()) for name, pair in screws.items()}
    for echo in (0, 1):
        assert footprint["3T"][echo] > 1.2 * footprint["1.5T"][echo]
        assert footprint["300Hz"][echo] > 1.2 * footprint["800Hz"][echo]
    for name in screws:
        assert footprint[name][1] > footprint[name][0], name
    assert truth["3T"] > 1.2 * truth["1.5T"]
    assert truth["300Hz"] > 1.2 * truth["800Hz"]


def test_screw_ground_truth_is_the_metal_and_its_mr_footprint(
    screws: dict[str, tuple[PhantomCase, PhantomCase]],
) -> None:
    """The ground truth is the MR change before k-space sampling: with all of k-space acquired it is exactly the
    images' change; zero-filled k-space adds ringing around it, which wraps round the FOV along the sampled axes
    (slices and rows)."""
    case, normal = screws["full k-space"]
    changed = (_mr_change(case, normal) > FOOTPRINT_STORED).any(axis=0)
    labelled = case.anomaly > 0
    assert (changed & ~labelled).sum() < 0.005 * changed.sum()
    assert (labelled & ~changed).sum() < 0.05 * labelled.sum()
    case, normal = screws["1.5T"]
    changed = (_mr_change(case, normal) > FOOTPRINT_STORED).any(axis=0)
    labelled = case.anomaly > 0
    ringing = 12
    wrapped = np.pad(labelled, ((ringing, ringing), (ringing, ringing), (0, 0)), mode="wrap")
    near = ndimage.binary_dilation(wrapped, iterations=ringing)[ringing:-ringing, ringing:-ringing]
    assert (changed & ~near).sum() < 0.01 * changed.sum()
    assert (changed & labelled).sum() > 0.8 * changed.sum()
    metal = case.ct_hu == CT_HU_MAX
    distance = ndimage.distance_transform_edt(~metal, sampling=case.geometry.spacing)
    assert distance[labelled].max() < 50.0  # the field is computed within 40 mm of the metal


def test_metal_field_follows_the_dipole_kernel() -> None:
    """A sphere in a uniform field: ΔB/B0 = Δχ/3 · (a/r)³ · (3cos²θ - 1) outside, independent of orientation."""
    n, spacing = 96, (0.5, 0.5, 0.5)
    grid = (np.indices((n, n, n)) - n / 2.0) * 0.5
    radius = 4.0
    sphere = (np.sum(grid**2, axis=0) <= radius**2).astype(np.float32)
    b0 = np.array([0.0, 1.0, 0.0])  # B0 along the row-index axis, as in a sagittal grid
    field = dipole_field_ppm(sphere * 100.0, spacing, b0, (192, 192, 192))
    volume = sphere.sum() * 0.125
    a = (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)  # the voxelised sphere's own radius
    for point, cos2 in (((48, 48 + 20, 48), 1.0), ((48 + 20, 48, 48), 0.0), ((48, 48, 48 + 20), 0.0)):
        expected = 100.0 / 3.0 * (a / 10.0) ** 3 * (3.0 * cos2 - 1.0)
        assert field[point] == pytest.approx(expected, rel=0.08)
    sagittal = VolumeGeometry.from_fov(
        center=(0.0, 0.0, 0.0), fov_mm=(9.0, 9.0, 9.0), voxel_mm=(1.0, 1.0, 1.0)
    )
    assert b0_in_array_axes(sagittal) == pytest.approx([0.0, -1.0, 0.0], abs=1e-9)  # rows run S -> I


def test_filtered_back_projection_reconstructs_a_disc() -> None:
    shape, spacing = (60, 80), (1.0, 1.0)
    u = (np.arange(shape[0]) - 29.5)[:, None]
    v = (np.arange(shape[1]) - 39.5)[None, :]
    disc = ((u - 8.0) ** 2 + (v + 10.0) ** 2 <= 64.0).astype(np.float64)[None]
    image = filtered_back_projection(disc, spacing, project(disc, spacing))[0]
    core = (u - 8.0) ** 2 + (v + 10.0) ** 2 <= 25.0
    assert image[core].mean() == pytest.approx(1.0, abs=0.03)
    assert np.abs(image[(u - 8.0) ** 2 + (v + 10.0) ** 2 >= 400.0]).max() < 0.05


# --- lesion and metastases -------------------------------------------------------------------------------------


def _core(case: PhantomCase, prefix: str) -> npt.NDArray[np.bool_]:
    mask = ndimage.binary_erosion(_object_mask(case, prefix), iterations=1)
    assert mask.sum() >= 8, prefix
    return np.asarray(mask)


def test_each_lesion_changes_only_its_own_neighbourhood(lesions: tuple[PhantomCase, PhantomCase]) -> None:
    case, normal = lesions
    near = ndimage.binary_dilation(case.anomaly > 0, iterations=3)
    assert not (case.ct_hu != normal.ct_hu)[~near].any()
    mr_near = ndimage.binary_dilation(case.anomaly > 0, iterations=8)
    assert not (_mr_change(case, normal) > FOOTPRINT_STORED)[:, ~mr_near].any()


def test_calcified_lesion_is_bright_on_ct_and_dark_on_both_echoes_inside_the_thecal_sac(
    lesions: tuple[PhantomCase, PhantomCase],
) -> None:
    case, normal = lesions
    core = _core(case, "calcified lesion")
    assert case.ct_hu[core].min() >= 400 and case.ct_hu[core].max() <= 1000
    for echo in (0, 1):
        assert case.echoes[echo][core].mean() < 0.4 * normal.echoes[echo][core].mean()
    assert set(np.unique(normal.labels[_object_mask(case, "calcified lesion")])) <= {Tissue.CSF, Tissue.NERVE}


def test_sclerotic_metastasis_is_dense_bone_dark_on_both_echoes(
    lesions: tuple[PhantomCase, PhantomCase],
) -> None:
    case, normal = lesions
    core = _core(case, "sclerotic metastasis")
    assert case.ct_hu[core].min() >= 600 and case.ct_hu[core].max() <= 1200
    for echo in (0, 1):
        assert case.echoes[echo][core].mean() < 0.6 * normal.echoes[echo][core].mean()
    assert set(np.unique(normal.labels[core])) == {Tissue.MARROW_BODY}


def test_lytic_metastasis_is_soft_tissue_without_fat_water_phase_behaviour(
    lesions: tuple[PhantomCase, PhantomCase],
) -> None:
    """Marrow at 2.1 / 4.2 ms is nearly opposed then in phase: echo 1 much darker than echo 2. Tumour without
    fat is brighter than marrow on echo 1 and loses only its T2* decay by echo 2."""
    case, normal = lesions
    core = _core(case, "lytic metastasis")
    assert 20 <= case.ct_hu[core].mean() <= 60 and case.ct_hu[core].max() < 120
    e1, e2 = (case.echoes[e][core].astype(float).mean() for e in (0, 1))
    n1, n2 = (normal.echoes[e][core].astype(float).mean() for e in (0, 1))
    assert e1 > 1.3 * n1
    assert 0.85 < e2 / e1 < 1.05
    assert n2 / n1 > 1.3


def test_lytic_metastasis_with_a_cortical_break_replaces_cortex_and_reaches_outside_the_bone() -> None:
    seed = 3  # its lytic metastasis in L2 breaks through the wall
    acq = Acquisition(fov_mm=(90.0, 90.0, 60.0), voxel_mm=(1.0, 1.0, 1.0), noise_scale=0.0)
    case = generate_case(seed, acq, pathologies=(Pathology.LYTIC_METASTASIS,))
    (obj,) = case.anomaly_objects
    assert obj.name.endswith("with cortical break")
    normal = generate_case(seed, acq)
    region = case.anomaly == obj.label
    cortex = region & (normal.labels == Tissue.CORTICAL_BONE)
    assert cortex.sum() > 5 and np.median(case.ct_hu[cortex]) < 150 < np.median(normal.ct_hu[cortex])
    bone = {Tissue.CORTICAL_BONE, Tissue.MARROW_BODY}
    assert np.isin(normal.labels[region], [t for t in Tissue if t not in bone]).sum() > 5


# --- motion ----------------------------------------------------------------------------------------------------


def test_motion_ghosts_replicate_along_phase_encoding_and_not_along_the_readout() -> None:
    """Seed 1 breathes. With the readout along A-P (the seed protocol), the moving belly's ghosts stay in its own
    A-P columns and the air behind the back is untouched; with phase encoding along A-P they land there."""
    assert not motion_pattern(SEED).whole_body
    results = {}
    for readout in ("row", "column"):
        acq = MOTION_FOV.with_changes(readout_axis=readout)
        case = generate_case(SEED, acq, pathologies=(Pathology.MOTION,))
        normal = generate_case(SEED, acq)
        change = _mr_change(case, normal).max(axis=0)
        air = ndimage.binary_erosion(normal.labels == Tissue.AIR, iterations=5)
        a_p = np.arange(case.geometry.shape[2])[None, None, :]
        behind = air & (a_p > case.geometry.shape[2] // 2)  # sagittal columns run anterior -> posterior
        results[readout] = (case, change, behind)
    case, change, behind = results["row"]
    assert behind.sum() > 1000
    assert change[behind].max() < FOOTPRINT_STORED
    (motion,) = case.anomaly_objects
    assert motion.kind is Pathology.MOTION and motion.voxels == int((case.anomaly == 1).sum()) > 0
    _, change, behind = results["column"]
    assert (change[behind] > FOOTPRINT_STORED).sum() > 100


# --- simulator, agent, training --------------------------------------------------------------------------------


def test_simulate_pathology_writes_a_series_that_check_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    status = main(
        ["simulate", "--out", str(out), "--seed", "3", "--supersample", "1", "--pathology", "screws"]
    )
    assert status == 0
    assert "with screws" in capsys.readouterr().out
    report = io.StringIO()
    assert check.main([str(out)], stdout=report) == check.EXIT_PASS, report.getvalue()


def test_pathology_changes_pixels_and_no_header(tmp_path: Path) -> None:
    """Everything but what names the export (UIDs, dates and times, derived from the pixels when deterministic)
    and the pixels' own statistics."""
    pixel_derived = {
        "PixelData",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "WindowCenter",
        "WindowWidth",
    }
    exported = {}
    for name, pathologies in (("normal", ()), ("lesion", (Pathology.CALCIFIED_LESION,))):
        request = SimulationRequest(seed=SEED, fov_mm=(60.0, 60.0, 9.0), pathologies=pathologies)
        summary = simulate(request, ExportOptions(out_dir=tmp_path / name, deterministic_uids=True))
        exported[name] = [pydicom.dcmread(p) for p in summary.paths]
    assert len(exported["normal"]) == len(exported["lesion"])
    pixels_differ = False
    for a, b in zip(exported["normal"], exported["lesion"], strict=True):
        kept = [
            e.keyword for e in a if e.VR not in {"UI", "DA", "TM", "DT"} and e.keyword not in pixel_derived
        ]
        assert {k: a.get(k) for k in kept} == {k: b.get(k) for k in kept}
        pixels_differ |= a.PixelData != b.PixelData
    assert pixels_differ


def test_cli_refuses_an_unknown_pathology(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["simulate", "--out", str(tmp_path), "--seed", "1", "--pathology", "tumour"])
    assert raised.value.code == 2
    assert "--pathology" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_training_cases_are_normal_phantoms() -> None:
    """The training path draws no pathology: its case is exactly the pathology-free phantom of its subject (the
    subject itself may be one of the recipe's harder normal variants)."""
    recipe = TrainingRecipe(supersample=1)
    seed = TRAIN_SEED_BASE
    prepared = prepare_case(recipe, seed, Normalisation())
    subject, _ = training_subject(recipe, seed)
    normal = generate_case(seed, training_acquisition(recipe, seed), supersample=1, subject=subject)
    assert np.array_equal(prepared.echoes, normal.echoes)
    assert np.array_equal(prepared.ct_hu, normal.ct_hu)
    assert not normal.anomaly.any()
