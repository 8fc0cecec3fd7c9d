"""DICOM unique identifiers for simulated exports.

The agent deduplicates files by SOPInstanceUID, so two exports of the same seed must not collide unless they
are meant to be the same files: by default every UID is a fresh random UUID. Reproducible output (for fixtures
and byte-for-byte comparisons) derives each UID from a name instead. Both use the ``2.25.<UUID as integer>``
form of PS3.5 §B.2, which needs no registered organisation root and never collides with a vendor's UIDs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

#: Namespace for name-based UIDs, itself a fixed random UUID: it keeps our derived UUIDs apart from anyone
#: else's.
_UID_NAMESPACE = uuid.UUID("6d1c3a36-58b5-4f1e-9a57-0b9c61e0a3f4")

#: Identifies the software that wrote the files (PS3.7 Annex D.3.3.2): the simulator, whatever vendor it
#: mimics.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'sct-edge-agent scanner simulator').int}"


@dataclass(frozen=True, slots=True)
class UidSource:
    """Hands out UIDs: random when ``run_key`` is ``None``, otherwise derived from the key and a role.

    With a ``run_key``, the same role always gives the same UID, so callers must name each entity uniquely
    (``uid("sop", series_uid, slice, echo)``). Without one, every call returns a new UID.
    """

    run_key: str | None = None

    def uid(self, *role: object) -> str:
        """A UID for one entity."""
        if self.run_key is None:
            return f"2.25.{uuid.uuid4().int}"
        name = "/".join([self.run_key, *(str(part) for part in role)])
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"

    @property
    def deterministic(self) -> bool:
        """Whether the same inputs give the same UIDs (and, by extension, the same timestamps)."""
        return self.run_key is not None
