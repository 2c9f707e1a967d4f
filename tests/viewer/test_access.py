"""Access control path by path: every route of ``app.url_map`` that names a study, series or instance.

A user of another facility gets 404 (as for a study that does not exist), the owner's facility
gets 200, an anonymous request 401 (APIs) or the login page (pages). The routes are enumerated
from the app itself, so a new route is tested as soon as it exists; one whose UID parameter has a
name the guard does not know fails here until ``viewer.auth.access`` knows it.
"""

from __future__ import annotations

import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from archive.audit import AuditAction
from archive.models import AuditEntry
from helpers import MR_STUDY_DIR, TS_DIR, dicom_files, make_settings
from tests.viewer.conftest import seed_admin
from tests.viewer.test_dicomweb import _stow, _uids
from viewer import create_app
from viewer.auth.access import INSTANCE_PARAMS, SERIES_PARAMS, STUDY_PARAMS

OWNER_FACILITY, OTHER_FACILITY = "BV-HUYEN-A", "BV-HUYEN-D"
PASSWORD = "mật khẩu của bác sĩ"
STOW_ENDPOINT = "dicomweb.store_study_instances"
API_PREFIXES = ("/dicomweb", "/api/")
# Values for the route parameters that are not UIDs (a frame list, a frame number, a tag).
FILLERS: dict[str, Any] = {"frames": "1", "frame_list": "1", "frame": 1, "tag": "7FE00010"}


def _app_rules() -> list[tuple[str, str, str]]:
    """(rule, method, endpoint) of every route that takes a study, series or instance UID."""
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app({"TELEPACS_SETTINGS": make_settings(Path(data_dir)), "SECRET_KEY": "x" * 32})
    uid_params = set(STUDY_PARAMS) | set(SERIES_PARAMS) | set(INSTANCE_PARAMS)
    found = []
    for rule in app.url_map.iter_rules():
        looks_like_uid = {a for a in rule.arguments if "uid" in a or a in ("study", "series", "instance", "sop")}
        unknown = looks_like_uid - uid_params
        if unknown:
            raise AssertionError(f"route {rule.rule} names a DICOM object by {sorted(unknown)}, which the guard "
                                 "does not check: add the name to viewer/auth/access.py")
        if rule.arguments & uid_params:
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                found.append((rule.rule, method, rule.endpoint))
    return found


RULES = _app_rules()


@dataclass
class Setting:
    web: Any
    study: str
    series: str
    instance: str
    owner: requests.Session
    other: requests.Session
    other_study: str


@pytest.fixture(scope="module")
def setting(module_web) -> Setting:
    web = module_web
    owner = web.token_session(web.add_user("bs.chu", PASSWORD, facility=OWNER_FACILITY))
    other = web.token_session(web.add_user("bs.khac", PASSWORD, facility=OTHER_FACILITY))
    path = dicom_files(TS_DIR)[0]
    assert _stow(web, [path], http=owner).status_code == 200
    study, series, instance = _uids(path)
    theirs = dicom_files(MR_STUDY_DIR)[0]  # the other facility has a study of its own
    assert _stow(web, [theirs], http=other).status_code == 200
    return Setting(web, study, series, instance, owner, other, _uids(theirs)[0])


# Routes that answer 400 without their query parameters: the values a valid request carries.
REQUIRED_QUERIES = {"/api/viewer/roi/": "?x0=1&y0=1&x1=4&y1=4"}


def _url(setting: Setting, rule: str) -> str:
    values = {**FILLERS}
    for name in STUDY_PARAMS:
        values[name] = setting.study
    for name in SERIES_PARAMS:
        values[name] = setting.series
    for name in INSTANCE_PARAMS:
        values[name] = setting.instance
    path = rule
    for segment in rule.split("<")[1:]:
        spec = segment.split(">")[0]
        name = spec.split(":")[-1]
        assert name in values, f"route {rule}: no test value for parameter {name!r} (add it to FILLERS)"
        path = path.replace(f"<{spec}>", str(values[name]))
    query = next((q for prefix, q in REQUIRED_QUERIES.items() if rule.startswith(prefix)), "")
    return setting.web.url + path + query


def _is_api(rule: str) -> bool:
    return rule.startswith(API_PREFIXES)


@pytest.mark.parametrize("rule,method,endpoint", RULES, ids=[f"{m} {r}" for r, m, _ in RULES])
def test_route(setting, rule, method, endpoint):
    url = _url(setting, rule)
    if method == "POST" and endpoint == STOW_ENDPOINT:
        _check_stow(setting, url)
        return
    assert method == "GET", f"{method} {rule}: add the expected answers of this method to test_access"
    anonymous = requests.get(url, timeout=30, allow_redirects=False)
    if _is_api(rule):
        assert anonymous.status_code == 401, (rule, anonymous.status_code)
    else:
        assert anonymous.status_code == 302 and "/login?next=" in anonymous.headers["Location"], rule
    other = setting.other.get(url, timeout=30)
    assert other.status_code == 404, (rule, other.status_code, other.text[:300])
    assert "crlab" not in other.text and "Barex" not in other.text  # nothing of the patient leaks
    owner = setting.owner.get(url, timeout=60)
    assert owner.status_code == 200, (rule, owner.status_code, owner.text[:300])


def _check_stow(setting: Setting, url: str) -> None:
    path = dicom_files(TS_DIR)[2]  # another instance of the owner's study
    anonymous = requests.post(url, data=path.read_bytes(), timeout=30,
                              headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert anonymous.status_code == 401
    refused = _stow(setting.web, [path], study=setting.study, http=setting.other)
    assert refused.status_code == 409
    failure = refused.json()["00081198"]["Value"][0]
    assert failure["00081197"]["Value"] == [0x0124]  # Refused: Not authorized
    assert _stow(setting.web, [path], study=setting.study, http=setting.owner).status_code == 200
    with setting.web.archive.index.session() as db:
        denied = db.execute(select(AuditEntry.actor).where(AuditEntry.action == AuditAction.ACCESS_DENIED,
                                                           AuditEntry.object_id == setting.study)).scalars().all()
    assert any(actor.startswith("bs.khac") for actor in denied)


def test_observers_cannot_store(setting):
    observer = setting.web.token_session(setting.web.add_user("hv.quan-sat", PASSWORD, role="observer",
                                                              facility=OWNER_FACILITY))
    refused = _stow(setting.web, [dicom_files(TS_DIR)[3]], http=observer)
    assert refused.status_code == 403 and "observers" in refused.json()["error"]
    assert observer.get(f"{setting.web.dicomweb}/studies/{setting.study}/metadata", timeout=30).status_code == 200


def test_every_uid_route_is_covered():
    """The enumeration found the DICOMweb routes (so the parametrised test above is not vacuous)."""
    rules = {rule for rule, _, _ in RULES}
    for expected in ("/dicomweb/studies/<study>", "/dicomweb/studies/<study>/series/<series>/instances/<instance>"
                     "/frames/<frame_list>", "/dicomweb/studies/<study>/thumbnail",
                     "/dicomweb/studies/<study>/series/<series>/instances/<instance>/bulkdata/<tag>"):
        assert expected in rules
    assert len(RULES) >= 18  # the 17 DICOMweb GET routes with a UID and STOW into a study


@pytest.mark.parametrize("level", ["studies", "series", "instances"])
def test_searches_only_return_what_the_user_may_see(setting, level):
    web = setting.web
    owner = setting.owner.get(f"{web.dicomweb}/{level}", timeout=30).json()
    other = setting.other.get(f"{web.dicomweb}/{level}", timeout=30).json()
    admin = web.http.get(f"{web.dicomweb}/{level}", timeout=30).json()
    def studies(rows: list[dict[str, Any]]) -> set[str]:
        return {row["0020000D"]["Value"][0] for row in rows}

    assert studies(owner) == {setting.study}
    assert studies(other) == {setting.other_study}
    assert studies(admin) == {setting.study, setting.other_study}
    by_uid = setting.other.get(f"{web.dicomweb}/{level}?StudyInstanceUID={setting.study}", timeout=30)
    assert by_uid.status_code == 200 and by_uid.json() == []  # asking by UID does not get around it
    assert requests.get(f"{web.dicomweb}/{level}", timeout=30).status_code == 401


def test_denials_and_views_are_in_the_audit_log(setting):
    web = setting.web
    assert setting.other.get(f"{web.dicomweb}/studies/{setting.study}/metadata", timeout=30).status_code == 404
    for _ in range(3):
        assert setting.owner.get(f"{web.dicomweb}/studies/{setting.study}", timeout=30).status_code == 200
    with web.archive.index.session() as db:
        rows = db.execute(select(AuditEntry.actor, AuditEntry.action).where(AuditEntry.object_id == setting.study)
                          ).all()
    assert any(actor.startswith("bs.khac") and action == AuditAction.ACCESS_DENIED for actor, action in rows)
    viewed = [actor for actor, action in rows if action == AuditAction.STUDY_VIEWED and actor.startswith("bs.chu")]
    assert len(viewed) == 1  # once per user and study every few minutes, not once per request


def test_a_consult_participant_sees_the_attached_study(tmp_path, monkeypatch):
    """The contract with the consults branch: the studies of consults one takes part in are visible."""
    from archive import people

    archive_settings = make_settings(tmp_path)
    from archive.service import Archive

    archive = Archive.open(archive_settings)
    token = seed_admin(archive)
    path = dicom_files(TS_DIR)[0]
    from archive.index import Source

    archive.ingest_file(path, Source("import", facility=OWNER_FACILITY))
    study = _uids(path)[0]
    with archive.index.write_session() as db, db.begin():
        people.create_facility(db, code=OTHER_FACILITY, actor="test")
        people.create_user(db, username="bs.hub", password=PASSWORD, role="specialist",
                           facility_code=OTHER_FACILITY, actor="test")
        _, hub_token = people.create_token(db, "bs.hub", actor="test")
    calls: list[int] = []
    attached: set[str] = set()

    def study_uids_for_participant(session: Any, user_id: int) -> set[str]:
        calls.append(user_id)
        return set(attached)

    fake = types.ModuleType("viewer.consults.service")
    fake.study_uids_for_participant = study_uids_for_participant  # type: ignore[attr-defined]
    fake.observer_pseudonym = lambda session, user_id, study_uid: None  # type: ignore[attr-defined]  # a participant, not an observer
    monkeypatch.setitem(sys.modules, "viewer.consults", types.ModuleType("viewer.consults"))
    monkeypatch.setitem(sys.modules, "viewer.consults.service", fake)
    from viewer.auth import access

    access._consult_lookup.cache_clear()
    access.clear_caches()
    monkeypatch.setenv("TELEPACS_DATA_DIR", str(archive_settings.data_dir))
    client = create_app({"TELEPACS_ARCHIVE": archive}).test_client()
    hub = {"Authorization": f"Bearer {hub_token}"}
    try:
        assert client.get(f"/dicomweb/studies/{study}/metadata", headers=hub).status_code == 404
        assert client.get("/dicomweb/studies", headers=hub).json == []
        attached.add(study)  # the hub specialist is added to a consult with this study
        access._consult_scopes.clear()  # (a running server sees it within a few seconds)
        assert client.get(f"/dicomweb/studies/{study}/metadata", headers=hub).status_code == 200
        asked = len(calls)
        for _ in range(5):  # frame after frame: the participation is not asked for again
            assert client.get(f"/dicomweb/studies/{study}/metadata", headers=hub).status_code == 200
        assert len(calls) == asked
        assert [row["0020000D"]["Value"][0] for row in client.get("/dicomweb/studies", headers=hub).json] == [study]
        assert calls and set(calls) == {2}
        admin = {"Authorization": f"Bearer {token}"}
        assert client.get(f"/dicomweb/studies/{study}/metadata", headers=admin).status_code == 200
    finally:
        access._consult_lookup.cache_clear()
        access.clear_caches()
        archive.close()


def test_the_warm_check_costs_no_query(tmp_path, monkeypatch):
    """Once a token and a study were seen, the guard answers from memory: no SQL per frame request."""
    from sqlalchemy import event

    from archive import people
    from archive.index import Source
    from archive.service import Archive
    from viewer.auth import access
    from viewer.auth.guard import guard

    archive = Archive.open(make_settings(tmp_path))
    seed_admin(archive)
    path = dicom_files(TS_DIR)[0]
    archive.ingest_file(path, Source("import", facility=OWNER_FACILITY))
    with archive.index.write_session() as db, db.begin():
        people.create_facility(db, code=OWNER_FACILITY, actor="test")
        people.create_user(db, username="bs.chu", password=PASSWORD, role="requester", facility_code=OWNER_FACILITY)
        _, token = people.create_token(db, "bs.chu")
    study, series, instance = _uids(path)
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/1"
    app = create_app({"TELEPACS_ARCHIVE": archive, "TELEPACS_SETTINGS": archive.settings, "SECRET_KEY": "k" * 40})
    access.clear_caches()
    statements: list[str] = []
    event.listen(archive.index.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: statements.append(statement))
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with app.test_request_context(url, headers=headers):
            assert guard() is None
        cold = len(statements)
        assert cold >= 3  # the token and the three objects were looked up once
        for _ in range(50):
            with app.test_request_context(url, headers=headers):
                assert guard() is None
        assert len(statements) == cold
    finally:
        access.clear_caches()
        archive.close()


def _all_rules() -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app({"TELEPACS_SETTINGS": make_settings(Path(data_dir)), "SECRET_KEY": "x" * 32})
    return [(rule.rule, method, rule.endpoint) for rule in app.url_map.iter_rules()
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]


ALL_RULES = _all_rules()


@pytest.mark.parametrize("rule,method,endpoint", ALL_RULES, ids=[f"{m} {r}" for r, m, _ in ALL_RULES])
def test_deny_by_default(rule, method, endpoint, tmp_path, monkeypatch):
    """Every route but the public few refuses an anonymous request (401 for APIs, the login page for pages)."""
    from viewer.auth.guard import PUBLIC_ENDPOINTS

    monkeypatch.setenv("TELEPACS_DATA_DIR", str(tmp_path))
    client = create_app({"SECRET_KEY": "x" * 32}).test_client()
    path = rule
    for segment in rule.split("<")[1:]:
        spec = segment.split(">")[0]
        converter = spec.split(":")[0] if ":" in spec else ""
        path = path.replace(f"<{spec}>", "1" if converter == "int" else "1.2.3")
    answer = client.open(path, method=method)
    if endpoint in PUBLIC_ENDPOINTS:
        # Reachable without logging in: a page, a redirect, a missing static file, or the login form
        # posted without its CSRF token (403).
        refusal = {("static", "GET"): 404, ("auth.login", "POST"): 403}.get((endpoint, method))
        assert answer.status_code < 400 or answer.status_code == refusal, (rule, answer.status_code)
    elif rule.startswith(API_PREFIXES):
        assert answer.status_code == 401, (method, rule, answer.status_code)
    else:
        assert answer.status_code in (302, 401), (method, rule, answer.status_code)
        if answer.status_code == 302:
            assert "/login?next=" in answer.headers["Location"]
