"""Fault: the C-STORE peer (a PACS, a navigation system) refuses or hangs.

Refuses: an association rejected because we call the wrong AE title (a pynetdicom SCP that checks it), or a
port with nothing listening (tests/test_dicom_store.py). Hangs: a raw TCP server that accepts and never says a
word, dcmtk's storescp stopped with SIGSTOP (the kernel still accepts connections for it), and an SCP that stops
answering in the middle of a series. In each case C-STORE gives up after ``dicom.store_timeout_s`` per attempt,
retries with back-off, then reports the peer and what failed; the series stays on disk; and in the running
agent the next series is written and published as usual while the store stage waits out the peer.

No timing is asserted (the house rule): that every call returns at all, with the attempts it made, is the
bound; pytest's own timeout catches a store that would hang.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import agent_config, write_test_protocol
from fault_support import metric, recording, scrape, small_series, write_small_model
from pydicom.uid import CTImageStorage
from pynetdicom import AE, evt
from sct_dicom_support import (
    PEER_AE,
    StartStorescp,
    export_mr,
    free_port,
    needs_storescp,
    received,
    sct_volume,
    small_case,
)

from agent.dicom_out.c_store import StoreError, StorePeer, store_series
from agent.dicom_out.dicom_publisher import STORE_BACKLOG, DicomPublisher
from agent.dicom_out.sct_series import WrittenSeries, write_sct_series
from agent.ops.config import DicomConfig
from agent.records import DicomStoreRequest, StatusEvent
from agent.service import AgentService
from agent.vocabulary import StatusKind
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportOptions, OutputFormat, export_case

#: pynetdicom 3.0.4 leaves the socket of a refused connection unclosed (see tests/test_dicom_store.py).
pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")

#: Seconds a peer gets per step here: short, so a hang costs the tests little.
TIMEOUT_S = 1.0
SERIES_SEED = 900501


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    root = tmp_path_factory.mktemp("store")
    case = small_case()
    mr = export_mr(case, root / "mr", OutputFormat.CLASSIC)
    return write_sct_series(sct_volume(case, mr.paths), root / "sct")


@contextmanager
def silent_peer(port: int = 0) -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server that accepts every connection and never sends a byte: a hung PACS. Yields its port and the
    connections it accepted; on exit it stops listening and closes them (the peer's process has died)."""
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(
        0.05
    )  # accept() wakes to see the stop: closing a socket does not end a blocked accept()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(connection)

    thread = threading.Thread(target=accept, name="silent-peer")
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        server.close()
        for connection in accepted:
            connection.close()


@contextmanager
def scp(*, require_called_aet: bool = False, hang_at: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom storage SCP on loopback answering to PEER_AE. ``require_called_aet`` rejects associations
    that call another title; ``hang_at`` (0-based) stops answering from that instance on until the SCP stops.
    Yields its port and the SOP instance UIDs it stored."""
    stored: list[str] = []
    release = threading.Event()

    def handle_store(event: evt.Event) -> int:
        if hang_at is not None and len(stored) >= hang_at:
            release.wait()
            return 0xA700
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title=PEER_AE)
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None
    try:
        port = server.server_address[1]
        assert isinstance(port, int)
        yield port, stored
    finally:
        release.set()
        server.shutdown()


# ------------------------------------------------------------------------------------ C-STORE against the peer


def test_a_wrong_called_ae_title_is_rejected_and_named_after_every_attempt(series: WrittenSeries) -> None:
    with scp(require_called_aet=True) as (port, stored):
        peer = StorePeer("NOT_THE_PACS", "127.0.0.1", port)
        with pytest.raises(StoreError) as caught:
            store_series(series.files, peer, attempts=2, backoff_s=0.01, timeout_s=TIMEOUT_S)
        assert stored == []
        # The same SCP called by its own title takes the series: the refusal was the title's.
        right = store_series(series.files, replace(peer, ae_title=PEER_AE), attempts=1, timeout_s=TIMEOUT_S)
        assert right.stored == len(series.files) and sorted(stored) == sorted(series.sop_instance_uids)
    error = caught.value
    assert (error.attempts, error.stored, error.failed) == (2, 0, len(series.files))
    assert str(error).startswith(f"C-STORE to NOT_THE_PACS@127.0.0.1:{port}: ")
    for attempt in (1, 2):
        assert (
            f"attempt {attempt}: association rejected (Rejected (Permanent), source DUL service-user: "
            "Called AE title not recognised)"
        ) in str(error)


def test_a_peer_that_accepts_and_never_answers_times_out_on_every_attempt(series: WrittenSeries) -> None:
    with silent_peer() as (port, accepted):
        with pytest.raises(StoreError) as caught:
            store_series(
                series.files,
                StorePeer(PEER_AE, "127.0.0.1", port),
                attempts=3,
                backoff_s=0.01,
                timeout_s=TIMEOUT_S,
            )
        assert len(accepted) == 3  # one association tried per attempt, each given up
    error = caught.value
    assert (error.attempts, error.stored, error.failed) == (3, 0, len(series.files))
    hang = "the peer accepted the connection but did not answer the association request within 1 s"
    assert [reason.split(": ", 1)[1] for reason in error.reasons] == [hang] * 3


@needs_storescp
def test_a_stopped_storescp_times_out_and_the_retry_after_it_continues_stores_the_series(
    series: WrittenSeries, storescp: StartStorescp, caplog: pytest.LogCaptureFixture
) -> None:
    """storescp stopped (SIGSTOP): the kernel accepts the connection, nobody answers. It is continued once the
    first attempt has been given up (the log says so), and the retry after the back-off stores everything."""
    port = free_port()
    folder = storescp(port)
    (process,) = [p for p in _children() if b"storescp" in _cmdline(p)]
    os.kill(process, signal.SIGSTOP)
    continued = threading.Event()

    class ContinueAfterFirstFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "attempt 1 of" in record.getMessage() and not continued.is_set():
                os.kill(process, signal.SIGCONT)
                continued.set()

    handler = ContinueAfterFirstFailure(logging.WARNING)
    store_logger = logging.getLogger("agent.dicom_out.c_store")
    store_logger.addHandler(handler)
    try:
        result = store_series(
            series.files,
            StorePeer(PEER_AE, "127.0.0.1", port),
            attempts=3,
            backoff_s=0.5,
            timeout_s=TIMEOUT_S,
        )
    finally:
        store_logger.removeHandler(handler)
        if not continued.is_set():
            os.kill(process, signal.SIGCONT)
    assert continued.is_set()
    assert result.attempts >= 2 and result.stored == len(series.files)
    assert sorted(received(folder)) == sorted(series.sop_instance_uids)
    assert (
        "attempt 1 of 3: the peer accepted the connection but did not answer the association request within 1 s"
        in caplog.text
    )


def test_a_peer_that_stops_answering_mid_series_is_given_up_and_what_it_confirmed_is_not_sent_again(
    series: WrittenSeries,
) -> None:
    with scp(hang_at=3) as (port, stored):
        with pytest.raises(StoreError) as caught:
            store_series(
                series.files,
                StorePeer(PEER_AE, "127.0.0.1", port),
                attempts=2,
                backoff_s=0.01,
                timeout_s=TIMEOUT_S,
            )
        assert sorted(stored) == sorted(series.sop_instance_uids[:3])
    error = caught.value
    assert (error.stored, error.failed) == (3, len(series.files) - 3)
    assert "CT0004.dcm: no C-STORE response (no answer within 1 s, or the link dropped)" in error.reasons[0]


def _children() -> list[int]:
    own = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == own:
                pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


# --------------------------------------------------------------------------------- the DICOM stage's backlog


def test_a_series_beyond_the_store_backlog_is_reported_not_sent_and_stays_on_disk(tmp_path: Path) -> None:
    """The store stage's inbox is offered to, never waited on: a full backlog costs the new series its C-STORE
    (said so, counted), never the engine its pace."""
    case = small_case()
    mr = export_mr(case, tmp_path / "mr", OutputFormat.CLASSIC)
    volume = sct_volume(case, mr.paths)
    events: list[StatusEvent] = []
    stored: list[str] = []
    offered: list[DicomStoreRequest] = []
    peer = f"{PEER_AE}@127.0.0.1:{free_port()}"

    def full_inbox(request: DicomStoreRequest) -> bool:
        offered.append(request)
        return False

    output = DicomPublisher(
        DicomConfig(folder=tmp_path / "dicom", store_peer=peer),
        events.append,
        on_stored=stored.append,
        forward_store=full_inbox,
    )
    output.handle(volume)
    write, store = events
    assert (write.body["ok"], write.body["step"]) == (True, "write")
    assert store.kind == StatusKind.DICOM and store.acquisition_id == volume.acquisition_id
    assert (store.body["ok"], store.body["step"]) == (False, "store")
    folder_name = write.body["series_folder"]
    assert store.body["message"] == (
        f"C-STORE to {peer}: not sent, {STORE_BACKLOG} series already waiting for the peer; the series stays in "
        f"{folder_name} (sct-agent resend sends it later)"
    )
    assert stored == ["failed"]
    (request,) = offered
    assert request.series_folder == folder_name and len(request.files) == case.geometry.shape[0]
    assert all(path.is_file() for path in request.files)


def test_the_dicom_stage_gives_a_hung_peer_store_timeout_s_per_attempt_and_keeps_the_series(
    tmp_path: Path,
) -> None:
    case = small_case()
    mr = export_mr(case, tmp_path / "mr", OutputFormat.CLASSIC)
    volume = sct_volume(case, mr.paths)
    events: list[StatusEvent] = []
    with silent_peer() as (port, accepted):
        peer = f"{PEER_AE}@127.0.0.1:{port}"
        config = DicomConfig(
            folder=tmp_path / "dicom",
            store_peer=peer,
            store_attempts=2,
            store_backoff_s=0.01,
            store_timeout_s=1,
        )
        DicomPublisher(config, events.append).handle(volume)  # returns: reported, not raised
        assert len(accepted) == 2
    write, store = events
    assert (store.body["ok"], store.body["step"]) == (False, "store")
    hang = "the peer accepted the connection but did not answer the association request within 1 s"
    assert store.body["message"] == (
        f"C-STORE to {peer}: {case.geometry.shape[0]} of {case.geometry.shape[0]} instances not stored after 2 "
        f"attempts (attempt 1: {hang}; attempt 2: {hang}); the series stays in {write.body['series_folder']}"
    )
    assert (
        len(list((tmp_path / "dicom" / str(write.body["series_folder"])).glob("*.dcm")))
        == case.geometry.shape[0]
    )


# --------------------------------------------------------------------------------------------- in the agent


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shared")
    return write_small_model(root / "model"), write_test_protocol(root / "protocols")


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return small_series(SERIES_SEED)


@pytest.mark.slow
def test_a_hung_peer_holds_only_the_store_stage_the_next_series_is_written_and_published_meanwhile(
    tmp_path: Path, shared: tuple[Path, Path], case: PhantomCase
) -> None:
    """The peer hangs longer than two series take; the second series is written and published while the first
    one's C-STORE still waits. When the peer's process dies, both stores end failed, naming the peer, and both
    series stay on disk."""
    model, protocols = shared
    port = free_port()
    peer = f"{PEER_AE}@127.0.0.1:{port}"
    config = agent_config(tmp_path, protocols, model, quiet_period_s=3.0)
    dicom_folder = config.dicom.folder
    assert dicom_folder is not None
    config = replace(
        config,
        dicom=replace(
            config.dicom, store_peer=peer, store_attempts=2, store_backoff_s=0.1, store_timeout_s=600
        ),
    )
    slices = case.geometry.shape[0]
    with (
        AgentService(config) as agent,
        recording(agent.endpoints.publish, agent.endpoints.snapshot) as recorder,
    ):
        url = agent.endpoints.metrics_url
        assert url is not None

        def dicom(step: str) -> list[dict[str, object]]:
            return [dict(s.body) for s in recorder.statuses("dicom") if s.body["step"] == step]

        with silent_peer(port) as (_, accepted):
            export_case(case, ExportOptions(out_dir=config.watch.folder / "first", rate_files_per_s=300.0))
            recorder.wait("the first series written", lambda: len(dicom("write")) == 1)
            recorder.wait("its C-STORE connected to the hung peer", lambda: len(accepted) == 1)
            export_case(case, ExportOptions(out_dir=config.watch.folder / "second", rate_files_per_s=300.0))
            recorder.wait("the second series written", lambda: len(dicom("write")) == 2)
            recorder.wait("the second volume published", lambda: recorder.volume_count() == 2)
            assert dicom("store") == [], "the first C-STORE cannot have ended: the peer never answered"
            assert metric(scrape(url), 'sct_agent_queue_depth{queue="dicom_store"}') == 1
            assert agent.healthy()
        # The peer's process dies: its connection closes and nothing listens any more.
        recorder.wait("both C-STOREs given up", lambda: len(dicom("store")) == 2)
        folders = [str(w["series_folder"]) for w in dicom("write")]
        for failure, folder in zip(dicom("store"), folders, strict=True):
            assert failure["ok"] is False and failure["series_folder"] == folder
            message = str(failure["message"])
            assert message.startswith(
                f"C-STORE to {peer}: {slices} of {slices} instances not stored after 2 attempts"
            )
            assert message.endswith(f"; the series stays in {folder}")
            assert len(list((dicom_folder / folder).glob("*.dcm"))) == slices
        text = scrape(url)
        assert metric(text, 'sct_agent_dicom_store_total{outcome="failed"}') == 2
        assert metric(text, 'sct_agent_dicom_series_total{outcome="written"}') == 2
        assert metric(text, "sct_agent_volumes_published_total") == 2
        assert agent.healthy()
