"""DICOM C-STORE receive, as a scanner uses it: dcmtk's storescu and echoscu (real processes) and a pynetdicom
SCU push simulated and real series to a running agent, which must judge them and infer them exactly as it does
a folder export of the same files; refused AE titles, addresses and lossy transfer syntaxes; an association
aborted mid-series and finished by another; a full disk answered with "out of resources"; a restart that finds
received files already on disk.

One agent runs for the module (its start-up warms the engine); the series are the small test field of view.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from agent_support import agent_config, write_test_model, write_test_protocol
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGExtended12Bit, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from real_dicom_support import PHILIPS_CLASSIC, PHILIPS_ENHANCED, series_files, shared_dicom
from scanner_support import Identity, restamp
from small_filesystem import fill, in_private_mounts, mount_tmpfs
from test_agent_e2e import RunningAgent, metric, running_agent, simulate_case

from agent.cli import check
from agent.ingest.received_folder import PARTIAL_SUFFIX
from agent.ingest.store_scp import (
    STATUS_OUT_OF_RESOURCES,
    StoreScp,
    accepted_transfer_syntaxes,
)
from agent.ingest.transfer_syntax import LOSSLESS_COMPRESSED
from agent.ops.config import ConfigError, ReceiveConfig
from agent.ops.config_loader import load_config
from agent.ops.metrics import AgentMetrics
from agent.ops.retention import RECEIVED_SETTLE_S, prune_received
from agent.records import ArrivedFile
from agent.vocabulary import ArrivalSource, PageState
from engines.phantom.case import PhantomCase
from engines.scanner.export import ExportOptions, export_case

STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")
DCMCJPEG = shutil.which("dcmcjpeg")
needs_dcmtk = pytest.mark.skipif(
    None in (STORESCU, ECHOSCU, DCMCJPEG), reason="dcmtk (storescu, echoscu, dcmcjpeg) is not installed"
)
#: The calling AE titles the module's agent lets in: dcmtk's defaults and this module's pynetdicom SCU.
SCANNER_AE = "MR_CONSOLE"
ALLOWED_AE = ("STORESCU", "ECHOSCU", SCANNER_AE)
#: dcmtk leaves Nagle's algorithm on unless told; each small PDU would then wait for a delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SEED_STORESCU = 910301
SEED_ABORTED = 910302


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    root = tmp_path_factory.mktemp("receive")
    protocols = write_test_protocol(root / "protocols")
    model = write_test_model(root / "model")
    base = agent_config(root, protocols, model, quiet_period_s=3.0)
    config = replace(
        base,
        receive=ReceiveConfig(
            listen="127.0.0.1:0",
            ae_title="SCT_AGENT",
            allowed_calling_ae_titles=ALLOWED_AE,
            allowed_addresses=("127.0.0.1/32", "::1"),
        ),
    )
    with running_agent(config, model) as running:
        yield running


def address(agent: RunningAgent) -> tuple[str, int]:
    """(host, port) of the agent's storage SCP, from its "AE@host:port" endpoint."""
    endpoint = agent.pipeline.endpoints.receive
    assert endpoint.startswith("SCT_AGENT@"), endpoint
    host, port = endpoint.split("@", 1)[1].rsplit(":", 1)
    return host, int(port)


def storescu(
    agent: RunningAgent, *files_or_folders: Path, calling: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    host, port = address(agent)
    assert STORESCU is not None
    return subprocess.run(
        [STORESCU, "-aet", calling, "-aec", "SCT_AGENT", "+sd", host, str(port), *map(str, files_or_folders)],
        capture_output=True,
        text=True,
        timeout=120,
        env=DCMTK_ENV,
        check=False,
    )


def scu(calling: str = SCANNER_AE) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4.1", [ExplicitVRLittleEndian])  # Enhanced MR
    ae.add_requested_context(Verification)
    return ae


def send(agent: RunningAgent, files: list[Path], *, abort_after: int | None = None) -> list[int]:
    """C-STORE ``files`` on one pynetdicom association; the statuses; ``abort_after`` aborts it after that many."""
    host, port = address(agent)
    association = scu().associate(host, port, ae_title="SCT_AGENT")
    assert association.is_established
    statuses: list[int] = []
    try:
        for index, path in enumerate(files):
            if abort_after is not None and index == abort_after:
                association.abort()
                return statuses
            status = association.send_c_store(pydicom.dcmread(path))
            statuses.append(int(status.Status))
    finally:
        if association.is_established:
            association.release()
    return statuses


def export(case: PhantomCase, folder: Path) -> list[Path]:
    export_case(case, ExportOptions(out_dir=folder))
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def counted(agent: RunningAgent, name: str) -> float:
    return metric(agent.metrics_text(), name)


# ------------------------------------------------------------------------------------------ simulated series


@needs_dcmtk
def test_storescu_series_gets_the_verdict_and_sct_of_the_same_files_exported_to_the_folder(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """The same simulated series twice: once pushed by storescu, once (with other UIDs, so it is a new
    acquisition) copied into the export folder. Both pass, and their sCT volumes are identical byte for byte."""
    sent = export(simulate_case(SEED_STORESCU), tmp_path / "sent")
    copy = restamp(
        sent,
        tmp_path / "copy",
        Identity("COPY", "FOLDER", "C-1", "19700101", "A-1", "2.25.4242"),
        file_name=lambda i: f"IM{i:04d}.dcm",
        uids={},
    )
    stored_before = counted(agent, 'sct_agent_receive_instances_total{outcome="stored"}')
    volumes = len(agent.listener.volumes)
    done = storescu(agent, tmp_path / "sent")
    assert done.returncode == 0, done.stderr
    shutil.copytree(tmp_path / "copy", agent.export / "copy")
    agent.listener.wait(lambda listener: len(listener.volumes) >= volumes + 2)
    received, exported = agent.listener.volumes[volumes:]
    by_source = {v.acquisition_id: v for v in (received, exported)}
    assert len(by_source) == 2
    assert received.sha256 == exported.sha256
    for volume in (received, exported):
        verdict = agent.listener.final_verdict(volume.acquisition_id)
        assert verdict is not None and verdict.body["outcome"] == "pass"
        assert verdict.body["ended_by"] == "count"
    assert counted(agent, 'sct_agent_receive_instances_total{outcome="stored"}') == stored_before + len(sent)
    assert len(copy) == len(sent)
    # The technologist's page shows the pushed series like the exported one, and where the scanner sends to.
    page_url = agent.pipeline.endpoints.page_url
    with urllib.request.urlopen(page_url + "state.json", timeout=10) as response:
        state = json.load(response)
    assert state["agent"]["receive"] == agent.pipeline.endpoints.receive
    cards = {card["acquisition_id"]: card for card in state["acquisitions"]}
    for volume in (received, exported):
        card = cards[volume.acquisition_id]
        assert card["state"] == PageState.PUBLISHED and card["verdict"]["outcome"] == "pass", card
        assert card["images_received"] == card["images_expected"] == len(sent), card
    # On disk: one folder per series, files named by digests, nothing half-written, the bytes as sent.
    folders = list((agent.config.received_folder).iterdir())
    assert folders and all(len(f.name) == 16 for f in folders)
    names = {p.name for f in folders for p in f.iterdir()}
    assert not any(n.endswith(PARTIAL_SUFFIX) for n in names)
    assert not any("2.25" in n or "MR." in n for n in names)


def test_association_aborted_mid_series_is_finished_by_a_second_one(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """A console whose association dies halfway sends the rest (and, as consoles do, the last few again) on a
    new one: one acquisition, completed by its counts, one volume, the repeats counted as duplicates."""
    files = export(simulate_case(SEED_ABORTED), tmp_path / "series")
    half = len(files) // 2
    volumes = len(agent.listener.volumes)
    duplicates = counted(agent, 'sct_agent_files_total{outcome="duplicate"}')
    first = send(agent, files, abort_after=half)
    assert first == [0] * half
    agent.listener.wait(lambda listener: any(s.kind == "verdict" for s in listener.statuses[-50:]))
    second = send(agent, files[half - 3 :])
    assert second == [0] * (len(files) - half + 3)
    agent.listener.wait(lambda listener: len(listener.volumes) > volumes)
    acquisition = agent.listener.volumes[volumes].acquisition_id
    verdict = agent.listener.final_verdict(acquisition)
    assert verdict is not None and verdict.body["outcome"] == "pass" and verdict.body["ended_by"] == "count"
    assert counted(agent, 'sct_agent_files_total{outcome="duplicate"}') == duplicates + 3
    time.sleep(0.5)
    assert len(agent.listener.volumes) == volumes + 1


# ------------------------------------------------------------------------------------------- real series


def test_real_philips_series_get_the_verdicts_a_folder_export_gets(agent: RunningAgent) -> None:
    """The real Philips dual-echo scan, classic and Enhanced, sent by a pynetdicom SCU: each acquisition's final
    verdict on the wire has the outcome and the reasons `sct-agent check` gives for the same files on disk."""
    root = shared_dicom()
    expected = {
        a.view.acquisition_id: a
        for a in check.check_path(root / "dcm_qa_philips_enh", agent.pipeline.protocols).acquisitions
        if {Path(f).name for f in a.folders} & {Path(PHILIPS_CLASSIC).name, Path(PHILIPS_ENHANCED).name}
    }
    assert len(expected) == 2
    for folder in (PHILIPS_CLASSIC, PHILIPS_ENHANCED):
        statuses = send(agent, series_files(folder))
        assert statuses and all(s == 0 for s in statuses)
    agent.listener.wait(lambda listener: all(listener.final_verdict(a) is not None for a in expected))
    for acquisition_id, checked in expected.items():
        wire = agent.listener.final_verdict(acquisition_id)
        assert wire is not None
        on_disk = next(v for v in checked.verdicts if v.protocol_id == wire.body["protocol_id"])
        assert wire.body["outcome"] == on_disk.outcome.value == "reject"
        assert {(r["attribute"], r["found"]) for r in wire.body["reasons"]} == {
            (r.attribute, r.found) for r in on_disk.reasons
        }
        assert wire.body["slices_per_echo"] == [53, 53]


# --------------------------------------------------------------------------------------------- refusals


@needs_dcmtk
def test_a_calling_ae_title_not_on_the_list_is_refused_logged_and_counted(
    agent: RunningAgent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = export(simulate_case(SEED_STORESCU + 10), tmp_path / "s")[:2]
    before = counted(agent, 'sct_agent_receive_associations_total{outcome="refused_calling_ae_title"}')
    with caplog.at_level(logging.WARNING, logger="agent.ingest.store_scp"):
        done = storescu(agent, *files, calling="INTRUDER")
    assert done.returncode != 0
    assert "Calling AE Title Not Recognized" in done.stderr
    assert (
        counted(agent, 'sct_agent_receive_associations_total{outcome="refused_calling_ae_title"}')
        == before + 1
    )
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("'INTRUDER'" in line and "allowed_calling_ae_titles" in line for line in lines)
    # Nothing of a refused association reaches the disk: no line names a patient, a UID or a file.
    assert not any("2.25." in line for line in lines)


def test_an_address_not_on_the_list_is_refused(agent: RunningAgent) -> None:
    """127.0.0.2 is this machine too, but not on the agent's list (127.0.0.1/32, ::1)."""
    host, port = address(agent)
    before = counted(agent, 'sct_agent_receive_associations_total{outcome="refused_address"}')
    association = scu().associate(host, port, ae_title="SCT_AGENT", bind_address=("127.0.0.2", 0))
    assert association.is_rejected
    assert association.acceptor.primitive is not None
    assert (association.acceptor.primitive.result, association.acceptor.primitive.diagnostic) == (0x01, 0x01)
    assert counted(agent, 'sct_agent_receive_associations_total{outcome="refused_address"}') == before + 1


def test_a_wrong_called_ae_title_is_refused(agent: RunningAgent) -> None:
    host, port = address(agent)
    association = scu().associate(host, port, ae_title="PACS")
    assert association.is_rejected
    assert association.acceptor.primitive is not None and association.acceptor.primitive.diagnostic == 0x07


@needs_dcmtk
def test_c_echo_from_echoscu_and_pynetdicom(agent: RunningAgent) -> None:
    host, port = address(agent)
    assert ECHOSCU is not None
    done = subprocess.run(
        [ECHOSCU, "-aec", "SCT_AGENT", host, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    association = scu().associate(host, port, ae_title="SCT_AGENT")
    try:
        assert int(association.send_c_echo().Status) == 0
    finally:
        association.release()


@needs_dcmtk
def test_a_lossy_transfer_syntax_is_refused_at_association_time(
    agent: RunningAgent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A JPEG lossy image (dcmcjpeg, 12-bit extended) is never stored: storescu is offered uncompressed only and
    cannot convert it, so it sends nothing; a pynetdicom SCU offering only that syntax sees the context refused
    (transfer syntaxes not supported). The agent logs which SOP class was offered in what, and why."""
    source = export(simulate_case(SEED_STORESCU + 20), tmp_path / "s")[0]
    lossy = tmp_path / "lossy.dcm"
    assert DCMCJPEG is not None
    subprocess.run([DCMCJPEG, "+ee", str(source), str(lossy)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(lossy).file_meta.TransferSyntaxUID == JPEGExtended12Bit
    before = counted(agent, 'sct_agent_receive_contexts_refused_total{reason="transfer_syntax"}')
    stored = counted(agent, 'sct_agent_receive_instances_total{outcome="stored"}')
    with caplog.at_level(logging.WARNING, logger="agent.ingest.store_scp"):
        done = storescu(agent, lossy)
    # storescu offers the file's syntax and uncompressed ones; the agent takes uncompressed, and storescu (like
    # a console that cannot undo lossy compression) cannot convert the image, so it sends nothing.
    assert done.returncode != 0
    assert "unable to convert" in done.stderr
    host, port = address(agent)
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(MRImageStorage, [JPEGExtended12Bit])
    association = ae.associate(host, port, ae_title="SCT_AGENT")
    # Nothing accepted: pynetdicom's requestor aborts the association itself.
    assert not association.is_established
    assert [cx.result for cx in association.rejected_contexts] == [0x04]
    assert counted(agent, 'sct_agent_receive_contexts_refused_total{reason="transfer_syntax"}') == before + 1
    assert counted(agent, 'sct_agent_receive_instances_total{outcome="stored"}') == stored
    assert any(
        "lossy compression" in r.getMessage() and "MR Image Storage" in r.getMessage() for r in caplog.records
    )


# ------------------------------------------------------------------------------ the SCP alone, on real sockets


def _scp(folder: Path, sink: list[ArrivedFile], **config: object) -> StoreScp:
    settings = ReceiveConfig(listen="127.0.0.1:0", **config)  # type: ignore[arg-type]
    return StoreScp(settings, folder, sink.append, AgentMetrics())


def _store(scp: StoreScp, files: list[Path]) -> list[Dataset]:
    host, port = scp.address
    association = scu().associate(host, port, ae_title="SCT_AGENT")
    assert association.is_established
    try:
        return [association.send_c_store(pydicom.dcmread(p)) for p in files]
    finally:
        association.release()


def test_low_free_space_is_answered_out_of_resources_and_nothing_is_handed_over(tmp_path: Path) -> None:
    files = export(simulate_case(SEED_STORESCU + 30), tmp_path / "s")[:2]
    got: list[ArrivedFile] = []
    scp = StoreScp(
        ReceiveConfig(listen="127.0.0.1:0", min_free_mb=100.0),
        tmp_path / "received",
        got.append,
        AgentMetrics(),
        free_bytes=lambda: 5_000_000,
    )
    scp.start()
    try:
        statuses = _store(scp, files)
    finally:
        scp.stop()
    assert [int(s.Status) for s in statuses] == [STATUS_OUT_OF_RESOURCES] * 2
    assert "retry" in str(statuses[0].ErrorComment)
    assert got == [] and not any(p.is_file() for p in (tmp_path / "received").rglob("*"))


def test_a_full_disk_is_answered_out_of_resources_and_leaves_no_partial_file(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A real full filesystem (tmpfs): the write fails with ENOSPC, the scanner gets 0xA700, no success for an
    image not on disk, and no temporary file is left behind; once there is room the same image is stored."""
    if not in_private_mounts(request, tmp_path):
        return
    files = export(simulate_case(SEED_STORESCU + 40), tmp_path / "s")[:1]
    disk = mount_tmpfs(tmp_path / "disk", 4_000_000)
    ballast = fill(disk, leave_bytes=4096)
    got: list[ArrivedFile] = []
    scp = StoreScp(
        ReceiveConfig(listen="127.0.0.1:0", min_free_mb=0.0), disk / "received", got.append, AgentMetrics()
    )
    scp.start()
    try:
        refused = _store(scp, files)
        ballast.unlink()
        stored = _store(scp, files)
    finally:
        scp.stop()
    assert int(refused[0].Status) == STATUS_OUT_OF_RESOURCES and "full" in str(refused[0].ErrorComment)
    assert int(stored[0].Status) == 0
    assert len(got) == 1 and got[0].source is ArrivalSource.RECEIVED
    assert [p.name for p in got[0].path.parent.iterdir()] == [got[0].path.name]


def test_files_received_before_a_restart_are_handed_over_at_start(tmp_path: Path) -> None:
    """The agent stopped mid-series: at the next start the received files go to the assembler again (start-up
    scan), oldest first, byte for byte as received; what a crash left half-written is removed."""
    files = export(simulate_case(SEED_STORESCU + 50), tmp_path / "s")[:4]
    first: list[ArrivedFile] = []
    folder = tmp_path / "received"
    scp = _scp(folder, first)
    scp.start()
    try:
        assert all(int(s.Status) == 0 for s in _store(scp, files))
    finally:
        scp.stop()
    leftover = first[0].path.parent / f".x.dcm.1-2{PARTIAL_SUFFIX}"
    leftover.write_bytes(b"half")
    again: list[ArrivedFile] = []
    scp = _scp(folder, again)
    scp.start()
    try:
        deadline = time.monotonic() + 10
        while len(again) < len(files) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scp.stop()
    assert [a.path for a in again] == [a.path for a in first]
    assert all(a.source is ArrivalSource.STARTUP_SCAN for a in again)
    assert not leftover.exists()
    for arrived, source in zip(first, files, strict=True):
        received, original = pydicom.dcmread(arrived.path), pydicom.dcmread(source)
        assert received.SOPInstanceUID == original.SOPInstanceUID
        assert received.PixelData == original.PixelData
        assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert received.file_meta.SourceApplicationEntityTitle == SCANNER_AE


def test_accepted_transfer_syntaxes_are_what_the_reader_reads() -> None:
    accepted = accepted_transfer_syntaxes()
    assert accepted[0] == ExplicitVRLittleEndian
    assert all(not uid.is_compressed or uid in LOSSLESS_COMPRESSED for uid in accepted)
    assert JPEGExtended12Bit not in accepted


def test_retention_prunes_received_series_by_age_but_never_a_recent_one(tmp_path: Path) -> None:
    now = time.time()
    for name, age_s in (("old", 10 * 86_400), ("recent", RECEIVED_SETTLE_S / 2)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "a.dcm").write_bytes(b"x" * 1000)
        os.utime(folder, (now - age_s, now - age_s))
    report = prune_received(tmp_path, max_age_s=86_400, max_bytes=1, now=now)
    assert (report.removed, report.kept) == (1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recent"]


# ----------------------------------------------------------------------------------------------- config


def test_receive_off_loopback_needs_an_allow_list() -> None:
    with pytest.raises(ConfigError, match=r"receive\.allowed_addresses"):
        ReceiveConfig(listen="0.0.0.0:11112")
    assert ReceiveConfig(listen="0.0.0.0:11112", allowed_addresses=("10.20.1.0/24",)).enabled
    assert ReceiveConfig(listen="127.0.0.1:11112").loopback


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"allowed_addresses": ("scanner.example",)}, "receive.allowed_addresses"),
        ({"ae_title": "A_TITLE_LONGER_THAN_16"}, "receive.ae_title"),
        ({"allowed_calling_ae_titles": ("BAD\\AE",)}, "receive.allowed_calling_ae_titles"),
        ({"max_pdu_bytes": 100}, "receive.max_pdu_bytes"),
        ({"listen": "11112"}, "receive.listen"),
    ],
)
def test_bad_receive_values_name_their_key(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ReceiveConfig(**changes)  # type: ignore[arg-type]
    assert raised.value.attribute == key


def test_receive_lists_come_from_the_environment() -> None:
    config = load_config(
        environ={
            "SCT_AGENT_RECEIVE_LISTEN": "0.0.0.0:11112",
            "SCT_AGENT_RECEIVE_ALLOWED_ADDRESSES": "10.20.1.15, 10.20.2.0/24",
            "SCT_AGENT_RECEIVE_ALLOWED_CALLING_AE_TITLES": "MR_CONSOLE1,MR_CONSOLE2",
        }
    )
    assert config.receive.allowed_addresses == ("10.20.1.15", "10.20.2.0/24")
    assert config.receive.allowed_calling_ae_titles == ("MR_CONSOLE1", "MR_CONSOLE2")
    assert config.received_folder == config.state.folder / "received"
