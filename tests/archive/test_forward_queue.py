"""The forward queue on SQLite and a real PostgreSQL: rule scanning, cursors, claims with leases, back-off."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from archive.config import ForwardRule
from archive.forward_queue import Backoff, ForwardQueue, ItemState, Origin
from archive.index import Source
from archive.models import ForwardItem, utcnow
from archive.service import Archive, IngestOutcome
from helpers import write_instance

HUB_CT1 = ForwardRule("HUB", calling_ae="CT1", modality="CT")
HUB_ALL = ForwardRule("HUB2")


def receive(archive: Archive, tmp_path: Path, ae: str, modality: str, **values: object) -> str:
    """Ingest a fresh small instance as if ``ae`` had sent it over DICOM; returns its SOP Instance UID."""
    path = write_instance(tmp_path / f"{generate_uid()}.dcm", Modality=modality, **values)
    result = archive.ingest_file(path, Source("dicom", ae_title=ae, host="10.0.0.9"))
    assert result.outcome in (IngestOutcome.STORED, IngestOutcome.REPLACED)
    return result.sop_instance_uid


@pytest.fixture
def queue(archive: Archive) -> ForwardQueue:
    return ForwardQueue(archive.index.engine)


def queued(queue: ForwardQueue, destination: str) -> list[str]:
    return [row["sop_instance_uid"] for row in queue.items(destination)]


def test_scan_queues_what_matches_each_rule_from_the_cursor_on(archive, queue, tmp_path):
    before = receive(archive, tmp_path, "CT1", "CT")
    assert queue.ensure_cursors([HUB_CT1, HUB_ALL]) == [HUB_CT1.key, HUB_ALL.key]
    assert queue.ensure_cursors([HUB_CT1, HUB_ALL]) == []  # idempotent
    ct1_ct = receive(archive, tmp_path, "CT1", "CT")
    mr1_mr = receive(archive, tmp_path, "MR1", "MR")
    ct1_mr = receive(archive, tmp_path, "CT1", "MR")
    other_ct = receive(archive, tmp_path, "CT2", "CT")

    assert queue.scan([HUB_CT1, HUB_ALL]) == 5
    assert queued(queue, "HUB") == [ct1_ct]
    assert queued(queue, "HUB2") == [ct1_ct, mr1_mr, ct1_mr, other_ct]
    assert before not in queued(queue, "HUB2")  # a new rule forwards what arrives after it
    assert queue.scan([HUB_CT1, HUB_ALL]) == 0  # the cursors moved: nothing twice
    rows = queue.items("HUB")
    assert rows[0]["state"] == "pending" and rows[0]["origin"] == Origin.INSTANCE.value and rows[0]["attempts"] == 0


def test_two_rules_to_one_destination_queue_an_instance_once(archive, queue, tmp_path):
    by_caller, by_modality = ForwardRule("HUB", calling_ae="CT1"), ForwardRule("HUB", modality="CT")
    queue.ensure_cursors([by_caller, by_modality])
    uid = receive(archive, tmp_path, "CT1", "CT")
    assert queue.scan([by_caller, by_modality]) == 1
    assert queued(queue, "HUB") == [uid]


def test_removed_rule_loses_its_cursor(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_CT1, HUB_ALL])
    receive(archive, tmp_path, "CT1", "CT")
    queue.ensure_cursors([HUB_CT1])  # HUB2 dropped from the configuration...
    receive(archive, tmp_path, "CT1", "CT")
    assert queue.ensure_cursors([HUB_CT1, HUB_ALL]) == [HUB_ALL.key]  # ...and back: it starts afresh
    assert queue.scan([HUB_CT1, HUB_ALL]) == 2
    assert queued(queue, "HUB2") == []


def test_replaced_instance_is_forwarded_again(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_ALL])
    study, series = generate_uid(), generate_uid()
    uid = receive(archive, tmp_path, "CT1", "CT", StudyInstanceUID=study, SeriesInstanceUID=series)
    assert queue.scan([HUB_ALL]) == 1
    # The modality sends a corrected version (keep-newer replaces it): the hub must get it too.
    receive(archive, tmp_path, "CT1", "CT", StudyInstanceUID=study, SeriesInstanceUID=series,
            SOPInstanceUID=uid, PatientName="Corrected^Name")
    assert queue.scan([HUB_ALL]) == 1
    rows = queue.items("HUB2")
    assert [(r["sop_instance_uid"], r["origin"]) for r in rows] == [
        (uid, Origin.INSTANCE.value), (uid, Origin.REPLACEMENT.value)]


def test_claims_do_not_overlap_and_expired_leases_are_taken_over(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_ALL])
    uids = [receive(archive, tmp_path, "CT1", "CT") for _ in range(5)]
    queue.scan([HUB_ALL])

    first = queue.claim("worker-a", 3, lease=300)
    second = queue.claim("worker-b", 10, lease=300)
    assert [c.sop_instance_uid for c in first] == uids[:3]
    assert [c.sop_instance_uid for c in second] == uids[3:]
    assert queue.claim("worker-c", 10, lease=300) == []  # all leased
    assert first[0].attempts == 1 and first[0].destination == "HUB2"
    assert first[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert first[0].transfer_syntax_uid == "1.2.840.10008.1.2.1"

    # worker-a dies: once its lease has run out, another worker takes its rows over.
    with archive.index.write_session() as s, s.begin():
        s.execute(update(ForwardItem).where(ForwardItem.claimed_by == "worker-a")
                  .values(claimed_until=utcnow() - dt.timedelta(seconds=1)))
    taken = queue.claim("worker-c", 10, lease=300)
    assert [c.sop_instance_uid for c in taken] == uids[:3]
    assert all(c.attempts == 2 for c in taken)

    # A long batch: worker-b renews its lease before it runs out, so nobody takes its rows.
    with archive.index.write_session() as s, s.begin():
        s.execute(update(ForwardItem).where(ForwardItem.claimed_by == "worker-b")
                  .values(claimed_until=utcnow() + dt.timedelta(seconds=0.5)))
    queue.extend_lease([c.id for c in second], "worker-a", lease=300)  # not worker-a's rows: no effect
    assert {r["claimed_until"] < utcnow() + dt.timedelta(seconds=1) for r in queue.items() if r["id"] in
            {c.id for c in second}} == {True}
    queue.extend_lease([c.id for c in second], "worker-b", lease=300)
    assert {r["claimed_until"] > utcnow() + dt.timedelta(seconds=200) for r in queue.items() if r["id"] in
            {c.id for c in second}} == {True}
    assert queue.claim("worker-a", 10, lease=300, exclude=["HUB"]) == []


def test_concurrent_workers_never_claim_a_row_twice(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_ALL])
    for _ in range(40):
        receive(archive, tmp_path, "CT1", "CT")
    queue.scan([HUB_ALL])
    got: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        mine = got.setdefault(name, [])
        while batch := queue.claim(name, 3, lease=300):
            mine.extend(c.id for c in batch)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [i for ids in got.values() for i in ids]
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_backoff_doubles_up_to_its_cap():
    policy = Backoff(initial=5, maximum=600, max_rejections=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 7, 8, 100)] == [5, 10, 20, 40, 320, 600, 600]


def test_unreachable_waits_refused_fails_after_max_and_retry_requeues(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_ALL])
    uid = receive(archive, tmp_path, "CT1", "CT")
    queue.scan([HUB_ALL])
    policy = Backoff(initial=10, maximum=40, max_rejections=2)

    # The destination is down: the row waits, later each time (10, 20, 40, 40 s), and never fails.
    for expected_delay in (10, 20, 40, 40):
        (item,) = queue.claim("w", 10, lease=300)
        before = utcnow()
        assert queue.mark_unsent([item.id], "HUB2 at h:104 cannot be reached", policy) == []
        (row,) = queue.items("HUB2")
        assert row["state"] == "pending" and row["claimed_by"] is None
        wait = (row["next_attempt_at"] - before).total_seconds()
        assert expected_delay - 1 < wait <= expected_delay + 1
        assert queue.claim("w", 10, lease=300) == []  # not due yet
        with archive.index.write_session() as s, s.begin():
            s.execute(update(ForwardItem).values(next_attempt_at=utcnow()))

    # Refused twice with a failure status: failed, with the reason kept.
    (item,) = queue.claim("w", 10, lease=300)
    assert queue.mark_unsent([item.id], "HUB2 refused it: status 0xA700", policy, status=0xA700, rejected=True) == []
    with archive.index.write_session() as s, s.begin():
        s.execute(update(ForwardItem).values(next_attempt_at=utcnow()))
    (item,) = queue.claim("w", 10, lease=300)
    assert queue.mark_unsent([item.id], "HUB2 refused it: status 0xA700", policy, status=0xA700,
                             rejected=True) == [item.id]
    (status,) = queue.status()
    assert (status.destination, status.pending, status.sent, status.failed) == ("HUB2", 0, 0, 1)
    assert status.last_error == "HUB2 refused it: status 0xA700"
    assert queue.claim("w", 10, lease=300) == []

    assert queue.retry("HUB") == 0
    assert queue.retry("HUB2") == 1
    (item,) = queue.claim("w", 10, lease=300)
    assert item.sop_instance_uid == uid and item.attempts == 1
    queue.mark_sent([(item.id, 0x0000)])
    (status,) = queue.status()
    assert (status.pending, status.sent, status.failed, status.oldest_pending) == (0, 1, 0, None)
    assert queue.items("HUB2", ItemState.SENT)[0]["last_status"] == 0


def test_status_reports_oldest_pending_and_next_retry(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_CT1, HUB_ALL])
    start = utcnow()
    receive(archive, tmp_path, "CT1", "CT")
    receive(archive, tmp_path, "MR1", "MR")
    queue.scan([HUB_CT1, HUB_ALL])
    by_destination = {st.destination: st for st in queue.status()}
    assert (by_destination["HUB"].pending, by_destination["HUB2"].pending) == (1, 2)
    hub = by_destination["HUB"]
    assert hub.oldest_pending is not None and start <= hub.oldest_pending <= utcnow()
    assert hub.next_attempt is not None and hub.last_error is None
    data = hub.as_json()
    assert data["pending"] == 1 and data["oldest_pending_age_seconds"] >= 0 and data["next_retry"]


def test_cursor_does_not_pass_a_young_gap_in_the_ids(archive):
    """An id allocated by a transaction not yet committed (PostgreSQL) must not be skipped."""
    queue = ForwardQueue(archive.index.engine, gap_grace=3600)
    assert queue._advance("instances", 10, [11, 12, 13]) == 13
    assert queue._advance("instances", 13, [14, 16, 17]) == 14  # 15 may still appear
    assert queue._advance("instances", 14, [15, 16, 17]) == 17  # it did
    assert queue._advance("instances", 17, [19]) == 17
    patient = ForwardQueue(archive.index.engine, gap_grace=0)  # a gap that stayed (a rolled-back insert)
    assert patient._advance("instances", 17, [19, 20]) == 20


def test_release_gives_rows_back_untried(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_ALL])
    receive(archive, tmp_path, "CT1", "CT")
    queue.scan([HUB_ALL])
    (item,) = queue.claim("stopping-worker", 10, lease=300)
    queue.release([item.id], "another-worker")  # not its row: nothing happens
    assert queue.claim("w", 10, lease=300) == []
    queue.release([item.id], "stopping-worker")
    (row,) = queue.items()
    assert (row["state"], row["attempts"], row["claimed_by"]) == ("pending", 0, None)
    assert [c.id for c in queue.claim("w", 10, lease=300)] == [item.id]


def test_cursor_follows_the_catalogue_back_after_a_reindex_emptied_it(archive, queue, tmp_path):
    queue.ensure_cursors([HUB_ALL])
    for _ in range(3):
        receive(archive, tmp_path, "CT1", "CT")
    assert queue.scan([HUB_ALL]) == 3
    archive.index.clear()  # what `telepacs reindex` does first; SQLite then reuses ids from 1
    assert queue.scan([HUB_ALL]) == 0
    later = receive(archive, tmp_path, "CT1", "CT")
    assert queue.scan([HUB_ALL]) == 1
    assert queued(queue, "HUB2")[-1] == later
