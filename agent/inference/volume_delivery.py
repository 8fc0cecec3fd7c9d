"""What happens to a finished sCT volume, on whichever thread finishes it: commit, the ``flagged`` status, the wire,
then the outputs (the DICOM writer).

The engine stage finishes a volume of a model without confidence itself; a volume with confidence is finished on
the regions stage's thread once its regions are found (agent.inference.untrusted_regions). Both go through this
one sequence, so the exactly-once rule holds for both: a volume is committed (the archive, then the journal)
before it is sent, never after, and one committed before a restart is not sent again (only the outputs after the
wire get it). The ``flagged`` status goes out just before the volume, so a receiver knows where not to trust the
volume by the time it has it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.records import Publication, SctVolume
from agent.status_events import error_event, flagged_event

logger = logging.getLogger(__name__)


class VolumeDelivery:
    """Thread-safe as far as its callbacks are (the journal's lock, the publisher's queue, a stage's inbox)."""

    def __init__(
        self,
        publish: Callable[[Publication], None],
        *,
        commit: Callable[[SctVolume], str | None] | None = None,
        on_volume: Callable[[SctVolume, float], None] | None = None,
    ) -> None:
        self._publish = publish
        self._commit = commit
        self._on_volume = on_volume

    def deliver(self, volume: SctVolume, committed: str | None = None) -> None:
        """Commit and send ``volume`` (``committed``: the sha256 committed before a restart, if the caller knows
        it without a commit hook), then hand it to the outputs."""
        prior = self._commit(volume) if self._commit is not None else committed
        if prior is None:
            self._publish(flagged_event(volume, time.time()))
            self._publish(volume)
        elif prior != volume.sha256:
            # Inference is deterministic on one backend; a difference means the backend or its engine changed
            # under the same model version. What the robots got stays the published volume.
            logger.error(
                "acquisition %s: the sCT volume inferred again has sha256 %s…, the one published before the "
                "restart %s…; not sent again",
                volume.acquisition_id,
                volume.sha256[:12],
                prior[:12],
            )
            self._publish(
                error_event(
                    volume.acquisition_id,
                    stage="engine",
                    message=(
                        f"volume inferred again after a restart differs from the published one (sha256 "
                        f"{volume.sha256[:12]}…, published {prior[:12]}…); the published one stands"
                    ),
                    at=time.time(),
                )
            )
        if self._on_volume is not None:
            self._on_volume(volume, volume.last_image_at)
