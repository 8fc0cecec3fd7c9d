"""DICOM C-STORE receive: the storage SCP (and Verification SCP) a scanner's DICOM node pushes MR series to.

Most scanners, and every PACS-style router, send images by C-STORE rather than export them to a folder. This
module takes them over the network and hands them to the same entry as the watcher (``Stages.entry``, the
assembler), one :class:`~agent.records.ArrivedFile` per instance, as soon as it is on disk: the first image
gets its provisional verdict as fast as a watched file does, slabs stream as images arrive, and completion is
decided from the acquisition's own counts. An association that ends mid-series (aborted, or a console that
sends a series in several associations) is nothing special: the assembler waits for the rest as it waits
for a slow export, up to the quiet period.

Each instance is durable on disk before it is confirmed (agent.ingest.received_folder); a failed write, a full
disk or less free space than ``receive.min_free_mb`` gets 0xA700 "out of resources", so the scanner keeps the
image and retries. At start, what the folder holds (a restart mid-series) is handed over again.

What is negotiated, and why refusing there: MR Image Storage and Enhanced MR Image Storage, the only SOP classes
the agent judges, in the transfer syntaxes its reader decodes on this machine (agent.ingest.transfer_syntax):
uncompressed little and big endian, deflated, and the lossless compressed syntaxes whose decoder is installed.
Lossy syntaxes and other SOP classes are refused per presentation context at association time, not accepted and
then failed per image: a console that offers an uncompressed alternative (they all can decompress) then sends
in that one, and one that cannot shows the refusal at once, for the whole series, in its network queue. The
refusal is logged with the SOP class and the syntaxes offered, and counted.

Who may associate: ``allowed_addresses`` (addresses or networks) and ``allowed_calling_ae_titles``; the called
AE title must be ours unless ``check_called_ae_title`` is off. A refused association gets the standard
A-ASSOCIATE-RJ reason (calling or called AE title not recognised, or no reason given for an address), and a
log line with the peer's AE title and address and the reason (no patient data: nothing of a dataset has been
sent yet); it is counted by outcome. Threads: pynetdicom runs one thread per association; the handlers below
run there, so ``sink`` may block (back-pressure reaches the sender as a slower confirmation).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from agent.ingest.received_folder import PREAMBLE, digest, received_files, write_durably
from agent.ingest.transfer_syntax import LOSSLESS_COMPRESSED
from agent.ops.config import ReceiveConfig
from agent.records import ArrivedFile
from agent.vocabulary import ArrivalSource

logger = logging.getLogger(__name__)

_PYNETDICOM_LOGGER = logging.getLogger("pynetdicom")
if _PYNETDICOM_LOGGER.level == logging.NOTSET:  # it logs every PDU, and UIDs at DEBUG
    _PYNETDICOM_LOGGER.setLevel(logging.WARNING)

#: The SOP classes taken: what the assembler judges (agent.ingest.header_reader.IMAGE_SOP_CLASSES). The sCT's own
#: CT Image Storage is not: the agent consumes MR only, and a CT sent here could only be thrown away.
ACCEPTED_SOP_CLASSES: Final = (MRImageStorage, EnhancedMRImageStorage)
#: Uncompressed first: when a console offers several syntaxes for one SOP class, the first of ours it offers is
#: chosen, and uncompressed pixels cost the agent no decoding.
_UNCOMPRESSED: Final = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: C-STORE statuses (PS3.4 Annex B.2.3): success; refused, out of resources; cannot understand.
STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_CANNOT_UNDERSTAND: Final = 0xC000
#: ErrorComment is LO: at most 64 characters.
_ERROR_COMMENT_MAX: Final = 64
#: A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4: rejected permanent, by the service user, for
#: no reason given / calling AE title not recognised / called AE title not recognised.
_REJECT_ADDRESS: Final = (0x01, 0x01, 0x01)
_REJECT_CALLING: Final = (0x01, 0x01, 0x03)
_REJECT_CALLED: Final = (0x01, 0x01, 0x07)
#: Presentation context results (PS3.8 9.3.3.2): abstract syntax / transfer syntaxes not supported.
_CONTEXT_SOP_CLASS: Final = 0x03
_CONTEXT_TRANSFER_SYNTAX: Final = 0x04
#: SOP classes named in the line that says which were not taken (storescu offers every storage class).
_SOP_CLASSES_LOGGED: Final = 5
#: Seconds ``stop`` waits for the start-up scan's thread (it waits on the assembler's inbox only).
_SCAN_JOIN_S: Final = 10.0


def accepted_transfer_syntaxes() -> tuple[UID, ...]:
    """What this machine's reader decodes: uncompressed, deflated, and the lossless syntaxes with a decoder."""
    lossless = sorted(uid for uid in LOSSLESS_COMPRESSED if get_decoder(uid).is_available)
    return (*_UNCOMPRESSED, *(UID(uid) for uid in lossless))


class ReceiveCounters(Protocol):
    """What the SCP reports (agent.ops.metrics.AgentMetrics implements it)."""

    def receive_association(self, outcome: str) -> None: ...

    def receive_instance(self, outcome: str, nbytes: int = 0) -> None: ...

    def receive_context_refused(self, reason: str) -> None: ...


@dataclass(slots=True)
class _Peer:
    """What one association has done so far (for its closing log line)."""

    calling_ae: str
    address: str
    stored: int = 0
    refused: int = 0


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:_ERROR_COMMENT_MAX]
    return status


def calling_ae_title(association: Association) -> str:
    """The peer's AE title as it asked (pynetdicom copies it to ``requestor.ae_title`` only after negotiation)."""
    primitive = association.requestor.primitive
    title = primitive.calling_ae_title if primitive is not None else association.requestor.ae_title
    return str(title or "").strip()


class StoreScp:
    """The storage and Verification SCP. ``start`` binds (OSError naming the address if it cannot), hands what
    ``folder`` already holds to ``sink`` on a thread of its own, and serves; ``stop`` ends every association."""

    def __init__(
        self,
        config: ReceiveConfig,
        folder: Path,
        sink: Callable[[ArrivedFile], object],
        counters: ReceiveCounters,
        *,
        free_bytes: Callable[[], int | None] | None = None,
    ) -> None:
        if not config.enabled:
            raise ValueError("receive.listen is '' (receive off): there is nothing to start")
        self._config = config
        self._folder = folder
        self._sink = sink
        self._counters = counters
        self._free_bytes = free_bytes
        self._networks = config.networks()
        self._allowed_titles = frozenset(t.strip() for t in config.allowed_calling_ae_titles)
        self._min_free = int(config.min_free_mb * 1_000_000)
        self._transfer_syntaxes = accepted_transfer_syntaxes()
        self._lock = threading.Lock()
        self._peers: dict[int, _Peer] = {}
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._scan: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when ``listen`` asked for port 0."""
        if self._server is None:
            raise RuntimeError("the storage SCP is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def open_associations(self) -> int:
        ae = self._ae
        return 0 if ae is None else len(ae.active_associations)

    def start(self) -> None:
        config = self._config
        self._folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=config.ae_title)
        ae.maximum_associations = config.max_associations
        ae.acse_timeout = config.acse_timeout_s
        ae.dimse_timeout = config.dimse_timeout_s
        ae.network_timeout = config.network_timeout_s
        ae.maximum_pdu_size = config.max_pdu_bytes
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(self._transfer_syntaxes))
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_connected),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        try:
            server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)
        except OSError as error:
            raise OSError(
                error.errno, f"receive.listen: cannot listen on {config.listen} ({error.strerror})"
            ) from error
        assert server is not None  # block=False returns the server
        self._ae, self._server = ae, server
        self._scan = threading.Thread(target=self._scan_folder, name="sct-receive-scan", daemon=True)
        self._scan.start()
        host, port = self.address
        logger.info(
            "receiving DICOM by C-STORE as %s on %s:%d (calling AE titles: %s; addresses: %s)",
            config.ae_title,
            host,
            port,
            ", ".join(sorted(self._allowed_titles)) or "any",
            ", ".join(str(n) for n in self._networks) or "any",
        )

    def stop(self) -> None:
        """Stop listening, abort associations still open (their senders retry what was not confirmed) and end
        the start-up scan; safe to call twice."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        ae, self._ae = self._ae, None
        if ae is not None:
            for association in ae.active_associations:
                association.abort()
            ae.shutdown()
        scan, self._scan = self._scan, None
        if scan is not None:
            scan.join(_SCAN_JOIN_S)

    def _scan_folder(self) -> None:
        """Hand over what the folder holds from before this start (module docstring)."""
        handed = 0
        try:
            for path in received_files(self._folder):
                if self._stopping.is_set():
                    return
                stat = path.stat()
                self._sink(
                    ArrivedFile(path, stat.st_size, stat.st_mtime_ns, time.time(), ArrivalSource.STARTUP_SCAN)
                )
                handed += 1
        except Exception:  # a defect here must not stop receiving; the files stay for the next start
            logger.exception("received folder: start-up scan stopped after %d files", handed)
            return
        if handed:
            logger.info("received folder: %d files from before this start handed to the assembler", handed)

    # ----------------------------------------------------------------------------------------- associations

    def _refusal(self, association: Association) -> tuple[str, str, tuple[int, int, int]] | None:
        """Why the association may not go ahead (outcome, reason, A-ASSOCIATE-RJ), or None."""
        request = association.requestor
        calling = calling_ae_title(association)
        primitive = request.primitive
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        if self._networks:
            try:
                address = ipaddress.ip_address(request.address.split("%")[0])
            except ValueError:
                address = None
            mapped = getattr(address, "ipv4_mapped", None)
            if address is None or not any(
                candidate in network
                for network in self._networks
                for candidate in (address, mapped)
                if candidate is not None and candidate.version == network.version
            ):
                return "refused_address", "its address is not in receive.allowed_addresses", _REJECT_ADDRESS
        if self._allowed_titles and calling not in self._allowed_titles:
            return (
                "refused_calling_ae_title",
                f"calling AE title {calling!r} is not in receive.allowed_calling_ae_titles",
                _REJECT_CALLING,
            )
        if self._config.check_called_ae_title and called != self._config.ae_title:
            return (
                "refused_called_ae_title",
                f"called AE title {called!r} is not ours ({self._config.ae_title!r}, receive.ae_title)",
                _REJECT_CALLED,
            )
        return None

    def _on_connected(self, event: Event) -> None:
        """Confirmations go out at once: with Nagle's algorithm on, each small C-STORE response can wait for the
        peer's delayed acknowledgement (40 ms on Linux), which caps a series at about 25 images a second."""
        connection = event.assoc.dul.socket
        if connection is not None and connection.socket is not None:
            with suppress(OSError):  # not fatal: only slower
                connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: Event) -> None:
        association = event.assoc
        request = association.requestor
        calling = calling_ae_title(association)
        refusal = self._refusal(association)
        if refusal is None:
            with self._lock:
                self._peers[id(association)] = _Peer(calling, request.address)
            return
        outcome, reason, (result, source, diagnostic) = refusal
        logger.warning("C-STORE association from %r at %s refused: %s", calling, request.address, reason)
        self._counters.receive_association(outcome)
        association.acse.send_reject(result, source, diagnostic)
        association.kill()

    def _on_rejected(self, event: Event) -> None:
        """pynetdicom's own refusal: more associations than ``max_associations``."""
        request = event.assoc.requestor
        logger.warning(
            "C-STORE association from %r at %s refused: %d associations open already "
            "(receive.max_associations); the sender retries",
            calling_ae_title(event.assoc),
            request.address,
            self._config.max_associations,
        )
        self._counters.receive_association("refused_busy")

    def _on_accepted(self, event: Event) -> None:
        association = event.assoc
        self._counters.receive_association("accepted")
        primitive = association.requestor.primitive
        offered = {
            cx.context_id: cx
            for cx in (primitive.presentation_context_definition_list if primitive is not None else [])
        }
        sop_classes: dict[str, None] = {}
        syntaxes_refused: dict[str, str] = {}
        for context in association.rejected_contexts:
            name = UID(str(context.abstract_syntax)).name
            if context.result == _CONTEXT_SOP_CLASS and name not in sop_classes:
                sop_classes[name] = None
                self._counters.receive_context_refused("sop_class")
            elif context.result == _CONTEXT_TRANSFER_SYNTAX and name not in syntaxes_refused:
                asked = offered.get(context.context_id)
                uids = [
                    UID(str(u))
                    for u in (asked.transfer_syntax if asked is not None else context.transfer_syntax)
                ]
                lossy = any(u.is_compressed and u not in LOSSLESS_COMPRESSED for u in uids)
                why = (
                    "lossy compression alters the intensities the model was validated on; send uncompressed or "
                    "lossless"
                    if lossy
                    else "no decoder for it on this machine"
                )
                syntaxes_refused[name] = f"{name} offered only in {', '.join(u.name for u in uids)} ({why})"
                self._counters.receive_context_refused("transfer_syntax")
        peer = self._peer(association)
        logger.info("C-STORE association from %r at %s accepted", peer.calling_ae, peer.address)
        if syntaxes_refused:
            logger.warning(
                "C-STORE association from %r at %s: refused %s",
                peer.calling_ae,
                peer.address,
                "; ".join(syntaxes_refused.values()),
            )
        if sop_classes:
            names = list(sop_classes)
            shown = ", ".join(names[:_SOP_CLASSES_LOGGED]) + (
                f" and {len(names) - _SOP_CLASSES_LOGGED} more" if len(names) > _SOP_CLASSES_LOGGED else ""
            )
            logger.info(
                "C-STORE association from %r at %s: %d SOP classes offered are not taken (only MR Image Storage "
                "and Enhanced MR Image Storage are): %s",
                peer.calling_ae,
                peer.address,
                len(names),
                shown,
            )

    def _on_ended(self, event: Event) -> None:
        with self._lock:
            peer = self._peers.pop(id(event.assoc), None)
        if peer is None:
            return
        aborted = event.event is evt.EVT_ABORTED
        unfinished = aborted and peer.stored > 0
        (logger.warning if unfinished else logger.info)(
            "C-STORE association from %r at %s %s: %d instances stored, %d refused%s",
            peer.calling_ae,
            peer.address,
            "aborted" if aborted else "released",
            peer.stored,
            peer.refused,
            "; a series it left unfinished waits for the rest (assembly.quiet_period_s)"
            if unfinished
            else "",
        )

    def _peer(self, association: Association) -> _Peer:
        with self._lock:
            peer = self._peers.get(id(association))
            if peer is None:
                request = association.requestor
                peer = self._peers[id(association)] = _Peer(calling_ae_title(association), request.address)
            return peer

    def _on_echo(self, event: Event) -> int:
        peer = self._peer(event.assoc)
        logger.info("C-ECHO from %r at %s", peer.calling_ae, peer.address)
        return STATUS_SUCCESS

    # ----------------------------------------------------------------------------------------------- C-STORE

    def _on_store(self, event: Event) -> Dataset | int:
        """Write the instance durably, hand it to the assembler, and only then confirm it (module docstring)."""
        peer = self._peer(event.assoc)
        status = self._store(event, peer)
        with self._lock:
            if status == STATUS_SUCCESS:
                peer.stored += 1
            else:
                peer.refused += 1
        return status

    def _store(self, event: Event, peer: _Peer) -> Dataset | int:
        request = event.request
        instance_uid = str(getattr(request, "AffectedSOPInstanceUID", "") or "").strip()
        try:
            dataset = event.dataset
            series = f"{dataset.get('StudyInstanceUID', '')}|{dataset.get('SeriesInstanceUID', '')}"
        except Exception as error:  # a dataset pydicom cannot parse: nothing to store
            logger.warning(
                "C-STORE from %r at %s: instance refused, its dataset cannot be read (%s)",
                peer.calling_ae,
                peer.address,
                type(error).__name__,
            )
            self._counters.receive_instance("invalid")
            return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be decoded")
        if not instance_uid:
            self._counters.receive_instance("invalid")
            return _status(STATUS_CANNOT_UNDERSTAND, "no Affected SOP Instance UID")
        short = self._short_of_space()
        if short is not None:
            logger.error(
                "C-STORE from %r at %s: instance refused (0xA700): %s", peer.calling_ae, peer.address, short
            )
            self._counters.receive_instance("out_of_resources")
            return _status(STATUS_OUT_OF_RESOURCES, "agent disk space low; retry later")
        path = self._folder / digest(series) / f"{digest(instance_uid)}.dcm"
        meta = event.file_meta
        if peer.calling_ae:
            meta.SourceApplicationEntityTitle = peer.calling_ae
        data = event.encoded_dataset(include_meta=False)
        try:
            write_durably(path, (PREAMBLE, encode_file_meta(meta), data))
            stat = path.stat()
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            logger.error(
                "C-STORE from %r at %s: instance refused (0xA700): the received folder %s (%s: %s)",
                peer.calling_ae,
                peer.address,
                "is full" if full else "cannot be written",
                errno.errorcode.get(error.errno or 0, "error"),
                error.strerror,
            )
            self._counters.receive_instance("out_of_resources")
            return _status(
                STATUS_OUT_OF_RESOURCES, "agent disk full; retry later" if full else "agent write failed"
            )
        arrived = ArrivedFile(path, stat.st_size, stat.st_mtime_ns, time.time(), ArrivalSource.RECEIVED)
        self._counters.receive_instance("stored", stat.st_size)
        try:
            self._sink(arrived)
        except Exception:  # on disk, so the next start hands it over; the sender must not send it again
            logger.exception("C-STORE: a received instance was stored but not handed to the assembler")
        return STATUS_SUCCESS

    def _short_of_space(self) -> str | None:
        if self._free_bytes is None or self._min_free <= 0:
            return None
        free = self._free_bytes()
        if free is None or free >= self._min_free:
            return None
        return (
            f"{free / 1e6:.0f} MB free on the state folder's filesystem, below receive.min_free_mb "
            f"({self._config.min_free_mb:g} MB)"
        )
