"""archive.people (facilities, users, login policy, tokens) and scoped queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from archive import audit, people
from archive.audit import AuditAction
from archive.index import Source
from archive.matching import Level, MatchKey
from archive.models import ApiToken, AuditEntry, User, utcnow
from archive.query import find
from archive.scope import StudyScope
from helpers import MR_STUDY_DIR, TS_DIR, dicom_files

PASSWORD = "mật khẩu đủ mười ký tự"


def _setup(archive) -> None:
    with archive.index.write_session() as s, s.begin():
        people.create_facility(s, code="bv-huyen-a", name="Bệnh viện huyện A", tier="district")
        people.add_ae_title(s, facility_code="BV-HUYEN-A", ae_title="CT_HUYEN_A")
        people.create_user(s, username="BS.Lan", password=PASSWORD, role="requester", facility_code="BV-HUYEN-A")


def test_facilities_and_users_are_validated(archive):
    _setup(archive)
    with archive.index.write_session() as s, s.begin():
        user = people.get_user(s, "bs.lan")
        assert user.facility.code == "BV-HUYEN-A" and user.role == "requester"
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        assert people.facility_for_ae(s, "CT_HUYEN_A") == "BV-HUYEN-A"
        assert people.facility_for_ae(s, "UNKNOWN") is None
    refusals = [
        (dict(code="BV-HUYEN-A"), "already exists"),
        (dict(code="bad code!"), "must be 1-64"),
        (dict(code="BV-X", tier="village"), "tier must be one of"),
    ]
    for kwargs, words in refusals:
        with pytest.raises(people.PeopleError, match=words):
            with archive.index.write_session() as s, s.begin():
                people.create_facility(s, **kwargs)
    user_refusals = [
        (dict(username="bs.lan", password=PASSWORD, role="requester", facility_code="BV-HUYEN-A"), "already exists"),
        (dict(username="bs.x", password="short", role="requester", facility_code="BV-HUYEN-A"), "at least 10"),
        (dict(username="bs.x", password="bs.x-and-more-text", role="requester", facility_code="BV-HUYEN-A"),
         "must not contain the username"),
        (dict(username="bs.x", password=PASSWORD, role="king", facility_code="BV-HUYEN-A"), "role must be one of"),
        (dict(username="bs.x", password=PASSWORD, role="requester", facility_code="NOWHERE"), "no facility"),
        (dict(username="x", password=PASSWORD, role="requester", facility_code="BV-HUYEN-A"), "username"),
    ]
    for kwargs, words in user_refusals:
        with pytest.raises(people.PeopleError, match=words):
            with archive.index.write_session() as s, s.begin():
                people.create_user(s, **kwargs)
    with pytest.raises(people.PeopleError, match="already belongs to facility BV-HUYEN-A"):
        with archive.index.write_session() as s, s.begin():
            people.create_facility(s, code="BV-HUYEN-B")
            people.add_ae_title(s, facility_code="BV-HUYEN-B", ae_title="CT_HUYEN_A")
    with archive.index.session() as s:
        assert [f.code for f in people.list_facilities(s)] == ["BV-HUYEN-A"]  # the refused add rolled back
        assert audit.verify(s).ok


def _login(archive, password: str, now: dt.datetime | None = None) -> people.LoginResult:
    with archive.index.write_session() as s, s.begin():
        return people.authenticate(s, "bs.lan", password, remote="10.0.0.9", now=now)


def test_lockout_and_its_expiry(archive):
    _setup(archive)
    start = utcnow()
    assert _login(archive, "wrong 1", start).outcome is people.LoginOutcome.BAD_CREDENTIALS
    assert _login(archive, PASSWORD, start).ok  # a success resets the count
    for attempt in range(people.MAX_FAILURES - 1):
        assert _login(archive, f"wrong {attempt}", start).outcome is people.LoginOutcome.BAD_CREDENTIALS
    locked = _login(archive, "wrong again", start)
    assert locked.outcome is people.LoginOutcome.LOCKED
    assert abs((locked.locked_until - (start + people.LOCKOUT)).total_seconds()) < 1
    later = start + people.LOCKOUT - dt.timedelta(seconds=5)
    assert _login(archive, PASSWORD, later).outcome is people.LoginOutcome.LOCKED  # the right one too
    after = start + people.LOCKOUT + dt.timedelta(seconds=1)
    assert _login(archive, PASSWORD, after).ok
    with archive.index.session() as s:
        actions = list(s.scalars(select(AuditEntry.action).where(AuditEntry.object_id == "bs.lan")
                                 .order_by(AuditEntry.id)))
        assert actions.count(AuditAction.ACCOUNT_LOCKED) == 1 and actions.count(AuditAction.LOGIN) == 2
        assert actions.count(AuditAction.LOGIN_FAILED) == 1 + people.MAX_FAILURES + 1
        assert audit.verify(s).ok


def test_unknown_user_disabled_user_and_passwords(archive):
    _setup(archive)
    with archive.index.write_session() as s, s.begin():
        assert people.authenticate(s, "nobody", PASSWORD).outcome is people.LoginOutcome.BAD_CREDENTIALS
        assert people.authenticate(s, "bs.lan", "x" * 10_000).outcome is people.LoginOutcome.BAD_CREDENTIALS
        user = people.get_user(s, "bs.lan")
        before = user.password_changed_at
        with pytest.raises(people.PeopleError, match="current password is wrong"):
            people.change_password(s, user, "not it at all", "a brand new password")
        people.change_password(s, user, PASSWORD, "a brand new password")
        assert people._aware(user.password_changed_at) > people._aware(before)
    assert _login(archive, PASSWORD).outcome is people.LoginOutcome.BAD_CREDENTIALS
    assert _login(archive, "a brand new password").ok
    with archive.index.write_session() as s, s.begin():
        people.set_disabled(s, "bs.lan", actor="admin")
    assert _login(archive, "a brand new password").outcome is people.LoginOutcome.DISABLED
    with archive.index.write_session() as s, s.begin():
        people.set_disabled(s, "bs.lan", False, actor="admin")
        people.update_user(s, "bs.lan", role="specialist", specialty="radiology", actor="admin")
    assert _login(archive, "a brand new password").user.role == "specialist"


def test_tokens(archive):
    _setup(archive)
    with archive.index.write_session() as s, s.begin():
        token, secret = people.create_token(s, "bs.lan", "workstation")
        token_id = token.id
    with archive.index.session() as s:
        assert s.scalar(select(ApiToken.token_sha256)) == people.token_digest(secret) != secret
        found = people.user_for_token(s, secret)
        assert found is not None and found[0].username == "bs.lan" and found[0].facility.code == "BV-HUYEN-A"
        assert people.user_for_token(s, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert people.user_for_token(s, "not-a-token") is None
    with archive.index.write_session() as s, s.begin():
        people.revoke_token(s, token_id)
    with archive.index.session() as s:
        assert people.user_for_token(s, secret) is None
    with archive.index.write_session() as s, s.begin():
        _, second = people.create_token(s, "bs.lan")
        people.set_disabled(s, "bs.lan")  # revokes their tokens
    with archive.index.session() as s:
        assert people.user_for_token(s, second) is None
        assert all(t.revoked_at is not None for t in s.scalars(select(ApiToken)))
        with pytest.raises(people.PeopleError, match="disabled"):
            people.create_token(s, "bs.lan")


def test_scoped_queries_filter_in_sql(archive):
    a, b = dicom_files(TS_DIR)[0], dicom_files(MR_STUDY_DIR)[0]
    archive.ingest_file(a, Source("import", facility="BV-HUYEN-A"))
    archive.ingest_file(b, Source("import", facility="BV-TINH"))
    unfacilitied = dicom_files(TS_DIR)  # same study as `a`: its facility stays the study's first
    archive.ingest_file(unfacilitied[1], Source("import"))
    keys = [MatchKey("StudyInstanceUID", ""), MatchKey("SeriesInstanceUID", ""), MatchKey("SOPInstanceUID", "")]

    def studies(level: Level, scope: StudyScope | None) -> set[str]:
        wanted = [k for k in keys if k.keyword == "StudyInstanceUID" or level is not Level.STUDY]
        if level is Level.SERIES:
            wanted = keys[:2]
        return {str(row["StudyInstanceUID"]) for row in find(archive.index, level, wanted, scope=scope)}

    every = studies(Level.STUDY, None)
    assert len(every) == 2
    for level in (Level.STUDY, Level.SERIES, Level.IMAGE):
        assert studies(level, StudyScope.all()) == every
        assert studies(level, StudyScope(facilities=frozenset({"BV-HUYEN-A"}))) == \
            studies(level, StudyScope(study_uids=frozenset(every) - studies(level, StudyScope(
                facilities=frozenset({"BV-TINH"})))))
        assert len(studies(level, StudyScope(facilities=frozenset({"BV-TINH"})))) == 1
        assert studies(level, StudyScope()) == set()
        assert studies(level, StudyScope(facilities=frozenset({"BV-TINH"}),
                                         study_uids=frozenset(every))) == every


def test_dicom_senders_facility_from_the_table(archive):
    _setup(archive)
    assert archive.facility_for("CT_HUYEN_A") == "BV-HUYEN-A"
    assert archive.facility_for("CT_HUYEN_A  ") == "BV-HUYEN-A"
    assert archive.facility_for("SOMEONE") is None
    assert archive.facility_for(None) is None
    with archive.index.session() as s:
        assert s.scalar(select(User.username)) == "bs.lan"
