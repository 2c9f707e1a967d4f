"""PS3.4 C.2.2.2 matching (archive.matching) against a real index, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from archive.index import Source
from archive.matching import InvalidValue, Level, MatchKey, UnsupportedKey, build_query, like_pattern
from archive.models import Instance, Patient, Series, Study
from archive.service import Archive
from helpers import write_instance

SRC = Source("import")

# (patient id, name, birth date, sex, study, date, time, accession, description, series: (uid, modality, number, sops))
CATALOGUE: list[dict[str, Any]] = [
    dict(PatientID="P1", PatientName="Nguyễn^Văn A", PatientBirthDate="19800102", PatientSex="M",
         StudyInstanceUID="1.2.826.0.1.1", StudyDate="20240105", StudyTime="101500", AccessionNumber="ACC_1",
         StudyDescription="CT 100% dose", ReferringPhysicianName="Trần^Bình",
         series=[("1.2.826.0.1.1.1", "CT", 1, ["1.2.826.0.1.1.1.1", "1.2.826.0.1.1.1.2"]),
                 ("1.2.826.0.1.1.2", "MR", 2, ["1.2.826.0.1.1.2.1"])]),
    dict(PatientID="P2", PatientName="NGUYEN^THI B", PatientBirthDate="19900315", PatientSex="F",
         StudyInstanceUID="1.2.826.0.1.2", StudyDate="20240131", StudyTime="083000.25", AccessionNumber="ACC11",
         StudyDescription="MR 1000 dose", ReferringPhysicianName="",
         series=[("1.2.826.0.1.2.1", "MR", 1, ["1.2.826.0.1.2.1.1"])]),
    dict(PatientID="P3", PatientName="Trần^Đức", PatientBirthDate="19751231", PatientSex="M",
         StudyInstanceUID="1.2.826.0.1.3", StudyDate="20231215", StudyTime="2359", AccessionNumber="X9",
         StudyDescription="CT head", ReferringPhysicianName="",
         series=[("1.2.826.0.1.3.1", "CT", 3, ["1.2.826.0.1.3.1.1"])]),
    dict(PatientID="P4", PatientName="Lê^Thị", PatientBirthDate="", PatientSex="",
         StudyInstanceUID="1.2.826.0.1.4", StudyDate=None, StudyTime=None, AccessionNumber="",
         StudyDescription="", ReferringPhysicianName="",
         series=[("1.2.826.0.1.4.1", "OT", None, ["1.2.826.0.1.4.1.1"])]),
]


@pytest.fixture
def arc(archive: Archive, tmp_path: Path) -> Archive:
    """The archive fixture (SQLite and PostgreSQL) holding CATALOGUE."""
    for study in CATALOGUE:
        attrs = {k: v for k, v in study.items() if k != "series"}
        for series_uid, modality, number, sops in study["series"]:
            for n, sop in enumerate(sops, start=1):
                path = write_instance(tmp_path / f"{sop}.dcm", SeriesInstanceUID=series_uid, SOPInstanceUID=sop,
                                      Modality=modality, SeriesNumber=number, InstanceNumber=n, **attrs)
                with open(path, "rb") as f:
                    archive.ingest_stream(f, SRC, name=path.name)
    return archive


def _ident(row: Any) -> str:
    if isinstance(row, Patient):
        return row.patient_id
    if isinstance(row, Study):
        return row.study_uid
    if isinstance(row, Series):
        return row.series_uid
    assert isinstance(row, Instance)
    return row.sop_instance_uid


def find(arc: Archive, level: str | Level, *, fuzzy: bool = False, **keys: str) -> list[str]:
    """Identifiers of the matching rows (PatientID / UIDs), in the query's order."""
    stmt = build_query(level, [MatchKey(k, v) for k, v in keys.items()], fuzzy=fuzzy)
    with arc.index.session() as s:
        return [_ident(row) for row in s.scalars(stmt)]


def studies(arc: Archive, *, fuzzy: bool = False, **keys: str) -> set[str]:
    """The matching studies, by the last component of their UID ("1".."4")."""
    return {uid.rsplit(".", 1)[1] for uid in find(arc, Level.STUDY, fuzzy=fuzzy, **keys)}


ALL = {"1", "2", "3", "4"}


def test_single_value_and_universal(arc: Archive) -> None:
    assert find(arc, "PATIENT", PatientID="P2") == ["P2"]
    assert find(arc, "PATIENT") == ["P1", "P2", "P3", "P4"]  # ordered by id
    assert studies(arc, PatientID="", StudyDate="", AccessionNumber="*") == ALL
    assert studies(arc, AccessionNumber="ACC11") == {"2"}
    assert studies(arc, AccessionNumber="acc11") == set()  # case-sensitive
    assert studies(arc, PatientSex="M") == {"1", "3"}
    assert studies(arc, StudyDate="20240105") == {"1"}
    assert studies(arc, PatientBirthDate="19900315") == {"2"}
    assert studies(arc, PatientName="Trần^Đức") == {"3"}
    assert studies(arc, PatientID="P1", AccessionNumber="X9") == set()  # keys are ANDed
    assert find(arc, "SERIES", SeriesNumber="2") == ["1.2.826.0.1.1.2"]
    assert find(arc, "IMAGE", SeriesInstanceUID="1.2.826.0.1.1.1", InstanceNumber="2") == ["1.2.826.0.1.1.1.2"]


def test_wildcards(arc: Archive) -> None:
    assert studies(arc, AccessionNumber="ACC*") == {"1", "2"}
    assert studies(arc, AccessionNumber="ACC?1") == {"1", "2"}
    assert studies(arc, AccessionNumber="?9") == {"3"}
    assert studies(arc, StudyDescription="CT*") == {"1", "3"}
    assert studies(arc, StudyDescription="*dose") == {"1", "2"}
    assert studies(arc, PatientName="*Đ?c") == {"3"}  # ? is one (non-ASCII) character
    assert find(arc, "SERIES", Modality="?R") == ["1.2.826.0.1.1.2", "1.2.826.0.1.2.1"]


def test_sql_wildcard_characters_in_data_are_literal(arc: Archive) -> None:
    assert like_pattern("a%b_c\\d*e?") == "a\\%b\\_c\\\\d%e_"
    # "_" is a literal underscore: ACC11 does not match.
    assert studies(arc, AccessionNumber="ACC_*") == {"1"}
    assert studies(arc, AccessionNumber="ACC_1") == {"1"}
    # "%" is a literal percent sign: "MR 1000 dose" does not match.
    assert studies(arc, StudyDescription="*100%*") == {"1"}
    assert studies(arc, StudyDescription="*0% d*") == {"1"}
    assert studies(arc, StudyDescription="CT [*") == set()  # "[" is no GLOB class on SQLite


def test_date_ranges(arc: Archive) -> None:
    assert studies(arc, StudyDate="20240101-") == {"1", "2"}
    assert studies(arc, StudyDate="-20240105") == {"1", "3"}  # the empty date of study 4 never matches a range
    assert studies(arc, StudyDate="20240105-20240131") == {"1", "2"}
    assert studies(arc, StudyDate="20231201-20231231") == {"3"}
    assert studies(arc, StudyDate="20240106-20240130") == set()
    assert studies(arc, PatientBirthDate="-19800102") == {"1", "3"}


def test_time_ranges(arc: Archive) -> None:
    assert studies(arc, StudyTime="1000-1100") == {"1"}
    assert studies(arc, StudyTime="-0830") == {"2"}  # 083000.25 is within the minute 08:30
    assert studies(arc, StudyTime="-083000.2") == {"2"}
    assert studies(arc, StudyTime="-083000.1") == set()
    assert studies(arc, StudyTime="083000.26-") == {"1", "3"}
    assert studies(arc, StudyTime="2300-") == {"3"}
    assert studies(arc, StudyTime="101500") == {"1"}


def test_uid_lists(arc: Archive) -> None:
    assert studies(arc, StudyInstanceUID="1.2.826.0.1.1\\1.2.826.0.1.3") == {"1", "3"}
    assert studies(arc, StudyInstanceUID="1.2.826.0.1.2") == {"2"}
    assert studies(arc, StudyInstanceUID="1.2.826.0.1.9\\1.2.826.0.1.4") == {"4"}
    assert find(arc, "IMAGE", SOPInstanceUID="1.2.826.0.1.1.1.2\\1.2.826.0.1.2.1.1") == [
        "1.2.826.0.1.1.1.2", "1.2.826.0.1.2.1.1"]
    assert len(find(arc, "IMAGE", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")) == 6


def test_modalities_in_study(arc: Archive) -> None:
    with arc.index.session() as s:
        stored = s.scalar(build_query("STUDY", [MatchKey("StudyInstanceUID", "1.2.826.0.1.1")]))
        assert stored is not None and stored.modalities_in_study == "CT\\MR"
    assert studies(arc, ModalitiesInStudy="CT") == {"1", "3"}
    assert studies(arc, ModalitiesInStudy="MR") == {"1", "2"}
    assert studies(arc, ModalitiesInStudy="CT\\OT") == {"1", "3", "4"}
    assert studies(arc, ModalitiesInStudy="M*") == {"1", "2"}
    assert studies(arc, ModalitiesInStudy="M*T") == set()  # no wildcard across "MR\CT"
    assert studies(arc, ModalitiesInStudy="US") == set()


def test_person_names_fuzzy_and_exact(arc: Archive) -> None:
    # Fuzzy: case- and diacritic-insensitive, on the folded name.
    assert studies(arc, fuzzy=True, PatientName="nguyen*") == {"1", "2"}
    assert studies(arc, fuzzy=True, PatientName="NGUYỄN*") == {"1", "2"}
    assert studies(arc, fuzzy=True, PatientName="*van*") == {"1"}
    assert studies(arc, fuzzy=True, PatientName="tran^duc") == {"3"}  # đ folds to d
    assert studies(arc, fuzzy=True, PatientName="le^thi") == {"4"}
    # Not fuzzy: the stored Unicode name, case-sensitive.
    assert studies(arc, PatientName="Nguy*") == {"1"}
    assert studies(arc, PatientName="NGUY*") == {"2"}
    assert studies(arc, PatientName="nguyen*") == set()
    assert studies(arc, PatientName="Nguyen*") == set()
    assert studies(arc, PatientName="*Văn*") == {"1"}
    # A key's own option overrides the query's.
    stmt = build_query(Level.STUDY, [MatchKey("PatientName", "nguyen*", fuzzy=True)])
    with arc.index.session() as s:
        assert len(s.scalars(stmt).all()) == 2


def test_hierarchical_keys_constrain_lower_levels(arc: Archive) -> None:
    assert find(arc, "SERIES", PatientID="P1") == ["1.2.826.0.1.1.1", "1.2.826.0.1.1.2"]
    assert find(arc, "SERIES", PatientID="P1", Modality="MR") == ["1.2.826.0.1.1.2"]
    assert find(arc, "IMAGE", PatientID="P1", Modality="CT") == ["1.2.826.0.1.1.1.1", "1.2.826.0.1.1.1.2"]
    assert find(arc, "IMAGE", StudyDate="20240101-", Modality="MR") == ["1.2.826.0.1.1.2.1", "1.2.826.0.1.2.1.1"]
    assert find(arc, "SERIES", fuzzy=True, PatientName="nguyen^thi*") == ["1.2.826.0.1.2.1"]
    assert find(arc, "SERIES", ModalitiesInStudy="CT", Modality="MR") == ["1.2.826.0.1.1.2"]
    assert find(arc, "PATIENT", PatientSex="M") == ["P1", "P3"]


@pytest.mark.parametrize("level, keyword", [
    ("STUDY", "PatientComments"),
    ("STUDY", "Modality"),  # a SERIES-level key in a STUDY-level query
    ("PATIENT", "StudyDate"),
])
def test_unsupported_keys(level: str, keyword: str) -> None:
    with pytest.raises(UnsupportedKey, match=keyword) as info:
        build_query(level, [MatchKey(keyword, "x")])
    assert isinstance(info.value, ValueError)
    assert info.value.keyword == keyword


@pytest.mark.parametrize("keyword, value, reason", [
    ("StudyDate", "2024-01-01", "YYYYMMDD"),
    ("StudyDate", "abc", "YYYYMMDD"),
    ("StudyDate", "20240230", "YYYYMMDD"),
    ("StudyDate", "20240101-20230101", "ends before it starts"),
    ("StudyDate", "-", "YYYYMMDD"),
    ("StudyTime", "2561", "HHMMSS"),
    ("StudyTime", "1200-1100", "ends before it starts"),
    ("StudyInstanceUID", "1.2.*", "wildcards"),
    ("StudyInstanceUID", "1.2.abc", "not a UID"),
    ("SeriesNumber", "one", "integer"),
])
def test_invalid_values(keyword: str, value: str, reason: str) -> None:
    level = "SERIES" if keyword == "SeriesNumber" else "STUDY"
    with pytest.raises(InvalidValue, match=reason) as info:
        build_query(level, [MatchKey(keyword, value)])
    assert isinstance(info.value, ValueError)
    assert keyword in str(info.value) and value in str(info.value)


def test_invalid_level() -> None:
    with pytest.raises(InvalidValue, match="PATIENT, STUDY, SERIES or IMAGE"):
        build_query("FRAME", [])
    assert build_query("study", []).compile() is not None
