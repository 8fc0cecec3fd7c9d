"""The physics phantom: determinism, the signal equation, HU ranges, noise statistics and spine geometry."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case, tissue_model
from engines.phantom.mr_signal import fat_phasor, noise_sigma
from engines.phantom.render import count_tissues
from engines.phantom.spine import build_spine
from engines.phantom.subject import SubjectParameters
from engines.phantom.tissues import FAT_T1_MS, FAT_T2STAR_MS, N_TISSUES, Tissue
from sct_core.geometry import Orientation, VolumeGeometry

#: A small FOV around the lower lumbar spine: every tissue class, in well under a second.
SMALL = Acquisition(fov_mm=(120.0, 120.0, 27.0))
NOISELESS = dataclasses.replace(SMALL, noise_scale=0.0, sampling_fraction=(1.0, 1.0, 1.0))
#: A thin slab across the whole antero-posterior FOV: plenty of air behind the back for noise statistics. Its
#: few phase-encoding lines would make it ~9x noisier than the full 3D acquisition (SNR ∝ sqrt(N_pe N_3D)), so
#: the noise is scaled to the seed protocol's level.
_THIN = Acquisition(fov_mm=(30.0, 250.0, 9.0))
AIRY = dataclasses.replace(_THIN, noise_scale=noise_sigma(SEED_PROTOCOL) / noise_sigma(_THIN))
#: Air further than this from the body has no ringing or chemical-shift spill left in it.
AIR_MARGIN_MM = 15.0


@pytest.fixture(scope="module")
def noiseless_case() -> PhantomCase:
    return generate_case(11, NOISELESS)


@pytest.fixture(scope="module")
def noisy_case() -> PhantomCase:
    return generate_case(11, SMALL)


def pure(case: PhantomCase, tissue: Tissue, erosion: int = 2) -> np.ndarray:
    """Voxels well inside a tissue (no partial volume, no chemical-shift edge)."""
    return np.asarray(ndimage.binary_erosion(case.labels == tissue, iterations=erosion))


def test_same_seed_gives_identical_arrays_and_worker_count_does_not_matter() -> None:
    a = generate_case(5, SMALL, workers=2)
    b = generate_case(5, SMALL, workers=1)
    assert np.array_equal(a.echoes, b.echoes)
    assert np.array_equal(a.ct_hu, b.ct_hu)
    assert np.array_equal(a.labels, b.labels)
    assert a.geometry == b.geometry


def test_different_seeds_give_different_subjects() -> None:
    a = generate_case(5, SMALL)
    b = generate_case(6, SMALL)
    assert a.subject != b.subject
    assert not np.array_equal(a.labels, b.labels)


# Six-peak fat model written out again here (docs/phantom.md, Physics reference), independently of the
# phantom's own table.
_PPM = np.array([-3.80, -3.40, -2.60, -1.94, -0.39, 0.60])
_AMP = np.array([0.087, 0.693, 0.128, 0.004, 0.039, 0.048])


def _expected_magnitude(
    pd: float, ff: float, t1w: float, t2sw: float, te_ms: float, acq: Acquisition
) -> float:
    """The spoiled-GRE signal equation (docs/phantom.md, Physics reference) for one tissue, B1 and bias 1."""
    alpha = math.radians(acq.flip_angle_deg)

    def ernst(t1: float) -> float:
        e1 = math.exp(-acq.repetition_time_ms / t1)
        return math.sin(alpha) * (1 - e1) / (1 - e1 * math.cos(alpha))

    f0 = 42.577478e6 * acq.field_strength_t
    c = complex(np.sum(_AMP * np.exp(2j * np.pi * _PPM * 1e-6 * f0 * te_ms * 1e-3)) / _AMP.sum())
    b0 = acq.table_field_strength()
    water = pd * (1 - ff) * ernst(t1w) * math.exp(-te_ms / t2sw)
    fat = pd * ff * ernst(FAT_T1_MS[b0]) * math.exp(-te_ms / FAT_T2STAR_MS[b0]) * c
    return abs(water + fat)


@pytest.mark.parametrize(
    "tissue", [Tissue.VISCERAL_FAT, Tissue.INTERMUSCULAR_FAT, Tissue.MUSCLE, Tissue.CSF, Tissue.BLOOD]
)
def test_echo_signals_follow_the_signal_equation(noiseless_case: PhantomCase, tissue: Tissue) -> None:
    """Receive bias and proton density cancel in the echo-2 / echo-1 ratio, which the fat phase at each echo
    time and T2* decide: within 2 % of the equation."""
    case = noiseless_case
    mask = pure(case, tissue)
    assert mask.sum() > 200, f"too few pure {tissue.name} voxels to test"
    model = tissue_model(case.subject, case.acquisition.table_field_strength())
    args = (model.pd[tissue], model.ff[tissue], model.t1w[tissue], model.t2sw[tissue])
    te1, te2 = case.acquisition.echo_times_ms
    expected = _expected_magnitude(*args, te2, case.acquisition) / _expected_magnitude(
        *args, te1, case.acquisition
    )
    measured = case.echoes[1][mask].astype(float).mean() / case.echoes[0][mask].astype(float).mean()
    assert measured == pytest.approx(expected, rel=0.02)


def test_fat_to_water_signal_ratio_matches_the_equation_at_each_echo(noiseless_case: PhantomCase) -> None:
    """Visceral fat against blood in the neighbouring aorta/IVC, at each echo.

    Only voxels within a few mm of each other are compared, so the smooth receive bias is nearly the same for
    both; the 5 % tolerance covers what is left of it and of B1.
    """
    case = noiseless_case
    model = tissue_model(case.subject, 1.5)
    fat_mask, blood_mask = pure(case, Tissue.VISCERAL_FAT), pure(case, Tissue.BLOOD)
    # Fat voxels within 6 mm of pure blood: the bias field varies by < 1 % over that distance.
    near = ndimage.binary_dilation(blood_mask, iterations=8) & fat_mask
    assert near.sum() > 50 and blood_mask.sum() > 50
    for echo, te in enumerate(case.acquisition.echo_times_ms):
        fat_args = (
            model.pd[Tissue.VISCERAL_FAT],
            model.ff[Tissue.VISCERAL_FAT],
            model.t1w[Tissue.VISCERAL_FAT],
            model.t2sw[Tissue.VISCERAL_FAT],
        )
        blood_args = (model.pd[Tissue.BLOOD], 0.0, model.t1w[Tissue.BLOOD], model.t2sw[Tissue.BLOOD])
        expected = _expected_magnitude(*fat_args, te, case.acquisition) / _expected_magnitude(
            *blood_args, te, case.acquisition
        )
        img = case.echoes[echo].astype(float)
        measured = img[near].mean() / img[blood_mask & ndimage.binary_dilation(near, iterations=8)].mean()
        assert measured == pytest.approx(expected, rel=0.05), f"echo {echo + 1}"


def test_fat_phasor_matches_the_reference_table() -> None:
    """|c| and angle of the 6-peak fat phasor at the seed protocol's echo times (docs/phantom.md table)."""
    for field, te, magnitude, angle in (
        (1.5, 2.1, 0.80, -159),
        (1.5, 4.2, 0.85, 36),
        (1.5, 2.3, 0.79, -176),
        (3.0, 2.3, 0.82, 7),
    ):
        c = fat_phasor(te, field)
        assert abs(c) == pytest.approx(magnitude, abs=0.01)
        assert math.degrees(math.atan2(c.imag, c.real)) == pytest.approx(angle, abs=2.0)


def test_marrow_is_darker_at_the_near_opposed_phase_echo(noiseless_case: PhantomCase) -> None:
    mask = pure(noiseless_case, Tissue.MARROW_BODY)
    e1, e2 = (noiseless_case.echoes[i][mask].astype(float).mean() for i in range(2))
    assert e2 / e1 > 1.3  # water and fat cancel at 2.1 ms, add at 4.2 ms


@pytest.mark.parametrize(
    ("tissue", "low", "high"),
    [  # reference ranges, docs/phantom.md (Physics reference)
        (Tissue.VISCERAL_FAT, -120, -50),
        (Tissue.INTERMUSCULAR_FAT, -120, -50),
        (Tissue.MUSCLE, 10, 55),
        (Tissue.CSF, 0, 15),
        (Tissue.BLOOD, 40, 65),
        (Tissue.DISC_ANNULUS, 80, 120),
        (Tissue.MARROW_BODY, 50, 300),
    ],
)
def test_ct_numbers_lie_in_the_reference_ranges(
    noisy_case: PhantomCase, tissue: Tissue, low: float, high: float
) -> None:
    mask = pure(noisy_case, tissue)
    assert mask.sum() > 100
    assert low <= noisy_case.ct_hu[mask].mean() <= high


def test_cortical_bone_is_dense_and_thin_shells_show_partial_volume(noisy_case: PhantomCase) -> None:
    ct, labels = noisy_case.ct_hu, noisy_case.labels
    assert ct[labels == Tissue.CORTICAL_BONE].max() > 1200
    shell = (labels == Tissue.CORTICAL_BONE) & ndimage.binary_dilation(labels == Tissue.MARROW_BODY)
    partial = np.mean((ct[shell] > 300) & (ct[shell] < 1000))
    assert partial > 0.3  # thin vertebral shells read 300-1000 HU (partial volume)
    assert ct.min() >= -1024 and ct.max() <= 3071


def far_air(case: PhantomCase) -> np.ndarray:
    distance = ndimage.distance_transform_edt(case.labels == Tissue.AIR, sampling=case.geometry.spacing)
    return np.asarray(distance > AIR_MARGIN_MM)


def test_background_noise_is_rayleigh() -> None:
    """Magnitude of complex Gaussian noise in air: mean/std = sqrt(pi/2) / sqrt(2 - pi/2) = 1.913."""
    case = generate_case(11, AIRY)
    air = far_air(case)
    assert air.sum() > 2000
    values = case.echoes[0][air].astype(float)
    assert values.mean() / values.std() == pytest.approx(1.913, rel=0.06)
    muscle = case.echoes[0][pure(case, Tissue.MUSCLE)].astype(float).mean()
    assert 10 < muscle / values.std() < 80  # tissue SNR of a clinical 3D GRE


def test_noise_scales_with_bandwidth() -> None:
    """Halving the bandwidth raises SNR by sqrt(2): background noise rises by that factor for the same signal."""
    ref = generate_case(11, AIRY)
    low_bw = generate_case(11, dataclasses.replace(AIRY, pixel_bandwidth_hz=AIRY.pixel_bandwidth_hz / 2))
    air = far_air(ref) & far_air(low_bw)
    ratio = ref.echoes[0][air].astype(float).mean() / low_bw.echoes[0][air].astype(float).mean()
    assert ratio == pytest.approx(math.sqrt(2), rel=0.05)


def test_seed_protocol_grid() -> None:
    assert SEED_PROTOCOL.matrix == (100, 338, 338)
    geo = VolumeGeometry.from_fov(
        center=(0.0, 0.0, 0.0), fov_mm=SEED_PROTOCOL.fov_mm, voxel_mm=SEED_PROTOCOL.voxel_mm
    )
    assert geo.shape == (100, 338, 338)
    assert geo.image_orientation_patient == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal
    assert np.allclose(geo.center, (0.0, 0.0, 0.0))


def test_supersampled_grid_covers_the_same_voxels() -> None:
    geo = VolumeGeometry.from_fov(
        center=(1.0, 2.0, 3.0),
        fov_mm=(20.0, 30.0, 9.0),
        voxel_mm=(1.0, 1.5, 3.0),
        orientation=Orientation.AXIAL,
        oblique_deg=10.0,
    )
    fine = geo.supersampled(3)
    idx = np.array([[k, r, c, 1.0] for k in range(3) for r in range(3) for c in range(3)])
    sub = (fine.affine @ idx.T)[:3].mean(axis=1)
    assert np.allclose(sub, geo.affine[:3, 3], atol=1e-9)


def test_tissue_counts_per_voxel() -> None:
    fine = np.zeros((2, 4, 2), dtype=np.uint8)
    fine[0, 0, 0] = Tissue.MUSCLE
    fine[:, 2:, :] = Tissue.CSF
    counts = count_tissues(fine, 2)
    assert counts.shape == (1, 2, 1, N_TISSUES)
    assert counts[0, 0, 0, Tissue.MUSCLE] == 1 and counts[0, 0, 0, Tissue.AIR] == 7
    assert counts[0, 1, 0, Tissue.CSF] == 8


def test_lordosis_is_the_angle_between_l1_and_s1() -> None:
    subject = dataclasses.replace(SubjectParameters.from_seed(3), scoliosis_mm=0.0, listhesis_level="")
    spine = {s.name: s for s in build_spine(subject)}
    l1, s1 = spine["L1"], spine["S1"]
    angle = math.degrees(math.acos(float(np.clip(l1.frame[:, 2] @ s1.frame[:, 2], -1, 1))))
    # L1's frame sits at mid-body: half its own wedge short of the superior endplate.
    assert angle == pytest.approx(subject.lordosis_deg - l1.wedge_deg / 2.0, abs=1e-6)
    assert [n for n in ("L1", "L2", "L3", "L4", "L5", "S1") if n in spine] == [
        "L1",
        "L2",
        "L3",
        "L4",
        "L5",
        "S1",
    ]


def test_spondylolisthesis_moves_the_slipped_vertebra_anteriorly() -> None:
    base = dataclasses.replace(SubjectParameters.from_seed(3), scoliosis_mm=0.0, listhesis_level="")
    slipped = dataclasses.replace(base, listhesis_level="L5", listhesis_fraction=0.25)

    def offset(subject: SubjectParameters) -> float:
        spine = {s.name: s for s in build_spine(subject)}
        rel = spine["L5"].center - spine["S1"].center
        return float(rel @ spine["S1"].frame[:, 1])  # posterior component in S1's frame

    assert offset(base) - offset(slipped) == pytest.approx(0.25 * 2 * base.spine_scale * 17.5, rel=0.15)


def test_subjects_vary_across_seeds() -> None:
    subjects = [SubjectParameters.from_seed(s) for s in range(200)]
    assert {s.sex for s in subjects} == {"F", "M"}
    ages = [s.age_years for s in subjects]
    assert min(ages) < 30 and max(ages) > 75
    assert any(s.listhesis_level for s in subjects) and any(s.scoliosis_mm for s in subjects)
    assert any(s.disc_vacuum for s in subjects)
    old = [s.trabecular_bvtv for s in subjects if s.age_years > 70]
    young = [s.trabecular_bvtv for s in subjects if s.age_years < 35]
    assert np.mean(old) < np.mean(young)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"echo_times_ms": (2.1, 9.0)}, r"EchoTime2 9.0 ms must be shorter than RepetitionTime 7.0 ms"),
        ({"repetition_time_ms": -7.0}, r"RepetitionTime must be a finite positive value in ms; found -7.0"),
        ({"field_strength_t": 7.0}, r"MagneticFieldStrength 7.0 T is not simulated; supported: 1.5, 3 T"),
        ({"echo_times_ms": (4.2, 2.1)}, r"EchoTime values must increase"),
        ({"voxel_mm": (0.74, float("nan"), 0.9)}, r"voxel_mm must be three positive mm values"),
    ],
)
def test_bad_acquisitions_are_refused_with_the_attribute_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SEED_PROTOCOL, **change)


def test_other_orientation_and_field_strength() -> None:
    acq = dataclasses.replace(
        SMALL,
        orientation=Orientation.AXIAL,
        field_strength_t=3.0,
        echo_times_ms=(1.15, 2.3),
        fov_mm=(120.0, 120.0, 9.0),
    )
    case = generate_case(2, acq)
    assert case.geometry.slice_direction == pytest.approx((0.0, 0.0, 1.0))
    assert case.echoes.shape == (2, 10, 162, 162)
    assert (case.labels == Tissue.MARROW_BODY).any() or (case.labels == Tissue.DISC_ANNULUS).any()
