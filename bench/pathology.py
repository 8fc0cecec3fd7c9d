"""Benchmark: what each pathology adds to the time of a full seed-protocol phantom case; optional montage.

Usage: .venv/bin/python bench/pathology.py [--runs 3] [--seed 7] [--montage docs/phantom-pathology.png]
Each run generates the normal case and then one case per pathology, interleaved so that drift of a shared
machine falls on all alike; prints the median wall and CPU seconds of each and the overhead over the normal
case. With --montage, also draws the last run's cases through each object (docs/phantom.md, Pathology).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from scipy import ndimage

from agent.cli.montage import CT_WINDOW_HU, MR_PERCENTILE, to_lps
from engines.phantom.acquisition import SEED_PROTOCOL
from engines.phantom.case import PhantomCase
from engines.phantom.generate import generate_case
from engines.phantom.pathology import PATHOLOGIES, Pathology

#: Montage: pixels per mm, the half-size of each tile around its object (rows, columns, mm; motion: the FOV's
#: whole anterior-posterior width, where the moving belly and its ghosts are), and the outline colour.
PIXELS_PER_MM = 2.0
HALF_VIEW_MM = (60.0, 60.0)
MOTION_HALF_VIEW_MM = (60.0, 125.0)
OUTLINE_RGB = (255, 64, 64)


def _lps_index(case: PhantomCase, point_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    """Index of a patient point in the LPS-ordered array ``to_lps`` makes of the case's volumes."""
    marker = np.zeros(case.geometry.shape, dtype=np.float32)
    index = np.rint(np.linalg.inv(case.geometry.affine) @ np.array([*point_mm, 1.0]))[:3].astype(int)
    clipped = tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(index, case.geometry.shape, strict=True))
    marker[clipped] = 1.0
    lps, _ = to_lps(marker, case.geometry)
    found = np.unravel_index(int(np.argmax(lps)), lps.shape)
    return int(found[0]), int(found[1]), int(found[2])


def _view(
    volume: npt.NDArray[np.generic], case: PhantomCase, centre: tuple[int, int, int], axial: bool
) -> tuple[npt.NDArray[np.float32], tuple[float, float], tuple[int, int]]:
    """A sagittal (superior up, anterior left) or axial (anterior up, patient right on the left) slice through
    ``centre``, its pixel size (rows, columns, mm) and the centre's position in it."""
    lps, (sx, sy, sz) = to_lps(volume, case.geometry)
    x, y, z = centre
    if axial:
        return lps[:, :, z].T, (sy, sx), (y, x)
    return lps[x].T[::-1], (sz, sy), (lps.shape[2] - 1 - z, y)


def _tile(
    image: npt.NDArray[np.float32],
    outline: npt.NDArray[np.bool_] | None,
    spacing: tuple[float, float],
    at: tuple[int, int],
    window: tuple[float, float],
    half_view_mm: tuple[float, float],
) -> Image.Image:
    """The window of ``image`` around ``at``, scaled to square millimetres, with the outline drawn in colour."""
    half = [round(h / s) for h, s in zip(half_view_mm, spacing, strict=True)]
    rows = slice(max(at[0] - half[0], 0), at[0] + half[0])
    cols = slice(max(at[1] - half[1], 0), at[1] + half[1])
    low, high = window
    grey = np.clip((image[rows, cols] - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)
    if outline is not None:
        rgb[outline[rows, cols]] = OUTLINE_RGB
    size = (
        round(rgb.shape[1] * spacing[1] * PIXELS_PER_MM),
        round(rgb.shape[0] * spacing[0] * PIXELS_PER_MM),
    )
    return Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)


def write_montage(cases: dict[Pathology, PhantomCase], out: Path) -> Path:
    """One column per pathology through its first object (screws: the axial plane of a screw; motion: the
    FOV's centre), rows echo 1, echo 2, CT and echo 1 with the ground truth (``anomaly``) outlined."""
    columns: list[tuple[str, list[Image.Image]]] = []
    for pathology, case in cases.items():
        first = case.anomaly_objects[0]
        centre = _lps_index(case, first.centre_mm)
        axial = pathology is Pathology.SCREWS
        half_view = MOTION_HALF_VIEW_MM if pathology is Pathology.MOTION else HALF_VIEW_MM
        mr_window = (0.0, float(np.percentile(case.echoes[0], MR_PERCENTILE)))
        region = case.anomaly > 0
        edge = region & ~ndimage.binary_erosion(region)
        tiles = []
        for volume, window, outlined in (
            (case.echoes[0], mr_window, False),
            (case.echoes[1], mr_window, False),
            (case.ct_hu, CT_WINDOW_HU, False),
            (case.echoes[0], mr_window, True),
        ):
            image, spacing, at = _view(volume, case, centre, axial)
            outline = _view(edge, case, centre, axial)[0] > 0.5 if outlined else None
            tiles.append(_tile(image, outline, spacing, at, window, half_view))
        title = f"{pathology.value} ({'axial' if axial else 'sagittal'})"
        columns.append((title, tiles))
    label = 16
    width = sum(max(t.width for t in tiles) for _, tiles in columns)
    row_heights = [max(tiles[r].height for _, tiles in columns) for r in range(4)]
    canvas = Image.new("RGB", (width, label + sum(row_heights)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, tiles in columns:
        draw.text((x + 4, 2), title, fill=(255, 255, 255))
        y = label
        for tile, height in zip(tiles, row_heights, strict=True):
            canvas.paste(tile, (x, y))
            y += height
        x += max(t.width for t in tiles)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--montage", type=Path, metavar="PNG", help="also draw the last run's cases here")
    args = parser.parse_args()
    generate_case(args.seed, SEED_PROTOCOL.with_changes(fov_mm=(60.0, 60.0, 9.0)))  # warm imports and caches
    names = ["normal", *(p.value for p in PATHOLOGIES)]
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    cases: dict[Pathology, PhantomCase] = {}
    for _ in range(args.runs):
        for name in names:
            pathologies = () if name == "normal" else (Pathology(name),)
            started, started_cpu = time.perf_counter(), time.process_time()
            case = generate_case(args.seed, SEED_PROTOCOL, pathologies=pathologies)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
            if pathologies:
                cases[Pathology(name)] = case
    normal_wall, normal_cpu = statistics.median(wall["normal"]), statistics.median(cpu["normal"])
    print(f"phantom, seed protocol, seed {args.seed}, median of {args.runs} run(s): wall s (CPU s), overhead")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        extra = (
            ""
            if name == "normal"
            else f"  +{w - normal_wall:5.2f} s wall ({100 * (c / normal_cpu - 1):+.0f} % CPU)"
        )
        print(f"  {name:22s} {w:6.2f} s ({c:6.2f} s){extra}")
    if args.montage is not None:
        print(f"montage: {write_montage(cases, args.montage)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
