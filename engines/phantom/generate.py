"""One call from a seed and an acquisition to a co-registered MR + CT case: :func:`generate_case`."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.ndimage

from engines.phantom import mr_signal
from engines.phantom.acquisition import SEED_PROTOCOL, Acquisition
from engines.phantom.anatomy import Anatomy, build_anatomy
from engines.phantom.case import CT_HU_MAX, CT_HU_MIN, PhantomCase
from engines.phantom.pathology.anomaly import assemble as assemble_anomaly
from engines.phantom.pathology.ct_metal import streaks_hu
from engines.phantom.pathology.kinds import Pathology, parse_pathologies
from engines.phantom.pathology.motion import Ghosting, moving_weight
from engines.phantom.pathology.mr_effects import EchoEffects
from engines.phantom.pathology.placement import PlacedObject, motion_pattern, place_objects
from engines.phantom.pathology.susceptibility import metal_field
from engines.phantom.render import SlabCounts, render_counts
from engines.phantom.spine import build_spine
from engines.phantom.subject import SubjectParameters
from engines.phantom.tissues import (
    FAT_T1_MS,
    FAT_T2STAR_MS,
    HU_BONE_TISSUE,
    HU_FAT,
    HU_SOFT_TISSUE,
    N_TISSUES,
    TISSUE_TABLE,
    Tissue,
)
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
C64 = npt.NDArray[np.complex64]

#: Default sub-voxels per axis for partial volume (0.37 x 0.37 x 0.45 mm at the seed protocol).
DEFAULT_SUPERSAMPLE = 2
#: Where the technologist centres the FOV: on the posterior wall of L3 (mm posterior of its centre).
FOV_CENTER_POSTERIOR_MM = 20.0
#: CT point-spread (FWHM, mm) of a bone-kernel reconstruction, and CT noise (HU, standard deviation).
CT_PSF_FWHM_MM = 0.9
CT_NOISE_HU = 15.0
#: Bone mineral density of mineralised bone tissue, mg/cm³; links BV/TV to the marrow R2' (docs/phantom.md).
BONE_TISSUE_BMD_MG_CM3 = 1100.0
#: R2' of marrow per mg/cm³ of bone density at 1.5 T (s⁻¹), scaled ∝ B0.
MARROW_R2PRIME_PER_BMD = 0.20
#: Trabecular bone of the posterior elements is denser than that of the bodies.
POSTERIOR_BVTV_FACTOR = 1.8


@dataclass(frozen=True, slots=True, eq=False)
class TissueModel:
    """Per-subject tissue properties, indexed by :class:`Tissue`: the table with individual jitter (people's
    relaxation times differ by a few percent) and the subject's own muscle fat fraction."""

    pd: F64
    ff: F64
    t1w: F64
    t2sw: F64
    hu: F64


def tissue_model(subject: SubjectParameters, field: float) -> TissueModel:
    """The tissue properties this subject's images are simulated with at ``field`` tesla (deterministic)."""
    rng = np.random.default_rng([subject.seed, 0x7155])
    n = N_TISSUES
    pd, ff, t1w, t2sw, hu = (np.zeros(n) for _ in range(5))
    for tissue, props in TISSUE_TABLE.items():
        pd[tissue] = props.proton_density * float(rng.normal(1.0, 0.03))
        ff[tissue] = props.fat_fraction
        t1w[tissue] = props.t1_water_ms[field] * float(rng.normal(1.0, 0.04))
        t2sw[tissue] = props.t2star_water_ms[field] * float(rng.normal(1.0, 0.05))
        hu[tissue] = props.hu + (float(rng.normal(0.0, 4.0)) if abs(props.hu) < 200 else 0.0)
    ff[Tissue.MUSCLE] = subject.muscle_fat_fraction
    hu[Tissue.MUSCLE] = (1 - subject.muscle_fat_fraction) * hu[
        Tissue.MUSCLE
    ] + subject.muscle_fat_fraction * HU_FAT
    return TissueModel(pd=pd, ff=ff, t1w=t1w, t2sw=t2sw, hu=hu)


class _PlaneWaves:
    """A smooth random field as a sum of random plane waves: cheap to evaluate at any scattered points."""

    def __init__(self, rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]) -> None:
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        lengths = rng.uniform(*wavelength_mm, size=count)
        self.k = (2 * np.pi / lengths)[:, None] * directions
        self.phase = rng.uniform(0, 2 * np.pi, size=count)
        self.norm = math.sqrt(2.0 / count)

    def __call__(self, points: F64) -> F64:
        return np.asarray(np.cos(points @ self.k.T + self.phase).sum(axis=1) * self.norm)


@dataclass(frozen=True, slots=True)
class _Fields:
    """Smooth spatial fields of one case: transmit B1 scale, receive bias and marrow texture."""

    b1: _PlaneWaves
    b1_amplitude: float
    bias_ratio: float
    bias_ripple: _PlaneWaves
    texture_bvtv: _PlaneWaves
    texture_ff: _PlaneWaves


def _voxel_points(geometry: VolumeGeometry, start: int, stop: int) -> F64:
    """Patient coordinates of the voxel centres of slices [start, stop), (N, 3) in C order."""
    k, r, c = np.meshgrid(
        np.arange(start, stop), np.arange(geometry.shape[1]), np.arange(geometry.shape[2]), indexing="ij"
    )
    idx = np.stack([k.ravel(), r.ravel(), c.ravel(), np.ones(k.size)], axis=0).astype(np.float64)
    return np.asarray((geometry.affine @ idx)[:3].T)


class _Accumulator:
    """Turns each slab's tissue counts into complex water / fat signal per echo, HU and labels."""

    def __init__(
        self,
        case_seed: int,
        acq: Acquisition,
        geometry: VolumeGeometry,
        anatomy: Anatomy,
        subject: SubjectParameters,
        supersample: int,
    ) -> None:
        rng = np.random.default_rng([case_seed, 0xF1E1D])
        self.acq = acq
        self.geometry = geometry
        self.anatomy = anatomy
        self.field = acq.table_field_strength()
        self.norm = float(supersample**3)
        self.model = tissue_model(subject, self.field)
        self.fields = _Fields(
            b1=_PlaneWaves(rng, 3, (300.0, 600.0)),
            b1_amplitude=0.04 if self.field < 2.0 else 0.12,
            bias_ratio=float(rng.uniform(0.4, 0.7)),
            bias_ripple=_PlaneWaves(rng, 2, (90.0, 160.0)),
            texture_bvtv=_PlaneWaves(rng, 16, (3.0, 10.0)),
            texture_ff=_PlaneWaves(rng, 12, (4.0, 14.0)),
        )
        n_echo = len(acq.echo_times_ms)
        shape = geometry.shape
        self.water = np.zeros((n_echo, *shape), dtype=np.float32)
        self.fat = np.zeros((n_echo, *shape), dtype=np.complex64)
        self.hu = np.zeros(shape, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.weights = self._weights()

    def _weights(self) -> F32:
        """(tissues, columns) matrix: per echo 3 water + 3 real-fat + 3 imaginary-fat Taylor terms; last column HU.

        Marrow rows are zero: marrow is evaluated per voxel from its bone and fat fractions.
        """
        m, acq = self.model, self.acq
        flip = math.radians(acq.flip_angle_deg)
        fw = mr_signal.spoiled_gre_taylor(m.t1w, acq.repetition_time_ms, flip)
        ff_ = mr_signal.spoiled_gre_taylor(
            np.full(N_TISSUES, FAT_T1_MS[self.field]), acq.repetition_time_ms, flip
        )
        cols: list[F64] = []
        for te in acq.echo_times_ms:
            water_amp = m.pd * (1 - m.ff) * np.exp(-te / m.t2sw)
            fat_amp = m.pd * m.ff * math.exp(-te / FAT_T2STAR_MS[self.field])
            phasor = mr_signal.fat_phasor(te, self.field)
            cols += [water_amp * fw[i] for i in range(3)]
            cols += [fat_amp * ff_[i] * phasor.real for i in range(3)]
            cols += [fat_amp * ff_[i] * phasor.imag for i in range(3)]
        cols.append(m.hu)
        w = np.stack(cols, axis=1)
        for t in (Tissue.MARROW_BODY, Tissue.MARROW_POSTERIOR):
            w[t, :] = 0.0
        return np.asarray(w, dtype=np.float32)

    def __call__(self, slab: SlabCounts) -> None:
        self._add_tissues(slab.start, slab.stop, slab.counts)
        self.labels[slab.start : slab.stop] = np.argmax(slab.counts, axis=-1).astype(np.uint8)

    def _add_tissues(self, start: int, stop: int, tissue_counts: U8) -> tuple[F64, F32]:
        """Signal and HU of slices [start, stop) from their tissue counts; returns the voxels' B1 scale and
        receive bias for whatever else is added to them."""
        counts = tissue_counts.reshape(-1, N_TISSUES)
        frac = counts.astype(np.float32) / np.float32(self.norm)
        sums = frac @ self.weights
        points = _voxel_points(self.geometry, start, stop)
        kappa = 1.0 + self.fields.b1_amplitude * self.fields.b1(points)
        delta = (kappa - 1.0).astype(np.float32)
        delta2 = delta * delta
        bias = self._bias(points)
        out = (slice(start, stop),)
        region_shape = (stop - start, *self.geometry.shape[1:])
        marrow = self._marrow(frac, points, kappa)
        for e in range(len(self.acq.echo_times_ms)):
            c = 9 * e
            water = sums[:, c] + delta * sums[:, c + 1] + delta2 * sums[:, c + 2]
            fat_re = sums[:, c + 3] + delta * sums[:, c + 4] + delta2 * sums[:, c + 5]
            fat_im = sums[:, c + 6] + delta * sums[:, c + 7] + delta2 * sums[:, c + 8]
            fat = fat_re + 1j * fat_im
            if marrow is not None:
                idx, mw, mf, _ = marrow
                water[idx] += mw[e]
                fat[idx] += mf[e]
            self.water[(e, *out)] = (water * bias).reshape(region_shape)
            self.fat[(e, *out)] = (fat * bias).reshape(region_shape)
        hu = sums[:, -1]
        if marrow is not None:
            hu[marrow[0]] += marrow[3]
        self.hu[out] = hu.reshape(region_shape)
        return kappa, bias

    def _bias(self, points: F64) -> F32:
        """Receive sensitivity of the spine array under the patient's back: falls off anteriorly and laterally."""
        torso = self.anatomy.torso
        back = np.interp(points[:, 2], torso.z, torso.back_y)
        depth = np.clip(back - points[:, 1], 0.0, None)
        falloff = np.exp(math.log(self.fields.bias_ratio) * depth / 200.0)
        ripple = 1.0 + 0.06 * self.fields.bias_ripple(points)
        lateral = 1.0 - 0.1 * (points[:, 0] / 120.0) ** 2
        return np.asarray(np.clip(falloff * ripple * lateral, 0.15, None), dtype=np.float32)

    def _marrow(
        self, frac: F32, points: F64, kappa: F64
    ) -> tuple[npt.NDArray[np.intp], list[F64], list[npt.NDArray[np.complex128]], F64] | None:
        """Per-voxel signal and HU of trabecular marrow from local BV/TV and fat fraction (docs/phantom.md)."""
        body = frac[:, Tissue.MARROW_BODY].astype(np.float64)
        post = frac[:, Tissue.MARROW_POSTERIOR].astype(np.float64)
        idx = np.flatnonzero((body + post) > 0)
        if idx.size == 0:
            return None
        body, post = body[idx], post[idx]
        pts = points[idx]
        an = self.anatomy
        level_bvtv = np.interp(pts[:, 2], an.marrow_z, an.marrow_bvtv)
        level_ff = np.interp(pts[:, 2], an.marrow_z, an.marrow_ff)
        share_post = post / (body + post)
        bvtv = level_bvtv * (1 + (POSTERIOR_BVTV_FACTOR - 1) * share_post)
        bvtv = np.clip(bvtv * (1 + 0.15 * self.fields.texture_bvtv(pts)), 0.02, 0.6)
        ff = np.clip(level_ff * (1 + 0.12 * self.fields.texture_ff(pts)), 0.03, 0.95)
        amount = body + post
        props = TISSUE_TABLE[Tissue.MARROW_BODY]
        pd = props.proton_density * (1 - bvtv) * amount
        r2prime = MARROW_R2PRIME_PER_BMD * bvtv * BONE_TISSUE_BMD_MG_CM3 * (self.field / 1.5)
        acq = self.acq
        flip = np.radians(acq.flip_angle_deg) * kappa[idx]
        fw = _spoiled_gre_varying(props.t1_water_ms[self.field], acq.repetition_time_ms, flip)
        ffat = _spoiled_gre_varying(FAT_T1_MS[self.field], acq.repetition_time_ms, flip)
        water_r2s = 1000.0 / props.t2star_water_ms[self.field] + r2prime
        fat_r2s = 1000.0 / FAT_T2STAR_MS[self.field] + r2prime
        mw: list[F64] = []
        mf: list[npt.NDArray[np.complex128]] = []
        for te in acq.echo_times_ms:
            decay_w = np.exp(-te * 1e-3 * water_r2s)
            decay_f = np.exp(-te * 1e-3 * fat_r2s)
            phasor = mr_signal.fat_phasor(te, self.field, mr_signal.FAT_MARROW_9PEAK)
            mw.append(pd * (1 - ff) * fw * decay_w)
            mf.append(np.asarray(pd * ff * ffat * decay_f * phasor, dtype=np.complex128))
        hu = amount * (bvtv * HU_BONE_TISSUE + (1 - bvtv) * (ff * HU_FAT + (1 - ff) * HU_SOFT_TISSUE))
        return idx, mw, mf, hu


def _spoiled_gre_varying(t1_ms: float, tr_ms: float, flip_rad: F64) -> F64:
    e1 = math.exp(-tr_ms / t1_ms)
    return np.asarray(np.sin(flip_rad) * (1 - e1) / (1 - e1 * np.cos(flip_rad)))


def fov_geometry(acq: Acquisition, subject: SubjectParameters, anatomy: Anatomy) -> VolumeGeometry:
    """The grid the technologist prescribes: centred on the posterior wall of L3, in the protocol's orientation."""
    l3 = next(seg for seg in anatomy.segments if seg.name == "L3")
    center = l3.center + np.array([0.0, FOV_CENTER_POSTERIOR_MM, 0.0]) + np.asarray(subject.fov_offset_mm)
    return VolumeGeometry.from_fov(
        center=(float(center[0]), float(center[1]), float(center[2])),
        fov_mm=acq.fov_mm,
        voxel_mm=acq.voxel_mm,
        orientation=acq.orientation,
        oblique_deg=acq.oblique_deg,
    )


def _readout_axis(acq: Acquisition) -> int:
    return 2 if acq.readout_axis == "row" else 1


def _with_chemical_shift(water: F32 | C64, fat: C64, axis: int, shift_px: float) -> C64:
    """One echo's complex signal: water plus fat displaced along the readout by its chemical shift."""
    return np.asarray(water + mr_signal.shift_along(fat, axis, shift_px))


def _mr_images(
    water: F32, fat: C64, acq: Acquisition, seed: int, effects: EchoEffects | None = None
) -> npt.NDArray[np.uint16]:
    """Chemical shift, complex noise, zero-filled k-space sampling and magnitude, stored as 12-bit integers.

    ``effects`` (pathology) form each echo's signal from its water and fat instead, given the chemical shift.
    """
    rng = np.random.default_rng([seed, 0x4015E])
    kept = float(np.prod(acq.sampling_fraction))
    sigma = np.float32(mr_signal.noise_sigma(acq) / math.sqrt(kept))
    axis = _readout_axis(acq)
    displacement = mr_signal.FAT_MAIN_PPM * acq.imaging_frequency_mhz / acq.pixel_bandwidth_hz  # px
    out = np.empty(water.shape, dtype=np.uint16)
    for e in range(water.shape[0]):
        sign = -1.0 if (acq.bipolar_readout and e % 2 == 1) else 1.0
        combine = functools.partial(_with_chemical_shift, axis=axis, shift_px=sign * displacement)
        signal = combine(water[e], fat[e]) if effects is None else effects(e, water[e], fat[e], combine)
        noise = rng.standard_normal((2, *signal.shape), dtype=np.float32)
        signal = signal + sigma * (noise[0] + 1j * noise[1]).astype(np.complex64)
        signal = mr_signal.truncate_kspace(signal.astype(np.complex64), acq.sampling_fraction)
        magnitude = np.abs(signal) * np.float32(mr_signal.RECEIVER_GAIN)
        out[e] = np.clip(np.rint(magnitude), 0, mr_signal.STORED_MAX).astype(np.uint16)
    return out


def _ct_image(hu: F32, geometry: VolumeGeometry, seed: int) -> npt.NDArray[np.int16]:
    """CT point-spread, correlated quantum noise, 12-bit range."""
    rng = np.random.default_rng([seed, 0xC7])
    sigma_vox = [CT_PSF_FWHM_MM / 2.3548 / s for s in geometry.spacing]
    blurred = scipy.ndimage.gaussian_filter(hu, sigma_vox, mode="nearest")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = scipy.ndimage.gaussian_filter(noise, 0.6)
    noise *= np.float32(CT_NOISE_HU / max(float(noise.std()), 1e-6))
    return np.asarray(np.clip(np.rint(blurred + noise), CT_HU_MIN, CT_HU_MAX), dtype=np.int16)


def generate_case(
    seed: int,
    acquisition: Acquisition = SEED_PROTOCOL,
    *,
    supersample: int = DEFAULT_SUPERSAMPLE,
    workers: int = 2,
    pathologies: Iterable[Pathology | str] = (),
) -> PhantomCase:
    """Simulate subject ``seed`` scanned with ``acquisition``: dual-echo MR magnitudes, CT and labels.

    Deterministic: the same seed and acquisition give identical arrays (worker count does not matter).
    ``pathologies`` (docs/phantom.md, Pathology) are placed from the seed; without any, the case is exactly the
    normal phantom, with an all-zero ``anomaly``.
    """
    started = time.perf_counter()
    wanted = parse_pathologies(pathologies)
    subject = SubjectParameters.from_seed(seed)
    anatomy = build_anatomy(subject, build_spine(subject))
    geometry = fov_geometry(acquisition, subject, anatomy)
    if wanted:
        case = _pathological_case(seed, acquisition, subject, anatomy, geometry, supersample, workers, wanted)
    else:
        acc = _Accumulator(seed, acquisition, geometry, anatomy, subject, supersample)
        render_counts(anatomy, geometry, supersample, acc, workers=workers)
        echoes = _mr_images(acc.water, acc.fat, acquisition, seed)
        ct = _ct_image(acc.hu, geometry, seed)
        case = PhantomCase(
            seed=seed,
            subject=subject,
            acquisition=acquisition,
            geometry=geometry,
            echoes=echoes,
            ct_hu=ct,
            labels=acc.labels,
        )
    logger.info(
        "phantom seed %d%s: %s grid, %d echoes, %.1f s",
        seed,
        f" with {', '.join(wanted)}" if wanted else "",
        "x".join(map(str, geometry.shape)),
        case.echoes.shape[0],
        time.perf_counter() - started,
    )
    return case


class _PathologyAccumulator(_Accumulator):
    """Also adds each overlay object's own signal and HU where it took the tissues' place, and keeps how much
    of each voxel the objects fill (ground truth) and how much of it is metal (field and CT streaks)."""

    def __init__(
        self,
        case_seed: int,
        acq: Acquisition,
        geometry: VolumeGeometry,
        anatomy: Anatomy,
        subject: SubjectParameters,
        supersample: int,
        objects: tuple[PlacedObject, ...],
    ) -> None:
        super().__init__(case_seed, acq, geometry, anatomy, subject, supersample)
        self.objects = objects
        shape = self.geometry.shape
        self.object_subvoxels = np.zeros(shape, dtype=np.uint8)
        self.dominant = np.zeros(shape, dtype=np.uint8)
        self.metal = np.zeros(shape, dtype=np.float32)

    def __call__(self, slab: SlabCounts) -> None:
        if slab.remaining is None or slab.objects is None:
            super().__call__(slab)
            return
        kappa, bias = self._add_tissues(slab.start, slab.stop, slab.remaining)
        rows = slice(slab.start, slab.stop)
        self.labels[rows] = np.argmax(slab.counts, axis=-1).astype(np.uint8)  # the anatomy's own labels
        per_object = slab.objects.reshape(-1, slab.objects.shape[-1])
        total = per_object.sum(axis=1, dtype=np.int64)
        idx = np.flatnonzero(total)
        self.object_subvoxels[rows].reshape(-1)[idx] = total[idx]
        self.dominant[rows].reshape(-1)[idx] = np.argmax(per_object[idx], axis=1) + 1
        flip = math.radians(self.acq.flip_angle_deg) * kappa[idx]
        for obj in self.objects:
            frac = per_object[idx, obj.value - 1].astype(np.float64) / self.norm
            hit = np.flatnonzero(frac)
            if hit.size == 0:
                continue
            where, amount = idx[hit], frac[hit]
            self.hu[rows].reshape(-1)[where] += (amount * obj.hu).astype(np.float32)
            if obj.material.is_metal:
                self.metal[rows].reshape(-1)[where] += amount.astype(np.float32)
            weight = amount * bias[where]
            for e, te in enumerate(self.acq.echo_times_ms):
                w, f = obj.material.signal(te, self.field, self.acq.repetition_time_ms, flip[hit])
                self.water[e, rows].reshape(-1)[where] += (weight * w).astype(np.float32)
                self.fat[e, rows].reshape(-1)[where] += (weight * f).astype(np.complex64)


def _pathological_case(
    seed: int,
    acquisition: Acquisition,
    subject: SubjectParameters,
    anatomy: Anatomy,
    geometry: VolumeGeometry,
    supersample: int,
    workers: int,
    pathologies: tuple[Pathology, ...],
) -> PhantomCase:
    """The normal pipeline with the pathology's objects on the render overlay, its effects on each echo before
    noise, metal streaks on the CT before its point-spread, and the ground truth of where it all is."""
    objects = place_objects(seed, subject, anatomy, pathologies)
    acc = _PathologyAccumulator(seed, acquisition, geometry, anatomy, subject, supersample, objects)
    overlay = [stroke for obj in objects for stroke in obj.strokes]
    render_counts(anatomy, geometry, supersample, acc, workers=workers, overlay=overlay)
    has_metal = bool(acc.metal.any())
    field = metal_field(acc.metal, geometry, acquisition) if has_metal else None
    motion = motion_pattern(seed) if Pathology.MOTION in pathologies else None
    ghosting = (
        Ghosting(acquisition, geometry, moving_weight(geometry, anatomy.torso, motion), motion)
        if motion is not None
        else None
    )
    effects = EchoEffects(acquisition, geometry, field, ghosting)
    echoes = _mr_images(acc.water, acc.fat, acquisition, seed, effects)
    hu = acc.hu + streaks_hu(acc.metal, geometry, anatomy.torso, seed) if has_metal else acc.hu
    ct = _ct_image(hu, geometry, seed)
    filled = acc.object_subvoxels.astype(np.float32) >= np.float32(acc.norm / 2.0)
    anomaly, described = assemble_anomaly(
        objects, acc.dominant, filled, effects.metal_footprint, effects.motion_footprint, motion, geometry
    )
    return PhantomCase(
        seed=seed,
        subject=subject,
        acquisition=acquisition,
        geometry=geometry,
        echoes=echoes,
        ct_hu=ct,
        labels=acc.labels,
        pathologies=pathologies,
        anomaly=anomaly,
        anomaly_objects=described,
    )
