"""People's pages: the study list at ``/`` (search the archive, sorted and paged; a row opens the viewer).

The search state lives in the query string (a GET form), so a search can be bookmarked, shared and
gone back to. Only the studies the user may see are listed (:func:`viewer.auth.access_scope`, filtered
in SQL). The list is one server-rendered page (no script needed; ``static/study-list.js`` only
adds clickable rows and keyboard navigation). Searching goes through :func:`archive.query.find_page`:
the same matching as C-FIND and QIDO-RS, with sorting, paging and the total count.

Bad parameters (a malformed date, an unknown sort key, a page under 1) answer 400 with the page and a
message saying what to fix, and a WARNING log line.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from flask import Blueprint, render_template, request
from flask.typing import ResponseReturnValue
from flask_babel import format_date, format_time, format_timedelta, gettext

from archive.index import IndexUnavailable
from archive.matching import InvalidValue, Level, MatchKey, UnsupportedKey
from archive.query import PageRow, SortKey, find_page
from viewer.auth import search_scope, served_pseudonyms
from viewer.deps import get_archive

log = logging.getLogger(__name__)

bp = Blueprint("ui", __name__)

PAGE_SIZES = (10, 25, 50, 100)
DEFAULT_PAGE_SIZE = 25
MAX_TEXT = 64  # characters in a search field (the longest matched attribute, LO, holds 64)
MAX_PAGE = 1_000_000  # beyond any archive's last page; keeps the offset a sane integer for the database
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The modalities offered in the search form (any other code may still be typed into the URL).
MODALITIES = ("CR", "CT", "DX", "ES", "MG", "MR", "NM", "OT", "PT", "RF", "SR", "US", "XA")
_MODALITY = re.compile(r"[A-Z0-9]{1,16}")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NAME_SEPARATORS = re.compile(r"[\s,^]+")


class SortColumn(str, Enum):
    """The list's sortable columns (URL ``sort=``), each with the direction a first click gives."""

    DATE = "date"
    NAME = "name"
    PATIENT_ID = "id"
    MODALITY = "modality"
    RECEIVED = "received"

    @property
    def keyword(self) -> str:
        return _SORT_KEYWORDS[self]

    @property
    def newest_first(self) -> bool:
        return self in (SortColumn.DATE, SortColumn.RECEIVED)


_SORT_KEYWORDS = {
    SortColumn.DATE: "StudyDate",
    SortColumn.NAME: "PatientName",
    SortColumn.PATIENT_ID: "PatientID",
    SortColumn.MODALITY: "ModalitiesInStudy",
    SortColumn.RECEIVED: "ReceivedAt",
}

# What each row of the list shows.
RETURNED = ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
            "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances", "ReceivedAt")


class BadSearch(ValueError):
    """Search parameters that cannot be used: {form field: message for the user (translated)}."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {message}" for name, message in problems.items()))
        self.problems = problems


@dataclass(frozen=True)
class StudySearch:
    """One search of the study list, as its URL gives it."""

    name: str = ""
    patient_id: str = ""
    accession: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    modality: str = ""
    description: str = ""
    sort: SortColumn = SortColumn.RECEIVED
    descending: bool = True
    page: int = 1
    size: int = DEFAULT_PAGE_SIZE

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @property
    def filtered(self) -> bool:
        """Whether any search field is set (else the list shows every study)."""
        return any((self.name, self.patient_id, self.accession, self.date_from, self.date_to, self.modality,
                    self.description))

    def match_keys(self) -> list[MatchKey]:
        """The DICOM matching keys of this search (PS3.4 C.2.2.2), plus the list's return keys."""
        keys: list[MatchKey] = []
        if self.name:
            keys.append(MatchKey("PatientName", name_pattern(self.name), fuzzy=True))
        if self.patient_id:
            keys.append(MatchKey("PatientID", prefix_pattern(self.patient_id)))
        if self.accession:
            keys.append(MatchKey("AccessionNumber", prefix_pattern(self.accession)))
        if self.date_from or self.date_to:
            keys.append(MatchKey("StudyDate", _dicom_date(self.date_from) + "-" + _dicom_date(self.date_to)))
        if self.modality:
            keys.append(MatchKey("ModalitiesInStudy", self.modality))
        if self.description:
            keys.append(MatchKey("StudyDescription", "*" + self.description.strip("*") + "*"))
        asked = {key.keyword for key in keys}
        return keys + [MatchKey(keyword, "") for keyword in RETURNED if keyword not in asked]

    def sort_keys(self) -> list[SortKey]:
        keys = [SortKey(self.sort.keyword, self.descending)]
        if self.sort is SortColumn.DATE:
            keys.append(SortKey("ReceivedAt", self.descending))
        elif self.sort is not SortColumn.RECEIVED:
            keys.append(SortKey("StudyDate", True))  # a patient's studies, newest first
        return keys

    def query_args(self, **changes: Any) -> dict[str, str]:
        """The URL parameters of this search with ``changes`` (only what differs from the defaults)."""
        search = replace(self, **changes)
        args = {
            "name": search.name, "patient_id": search.patient_id, "accession": search.accession,
            "from": search.date_from.isoformat() if search.date_from else "",
            "to": search.date_to.isoformat() if search.date_to else "",
            "modality": search.modality, "description": search.description,
        }
        out = {key: value for key, value in args.items() if value}
        if (search.sort, search.descending) != (SortColumn.RECEIVED, True):
            out["sort"] = search.sort.value
            out["dir"] = "desc" if search.descending else "asc"
        if search.page != 1:
            out["page"] = str(search.page)
        if search.size != DEFAULT_PAGE_SIZE:
            out["size"] = str(search.size)
        return out

    def sorted_by(self, column: SortColumn) -> dict[str, str]:
        """The URL parameters for a click on ``column``'s header: toggle it, or sort by it (first page)."""
        descending = not self.descending if column is self.sort else column.newest_first
        return self.query_args(sort=column, descending=descending, page=1)


def name_pattern(text: str) -> str:
    """A person-name search as a fuzzy PN wildcard: words in order, each a prefix (``nguyen van`` ->
    ``nguyen*van*``). Matched on the folded name, so case and diacritics do not matter."""
    words = [word for word in _NAME_SEPARATORS.split(text.strip()) if word]
    pattern = "*".join(words)
    return pattern if pattern.endswith("*") else pattern + "*"


def prefix_pattern(text: str) -> str:
    """An identifier search: the text as a prefix (``VN00`` -> ``VN00*``), or the user's own wildcards."""
    text = text.strip()
    return text if "*" in text or "?" in text else text + "*"


def _dicom_date(day: dt.date | None) -> str:
    return day.strftime("%Y%m%d") if day else ""


def parse_search(args: Mapping[str, str]) -> StudySearch:
    """The search a request's query string asks for; :class:`BadSearch` naming every bad field."""
    problems: dict[str, str] = {}
    text: dict[str, str] = {}
    for name in ("name", "patient_id", "accession", "description"):
        value = args.get(name, "").strip()
        if len(value) > MAX_TEXT:
            problems[name] = gettext("At most %(count)d characters.", count=MAX_TEXT)
        elif _CONTROL.search(value):
            problems[name] = gettext("Control characters cannot be searched for.")
        text[name] = value
    date_from = _parse_date(args.get("from", ""), "from", problems)
    date_to = _parse_date(args.get("to", ""), "to", problems)
    if date_from and date_to and date_from > date_to:
        problems["to"] = gettext("The end date is before the start date.")
    modality = args.get("modality", "").strip().upper()
    if modality and not _MODALITY.fullmatch(modality):
        problems["modality"] = gettext("Not a modality code (letters and digits, such as CT or MR).")
    sort, descending = SortColumn.RECEIVED, True
    sort_text = args.get("sort", "")
    if sort_text:
        try:
            sort = SortColumn(sort_text)
            descending = sort.newest_first
        except ValueError:
            problems["sort"] = gettext("Unknown sort column %(name)s.", name=repr(sort_text))
    direction = args.get("dir", "")
    if direction not in ("", "asc", "desc"):
        problems["dir"] = gettext("The sort direction must be asc or desc.")
    elif direction:
        descending = direction == "desc"
    page = _parse_int(args.get("page", ""), 1, "page", problems)
    if page is not None and page < 1:
        problems["page"] = gettext("The page number must be 1 or more.")
    elif page is not None and page > MAX_PAGE:
        problems["page"] = gettext("The page number must be at most %(max)d.", max=MAX_PAGE)
    size = _parse_int(args.get("size", ""), DEFAULT_PAGE_SIZE, "size", problems)
    if size is not None and size not in PAGE_SIZES:
        problems["size"] = gettext("The page size must be one of %(sizes)s.",
                                   sizes=", ".join(str(n) for n in PAGE_SIZES))
    if problems:
        raise BadSearch(problems)
    return StudySearch(text["name"], text["patient_id"], text["accession"], date_from, date_to, modality,
                       text["description"], sort, descending, page or 1, size or DEFAULT_PAGE_SIZE)


def _parse_date(value: str, name: str, problems: dict[str, str]) -> dt.date | None:
    value = value.strip()
    if not value:
        return None
    try:
        if _ISO_DATE.fullmatch(value):
            return dt.date.fromisoformat(value)
    except ValueError:
        pass
    problems[name] = gettext("%(value)s is not a date (expected YYYY-MM-DD).", value=repr(value))
    return None


def _parse_int(value: str, default: int, name: str, problems: dict[str, str]) -> int | None:
    value = value.strip()
    if not value:
        return default
    if re.fullmatch(r"-?[0-9]{1,30}", value):
        return int(value)
    problems[name] = gettext("%(value)s is not a whole number.", value=repr(value[:40]))
    return None


# -- rows -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRow:
    """One study as the list shows it: every value formatted for the request's language and time zone."""

    study_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    age: str
    sex: str
    study_date: str
    study_time: str
    accession: str
    description: str
    modalities: list[str]
    series: int
    instances: int
    received: str  # local date and time
    received_ago: str  # "3 hours ago"
    received_iso: str  # machine-readable (the <time> element)


def display_name(pn: str) -> str:
    """A DICOM person name for people: ``Nguyễn^Văn A`` -> ``Nguyễn Văn A`` (family name first, as in
    Vietnamese; the first component group only, PS3.5 6.2.1)."""
    alphabetic = pn.split("=", 1)[0]
    return " ".join(part.strip() for part in alphabetic.split("^") if part.strip())


def _dicom_day(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date() if len(value.strip()) >= 8 else None
    except ValueError:
        return None


def _dicom_clock(value: str) -> dt.time | None:
    digits = value.strip().split(".", 1)[0]
    if len(digits) < 4 or not digits.isdigit():
        return None
    try:
        return dt.time(int(digits[0:2]), int(digits[2:4]), int(digits[4:6] or 0) if len(digits) >= 6 else 0)
    except ValueError:
        return None


def _age(born: dt.date | None, on: dt.date) -> str:
    if born is None or born > on:
        return ""
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return gettext("%(years)d y", years=years)


def _sex(code: str) -> str:
    labels = {"M": gettext("Male"), "F": gettext("Female"), "O": gettext("Other")}
    return labels.get(code.strip().upper(), code)


def study_row(row: PageRow, now: dt.datetime) -> StudyRow:
    """A row of :func:`archive.query.find_page` (the :data:`RETURNED` keys) formatted for the page."""
    def text(keyword: str) -> str:
        value = row.get(keyword, "")
        return value if isinstance(value, str) else str(value)

    def number(keyword: str) -> int:
        value = row.get(keyword, 0)
        return value if isinstance(value, int) else 0

    born = _dicom_day(text("PatientBirthDate"))
    day = _dicom_day(text("StudyDate"))
    clock = _dicom_clock(text("StudyTime"))
    received = row.get("ReceivedAt")
    received_at = received if isinstance(received, dt.datetime) else None
    return StudyRow(
        study_uid=text("StudyInstanceUID"),
        patient_name=display_name(text("PatientName")),
        patient_id=text("PatientID"),
        birth_date=format_date(born, "medium") if born else "",
        age=_age(born, day or now.date()),
        sex=_sex(text("PatientSex")),
        # Study dates and times are the modality's wall clock: shown as they are, not moved to a zone.
        study_date=format_date(day, "medium") if day else "",
        study_time=format_time(clock, "short", rebase=False) if clock else "",
        accession=text("AccessionNumber"),
        description=text("StudyDescription"),
        modalities=[m for m in text("ModalitiesInStudy").split("\\") if m],
        series=number("NumberOfStudyRelatedSeries"),
        instances=number("NumberOfStudyRelatedInstances"),
        received=f"{format_date(received_at, 'medium')} {format_time(received_at, 'short')}" if received_at else "",
        received_ago=format_timedelta(received_at - now, granularity="minute", add_direction=True)
        if received_at else "",
        received_iso=received_at.isoformat() if received_at else "",
    )


# -- the page -------------------------------------------------------------------------------------


@dataclass
class ListPage:
    """What the template gets."""

    search: StudySearch
    form: Mapping[str, str]  # the fields as typed (refilled after a bad search)
    rows: list[StudyRow] = field(default_factory=list)
    total: int = 0
    problems: dict[str, str] = field(default_factory=dict)
    error: str = ""  # a failure of ours, not the user's

    @property
    def first(self) -> int:
        return self.search.offset + 1 if self.rows else 0

    @property
    def last(self) -> int:
        return self.search.offset + len(self.rows)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.search.size))

    @property
    def past_the_end(self) -> bool:
        return not self.rows and self.total > 0


def _render(page: ListPage, status: int = 200) -> ResponseReturnValue:
    return render_template("study_list.html", page=page, search=page.search, SortColumn=SortColumn,
                           MODALITIES=MODALITIES, PAGE_SIZES=PAGE_SIZES), status


@bp.get("/")
def study_list() -> ResponseReturnValue:
    """The study list: search form, sortable table, pager."""
    form = {key: value for key, value in request.args.items()}
    try:
        search = parse_search(request.args)
    except BadSearch as exc:
        # The fields and what is wrong with them; not the whole query string (it may hold patient names).
        log.warning("study list: bad search from %s: %s", request.remote_addr, exc)
        return _render(ListPage(StudySearch(), form, problems=exc.problems), 400)
    try:
        keys = search.match_keys()
        found = find_page(get_archive().index, Level.STUDY, keys, fuzzy=True, scope=search_scope(keys),
                          sort=search.sort_keys(), offset=search.offset, limit=search.size)
    except (UnsupportedKey, InvalidValue) as exc:
        log.warning("study list: search refused by the archive from %s: %s", request.remote_addr, exc)
        return _render(ListPage(search, form, problems={"search": str(exc)}), 400)
    except IndexUnavailable as exc:
        log.error("study list: the index failed: %s", exc)
        return _render(ListPage(search, form, error=gettext(
            "The archive's index is not answering. Try again in a moment.")), 503)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [study_row(row, now) for row in found.rows]
    pseudonyms = served_pseudonyms()
    rows = [_pseudonymised(row, pseudonyms[row.study_uid]) if row.study_uid in pseudonyms else row for row in rows]
    log.info("study list: %d of %d studies (page %d) for %s", len(rows), found.total, search.page,
             request.remote_addr)
    return _render(ListPage(search, form, rows, found.total))


def _pseudonymised(row: StudyRow, pseudonym: str) -> StudyRow:
    """A consult's study as its de-identifying observers see it: no name, ID, birth date or accession."""
    return replace(row, patient_name=pseudonym, patient_id=pseudonym, birth_date="", age="", accession="")


def local_timezone() -> str:
    """The zone times are shown in: ``TELEPACS_TIMEZONE``, else ``TZ``, else the system's, else UTC."""
    for name in (os.environ.get("TELEPACS_TIMEZONE"), os.environ.get("TZ")):
        if name:
            return name.lstrip(":")
    try:
        return Path("/etc/timezone").read_text().strip() or "UTC"
    except OSError:
        pass
    target = os.path.realpath("/etc/localtime")
    return target.split("/zoneinfo/", 1)[1] if "/zoneinfo/" in target else "UTC"
