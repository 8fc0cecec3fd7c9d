"""The lumbar anatomy as an ordered list of painted solids, plus the layered torso they sit in.

Painting order is the anatomy's priority: later solids overwrite earlier ones. Soft tissues and spaces come
first (retroperitoneal fat, bowel, vessels, muscles, canal contents, ligaments, discs, joint cartilage), bones
last; within a bone every cortical outline is painted before any marrow core so that overlapping parts of one
vertebra merge into one marrow cavity inside one shell.

One module on purpose: the painting order is the anatomy's priority, and it is only visible as one ordered list;
splitting the solids across files would hide which structure overwrites which.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from engines.phantom.shapes import F32, Capsule, Ellipsoid, Primitive, VertebralBody, frame_from_axes
from engines.phantom.spine import LEVEL_DIMENSIONS, Segment
from engines.phantom.subject import DISC_LEVELS, SubjectParameters
from engines.phantom.tissues import Tissue

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

#: Cortical thickness of vertebral-body walls thins with age (mm at 25 years, loss per year).
BODY_SHELL_MM = 0.6
BODY_SHELL_LOSS_PER_YEAR = 0.003
ENDPLATE_MM = 0.8
#: Posterior elements have thicker cortex.
POSTERIOR_SHELL_MM = 1.3
SKIN_MM = 2.0
#: Facet joint space (cartilage + fluid) between articular processes.
FACET_GAP_MM = 2.0


@dataclass(frozen=True, slots=True, eq=False)
class Stroke:
    """One painting step: a primitive and, optionally, the labels it may overwrite (None = any)."""

    primitive: Primitive
    only_on: frozenset[Tissue] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Torso:
    """Body outline whose back follows the spine, with skin, subcutaneous fat and a muscular wall.

    Tables are indexed by patient z (cranial mm); between table points values are interpolated.
    """

    z: F64
    back_y: F64  # y of the posterior skin surface (LPS: +y is posterior)
    half_depth: F64
    half_width: F64
    center_x: F64
    fat_mm: float
    wall_mm: float

    def paint(self, x: F32, y: F32, z: F32, out: U8) -> None:
        """Fill ``out`` (broadcast shape of x, y, z) with AIR / SKIN / fat / MUSCLE / VISCERAL_FAT."""
        zf = np.asarray(z, dtype=np.float32)
        back = np.interp(zf, self.z, self.back_y).astype(np.float32)
        depth = np.interp(zf, self.z, self.half_depth).astype(np.float32)
        width = np.interp(zf, self.z, self.half_width).astype(np.float32)
        cx = np.interp(zf, self.z, self.center_x).astype(np.float32)
        yc = back - depth
        u = (x - cx) / width
        v = (y - yc) / depth
        # The back is flatter than the belly: a 4th-power profile posteriorly.
        vp = np.where(v > 0, v * v, np.abs(v))
        q = u * u + vp * vp
        r = np.sqrt(np.maximum(q, np.float32(1e-12)))
        rho = np.sqrt((u * width) ** 2 + (v * depth) ** 2)
        dist = rho * (np.float32(1.0) / r - np.float32(1.0))  # mm inside the skin surface along the ray
        cos_post = np.clip((y - yc) / np.maximum(rho, np.float32(1e-3)), -1.0, 1.0)
        fat = np.float32(self.fat_mm) * (np.float32(1.6) - np.float32(0.6) * cos_post)
        # Abdominal and flank muscles; none under the back, where the paraspinal muscles are explicit.
        wall = np.float32(self.wall_mm) * np.float32(0.75) * (np.float32(1.0) - cos_post)
        labels = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), Tissue.VISCERAL_FAT, dtype=np.uint8)
        labels[dist < SKIN_MM + fat + wall] = Tissue.MUSCLE
        labels[dist < SKIN_MM + fat] = Tissue.SUBCUTANEOUS_FAT
        labels[dist < SKIN_MM] = Tissue.SKIN
        labels[q >= 1.0] = Tissue.AIR
        out[...] = labels


@dataclass(frozen=True, slots=True, eq=False)
class Anatomy:
    """Everything the renderer needs for one subject."""

    torso: Torso
    strokes: tuple[Stroke, ...]
    segments: tuple[Segment, ...]
    #: (z, bone volume fraction, marrow fat fraction) of the vertebral body marrow at each vertebra centre.
    marrow_z: F64 = field(default_factory=lambda: np.zeros(0))
    marrow_bvtv: F64 = field(default_factory=lambda: np.zeros(0))
    marrow_ff: F64 = field(default_factory=lambda: np.zeros(0))


def _cap(label: Tissue, a: F64, b: F64, ry: float, rz: float, up: F64) -> Capsule:
    return Capsule.between(label, a, b, ry, rz, up)


class _Builder:
    """Accumulates strokes in painting order; helpers speak in segment-local millimetres."""

    def __init__(self, subject: SubjectParameters, segments: list[Segment], rng: np.random.Generator) -> None:
        self.subject = subject
        self.segments = segments
        self.vertebrae = [s for s in segments if s.kind == "vertebra"]
        self.rng = rng
        self.strokes: list[Stroke] = []
        self.scale = subject.spine_scale

    def add(self, primitive: Primitive, only_on: frozenset[Tissue] | None = None) -> None:
        self.strokes.append(Stroke(primitive, only_on))

    def tube(
        self,
        label: Tissue,
        points: list[F64],
        radii: list[tuple[float, float]],
        up: list[F64],
        only_on: frozenset[Tissue] | None = None,
    ) -> None:
        """A tube through ``points`` as a chain of capsules (radii: lateral, then along ``up``)."""
        for i in range(len(points) - 1):
            ry = (radii[i][0] + radii[i + 1][0]) / 2.0
            rz = (radii[i][1] + radii[i + 1][1]) / 2.0
            if min(ry, rz) <= 0.2:
                continue
            self.add(_cap(label, points[i], points[i + 1], ry, rz, up[i]), only_on)

    # --- the column's running lines, extended beyond both ends so tubes do not stop inside the FOV -------------
    def column_points(
        self, local: Iterator[tuple[float, float, float]] | list[tuple[float, float, float]]
    ) -> list[F64]:
        pts = [seg.to_world(loc) for seg, loc in zip(self.segments, local, strict=True)]
        head = pts[0] + (pts[0] - pts[1]) * 3.0
        tail = pts[-1] + (pts[-1] - pts[-2]) * 2.0
        return [head, *pts, tail]

    def column_up(self, axis: int) -> list[F64]:
        ups = [seg.frame[:, axis] for seg in self.segments]
        return [ups[0], *ups, ups[-1]]


def build_anatomy(subject: SubjectParameters, segments: list[Segment]) -> Anatomy:
    """Lay out all soft tissues and bones of ``subject`` around the placed spinal ``segments``."""
    rng = np.random.default_rng([subject.seed, 0xA7A])
    b = _Builder(subject, segments, rng)
    _retroperitoneum_and_bowel(b)
    _vessels(b)
    _muscles(b)
    _canal(b)
    _ligaments(b)
    _discs(b)
    _facets_and_bones(b)
    torso = _torso(b)
    bodies = [s for s in segments if s.kind == "vertebra" and s.dims is not None]
    level_factor = {
        "T11": 0.95,
        "T12": 0.97,
        "L1": 1.0,
        "L2": 1.02,
        "L3": 1.04,
        "L4": 1.06,
        "L5": 1.08,
        "S1": 1.0,
    }
    order = np.argsort([seg.center[2] for seg in bodies])
    z = np.array([bodies[i].center[2] for i in order])
    bvtv = np.array([subject.trabecular_bvtv * level_factor[bodies[i].name] for i in order])
    ff = np.full(len(bodies), subject.marrow_fat_fraction)
    return Anatomy(
        torso=torso,
        strokes=tuple(b.strokes),
        segments=tuple(segments),
        marrow_z=z,
        marrow_bvtv=bvtv,
        marrow_ff=ff,
    )


def _torso(b: _Builder) -> Torso:
    subj = b.subject
    zs, back, depth, width, cx = [], [], [], [], []
    vertebrae = [s for s in b.segments if s.kind == "vertebra"]
    for seg in vertebrae:
        d = seg.dims or LEVEL_DIMENSIONS["S1"]
        tip_y = seg.half_depth + (d.pedicle_length + 12.0 + d.spinous_length) * b.scale
        back_pt = seg.to_world((0.0, tip_y + 5.0, -8.0))
        zs.append(back_pt[2])
        back.append(back_pt[1] + subj.subcutaneous_fat_mm + SKIN_MM)
        pelvis = 1.0 + 0.15 * float(np.clip((-seg.center[2] - 60.0) / 60.0, 0.0, 1.0))
        depth.append(subj.body_half_depth_mm / pelvis**0.5)
        width.append(subj.body_half_width_mm * pelvis)
        cx.append(seg.center[0] * 0.5)
    order = np.argsort(zs)
    arr = [np.asarray(v, dtype=np.float64)[order] for v in (zs, back, depth, width, cx)]
    return Torso(
        z=arr[0],
        back_y=arr[1],
        half_depth=arr[2],
        half_width=arr[3],
        center_x=arr[4],
        fat_mm=subj.subcutaneous_fat_mm,
        wall_mm=9.0,
    )


def _retroperitoneum_and_bowel(b: _Builder) -> None:
    segs = b.segments
    pts = b.column_points([(0.0, -(s.half_depth + 14.0), 0.0) for s in segs])
    radii = [(s.half_width + 35.0, 24.0) for s in segs]
    radii = [radii[0], *radii, radii[-1]]
    b.tube(
        Tissue.VISCERAL_FAT,
        pts,
        radii,
        b.column_up(1),
        only_on=frozenset({Tissue.VISCERAL_FAT, Tissue.MUSCLE}),
    )
    # Bowel loops anterior to the retroperitoneum, only inside the abdominal cavity.
    cavity = frozenset({Tissue.VISCERAL_FAT})
    l3 = next(s for s in segs if s.name == "L3")
    n_loops = 60
    for _ in range(n_loops):
        z = float(b.rng.uniform(-140.0, 140.0))
        x = float(b.rng.uniform(-70.0, 70.0))
        y = float(l3.center[1] - l3.half_depth - b.rng.uniform(38.0, 140.0))
        center = np.array([x, y, z])
        direction = b.rng.normal(size=3)
        length = float(b.rng.uniform(15.0, 60.0))
        radius = float(b.rng.uniform(5.0, 13.0)) * (1.0 - 0.5 * b.subject.visceral_fat_fraction)
        start, end = (
            center - direction / np.linalg.norm(direction) * length / 2,
            center + direction / np.linalg.norm(direction) * length / 2,
        )
        b.add(_cap(Tissue.VISCERA, start, end, radius, radius, np.array([0.0, 0.0, 1.0])), cavity)
        if b.rng.random() < 0.3:
            g = float(b.rng.uniform(0.3, 0.7)) * radius
            b.add(
                Ellipsoid(
                    Tissue.BOWEL_GAS,
                    center + np.array([0.0, -radius * 0.3, 0.0]),
                    np.eye(3),
                    np.array([g, g * 0.8, g]),
                ),
                frozenset({Tissue.VISCERA}),
            )


def _vessels(b: _Builder) -> None:
    up = np.array([0.0, 1.0, 0.0])
    subj = b.subject
    aorta_r = (9.0 + 0.04 * subj.age_years) * (1.05 if subj.sex == "M" else 0.95)
    verts = [s for s in b.vertebrae]
    by_name = {s.name: s for s in verts}
    above = [s for s in verts if s.position <= 5.0]  # down to L4 (bifurcation)
    aorta = [s.to_world((s.half_width * 0.45, -(s.half_depth + aorta_r + 3.0), 0.0)) for s in above]
    aorta.insert(0, aorta[0] + (aorta[0] - aorta[1]) * 3.0)
    b.tube(Tissue.BLOOD, aorta, [(aorta_r, aorta_r)] * len(aorta), [up] * len(aorta))
    ivc = [s.to_world((-s.half_width * 0.55, -(s.half_depth + 8.0), 0.0)) for s in verts if s.position <= 6.0]
    ivc.insert(0, ivc[0] + (ivc[0] - ivc[1]) * 3.0)
    b.tube(Tissue.BLOOD, ivc, [(12.0, 8.0)] * len(ivc), [up] * len(ivc))
    l4, s1 = by_name["L4"], by_name["S1"]
    for side in (-1.0, 1.0):
        art = [
            l4.to_world((side * 6.0, -(l4.half_depth + aorta_r), -5.0)),
            s1.to_world((side * (s1.half_width + 14.0), -(s1.half_depth + 12.0), 0.0)),
        ]
        b.tube(Tissue.BLOOD, [*art, art[-1] + (art[-1] - art[0])], [(6.5, 6.5)] * 3, [up] * 3)


def _muscles(b: _Builder) -> None:
    subj = b.subject
    m = (1.1 if subj.sex == "M" else 0.9) * (1.0 - 0.004 * max(subj.age_years - 50.0, 0.0)) * b.scale
    segs = b.segments
    up = b.column_up(2)

    def post(seg: Segment) -> float:
        d = LEVEL_DIMENSIONS.get(seg.name) or LEVEL_DIMENSIONS["S1"]
        return seg.half_depth + d.pedicle_length * b.scale

    def caudal(seg: Segment) -> float:  # multifidus grows caudally, erector shrinks over the sacrum
        return float(np.clip((seg.position - 2.0) / 5.0, 0.0, 1.3))

    for side in (-1.0, 1.0):
        env = b.column_points([(side * 27.0 * b.scale, post(s) + 19.0, 0.0) for s in segs])
        env_r = [(34.0 * m, 21.0 * m) for _ in segs]
        b.tube(
            Tissue.INTERMUSCULAR_FAT,
            env,
            [env_r[0], *env_r, env_r[-1]],
            up,
            only_on=frozenset({Tissue.VISCERAL_FAT, Tissue.MUSCLE, Tissue.SUBCUTANEOUS_FAT}),
        )
        multifidus = b.column_points([(side * 14.0 * b.scale, post(s) + 21.0, 0.0) for s in segs])
        mr = [((8.0 + 5.0 * caudal(s)) * m, (11.0 + 6.0 * caudal(s)) * m) for s in segs]
        erector = b.column_points([(side * 37.0 * b.scale, post(s) + 17.0, 0.0) for s in segs])
        er = [(max(18.0 - 9.0 * max(s.position - 6.0, 0.0), 4.0) * m, 15.0 * m) for s in segs]
        b.tube(Tissue.MUSCLE, erector, [er[0], *er, er[-1]], up)
        b.tube(Tissue.MUSCLE, multifidus, [mr[0], *mr, mr[-1]], up)
        # Psoas: appears at T12/L1 beside the bodies and thickens caudally, then leaves anterolaterally.
        psoas_r = {"T12": 2.0, "L1": 7.0, "L2": 11.0, "L3": 15.0, "L4": 19.0, "L5": 21.0, "S1": 19.0}
        pts, rad, ups = [], [], []
        for seg in b.vertebrae:
            if seg.name not in psoas_r:
                continue
            r = psoas_r[seg.name] * m
            y = -seg.half_depth - 6.0 if seg.name == "S1" else -2.0
            pts.append(
                seg.to_world(
                    (side * (seg.half_width + r - 3.0 + (10.0 if seg.name == "S1" else 0.0)), y, 0.0)
                )
            )
            rad.append((r, r * 0.95))
            ups.append(seg.frame[:, 2])
        b.tube(Tissue.MUSCLE, pts, rad, ups)


def _canal_center(seg: Segment) -> tuple[float, float]:
    """(y of the thecal sac centre, its AP radius) in a segment's frame."""
    r_ap = 7.5 * (0.8 if seg.position >= 7.0 else 1.0)
    return seg.half_depth + 2.0 + r_ap, r_ap


def thecal_sac_position(seg: Segment) -> tuple[float, float]:
    """(y of the thecal sac centre, its AP radius) in a lumbar segment's frame, before the subject's scale: where
    an intradural object belongs."""
    return _canal_center(seg)


def _canal(b: _Builder) -> None:
    segs = b.segments
    up = b.column_up(1)
    scale = b.scale
    sacral = [s.position >= 8.0 for s in segs]
    # Epidural fat (thicker posteriorly), then the thecal sac (ends at S2), then cord / conus and cauda equina.
    fat_pts = b.column_points([(0.0, _canal_center(s)[0] + 1.5, 0.0) for s in segs])
    fat_r = [(12.5 * scale, (_canal_center(s)[1] + 3.5) * scale) for s in segs]
    b.tube(Tissue.EPIDURAL_FAT, fat_pts, [fat_r[0], *fat_r, fat_r[-1]], up)
    sac_pts = b.column_points([(0.0, _canal_center(s)[0], 0.0) for s in segs])
    sac_r = [
        ((10.0 if not sac else 3.0) * scale, (_canal_center(s)[1] if not sac else 2.0) * scale)
        for s, sac in zip(segs, sacral, strict=True)
    ]
    b.tube(Tissue.CSF, sac_pts, [sac_r[0], *sac_r, sac_r[-1]], up)
    # The conus ends between T12 and L2 (position 1.5 .. 3.0).
    conus_pos = float(b.rng.uniform(1.6, 3.0))
    cord_pts = [p for p, s in zip(sac_pts[1:-1], segs, strict=True) if s.position <= conus_pos]
    cord_pts = [sac_pts[0], *cord_pts]
    cord = [p + np.array([0.0, 1.2, 0.0]) for p in cord_pts]
    b.tube(
        Tissue.NERVE, cord, [(4.5 * scale, 3.8 * scale)] * len(cord), [np.array([0.0, 1.0, 0.0])] * len(cord)
    )
    tip = cord[-1]
    b.add(Ellipsoid(Tissue.NERVE, tip, segs[0].frame, np.array([3.5, 3.0, 9.0]) * scale))
    # Cauda equina: a pair of roots leaves through each foramen from L1 to S1, running in the dependent
    # (posterior, patient supine) half of the sac until its exit.
    for seg in b.vertebrae:
        if not (2.0 <= seg.position <= 7.0) or seg.position <= conus_pos - 0.5:
            continue
        d = seg.dims or LEVEL_DIMENSIONS["S1"]
        y_sac, _ = _canal_center(seg)
        spread = 2.0 + 5.0 * (seg.position - 2.0) / 5.0
        for side in (-1.0, 1.0):
            inside = seg.to_world(
                (side * (d.interpedicular_half - 4.0) * scale, y_sac - 2.0, -seg.height / 2.0 + 6.0)
            )
            start = tip + np.array([side * spread * 0.3, 2.5, 0.0])
            mid = start + (inside - start) * 0.85 + seg.frame[:, 0] * side * 0.0
            exit_pt = seg.to_world(
                (
                    side * (d.interpedicular_half + d.pedicle_width + 10.0) * scale,
                    seg.half_depth + 1.0,
                    -seg.height / 2.0 - 3.0,
                )
            )
            ganglion = seg.to_world(
                (
                    side * (d.interpedicular_half + d.pedicle_width / 2.0 + 2.0) * scale,
                    seg.half_depth + 3.0,
                    -seg.height / 2.0 - 1.0,
                )
            )
            b.add(
                Ellipsoid(Tissue.EPIDURAL_FAT, ganglion, seg.frame, np.array([6.5, 6.0, 7.5]) * scale),
                frozenset(
                    {Tissue.VISCERAL_FAT, Tissue.MUSCLE, Tissue.INTERMUSCULAR_FAT, Tissue.EPIDURAL_FAT}
                ),
            )
            b.add(
                _cap(Tissue.NERVE, start, mid, 0.9, 0.9, np.array([0.0, 1.0, 0.0])), frozenset({Tissue.CSF})
            )
            b.add(_cap(Tissue.NERVE, mid, exit_pt, 1.6, 1.6, np.array([0.0, 1.0, 0.0])))
            b.add(Ellipsoid(Tissue.NERVE, ganglion, seg.frame, np.array([3.0, 2.8, 4.0]) * scale))
    # Remaining roots of the cauda equina continue down as a posterior bundle to the sacrum.
    bottom = [p for p, s in zip(sac_pts[1:-1], segs, strict=True) if s.position >= conus_pos]
    for k, dx in enumerate((-3.0, -1.0, 1.0, 3.0)):
        line = [p + np.array([dx, 3.0 + 0.8 * (k % 2), 0.0]) for p in bottom[:-1]]
        if len(line) >= 2:
            b.tube(
                Tissue.NERVE,
                line,
                [(0.8, 0.8)] * len(line),
                [np.array([0.0, 1.0, 0.0])] * len(line),
                only_on=frozenset({Tissue.CSF}),
            )


def _ligaments(b: _Builder) -> None:
    segs = b.segments
    up = b.column_up(1)
    all_pts = b.column_points([(0.0, -s.half_depth + 0.8, 0.0) for s in segs])
    b.tube(Tissue.LIGAMENT, all_pts, [(10.0, 1.4)] * len(all_pts), up)
    pll_pts = b.column_points([(0.0, s.half_depth - 0.5, 0.0) for s in segs])
    b.tube(Tissue.LIGAMENT, pll_pts, [(5.0, 1.0)] * len(pll_pts), up)
    verts = [s for s in b.vertebrae if s.dims is not None]
    for upper, lower in itertools.pairwise(verts):
        du, dl = upper.dims, lower.dims
        assert du is not None and dl is not None
        s = b.scale
        for side in (-1.0, 1.0):  # ligamentum flavum, lamina to lamina
            a = upper.to_world(
                (
                    side * (du.interpedicular_half - 3.0) * s,
                    upper.half_depth + (du.pedicle_length + 7.0) * s,
                    -upper.height * 0.35,
                )
            )
            c = lower.to_world(
                (
                    side * (dl.interpedicular_half - 3.0) * s,
                    lower.half_depth + (dl.pedicle_length + 5.0) * s,
                    lower.height * 0.25,
                )
            )
            b.add(_cap(Tissue.LIGAMENT, a, c, 4.0, 2.6, upper.frame[:, 1]))
        a = upper.to_world((0.0, upper.half_depth + (du.pedicle_length + 20.0) * s, -upper.height * 0.2))
        c = lower.to_world((0.0, lower.half_depth + (dl.pedicle_length + 20.0) * s, lower.height * 0.2))
        b.add(_cap(Tissue.LIGAMENT, a, c, 2.2, 9.0, upper.frame[:, 1]))


def _discs(b: _Builder) -> None:
    subj = b.subject
    worst = int(np.argmax(subj.disc_degeneration))
    for seg in b.segments:
        if seg.kind != "disc":
            continue
        sacral = seg.position > 7.0
        degeneration = 0.0 if sacral else subj.disc_degeneration[DISC_LEVELS.index(seg.name.split("-")[0])]
        bulge = 1.0 + 0.05 * degeneration
        disc = VertebralBody(
            label=Tissue.DISC_ANNULUS,
            center=seg.center,
            frame=seg.frame,
            half_width=seg.half_width * 1.01 * bulge,
            half_depth=seg.half_depth * 1.01 * bulge,
            height=seg.height + 0.6,
            wedge_rad=math.radians(seg.wedge_deg),
            waist=0.0,
            endplate_concavity=1.5 * b.scale,
            canal_radius=16.0 * b.scale,
            canal_depth=2.5 * b.scale * (1.0 - 0.8 * degeneration),
            convex_endplates=True,
        )
        b.add(disc)
        if sacral:
            continue
        nucleus_label = Tissue.DISC_DEGENERATED if degeneration > 0.45 else Tissue.DISC_NUCLEUS
        nucleus_r = np.array([seg.half_width * 0.55, seg.half_depth * 0.5, seg.height * 0.42 + 1.0])
        nucleus_r = nucleus_r * (1.0 - 0.3 * degeneration)
        center = seg.to_world((0.0, seg.half_depth * 0.12, 0.0))
        b.add(Ellipsoid(nucleus_label, center, seg.frame, nucleus_r), frozenset({Tissue.DISC_ANNULUS}))
        if subj.disc_vacuum and DISC_LEVELS.index(seg.name.split("-")[0]) == worst:
            gas_r = np.array([seg.half_width * 0.35, seg.half_depth * 0.25, max(seg.height * 0.2, 0.8)])
            b.add(
                Ellipsoid(Tissue.DISC_GAS, seg.to_world((0.0, -seg.half_depth * 0.3, 0.0)), seg.frame, gas_r),
                frozenset({Tissue.DISC_ANNULUS, Tissue.DISC_DEGENERATED}),
            )


def _facets_and_bones(b: _Builder) -> None:
    """Articular processes are placed pairwise so that each facet joint has a real joint space."""
    s = b.scale
    verts = b.vertebrae
    shells: dict[str, list[Primitive]] = {v.name: [] for v in verts}
    cores: dict[str, list[Primitive]] = {v.name: [] for v in verts}
    shell = POSTERIOR_SHELL_MM
    age_loss = BODY_SHELL_LOSS_PER_YEAR * max(b.subject.age_years - 25.0, 0.0)
    body_shell = max(BODY_SHELL_MM - age_loss, 0.3)

    def bone_rod(owner: str, a: F64, c: F64, ry: float, rz: float, up: F64) -> None:
        outer = _cap(Tissue.CORTICAL_BONE, a, c, ry, rz, up)
        shells[owner].append(outer)
        if min(ry, rz) > shell + 0.4:
            cores[owner].append(outer.shrunk(shell, Tissue.MARROW_POSTERIOR))

    junction: dict[str, dict[float, F64]] = {}
    lamina_low: dict[str, dict[float, F64]] = {}
    for v in verts:
        body = VertebralBody(
            label=Tissue.CORTICAL_BONE,
            center=v.center,
            frame=v.frame,
            half_width=v.half_width,
            half_depth=v.half_depth,
            height=v.height,
            wedge_rad=math.radians(v.wedge_deg),
            waist=0.06,
            endplate_concavity=1.5 * s,
            canal_radius=16.0 * s,
            canal_depth=2.5 * s,
        )
        shells[v.name].append(body)
        cores[v.name].append(body.shrunk(body_shell, ENDPLATE_MM, Tissue.MARROW_BODY))
        d = v.dims
        up = v.frame[:, 2]
        if d is None:  # S2, S3: fused sacral segments with lateral masses and a dorsal plate
            for side in (-1.0, 1.0):
                mass = Ellipsoid(
                    Tissue.CORTICAL_BONE,
                    v.to_world((side * (v.half_width + 4.0), v.half_depth * 0.2, 0.0)),
                    v.frame,
                    np.array([13.0, 12.0, 11.0]) * s,
                )
                shells[v.name].append(mass)
                cores[v.name].append(Ellipsoid(Tissue.MARROW_BODY, mass.center, v.frame, mass.radii - shell))
            plate_a = v.to_world((0.0, v.half_depth + 13.0 * s, v.height / 2.0))
            plate_c = v.to_world((0.0, v.half_depth + 11.0 * s, -v.height / 2.0))
            bone_rod(v.name, plate_a, plate_c, 14.0 * s, 3.5, v.frame[:, 1])
            continue
        zp = 0.2 * v.height
        ip = d.interpedicular_half * s
        pw, ph, pl = d.pedicle_width * s, d.pedicle_height * s, d.pedicle_length * s
        junction[v.name] = {}
        lamina_low[v.name] = {}
        spinous_root = v.to_world((0.0, v.half_depth + pl + 12.0 * s, zp - 8.0 * s))
        for side in (-1.0, 1.0):
            ped_a = v.to_world((side * (ip + pw / 2.0 - 1.5), v.half_depth - 5.0, zp))
            ped_c = v.to_world((side * (ip + pw / 2.0 + 1.5), v.half_depth + pl, zp))
            bone_rod(v.name, ped_a, ped_c, pw / 2.0, ph / 2.0, up)
            junction[v.name][side] = ped_c
            bone_rod(v.name, ped_c, spinous_root, 3.4 * s, 9.5 * s, up)  # lamina
            lamina_low[v.name][side] = v.to_world(
                (side * (ip - 1.0), v.half_depth + pl + 7.0 * s, zp - 12.0 * s)
            )
            if v.name == "S1":  # sacral ala instead of a transverse process
                ala = Ellipsoid(
                    Tissue.CORTICAL_BONE,
                    v.to_world((side * (v.half_width + 14.0 * s), v.half_depth * 0.1, -2.0)),
                    v.frame,
                    np.array([22.0, 16.0, 15.0]) * s,
                )
                shells[v.name].append(ala)
                cores[v.name].append(Ellipsoid(Tissue.MARROW_BODY, ala.center, v.frame, ala.radii - shell))
            else:
                tp_r = (6.0, 7.0) if v.name == "L5" else (3.6, 5.0)
                tp_a = v.to_world((side * (ip + pw), v.half_depth + pl - 3.0, zp))
                tp_c = v.to_world(
                    (side * (ip + pw + d.transverse_length * s), v.half_depth + pl - 1.0, zp + 2.0)
                )
                bone_rod(v.name, tp_a, tp_c, tp_r[0] * s, tp_r[1] * s, up)
        if v.name == "S1":
            plate_a = v.to_world((0.0, v.half_depth + pl + 8.0 * s, zp))
            plate_c = v.to_world((0.0, v.half_depth + pl + 6.0 * s, -v.height / 2.0))
            bone_rod(v.name, plate_a, plate_c, 16.0 * s, 4.0, v.frame[:, 1])
        tip = v.to_world((0.0, v.half_depth + pl + (12.0 + d.spinous_length) * s, zp - 14.0 * s))
        # A plate, taller at its posterior end (the "hatchet" profile of a lumbar spinous process).
        bone_rod(v.name, spinous_root, tip, 3.4 * s, 7.5 * s, up)
        bone_rod(v.name, (spinous_root + 2 * tip) / 3.0, tip, 3.6 * s, 9.5 * s, up)

    # Facet joints between consecutive vertebrae that have posterior elements.
    named = [v for v in verts if v.name in junction]
    for upper, lower in itertools.pairwise(named):
        dl = lower.dims
        assert dl is not None
        beta = math.radians(20.0 + 25.0 * float(np.clip((lower.position - 3.0) / 4.0, 0.0, 1.0)))
        for side in (-1.0, 1.0):
            sap_base = junction[lower.name][side]
            sap_top = lower.to_world(
                (
                    side * (dl.interpedicular_half + dl.pedicle_width / 2.0 + 1.0) * s,
                    lower.half_depth + dl.pedicle_length * s + 2.0,
                    0.2 * lower.height + 12.0 * s,
                )
            )
            iap_base = lamina_low[upper.name][side]
            joint = (sap_top + iap_base) / 2.0 + lower.frame[:, 2] * 2.0
            normal_local = np.array([-side * math.cos(beta), math.sin(beta), 0.0])
            normal = lower.frame @ normal_local
            r = 4.2 * s
            b.add(
                Ellipsoid(
                    Tissue.FACET_CARTILAGE,
                    joint,
                    frame_from_axes(normal, lower.frame[:, 2]),
                    np.array([FACET_GAP_MM / 2.0 + 1.3, 7.0 * s, 8.0 * s]),
                ),
                frozenset(set(Tissue) - {Tissue.CORTICAL_BONE, Tissue.MARROW_POSTERIOR, Tissue.MARROW_BODY}),
            )
            sap_end = joint - normal * (FACET_GAP_MM / 2.0 + r)
            iap_end = joint + normal * (FACET_GAP_MM / 2.0 + r) - lower.frame[:, 2] * 4.0
            bone_rod(lower.name, sap_base, sap_end, r, r * 1.2, lower.frame[:, 2])
            bone_rod(upper.name, iap_base, iap_end, r, r * 1.2, upper.frame[:, 2])

    for v in verts:
        for p in shells[v.name]:
            b.add(p)
        for p in cores[v.name]:
            b.add(p)
