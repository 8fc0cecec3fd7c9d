"""Where each vertebra and disc sits: the spinal column as a chain of wedged segments.

The chain is built upward from the S1 endplate (tilted by the sacral slope) and downward through the fused
sacrum, so lordosis, sacral slope, disc height loss and spondylolisthesis are all exact geometric consequences
of a few subject parameters. Scoliosis then bends the chain in the coronal plane and rotates the vertebrae about
their axes, as a real scoliotic curve does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.phantom.subject import DISC_LEVELS, VERTEBRA_LEVELS, SubjectParameters

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LevelDimensions:
    """Adult vertebral dimensions in mm before the subject's ``spine_scale`` (textbook morphometry)."""

    body_height: float
    half_depth: float
    half_width: float
    interpedicular_half: float  # half the canal width between the pedicles
    pedicle_width: float
    pedicle_height: float
    pedicle_length: float
    transverse_length: float
    spinous_length: float


LEVEL_DIMENSIONS: dict[str, LevelDimensions] = {
    "T11": LevelDimensions(23.0, 13.5, 18.0, 9.0, 7.0, 14.0, 8.0, 14.0, 28.0),
    "T12": LevelDimensions(24.0, 14.5, 19.0, 10.0, 7.0, 15.0, 8.0, 10.0, 28.0),
    "L1": LevelDimensions(25.5, 15.5, 20.5, 11.0, 7.0, 15.0, 9.0, 15.0, 28.0),
    "L2": LevelDimensions(26.5, 16.3, 22.0, 11.5, 8.0, 15.0, 9.5, 20.0, 30.0),
    "L3": LevelDimensions(27.0, 17.0, 23.5, 12.0, 9.5, 15.0, 10.0, 24.0, 30.0),
    "L4": LevelDimensions(26.5, 17.5, 24.5, 12.5, 11.0, 14.0, 10.0, 20.0, 27.0),
    "L5": LevelDimensions(25.5, 17.5, 26.0, 13.5, 15.0, 13.0, 9.0, 16.0, 22.0),
    "S1": LevelDimensions(27.0, 18.0, 27.0, 14.0, 15.0, 13.0, 9.0, 0.0, 15.0),
}
#: Fused sacral segments below S1: (body height, half depth, half width).
SACRAL_SEGMENTS = {"S2": (21.0, 13.5, 21.0), "S3": (17.0, 10.5, 16.0)}
#: Healthy disc height at the centre, mm, by the level above the disc.
DISC_HEIGHT = {"T11": 6.0, "T12": 7.0, "L1": 8.5, "L2": 9.5, "L3": 10.5, "L4": 11.5, "L5": 11.0}
#: Share of the L1-S1 lordosis carried by each lumbar disc and body (the rest of the column is near neutral).
DISC_LORDOSIS_SHARE = {"L1": 0.05, "L2": 0.08, "L3": 0.12, "L4": 0.17, "L5": 0.25}
BODY_LORDOSIS_SHARE = {"L1": 0.03, "L2": 0.04, "L3": 0.05, "L4": 0.08, "L5": 0.13}
#: Thoracolumbar kyphosis: wedge (deg) of the thoracic bodies and discs.
THORACIC_WEDGE_DEG = -2.0
#: How much a collapsed disc (degeneration 1.0) loses of its height.
DISC_HEIGHT_LOSS_AT_FULL_DEGENERATION = 0.55
#: Sacral kyphosis: each fused segment turns the axis by this much (deg).
SACRAL_CURVE_DEG = 14.0
#: Axial rotation of a scoliotic vertebra per mm of lateral deviation (deg/mm), capped.
SCOLIOSIS_ROTATION_DEG_PER_MM = 0.8
SCOLIOSIS_ROTATION_MAX_DEG = 20.0


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """One vertebra or disc placed in patient space.

    Vertebrae are named by level ("L4"), discs by the two levels they join ("L4-L5").
    ``frame`` columns are the segment's local x (patient left), y (posterior) and z (cranial, along the axis).
    ``position`` is its fractional index along VERTEBRA_LEVELS (a disc sits half-way between its vertebrae).
    """

    name: str
    kind: str  # "vertebra" or "disc"
    position: float
    center: F64
    frame: F64
    height: float
    half_depth: float
    half_width: float
    wedge_deg: float
    dims: LevelDimensions | None

    def to_world(self, local: tuple[float, float, float] | F64) -> F64:
        return np.asarray(self.center + self.frame @ np.asarray(local, dtype=np.float64), dtype=np.float64)


def _sagittal_frame(phi: float) -> F64:
    """Frame whose z axis is tilted anteriorly by ``phi`` radians from the patient's superior axis."""
    z = np.array([0.0, -math.sin(phi), math.cos(phi)])
    y = np.array([0.0, math.cos(phi), math.sin(phi)])
    x = np.array([1.0, 0.0, 0.0])
    return np.stack([x, y, z], axis=1)


def _axis(phi: float) -> F64:
    return np.array([0.0, -math.sin(phi), math.cos(phi)])


def build_spine(subject: SubjectParameters) -> list[Segment]:
    """Place every vertebra and disc for ``subject``, cranial first, with L3's centre at the origin."""
    s = subject.spine_scale
    lordosis = subject.lordosis_deg
    segments: list[Segment] = []

    def body_dims(level: str) -> tuple[float, float, float]:
        d = LEVEL_DIMENSIONS[level]
        return d.body_height * s, d.half_depth * s, d.half_width * s

    # --- upward from the S1 superior endplate -----------------------------------------------------------
    endplate = np.zeros(3)
    phi = math.radians(subject.sacral_slope_deg)
    s1_h, s1_b, s1_a = body_dims("S1")
    s1_center = endplate - _axis(phi) * s1_h / 2.0
    segments.append(
        Segment(
            "S1",
            "vertebra",
            7.0,
            s1_center,
            _sagittal_frame(phi),
            s1_h,
            s1_b,
            s1_a,
            0.0,
            LEVEL_DIMENSIONS["S1"],
        )
    )
    upward = list(zip(DISC_LEVELS[::-1], VERTEBRA_LEVELS[-2::-1], strict=True))  # (disc L5, vertebra L5), ...
    for disc_level, level in upward:
        index = VERTEBRA_LEVELS.index(level)
        degeneration = subject.disc_degeneration[DISC_LEVELS.index(disc_level)]
        disc_h = DISC_HEIGHT[disc_level] * s * (1.0 - DISC_HEIGHT_LOSS_AT_FULL_DEGENERATION * degeneration)
        if disc_level in DISC_LORDOSIS_SHARE:
            wedge = lordosis * DISC_LORDOSIS_SHARE[disc_level]
        elif disc_level == "T12":
            wedge = 0.0
        else:
            wedge = THORACIC_WEDGE_DEG
        _, below_b, below_a = (segments[-1].height, segments[-1].half_depth, segments[-1].half_width)
        body_h, body_b, body_a = body_dims(level)
        mid = phi - math.radians(wedge) / 2.0
        disc_center = endplate + _axis(mid) * disc_h / 2.0
        below_level = VERTEBRA_LEVELS[VERTEBRA_LEVELS.index(disc_level) + 1]
        segments.append(
            Segment(
                f"{disc_level}-{below_level}",
                "disc",
                index + 0.5,
                disc_center,
                _sagittal_frame(mid),
                disc_h,
                (body_b + below_b) / 2.0,
                (body_a + below_a) / 2.0,
                wedge,
                None,
            )
        )
        endplate = endplate + _axis(mid) * disc_h
        phi -= math.radians(wedge)
        if level == subject.listhesis_level:
            # Spondylolisthesis: the vertebra and everything above it slip anteriorly in the endplate plane.
            anterior = -_sagittal_frame(phi)[:, 1]
            endplate = endplate + anterior * subject.listhesis_fraction * 2.0 * body_b
        body_wedge = (
            lordosis * BODY_LORDOSIS_SHARE.get(level, 0.0) if level.startswith("L") else THORACIC_WEDGE_DEG
        )
        mid = phi - math.radians(body_wedge) / 2.0
        center = endplate + _axis(mid) * body_h / 2.0
        segments.append(
            Segment(
                level,
                "vertebra",
                float(index),
                center,
                _sagittal_frame(mid),
                body_h,
                body_b,
                body_a,
                body_wedge,
                LEVEL_DIMENSIONS[level],
            )
        )
        endplate = endplate + _axis(mid) * body_h
        phi -= math.radians(body_wedge)
    segments.reverse()  # cranial first

    # --- downward through the fused sacrum --------------------------------------------------------------
    phi = math.radians(subject.sacral_slope_deg)
    bottom = s1_center - _axis(phi) * s1_h / 2.0
    for offset, (name, (h, b, a)) in enumerate(SACRAL_SEGMENTS.items(), start=1):
        remnant = 1.5 * s  # rudimentary S-S disc
        phi_mid = phi + math.radians(SACRAL_CURVE_DEG) / 2.0
        disc_center = bottom - _axis(phi_mid) * remnant / 2.0
        segments.append(
            Segment(
                f"S{offset}-S{offset + 1}",
                "disc",
                7.0 + offset - 0.5,
                disc_center,
                _sagittal_frame(phi_mid),
                remnant,
                b * s,
                a * s,
                0.0,
                None,
            )
        )
        bottom = bottom - _axis(phi_mid) * remnant
        phi += math.radians(SACRAL_CURVE_DEG)
        center = bottom - _axis(phi) * h * s / 2.0
        segments.append(
            Segment(
                name, "vertebra", 7.0 + offset, center, _sagittal_frame(phi), h * s, b * s, a * s, 0.0, None
            )
        )
        bottom = bottom - _axis(phi) * h * s

    # --- lay the L1-S1 chord along the table, centre on L3 and bend for scoliosis ----------------------------
    by_name = {seg.name: seg for seg in segments}
    chord = by_name["L1"].center - by_name["S1"].center
    psi = math.atan2(chord[1], chord[2]) + math.radians(subject.spine_tilt_deg)
    c, s_ = math.cos(psi), math.sin(psi)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s_], [0.0, s_, c]])
    l3 = rotation @ by_name["L3"].center
    placed = []
    for seg in segments:
        turned = Segment(
            seg.name,
            seg.kind,
            seg.position,
            rotation @ seg.center,
            rotation @ seg.frame,
            seg.height,
            seg.half_depth,
            seg.half_width,
            seg.wedge_deg,
            seg.dims,
        )
        placed.append(_scoliotic(turned, turned.center - l3, subject))
    return placed


def _scoliotic(seg: Segment, center: F64, subject: SubjectParameters) -> Segment:
    def lateral(position: float) -> float:
        return subject.scoliosis_mm * math.exp(-(((position - subject.scoliosis_apex) / 1.8) ** 2))

    dx = lateral(seg.position)
    slope = (lateral(seg.position + 0.1) - lateral(seg.position - 0.1)) / (0.2 * 37.0)  # ~37 mm per level
    tilt = math.atan(slope)  # coronal tilt about the AP axis
    spin = math.radians(
        float(
            np.clip(
                dx * SCOLIOSIS_ROTATION_DEG_PER_MM, -SCOLIOSIS_ROTATION_MAX_DEG, SCOLIOSIS_ROTATION_MAX_DEG
            )
        )
    )
    c, s_ = math.cos(tilt), math.sin(tilt)
    coronal = np.array([[c, 0.0, s_], [0.0, 1.0, 0.0], [-s_, 0.0, c]])
    c2, s2 = math.cos(spin), math.sin(spin)
    axial = np.array([[c2, -s2, 0.0], [s2, c2, 0.0], [0.0, 0.0, 1.0]])
    frame = coronal @ seg.frame @ axial
    new_center = center + np.array([dx, 0.0, 0.0])
    return Segment(
        seg.name,
        seg.kind,
        seg.position,
        new_center,
        frame,
        seg.height,
        seg.half_depth,
        seg.half_width,
        seg.wedge_deg,
        seg.dims,
    )
