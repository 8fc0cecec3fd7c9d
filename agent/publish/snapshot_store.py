"""What a late or resynchronising subscriber needs: the latest finished volumes and the slabs in flight.

The Clone pattern (ZeroMQ guide, chapter 5) keeps the state a newcomer needs next to the publisher. Ours is
small and bounded: the last ``keep_volumes`` finished ``sct.volume`` messages, and every ``sct.slab`` of each
acquisition still streaming (at most ``max_in_flight`` of them). Messages are kept exactly as they were framed
for the PUB socket (same header, same sequence number, same payload buffer, not a copy), so a snapshot replays
them byte for byte and a subscriber cannot tell a replayed slab from a live one.

A data message with a confidence companion (schema 1.4) is kept with it, and replayed right after it to clients
that know the ``confidence`` topic (:meth:`StoredMessage.replay`). A volume supersedes its slabs; a ``cancelled`` status drops the slabs of an acquisition whose stream was
abandoned, and so does ``IN_FLIGHT_EXPIRY_S`` without a new slab; a slab on a different grid than the slabs held (the grid was placed again) starts the acquisition
afresh. Only the publisher thread uses a store, so it needs no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from agent.records import Publication, SctSlab, SctVolume, StatusEvent
from agent.vocabulary import StatusKind
from sct_core.geometry import VolumeGeometry

#: Acquisitions whose slabs are kept at once; a new one beyond this evicts the one idle longest.
MAX_IN_FLIGHT: Final = 4
#: An acquisition with no new slab for this long is dropped from snapshots: its stream ended without a volume
#: or a cancellation (an engine error), and no robot should be handed its slabs as "in flight" (s).
IN_FLIGHT_EXPIRY_S: Final = 600.0

Frames = list[bytes | memoryview]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    frames: Frames
    nbytes: int
    #: The ``confidence`` message that followed it with the same ``seq`` (schema 1.4), if any.
    companion: Frames | None = None
    companion_nbytes: int = 0

    def replay(self, *, confidence: bool) -> list[Frames]:
        """The messages a snapshot sends for this one: the companion too when the client knows its topic."""
        if confidence and self.companion is not None:
            return [self.frames, self.companion]
        return [self.frames]


@dataclass(slots=True)
class _InFlight:
    geometry: VolumeGeometry
    slabs: dict[int, StoredMessage] = field(default_factory=dict)
    last_slab_at: float = field(default_factory=time.monotonic)


class SnapshotStore:
    def __init__(
        self, keep_volumes: int, *, max_in_flight: int = MAX_IN_FLIGHT, expiry_s: float = IN_FLIGHT_EXPIRY_S
    ) -> None:
        if keep_volumes < 1:
            raise ValueError(f"SnapshotStore keep_volumes: found {keep_volumes}; expected >= 1")
        if max_in_flight < 1:
            raise ValueError(f"SnapshotStore max_in_flight: found {max_in_flight}; expected >= 1")
        self._keep_volumes = keep_volumes
        self._max_in_flight = max_in_flight
        self._expiry_s = expiry_s
        #: acquisition id -> its latest volume message, oldest first.
        self._volumes: OrderedDict[str, StoredMessage] = OrderedDict()
        self._in_flight: OrderedDict[str, _InFlight] = OrderedDict()

    def record(self, item: Publication, seq: int, frames: Frames, companion: Frames | None = None) -> None:
        """Keep what a snapshot must replay of a message just framed with ``seq`` (and of its confidence
        ``companion``, framed with the same ``seq``)."""
        extra = 0
        if companion is not None and isinstance(item, SctSlab | SctVolume) and item.confidence is not None:
            extra = int(item.confidence.nbytes)
        if isinstance(item, SctSlab):
            stored = StoredMessage(seq, frames, int(item.hu.nbytes), companion, extra)
            flight = self._in_flight.get(item.acquisition_id)
            if flight is None or flight.geometry != item.geometry:
                flight = _InFlight(item.geometry)
                self._in_flight[item.acquisition_id] = flight
            self._in_flight.move_to_end(item.acquisition_id)
            flight.slabs[item.slab_index] = stored
            flight.last_slab_at = time.monotonic()
            while len(self._in_flight) > self._max_in_flight:
                self._in_flight.popitem(last=False)
        elif isinstance(item, SctVolume):
            self._in_flight.pop(item.acquisition_id, None)
            self._volumes.pop(item.acquisition_id, None)
            self._volumes[item.acquisition_id] = StoredMessage(
                seq, frames, int(item.hu.nbytes), companion, extra
            )
            while len(self._volumes) > self._keep_volumes:
                self._volumes.popitem(last=False)
        elif isinstance(item, StatusEvent) and item.kind == StatusKind.CANCELLED and item.acquisition_id:
            self._in_flight.pop(item.acquisition_id, None)

    def messages(self) -> list[StoredMessage]:
        """Everything a snapshot replays, in the order it was first sent (ascending seq)."""
        self._expire()
        stored = list(self._volumes.values())
        for flight in self._in_flight.values():
            stored.extend(flight.slabs.values())
        return sorted(stored, key=lambda m: m.seq)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, f in self._in_flight.items() if now - f.last_slab_at > self._expiry_s]:
            del self._in_flight[key]

    @property
    def volume_count(self) -> int:
        return len(self._volumes)

    @property
    def slab_count(self) -> int:
        return sum(len(f.slabs) for f in self._in_flight.values())

    @property
    def nbytes(self) -> int:
        """Payload bytes held (shared with nothing once the PUB socket has sent them)."""
        return sum(m.nbytes + m.companion_nbytes for m in self.messages())
