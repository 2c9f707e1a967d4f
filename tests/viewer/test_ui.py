"""The study list at ``/``: every search field, sorting, paging, bad parameters, languages, time zone.

Most tests use Flask's test client, as the administrator (API token), on an archive loaded with generated
studies whose arrival times are set (so that the default order, newest arrival first, is known); others
check who sees what (the login, a district user's facility); one runs the page under gunicorn.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pytest
import requests
from flask import Flask
from pydicom import dcmread
from flask.testing import FlaskClient
from sqlalchemy import text, update

from archive import people
from archive.index import Source
from archive.models import Study
from archive.service import Archive
from helpers import make_settings, write_instance
from tests.viewer.conftest import seed_admin
from viewer import create_app
from viewer.ui import display_name, name_pattern, prefix_pattern

# PatientID: (PatientName, BirthDate, Sex, StudyDate, StudyTime, Modality, Accession, Description)
NAMED = {
    "VN001": ("Nguyễn^Văn A", "19800101", "M", "20240115", "101500", "CT", "ACC-1", "CT sọ não"),
    "VN002": ("Trần^Thị B", "19900220", "F", "20240301", "090000", "MR", "ACC-2", "MRI cột sống"),
    "VN003": ("NGUYEN^VAN C", "", "", "20231224", "235959", "CR", "ACC-3", "Chest PA"),
    "VN004": ("Lê^Đức", "19551231", "M", "20240301", "080000", "CT", "ACC-4", "CT ngực"),
    "XX9": ("Smith^John", "", "O", "", "", "US", "ACC-5", "Abdomen"),
}
FILLER = [f"P1{n:02d}" for n in range(12)]  # 12 more DX studies, for paging
ARRIVAL = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.timezone.utc)  # the first study's; one more hour each
# Arrival order (first to last): the fillers, then the named ones.
ARRIVED = FILLER + list(NAMED)
NEWEST_FIRST = ARRIVED[::-1]


def _load(archive: Archive, folder: Path) -> dict[str, str]:
    """The studies above into ``archive``; {PatientID: StudyInstanceUID}."""
    uids: dict[str, str] = {}
    for hours, pid in enumerate(ARRIVED):
        if pid in NAMED:
            name, born, sex, date, time, modality, accession, description = NAMED[pid]
        else:
            name, born, sex, date, time, modality, accession, description = (
                f"Phạm^Thị {pid}", "", "F", "20240210", "120000", "DX", f"ACC-{pid}", "Chụp X quang ngực")
        path = write_instance(folder / f"{pid}.dcm", PatientID=pid, PatientName=name, PatientBirthDate=born or None,
                              PatientSex=sex or None, StudyDate=date or None, StudyTime=time or None,
                              Modality=modality, AccessionNumber=accession, StudyDescription=description)
        archive.ingest_file(path, Source("import"))
        uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        with archive.index.write_session() as session, session.begin():
            session.execute(update(Study).where(Study.study_uid == uid)
                            .values(received_at=ARRIVAL + dt.timedelta(hours=hours)))
        uids[pid] = uid
    return uids


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("study-list")
    archive = Archive.open(make_settings(tmp))
    uids = _load(archive, tmp)
    archive.settings.data_dir.mkdir(parents=True, exist_ok=True)
    TOKENS[archive.settings.data_dir] = seed_admin(archive)
    yield archive, uids
    archive.close()


TOKENS: dict[Path, str] = {}  # data dir -> the admin's API token


def _app(archive: Archive, **config: object) -> Flask:
    return create_app({"TELEPACS_SETTINGS": archive.settings, "TELEPACS_ARCHIVE": archive, "TESTING": True,
                       "BABEL_DEFAULT_TIMEZONE": "Asia/Ho_Chi_Minh", **config})


def _client(archive: Archive, token: str | None = None, **config: object) -> FlaskClient:
    """A test client sending ``token`` (default: the administrator's) with every request."""
    client = _app(archive, **config).test_client()
    if token is None:
        token = TOKENS.get(archive.settings.data_dir) or seed_admin(archive)
        TOKENS[archive.settings.data_dir] = token
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


@pytest.fixture(scope="module")
def client(loaded: tuple[Archive, dict[str, str]]) -> FlaskClient:
    return _client(loaded[0])


# --- reading the page ---------------------------------------------------------------------------------


class _Rows(HTMLParser):
    """The study rows of the page: {cell class: text} plus the link, in order; the pager's links."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.links: dict[str, str] = {}  # rel -> href
        self.sort_links: dict[str, str] = {}  # data-sort -> href
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "study" in a.get("class", "").split():
            self.rows.append({"uid": a["data-study"]})
        elif tag == "td" and self.rows and self._cell is None:
            self._cell = a.get("class", "").split()[0] if a.get("class") else "td"
            self.rows[-1][self._cell] = ""
        elif tag == "a" and self._cell == "patient":
            self.rows[-1]["href"] = a["href"]
        elif tag == "a" and a.get("rel"):
            self.links[a["rel"]] = a["href"]
        elif tag == "a" and a.get("data-sort"):
            self.sort_links[a["data-sort"]] = a["href"]
        elif tag == "time" and self._cell == "received":
            self.rows[-1]["datetime"] = a["datetime"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.rows[-1][self._cell] = " ".join((self.rows[-1][self._cell] + " " + data).split())


def _page(client: FlaskClient, query: str = "", status: int = 200, **headers: str) -> tuple[str, _Rows]:
    response = client.get("/" + (f"?{query}" if query else ""), headers=headers)
    html = response.get_data(as_text=True)
    assert response.status_code == status, html[:2000]
    assert response.mimetype == "text/html"
    parsed = _Rows()
    parsed.feed(html)
    return html, parsed


def _ids(client: FlaskClient, query: str) -> list[str]:
    return [row["pid"] for row in _page(client, query)[1].rows]


def _summary(html: str) -> str:
    found = re.search(r'<p class="summary" id="summary">\s*(.*?)\s*</p>', html, re.S)
    return " ".join(found.group(1).split()) if found else ""


# --- the list -------------------------------------------------------------------------------------------


def test_lists_studies_newest_arrival_first_a_page_at_a_time(client: FlaskClient) -> None:
    html, page = _page(client)
    assert [row["pid"] for row in page.rows] == NEWEST_FIRST[:17]  # 17 studies fit the default 25
    assert _summary(html) == "1–17 of 17 studies"
    assert "<title>Studies · telepacs</title>" in html and 'role="search"' in html


def test_a_row_shows_the_study_and_opens_the_viewer(client: FlaskClient, loaded) -> None:
    _, uids = loaded
    _, page = _page(client, "patient_id=VN001")
    (row,) = page.rows
    assert row["href"] == f"/viewer/{uids['VN001']}" and row["uid"] == uids["VN001"]
    assert row["patient"] == "Nguyễn Văn A Male Jan 1, 1980 (44 y)"  # age on the study date
    assert row["pid"] == "VN001"
    assert row["date"] == "Jan 15, 2024 10:15 AM"  # the modality's wall clock, not moved to a zone
    assert row["desc"] == "CT sọ não Acc. ACC-1"
    assert row["mod"] == "CT" and row["num"] == "1 / 1"
    # Arrived 2026-11-01 08:00 UTC + 12 h = 20:00 UTC: 03:00 on Nov 2 in Hà Nội (UTC+7).
    assert row["datetime"] == "2026-11-01T20:00:00+00:00"
    assert row["received"].endswith("ago Nov 2, 2026 3:00 AM"), row["received"]


@pytest.mark.parametrize("query, expected", [
    ("name=nguyen", ["VN003", "VN001"]),  # case- and diacritic-insensitive, newest arrival first
    ("name=NGUYỄN+văn", ["VN003", "VN001"]),  # words in order, each a prefix
    ("name=nguyen+van+a", ["VN001"]),
    ("name=ngu", ["VN003", "VN001"]),  # a prefix
    ("name=ng%3Fyen", ["VN003", "VN001"]),  # DICOM wildcards work too
    ("name=van", []),  # a prefix of the family name, not a word anywhere
    ("name=le+duc", ["VN004"]),  # đ folds to d
    ("patient_id=VN00", ["VN004", "VN003", "VN002", "VN001"]),  # an ID prefix
    ("patient_id=VN002", ["VN002"]),
    ("patient_id=vn002", []),  # IDs match exactly as stored (case-sensitive, as C-FIND)
    ("accession=ACC-3", ["VN003"]),
    ("accession=ACC-P10", ["P109", "P108", "P107", "P106", "P105", "P104", "P103", "P102", "P101", "P100"]),
    ("from=2024-01-01&to=2024-02-09", ["VN001"]),
    ("from=2024-03-01", ["VN004", "VN002"]),
    ("to=2023-12-31", ["VN003"]),  # a study without a date never matches a range
    ("from=2024-03-01&to=2024-03-01", ["VN004", "VN002"]),
    ("modality=CT", ["VN004", "VN001"]),
    ("modality=ct", ["VN004", "VN001"]),
    ("modality=US", ["XX9"]),
    ("description=sọ", ["VN001"]),
    ("description=Chest", ["VN003"]),
    ("name=nguyen&modality=CR", ["VN003"]),
    ("name=tran&from=2024-01-01&modality=MR&description=MRI&accession=ACC-2&patient_id=VN", ["VN002"]),
    ("modality=", NEWEST_FIRST),  # empty fields are no condition
])
def test_each_search_field(client: FlaskClient, query: str, expected: list[str]) -> None:
    assert _ids(client, query) == expected


def test_no_match_says_so(client: FlaskClient) -> None:
    html, page = _page(client, "name=zzz")
    assert page.rows == [] and "No studies match" in html and 'href="/"' in html
    assert 'class="pager"' not in html


def test_an_empty_archive_says_so(tmp_path: Path) -> None:
    archive = Archive.open(make_settings(tmp_path))
    try:
        html, page = _page(_client(archive))
        assert page.rows == [] and "The archive holds no studies yet" in html
    finally:
        archive.close()


# --- sorting --------------------------------------------------------------------------------------------


def test_sort_by_each_column(client: FlaskClient) -> None:
    named = "patient_id=VN&size=10"  # VN001..VN004
    assert _ids(client, named + "&sort=name") == ["VN004", "VN001", "VN003", "VN002"]  # le, nguyen a, c, tran
    assert _ids(client, named + "&sort=name&dir=desc") == ["VN002", "VN003", "VN001", "VN004"]
    assert _ids(client, named + "&sort=id") == ["VN001", "VN002", "VN003", "VN004"]
    assert _ids(client, named + "&sort=id&dir=desc") == ["VN004", "VN003", "VN002", "VN001"]
    assert _ids(client, named + "&sort=date") == ["VN002", "VN004", "VN001", "VN003"]  # newest first
    assert _ids(client, named + "&sort=date&dir=asc") == ["VN003", "VN001", "VN004", "VN002"]
    assert _ids(client, named + "&sort=modality") == ["VN003", "VN004", "VN001", "VN002"]  # CR, CT (newer), CT, MR
    assert _ids(client, named + "&sort=received&dir=asc") == ["VN001", "VN002", "VN003", "VN004"]
    assert _ids(client, named + "&sort=received") == ["VN004", "VN003", "VN002", "VN001"]


def test_header_links_keep_the_search_and_toggle_the_order(client: FlaskClient) -> None:
    html, page = _page(client, "name=nguyen&sort=name&page=1&size=10")
    assert 'aria-sort="ascending"' in html
    toggle = page.sort_links["name"]
    assert "name=nguyen" in toggle and "sort=name" in toggle and "dir=desc" in toggle and "size=10" in toggle
    assert "dir=desc" in page.sort_links["date"] and "dir=asc" in page.sort_links["id"]
    assert _ids(client, toggle.split("?", 1)[1]) == ["VN003", "VN001"]


# --- paging ---------------------------------------------------------------------------------------------


def test_pages_with_total_and_prev_next(client: FlaskClient) -> None:
    html1, first = _page(client, "size=10")
    assert _summary(html1) == "1–10 of 17 studies" and "Page 1 of 2" in html1
    assert "prev" not in first.links and first.links["next"] == "/?page=2&size=10"
    html2, second = _page(client, first.links["next"].split("?", 1)[1])
    assert _summary(html2) == "11–17 of 17 studies" and "Page 2 of 2" in html2
    assert "next" not in second.links and second.links["prev"] == "/?size=10"
    seen = [r["pid"] for r in first.rows + second.rows]
    assert seen == NEWEST_FIRST  # every study once, in order


def test_paging_keeps_the_search_and_sort(client: FlaskClient) -> None:
    _, first = _page(client, "modality=DX&sort=id&dir=asc&size=10")
    assert [r["pid"] for r in first.rows] == FILLER[:10]
    following = first.links["next"]
    assert "modality=DX" in following and "sort=id" in following and "dir=asc" in following
    assert _ids(client, following.split("?", 1)[1]) == FILLER[10:]


def test_a_page_past_the_end_offers_the_last(client: FlaskClient) -> None:
    html, page = _page(client, "page=9&size=10")
    assert page.rows == [] and "This page is past the last one." in html
    assert 'href="/?page=2&amp;size=10"' in html


def test_the_page_size_menu_keeps_the_search(client: FlaskClient) -> None:
    html, _ = _page(client, "name=nguyen&sort=id")
    size_form = html.split('class="page-size"', 1)[1].split("</form>", 1)[0]
    assert 'name="name" value="nguyen"' in size_form and 'name="sort" value="id"' in size_form
    assert all(f'<option value="{n}"' in size_form for n in (10, 25, 50, 100))


# --- bad parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("query, message", [
    ("from=2024-13-01", "&#39;2024-13-01&#39; is not a date (expected YYYY-MM-DD)."),
    ("to=yesterday", "&#39;yesterday&#39; is not a date"),
    ("from=20240101", "is not a date"),
    ("from=2024-03-01&to=2024-01-01", "The end date is before the start date."),
    ("sort=size", "Unknown sort column &#39;size&#39;."),
    ("sort=name&dir=up", "The sort direction must be asc or desc."),
    ("page=-1", "The page number must be 1 or more."),
    ("page=0", "The page number must be 1 or more."),
    ("page=two", "&#39;two&#39; is not a whole number."),
    ("size=7", "The page size must be one of 10, 25, 50, 100."),
    ("modality=C+T%21", "Not a modality code"),
    ("name=" + "a" * 65, "At most 64 characters."),
    ("name=nguy%00en", "Control characters cannot be searched for."),
    ("page=99999999999999999999", "The page number must be at most 1000000."),
    ("page=1_0", "&#39;1_0&#39; is not a whole number."),
])
def test_bad_parameters_are_a_400_page_with_a_message(client: FlaskClient, caplog: pytest.LogCaptureFixture,
                                                      query: str, message: str) -> None:
    with caplog.at_level(logging.WARNING, logger="viewer.ui"):
        html, page = _page(client, query, status=400)
    assert message in html, html
    assert 'role="alert"' in html and "The search could not be run:" in html and "Traceback" not in html
    assert 'role="search"' in html and page.rows == []  # the form is there to fix the search
    assert any("study list: bad search" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_bad_field_is_marked_and_keeps_what_was_typed(client: FlaskClient) -> None:
    html, _ = _page(client, "name=nguyen&from=2024-02-30", status=400)
    assert 'value="nguyen"' in html
    assert re.search(r'id="f-from"[^>]*aria-invalid="true"', html)


def test_the_index_failing_is_a_503_page(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = Archive.open(make_settings(tmp_path))
    try:
        client = _client(archive)
        with archive.index.engine.begin() as conn:
            conn.execute(text("ALTER TABLE studies RENAME TO studies_elsewhere"))
        with caplog.at_level(logging.ERROR, logger="viewer.ui"):
            html, _ = _page(client, status=503)
        assert "The archive&#39;s index is not answering" in html and "Traceback" not in html
        assert any("the index failed" in r.getMessage() for r in caplog.records)
    finally:
        archive.close()


# --- languages ------------------------------------------------------------------------------------------


def test_vietnamese_page(client: FlaskClient) -> None:
    html, page = _page(client, "patient_id=VN001", **{"Accept-Language": "vi-VN,vi;q=0.9"})
    assert '<html lang="vi">' in html
    for text_vi in ("Ca chụp", "Họ tên bệnh nhân", "Mã bệnh nhân", "Ngày chụp từ", "Loại máy", "Tìm kiếm",
                    "1–1 trong tổng số 1 ca chụp", "Nhận lúc"):
        assert text_vi in html, text_vi
    (row,) = page.rows
    assert row["patient"] == "Nguyễn Văn A Nam 1 thg 1, 1980 (44 tuổi)"
    assert row["date"] == "15 thg 1, 2024 10:15"
    assert row["received"].endswith("trước 2 thg 11, 2026 03:00"), row["received"]
    bad, _ = _page(client, "page=0", status=400, **{"Accept-Language": "vi"})
    assert "Số trang phải từ 1 trở lên." in bad and "Không thể thực hiện tìm kiếm:" in bad
    empty, _ = _page(client, "name=zzz&lang=vi")
    assert "Không có ca chụp nào phù hợp" in empty


def test_times_follow_the_configured_zone(loaded) -> None:
    archive, _ = loaded
    client = _client(archive, BABEL_DEFAULT_TIMEZONE="UTC")
    (row,) = _page(client, "patient_id=VN001")[1].rows
    assert row["received"].endswith("Nov 1, 2026 8:00 PM"), row["received"]


# --- who sees what -------------------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_the_login(loaded) -> None:
    archive, _ = loaded
    response = _app(archive).test_client().get("/?name=nguyen")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


def test_a_district_user_sees_only_their_facilitys_studies(loaded, caplog) -> None:
    archive, uids = loaded
    with archive.index.write_session() as session, session.begin():
        people.create_facility(session, code="BV-HUYEN-A", actor="test")
        people.create_user(session, username="bacsi.a", password="mat khau rat dai 123", role="requester",
                           facility_code="BV-HUYEN-A", actor="test")
        _, token = people.create_token(session, "bacsi.a", "tests", actor="test")
        session.execute(update(Study).where(Study.study_uid.in_([uids["VN001"], uids["VN003"]]))
                        .values(facility="BV-HUYEN-A"))
    try:
        district = _client(archive, token)
        html, page = _page(district)
        assert [row["pid"] for row in page.rows] == ["VN003", "VN001"] and _summary(html) == "1–2 of 2 studies"
        assert _ids(district, "name=nguyen&sort=id") == ["VN001", "VN003"]
        assert _ids(district, "patient_id=VN002") == []  # another facility's study is not there at all
        assert len(_page(_client(archive))[1].rows) == 17  # the administrator still sees everything
    finally:
        with archive.index.write_session() as session, session.begin():
            session.execute(update(Study).where(Study.facility == "BV-HUYEN-A").values(facility=None))


# --- helpers --------------------------------------------------------------------------------------------


def test_patterns_and_names() -> None:
    assert name_pattern("  nguyen   van ") == "nguyen*van*"
    assert name_pattern("Nguyễn^Văn") == "Nguyễn*Văn*"
    assert name_pattern("smith, j*") == "smith*j*"
    assert prefix_pattern("VN00") == "VN00*" and prefix_pattern("VN?01") == "VN?01"
    assert display_name("Nguyễn^Văn A") == "Nguyễn Văn A"
    assert display_name("Yamada^Tarou=山田^太郎=やまだ^たろう") == "Yamada Tarou"
    assert display_name("^^^") == ""


# --- under gunicorn -------------------------------------------------------------------------------------


def test_under_gunicorn(web) -> None:
    path = write_instance(Path(web.log).parent / "one.dcm", PatientID="G1", PatientName="Đỗ^Thị Hoa",
                          StudyDate="20250102", Modality="MR")
    web.archive.ingest_file(path, Source("import"))
    anonymous = requests.get(web.url + "/?name=do+thi", timeout=10, allow_redirects=False)
    assert anonymous.status_code == 302 and "/login?next=" in anonymous.headers["Location"]
    session = web.login()  # through the login page, as a person does
    page = session.get(web.url + "/?name=do+thi", timeout=10)
    assert page.status_code == 200 and "Đỗ Thị Hoa" in page.text and "/viewer/" in page.text
    for asset in ("/static/study-list.css", "/static/study-list.js"):
        assert requests.get(web.url + asset, timeout=10).status_code == 200
    bad = session.get(web.url + "/?page=-1", timeout=10)
    assert bad.status_code == 400 and "text/html" in bad.headers["Content-Type"]
    assert "The page number must be 1 or more." in bad.text
