"""archive.query.find_page: the matching of find(), sorted, a page at a time, with the total; on both engines."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select, update

from archive.index import Source
from archive.matching import InvalidValue, Level, MatchKey, UnsupportedKey
from archive.models import Study
from archive.query import SortKey, find, find_page
from archive.service import Archive
from helpers import write_instance

# (PatientID, PatientName, StudyDate, StudyTime, Modality, AccessionNumber, hours after the first arrival)
STUDIES = [
    ("VN001", "Nguyễn^Văn A", "20240115", "101500", "CT", "ACC-1", 3),
    ("VN002", "Trần^Thị B", "20240301", "090000", "MR", "ACC-2", 1),
    ("VN003", "nguyen^van c", "20231224", "235959", "CR", "ACC-3", 4),
    ("VN004", "Lê^Đức", "20240301", "080000", "CT", "ACC-4", 0),
    ("XX9", "Smith^John", "", "", "US", "ACC-5", 2),
]
FIRST_ARRIVAL = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def five(archive: Archive, tmp_path: Path) -> Archive:
    source = Source("import")
    for n, (pid, name, date, time, modality, accession, hours) in enumerate(STUDIES):
        values: dict[str, object] = {"PatientID": pid, "PatientName": name, "Modality": modality,
                                     "AccessionNumber": accession, "StudyDescription": f"Study {n}"}
        values.update(StudyDate=date or None, StudyTime=time or None)
        path = write_instance(tmp_path / f"s{n}.dcm", **values)
        archive.ingest_file(path, source)
        with archive.index.write_session() as session, session.begin():
            study_id = session.scalar(select(Study.id).where(Study.accession_number == accession))
            session.execute(update(Study).where(Study.id == study_id)
                            .values(received_at=FIRST_ARRIVAL + dt.timedelta(hours=hours)))
    return archive


def _ids(rows: list) -> list[str]:
    return [str(r["PatientID"]) for r in rows]


def test_sorted_by_date_then_time_both_ways(five: Archive) -> None:
    keys = [MatchKey("PatientID", ""), MatchKey("StudyDate", "")]
    up = find_page(five.index, Level.STUDY, keys, sort=[SortKey("StudyDate")])
    assert _ids(up.rows) == ["XX9", "VN003", "VN001", "VN004", "VN002"]  # no date first, then 08:00 before 09:00
    down = find_page(five.index, "STUDY", keys, sort=[SortKey("StudyDate", descending=True)])
    assert _ids(down.rows) == ["VN002", "VN004", "VN001", "VN003", "XX9"]
    assert up.total == down.total == 5


def test_names_sort_on_their_folded_form(five: Archive) -> None:
    page = find_page(five.index, Level.STUDY, [MatchKey("PatientName", "")], sort=[SortKey("PatientName")])
    # lê, nguyen^van c / nguyễn^văn a fold to nguyen^van ..., smith, trần -> tran
    assert [r["PatientName"] for r in page.rows] == ["Lê^Đức", "Nguyễn^Văn A", "nguyen^van c", "Smith^John",
                                                     "Trần^Thị B"]


def test_other_sort_keys(five: Archive) -> None:
    keys = [MatchKey("PatientID", "")]
    by_id = find_page(five.index, Level.STUDY, keys, sort=[SortKey("PatientID", descending=True)])
    assert _ids(by_id.rows) == ["XX9", "VN004", "VN003", "VN002", "VN001"]
    by_modality = find_page(five.index, Level.STUDY, keys, sort=[SortKey("ModalitiesInStudy"), SortKey("PatientID")])
    assert _ids(by_modality.rows) == ["VN003", "VN001", "VN004", "VN002", "XX9"]  # CR, CT, CT, MR, US
    series = find_page(five.index, Level.SERIES, [MatchKey("Modality", "")], sort=[SortKey("PatientName")])
    assert [r["Modality"] for r in series.rows] == ["CT", "CT", "CR", "US", "MR"]


def test_received_at_is_returned_and_sortable(five: Archive) -> None:
    page = find_page(five.index, Level.STUDY, [MatchKey("PatientID", ""), MatchKey("ReceivedAt", "")],
                     sort=[SortKey("ReceivedAt", descending=True)])
    assert _ids(page.rows) == ["VN003", "VN001", "XX9", "VN002", "VN004"]
    newest = page.rows[0]["ReceivedAt"]
    assert isinstance(newest, dt.datetime) and newest == FIRST_ARRIVAL + dt.timedelta(hours=4)
    assert newest.utcoffset() == dt.timedelta(0)
    # find() (C-FIND, QIDO) knows nothing of it: an archive key never reaches a DICOM peer.
    assert list(find(five.index, Level.STUDY, [MatchKey("ReceivedAt", ""), MatchKey("PatientID", "VN001")])) == [
        {"PatientID": "VN001"}]


def test_offset_limit_and_total(five: Archive) -> None:
    keys = [MatchKey("PatientID", "")]
    order = [SortKey("PatientID")]
    pages = [find_page(five.index, Level.STUDY, keys, sort=order, offset=o, limit=2) for o in (0, 2, 4, 6)]
    assert [_ids(p.rows) for p in pages] == [["VN001", "VN002"], ["VN003", "VN004"], ["XX9"], []]
    assert {p.total for p in pages} == {5}
    assert (pages[1].offset, pages[1].limit) == (2, 2)


def test_ties_keep_a_stable_order_across_pages(five: Archive) -> None:
    keys = [MatchKey("PatientID", "")]
    order = [SortKey("ModalitiesInStudy", descending=True)]  # two CT studies tie
    whole = _ids(find_page(five.index, Level.STUDY, keys, sort=order).rows)
    pieced = [pid for o in range(5)
              for pid in _ids(find_page(five.index, Level.STUDY, keys, sort=order, offset=o, limit=1).rows)]
    assert pieced == whole and sorted(whole) == ["VN001", "VN002", "VN003", "VN004", "XX9"]
    assert whole.index("VN001") < whole.index("VN004")  # the tie goes by the order of indexing


def test_same_matching_as_find(five: Archive) -> None:
    keys = [MatchKey("PatientName", "nguyen*", fuzzy=True), MatchKey("PatientID", ""),
            MatchKey("ModalitiesInStudy", "CT\\CR"), MatchKey("StudyDate", "20231201-20240131")]
    page = find_page(five.index, Level.STUDY, keys, sort=[SortKey("PatientID")], limit=10)
    assert _ids(page.rows) == sorted(str(r["PatientID"]) for r in find(five.index, Level.STUDY, keys))
    assert _ids(page.rows) == ["VN001", "VN003"] and page.total == 2
    none = find_page(five.index, Level.STUDY, [MatchKey("AccessionNumber", "NOPE*")], limit=10)
    assert none.rows == [] and none.total == 0


def test_counts_and_patient_rows(five: Archive) -> None:
    page = find_page(five.index, Level.STUDY, [MatchKey("PatientID", "VN002"), MatchKey("PatientBirthDate", ""),
                                               MatchKey("NumberOfStudyRelatedSeries", ""),
                                               MatchKey("NumberOfStudyRelatedInstances", "")])
    assert page.rows == [{"PatientID": "VN002", "PatientBirthDate": "", "NumberOfStudyRelatedSeries": 1,
                          "NumberOfStudyRelatedInstances": 1}]


@pytest.mark.parametrize("kwargs, error, text", [
    ({"sort": [SortKey("Nonsense")]}, UnsupportedKey, "Nonsense cannot be sorted on"),
    ({"sort": [SortKey("InstanceNumber")]}, UnsupportedKey, "IMAGE-level key"),
    ({"offset": -1}, InvalidValue, "offset"),
    ({"limit": 0}, InvalidValue, "limit"),
])
def test_bad_requests_raise_before_reading(five: Archive, kwargs: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        find_page(five.index, Level.STUDY, [MatchKey("PatientID", "")], **kwargs)


def test_bad_keys_raise_as_in_find(five: Archive) -> None:
    with pytest.raises(InvalidValue, match="StudyDate"):
        find_page(five.index, Level.STUDY, [MatchKey("StudyDate", "2024-01-01")])
    with pytest.raises(UnsupportedKey, match="ReceivedAt is a return key only"):
        find_page(five.index, Level.STUDY, [MatchKey("ReceivedAt", "20240101")])
