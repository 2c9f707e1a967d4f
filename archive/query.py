"""Hierarchical queries over the index: matching keys in, result rows out, streamed.

The one place C-FIND (``dicom_node.handlers.handle_find``) and, later, QIDO-RS
look things up. A protocol adapter turns its request into :class:`MatchKey`
objects and a :class:`Level`; :func:`find` checks them (raising
:class:`UnsupportedKey` or :class:`InvalidValue` before any row is read),
then streams the matching rows in batches, each as a mapping of the
requested keywords to their values at the query level and above.

Which keys are accepted:

* the matching keys of :data:`archive.matching.ATTRIBUTES` at the query level
  or above, with any value (PS3.4 C.2.2.2);
* the computed return keys (:data:`COMPUTED`: ModalitiesInStudy is matchable,
  the ``NumberOf…Related…`` counts are return keys only) with an empty value;
* keys below the query level, and unknown keywords, with an empty value: they
  match everything and are left out of the result (the adapter returns them
  empty);
* anything else with a value raises :class:`UnsupportedKey`.

For pages of people-facing lists (the study list), :func:`find_page` adds
sorting (:data:`SORTABLE`), offset/limit and the total count to the same
matching, and the archive's own return keys (:data:`ARCHIVE_KEYS`: when a
study arrived).

References
----------
DICOM PS3.4 C.2.2.2 "Attribute Matching", C.3 "Standard Query/Retrieve
Information Models", C.6.1.1 and C.6.2.1 (the keys of the Patient Root and
Study Root models).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, aliased, contains_eager, joinedload
from sqlalchemy.sql import util as sql_util

from archive.index import CatalogIndex, IndexUnavailable
from archive.matching import (
    ATTRIBUTES,
    ENTITIES,
    InvalidValue,
    Level,
    MatchKey,
    UnsupportedKey,
    build_query,
    parse_level,
)
from archive.models import Instance, Patient, Series, Study
from archive.scope import StudyScope

BATCH = 200  # rows fetched from the database at a time

Row = dict[str, str | int]


def _text(value: Any) -> str | int:
    return "" if value is None else value


# find_page (the study list) still loads ORM entities and reads the values from them (below);
# find streams Core rows of the columns in _COLUMNS.
# How each keyword's value is read from a row of its level (the row's own
# entity, or one reached by the many-to-one links upwards).
_PATIENT_VALUES: dict[str, Callable[[Patient], str | int]] = {
    "PatientName": lambda p: p.patient_name,
    "PatientID": lambda p: p.patient_id,
    "PatientBirthDate": lambda p: p.birth_date,
    "PatientSex": lambda p: p.sex,
}
_STUDY_VALUES: dict[str, Callable[[Study], str | int]] = {
    "StudyInstanceUID": lambda s: s.study_uid,
    "StudyDate": lambda s: s.study_date,
    "StudyTime": lambda s: s.study_time,
    "AccessionNumber": lambda s: s.accession_number,
    "StudyDescription": lambda s: s.study_description,
    "ReferringPhysicianName": lambda s: s.referring_physician_name,
    "StudyID": lambda s: s.study_id,
    "ModalitiesInStudy": lambda s: s.modalities_in_study,
    "NumberOfStudyRelatedSeries": lambda s: s.num_series,
    "NumberOfStudyRelatedInstances": lambda s: s.num_instances,
}
_SERIES_VALUES: dict[str, Callable[[Series], str | int]] = {
    "SeriesInstanceUID": lambda s: s.series_uid,
    "Modality": lambda s: s.modality,
    "SeriesNumber": lambda s: _text(s.series_number),
    "SeriesDescription": lambda s: s.series_description,
    "BodyPartExamined": lambda s: s.body_part_examined,
    "NumberOfSeriesRelatedInstances": lambda s: s.num_instances,
}
_INSTANCE_VALUES: dict[str, Callable[[Instance], str | int]] = {
    "SOPInstanceUID": lambda i: i.sop_instance_uid,
    "SOPClassUID": lambda i: i.sop_class_uid,
    "InstanceNumber": lambda i: _text(i.instance_number),
    # Return keys only (QIDO-RS instance defaults, PS3.18 Table 10.6.3-5), from the index.
    "Rows": lambda i: _text(i.rows),
    "Columns": lambda i: _text(i.columns),
    "NumberOfFrames": lambda i: i.number_of_frames,
    "BitsAllocated": lambda i: _text((i.display or {}).get("BitsAllocated")),
    "TransferSyntaxUID": lambda i: i.transfer_syntax_uid,  # as stored (retrieve builds its contexts from it)
}

_OtherStudy = aliased(Study)

# The column each keyword is read from, by level. Rows are plain Core rows of
# these columns (no ORM objects: loading entities, their JSON columns decoded,
# was most of a listing's time).
_PATIENT_COLUMNS: dict[str, ColumnElement[Any]] = {
    "PatientName": Patient.patient_name,  # type: ignore[dict-item]
    "PatientID": Patient.patient_id,  # type: ignore[dict-item]
    "PatientBirthDate": Patient.birth_date,  # type: ignore[dict-item]
    "PatientSex": Patient.sex,  # type: ignore[dict-item]
    "NumberOfPatientRelatedStudies": (select(func.count(_OtherStudy.id))
                                      .where(_OtherStudy.patient_fk == Patient.id).scalar_subquery()),
}
_STUDY_COLUMNS: dict[str, ColumnElement[Any]] = {
    "StudyInstanceUID": Study.study_uid,  # type: ignore[dict-item]
    "StudyDate": Study.study_date,  # type: ignore[dict-item]
    "StudyTime": Study.study_time,  # type: ignore[dict-item]
    "AccessionNumber": Study.accession_number,  # type: ignore[dict-item]
    "StudyDescription": Study.study_description,  # type: ignore[dict-item]
    "ReferringPhysicianName": Study.referring_physician_name,  # type: ignore[dict-item]
    "StudyID": Study.study_id,  # type: ignore[dict-item]
    "ModalitiesInStudy": Study.modalities_in_study,  # type: ignore[dict-item]
    "NumberOfStudyRelatedSeries": Study.num_series,  # type: ignore[dict-item]
    "NumberOfStudyRelatedInstances": Study.num_instances,  # type: ignore[dict-item]
}
_SERIES_COLUMNS: dict[str, ColumnElement[Any]] = {
    "SeriesInstanceUID": Series.series_uid,  # type: ignore[dict-item]
    "Modality": Series.modality,  # type: ignore[dict-item]
    "SeriesNumber": Series.series_number,  # type: ignore[dict-item]
    "SeriesDescription": Series.series_description,  # type: ignore[dict-item]
    "BodyPartExamined": Series.body_part_examined,  # type: ignore[dict-item]
    "NumberOfSeriesRelatedInstances": Series.num_instances,  # type: ignore[dict-item]
}
_INSTANCE_COLUMNS: dict[str, ColumnElement[Any]] = {
    "SOPInstanceUID": Instance.sop_instance_uid,  # type: ignore[dict-item]
    "SOPClassUID": Instance.sop_class_uid,  # type: ignore[dict-item]
    "InstanceNumber": Instance.instance_number,  # type: ignore[dict-item]
    # Return keys only (QIDO-RS instance defaults, PS3.18 Table 10.6.3-5), from the index.
    "Rows": Instance.rows,  # type: ignore[dict-item]
    "Columns": Instance.columns,  # type: ignore[dict-item]
    "NumberOfFrames": Instance.number_of_frames,  # type: ignore[dict-item]
    # Read from the display JSON by the database (JSON_EXTRACT / ->>), not by decoding it here.
    "BitsAllocated": Instance.display["BitsAllocated"].as_integer(),
    "TransferSyntaxUID": Instance.transfer_syntax_uid,  # type: ignore[dict-item]  # as stored
}
_COLUMNS: dict[str, tuple[Level, ColumnElement[Any]]] = {
    **{k: (Level.PATIENT, c) for k, c in _PATIENT_COLUMNS.items()},
    **{k: (Level.STUDY, c) for k, c in _STUDY_COLUMNS.items()},
    **{k: (Level.SERIES, c) for k, c in _SERIES_COLUMNS.items()},
    **{k: (Level.IMAGE, c) for k, c in _INSTANCE_COLUMNS.items()},
}

# Each column labelled with its keyword, built once (labels are immutable; building them was a
# tenth of a small query's time).
_LABELLED: dict[str, ColumnElement[Any]] = {keyword: column.label(keyword) for keyword, (_, column) in _COLUMNS.items()}

# Return keys computed from the index rather than matched on a column (PS3.4 C.3.4).
COMPUTED: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
}

# Every keyword find() can return, with its level.
RETURN_KEYS: dict[str, Level] = {
    **{k: Level.PATIENT for k in _PATIENT_VALUES},
    **{k: Level.STUDY for k in _STUDY_VALUES},
    **{k: Level.SERIES for k in _SERIES_VALUES},
    **{k: Level.IMAGE for k in _INSTANCE_VALUES},
    **COMPUTED,
}


def _sort_keys(level: Level, keys: Sequence[MatchKey]) -> tuple[list[MatchKey], list[str]]:
    """(keys to match on, keywords to return); :class:`UnsupportedKey` for a value we cannot match."""
    matching: list[MatchKey] = []
    returned: list[str] = []
    for key in keys:
        value = key.value.strip(" \0")
        key_level = RETURN_KEYS.get(key.keyword)
        attribute = ATTRIBUTES.get(key.keyword)
        if key_level is None or key_level.depth > level.depth:
            if value:
                if key_level is None:
                    raise UnsupportedKey(key.keyword)
                raise UnsupportedKey(key.keyword, f"is a {key_level.value}-level key; "
                                                  f"it cannot be matched in a {level.value}-level query")
            continue
        if attribute is None:
            if value:
                raise UnsupportedKey(key.keyword, "is a return key only; it cannot be matched")
        else:
            matching.append(key)
        returned.append(key.keyword)
    return matching, returned


def _row_values(entity: Any, level: Level, wanted: list[str],
                patient_studies: Callable[[int], int]) -> Row:
    """The wanted keywords' values from one result row of ``level``."""
    instance = entity if level is Level.IMAGE else None
    series = instance.series if instance is not None else (entity if level is Level.SERIES else None)
    study = series.study if series is not None else (entity if level is Level.STUDY else None)
    patient = study.patient if study is not None else entity
    row: Row = {}
    for keyword in wanted:
        if keyword in _PATIENT_VALUES:
            row[keyword] = _PATIENT_VALUES[keyword](patient)
        elif keyword in _STUDY_VALUES and study is not None:
            row[keyword] = _STUDY_VALUES[keyword](study)
        elif keyword in _SERIES_VALUES and series is not None:
            row[keyword] = _SERIES_VALUES[keyword](series)
        elif keyword in _INSTANCE_VALUES and instance is not None:
            row[keyword] = _INSTANCE_VALUES[keyword](instance)
        elif keyword == "NumberOfPatientRelatedStudies":
            row[keyword] = patient_studies(patient.id)
    return row


# The many-to-one links from each level's rows upwards, in order.
_PARENTS: dict[Level, list[Any]] = {
    Level.IMAGE: [Instance.series, Series.study, Study.patient],
    Level.SERIES: [Series.study, Study.patient],
    Level.STUDY: [Study.patient],
    Level.PATIENT: [],
}


def _with_parents(stmt: Any, level: Level) -> Any:
    """Load the rows above ``level`` with the result rows (many-to-one joins, one query).

    A parent table that the matching already joined (a PatientName key in a
    STUDY query) is loaded from that join (``contains_eager``) rather than
    joined a second time: the second join made PostgreSQL hash the whole
    patients table to fetch a few dozen names.
    """
    joined = {table for from_ in stmt.get_final_froms() for table in sql_util.find_tables(from_)}
    option: Any = None
    for link in _PARENTS[level]:
        parent_joined = link.property.mapper.local_table in joined
        if option is None:
            option = contains_eager(link) if parent_joined else joinedload(link, innerjoin=True)
        else:
            option = option.contains_eager(link) if parent_joined else option.joinedload(link, innerjoin=True)
    return stmt if option is None else stmt.options(option)


_IDS: dict[Level, ColumnElement[Any]] = {
    Level.PATIENT: Patient.id,  # type: ignore[dict-item]
    Level.STUDY: Study.id,  # type: ignore[dict-item]
    Level.SERIES: Series.id,  # type: ignore[dict-item]
    Level.IMAGE: Instance.id,  # type: ignore[dict-item]
}


def select_matches(level: Level, matching: Sequence[MatchKey], returned: Sequence[str], *,
                   fuzzy: bool = False) -> Any:
    """The Core SELECT of the ``returned`` keywords' columns of the rows matching every key, by id.

    The levels above ``level`` are joined only as far as a key or a returned keyword needs, each once.
    """
    columns: list[ColumnElement[Any]] = [_LABELLED[keyword] for keyword in returned]
    highest = min((_COLUMNS[keyword][0] for keyword in returned), key=lambda lv: lv.depth, default=level)
    return build_query(level, matching, fuzzy=fuzzy, columns=columns or [_IDS[level]], join_up_to=highest)


def in_scope(stmt: Any, level: Level, scope: StudyScope | None) -> Any:
    """``stmt`` (a SELECT of ``level`` rows) restricted to the rows of the studies in ``scope``.

    A semi-join on the studies in scope, whatever the matching already joined
    (an uncorrelated ``IN (SELECT ...)`` both engines plan as a hash or index lookup).
    """
    if scope is None or scope.everything:
        return stmt
    if level is Level.STUDY:
        return stmt.where(scope.study_condition())
    studies = select(Study.id).where(scope.study_condition())
    if level is Level.SERIES:
        return stmt.where(Series.study_fk.in_(studies))
    if level is Level.IMAGE:
        return stmt.where(Instance.series_fk.in_(select(Series.id).where(Series.study_fk.in_(studies))))
    return stmt.where(Patient.id.in_(select(Study.patient_fk).where(scope.study_condition())))


def find(index: CatalogIndex, level: str | Level, keys: Sequence[MatchKey], *,
         fuzzy: bool = False, scope: StudyScope | None = None) -> Iterator[Row]:
    """The rows of ``level`` matching every key, streamed, as {keyword: value} of the requested keys.

    Parameters
    ----------
    index
        The catalogue to query.
    level
        PATIENT, STUDY, SERIES or IMAGE.
    keys
        Matching and return keys (an empty value: universal matching, a pure
        return key). Only keys at ``level`` and above are returned.
    fuzzy
        Case- and diacritic-insensitive matching of PatientName (see
        :func:`archive.matching.person_name_match`); a key's own ``fuzzy`` wins.
    scope
        Only rows of the studies in this scope (None: everything); filtered in SQL.

    Raises
    ------
    UnsupportedKey
        A key with a value that cannot be matched (unknown, below the level,
        or a return key only). Raised by this call, before any row is read.
    InvalidValue
        A malformed level or value. Raised by this call as well.
    IndexUnavailable
        The database failed while rows were read (raised by the iterator).

    Notes
    -----
    Rows are read ``BATCH`` at a time (``yield_per``), never all at once; the
    database connection stays open until the iterator is exhausted or closed.
    Values are as indexed: DICOM strings for dates and times, ``int`` for
    numbers and counts, ``""`` for an unknown number.
    """
    level = parse_level(level)
    matching, returned = _sort_keys(level, keys)
    returned = list(dict.fromkeys(returned))
    stmt = in_scope(select_matches(level, matching, returned, fuzzy=fuzzy), level, scope)
    return _stream(index, stmt, returned)


def _stream(index: CatalogIndex, stmt: Any, returned: list[str]) -> Iterator[Row]:
    try:
        with index.engine.connect() as conn:
            for batch in conn.execution_options(yield_per=BATCH).execute(stmt).partitions():
                for values in batch:
                    yield {keyword: "" if value is None else value for keyword, value in zip(returned, values)}
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"index query failed: {exc.__class__.__name__}: {exc}") from None


# -- pages: sorted, offset/limit, with the total (the study list) ----------------------------------------

# Return keys that are the archive's own, not DICOM attributes: never sent to a DICOM peer.
ARCHIVE_KEYS: dict[str, Level] = {
    "ReceivedAt": Level.STUDY,  # when the study's first instance arrived (aware datetime, UTC)
}

# What a page can be sorted on: the level of the key and its columns, most significant first.
# Names sort on their folded form, so that Nguyễn sits with Nguyen whatever the case.
SORTABLE: dict[str, tuple[Level, tuple[InstrumentedAttribute[Any], ...]]] = {
    "PatientName": (Level.PATIENT, (Patient.patient_name_folded, Patient.patient_name)),
    "PatientID": (Level.PATIENT, (Patient.patient_id,)),
    "PatientBirthDate": (Level.PATIENT, (Patient.birth_date,)),
    "StudyDate": (Level.STUDY, (Study.study_date, Study.study_time)),
    "AccessionNumber": (Level.STUDY, (Study.accession_number,)),
    "StudyDescription": (Level.STUDY, (Study.study_description,)),
    "ModalitiesInStudy": (Level.STUDY, (Study.modalities_in_study,)),
    "NumberOfStudyRelatedInstances": (Level.STUDY, (Study.num_instances,)),
    "ReceivedAt": (Level.STUDY, (Study.received_at,)),
    "SeriesNumber": (Level.SERIES, (Series.series_number,)),
    "Modality": (Level.SERIES, (Series.modality,)),
    "InstanceNumber": (Level.IMAGE, (Instance.instance_number,)),
}

PageRow = dict[str, str | int | dt.datetime]


@dataclass(frozen=True)
class SortKey:
    """Sort the rows of a page by ``keyword`` (a key of :data:`SORTABLE`)."""

    keyword: str
    descending: bool = False


@dataclass(frozen=True)
class Page:
    """One page of matches: ``rows`` from ``offset`` on (at most ``limit``), of ``total`` matching rows."""

    rows: list[PageRow]
    total: int
    offset: int
    limit: int | None


# How each level's rows join the next level up (the joins build_query makes).
_UP: dict[Level, tuple[Any, Any]] = {
    Level.IMAGE: (Series, Instance.series_fk == Series.id),
    Level.SERIES: (Study, Series.study_fk == Study.id),
    Level.STUDY: (Patient, Study.patient_fk == Patient.id),
}


def _joined_tables(stmt: Any) -> set[Any]:
    return {table for from_ in stmt.get_final_froms() for table in sql_util.find_tables(from_)}


def _join_up_to(stmt: Any, level: Level, top: Level) -> Any:
    """``stmt`` (rows of ``level``) joined upwards as far as ``top``, adding only the joins it lacks."""
    joined = _joined_tables(stmt)
    current = level
    while current.depth > top.depth:
        parent, condition = _UP[current]
        if parent.__table__ not in joined:
            stmt = stmt.join(parent, condition)
        current = _LEVEL_ABOVE[current]
    return stmt


_LEVEL_ABOVE = {Level.IMAGE: Level.SERIES, Level.SERIES: Level.STUDY, Level.STUDY: Level.PATIENT}


def _ordered(stmt: Any, level: Level, sort: Sequence[SortKey]) -> Any:
    """``stmt`` ordered by the sort keys, then by row id (a stable order, so pages never overlap)."""
    columns: list[Any] = []
    for key in sort:
        found = SORTABLE.get(key.keyword)
        if found is None:
            raise UnsupportedKey(key.keyword, "cannot be sorted on")
        key_level, key_columns = found
        if key_level.depth > level.depth:
            raise UnsupportedKey(key.keyword, f"is a {key_level.value}-level key; "
                                              f"it cannot sort a {level.value}-level query")
        stmt = _join_up_to(stmt, level, key_level)
        columns += [c.desc() if key.descending else c.asc() for c in key_columns]
    entity = ENTITIES[level]
    return stmt.order_by(None).order_by(*columns, entity.id)


def _archive_value(keyword: str, entity: Any, level: Level) -> str | int | dt.datetime:
    study = entity if level is Level.STUDY else None
    if keyword == "ReceivedAt" and study is not None:
        received: dt.datetime = study.received_at
        # SQLite keeps no zone: the index writes UTC (models.utcnow).
        return received if received.tzinfo is not None else received.replace(tzinfo=dt.timezone.utc)
    return ""


def _split_archive_keys(level: Level, keys: Sequence[MatchKey]) -> tuple[list[MatchKey], list[str]]:
    """(DICOM keys, archive return keys wanted at ``level``); an archive key with a value is refused."""
    dicom: list[MatchKey] = []
    archive_keys: list[str] = []
    for key in keys:
        key_level = ARCHIVE_KEYS.get(key.keyword)
        if key_level is None:
            dicom.append(key)
            continue
        if key.value.strip(" \0"):
            raise UnsupportedKey(key.keyword, "is a return key only; it cannot be matched")
        if key_level.depth <= level.depth:
            archive_keys.append(key.keyword)
    return dicom, archive_keys


def find_page(index: CatalogIndex, level: str | Level, keys: Sequence[MatchKey], *, fuzzy: bool = False,
              scope: StudyScope | None = None, sort: Sequence[SortKey] = (), offset: int = 0,
              limit: int | None = None) -> Page:
    """One sorted page of the rows :func:`find` would match, and how many match in all.

    Parameters
    ----------
    index, level, keys, fuzzy, scope
        As for :func:`find` (the same matching, the same visibility). ``keys`` may also name the
        archive's own return keys (:data:`ARCHIVE_KEYS`, e.g. ``ReceivedAt``)
        with an empty value.
    sort
        Keys of :data:`SORTABLE` at ``level`` or above, most significant first;
        ties (and an empty ``sort``) are broken by the order rows were indexed in.
    offset, limit
        Skip ``offset`` matching rows, return at most ``limit`` (``None``: all).

    Raises
    ------
    UnsupportedKey, InvalidValue
        As for :func:`find`; also a key that cannot be sorted on, a negative
        ``offset`` or a ``limit`` under 1.
    IndexUnavailable
        The database failed.
    """
    if offset < 0:
        raise InvalidValue("offset", str(offset), "must be 0 or more")
    if limit is not None and limit < 1:
        raise InvalidValue("limit", str(limit), "must be 1 or more")
    level = parse_level(level)
    dicom_keys, archive_keys = _split_archive_keys(level, keys)
    matching, returned = _sort_keys(level, dicom_keys)
    base = in_scope(build_query(level, matching, fuzzy=fuzzy), level, scope)
    counted = select(func.count()).select_from(base.order_by(None).subquery())
    stmt = _with_parents(_ordered(base, level, sort), level).offset(offset).limit(limit)
    try:
        with index.session() as session:
            total = session.scalar(counted) or 0
            counts: dict[int, int] = {}

            def patient_studies(patient_id: int) -> int:
                if patient_id not in counts:
                    counts[patient_id] = session.scalar(
                        select(func.count(Study.id)).where(Study.patient_fk == patient_id)) or 0
                return counts[patient_id]

            rows: list[PageRow] = []
            for entity in session.execute(stmt).unique().scalars():
                row: PageRow = dict(_row_values(entity, level, returned, patient_studies))
                for keyword in archive_keys:
                    row[keyword] = _archive_value(keyword, entity, level)
                rows.append(row)
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"index query failed: {exc.__class__.__name__}: {exc}") from None
    return Page(rows, total, offset, limit)


__all__ = ["ARCHIVE_KEYS", "BATCH", "COMPUTED", "RETURN_KEYS", "SORTABLE", "InvalidValue", "Level", "MatchKey",
           "Page", "PageRow", "Row", "SortKey", "StudyScope", "UnsupportedKey", "find", "find_page", "in_scope",
           "select_matches"]
