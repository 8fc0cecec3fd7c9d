"""The DICOM publisher: each finished sCT volume becomes a CT series on disk, then optionally goes to a peer.

It runs on its own stage thread beside the ZeroMQ publisher, so writing 200 files never delays the robots'
stream. C-STORE runs on a stage of its own (``forward_store``), so a PACS that is down or hangs, which costs up
to ``store_attempts`` times the timeouts per series, never delays the next series' files on disk; and that
stage's inbox is offered to, never waited on: when ``STORE_BACKLOG`` series are already waiting for the peer,
the new one is reported as not sent instead of holding the engine back. A failure costs that series only: it
is logged, counted, reported on the status topic (``kind`` "dicom", ``ok`` false, with the reason) and the
agent carries on. A series that was written but could not be stored stays in the folder, complete, for a
person or ``sct-agent resend`` to pick up.

Status bodies name the series folder, never a UID or anything about the patient.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import Final

from agent.dicom_out.sct_series import SctSeriesError, write_sct_series
from agent.ops.config import DicomConfig
from agent.records import DicomStoreRequest, SctVolume, StatusEvent
from agent.vocabulary import StatusKind

logger = logging.getLogger(__name__)

#: The temporary folders agent.dicom_out.sct_series writes a series into before renaming it.
PARTIAL_GLOB: Final = ".sct-*.partial"
#: SctSeriesError attributes whose found value is an OS or file state, never a UID: quoted on the wire.
_SAFE_TO_QUOTE: Final = frozenset({"file", "out_folder"})
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
        forward_store: Callable[[DicomStoreRequest], bool] | None = None,
    ) -> None:
        """``forward_store`` hands a written series to the C-STORE stage without waiting (False: its inbox is
        full); without it, :meth:`handle` sends the series itself before returning."""
        if config.folder is None:
            raise ValueError("DicomPublisher needs dicom.folder")
        self._config = config
        self._folder = config.folder
        self._publish = publish
        self._on_written = on_written
        self._on_stored = on_stored
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
                logger.warning("removing %s, a series left half-written by an earlier run", partial.name)
                shutil.rmtree(partial, ignore_errors=True)

    def handle(self, volume: SctVolume) -> None:
        key = volume.acquisition_id
        try:
            written = write_sct_series(
                volume, self._folder, series_number_offset=self._config.series_number_offset
            )
        except SctSeriesError as error:
            logger.error("acquisition %s: sCT DICOM series not written: %s", key, error)
            # The wire gets the attribute and the file, not the values: a found/expected pair may be a UID.
            where = f" of {error.file}" if error.file else ""
            found = f" {error.found}" if error.attribute in _SAFE_TO_QUOTE else ""
            self._report(
                key,
                ok=False,
                step="write",
                message=f"series not written: {error.attribute}{where}{found} (details in the agent log)",
            )
            self._count(self._on_written, "failed")
            return
        self._count(self._on_written, "written")
        if written.clipped_voxels:
            logger.warning("acquisition %s: %d voxels clipped to the CT range", key, written.clipped_voxels)
        logger.info(
            "acquisition %s: sCT DICOM series %s written (%d files, %.2f s)",
            key,
            written.folder.name,
            len(written.files),
            written.seconds,
        )
        self._report(
            key,
            ok=True,
            step="write",
            message=f"{len(written.files)} files in {written.folder.name}",
            series_folder=written.folder.name,
            clipped_voxels=written.clipped_voxels,
        )
        if self._peer is None:
            return
        request = DicomStoreRequest(key, written.folder.name, tuple(written.files))
        if self._forward_store is None:
            self.store(request)
        elif not self._forward_store(request):
            message = (
                f"C-STORE to {self._peer}: not sent, {STORE_BACKLOG} series already waiting for the peer; the "
                f"series stays in {written.folder.name} (sct-agent resend sends it later)"
            )
            logger.error("acquisition %s: %s", key, message)
            self._report(key, ok=False, step="store", message=message, series_folder=written.folder.name)
            self._count(self._on_stored, "failed")

    def store(self, request: DicomStoreRequest) -> None:
        """Send one written series to the peer, with the configured attempts, backoff and timeouts."""
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
            logger.error("acquisition %s: C-STORE of %s failed: %s", key, folder, error)
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
        self._report(
            key,
            ok=True,
            step="store",
            message=f"{result.stored} instances stored at {self._peer} in {result.attempts} attempt(s)",
            series_folder=folder,
        )

    def _report(self, key: str, *, ok: bool, step: str, message: str, **extra: object) -> None:
        self._publish(
            StatusEvent(
                StatusKind.DICOM, key, {"ok": ok, "step": step, "message": message, **extra}, time.time()
            )
        )

    @staticmethod
    def _count(callback: Callable[[str], None] | None, outcome: str) -> None:
        if callback is not None:
            callback(outcome)
