"""Side-by-side pictures of co-registered volumes (MR echoes, CT, sCT) for people: demo output and previews.

Volumes are first put into patient (LPS) axis order so that every view is drawn the way radiologists read it
(sagittal: anterior left, superior up; axial: anterior up, patient's right on the viewer's left) whatever the
acquisition orientation, and pixels are resampled to square millimetres so anatomy keeps its proportions.
A panel may carry a mask of regions the sCT is not to be trusted in: the views then go through them and they are
outlined, hatched and labelled (:mod:`agent.cli.outline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from agent.cli.outline import draw_untrusted, planes_through, resize_mask
from sct_core.geometry import VolumeGeometry

#: Display resolution of the montage, pixels per millimetre.
PIXELS_PER_MM = 1.6
#: Display windows: MR by percentile of the volume, CT by a bone-and-soft-tissue window in HU.
MR_PERCENTILE = 99.5
CT_WINDOW_HU = (-450.0, 1250.0)
LABEL_HEIGHT = 16


@dataclass(frozen=True, slots=True, eq=False)
class Panel:
    """One column of the montage: a volume, its title and its display window (None = MR percentile)."""

    title: str
    volume: npt.NDArray[np.generic]
    window: tuple[float, float] | None = None
    #: ``[slice, row, column]`` bool: where the sCT is not to be trusted, outlined on this panel.
    outline: npt.NDArray[np.bool_] | None = None


def to_lps(
    volume: npt.NDArray[np.generic], geometry: VolumeGeometry
) -> tuple[npt.NDArray[np.float32], tuple[float, ...]]:
    """Reorder ``[slice, row, column]`` into ``[x, y, z]`` with each index increasing along L, P and S.

    Works for principal orientations and small obliques (each array axis is assigned to the patient axis it is
    closest to). Returns the array and its spacing per patient axis.
    """
    dirs = np.array([geometry.slice_direction, geometry.column_direction, geometry.row_direction])
    patient_axis = [int(np.argmax(np.abs(d))) for d in dirs]
    if sorted(patient_axis) != [0, 1, 2]:
        raise ValueError(f"cannot draw an orientation this oblique: direction cosines {dirs.tolist()}")
    arr = np.asarray(volume, dtype=np.float32)
    for axis, (d, pa) in enumerate(zip(dirs, patient_axis, strict=True)):
        if d[pa] < 0:
            arr = np.flip(arr, axis=axis)
    order = [patient_axis.index(p) for p in range(3)]
    spacing = tuple(geometry.spacing[order[p]] for p in range(3))
    return np.transpose(arr, order), spacing


def _window(image: npt.NDArray[np.float32], low: float, high: float) -> npt.NDArray[np.uint8]:
    scaled = (image - low) / max(high - low, 1e-6)
    return np.asarray(np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5, dtype=np.uint8)


def _to_display(image: npt.NDArray[np.uint8], spacing_rows: float, spacing_cols: float) -> Image.Image:
    height = max(1, round(image.shape[0] * spacing_rows * PIXELS_PER_MM))
    width = max(1, round(image.shape[1] * spacing_cols * PIXELS_PER_MM))
    return Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)


def _planes(
    lps: npt.NDArray[np.float32], through: tuple[int, int, int] | None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The sagittal and axial planes: the middle ones, or those through ``through`` (x, y, z)."""
    x = lps.shape[0] // 2 if through is None else through[0]
    z = lps.shape[2] // 2 if through is None else through[2]
    sagittal = lps[x].T[::-1]  # rows: superior -> inferior; columns: anterior -> posterior
    axial = lps[:, :, z].T  # rows: anterior -> posterior; columns: patient right -> left
    return sagittal, axial


def _views(
    lps: npt.NDArray[np.float32],
    spacing: tuple[float, ...],
    low: float,
    high: float,
    through: tuple[int, int, int] | None = None,
) -> tuple[Image.Image, Image.Image]:
    sx, sy, sz = spacing
    sagittal, axial = _planes(lps, through)
    return (
        _to_display(_window(sagittal, low, high), sz, sy),
        _to_display(_window(axial, low, high), sy, sx),
    )


def render_montage(panels: list[Panel], geometry: VolumeGeometry, out: Path, *, caption: str = "") -> Path:
    """Write a PNG: one column per panel, the sagittal view above the axial view: the middle ones, or those
    through most of the regions a panel outlines."""
    if not panels:
        raise ValueError("render_montage needs at least one panel")
    through = None
    for panel in panels:
        if panel.outline is not None:
            through = planes_through(to_lps(panel.outline, geometry)[0] > 0)
            break
    columns: list[tuple[Panel, Image.Image, Image.Image]] = []
    for panel in panels:
        if panel.volume.shape != geometry.shape:
            raise ValueError(
                f"panel {panel.title!r} has shape {panel.volume.shape}; the grid is {geometry.shape}"
            )
        lps, spacing = to_lps(panel.volume, geometry)
        if panel.window is None:
            low, high = 0.0, float(np.percentile(lps, MR_PERCENTILE))
        else:
            low, high = panel.window
        sag, ax = _views(lps, spacing, low, high, through)
        columns.append((panel, sag, ax))
    width = sum(max(s.width, a.width) for _, s, a in columns)
    height = LABEL_HEIGHT + max(s.height for _, s, _ in columns) + max(a.height for _, _, a in columns)
    height += LABEL_HEIGHT if caption else 0
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 0
    sag_height = max(s.height for _, s, _ in columns)
    for panel, sag, ax in columns:
        draw.text((x + 4, 2), panel.title, fill=(255, 255, 255))
        canvas.paste(sag.convert("RGB"), (x, LABEL_HEIGHT))
        canvas.paste(ax.convert("RGB"), (x, LABEL_HEIGHT + sag_height))
        if panel.outline is not None:
            mask_sag, mask_ax = _planes(to_lps(panel.outline, geometry)[0], through)
            draw_untrusted(canvas, resize_mask(mask_sag > 0, sag.size), (x, LABEL_HEIGHT))
            draw_untrusted(canvas, resize_mask(mask_ax > 0, ax.size), (x, LABEL_HEIGHT + sag_height))
        x += max(sag.width, ax.width)
    if caption:
        draw.text((4, height - LABEL_HEIGHT + 2), caption, fill=(200, 200, 200))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
