"""Vertebral geometry per lumbar level, measured the same automatic way on sCT and on CT.

Per level L1-L5 three distances a surgeon reads before placing pedicle screws or planning a decompression:

- **Anterior and posterior vertebral body height**: the distance between the outer 200 HU crossings of the
  superior and inferior endplates, along a line parallel to the body's axis in its mid-sagittal plane,
  :data:`WALL_INSET_MM` inside the anterior (respectively posterior) wall. These are the anterior and posterior
  heights (Ha, Hp) of quantitative vertebral morphometry (six-point placement on a lateral view, as in Genant's
  and McCloskey's methods), measured a few mm in from the corners so that a rounded corner or a small
  osteophyte does not decide where the endplate is.
- **Canal sagittal diameter**: the bony canal's antero-posterior depth in the mid-sagittal plane at mid-body
  height (the mid-vertebral level), from the posterior wall of the body to the anterior surface of the posterior
  arch (the spinolaminar junction), both at their 200 HU crossings. Mid-vertebral canal depth is the
  developmental canal size, away from the disc level where degeneration narrows it (Griffith et al., Quant
  Imaging Med Surg 2016, doi:10.21037/qims.2016.12.17; Chatha & Schweitzer, Bull NYU Hosp Jt Dis 2011, who
  measure on the midline sagittal image at the mid-vertebral level and at each disc).

How: the phantom says where each vertebra is (its centre and axes, :func:`engines.phantom.spine.build_spine`);
everything else is found in the image. Along each line the HU is sampled every :data:`SAMPLE_STEP_MM` in patient
space by trilinear interpolation, so oblique, lordotic and scoliotic vertebrae are measured along their own axes,
and each crossing is located between samples by linear interpolation (sub-voxel). Every search starts from a
probe point that must read below 200 HU and walks towards the bone, so the first crossing met is the outer
surface: the anterior wall from the soft tissue in front of the body, the posterior wall and the arch from inside
the canal, each endplate from the middle of the adjacent disc. A search that cannot start (its probe reads bone),
finds no crossing, or leaves the field of view gives a missing measurement with its reason, never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from engines.evaluation.metrics import HuArray
from engines.phantom.spine import Segment, build_spine
from engines.phantom.subject import SubjectParameters
from sct_core.geometry import VolumeGeometry

F64 = npt.NDArray[np.float64]

LUMBAR_LEVELS = ("L1", "L2", "L3", "L4", "L5")
#: The bone surface is where the HU crosses this level (the bone-Dice threshold of the issue's targets).
LEVEL_HU = 200.0
#: Spacing of the samples along each measurement line, mm (a tenth of a voxel).
SAMPLE_STEP_MM = 0.1
#: Heights are measured this far inside the anterior and posterior walls found.
WALL_INSET_MM = 3.0
#: The anterior wall is searched for from this far in front of the body's nominal anterior surface (soft tissue).
ANTERIOR_PROBE_MM = 6.0
#: The canal is entered this far behind the body's nominal posterior surface: inside the thecal sac at every
#: lumbar level (the canal is at least 10 mm deep there).
CANAL_PROBE_MM = 5.0
#: How far behind the canal probe the posterior arch is looked for.
ARCH_SEARCH_MM = 40.0
#: Names of the three measures, in report order.
MEASURES = ("anterior_height", "posterior_height", "canal_diameter")


@dataclass(frozen=True, slots=True, eq=False)
class VertebraPlacement:
    """Where a vertebra and its neighbouring discs are, in patient mm: what the measurement starts from.

    ``frame`` columns are the vertebra's left, posterior and cranial (body axis) directions; a disc is given by
    its centre and its own axis, whose mid-plane is where the endplate searches start.
    """

    level: str
    center: F64
    frame: F64
    half_depth: float
    disc_above_center: F64
    disc_above_axis: F64
    disc_below_center: F64
    disc_below_axis: F64


def lumbar_placements(subject: SubjectParameters) -> tuple[VertebraPlacement, ...]:
    """L1-L5 of ``subject`` as the phantom builds them (deterministic from the subject's seed)."""
    segments = build_spine(subject)
    by_name = {s.name: s for s in segments}
    discs = [s for s in segments if s.kind == "disc"]
    placements = []
    for level in LUMBAR_LEVELS:
        vertebra = by_name[level]
        above = _disc(discs, lambda name, lv=level: name.endswith(f"-{lv}"), level, "above")
        below = _disc(discs, lambda name, lv=level: name.startswith(f"{lv}-"), level, "below")
        placements.append(
            VertebraPlacement(
                level=level,
                center=vertebra.center,
                frame=vertebra.frame,
                half_depth=vertebra.half_depth,
                disc_above_center=above.center,
                disc_above_axis=above.frame[:, 2],
                disc_below_center=below.center,
                disc_below_axis=below.frame[:, 2],
            )
        )
    return tuple(placements)


def _disc(discs: list[Segment], match: Any, level: str, where: str) -> Segment:
    found = [d for d in discs if match(d.name)]
    if len(found) != 1:
        raise ValueError(f"spine has {len(found)} discs {where} {level}; expected exactly 1")
    return found[0]


@dataclass(frozen=True, slots=True)
class Measurement:
    """One distance in mm, or why it could not be measured (then ``value_mm`` is NaN)."""

    value_mm: float
    missing: str | None = None

    @property
    def ok(self) -> bool:
        return self.missing is None

    def to_dict(self) -> dict[str, Any]:
        if self.missing is not None:
            return {"mm": None, "missing": self.missing}
        return {"mm": round(self.value_mm, 3), "missing": None}


def _missing(reason: str) -> Measurement:
    return Measurement(math.nan, reason)


@dataclass(frozen=True, slots=True)
class VertebraMeasures:
    """The three measures of one vertebra in one volume, and the landmarks they came from.

    Landmarks are in the vertebra's frame (mm from its centre): ``*_wall_y`` and ``arch_y`` along its posterior
    axis at mid-height, ``*_line_y`` where the height lines run; None where not found.
    """

    level: str
    anterior_height: Measurement
    posterior_height: Measurement
    canal_diameter: Measurement
    anterior_wall_y: float | None
    posterior_wall_y: float | None
    arch_y: float | None

    @property
    def anterior_line_y(self) -> float | None:
        return None if self.anterior_wall_y is None else self.anterior_wall_y + WALL_INSET_MM

    @property
    def posterior_line_y(self) -> float | None:
        return None if self.posterior_wall_y is None else self.posterior_wall_y - WALL_INSET_MM

    def measure(self, name: str) -> Measurement:
        if name not in MEASURES:
            raise ValueError(f"unknown vertebral measure {name!r}; expected one of {', '.join(MEASURES)}")
        value: Measurement = getattr(self, name)
        return value


class _Sampler:
    """HU of one volume at patient-space points, trilinear; NaN outside the grid."""

    def __init__(self, volume: HuArray, geometry: VolumeGeometry) -> None:
        if volume.shape != geometry.shape:
            raise ValueError(f"volume shape {volume.shape} does not match grid {geometry.shape}")
        self.volume = np.asarray(volume, dtype=np.float32)
        self.to_index = np.linalg.inv(geometry.affine)

    def first_rise(self, start: F64, direction: F64, length: float, level: float) -> tuple[float | None, str]:
        """Distance from ``start`` along unit ``direction`` to the first up-crossing of ``level`` within
        ``length`` mm; else None and why."""
        s = np.arange(0.0, length + SAMPLE_STEP_MM / 2, SAMPLE_STEP_MM)
        points = start[None, :] + s[:, None] * direction[None, :]
        index = (self.to_index[:3, :3] @ points.T) + self.to_index[:3, 3:4]
        values = ndimage.map_coordinates(self.volume, index, order=1, mode="constant", cval=np.nan)
        outside = ~np.isfinite(values)
        above = values > level
        if outside[0]:
            return None, "its start lies outside the field of view"
        if above[0]:
            return None, f"its start reads {values[0]:.0f} HU, above {level:g} HU"
        rise = int(np.argmax(above | outside))
        if not (above[rise] or outside[rise]):
            return None, f"no {level:g} HU crossing within {length:.1f} mm"
        if outside[rise]:
            return None, "it leaves the field of view before reaching bone"
        v0, v1 = float(values[rise - 1]), float(values[rise])
        return float(s[rise - 1] + (level - v0) / (v1 - v0) * SAMPLE_STEP_MM), ""


def measure_vertebra(
    volume: HuArray, geometry: VolumeGeometry, placement: VertebraPlacement, *, level: float = LEVEL_HU
) -> VertebraMeasures:
    """The three measures of one vertebra in ``volume`` (module docstring)."""
    sampler = _Sampler(volume, geometry)
    return _measure(sampler, placement, level)


def _measure(sampler: _Sampler, p: VertebraPlacement, level: float) -> VertebraMeasures:
    ey = p.frame[:, 1]
    hd = p.half_depth
    # Anterior wall: from the soft tissue in front of the body towards its centre.
    start_y = -(hd + ANTERIOR_PROBE_MM)
    found, why = sampler.first_rise(p.center + start_y * ey, ey, -start_y, level)
    anterior_wall = None if found is None else start_y + found
    anterior_why = f"anterior wall not found: the search from {-start_y:.1f} mm in front of the centre: {why}"
    # Posterior wall and arch: from inside the canal, forwards and backwards.
    canal_y = hd + CANAL_PROBE_MM
    canal_start = p.center + canal_y * ey
    found, why_wall = sampler.first_rise(canal_start, -ey, canal_y, level)
    posterior_wall = None if found is None else canal_y - found
    found, why_arch = sampler.first_rise(canal_start, ey, ARCH_SEARCH_MM, level)
    arch = None if found is None else canal_y + found
    posterior_why = f"posterior wall not found: the search forwards from the canal: {why_wall}"

    if posterior_wall is None:
        canal = _missing(posterior_why)
    elif arch is None:
        canal = _missing(f"posterior arch not found: the search backwards from the canal: {why_arch}")
    else:
        canal = Measurement(arch - posterior_wall)

    heights = []
    for name, wall, inset, why in (
        ("anterior", anterior_wall, WALL_INSET_MM, anterior_why),
        ("posterior", posterior_wall, -WALL_INSET_MM, posterior_why),
    ):
        if wall is None:
            heights.append(_missing(why))
            continue
        heights.append(_height(sampler, p, wall + inset, name, level))
    return VertebraMeasures(
        level=p.level,
        anterior_height=heights[0],
        posterior_height=heights[1],
        canal_diameter=canal,
        anterior_wall_y=anterior_wall,
        posterior_wall_y=posterior_wall,
        arch_y=arch,
    )


def _height(sampler: _Sampler, p: VertebraPlacement, line_y: float, name: str, level: float) -> Measurement:
    """Endplate to endplate along the body's axis at ``line_y``: each endplate searched from its disc's middle."""
    ez = p.frame[:, 2]
    base = p.center + line_y * p.frame[:, 1]
    ends = []
    for side, disc_center, disc_axis in (
        ("superior", p.disc_above_center, p.disc_above_axis),
        ("inferior", p.disc_below_center, p.disc_below_axis),
    ):
        facing = float(ez @ disc_axis)
        if abs(facing) < 1e-6:
            return _missing(f"{name} height: the {side} disc's mid-plane does not cross the measurement line")
        probe_z = -float((base - disc_center) @ disc_axis) / facing  # the line meets the disc's mid-plane
        if probe_z * (1.0 if side == "superior" else -1.0) <= 0.0:
            return _missing(
                f"{name} height: the {side} disc's mid-plane lies on the wrong side of mid-height"
            )
        direction = -ez if side == "superior" else ez
        found, why = sampler.first_rise(base + probe_z * ez, direction, abs(probe_z), level)
        if found is None:
            return _missing(f"{name} height: {side} endplate not found: the search from the disc: {why}")
        ends.append(probe_z - found if side == "superior" else probe_z + found)
    return Measurement(ends[0] - ends[1])


def measure_lumbar(
    volume: HuArray,
    geometry: VolumeGeometry,
    placements: Sequence[VertebraPlacement],
    *,
    level: float = LEVEL_HU,
) -> tuple[VertebraMeasures, ...]:
    """Every vertebra of ``placements`` measured in ``volume``."""
    sampler = _Sampler(volume, geometry)
    return tuple(_measure(sampler, p, level) for p in placements)


@dataclass(frozen=True, slots=True)
class LevelComparison:
    """One level measured on sCT and on CT; differences are sCT − CT."""

    level: str
    sct: VertebraMeasures
    ct: VertebraMeasures

    def difference_mm(self, name: str) -> float | None:
        s, c = self.sct.measure(name), self.ct.measure(name)
        return s.value_mm - c.value_mm if s.ok and c.ok else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"level": self.level}
        for name in MEASURES:
            diff = self.difference_mm(name)
            out[name] = {
                "ct": self.ct.measure(name).to_dict(),
                "sct": self.sct.measure(name).to_dict(),
                "difference_mm": None if diff is None else round(diff, 3),
            }
        return out


def compare_levels(
    sct_hu: HuArray, ct_hu: HuArray, geometry: VolumeGeometry, placements: Sequence[VertebraPlacement]
) -> tuple[LevelComparison, ...]:
    """Each placed vertebra measured on sCT and on CT by the same method."""
    sct = measure_lumbar(sct_hu, geometry, placements)
    ct = measure_lumbar(ct_hu, geometry, placements)
    return tuple(LevelComparison(s.level, s, c) for s, c in zip(sct, ct, strict=True))


def summarise_levels(levels: Sequence[LevelComparison]) -> dict[str, dict[str, float]]:
    """Per measure over all given levels (of all cases): mean absolute sCT − CT difference, its population SD,
    how many levels counted and how many were missing in either volume."""
    out: dict[str, dict[str, float]] = {}
    for name in MEASURES:
        diffs = [d for d in (lv.difference_mm(name) for lv in levels) if d is not None]
        absolute = np.abs(np.asarray(diffs, dtype=np.float64))
        out[name] = {
            "mad_mm": float(absolute.mean()) if absolute.size else math.nan,
            "sd_mm": float(absolute.std(ddof=0)) if absolute.size else math.nan,
            "n": float(absolute.size),
            "missing": float(len(levels) - absolute.size),
        }
    return out
