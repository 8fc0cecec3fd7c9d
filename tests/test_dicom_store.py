"""C-STORE of a written sCT series, against dcmtk's storescp on loopback (and one scripted pynetdicom SCP).

Timing never decides an outcome: the late-peer test starts storescp only after the agent has logged its first
failed attempt and leaves several generous backoffs for it to come up; the other tests do not depend on time.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
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

from agent.dicom_out.c_store import StoreError, StorePeer, StoreResult, store_series
from agent.dicom_out.sct_series import WrittenSeries, write_sct_series
from engines.scanner.export import OutputFormat

#: pynetdicom 3.0.4 leaves the socket of a refused connection unclosed (its shutdown() fails on the unconnected
#: socket and close() is skipped; pynetdicom issue #979, fixed upstream by PR #999). Python closes it on garbage
#: collection with a ResourceWarning, which this project's "error" filter would turn into a failure.
pytestmark = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    root = tmp_path_factory.mktemp("store")
    case = small_case()
    mr = export_mr(case, root / "mr", OutputFormat.CLASSIC)
    return write_sct_series(sct_volume(case, mr.paths), root / "sct")


def assert_arrived_intact(series: WrittenSeries, folder: Path) -> None:
    arrived = received(folder)
    assert sorted(arrived) == sorted(series.sop_instance_uids)
    for path in series.files:
        sent = pydicom.dcmread(path)
        got = arrived[str(sent.SOPInstanceUID)]
        assert got.SOPClassUID == CTImageStorage
        assert got.SeriesInstanceUID == series.series_instance_uid
        assert got.PixelData == sent.PixelData, path.name


# ------------------------------------------------------------------------------------------------ peers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@10.0.0.5:104", StorePeer("PACS", "10.0.0.5", 104)),
        ("NAV_SYS1@nav.example.org:11112", StorePeer("NAV_SYS1", "nav.example.org", 11112)),
        ("SCTPACS@[::1]:4242", StorePeer("SCTPACS", "::1", 4242)),
    ],
)
def test_peer_parses_aet_at_host_colon_port(text: str, expected: StorePeer) -> None:
    peer = StorePeer.parse(text)
    assert peer == expected
    assert StorePeer.parse(str(peer)) == peer


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PACS", r"DICOM peer 'PACS': expected the form AET@host:port"),
        ("PACS@host", r"DICOM peer 'PACS@host': expected the form AET@host:port"),
        ("@host:104", r"DICOM peer '@host:104': expected the form AET@host:port"),
        ("PACS@host:port", r"DICOM peer 'PACS@host:port': expected the form AET@host:port"),
        ("PACS@host:0", r"DICOM peer port 0: expected 1 to 65535"),
        ("PACS@host:70000", r"DICOM peer port 70000: expected 1 to 65535"),
        ("A_TITLE_LONGER_THAN_16@host:104", r"AE title 'A_TITLE_LONGER_THAN_16': expected 1 to 16"),
    ],
)
def test_peer_refuses_other_forms_naming_the_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StorePeer.parse(text)


# ------------------------------------------------------------------------------------------------ store


@needs_storescp
def test_every_file_arrives_with_its_uids_and_pixels(series: WrittenSeries, storescp: StartStorescp) -> None:
    port = free_port()
    folder = storescp(port)
    result = store_series(series.files, StorePeer(PEER_AE, "127.0.0.1", port), attempts=1, timeout_s=30)
    assert (result.stored, result.failed, result.attempts) == (len(series.files), 0, 1)
    assert result.peer == StorePeer(PEER_AE, "127.0.0.1", port)
    assert_arrived_intact(series, folder)


class _FirstFailure(logging.Handler):
    """Signals the agent's log line for its first failed attempt."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "attempt 1 of" in record.getMessage():
            self.seen.set()


@needs_storescp
def test_a_peer_that_comes_up_late_gets_the_series_on_a_retry(
    series: WrittenSeries, storescp: StartStorescp
) -> None:
    port = free_port()
    peer = StorePeer(PEER_AE, "127.0.0.1", port)
    outcome: dict[str, StoreResult | BaseException] = {}

    def send() -> None:
        try:
            # Backoffs 0.2, 0.4, ... 12.8 s: storescp has about 25 s to come up after the first failure.
            outcome["result"] = store_series(series.files, peer, attempts=8, backoff_s=0.2, timeout_s=30)
        except BaseException as error:
            outcome["error"] = error

    watcher = _FirstFailure()
    store_logger = logging.getLogger("agent.dicom_out.c_store")
    store_logger.addHandler(watcher)
    sender = threading.Thread(target=send, name="store-series")
    try:
        sender.start()
        assert watcher.seen.wait(timeout=60), "no failed first attempt was logged"
        folder = storescp(port)
        sender.join(timeout=120)
        assert not sender.is_alive()
    finally:
        store_logger.removeHandler(watcher)
        sender.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, StoreResult)
    assert result.attempts >= 2
    assert (result.stored, result.failed) == (len(series.files), 0)
    assert_arrived_intact(series, folder)


def test_a_peer_that_never_appears_gives_store_error_after_the_attempts(series: WrittenSeries) -> None:
    peer = StorePeer(PEER_AE, "127.0.0.1", free_port())
    with pytest.raises(StoreError) as caught:
        store_series(series.files, peer, attempts=3, backoff_s=0.01, timeout_s=5)
    error = caught.value
    assert (error.attempts, error.stored, error.failed) == (3, 0, len(series.files))
    assert error.peer == peer
    assert str(peer) in str(error)
    assert f"{len(series.files)} of {len(series.files)} instances not stored after 3 attempts" in str(error)
    assert "attempt 3: no connection (refused" in str(error)


@needs_storescp
def test_a_peer_that_refuses_the_association_gives_store_error(
    series: WrittenSeries, storescp: StartStorescp
) -> None:
    port = free_port()
    storescp(port, "--refuse")
    with pytest.raises(
        StoreError,
        match=r"not stored after 2 attempts \(attempt 1: association rejected \(Rejected \(Permanent\), source DUL "
        r"service-user: No reason given\); attempt 2: association rejected",
    ):
        store_series(series.files, StorePeer(PEER_AE, "127.0.0.1", port), attempts=2, backoff_s=0.01)


@needs_storescp
def test_a_peer_that_aborts_mid_series_gives_store_error(
    series: WrittenSeries, storescp: StartStorescp
) -> None:
    port = free_port()
    storescp(port, "--abort-after")
    with pytest.raises(
        StoreError, match=r"not stored after 2 attempts.*CT0001\.dcm: no C-STORE response"
    ) as caught:
        store_series(series.files, StorePeer(PEER_AE, "127.0.0.1", port), attempts=2, backoff_s=0.01)
    assert caught.value.failed == len(series.files)


def test_only_the_instances_that_failed_are_sent_again(series: WrittenSeries) -> None:
    """A scripted pynetdicom SCP answers 0xA700 (out of resources) to one instance, the first time only."""
    victim = series.sop_instance_uids[3]
    calls: Counter[str] = Counter()
    pixels: dict[str, bytes] = {}

    def handle_store(event: evt.Event) -> int:
        dataset = event.dataset
        uid = str(dataset.SOPInstanceUID)
        calls[uid] += 1
        if uid == victim and calls[uid] == 1:
            return 0xA700
        pixels[uid] = dataset.PixelData
        return 0x0000

    ae = AE(ae_title=PEER_AE)
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None
    try:
        port = server.server_address[1]
        assert isinstance(port, int)
        result = store_series(series.files, StorePeer(PEER_AE, "127.0.0.1", port), attempts=3, backoff_s=0.01)
    finally:
        server.shutdown()
    assert (result.stored, result.failed, result.attempts) == (len(series.files), 1, 2)
    assert calls[victim] == 2
    assert all(calls[uid] == 1 for uid in series.sop_instance_uids if uid != victim)
    assert sorted(pixels) == sorted(series.sop_instance_uids)
