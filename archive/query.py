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

References
----------
DICOM PS3.4 C.2.2.2 "Attribute Matching", C.3 "Standard Query/Retrieve
Information Models", C.6.1.1 and C.6.2.1 (the keys of the Patient Root and
Study Root models).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import aliased

from archive.index import CatalogIndex, IndexUnavailable
from archive.matching import (
    ATTRIBUTES,
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

# Return keys computed from the index rather than matched on a column (PS3.4 C.3.4).
COMPUTED: dict[str, Level] = {
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
}

# Every keyword find() can return, with its level.
RETURN_KEYS: dict[str, Level] = {**{k: level for k, (level, _) in _COLUMNS.items()}, **COMPUTED}


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
    columns: list[ColumnElement[Any]] = [_COLUMNS[keyword][1].label(keyword) for keyword in returned]
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


__all__ = ["BATCH", "COMPUTED", "RETURN_KEYS", "InvalidValue", "Level", "MatchKey", "Row", "StudyScope",
           "UnsupportedKey", "find", "in_scope", "select_matches"]
