"""The demo's third series, the one with pedicle screws: what the agent flagged in it, drawn and found on disk.

A module of its own so that ``agent/cli/demo.py`` stays the demo's story (start, export, wait, print) and this the
one picture it adds: the series as the robot received it, with the regions its confidence flagged outlined on
the MR and the sCT beside the phantom's true CT, and the DICOM Segmentation the agent wrote beside the sCT series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.cli.montage import CT_WINDOW_HU, Panel, render_montage
from agent.client import ReceivedVolume
from agent.dicom_out.untrusted_segmentation import SEGMENTATION_FILE
from engines.phantom.case import PhantomCase


def flagged_outputs(
    received: ReceivedVolume | None, case: PhantomCase, series_folder: Path | None, out: Path
) -> tuple[Path | None, Path | None]:
    """``scan-flagged.png`` in ``out`` (None without a received volume), and the Segmentation in the agent's
    ``series_folder`` (None when it wrote none: nothing flagged, or no series)."""
    if received is None:
        return None, None
    mask = None
    if received.confidence is not None and received.confidence_threshold is not None and received.regions:
        # The regions the agent flagged, as their boxes' voxels below the threshold (what the Segmentation holds).
        low = received.confidence < received.confidence_threshold
        mask = np.zeros(low.shape, dtype=bool)
        for r in received.regions:
            box = np.s_[r.slice_start : r.slice_stop, r.row_start : r.row_stop, r.col_start : r.col_stop]
            mask[box] = low[box]
    te = case.acquisition.echo_times_ms
    found = (
        f"{len(received.regions)} region(s) flagged, sCT NOT TRUSTED there"
        if mask is not None
        else "nothing flagged"
    )
    picture = render_montage(
        [
            Panel(f"MR echo 1, TE {te[0]:g} ms", case.echoes[0], outline=mask),
            Panel("SYNTHETIC CT (received)", received.hu, CT_WINDOW_HU, outline=mask),
            Panel("true CT (phantom, with the screws)", case.ct_hu, CT_WINDOW_HU),
        ],
        received.geometry,
        out / "scan-flagged.png",
        caption=f"phantom seed {case.seed} with pedicle screws and rods: {found}",
    )
    segmentation = series_folder / SEGMENTATION_FILE if series_folder is not None else None
    return picture, segmentation if segmentation is not None and segmentation.is_file() else None
