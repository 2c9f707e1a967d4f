"""What the web viewer reads from the index: a study's header and series, a series' display list.

Answered from the catalogue alone (``instances.display``, ``series.summary``): no DICOM file is
opened, so the viewer's first request stays small and fast whatever the storage backend.
Two statements per call at most, built once at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.exc import SQLAlchemyError

from archive.index import CatalogIndex, IndexUnavailable
from archive.models import Instance, Patient, Series, Study

_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_PATIENTS: Table = Patient.__table__  # type: ignore[assignment]

_STUDY = (
    select(_STUDIES.c.id, _STUDIES.c.study_uid, _STUDIES.c.study_date, _STUDIES.c.study_time,
           _STUDIES.c.study_description, _STUDIES.c.accession_number, _STUDIES.c.modalities_in_study,
           _STUDIES.c.facility, _PATIENTS.c.patient_name, _PATIENTS.c.patient_id, _PATIENTS.c.sex,
           _PATIENTS.c.birth_date)
    .join(_PATIENTS, _STUDIES.c.patient_fk == _PATIENTS.c.id)
    .where(_STUDIES.c.study_uid == bindparam("study"))
)
_STUDY_SERIES = (
    select(_SERIES.c.series_uid, _SERIES.c.series_number, _SERIES.c.modality, _SERIES.c.series_description,
           _SERIES.c.body_part_examined, _SERIES.c.num_instances,
           func.coalesce(func.sum(_INSTANCES.c.number_of_frames), 0), func.count(_INSTANCES.c.rows))
    .outerjoin(_INSTANCES, _INSTANCES.c.series_fk == _SERIES.c.id)
    .where(_SERIES.c.study_fk == bindparam("study_id"))
    .group_by(_SERIES.c.id, _SERIES.c.series_uid, _SERIES.c.series_number, _SERIES.c.modality,
              _SERIES.c.series_description, _SERIES.c.body_part_examined, _SERIES.c.num_instances)
    .order_by(_SERIES.c.series_number.is_(None), _SERIES.c.series_number, _SERIES.c.id)
)
_SERIES_ROW = (
    select(_SERIES.c.id, _SERIES.c.series_uid, _SERIES.c.series_number, _SERIES.c.modality,
           _SERIES.c.series_description, _SERIES.c.summary, _STUDIES.c.study_uid)
    .join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id)
    .where(_SERIES.c.series_uid == bindparam("series"))
)
# Display order: slice position (unknown last), then instance number, then the UID (a stable order).
_SERIES_INSTANCES = (
    select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.instance_number, _INSTANCES.c.number_of_frames,
           _INSTANCES.c.rows, _INSTANCES.c.columns, _INSTANCES.c.slice_position, _INSTANCES.c.display,
           _INSTANCES.c.sop_class_uid)
    .where(_INSTANCES.c.series_fk == bindparam("series_id"))
    .order_by(_INSTANCES.c.slice_position.is_(None), _INSTANCES.c.slice_position,
              _INSTANCES.c.instance_number.is_(None), _INSTANCES.c.instance_number, _INSTANCES.c.sop_instance_uid)
)
_INSTANCE_SERIES = (
    select(_SERIES.c.series_uid)
    .join(_INSTANCES, _INSTANCES.c.series_fk == _SERIES.c.id)
    .join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("sop"), _STUDIES.c.study_uid == bindparam("study"))
)


@dataclass(frozen=True)
class SeriesEntry:
    """One series as the study header lists it."""

    series_uid: str
    number: int | None
    modality: str
    description: str
    body_part: str
    instances: int
    frames: int
    images: int  # instances with pixels (Rows known): an SR, KO or PR has none


@dataclass(frozen=True)
class StudyHeader:
    study_uid: str
    patient_name: str
    patient_id: str
    patient_sex: str
    patient_birth_date: str
    study_date: str
    study_time: str
    description: str
    accession_number: str
    modalities: str
    facility: str | None
    series: list[SeriesEntry] = field(default_factory=list)


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    explanation: str = ""


@dataclass(frozen=True)
class DisplayInstance:
    """What the viewer needs to place, window and measure one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    frames: int
    rows: int | None
    columns: int | None
    slice_position: float | None
    image_position: list[float] | None
    image_orientation: list[float] | None
    pixel_spacing: list[float] | None  # (row spacing, column spacing) in mm
    spacing_source: str | None  # "PixelSpacing" | "ImagerPixelSpacing" (detector plane) | None: unknown
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    rescale_type: str
    windows: list[Window]
    photometric: str
    frame_time_ms: float | None


@dataclass(frozen=True)
class SeriesListing:
    study_uid: str
    series_uid: str
    number: int | None
    modality: str
    description: str
    instances: list[DisplayInstance]


def _run(index: CatalogIndex, stmt: Any, params: dict[str, Any]) -> list[Any]:
    try:
        with index.engine.connect() as conn:
            return list(conn.execute(stmt, params))
    except SQLAlchemyError as exc:
        raise IndexUnavailable(f"index lookup failed: {exc.__class__.__name__}: {exc}") from None


def study_header(index: CatalogIndex, study_uid: str) -> StudyHeader | None:
    """The study's patient and study attributes and its series in series-number order; None if unknown."""
    rows = _run(index, _STUDY, {"study": study_uid})
    if not rows:
        return None
    (study_id, uid, date, time, description, accession, modalities, facility, name, patient_id, sex,
     birth_date) = rows[0]
    series = [SeriesEntry(r[0], r[1], r[2] or "", r[3] or "", r[4] or "", int(r[5] or 0), int(r[6] or 0), int(r[7] or 0))
              for r in _run(index, _STUDY_SERIES, {"study_id": study_id})]
    return StudyHeader(uid, name or "", patient_id or "", sex or "", birth_date or "", date or "", time or "",
                       description or "", accession or "", modalities or "", facility, series)


def series_of_instance(index: CatalogIndex, study_uid: str, sop_instance_uid: str) -> str | None:
    """The series an instance of this study belongs to; None if it is not in the study."""
    rows = _run(index, _INSTANCE_SERIES, {"sop": sop_instance_uid, "study": study_uid})
    return str(rows[0][0]) if rows else None


def _first(values: Any) -> float | None:
    if isinstance(values, list) and values:
        return float(values[0])
    return None


def _windows(display: dict[str, Any]) -> list[Window]:
    centers = display.get("WindowCenter") or []
    widths = display.get("WindowWidth") or []
    explanations = str(display.get("WindowCenterWidthExplanation") or "").split("\\")
    windows = []
    for i, (center, width) in enumerate(zip(centers, widths)):
        if width >= 1:
            windows.append(Window(float(center), float(width), explanations[i].strip() if i < len(explanations) else ""))
    return windows


def _spacing(display: dict[str, Any]) -> tuple[list[float] | None, str | None]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = display.get(keyword)
        if isinstance(values, list) and len(values) == 2 and all(v > 0 for v in values):
            return [float(v) for v in values], keyword
    return None, None


def _display_instance(row: Any) -> DisplayInstance:
    sop, number, frames, rows, columns, position, display, sop_class = row
    display = display or {}
    spacing, source = _spacing(display)
    ipp = display.get("ImagePositionPatient")
    iop = display.get("ImageOrientationPatient")
    return DisplayInstance(
        sop_instance_uid=sop, sop_class_uid=sop_class, instance_number=number, frames=int(frames or 1),
        rows=rows, columns=columns, slice_position=position,
        image_position=ipp if isinstance(ipp, list) and len(ipp) == 3 else None,
        image_orientation=iop if isinstance(iop, list) and len(iop) == 6 else None,
        pixel_spacing=spacing, spacing_source=source, slice_thickness=_first(display.get("SliceThickness")),
        rescale_slope=_first(display.get("RescaleSlope")) or 1.0,
        rescale_intercept=_first(display.get("RescaleIntercept")) or 0.0,
        rescale_type=str(display.get("RescaleType") or ""),
        windows=_windows(display), photometric=str(display.get("PhotometricInterpretation") or "MONOCHROME2"),
        frame_time_ms=_first(display.get("FrameTime")),
    )


def series_listing(index: CatalogIndex, series_uid: str) -> SeriesListing | None:
    """The series' instances in display order with their display attributes; None if unknown."""
    rows = _run(index, _SERIES_ROW, {"series": series_uid})
    if not rows:
        return None
    series_id, uid, number, modality, description, _summary, study_uid = rows[0]
    instances = [_display_instance(r) for r in _run(index, _SERIES_INSTANCES, {"series_id": series_id})]
    return SeriesListing(study_uid, uid, number, modality or "", description or "", instances)


__all__ = ["DisplayInstance", "SeriesEntry", "SeriesListing", "StudyHeader", "Window", "series_listing",
           "series_of_instance", "study_header"]
