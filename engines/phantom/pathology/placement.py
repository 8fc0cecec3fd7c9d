"""Where each pathological object goes, drawn from the seed: posterior fixation, lesion, metastases, motion.

Every pathology draws from its own random stream (seeded by the case seed and the pathology), so adding one
pathology to a case never moves another, and ``(seed, pathologies)`` names a case. Objects are placed in the
frames of the subject's own vertebrae, so they follow lordosis, scoliosis and size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.phantom.anatomy import Anatomy, thecal_sac_position
from engines.phantom.pathology.kinds import Pathology
from engines.phantom.pathology.materials import (
    CALCIFICATION,
    HU_TITANIUM,
    SCLEROTIC_BONE,
    TITANIUM,
    TUMOUR,
    Material,
)
from engines.phantom.render import OverlayStroke
from engines.phantom.shapes import Capsule, Ellipsoid, Primitive
from engines.phantom.spine import LEVEL_DIMENSIONS, Segment
from engines.phantom.subject import SubjectParameters
from engines.phantom.tissues import Tissue

F64 = npt.NDArray[np.float64]

#: Stream key of the pathology random generators (combined with the seed and the pathology's index).
_STREAM = 0x9A7
#: Posterior fixation constructs, as a surgeon chooses them for lower-lumbar fusion.
FIXATION_LEVELS: tuple[tuple[str, ...], ...] = (("L4", "L5"), ("L3", "L4", "L5"))
#: Pedicle screw: 6.5 mm shaft, 40-50 mm long in 5 mm steps; polyaxial tulip head ~11 mm wide, 12 mm tall.
SCREW_DIAMETER_MM = 6.5
SCREW_LENGTHS_MM = (40.0, 45.0, 50.0)
HEAD_RADIUS_MM = 5.5
HEAD_LENGTH_MM = 12.0
#: Medial convergence of the screw axis by level (deg), the usual pedicle axis of the lumbar spine.
CONVERGENCE_DEG = {"L1": 8.0, "L2": 9.0, "L3": 10.0, "L4": 12.0, "L5": 15.0}
#: Screw tips reach this fraction of the body's depth, never closer than the clearance to its anterior cortex.
TIP_DEPTH = 0.85
ANTERIOR_CLEARANCE_MM = 2.5
#: 5.5 mm titanium rod, overhanging the end screws' heads by 5 mm.
ROD_DIAMETER_MM = 5.5
ROD_OVERHANG_MM = 5.0
#: Calcified intradural lesion: 5-15 mm, 550-900 HU (400-1000 HU after the CT point-spread), L2-L4.
LESION_DIAMETER_MM = (5.0, 15.0)
LESION_HU = (550.0, 900.0)
LESION_LEVELS = ("L2", "L3", "L4")
#: Metastases: levels L1-L4 (one each, never the same vertebra); diameters and HU ranges.
METASTASIS_LEVELS = ("L1", "L2", "L3", "L4")
SCLEROTIC_DIAMETER_MM = (8.0, 16.0)
SCLEROTIC_HU = (750.0, 1100.0)
LYTIC_DIAMETER_MM = (12.0, 20.0)
LYTIC_HU = (25.0, 55.0)
#: Share of lytic metastases that break through the cortex into the paravertebral soft tissue, how deep inside
#: the wall (in radii) their centre lies, and the vertebral body's waist (anatomy: 6 % narrower at mid-height).
CORTICAL_BREAK_PROBABILITY = 0.5
BREAK_DEPTH = 0.6
BODY_WAIST = 0.06
#: What a lytic metastasis may replace: marrow always; with a cortical break also the cortex and the soft
#: tissue just outside it (never a vessel, the disc or the canal).
_LYTIC_INSIDE = frozenset({Tissue.MARROW_BODY})
_LYTIC_BREAK = frozenset(
    {
        Tissue.MARROW_BODY,
        Tissue.CORTICAL_BONE,
        Tissue.LIGAMENT,
        Tissue.MUSCLE,
        Tissue.VISCERAL_FAT,
        Tissue.INTERMUSCULAR_FAT,
    }
)


@dataclass(frozen=True, slots=True, eq=False)
class PlacedObject:
    """One pathological object: its solids on the render overlay (all numbered ``value``) and what it is."""

    value: int
    name: str
    kind: Pathology
    material: Material
    hu: float
    level: str | None
    side: str | None
    centre_mm: tuple[float, float, float]
    size_mm: float
    strokes: tuple[OverlayStroke, ...]


@dataclass(frozen=True, slots=True)
class MotionPattern:
    """Periodic displacement during the scan: breathing moves the anterior body, or the whole body sways.

    ``direction`` is a unit vector in patient LPS; the displacement at time t is
    ``amplitude_mm * sin(2π t / period_s + phase_rad) * direction``, scaled per voxel by the moving weight.
    """

    whole_body: bool
    amplitude_mm: float
    period_s: float
    phase_rad: float
    direction: tuple[float, float, float]


def rng_for(seed: int, pathology: Pathology, *extra: int) -> np.random.Generator:
    """The random stream of one pathology of one case."""
    index = list(Pathology).index(pathology)
    return np.random.default_rng([seed, _STREAM, index, *extra])


def _vertebra(anatomy: Anatomy, name: str) -> Segment:
    return next(s for s in anatomy.segments if s.name == name and s.kind == "vertebra")


def _centre(point: F64) -> tuple[float, float, float]:
    return (float(point[0]), float(point[1]), float(point[2]))


class _Numbering:
    def __init__(self) -> None:
        self.next = 1

    def take(self) -> int:
        value = self.next
        self.next += 1
        return value


def place_objects(
    seed: int, subject: SubjectParameters, anatomy: Anatomy, pathologies: tuple[Pathology, ...]
) -> tuple[PlacedObject, ...]:
    """Every solid object of ``pathologies``, numbered 1.. in the order they are painted (later ones win)."""
    numbering = _Numbering()
    objects: list[PlacedObject] = []
    if Pathology.SCREWS in pathologies:
        objects += _fixation(rng_for(seed, Pathology.SCREWS), subject, anatomy, numbering)
    if Pathology.CALCIFIED_LESION in pathologies:
        objects.append(_lesion(rng_for(seed, Pathology.CALCIFIED_LESION), subject, anatomy, numbering))
    levels = [str(v) for v in np.random.default_rng([seed, _STREAM, 0x1E7E1]).permutation(METASTASIS_LEVELS)]
    if Pathology.SCLEROTIC_METASTASIS in pathologies:
        rng = rng_for(seed, Pathology.SCLEROTIC_METASTASIS)
        objects.append(_sclerotic(rng, _vertebra(anatomy, levels[0]), numbering))
    if Pathology.LYTIC_METASTASIS in pathologies:
        rng = rng_for(seed, Pathology.LYTIC_METASTASIS)
        objects.append(_lytic(rng, _vertebra(anatomy, levels[1]), numbering))
    return tuple(objects)


def motion_pattern(seed: int) -> MotionPattern:
    """Breathing (75 %): the anterior body rises 4-10 mm at 12-17 breaths per minute, mostly anteriorly with
    some cranio-caudal excursion. Otherwise a restless patient: the whole body sways 1-2.5 mm at 5-12 s."""
    rng = rng_for(seed, Pathology.MOTION)
    if rng.random() < 0.75:
        direction = np.array([0.0, -1.0, float(rng.uniform(0.2, 0.5))])
        direction /= np.linalg.norm(direction)
        return MotionPattern(
            whole_body=False,
            amplitude_mm=float(rng.uniform(4.0, 10.0)),
            period_s=60.0 / float(rng.uniform(12.0, 17.0)),
            phase_rad=float(rng.uniform(0.0, 2.0 * math.pi)),
            direction=_centre(direction),
        )
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return MotionPattern(
        whole_body=True,
        amplitude_mm=float(rng.uniform(1.0, 2.5)),
        period_s=float(rng.uniform(5.0, 12.0)),
        phase_rad=float(rng.uniform(0.0, 2.0 * math.pi)),
        direction=_centre(direction),
    )


def _fixation(
    rng: np.random.Generator, subject: SubjectParameters, anatomy: Anatomy, numbering: _Numbering
) -> list[PlacedObject]:
    """Bilateral pedicle screws at each level of the construct, then one rod per side through their heads."""
    levels = FIXATION_LEVELS[int(rng.integers(len(FIXATION_LEVELS)))]
    scale = subject.spine_scale
    screws: list[PlacedObject] = []
    heads: dict[str, list[F64]] = {"left": [], "right": []}
    for name in levels:
        v = _vertebra(anatomy, name)
        d = LEVEL_DIMENSIONS[name]
        ip, pw, pl = d.interpedicular_half * scale, d.pedicle_width * scale, d.pedicle_length * scale
        zp = 0.2 * v.height
        for side, side_name in ((1.0, "left"), (-1.0, "right")):  # LPS: +x is the patient's left
            conv = math.radians(CONVERGENCE_DEG[name] + float(rng.uniform(-3.0, 3.0)))
            tilt = math.radians(float(rng.uniform(-4.0, 4.0)))  # cranio-caudal, about the endplate's plane
            axis_local = np.array([-side * math.sin(conv), -math.cos(conv), math.sin(tilt)])
            axis_local /= np.linalg.norm(axis_local)
            # Through the pedicle's middle; the entry is where the axis leaves the posterior cortex.
            middle = np.array([side * (ip + pw / 2.0), v.half_depth + (pl - 5.0) / 2.0, zp])
            back = (pl / 2.0 + 4.5) / math.cos(conv)
            entry_local = middle - axis_local * back
            # The length that brings the tip to TIP_DEPTH of the body's depth, in 5 mm steps, short of the
            # anterior cortex by ANTERIOR_CLEARANCE_MM.
            along = -axis_local[1]
            aim = (entry_local[1] + (2.0 * TIP_DEPTH - 1.0) * v.half_depth) / along
            limit = (entry_local[1] + v.half_depth - ANTERIOR_CLEARANCE_MM) / along
            fitting = [ln for ln in SCREW_LENGTHS_MM if ln <= limit] or [SCREW_LENGTHS_MM[0]]
            length = min(fitting, key=lambda ln: abs(ln - aim))
            axis = v.frame @ axis_local
            entry = v.to_world(entry_local)
            tip = entry + axis * (length - SCREW_DIAMETER_MM / 2.0)
            # The tulip head sits on the bone, 1 mm behind the entry; the rod runs through its middle.
            head_centre = entry - axis * (HEAD_LENGTH_MM / 2.0 + 1.0)
            head_half = axis * (HEAD_LENGTH_MM / 2.0 - HEAD_RADIUS_MM)
            up = v.frame[:, 2]
            value = numbering.take()
            shaft = Capsule.between(Tissue.AIR, entry, tip, SCREW_DIAMETER_MM / 2, SCREW_DIAMETER_MM / 2, up)
            head = Capsule.between(
                Tissue.AIR,
                head_centre - head_half,
                head_centre + head_half,
                HEAD_RADIUS_MM,
                HEAD_RADIUS_MM,
                up,
            )
            heads[side_name].append(head_centre)
            screws.append(
                PlacedObject(
                    value=value,
                    name=f"screw {name} {side_name}",
                    kind=Pathology.SCREWS,
                    material=TITANIUM,
                    hu=HU_TITANIUM,
                    level=name,
                    side=side_name,
                    centre_mm=_centre((entry + tip) / 2.0),
                    size_mm=length,
                    strokes=(OverlayStroke(shaft, value), OverlayStroke(head, value)),
                )
            )
    rods: list[PlacedObject] = []
    for side_name, points in heads.items():
        top, bottom = points[0], points[-1]
        along = (bottom - top) / np.linalg.norm(bottom - top)
        a, b = top - along * ROD_OVERHANG_MM, bottom + along * ROD_OVERHANG_MM
        value = numbering.take()
        lateral = np.array([1.0, 0.0, 0.0])
        rod: Primitive = Capsule.between(Tissue.AIR, a, b, ROD_DIAMETER_MM / 2, ROD_DIAMETER_MM / 2, lateral)
        rods.append(
            PlacedObject(
                value=value,
                name=f"rod {side_name}",
                kind=Pathology.SCREWS,
                material=TITANIUM,
                hu=HU_TITANIUM,
                level=None,
                side=side_name,
                centre_mm=_centre((a + b) / 2.0),
                size_mm=float(np.linalg.norm(b - a) + ROD_DIAMETER_MM),
                strokes=(OverlayStroke(rod, value),),
            )
        )
    return screws + rods


def _lesion(
    rng: np.random.Generator, subject: SubjectParameters, anatomy: Anatomy, numbering: _Numbering
) -> PlacedObject:
    """A calcified tumour inside the thecal sac, taking the place of CSF and nerve roots, never of the dura's
    surroundings (epidural fat, bone)."""
    name = LESION_LEVELS[int(rng.integers(len(LESION_LEVELS)))]
    v = _vertebra(anatomy, name)
    diameter = float(rng.uniform(*LESION_DIAMETER_MM))
    radii = diameter / 2.0 * np.array([rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0), 1.0])
    y_sac, r_ap = thecal_sac_position(v)
    local = np.array(
        [
            rng.uniform(-3.0, 3.0) * subject.spine_scale,
            y_sac + rng.uniform(-0.3, 0.3) * r_ap,
            rng.uniform(-0.3, 0.3) * v.height,
        ]
    )
    centre = v.to_world(local)
    value = numbering.take()
    blob = Ellipsoid(Tissue.AIR, centre, v.frame, radii)
    return PlacedObject(
        value=value,
        name=f"calcified lesion {name}",
        kind=Pathology.CALCIFIED_LESION,
        material=CALCIFICATION,
        hu=float(rng.uniform(*LESION_HU)),
        level=name,
        side=None,
        centre_mm=_centre(centre),
        size_mm=float(2.0 * radii.max()),
        strokes=(OverlayStroke(blob, value, frozenset({Tissue.CSF, Tissue.NERVE})),),
    )


def _blob_radii(rng: np.random.Generator, diameter_mm: tuple[float, float]) -> F64:
    diameter = float(rng.uniform(*diameter_mm))
    return np.asarray(diameter / 2.0 * rng.uniform(0.8, 1.0, size=3), dtype=np.float64)


def _sclerotic(rng: np.random.Generator, v: Segment, numbering: _Numbering) -> PlacedObject:
    """Dense bone inside the body's marrow, clear of the cortex."""
    radii = _blob_radii(rng, SCLEROTIC_DIAMETER_MM)
    r = float(radii.max())
    local = np.array(
        [
            rng.uniform(-1.0, 1.0) * max(v.half_width - r - 4.0, 0.0),
            rng.uniform(-1.0, 1.0) * max(v.half_depth - r - 4.0, 0.0),
            rng.uniform(-1.0, 1.0) * max(v.height / 2.0 - r - 2.0, 0.0) * 0.5,
        ]
    )
    centre = v.to_world(local)
    value = numbering.take()
    blob = Ellipsoid(Tissue.AIR, centre, v.frame, radii)
    return PlacedObject(
        value=value,
        name=f"sclerotic metastasis {v.name}",
        kind=Pathology.SCLEROTIC_METASTASIS,
        material=SCLEROTIC_BONE,
        hu=float(rng.uniform(*SCLEROTIC_HU)),
        level=v.name,
        side=None,
        centre_mm=_centre(centre),
        size_mm=float(2.0 * r),
        strokes=(OverlayStroke(blob, value, frozenset({Tissue.MARROW_BODY})),),
    )


def _lytic(rng: np.random.Generator, v: Segment, numbering: _Numbering) -> PlacedObject:
    """Tumour in place of marrow and trabeculae; half of them break through the anterior or a lateral wall:
    their centre lies BREAK_DEPTH radii inside the cortex, so the rest bulges into the soft tissue outside."""
    radii = _blob_radii(rng, LYTIC_DIAMETER_MM)
    r = float(radii.max())
    breaks = bool(rng.random() < CORTICAL_BREAK_PROBABILITY)
    z = rng.uniform(-1.0, 1.0) * max(v.height / 2.0 - r - 1.0, 0.0) * 0.5
    if breaks:
        angle = float(rng.uniform(-0.6, 0.6)) * math.pi  # 0: anterior wall; +-0.6 pi: towards the sides
        waist = 1.0 - BODY_WAIST  # the body is narrowest at mid-height
        wall = waist * np.array([v.half_width * math.sin(angle), -v.half_depth * math.cos(angle)])
        inward = -wall / np.linalg.norm(wall)
        xy = wall + inward * (BREAK_DEPTH * r)
        local = np.array([xy[0], xy[1], z])
    else:
        local = np.array(
            [
                rng.uniform(-1.0, 1.0) * max(v.half_width - r - 3.0, 0.0),
                rng.uniform(-1.0, 1.0) * max(v.half_depth - r - 3.0, 0.0),
                z,
            ]
        )
    centre = v.to_world(local)
    value = numbering.take()
    blob = Ellipsoid(Tissue.AIR, centre, v.frame, radii)
    return PlacedObject(
        value=value,
        name=f"lytic metastasis {v.name}" + (" with cortical break" if breaks else ""),
        kind=Pathology.LYTIC_METASTASIS,
        material=TUMOUR,
        hu=float(rng.uniform(*LYTIC_HU)),
        level=v.name,
        side=None,
        centre_mm=_centre(centre),
        size_mm=float(2.0 * r),
        strokes=(OverlayStroke(blob, value, _LYTIC_BREAK if breaks else _LYTIC_INSIDE),),
    )
