"""Single-instance lookups (the per-request path of rendered slices and frames) on SQLite and PostgreSQL.

They run on a connection each thread keeps (``archive.index._ThreadReaders``), outside the pool:
what they return must still be the committed index at the time of the call, in every thread,
after a replacement, and after the connection broke.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from archive.index import IndexUnavailable, InstanceLocation, Source
from archive.service import Archive, IngestOutcome
from helpers import write_instance

SRC = Source("import")


def _ingest(archive: Archive, path: Path) -> tuple[IngestOutcome, str]:
    with open(path, "rb") as f:
        result = archive.ingest_stream(f, SRC, name=path.name)
    return result.outcome, result.checksum


def _locate(archive: Archive, uids: dict[str, str]) -> list[InstanceLocation]:
    return archive.index.instance_locations(uids["StudyInstanceUID"], uids["SeriesInstanceUID"],
                                            uids["SOPInstanceUID"])


def _in_thread(archive: Archive, uids: dict[str, str]) -> list[InstanceLocation]:
    found: list[list[InstanceLocation]] = []
    thread = threading.Thread(target=lambda: found.append(_locate(archive, uids)))
    thread.start()
    thread.join(30)
    assert found, "the lookup thread did not finish"
    return found[0]


def test_lookup_sees_a_replacement_at_once_in_every_thread(archive: Archive, tmp_path: Path) -> None:
    uids = dict(SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    outcome, first_checksum = _ingest(archive, write_instance(tmp_path / "a.dcm", SeriesDescription="First", **uids))
    assert outcome is IngestOutcome.STORED
    before = _locate(archive, uids)  # opens this thread's connection
    assert [loc.checksum for loc in before] == [first_checksum]
    assert [loc.checksum for loc in _in_thread(archive, uids)] == [first_checksum]

    outcome, second_checksum = _ingest(archive, write_instance(tmp_path / "b.dcm", SeriesDescription="Second",
                                                               **uids))
    assert outcome is IngestOutcome.REPLACED and second_checksum != first_checksum
    after = _locate(archive, uids)  # the same connection, no transaction kept open since the first lookup
    assert [loc.checksum for loc in after] == [second_checksum]
    assert [loc.checksum for loc in _in_thread(archive, uids)] == [second_checksum]
    assert after[0].object_key == before[0].object_key and after[0].size > 0


def test_lookup_of_unknown_or_mismatched_uids_finds_nothing(archive: Archive, tmp_path: Path) -> None:
    uids = dict(SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    _ingest(archive, write_instance(tmp_path / "a.dcm", **uids))
    assert _locate(archive, {**uids, "SOPInstanceUID": generate_uid()}) == []
    assert _locate(archive, {**uids, "SeriesInstanceUID": generate_uid()}) == []
    assert len(_locate(archive, uids)) == 1
    # Without the series (a study-level thumbnail): the instance still has to be in that study.
    assert len(archive.index.instance_locations(uids["StudyInstanceUID"], None, uids["SOPInstanceUID"])) == 1
    assert archive.index.instance_locations(generate_uid(), None, uids["SOPInstanceUID"]) == []


def test_a_broken_lookup_connection_fails_clearly_and_is_replaced(archive: Archive, tmp_path: Path) -> None:
    uids = dict(SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    _ingest(archive, write_instance(tmp_path / "a.dcm", **uids))
    assert len(_locate(archive, uids)) == 1
    archive.index._readers._local.conn.close()  # e.g. the PostgreSQL server dropped it
    with pytest.raises(IndexUnavailable, match="index lookup failed"):
        _locate(archive, uids)
    assert len(_locate(archive, uids)) == 1  # a new connection


def test_close_closes_every_thread_connection(archive: Archive, tmp_path: Path) -> None:
    uids = dict(SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    _ingest(archive, write_instance(tmp_path / "a.dcm", **uids))
    _locate(archive, uids)
    _in_thread(archive, uids)
    readers = archive.index._readers
    opened = list(readers._open)
    assert len(opened) == 2
    readers.close()
    assert readers._open == []
    for conn in opened:
        with pytest.raises(Exception):  # noqa: B017 - sqlite3.ProgrammingError / psycopg.OperationalError
            conn.cursor().execute("SELECT 1")
    assert len(_locate(archive, uids)) == 1  # reopened on demand
