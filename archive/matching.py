"""DICOM attribute matching (PS3.4 C.2.2.2) as SQL WHERE clauses, shared by C-FIND and QIDO-RS.

A protocol adapter turns its request into :class:`MatchKey` objects (keyword and
value, already decoded to Unicode) and calls :func:`build_query` with the query
level; what comes back is a ``SELECT`` of the ORM rows of that level, joined
upwards so that keys of higher levels constrain it. The kinds of matching:

* universal (C.2.2.2.3): an empty value, or ``*`` alone, adds no condition;
* single value (C.2.2.2.1): equality, case-sensitive (PN: case- and
  diacritic-insensitive on the folded name when *fuzzy* is asked for);
* wildcard (C.2.2.2.4): ``*`` and ``?`` in text, CS and PN values, as SQL
  ``LIKE`` (``GLOB`` on SQLite, whose ``LIKE`` ignores case);
* range (C.2.2.2.5): ``A-``, ``-B`` and ``A-B`` for DA, TM and DT, compared
  as text (the index keeps dates and times as DICOM strings);
* list of UIDs (C.2.2.2.2): backslash-separated UIDs as ``IN``.

References
----------
DICOM PS3.4 C.2.2.2 "Attribute Matching"; PS3.18 §8.3.4 (QIDO-RS query parameters).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from sqlalchemy import Boolean, ColumnElement, Select, and_, bindparam, exists, or_, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute, aliased
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from archive.dataset import fold_name
from archive.models import Instance, Patient, Series, Study


class UnsupportedKey(ValueError):
    """A matching key we cannot match on (unknown keyword, or below the query level)."""

    def __init__(self, keyword: str, reason: str = "is not a supported matching key") -> None:
        super().__init__(f"{keyword} {reason}")
        self.keyword = keyword


class InvalidValue(ValueError):
    """A matching key whose value is malformed for its VR (a bad date, a reversed range, …)."""

    def __init__(self, keyword: str, value: str, reason: str) -> None:
        super().__init__(f"{keyword}={value!r}: {reason}")
        self.keyword = keyword
        self.value = value


class Level(str, Enum):
    """Query/Retrieve levels, top to bottom (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


class Kind(str, Enum):
    """How values of an attribute are matched (grouped by VR)."""

    TEXT = "text"  # LO, SH, ST...: single value, wildcard
    PN = "PN"  # person name: as TEXT, or folded when fuzzy
    DA = "DA"  # date: single value, range
    TM = "TM"  # time: single value, range
    DT = "DT"  # date-time: single value, range
    UI = "UI"  # UID: single value, list of UIDs
    IS = "IS"  # integer string: single value
    CS = "CS"  # code string: single value, wildcard


@dataclass(frozen=True)
class MatchKey:
    """One matching key: a DICOM keyword and its value as received (decoded to Unicode).

    ``fuzzy`` overrides the query's fuzzy person-name matching for this key
    (``None``: use the query's setting).
    """

    keyword: str
    value: str
    fuzzy: bool | None = None


@dataclass(frozen=True)
class Attribute:
    """Where a matching key lives in the index and how it is matched."""

    keyword: str
    level: Level
    column: InstrumentedAttribute[Any]
    kind: Kind
    folded: InstrumentedAttribute[Any] | None = None  # the fuzzy-matching form of a PN column


def _attributes(*items: Attribute) -> dict[str, Attribute]:
    return {a.keyword: a for a in items}


ATTRIBUTES: dict[str, Attribute] = _attributes(
    Attribute("PatientID", Level.PATIENT, Patient.patient_id, Kind.TEXT),
    Attribute("PatientName", Level.PATIENT, Patient.patient_name, Kind.PN, Patient.patient_name_folded),
    Attribute("PatientBirthDate", Level.PATIENT, Patient.birth_date, Kind.DA),
    Attribute("PatientSex", Level.PATIENT, Patient.sex, Kind.CS),
    Attribute("StudyInstanceUID", Level.STUDY, Study.study_uid, Kind.UI),
    Attribute("StudyDate", Level.STUDY, Study.study_date, Kind.DA),
    Attribute("StudyTime", Level.STUDY, Study.study_time, Kind.TM),
    Attribute("AccessionNumber", Level.STUDY, Study.accession_number, Kind.TEXT),
    Attribute("StudyDescription", Level.STUDY, Study.study_description, Kind.TEXT),
    Attribute("ReferringPhysicianName", Level.STUDY, Study.referring_physician_name, Kind.PN),
    Attribute("StudyID", Level.STUDY, Study.study_id, Kind.TEXT),
    # Matched against the modalities of the study's series (see _modalities_in_study).
    Attribute("ModalitiesInStudy", Level.STUDY, Study.modalities_in_study, Kind.CS),
    Attribute("SeriesInstanceUID", Level.SERIES, Series.series_uid, Kind.UI),
    Attribute("Modality", Level.SERIES, Series.modality, Kind.CS),
    Attribute("SeriesNumber", Level.SERIES, Series.series_number, Kind.IS),
    Attribute("SeriesDescription", Level.SERIES, Series.series_description, Kind.TEXT),
    Attribute("BodyPartExamined", Level.SERIES, Series.body_part_examined, Kind.CS),
    Attribute("SOPInstanceUID", Level.IMAGE, Instance.sop_instance_uid, Kind.UI),
    Attribute("SOPClassUID", Level.IMAGE, Instance.sop_class_uid, Kind.UI),
    Attribute("InstanceNumber", Level.IMAGE, Instance.instance_number, Kind.IS),
)

ENTITIES: dict[Level, type[Patient] | type[Study] | type[Series] | type[Instance]] = {
    Level.PATIENT: Patient,
    Level.STUDY: Study,
    Level.SERIES: Series,
    Level.IMAGE: Instance,
}

# -- wildcards ---------------------------------------------------------------


def has_wildcards(value: str) -> bool:
    return "*" in value or "?" in value


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as a SQL LIKE pattern with ``ESCAPE '\\'``: ``a_b*`` -> ``a\\_b%``."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern: ``*`` and ``?`` stay, ``[`` is bracketed."""
    return value.replace("[", "[[]")


class _WildcardMatch(FunctionElement[bool]):
    """``column LIKE pattern ESCAPE '\\'``; ``column GLOB pattern`` on SQLite.

    SQLite's LIKE ignores ASCII case, where DICOM wildcard matching is
    case-sensitive; GLOB is case-sensitive (and can use an index for a prefix).
    Both patterns are bound parameters, so compiled statements stay cacheable.
    """

    name = "wildcard_match"
    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True


@compiles(_WildcardMatch)
def _compile_like(element: _WildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    column, like, _glob = list(element.clauses)
    return compiler.process(column.like(like, escape="\\"), **kw)


@compiles(_WildcardMatch, "sqlite")
def _compile_glob(element: _WildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    column, _like, glob = list(element.clauses)
    return compiler.process(column.op("GLOB", is_comparison=True)(glob), **kw)


class _BroadWildcardMatch(_WildcardMatch):
    """A wildcard match expected to select a large share of the rows: not a way into the table on SQLite.

    SQLite has no statistics on value ranges (no STAT4 in Python's build), so
    it rates ``name GLOB 'tran*'`` as selective as a month of study dates and
    may read a tenth of the studies through the name index to keep a dozen.
    ``likelihood(…, 0.5)`` makes the term a filter: a date, a PatientID or a
    full name drives the plan; alone, it is a scan of the patients (which a
    match on a tenth of them costs anyway). PostgreSQL has histograms and
    gets the plain ``LIKE``.
    """

    name = "broad_wildcard_match"
    inherit_cache = True


@compiles(_BroadWildcardMatch, "sqlite")
def _compile_broad_glob(element: _BroadWildcardMatch, compiler: SQLCompiler, **kw: Any) -> str:
    return f"likelihood({_compile_glob(element, compiler, **kw)}, 0.5)"


def wildcard_match(column: ColumnElement[Any] | InstrumentedAttribute[Any], value: str, *,
                   broad: bool = False) -> ColumnElement[bool]:
    """Wildcard matching (C.2.2.2.4): ``*`` any run of characters, ``?`` one character, case-sensitive.

    ``%``, ``_`` and ``\\`` in the value are literal characters. ``broad``: the
    pattern is expected to match many rows (see :class:`_BroadWildcardMatch`);
    the result is the same, only the query plan differs.
    """
    return (_BroadWildcardMatch if broad else _WildcardMatch)(
        column,
        bindparam(None, like_pattern(value), unique=True),
        bindparam(None, glob_pattern(value), unique=True),
    )


def single_value_match(column: ColumnElement[Any] | InstrumentedAttribute[Any], value: Any) -> ColumnElement[bool]:
    """Single value matching (C.2.2.2.1): equality."""
    return column == value


def universal_match() -> ColumnElement[bool]:
    """Universal matching (C.2.2.2.3): every entity matches."""
    return true()


def is_universal(value: str) -> bool:
    """An empty value, or ``*`` alone, matches everything."""
    return value == "" or value == "*"


def text_match(column: ColumnElement[Any] | InstrumentedAttribute[Any], value: str) -> ColumnElement[bool]:
    """Single value or wildcard matching, as the value has wildcards or not."""
    return wildcard_match(column, value) if has_wildcards(value) else single_value_match(column, value)


def person_name_match(attribute: Attribute, value: str, *, fuzzy: bool = False) -> ColumnElement[bool]:
    """Person-name matching: case-sensitive on the stored name, or on the folded name when ``fuzzy``.

    The folded form (:func:`archive.dataset.fold_name`: lower case, no
    diacritics, đ→d) exists for PatientName only; other PN attributes are
    matched as stored even when ``fuzzy`` is set.
    """
    column = attribute.column
    if fuzzy and attribute.folded is not None:
        column, value = attribute.folded, fold_name(value)
    if has_wildcards(value):
        return wildcard_match(column, value, broad=_family_name_only(value))
    return single_value_match(column, value)


def _family_name_only(value: str) -> bool:
    """Whether a name pattern's literal prefix stops within the family name (``TRAN*``, ``Ng?yen*``).

    Family names are few (Nguyễn alone is about 38 % of Vietnamese names): such
    a prefix selects too many people to be the way into the index.
    """
    prefix = re.split(r"[*?]", value, maxsplit=1)[0]
    return "^" not in prefix


# -- ranges ------------------------------------------------------------------

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_FORMATS = {Kind.DA: "YYYYMMDD", Kind.TM: "HHMMSS.FFFFFF (HH, HHMM, HHMMSS also)",
            Kind.DT: "YYYYMMDDHHMMSS.FFFFFF (leading parts only also)"}


def _check_date(text: str) -> bool:
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _bound(kind: Kind, text: str, *, upper: bool) -> str | None:
    """A range bound as a comparable DICOM string, or None when malformed.

    A lower bound of reduced precision compares as the start of its unit as
    it is (``1010`` ≤ ``101000.5``). An upper bound is extended to the end of
    its unit: ``-1010`` takes in ``101059.999999``.
    """
    if kind is Kind.DA:
        return text if _DA.fullmatch(text) and _check_date(text) else None
    if kind is Kind.TM:
        m = _TM.fullmatch(text)
        if not m or int(m[1]) > 23 or int(m[2] or 0) > 59 or int(m[3] or 0) > 60:
            return None
        if m[4] is not None and m[3] is None:
            return None  # a fraction needs seconds
        if not upper:
            return text
        return m[1] + (m[2] or "59") + (m[3] or "59") + "." + (m[4] or "").ljust(6, "9")
    m = _DT.fullmatch(text)
    if not m or (m[3] and not _check_date(m[1] + m[2] + m[3])):
        return None
    if not upper:
        return text
    parts = [m[1], m[2] or "12", m[3] or "31", m[4] or "23", m[5] or "59", m[6] or "59"]
    return "".join(parts) + "." + (m[7] or "").ljust(6, "9")


def range_match(
    column: ColumnElement[Any] | InstrumentedAttribute[Any], value: str, kind: Kind, keyword: str = "value"
) -> ColumnElement[bool]:
    """Single value or range matching (C.2.2.2.5) for DA, TM and DT: ``A``, ``A-``, ``-B``, ``A-B``.

    Values are compared as text. Empty stored values never match a range.
    Raises :class:`InvalidValue` for a malformed bound or a reversed range.
    """
    if kind not in _FORMATS:
        raise ValueError(f"range matching applies to DA, TM and DT, not {kind.value}")
    expected = f"expected {_FORMATS[kind]}, or a range A-B, A- or -B"
    if value.count("-") > 1 or value == "-":
        raise InvalidValue(keyword, value, expected)
    if "-" not in value:
        if _bound(kind, value, upper=False) is None:
            raise InvalidValue(keyword, value, expected)
        return single_value_match(column, value)
    low_text, high_text = value.split("-")
    low = _bound(kind, low_text, upper=False) if low_text else ""
    high = _bound(kind, high_text, upper=True) if high_text else ""
    if low is None or high is None:
        raise InvalidValue(keyword, value, expected)
    if low and high and low > high:
        raise InvalidValue(keyword, value, "the range ends before it starts")
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    return and_(*conditions)


# -- UIDs, integers ------------------------------------------------------------

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def uid_list_match(
    column: ColumnElement[Any] | InstrumentedAttribute[Any], value: str, keyword: str = "value"
) -> ColumnElement[bool]:
    """Single value or list of UID matching (C.2.2.2.2): ``1.2.3\\1.2.4`` -> ``IN``.

    Wildcards are not allowed in UIDs; a malformed UID raises :class:`InvalidValue`.
    """
    uids = [u.strip(" \0") for u in value.split("\\")]
    for uid in uids:
        if has_wildcards(uid):
            raise InvalidValue(keyword, value, "wildcards are not allowed in UIDs")
        if len(uid) > 64 or not _UID.fullmatch(uid):
            raise InvalidValue(keyword, value, f"{uid!r} is not a UID (digits and dots, at most 64 characters)")
    unique = list(dict.fromkeys(uids))
    return single_value_match(column, unique[0]) if len(unique) == 1 else column.in_(unique)


def integer_match(
    column: ColumnElement[Any] | InstrumentedAttribute[Any], value: str, keyword: str = "value"
) -> ColumnElement[bool]:
    """Single value matching of an IS attribute."""
    try:
        number = int(value)
    except ValueError:
        raise InvalidValue(keyword, value, "expected an integer") from None
    return single_value_match(column, number)


# Not the outer query's series row (a SERIES-level query has one). One alias for every query:
# SQLAlchemy adapts an alias's columns on first use, which cost more than the rest of a small query.
_OTHER_SERIES = aliased(Series)


def _modalities_in_study(value: str) -> ColumnElement[bool]:
    """ModalitiesInStudy: the study matches when any of its series' modalities matches any value.

    Matched on the series rows rather than on the backslash-joined
    ``studies.modalities_in_study``, where a wildcard could straddle two
    modalities (``M*T`` would match ``MR\\CT``). Written as a correlated
    ``EXISTS`` on ``ix_series_study_modality`` so that a more selective key
    (a date, a patient) drives the plan: an ``IN (SELECT study_fk …)`` made
    SQLite read every series of the modality (a third of the index) first.
    """
    wanted = [v.strip(" \0") for v in value.split("\\")]
    if any(is_universal(v) for v in wanted):
        return universal_match()
    return exists().where(_OTHER_SERIES.study_fk == Study.id,
                          or_(*(text_match(_OTHER_SERIES.modality, v) for v in wanted))).correlate(Study)


# -- attributes and queries ----------------------------------------------------


def match_attribute(attribute: Attribute, value: str, *, fuzzy: bool = False) -> ColumnElement[bool] | None:
    """The condition for one key on its attribute; ``None`` for universal matching."""
    value = value.strip(" \0")
    if is_universal(value):
        return None
    kind, column, keyword = attribute.kind, attribute.column, attribute.keyword
    if keyword == "ModalitiesInStudy":
        return _modalities_in_study(value)
    if kind is Kind.PN:
        return person_name_match(attribute, value, fuzzy=fuzzy)
    if kind in (Kind.DA, Kind.TM, Kind.DT):
        return range_match(column, value, kind, keyword)
    if kind is Kind.UI:
        return uid_list_match(column, value, keyword)
    if kind is Kind.IS:
        return integer_match(column, value, keyword)
    return text_match(column, value)


def parse_level(level: str | Level) -> Level:
    """A query level from its name (``"STUDY"``), or :class:`InvalidValue`."""
    try:
        return Level(level.upper() if isinstance(level, str) else level)
    except ValueError:
        raise InvalidValue("QueryRetrieveLevel", str(level),
                           "expected PATIENT, STUDY, SERIES or IMAGE") from None


def attribute_for(keyword: str, level: Level) -> Attribute:
    """The attribute of a matching key usable at ``level``, or :class:`UnsupportedKey`."""
    attribute = ATTRIBUTES.get(keyword)
    if attribute is None:
        raise UnsupportedKey(keyword)
    if attribute.level.depth > level.depth:
        raise UnsupportedKey(keyword, f"is a {attribute.level.value}-level key; "
                                      f"it cannot be matched in a {level.value}-level query")
    return attribute


def build_query(level: str | Level, keys: Sequence[MatchKey], *, fuzzy: bool = False,
                columns: Sequence[ColumnElement[Any]] | None = None, join_up_to: Level | None = None) -> Select[Any]:
    """A SELECT of the ``level`` rows matching every key, ordered by id.

    Keys of higher levels join the rows upwards (an IMAGE query with a
    PatientID joins instances → series → studies → patients). Keys below
    ``level`` and unknown keywords raise :class:`UnsupportedKey`; malformed
    values raise :class:`InvalidValue`.

    By default the rows are ``level``'s ORM entities. With ``columns``, those
    columns are selected instead (a Core row per match, no ORM objects), and
    ``join_up_to`` names the highest level the columns come from, so that its
    rows are joined even when no key matches on them.
    """
    level = parse_level(level)
    entity = ENTITIES[level]
    conditions: list[ColumnElement[bool]] = []
    top = level.depth if join_up_to is None else min(level.depth, join_up_to.depth)
    for key in keys:
        attribute = attribute_for(key.keyword, level)
        condition = match_attribute(attribute, key.value, fuzzy=fuzzy if key.fuzzy is None else key.fuzzy)
        if condition is not None:
            conditions.append(condition)
            top = min(top, attribute.level.depth)
    stmt: Select[Any] = select(entity) if columns is None else select(*columns).select_from(entity)
    if level.depth >= 3 > top:
        stmt = stmt.join(Series, Instance.series_fk == Series.id)
    if level.depth >= 2 > top:
        stmt = stmt.join(Study, Series.study_fk == Study.id)
    if level.depth >= 1 > top:
        stmt = stmt.join(Patient, Study.patient_fk == Patient.id)
    return stmt.where(*conditions).order_by(entity.id)


__all__ = [
    "ATTRIBUTES",
    "ENTITIES",
    "Attribute",
    "InvalidValue",
    "Kind",
    "Level",
    "MatchKey",
    "UnsupportedKey",
    "attribute_for",
    "build_query",
    "glob_pattern",
    "has_wildcards",
    "integer_match",
    "is_universal",
    "like_pattern",
    "match_attribute",
    "parse_level",
    "person_name_match",
    "range_match",
    "single_value_match",
    "text_match",
    "uid_list_match",
    "universal_match",
    "wildcard_match",
]
