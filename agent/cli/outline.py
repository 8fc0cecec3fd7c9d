"""The mark of a region not to trust on a picture: an outline, hatching inside it, and a label.

The status page's preview and the demo's picture draw the regions the sCT's confidence flagged on the sCT and on
the MR echo beside it, so that whoever looks at the picture sees where the synthetic CT must not be used. The
mark does not rely on colour alone: a solid contour, diagonal hatching and words ("sCT NOT TRUSTED"), in the
orange the page's card and the DICOM Segmentation's display colour use.

The plane drawn goes through the flagged voxels (:func:`planes_through`): pedicle screws sit off the midline,
where a mid-sagittal view would miss them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

#: The mark's colour (the Segmentation's display colour too), and the hatching's spacing in display pixels.
OUTLINE_RGB: Final = (255, 140, 0)
HATCH_PERIOD_PX: Final = 7
HATCH_WIDTH_PX: Final = 2
#: The contour is this many display pixels thick (visible at a glance, thin enough not to hide the edge).
CONTOUR_PX: Final = 2
LABEL: Final = "sCT NOT TRUSTED"

Mask = npt.NDArray[np.bool_]


def planes_through(mask_lps: Mask) -> tuple[int, int, int] | None:
    """The (sagittal, coronal, axial) plane indices of an ``[x, y, z]`` (LPS) mask that hold most of its voxels;
    None when it is empty."""
    if not mask_lps.any():
        return None
    x = int(np.argmax(mask_lps.sum(axis=(1, 2))))
    y = int(np.argmax(mask_lps.sum(axis=(0, 2))))
    z = int(np.argmax(mask_lps.sum(axis=(0, 1))))
    return x, y, z


def resize_mask(mask: Mask, size: tuple[int, int]) -> Mask:
    """A plane's mask at display size (width, height), nearest neighbour: the outline follows the voxels."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize(size, Image.Resampling.NEAREST)) > 0


def draw_untrusted(
    canvas: Image.Image,
    mask: Mask,
    at: tuple[int, int],
    *,
    label: str = LABEL,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None,
) -> bool:
    """Outline and hatch ``mask`` (display-sized, bool) on the RGB ``canvas`` with its top-left corner at ``at``,
    and write ``label`` beside it. Returns False (and draws nothing) when the mask is empty."""
    if not mask.any():
        return False
    edge = mask & ~_eroded(mask)
    for _ in range(CONTOUR_PX - 1):
        edge = _dilated(edge) & mask | edge
    rows, cols = np.indices(mask.shape)
    hatch = mask & (((rows + cols) % HATCH_PERIOD_PX) < HATCH_WIDTH_PX)
    left, top = at
    box = (left, top, left + mask.shape[1], top + mask.shape[0])
    region = np.array(canvas.crop(box).convert("RGB"))
    painted = edge | hatch
    region[painted] = OUTLINE_RGB
    canvas.paste(Image.fromarray(region), (left, top))
    draw = ImageDraw.Draw(canvas)
    where = np.argwhere(mask)
    (r0, c0), (r1, _) = where.min(axis=0), where.max(axis=0)
    text_font = font or ImageFont.load_default()
    extent = draw.textbbox((0, 0), label, font=text_font)
    width, height = extent[2] - extent[0], extent[3] - extent[1]
    x = left + int(np.clip(c0, 0, max(0, mask.shape[1] - width - 4)))
    y = top + int(r0) - height - 8
    if y < top:  # no room above the region: below it
        y = min(top + int(r1) + 4, top + mask.shape[0] - height - 4)
    draw.rectangle((x - 2, y - 2, x + width + 4, y + height + 6), fill=(0, 0, 0), outline=OUTLINE_RGB)
    draw.text((x + 1 - extent[0], y + 1 - extent[1]), label, fill=OUTLINE_RGB, font=text_font)
    return True


def _eroded(mask: Mask) -> Mask:
    """4-neighbour erosion, the border counting as outside (a region touching the edge shows its contour)."""
    padded = np.pad(mask, 1, constant_values=False)
    return np.asarray(
        padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )


def _dilated(mask: Mask) -> Mask:
    padded = np.pad(mask, 1, constant_values=False)
    return np.asarray(
        padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    )
