"""The hash-chained audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from sqlalchemy import func, select, text

from archive import audit
from archive.audit import AuditAction
from archive.models import AuditEntry


def _append(archive, n: int, actor: str = "alice") -> None:
    for i in range(n):
        with archive.index.write_session() as session, session.begin():
            audit.record(session, actor=actor, action=AuditAction.STUDY_VIEWED, object_type="study",
                         object_id=f"1.2.3.{i}", detail={"series": ["1.2.3.4.5"], "note": "Nguyễn"})


def test_chain_verifies_then_detects_an_edited_row(archive):
    _append(archive, 5)
    with archive.index.session() as session:
        result = audit.verify(session)
        assert result.ok and result.entries == 5
        third = session.execute(select(AuditEntry).order_by(AuditEntry.id).offset(2).limit(1)).scalar_one()
        third_id = third.id
    with archive.index.engine.begin() as conn:  # someone edits a row behind the application's back
        conn.execute(text("UPDATE audit_log SET object_id = '9.9.9' WHERE id = :id"), {"id": third_id})
    with archive.index.session() as session:
        result = audit.verify(session)
    assert not result.ok and result.first_bad_id == third_id and result.entries == 2
    assert "changed" in result.reason


def test_deleting_a_row_breaks_the_link(archive):
    _append(archive, 4)
    with archive.index.session() as session:
        second_id = session.execute(select(AuditEntry.id).order_by(AuditEntry.id).offset(1).limit(1)).scalar_one()
    with archive.index.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": second_id})
    with archive.index.session() as session:
        result = audit.verify(session)
    assert not result.ok and result.first_bad_id is not None and result.first_bad_id > second_id
    assert "link" in result.reason


def test_entry_rolls_back_with_the_action(archive):
    _append(archive, 1)
    try:
        with archive.index.write_session() as session, session.begin():
            audit.record(session, actor="bob", action="consult_created", object_type="consult", object_id="7")
            raise RuntimeError("the action failed")
    except RuntimeError:
        pass
    with archive.index.session() as session:
        assert session.execute(select(func.count()).select_from(AuditEntry)).scalar() == 1
        assert audit.verify(session).ok


def test_concurrent_writers_never_fork_the_chain(archive):
    threads = [threading.Thread(target=_append, args=(archive, 10, f"user{i}")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with archive.index.session() as session:
        result = audit.verify(session)
    assert result.ok and result.entries == 40
