"""Optional C-STORE of a written sCT series to a configured DICOM peer (a PACS or a navigation system).

Besides the folder a navigation system may import from, the agent can push the series to one
configured peer. One association carries the whole series; what the peer did not confirm (association refused
or aborted, a network error, a non-success status) is sent again on a fresh association after an exponential
backoff, and only that: instances the peer confirmed are never sent twice by this call. After the last attempt
:class:`StoreError` names the peer and what failed.

pynetdicom logs every PDU at INFO/DEBUG; this module sets its logger to WARNING unless the application has
already chosen a level for it.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ

from agent.file_labels import error_text
from sct_core.errors import SctError

logger = logging.getLogger(__name__)

_PYNETDICOM_LOGGER = logging.getLogger("pynetdicom")
if _PYNETDICOM_LOGGER.level == logging.NOTSET:
    _PYNETDICOM_LOGGER.setLevel(logging.WARNING)

#: C-STORE status categories (PS3.7 Annex C): 0x0000 success; 0xB000, 0xB006 and 0xB007 are warnings (stored,
#: with coercion or elements discarded), which count as stored; everything else is a failure.
STATUS_SUCCESS: Final = 0x0000
WARNING_STATUSES: Final = frozenset({0xB000, 0xB006, 0xB007})
#: AE titles are 1-16 characters of the default repertoire, no backslash or control characters (PS3.5 §6.2).
_AE_TITLE_MAX: Final = 16
#: What a series folder holds: the sCT's CT images and, for a flagged volume, the Segmentation of its untrusted
#: regions (agent.dicom_out.untrusted_segmentation).
STORED_SOP_CLASSES: Final = (CTImageStorage, SegmentationStorage)
_PEER_FORM: Final = re.compile(r"^(?P<aet>[^@]+)@(?P<host>[^:@]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+)$")


class StoreError(SctError):
    """The series was not completely stored at the peer after the last attempt.

    ``stored`` counts the instances the peer confirmed, ``failed`` those it never confirmed; ``reasons`` holds
    one line per attempt saying what went wrong.
    """

    def __init__(
        self, peer: StorePeer, *, stored: int, failed: int, attempts: int, reasons: Sequence[str]
    ) -> None:
        self.peer = peer
        self.stored = stored
        self.failed = failed
        self.attempts = attempts
        self.reasons = tuple(reasons)
        super().__init__(
            f"C-STORE to {peer}: {failed} of {stored + failed} instances not stored after {attempts} "
            f"attempt{'s' if attempts != 1 else ''} ({'; '.join(self.reasons)})",
            attribute=f"C-STORE to {peer}",
            found=f"{failed} of {stored + failed} instances not stored",
            expected="every instance stored",
        )


@dataclass(frozen=True, slots=True)
class StorePeer:
    """A DICOM storage SCP: its AE title and network address."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        title = self.ae_title
        if not 1 <= len(title.strip()) <= _AE_TITLE_MAX or "\\" in title or not title.isprintable():
            raise ValueError(
                f"DICOM peer AE title {title!r}: expected 1 to {_AE_TITLE_MAX} printable characters "
                "without a backslash"
            )
        if not self.host:
            raise ValueError("DICOM peer host is empty: expected a host name or IP address")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"DICOM peer port {self.port}: expected 1 to 65535")

    @classmethod
    def parse(cls, text: str) -> StorePeer:
        """``AET@host:port`` (an IPv6 address in brackets: ``AET@[::1]:104``)."""
        match = _PEER_FORM.match(text.strip())
        if match is None:
            raise ValueError(f"DICOM peer {text!r}: expected the form AET@host:port, e.g. PACS@10.0.0.5:104")
        host = match["host"]
        if host.startswith("["):
            host = host[1:-1]
        return cls(ae_title=match["aet"], host=host, port=int(match["port"]))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StoreResult:
    """A series stored completely: ``stored`` instances. ``failed`` counts the C-STORE operations that failed
    (non-success status or no response) and were sent again later, 0 when every instance went through the
    first time; ``attempts`` counts the associations it took (refused ones included)."""

    peer: StorePeer
    stored: int
    failed: int
    attempts: int
    seconds: float


def store_series(
    files: Sequence[Path],
    peer: StorePeer,
    *,
    calling_ae: str = "SCT-EDGE",
    attempts: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
) -> StoreResult:
    """Send ``files`` (CT Image Storage) to ``peer`` over one association, retrying what failed.

    Attempt ``n`` (from 1) that leaves instances unconfirmed is followed, if attempts remain, by a pause of
    ``backoff_s * 2 ** (n - 1)`` seconds. ``timeout_s`` bounds connecting, association negotiation and each
    C-STORE response. Raises :class:`StoreError` after the last attempt, ``ValueError`` for bad arguments.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1; found {attempts}")
    if backoff_s < 0 or not timeout_s > 0:
        raise ValueError(f"backoff_s must be >= 0 and timeout_s > 0; found {backoff_s} and {timeout_s}")
    started = time.perf_counter()
    pending = list(dict.fromkeys(files))
    total = len(pending)
    failed_sends = 0
    reasons: list[str] = []
    attempt = 0
    while pending and attempt < attempts:
        attempt += 1
        if attempt > 1:
            time.sleep(backoff_s * 2 ** (attempt - 2))
        pending, failures, reason = _attempt(pending, peer, calling_ae, timeout_s)
        failed_sends += failures
        if reason:
            reasons.append(f"attempt {attempt}: {reason}")
            logger.warning(
                "C-STORE to %s, attempt %d of %d: %s; %d of %d instances still to send",
                peer,
                attempt,
                attempts,
                reason,
                len(pending),
                total,
            )
    seconds = time.perf_counter() - started
    if pending:
        raise StoreError(
            peer, stored=total - len(pending), failed=len(pending), attempts=attempt, reasons=reasons
        )
    logger.info("C-STORE to %s: %d instances stored in %d attempt(s), %.2f s", peer, total, attempt, seconds)
    return StoreResult(peer=peer, stored=total, failed=failed_sends, attempts=attempt, seconds=seconds)


def _attempt(
    pending: Sequence[Path], peer: StorePeer, calling_ae: str, timeout_s: float
) -> tuple[list[Path], int, str]:
    """One association: returns (files still to send, C-STOREs that failed, what went wrong or "")."""
    ae = AE(ae_title=calling_ae)
    for sop_class in STORED_SOP_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    replies: list[str] = []
    connected: list[bool] = []
    asked = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            evt_handlers=[
                (evt.EVT_PDU_RECV, _note_refusal, [replies]),
                (evt.EVT_CONN_OPEN, _note_connected, [connected]),
            ],
        )
    except (OSError, RuntimeError, ValueError) as error:
        return list(pending), 0, f"association failed ({error_text(error)})"
    if not assoc.is_established:
        _close_transport(assoc)
        if replies:
            what = replies[0]
        elif assoc.is_rejected:
            what = "association rejected"
        elif connected and time.monotonic() - asked >= timeout_s:
            # A peer that is stopped or hung: the kernel still accepts the connection for it.
            what = f"the peer accepted the connection but did not answer the association request within {timeout_s:g} s"
        elif connected:
            what = "the peer closed the connection without answering the association request"
        else:
            # pynetdicom reports a refused or timed-out connection as an abort too.
            what = f"no connection (refused, unreachable, or no answer within {timeout_s:g} s)"
        return list(pending), 0, what

    remaining: list[Path] = []
    failures: list[str] = []
    failed_sends = 0
    try:
        for index, path in enumerate(pending):
            if not _established(assoc):
                remaining.extend(pending[index:])
                failures.append(f"association ended after {index} of {len(pending)} instances")
                break
            failed_sends += 1  # until the peer confirms it
            try:
                dataset = pydicom.dcmread(path)
            except (OSError, InvalidDicomError) as error:
                remaining.append(path)
                failures.append(f"{path.name}: unreadable ({type(error).__name__})")
                continue
            if not _accepted(assoc, str(dataset.get("SOPClassUID", ""))):
                # Said, and tried again at the next attempt; the other instances go on this association.
                remaining.append(path)
                failures.append(f"{path.name}: the peer accepted no presentation context for its SOP class")
                continue
            status = _send(assoc, dataset)
            if status is None:
                # No response: the peer aborted or the DIMSE timeout passed. Either way the association is
                # finished (pynetdicom may not have noticed yet); the rest waits for the next attempt.
                remaining.extend(pending[index:])
                why = replies[-1] if replies else f"no answer within {timeout_s:g} s, or the link dropped"
                failures.append(f"{path.name}: no C-STORE response ({why})")
                if _established(assoc):
                    assoc.abort()
                break
            elif status == STATUS_SUCCESS or status in WARNING_STATUSES:
                failed_sends -= 1
                if status != STATUS_SUCCESS:
                    logger.warning(
                        "C-STORE to %s: %s stored with warning status 0x%04X", peer, path.name, status
                    )
            else:
                remaining.append(path)
                failures.append(f"{path.name}: status 0x{status:04X}")
    finally:
        if _established(assoc):
            assoc.release()
    if not failures:
        return remaining, 0, ""
    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    return remaining, failed_sends, shown


def _note_refusal(event: evt.Event, replies: list[str]) -> None:
    """Records an A-ASSOCIATE-RJ or A-ABORT from the peer as the PDU arrives: a peer that closes the connection
    right after rejecting can make pynetdicom report the rejection as an abort, so its own flags are not enough
    to say which it was."""
    pdu = event.pdu
    if isinstance(pdu, A_ASSOCIATE_RJ):
        replies.append(f"association rejected ({pdu.result_str}, source {pdu.source_str}: {pdu.reason_str})")
    elif isinstance(pdu, A_ABORT_RQ):
        reason = f": {pdu.reason_str}" if pdu.source == 2 else ""  # only the provider states a reason
        replies.append(f"association aborted by the peer ({pdu.source_str}{reason})")


def _close_transport(assoc: Association) -> None:
    """Close the socket of an association that was never established: pynetdicom 3.0.4 leaves a refused
    connection's socket open (its issue #979) until garbage collection, an open file per failed attempt."""
    transport = getattr(assoc.dul, "socket", None)
    raw = getattr(transport, "socket", None)
    if isinstance(raw, socket.socket):
        raw.close()


def _note_connected(_event: evt.Event, connected: list[bool]) -> None:
    """Records that the TCP connection opened, which tells a hung peer from one that is not there."""
    connected.append(True)


def _accepted(assoc: Association, sop_class: str) -> bool:
    """The peer accepted a presentation context for ``sop_class`` (a PACS may take CT and refuse SEG)."""
    return any(context.abstract_syntax == sop_class for context in assoc.accepted_contexts)


def _established(assoc: Association) -> bool:
    """Read afresh each time: pynetdicom's threads change it when the peer aborts or the link drops."""
    return bool(assoc.is_established)


def _send(assoc: Association, dataset: Dataset) -> int | None:
    """The C-STORE status, or None when no response came (the association was aborted or timed out)."""
    try:
        response = assoc.send_c_store(dataset)
    except (OSError, RuntimeError, ValueError, AttributeError) as error:
        # error_text: an encoder's message may quote the value it refused (a patient's name, a UID).
        logger.warning("C-STORE send failed: %s", error_text(error))
        return None
    status = response.get("Status") if response is not None else None
    return int(status) if status is not None else None
