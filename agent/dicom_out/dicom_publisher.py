"""The DICOM publisher: each finished sCT volume becomes a CT series on disk, then optionally goes to a peer.

It runs on its own stage thread beside the ZeroMQ publisher, so writing 200 files never delays the robots'
stream. C-STORE runs on a stage of its own (``forward_store``), so a PACS that is down or hangs, which costs up
to ``store_attempts`` times the timeouts per series, never delays the next series' files on disk; and that
stage's inbox is offered to, never waited on: when ``STORE_BACKLOG`` series are already waiting for the peer,
the new one is reported as not sent instead of holding the engine back. A failure costs that series only: it
is logged, counted, reported on the status topic (``kind`` "dicom", ``ok`` false, with the reason) and the
agent carries on. A series that was written but could not be stored stays in the folder, complete, for a
person or ``sct-agent resend`` to pick up.

Status bodies and log lines name the series folder (``sct-<acquisition id>-<series number>``) and source files
by their label, never a UID, a source file name or anything about the patient.

A write that the operating system refused (a full disk above all) names the output folder and the error number
(``ENOSPC``), so that whoever reads the status knows which disk to free; the half-written series is removed by the
writer, so nothing partial is ever visible.

Retention (agent.ops.retention) prunes old series on another thread; ``in_use`` tells it which series this stage
is writing or sending, and those are never removed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.dicom_out.sct_series import SctSeriesError, WrittenSeries, write_sct_series
from agent.file_labels import redact
from agent.ops.config import DicomConfig
from agent.records import DicomStoreRequest, SctVolume, StatusEvent
from agent.vocabulary import LogEvent, StatusKind

logger = logging.getLogger(__name__)

#: The temporary folders agent.dicom_out.sct_series writes a series into before renaming it.
PARTIAL_GLOB: Final = ".sct-*.partial"
#: SctSeriesError attributes whose found value is an OS or file state, never a UID: quoted on the wire.
_SAFE_TO_QUOTE: Final = frozenset({"file", "out_folder"})
#: Error numbers that mean the output folder's filesystem has no room (the disk, or the user's quota).
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Every series folder of an acquisition starts with this and the acquisition id's first 16 characters
#: (agent.dicom_out.sct_series names them).
SERIES_PREFIX: Final = "sct-"
_SERIES_KEY_LENGTH: Final = 16
#: Written series waiting for the C-STORE stage at most; beyond this a series is reported as not sent.
STORE_BACKLOG: Final = 8


class DicomPublisher:
    """:meth:`handle` runs on the dicom stage thread and :meth:`store` on the C-STORE stage's; they share only
    settings fixed at construction and callbacks that are thread-safe (the publisher's submit, the metrics)."""

    def __init__(
        self,
        config: DicomConfig,
        publish: Callable[[StatusEvent], None],
        *,
        on_written: Callable[[str], None] | None = None,
        on_stored: Callable[[str], None] | None = None,
        on_series: Callable[[SctVolume, str], None] | None = None,
        on_disk_full: Callable[[], None] | None = None,
        folder: Path | None = None,
        forward_store: Callable[[DicomStoreRequest], bool] | None = None,
    ) -> None:
        """``folder`` overrides ``config.folder`` (the pipeline passes ``AgentConfig.dicom_folder``, which fills
        in the default); ``on_disk_full`` is called when a write failed for want of space; ``forward_store``
        hands a written series to the C-STORE stage without waiting (False: its inbox is full); without it,
        :meth:`handle` sends the series itself before returning."""
        out = folder if folder is not None else config.folder
        if out is None:
            raise ValueError("DicomPublisher needs a folder (dicom.folder)")
        self._config = config
        self._folder = out
        self._publish = publish
        self._on_written = on_written
        self._on_stored = on_stored
        #: Told the folder of each series complete on disk (the journal: the acquisition is then finished).
        self._on_series = on_series
        self._on_disk_full = on_disk_full
        self._in_use_lock = threading.Lock()
        self._in_use: frozenset[str] = frozenset()
        #: Series folders waiting for, or in, the C-STORE stage: retention must leave them too.
        self._storing: Counter[str] = Counter()
        self._forward_store = forward_store
        self._remove_partial_series()
        self._peer = None
        if config.store_peer:
            from agent.dicom_out.c_store import StorePeer  # noqa: PLC0415 - pynetdicom only when C-STORE is configured

            self._peer = StorePeer.parse(config.store_peer)

    def _remove_partial_series(self) -> None:
        """Remove what a crash or power loss left half-written: hidden ``.sct-*.partial`` folders are ours and
        were never renamed to a series, so nobody may use them."""
        for partial in self._folder.glob(PARTIAL_GLOB):
            if partial.is_dir():
                # An earlier version named these after the series UID: the name is not logged.
                logger.warning("removing a series left half-written by an earlier run")
                shutil.rmtree(partial, ignore_errors=True)

    @property
    def folder(self) -> Path:
        return self._folder

    def in_use(self) -> frozenset[str]:
        """Name prefixes of the series being written or sent now (thread-safe: the retention thread asks)."""
        with self._in_use_lock:
            return self._in_use | frozenset(self._storing)

    def handle(self, volume: SctVolume) -> None:
        prefix = f"{SERIES_PREFIX}{volume.acquisition_id[:_SERIES_KEY_LENGTH]}-"
        with self._in_use_lock:
            self._in_use = frozenset({prefix})
        try:
            self._handle(volume)
        finally:
            with self._in_use_lock:
                self._in_use = frozenset()

    def _handle(self, volume: SctVolume) -> None:
        key = volume.acquisition_id
        try:
            written = write_sct_series(
                volume, self._folder, series_number_offset=self._config.series_number_offset
            )
        except SctSeriesError as error:
            logger.error(
                "acquisition %s: sCT DICOM series not written: %s",
                key,
                error,
                extra=_fields(key, "write", "failed"),
            )
            self._count(self._on_written, "failed")
            if error.errno is not None:
                self._report_os_error(key, error, error.errno)
                return
            # The wire gets the attribute and the file, not the values: a found/expected pair may be a UID.
            where = f" of {error.file}" if error.file else ""
            found = f" {error.found}" if error.attribute in _SAFE_TO_QUOTE else ""
            self._report(
                key,
                ok=False,
                step="write",
                message=f"series not written: {error.attribute}{where}{found} (details in the agent log)",
            )
            return
        if self._on_series is not None:
            self._on_series(volume, written.folder.name)
        self._written(key, volume, written)
        # A reused series is sent again: whether it reached the peer before the restart is not known, and a peer
        # receiving instances it holds (same SOP Instance UIDs, derived) keeps one copy.
        self._forward(key, written)

    def _written(self, key: str, volume: SctVolume, written: WrittenSeries) -> None:
        if written.reused:
            logger.info(
                "acquisition %s: sCT DICOM series %s was complete before the restart",
                key,
                written.folder.name,
                extra=_fields(key, "write", "reused"),
            )
        else:
            self._count(self._on_written, "written")
            if written.clipped_voxels:
                logger.warning(
                    "acquisition %s: %d voxels clipped to the CT range",
                    key,
                    written.clipped_voxels,
                    extra=_fields(key, "write", "clipped"),
                )
            logger.info(
                "acquisition %s: sCT DICOM series %s written (%d files, %.2f s)",
                key,
                written.folder.name,
                len(written.files),
                written.seconds,
                extra=_fields(key, "write", "written"),
            )
        self._report(
            key,
            ok=True,
            step="write",
            message=f"{len(written.files)} files in {written.folder.name}"
            + (" (written before a restart)" if written.reused else "")
            + f"; {_segmentation_words(volume, written)}",
            series_folder=written.folder.name,
            clipped_voxels=written.clipped_voxels,
            segmentation=None if written.segmentation is None else written.segmentation.name,
        )

    def _forward(self, key: str, written: WrittenSeries) -> None:
        if self._peer is None:
            return
        request = DicomStoreRequest(key, written.folder.name, written.all_files)
        self._hold(request.series_folder, +1)
        if self._forward_store is None:
            self.store(request)
        elif not self._forward_store(request):
            self._hold(request.series_folder, -1)
            message = (
                f"C-STORE to {self._peer}: not sent, {STORE_BACKLOG} series already waiting for the peer; the "
                f"series stays in {written.folder.name} (sct-agent resend sends it later)"
            )
            logger.error("acquisition %s: %s", key, message, extra=_fields(key, "store", "failed"))
            self._report(key, ok=False, step="store", message=message, series_folder=written.folder.name)
            self._count(self._on_stored, "failed")

    def _hold(self, series_folder: str, change: int) -> None:
        with self._in_use_lock:
            self._storing[series_folder] += change
            if self._storing[series_folder] <= 0:
                del self._storing[series_folder]

    def store(self, request: DicomStoreRequest) -> None:
        """Send one written series to the peer, with the configured attempts, backoff and timeouts."""
        try:
            self._send(request)
        finally:
            self._hold(request.series_folder, -1)

    def _send(self, request: DicomStoreRequest) -> None:
        if self._peer is None:
            raise ValueError("DicomPublisher.store needs dicom.store_peer")
        from agent.dicom_out.c_store import StoreError, store_series  # noqa: PLC0415 - see __init__

        key, folder = request.acquisition_id, request.series_folder
        try:
            result = store_series(
                request.files,
                self._peer,
                calling_ae=self._config.calling_ae,
                attempts=self._config.store_attempts,
                backoff_s=self._config.store_backoff_s,
                timeout_s=self._config.store_timeout_s,
            )
        except StoreError as error:
            logger.error(
                "acquisition %s: C-STORE of %s failed: %s",
                key,
                folder,
                error,
                extra=_fields(key, "store", "failed"),
            )
            self._report(
                key,
                ok=False,
                step="store",
                message=f"{error}; the series stays in {folder}",
                series_folder=folder,
            )
            self._count(self._on_stored, "failed")
            return
        self._count(self._on_stored, "stored")
        logger.info(
            "acquisition %s: sCT DICOM series %s stored at %s",
            key,
            folder,
            self._peer,
            extra=_fields(key, "store", "stored"),
        )
        self._report(
            key,
            ok=True,
            step="store",
            message=f"{result.stored} instances stored at {self._peer} in {result.attempts} attempt(s)",
            series_folder=folder,
        )

    def _report_os_error(self, key: str, error: SctSeriesError, number: int) -> None:
        """The operating system refused a write: name the folder and the error, and say when the disk is full.

        Not the file: the temporary folder's name holds the new series' UID."""
        name = errno.errorcode.get(number, str(number))
        full = number in DISK_FULL_ERRNOS
        self._report(
            key,
            ok=False,
            step="write",
            message=(
                f"series not written to {self._folder}: {name} ({os.strerror(number)})"
                + ("; nothing of it was kept (the disk is full)" if full else "")
            ),
            folder=str(self._folder),
            errno=name,
        )
        if full and self._on_disk_full is not None:
            self._on_disk_full()

    def _report(self, key: str, *, ok: bool, step: str, message: str, **extra: object) -> None:
        self._publish(
            StatusEvent(
                StatusKind.DICOM,
                key,
                {"ok": ok, "step": step, "message": redact(message), **extra},
                time.time(),
            )
        )

    @staticmethod
    def _count(callback: Callable[[str], None] | None, outcome: str) -> None:
        if callback is not None:
            callback(outcome)


def _segmentation_words(volume: SctVolume, written: WrittenSeries) -> str:
    """What the folder holds besides the CT images: the Segmentation of the regions not to trust, or why not."""
    flagged = volume.flagged
    if written.segmentation is not None and flagged is not None:
        return (
            f"DICOM Segmentation of the {flagged.count} region(s) not to trust ({flagged.volume_ml:.1f} mL) in "
            f"{written.segmentation.name}"
        )
    if flagged is None:
        return "no DICOM Segmentation (the model has no confidence output: nothing was checked)"
    return "no DICOM Segmentation (nothing flagged)"


def _fields(acquisition_id: str, step: str, outcome: str) -> dict[str, object]:
    """Structured fields of this stage's log lines (JSON format)."""
    return {
        "event": LogEvent.DICOM,
        "stage": "dicom",
        "acquisition_id": acquisition_id,
        "step": step,
        "outcome": outcome,
    }
