"""The picture on the status page: the finished sCT's mid-sagittal plane next to echo 1's, marked synthetic.

The technologist glances at it to see that the sCT covers the spine and looks like bone, not to read it: it is
a PNG rendered on the agent (no imaging library in the browser), bone window for the sCT, and the words
"SYNTHETIC CT — not for diagnosis" burnt into the pixels, so that a screenshot or a cropped copy still says
what it is. It carries no patient data: no text from any header is drawn.

The plane is the one that is sagittal in patient space (normal along left-right), found from the volume's
geometry whatever the acquisition orientation: the middle one, or for a volume with regions its confidence says
not to trust, the one through most of them, with the regions outlined, hatched and labelled on both panels
(:mod:`agent.cli.outline`) and named in words under the picture. For a sagittal acquisition only that one slice
of echo 1 is read from disk. Rendering runs on a thread of its own, once per volume, after the volume was handed to the
publisher, so it never slows the engine; the last :data:`MAX_PREVIEWS` PNGs are kept in memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from agent.cli.montage import MR_PERCENTILE, to_lps
from agent.cli.outline import OUTLINE_RGB, draw_untrusted, planes_through, resize_mask
from agent.file_labels import error_text
from agent.records import ImageRef, SctVolume
from agent.status_events import regions_summary
from sct_core.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Previews kept in memory (each ~100 kB); older ones are rendered again never: the page shows "no preview".
MAX_PREVIEWS: Final = 16
#: Volumes waiting to be rendered; a burst beyond this is skipped (logged), never waited on.
PREVIEW_BACKLOG: Final = 4
#: Bone window, HU (window 1800, level 400): cortical and cancellous bone apart, soft tissue grey.
BONE_WINDOW_HU: Final = (-500.0, 1300.0)
#: Height of each panel on the PNG, pixels (a 1920 x 1080 console shows two side by side at full size).
PANEL_HEIGHT_PX: Final = 440
#: Regions the preview names one by one under the picture (more are summarised: count, volume, slices, largest).
PREVIEW_REGIONS_LISTED: Final = 2
MARK: Final = "SYNTHETIC CT — not for diagnosis"
_GAP_PX: Final = 12
_TITLE_PX: Final = 34
_FOOTER_PX: Final = 40
#: Lines of words about the regions not to trust under the picture, and their height.
_MAX_LINES: Final = 3
_LINE_PX: Final = 22
_MARK_COLOUR: Final = (255, 214, 0)
#: Fonts tried in turn (Pillow searches the system's font folders for a bare name).
_FONTS: Final = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf")

PixelReader = Callable[[Path, Sequence[int | None]], npt.NDArray[Any]]


def render_preview(volume: SctVolume, reader: PixelReader) -> bytes:
    """The PNG: echo 1 (left) and the sCT (right) on their sagittal plane, the mark burnt in; a volume with
    regions not to trust is shown through them, outlined."""
    geometry = volume.geometry
    flagged = volume.flagged if volume.flagged is not None and volume.flagged.regions else None
    plane_x: int | None = None
    if flagged is not None:
        planes = planes_through(to_lps(flagged.mask, geometry)[0] > 0)
        plane_x = planes[0] if planes is not None else None
    sct_plane, rows_mm, cols_mm = mid_sagittal(volume.hu, geometry, plane_x)
    sct = _panel(_window(sct_plane, *BONE_WINDOW_HU), rows_mm, cols_mm)
    try:
        echo = _echo_one(volume, reader, plane_x)
    except (OSError, ValueError) as error:
        # Retention or the scanner removed the files since: the sCT is still worth showing.
        logger.warning("acquisition %s: preview without echo 1: %s", volume.acquisition_id, error_text(error))
        echo = None
    if echo is not None:
        mr_plane = mid_sagittal(echo, geometry, plane_x)[0]
        body = mr_plane[mr_plane > 0]
        high = float(np.percentile(body, MR_PERCENTILE)) if body.size else 1.0
        mr = _panel(_window(mr_plane, 0.0, high), rows_mm, cols_mm)
    else:
        mr = Image.new("L", sct.size, 0)
    outline = None
    words = ""
    if flagged is not None:
        outline = resize_mask(mid_sagittal(flagged.mask, geometry, plane_x)[0] > 0, sct.size)
        words = regions_summary(flagged, PREVIEW_REGIONS_LISTED)
    return _compose(
        mr,
        sct,
        mr_title="MR echo 1" if echo is not None else "MR echo 1: not readable",
        outline=outline,
        flagged_words=words,
    )


def mid_sagittal(
    volume: npt.NDArray[np.generic], geometry: VolumeGeometry, x: int | None = None
) -> tuple[npt.NDArray[np.float32], float, float]:
    """The plane whose normal is left-right, as radiologists read it (superior up, anterior left): the middle
    one, or the one ``x`` voxels from the patient's right; and its row and column spacing in mm."""
    lps, (_, sy, sz) = to_lps(volume, geometry)
    index = lps.shape[0] // 2 if x is None else x
    plane = lps[index].T[::-1]  # rows: superior -> inferior; columns: anterior -> posterior
    return np.ascontiguousarray(plane), sz, sy


def sagittal_slice_index(geometry: VolumeGeometry, x: int | None = None) -> int | None:
    """The array slice that holds the sagittal plane ``x`` (the middle one by default) when slices are
    sagittal, else None (every slice contributes a line of it)."""
    slice_direction = np.asarray(geometry.slice_direction)
    if int(np.argmax(np.abs(slice_direction))) != 0:
        return None
    index = geometry.shape[0] // 2 if x is None else x
    return index if slice_direction[0] > 0 else geometry.shape[0] - 1 - index


def _echo_one(volume: SctVolume, reader: PixelReader, x: int | None = None) -> npt.NDArray[np.float32] | None:
    """Echo 1 on the volume's grid, read only where the sagittal plane ``x`` needs it."""
    sources = volume.sources
    if len(sources) != volume.geometry.shape[0] or not all(sources):
        return None
    only = sagittal_slice_index(volume.geometry, x)
    wanted = range(len(sources)) if only is None else (only,)
    refs: dict[Path, list[tuple[int, ImageRef]]] = {}
    for index in wanted:
        ref = sources[index][0]
        refs.setdefault(ref.path, []).append((index, ref))
    echo = np.zeros(volume.hu.shape, dtype=np.float32)
    for path, images in refs.items():
        pixels = reader(path, [ref.frame for _, ref in images])
        if pixels.shape[1:] != volume.hu.shape[1:]:
            raise ValueError(
                f"echo 1 image of {pixels.shape[1:]} pixels; the volume has {volume.hu.shape[1:]}"
            )
        for (index, _), image in zip(images, pixels, strict=True):
            echo[index] = image
    return echo


def _window(image: npt.NDArray[np.float32], low: float, high: float) -> npt.NDArray[np.uint8]:
    scaled = (image - low) / max(high - low, 1e-6)
    return np.asarray(np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5, dtype=np.uint8)


def _panel(image: npt.NDArray[np.uint8], rows_mm: float, cols_mm: float) -> Image.Image:
    """Square millimetres, scaled to the panel height."""
    height_mm = image.shape[0] * rows_mm
    width_mm = image.shape[1] * cols_mm
    width = max(1, round(PANEL_HEIGHT_PX * width_mm / height_mm))
    return Image.fromarray(image).resize((width, PANEL_HEIGHT_PX), Image.Resampling.BILINEAR)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where installed (it has the em dash and ±); Pillow's own font otherwise."""
    for name in _FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _drawable(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    """``text`` with an ASCII hyphen for the em dash where the font has no glyph for it."""
    return text if "DejaVu" in str(getattr(font, "path", "")) else text.replace("—", "-")


def _compose(
    mr: Image.Image,
    sct: Image.Image,
    *,
    mr_title: str,
    outline: npt.NDArray[np.bool_] | None = None,
    flagged_words: str = "",
) -> bytes:
    width = mr.width + _GAP_PX + sct.width
    words_font = _font(17)
    lines = _wrap(_drawable(flagged_words, words_font), words_font, width - 16) if flagged_words else []
    height = _TITLE_PX + PANEL_HEIGHT_PX + _FOOTER_PX + (_LINE_PX * len(lines) + 8 if lines else 0)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(mr.convert("RGB"), (0, _TITLE_PX))
    canvas.paste(sct.convert("RGB"), (mr.width + _GAP_PX, _TITLE_PX))
    if outline is not None:
        label_font = _font(16)
        for left in (0, mr.width + _GAP_PX):  # the same voxels on both panels
            draw_untrusted(canvas, outline, (left, _TITLE_PX), font=label_font)
    draw = ImageDraw.Draw(canvas)
    title = _font(22)
    draw.text((4, 4), mr_title, fill=(255, 255, 255), font=title)
    draw.text((mr.width + _GAP_PX + 4, 4), "SYNTHETIC CT (bone window)", fill=_MARK_COLOUR, font=title)
    small = _font(18)
    for left in (0, mr.width + _GAP_PX):  # orientation: anterior on the left, superior up
        draw.text((left + 4, _TITLE_PX + PANEL_HEIGHT_PX // 2), "A", fill=(255, 255, 255), font=small)
    # The mark, burnt into the sCT itself (a crop keeps it) and across the foot of the whole picture.
    mark = _font(20)
    sct_left = mr.width + _GAP_PX
    words = _drawable(MARK, mark)
    box = draw.textbbox((0, 0), words, font=mark)
    mark_x = sct_left + max(4, (sct.width - (box[2] - box[0])) // 2)
    mark_y = _TITLE_PX + PANEL_HEIGHT_PX - (box[3] - box[1]) - 12
    draw.rectangle(
        (sct_left, mark_y - 6, sct_left + sct.width, mark_y + (box[3] - box[1]) + 10), fill=(0, 0, 0)
    )
    draw.text((mark_x, mark_y - box[1]), words, fill=_MARK_COLOUR, font=mark)
    footer = _font(24)
    plane = "sagittal" if outline is not None else "mid-sagittal"  # a flagged one goes through the region
    text = _drawable(f"{MARK.upper()}  ·  {plane}", footer)
    box = draw.textbbox((0, 0), text, font=footer)
    draw.text(
        ((width - (box[2] - box[0])) // 2, _TITLE_PX + PANEL_HEIGHT_PX + 6),
        text,
        fill=_MARK_COLOUR,
        font=footer,
    )
    for n, line in enumerate(lines):
        draw.text(
            (8, _TITLE_PX + PANEL_HEIGHT_PX + _FOOTER_PX + n * _LINE_PX),
            line,
            fill=OUTLINE_RGB,
            font=words_font,
        )
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width_px: int) -> list[str]:
    """``text`` in lines no wider than ``width_px`` (at most ``_MAX_LINES``; the last ends in "..." if cut)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and measure.textlength(candidate, font=font) > width_px:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    if len(lines) > _MAX_LINES:
        lines = [*lines[: _MAX_LINES - 1], lines[_MAX_LINES - 1] + " ..."]
    return lines


class PreviewRenderer:
    """One thread (``sct-page-preview``) renders each offered volume; thread-safe ``offer`` and ``png``."""

    def __init__(
        self,
        reader: PixelReader,
        on_ready: Callable[[str], None],
        *,
        max_previews: int = MAX_PREVIEWS,
        backlog: int = PREVIEW_BACKLOG,
    ) -> None:
        self._reader = reader
        self._on_ready = on_ready
        self._max = max_previews
        self._inbox: queue.Queue[SctVolume | None] = queue.Queue(backlog)
        self._pngs: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sct-page-preview", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:  # make room for the stop mark: what waits is not worth rendering any more
            try:
                self._inbox.put_nowait(None)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._inbox.get_nowait()
        thread.join(timeout_s)

    def offer(self, volume: SctVolume) -> None:
        """Queue ``volume`` for rendering; never blocks the caller (a stage thread)."""
        if self._thread is None:
            return
        try:
            self._inbox.put_nowait(volume)
        except queue.Full:
            logger.warning(
                "acquisition %s: no preview (%d volumes already waiting)",
                volume.acquisition_id,
                self._inbox.maxsize,
            )

    def png(self, acquisition_id: str) -> bytes | None:
        with self._lock:
            return self._pngs.get(acquisition_id)

    def _run(self) -> None:
        while True:
            volume = self._inbox.get()
            if volume is None:
                return
            try:
                png = render_preview(volume, self._reader)
            except Exception as error:  # a preview must never take anything down
                logger.warning(
                    "acquisition %s: preview not rendered: %s", volume.acquisition_id, error_text(error)
                )
                continue
            with self._lock:
                self._pngs[volume.acquisition_id] = png
                self._pngs.move_to_end(volume.acquisition_id)
                while len(self._pngs) > self._max:
                    self._pngs.popitem(last=False)
            self._on_ready(volume.acquisition_id)
