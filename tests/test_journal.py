"""The state journal on real SQLite files in tmp_path: WAL, threads, restarts, and files it must refuse."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from journal_queries import JournalQueries

from agent.ops import metrics
from agent.ops.journal import (
    BUSY_TIMEOUT_S,
    FILE_OUTCOMES,
    JOURNAL_FILE_MODE,
    SCHEMA_VERSION,
    Journal,
    JournalConflictError,
    JournalError,
    JournalSchemaError,
)
from agent.records import Reason, Verdict
from agent.vocabulary import AcquisitionState, Outcome

ACQ = "a" * 16


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection, to see what is really in the file."""
    return sqlite3.connect(path)


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def journal(journal_path: Path) -> Iterator[Journal]:
    journal_path.parent.mkdir()
    with Journal(journal_path) as j:
        yield j


@pytest.fixture
def queries(journal: Journal) -> Iterator[JournalQueries]:
    """What is in the journal's file, read through a read-only connection of its own."""
    with JournalQueries(journal.path) as q:
        yield q


def test_new_journal_is_wal_with_normal_sync_busy_timeout_and_version(
    journal: Journal, journal_path: Path
) -> None:
    conn = raw(journal_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    # synchronous and busy_timeout are per connection: ask the journal's own.
    assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert journal._conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(BUSY_TIMEOUT_S * 1000)
    assert stat.S_IMODE(journal_path.stat().st_mode) == JOURNAL_FILE_MODE


def test_files_are_recorded_by_path_size_and_mtime(
    journal: Journal, queries: JournalQueries, tmp_path: Path
) -> None:
    f = tmp_path / "export" / "IM_0001.dcm"
    assert not queries.file_already_ingested(f, 1000, 5)
    journal.record_file(f, 1000, 5, "accepted", acquisition_id=ACQ, at=10.0)
    journal.record_file(tmp_path / "x.tmp", 3, 7, "skipped", "temporary name", at=11.0)
    assert queries.file_already_ingested(f, 1000, 5)
    assert not queries.file_already_ingested(f, 1001, 5)  # rewritten: another size
    assert not queries.file_already_ingested(f, 1000, 6)  # rewritten: another mtime
    record = queries.file_record(tmp_path / "x.tmp", 3, 7)
    assert record is not None
    assert (record.outcome, record.reason, record.acquisition_id, record.at) == (
        "skipped",
        "temporary name",
        None,
        11.0,
    )
    # Recording the same file again replaces its row rather than adding one.
    journal.record_file(f, 1000, 5, "duplicate", "SOPInstanceUID seen", acquisition_id=ACQ, at=12.0)
    again = queries.file_record(f, 1000, 5)
    assert again is not None and again.outcome == "duplicate"
    assert queries.summary()["files.duplicate"] == 1
    assert queries.summary()["files.accepted"] == 0
    assert queries.files_of(ACQ) == ()
    journal.record_file(f, 1000, 5, "accepted", acquisition_id=ACQ)
    assert queries.files_of(ACQ) == (f,)


def test_acquisition_updates_keep_fields_not_given(journal: Journal, queries: JournalQueries) -> None:
    assert queries.acquisition_state(ACQ) is None
    journal.record_acquisition(ACQ, "passed", first_image_at=100.0, last_image_at=100.5, at=100.5)
    assert queries.acquisition_state(ACQ) == "passed"
    assert queries.unfinished_acquisitions() == {ACQ}
    assert journal.finished_acquisitions() == set()
    journal.record_acquisition(
        ACQ, AcquisitionState.PUBLISHED, protocol_id="lumbar-dual-echo", last_image_at=104.0, at=105.0
    )
    record = queries.acquisition(ACQ)
    assert record is not None
    assert record.state is AcquisitionState.PUBLISHED
    assert (record.protocol_id, record.first_image_at, record.last_image_at, record.updated_at) == (
        "lumbar-dual-echo",
        100.0,
        104.0,
        105.0,
    )
    assert queries.acquisition_state(ACQ) == "published"
    assert queries.unfinished_acquisitions() == set()
    assert journal.finished_acquisitions() == {ACQ}
    for i, state in enumerate(["rejected", "incomplete", "published"]):
        journal.record_acquisition(f"done{i}", state)
    journal.record_acquisition("still-passed", "passed")
    assert journal.finished_acquisitions() == {ACQ, "done0", "done1", "done2"}
    assert queries.unfinished_acquisitions() == {"still-passed"}


def test_verdicts_round_trip(journal: Journal, queries: JournalQueries) -> None:
    provisional = Verdict(ACQ, "lumbar-dual-echo", "3", Outcome.PASS, False, (), ("EchoTime2",), 20.0)
    reason = Reason("lumbar-dual-echo", "RepetitionTime", "25.0 ms", "[5.0, 12.0] ms", "timing")
    final = Verdict(ACQ, "lumbar-dual-echo", "3", Outcome.REJECT, True, (reason,), (), 21.5)
    journal.record_verdict(provisional)
    journal.record_verdict(final)
    journal.record_verdict(Verdict("other", "p", "1", Outcome.INCOMPLETE, True, (), (), 22.0))
    assert queries.verdicts(ACQ) == (provisional, final)
    stored = raw_json_reasons(journal, final.decided_at)
    assert stored == [
        {
            "protocol_id": "lumbar-dual-echo",
            "attribute": "RepetitionTime",
            "found": "25.0 ms",
            "required": "[5.0, 12.0] ms",
            "category": "timing",
        }
    ]


def raw_json_reasons(journal: Journal, at: float) -> object:
    conn = raw(journal.path)
    try:
        text = conn.execute("SELECT reasons FROM verdicts WHERE at = ?", (at,)).fetchone()[0]
    finally:
        conn.close()
    return json.loads(text)


def test_slabs_recorded_when_published(journal: Journal, queries: JournalQueries) -> None:
    assert queries.published_slabs(ACQ) == {}
    assert queries.last_seq() is None
    assert journal.record_slab(ACQ, 0, start=0, size=32, sha256=sha("s0"), seq=7)
    assert journal.record_slab(ACQ, 1, 32, 32, sha("s1"), 8)
    journal.record_publication(ACQ, "slab", 7, sha("s0"), slab_index=0)
    journal.record_publication(ACQ, "slab", 8, sha("s1"), slab_index=1)
    assert queries.published_slabs(ACQ) == {0: sha("s0"), 1: sha("s1")}
    assert queries.published_slabs("other") == {}
    # The same slab again, same content: accepted as already known.
    assert not journal.record_slab(ACQ, 1, 32, 32, sha("s1"), 12)
    # The same slab with other content: refused, and nothing changes.
    with pytest.raises(JournalConflictError, match=r"slab 1 of acquisition a{16} was published as start 32"):
        journal.record_slab(ACQ, 1, 32, 32, sha("different"), 13)
    with pytest.raises(JournalConflictError, match=r"slab 1 of acquisition a{16} is recorded with sha256"):
        journal.record_publication(ACQ, "slab", 14, sha("different"), slab_index=1)
    assert queries.published_slabs(ACQ)[1] == sha("s1")
    assert queries.last_seq() == 8


def test_slabs_recorded_when_made_count_once_published(journal: Journal, queries: JournalQueries) -> None:
    # The engine records each slab as it is made; the publisher marks it when it goes out.
    assert journal.record_slab(ACQ, 0, 0, 16, sha("s0"))
    assert journal.record_slab(ACQ, 1, 16, 16, sha("s1"))
    assert queries.published_slabs(ACQ) == {}
    journal.record_publication(ACQ, "slab", 3, sha("s0"), slab_index=0)
    assert queries.published_slabs(ACQ) == {0: sha("s0")}
    # Made but never sent (the agent stopped): a restart may infer it again with other content.
    assert journal.record_slab(ACQ, 1, 16, 16, sha("s1 again"))
    assert not journal.record_slab(ACQ, 1, 16, 16, sha("s1 again"))
    # Without slab_index the hash finds the slab, but only when exactly one unpublished slab has it.
    journal.record_publication(ACQ, "slab", 4, sha("s1 again"))
    assert queries.published_slabs(ACQ) == {0: sha("s0"), 1: sha("s1 again")}
    air = sha("all air")
    journal.record_slab(ACQ, 2, 32, 16, air)
    journal.record_slab(ACQ, 3, 48, 16, air)
    journal.record_publication(ACQ, "slab", 5, air)  # ambiguous: marks neither
    assert 2 not in queries.published_slabs(ACQ) and 3 not in queries.published_slabs(ACQ)
    journal.record_publication(ACQ, "slab", 6, air, slab_index=3)
    assert queries.published_slabs(ACQ)[3] == air and 2 not in queries.published_slabs(ACQ)
    assert queries.summary()["slabs"] == 4


def test_a_volume_is_published_with_one_content_only(journal: Journal, queries: JournalQueries) -> None:
    assert queries.published_volume(ACQ) is None
    journal.record_publication(ACQ, "volume", 9, sha("v"))
    journal.record_publication(ACQ, "volume", 10, sha("v"))  # republished, same content
    with pytest.raises(JournalConflictError, match="the volume of acquisition"):
        journal.record_publication(ACQ, "volume", 11, sha("v2"))
    assert queries.published_volume(ACQ) == sha("v")
    assert queries.last_seq() == 10
    assert queries.summary()["publications"] == 2


MODEL = "sct-unet@1.0"


def test_a_volume_is_committed_once_per_model_and_its_dicom_series_finishes_it(journal: Journal) -> None:
    journal.record_acquisition(ACQ, "passed")
    assert journal.commit_volume(ACQ, MODEL, sha("v")) is None
    assert journal.finished_acquisitions() == {ACQ}  # committed is published, in the same transaction
    # A restart inferred it again: the first commit stands and is returned, whatever the new content.
    assert journal.commit_volume(ACQ, MODEL, sha("v")) == sha("v")
    assert journal.commit_volume(ACQ, MODEL, sha("other")) == sha("v")
    assert journal.committed_volume(ACQ, MODEL) == sha("v")
    assert journal.committed_volume(ACQ, "sct-unet@2.0") is None
    assert journal.finished_acquisitions(MODEL) == {ACQ}
    # With DICOM output on, the acquisition is finished only once its series is on disk.
    assert journal.finished_acquisitions(MODEL, dicom=True) == set()
    journal.record_dicom_series(ACQ, MODEL, sha("v"), "sct-aaaa-1001")
    assert journal.finished_acquisitions(MODEL, dicom=True) == {ACQ}
    # A commit lost to a full disk: the series on disk records its volume, and the acquisition is published.
    journal.record_acquisition("b" * 16, "passed")
    journal.record_dicom_series("b" * 16, MODEL, sha("b"), "sct-bbbb-1001")
    assert journal.committed_volume("b" * 16, MODEL) == sha("b")
    assert journal.finished_acquisitions(MODEL, dicom=True) == {ACQ, "b" * 16}
    assert "b" * 16 in journal.finished_acquisitions()


def test_a_cancelled_stream_is_forgotten_so_the_restarted_one_records_other_content(
    journal: Journal, queries: JournalQueries
) -> None:
    journal.record_slab(ACQ, 0, 0, 16, sha("old"))
    journal.record_publication(ACQ, "slab", 1, sha("old"), slab_index=0)
    with pytest.raises(JournalConflictError):
        journal.record_slab(ACQ, 0, 0, 16, sha("new"))
    journal.void_slabs(ACQ)  # the slice grid was placed again: subscribers were told to drop the slabs
    journal.record_slab(ACQ, 0, 0, 16, sha("new"))
    journal.record_slab(ACQ, 1, 16, 16, sha("new 1"))
    # The cancelled stream's slab 1, still queued at the cancel, goes out late: recorded, not refused.
    journal.record_publication(ACQ, "slab", 2, sha("old 1"), slab_index=1)
    journal.record_publication(ACQ, "slab", 3, sha("new"), slab_index=0)
    assert queries.published_slabs(ACQ) == {0: sha("new")}


def test_finished_acquisitions_for_a_model(journal: Journal) -> None:
    journal.record_acquisition("rejected", "rejected")
    journal.record_acquisition("incomplete", "incomplete")
    journal.record_acquisition("open", "passed")
    # Published by another model version, or before volumes were journalled: a model upgrade leaves it alone.
    journal.record_acquisition("old", "published")
    # Published, committed by this model, DICOM not written yet: not finished while DICOM is on.
    journal.record_acquisition("no-dicom", "published")
    journal.commit_volume("no-dicom", MODEL, sha("n"))
    assert journal.finished_acquisitions(MODEL) == {"rejected", "incomplete", "old", "no-dicom"}
    assert journal.finished_acquisitions(MODEL, dicom=True) == {"rejected", "incomplete", "old"}


def test_a_version_1_journal_is_migrated_keeping_its_rows(journal_path: Path) -> None:
    journal_path.parent.mkdir()
    with Journal(journal_path) as journal:
        journal.record_acquisition(ACQ, "published")
    conn = raw(journal_path)
    conn.execute("DROP TABLE volumes")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Journal(journal_path) as journal:
        assert journal.finished_acquisitions(MODEL, dicom=True) == {ACQ}
        assert journal.commit_volume("b" * 16, MODEL, sha("b")) is None
    conn = raw(journal_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


def test_a_version_2_journal_gains_the_flagged_columns_keeping_its_volumes(journal_path: Path) -> None:
    journal_path.parent.mkdir()
    with Journal(journal_path) as journal:
        journal.commit_volume(ACQ, MODEL, sha("v"))
    conn = raw(journal_path)  # as a version 2 agent left it: the volumes table without the confidence columns
    for column in ("flagged", "flagged_ml", "flagged_regions"):
        conn.execute(f"ALTER TABLE volumes DROP COLUMN {column}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Journal(journal_path) as journal:
        assert journal.committed_volume(ACQ, MODEL) == sha("v")
        assert journal.flagged(ACQ, MODEL) == (None, None, [])  # committed before: not checked
        region = {"index": 1, "slices": [40, 53], "volume_ml": 2.8}
        journal.record_flagged(ACQ, MODEL, flagged=1, volume_ml=2.8, regions=[region])
        assert journal.flagged(ACQ, MODEL) == (1, 2.8, [region])
        assert journal.flagged("never", MODEL) is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda j: j.record_file(Path("f"), 1, 1, "ok"),
            r"file outcome must be one of accepted, skipped, bad, duplicate",
        ),
        (
            lambda j: j.record_acquisition(ACQ, "done"),
            r"acquisition state must be one of passed, rejected, incomplete, published; got 'done'",
        ),
        # States no release wrote (the journal has no use for them): refused like any other name.
        (lambda j: j.record_acquisition(ACQ, "open"), r"acquisition state must be one of .*; got 'open'"),
        (lambda j: j.record_acquisition(ACQ, "failed"), r"acquisition state must be one of .*; got 'failed'"),
        (
            lambda j: j.record_publication(ACQ, "frame", 1, sha("x")),
            r"publication kind must be one of slab, volume",
        ),
        (
            lambda j: j.record_slab(ACQ, 0, start=0, size=8, sha256="abc", seq=1),
            r"sha256 must be 64 lower-case hex",
        ),
        (lambda j: j.record_slab(ACQ, 0, 0, 0, sha("x")), r"size > 0"),
    ],
)
def test_bad_values_are_refused_and_nothing_is_written(
    journal: Journal, queries: JournalQueries, call: Callable[[Journal], object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        call(journal)
    assert sum(queries.summary().values()) == 0


def test_four_threads_write_concurrently(journal: Journal, queries: JournalQueries, tmp_path: Path) -> None:
    threads_n, per_thread = 4, 60
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            # Each thread also reads, through its own read-only connection, while the others write.
            with JournalQueries(journal.path) as reader:
                barrier.wait()
                acq = f"acq{t}"
                journal.record_acquisition(acq, "passed", first_image_at=float(t))
                for i in range(per_thread):
                    journal.record_file(
                        tmp_path / f"t{t}" / f"{i}.dcm", 100 + i, i, "accepted", acquisition_id=acq
                    )
                    assert reader.file_already_ingested(tmp_path / f"t{t}" / f"{i}.dcm", 100 + i, i)
                    if i % 10 == 0:
                        journal.record_slab(acq, i // 10, i, 10, sha(f"{t}/{i}"))
                        journal.record_publication(
                            acq, "slab", t * 1000 + i, sha(f"{t}/{i}"), slab_index=i // 10
                        )
                        assert reader.published_slabs(acq)[i // 10] == sha(f"{t}/{i}")
                        reader.summary()
                journal.record_verdict(Verdict(acq, "p", "1", Outcome.PASS, True, (), (), 1.0))
                journal.record_acquisition(acq, "published")
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    counts = queries.summary()
    assert counts["files.accepted"] == threads_n * per_thread
    assert counts["slabs"] == counts["publications"] == threads_n * per_thread // 10
    assert counts["verdicts"] == threads_n
    assert journal.finished_acquisitions() == {f"acq{t}" for t in range(threads_n)}
    assert all(len(queries.published_slabs(f"acq{t}")) == per_thread // 10 for t in range(threads_n))


def test_state_survives_close_and_reopen(journal_path: Path) -> None:
    journal_path.parent.mkdir()
    with Journal(journal_path) as first:
        first.record_file(Path("/export/IM_1"), 10, 20, "accepted", acquisition_id=ACQ)
        first.record_acquisition(ACQ, "passed", protocol_id="lumbar-dual-echo", first_image_at=1.0)
        first.record_acquisition("gone", "rejected")
        first.record_verdict(Verdict(ACQ, "lumbar-dual-echo", "3", Outcome.PASS, True, (), (), 2.0))
        first.record_slab(ACQ, 0, 0, 16, sha("0"))
        first.record_publication(ACQ, "slab", 1, sha("0"), slab_index=0)
        first.record_slab(ACQ, 1, 16, 16, sha("1"))  # made, never sent
        with JournalQueries(journal_path) as queries:
            before = queries.summary()
    with pytest.raises(JournalError, match="is closed"):
        first.finished_acquisitions()
    with pytest.raises(JournalError, match="is closed"):
        first.record_acquisition("late", "rejected")
    with Journal(journal_path) as second, JournalQueries(journal_path) as queries:
        assert queries.file_already_ingested(Path("/export/IM_1"), 10, 20)
        assert queries.acquisition_state(ACQ) == "passed"
        assert second.finished_acquisitions() == {"gone"}
        assert queries.unfinished_acquisitions() == {ACQ}
        assert queries.published_slabs(ACQ) == {0: sha("0")}
        assert queries.last_seq() == 1
        assert [v.outcome for v in queries.verdicts(ACQ)] == [Outcome.PASS]
        assert queries.summary() == before


def test_a_newer_schema_is_refused(journal_path: Path) -> None:
    journal_path.parent.mkdir()
    Journal(journal_path).close()
    conn = raw(journal_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(
        JournalSchemaError, match=rf"{journal_path}: schema version {SCHEMA_VERSION + 1} is newer"
    ) as caught:
        Journal(journal_path)
    assert (caught.value.found, caught.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)


def test_a_garbage_file_is_refused_naming_the_path_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    garbage = b"this is not a database, it is a scanner log\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(JournalError, match=rf"{path}: not a readable SQLite journal") as caught:
        Journal(path)
    assert caught.value.path == path
    assert path.read_bytes() == garbage


def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = raw(path)
    conn.execute("CREATE TABLE patients (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(
        JournalError, match=rf"{path}: an SQLite database that is not a state journal \(tables patients\)"
    ):
        Journal(path)
    conn = raw(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    finally:
        conn.close()


def test_a_missing_folder_is_an_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "journal.sqlite3"
    with pytest.raises(JournalError, match=rf"{path}: cannot create the file"):
        Journal(path)


def test_file_outcomes_match_the_metrics_labels() -> None:
    assert FILE_OUTCOMES == metrics.FILE_OUTCOMES
