"""The study list in a real browser: Debian chromium (Playwright), telepacs under gunicorn, ../shared/testdata.

One walk through the page as a reader uses it: open the list, search by name and by modality, sort,
page (menu, links and keys), switch to Vietnamese and back, open a study (the row, not only its link,
opens ``/viewer/<study>``). Every request must stay on telepacs' origin, nothing may fail and the
console must stay clean. Screenshots of each state are saved under the test's tmp dir (``screenshots``).

The browser and server fixtures are this module's own (``tests/e2e/conftest.py`` belongs to the viewer
branch); the server is the ``web`` fixture of tests/viewer/conftest.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest

from archive.dataset import fold_name
from archive.index import Source
from helpers import FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files, write_instance
from tests.viewer.conftest import ADMIN, ADMIN_PASSWORD
from tests.viewer.conftest import web  # noqa: F401  (gunicorn on a free port, as a fixture of this module)

TIMEOUT_MS = 15_000

# Generated studies beside the test data: (PatientID, PatientName, Modality, StudyDate, description)
GENERATED = [
    ("BN1001", "Nguyễn^Văn An", "CT", "20251102", "CT sọ não không cản quang"),
    ("BN1002", "Trần^Thị Bình", "CR", "20251103", "X quang ngực thẳng"),
    ("BN1003", "NGUYỄN^THỊ HOA", "MR", "20251104", "MRI cột sống thắt lưng"),
    ("BN1004", "Lê^Đức Minh", "CT", "20251105", "CT ngực liều thấp"),
    ("BN1005", "Phạm^Thu Hà", "US", "20251106", "Siêu âm ổ bụng"),
    ("BN1006", "Hoàng^Quốc Bảo", "DX", "20251107", "X quang cột sống cổ"),
    ("BN1007", "Võ^Thị Lan", "CT", "20251108", "CT bụng có cản quang"),
    ("BN1008", "Đặng^Văn Hùng", "CR", "20251109", "X quang khớp gối"),
    ("BN1009", "Bùi^Ngọc Ánh", "MR", "20251110", "MRI sọ não"),
    ("BN1010", "Nguyen^Minh Tuan", "CT", "20251111", "CT xoang"),
    ("BN1011", "Đỗ^Thị Hương", "US", "20251112", "Siêu âm tuyến giáp"),
    ("BN1012", "Hồ^Văn Nam", "DX", "20251113", "X quang bàn tay"),
]
TOTAL = len(GENERATED) + 4  # and the four studies of ../shared/testdata


@dataclass
class Loaded:
    url: str
    studies: dict[str, str]  # PatientID -> StudyInstanceUID
    names: dict[str, str]  # PatientID -> PatientName as stored
    modalities: dict[str, str]  # PatientID -> modality


@pytest.fixture
def list_web(web, ct_part10_dir: Path, tmp_path: Path) -> Loaded:  # noqa: F811
    """The gunicorn server with ../shared/testdata and the generated studies loaded."""
    source = Source(via="import")
    studies: dict[str, str] = {}
    names: dict[str, str] = {}
    modalities: dict[str, str] = {}
    for folder in (MR_STUDY_DIR, FMRI_DIR, TS_DIR, ct_part10_dir):
        files = dicom_files(folder)
        for path in files:
            web.archive.ingest_file(path, source)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        studies[str(first.PatientID)] = str(first.StudyInstanceUID)
        names[str(first.PatientID)] = str(first.PatientName)
        modalities[str(first.PatientID)] = str(first.Modality)
    generated = tmp_path / "generated"
    generated.mkdir()
    for pid, name, modality, date, description in GENERATED:
        path = write_instance(generated / f"{pid}.dcm", PatientID=pid, PatientName=name, Modality=modality,
                              StudyDate=date, StudyTime="093000", StudyDescription=description,
                              AccessionNumber=f"HN-{pid}", PatientSex="F", PatientBirthDate="19700101")
        web.archive.ingest_file(path, source)
        studies[pid] = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        names[pid] = name
        modalities[pid] = modality
    assert len(studies) == TOTAL
    return Loaded(web.url, studies, names, modalities)


@dataclass
class Watch:
    """What the browser did that it should not have: requests off the origin, failures, console errors."""

    origin: str
    external: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def route(self, route: Any) -> None:
        if route.request.url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def on_response(self, response: Any) -> None:
        # /viewer/<study> is the viewer branch's page: opening it is this test's last step, and what it
        # answers is that page's business.
        if response.status >= 400 and "/viewer/" not in response.url:
            self.failed.append(f"{response.status} {response.url}")

    def on_console(self, message: Any) -> None:
        if message.type == "error" and "/viewer/" not in (message.location or {}).get("url", ""):
            self.console.append(message.text)


def _log_in(page: Any, url: str) -> None:
    """Open the list: the login page comes first (deny by default), then the list."""
    page.goto(url + "/")
    assert "/login?next=" in page.url, page.url
    page.fill("#username", ADMIN)
    page.fill("#password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda current: "/login" not in current)


def _patient_ids(page: Any) -> list[str]:
    return [text.strip() for text in page.locator("table.studies tbody td.pid").all_inner_texts()]


def _query(page: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


@pytest.mark.browser
@pytest.mark.timeout(240)
def test_search_sort_page_language_and_open(list_web: Loaded, browser: Any, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    watch = Watch(list_web.url)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.route("**/*", watch.route)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("response", watch.on_response)
    page.on("console", watch.on_console)
    page.on("pageerror", lambda error: watch.console.append(f"uncaught: {error}"))

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    # The list (after the login): every study, newest arrival first (the generated ones came last).
    _log_in(page, list_web.url)
    assert page.locator("h1").inner_text() == "Studies"
    assert page.locator("#summary").inner_text() == f"1–{TOTAL} of {TOTAL} studies"
    ids = _patient_ids(page)
    assert sorted(ids) == sorted(list_web.studies) and ids[0] == "BN1012"
    shot("01-list")

    # Search by name: lower case without diacritics finds Nguyễn and NGUYỄN; Enter submits the GET form.
    page.fill("#f-name", "nguyen")
    page.press("#f-name", "Enter")
    page.wait_for_url(re.compile(r"name=nguyen"))
    assert sorted(_patient_ids(page)) == ["BN1001", "BN1003", "BN1010"]
    assert page.locator("#f-name").input_value() == "nguyen"
    shot("02-name-nguyen")

    # Search by modality (the name is cleared first): the CT phantom of the test data and the generated CTs.
    page.fill("#f-name", "")
    page.select_option("#f-mod", "CT")
    page.click("form.search button[type=submit]")
    page.wait_for_url(re.compile(r"modality=CT"))
    ct = sorted(pid for pid, modality in list_web.modalities.items() if modality == "CT")
    assert sorted(_patient_ids(page)) == ct and "PR0002" in ct
    assert set(page.locator("table.studies td.mod").all_inner_texts()) == {"CT"}
    shot("03-modality-ct")

    # Sort by patient name (a header link keeps the search), then the other way round.
    page.click('th a[data-sort="name"]')
    page.wait_for_url(re.compile(r"sort=name"))
    assert _query(page)["modality"] == ["CT"] and _query(page)["dir"] == ["asc"]
    by_name = sorted(ct, key=lambda pid: (fold_name(list_web.names[pid]), pid))
    assert _patient_ids(page) == by_name
    assert page.locator("th.sorted").get_attribute("aria-sort") == "ascending"
    page.click('th a[data-sort="name"]')
    page.wait_for_url(re.compile(r"dir=desc"))
    assert page.locator("th.sorted").get_attribute("aria-sort") == "descending"
    names_shown = [n.split("\n")[0] for n in page.locator("td.patient a.open").all_inner_texts()]
    assert [fold_name(n) for n in names_shown] == sorted((fold_name(n) for n in names_shown), reverse=True)
    shot("04-sorted-by-name-desc")

    # Paging: all studies by patient ID, 10 a page (the menu applies itself), Next and Prev, keys.
    page.goto(list_web.url + "/?sort=id&dir=asc")
    page.select_option("#f-size", "10")
    page.wait_for_url(re.compile(r"size=10"))
    by_id = sorted(list_web.studies)
    assert _patient_ids(page) == by_id[:10]
    assert page.locator("#summary").inner_text() == f"1–10 of {TOTAL} studies"
    assert page.locator(".page-of").inner_text() == "Page 1 of 2"
    page.click('.pager a[rel="next"]')
    page.wait_for_url(re.compile(r"page=2"))
    assert _patient_ids(page) == by_id[10:]
    assert page.locator("#summary").inner_text() == f"11–{TOTAL} of {TOTAL} studies"
    assert page.locator('.pager a[rel="next"]').count() == 0
    shot("05-page-2")
    page.keyboard.press("ArrowLeft")  # previous page
    page.wait_for_url(lambda url: "page=2" not in url)
    assert _patient_ids(page) == by_id[:10]
    page.keyboard.press("ArrowRight")  # next page
    page.wait_for_url(re.compile(r"page=2"))
    page.go_back()  # the search state is in the URL: back works
    page.wait_for_url(lambda url: "page=2" not in url)
    assert _patient_ids(page) == by_id[:10]

    # Vietnamese and back: the language switch keeps the search.
    page.click('.langs a[hreflang="vi"]')
    page.wait_for_function("document.documentElement.lang === 'vi'")
    assert page.locator("h1").inner_text() == "Ca chụp"
    assert page.locator("#summary").inner_text() == f"1–10 trong tổng số {TOTAL} ca chụp"
    assert page.locator('label[for="f-name"]').inner_text().lower() == "họ tên bệnh nhân"
    assert _patient_ids(page) == by_id[:10] and _query(page)["size"] == ["10"]
    assert "thg" in page.locator("td.date").first.inner_text()  # dates in the Vietnamese format
    shot("06-vietnamese")
    page.click('.langs a[hreflang="en"]')
    page.wait_for_function("document.documentElement.lang === 'en'")
    assert page.locator("h1").inner_text() == "Studies"

    # Keys: "/" goes to the name search; ↓ chooses the first row.
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "f-name"
    page.locator("h1").click()  # leave the field
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    selected = page.locator("tr.study.selected")
    assert selected.count() == 1 and selected.locator("td.pid").inner_text() == by_id[1]
    shot("07-row-selected")

    # Open a study: a click on the row (its date, not its link) goes to /viewer/<study>.
    target = by_id[0]
    with page.expect_navigation():
        page.locator("tr.study", has=page.locator("td.pid", has_text=target)).first.locator("td.date").click()
    assert urlsplit(page.url).path == f"/viewer/{list_web.studies[target]}"
    shot("08-opened")

    context.close()
    assert watch.external == [], f"requests left telepacs: {watch.external}"
    assert watch.failed == [], f"failed requests: {watch.failed}"
    assert watch.console == [], f"console errors: {watch.console}"
    print(f"screenshots in {shots}")


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_tablet_and_phone_layouts(list_web: Loaded, browser: Any, tmp_path: Path) -> None:
    """On a tablet the table fits the screen; on a phone each study is a card with labelled values."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    for name, width, height in (("tablet", 1024, 768), ("phone", 390, 844)):
        context = browser.new_context(viewport={"width": width, "height": height}, locale="vi-VN",
                                           has_touch=name == "phone")
        page = context.new_page()
        _log_in(page, list_web.url)
        page.goto(list_web.url + "/?size=10")
        assert page.locator("h1").inner_text() == "Ca chụp"
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        if overflow > 0:
            page.screenshot(path=str(shots / f"{name}-overflow.png"), full_page=True)
        assert overflow <= 0, f"{name}: the page scrolls sideways by {overflow} px"
        if name == "tablet":
            table = page.locator("table.studies").bounding_box()
            assert table is not None and table["width"] <= width, table
        else:
            assert page.locator("table.studies thead").is_hidden()
            label = page.evaluate("getComputedStyle(document.querySelector('td.pid'), '::before').content")
            assert label == '"Mã bệnh nhân"'
            with page.expect_navigation():
                page.locator("tr.study").first.locator("td.pid").tap()
            assert urlsplit(page.url).path.startswith("/viewer/")
            page.go_back()
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        context.close()
    print(f"screenshots in {shots}")
