"""DICOMweb under ``/dicomweb``: QIDO-RS search, WADO-RS retrieve and metadata, STOW-RS store (PS3.18).

A thin adapter: parameters in, ``archive`` calls, DICOM JSON or multipart out.
Searching uses :func:`archive.query.find`, the same matching as C-FIND;
storing uses :meth:`archive.service.Archive.ingest_file`, the same path and
guarantees as C-STORE. Retrieved instances are streamed from storage part by
part, as they were received (no transcoding yet: a request for another
transfer syntax gets 406).

References: PS3.18 §10.4 (Retrieve), §10.5 (Store), §10.6 (Search), Annex F (DICOM JSON).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import orjson
import pydicom
from blake3 import blake3
from flask import Blueprint, Response, current_app, request, stream_with_context
from flask.typing import ResponseReturnValue
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag

from archive.deidentify import deidentified_part10_stream, deidentify_json
from archive.index import IndexUnavailable, InstanceLocation, Source
from archive.keys import InvalidUID, validate_uid
from archive.matching import InvalidValue, Level, MatchKey, UnsupportedKey
from archive.query import RETURN_KEYS, find
from archive.service import Expected, IngestError, IngestFailure
from storage import ObjectNotFound, StorageError
from viewer.auth import (Role, checks_objects_itself, current_user, forget_study, note_study_viewed,
                         search_scope, served_pseudonyms)
from viewer.auth.access import instance_exists_for_other, study_exists_for_other
from viewer.cache import ByteLRU
from viewer.deps import get_archive
from viewer.render import (Frame, ImageFormat, RenderError, Viewport, Window, decode_frame, detach_for_cache,
                           load_dataset, number_of_frames, parse_viewport, parse_window, render_display)
from viewer.multipart import MediaType, MultipartError, new_boundary, read_parts, split_media_ranges, write_parts

log = logging.getLogger(__name__)

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")

DICOM_JSON = "application/dicom+json"
_CHUNK = 256 * 1024
MAX_LIMIT = 10_000  # results per search page; a larger limit is capped (and said so in a Warning header)

# What a search returns by default at each level (PS3.18 Tables 10.6.3-3, -4, -5), with the UIDs a
# client needs to go on from a result.
DEFAULT_KEYS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "BodyPartExamined",
                   "NumberOfSeriesRelatedInstances", "StudyInstanceUID"),
    Level.IMAGE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                  "NumberOfFrames", "SeriesInstanceUID", "StudyInstanceUID"),
}
_CONTROL_PARAMS = frozenset({"includefield", "limit", "offset", "fuzzymatching"})

# STOW-RS Failure Reason (0008,1197): the Storage Service statuses (PS3.18 §10.5.3, PS3.4 B.2.3).
_FAILURE_REASON: dict[IngestFailure, int] = {
    IngestFailure.INVALID_DATASET: 0xC000,  # Error: Cannot understand
    IngestFailure.UID_MISMATCH: 0xC000,
    IngestFailure.SOP_CLASS_MISMATCH: 0xA900,  # Error: Data Set does not match SOP Class
    IngestFailure.DUPLICATE_REJECTED: 0x0111,  # Duplicate SOP Instance
    IngestFailure.STORAGE_UNAVAILABLE: 0xA700,  # Refused: Out of Resources
    IngestFailure.INDEX_UNAVAILABLE: 0xA700,
}


class BadRequest(ValueError):
    """A request parameter we cannot use (400)."""


def error(status: int, message: str) -> Response:
    """A JSON error a person can act on."""
    return Response(json.dumps({"status": status, "error": message}), status=status, mimetype="application/json")


@bp.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> ResponseReturnValue:
    log.warning("DICOMweb %s %s from %s: %s", request.method, request.full_path, request.remote_addr, exc)
    return error(400, str(exc))


@bp.errorhandler(IndexUnavailable)
def _index_down(exc: IndexUnavailable) -> ResponseReturnValue:
    log.error("DICOMweb %s %s: %s", request.method, request.path, exc)
    return error(503, "the catalogue is unavailable; try again shortly")


# -- DICOM JSON (PS3.18 Annex F) ---------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _tag_and_vr(keyword: str) -> tuple[str, str]:
    """(tag as 8 hex digits, VR) of a keyword; cached: a search result asks for them on every row."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}", dictionary_VR(tag)


def json_attribute(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    """(tag as 8 hex digits, DICOM JSON attribute) for an index value."""
    tag, vr = _tag_and_vr(keyword)
    return tag, _json_value(vr, value)


def _json_value(vr: str, value: Any) -> dict[str, Any]:
    """The DICOM JSON attribute of VR ``vr`` for an index value (multiple values separated by a backslash)."""
    if value is None or value == "":
        return {"vr": vr}
    if isinstance(value, int):
        values: list[Any] = [value]
    elif vr == "PN":
        values = [{"Alphabetic": name} for name in str(value).split("\\")]
    elif vr in ("IS", "SL", "SS", "UL", "US"):
        values = [int(v) for v in str(value).split("\\") if v.strip()]
    elif vr in ("DS", "FL", "FD"):
        values = [float(v) for v in str(value).split("\\") if v.strip()]
    else:
        values = str(value).split("\\")
    return {"vr": vr, "Value": values}


def _base_url() -> str:
    """This server's URL (a configured public URL wins: behind a proxy, or for clients such as
    dicomweb-client that send Host without the port) followed by the DICOMweb prefix."""
    base = current_app.config["TELEPACS_SETTINGS"].public_url or request.host_url.rstrip("/")
    return base + bp.url_prefix  # type: ignore[operator]


def _url(*uids: str, base: str | None = None) -> str:
    parts = ["studies", uids[0]]
    if len(uids) > 1:
        parts += ["series", uids[1]]
    if len(uids) > 2:
        parts += ["instances", uids[2]]
    return (base or _base_url()) + "/" + "/".join(parts)


_JSON_CHUNK = 64 * 1024  # objects are sent in chunks of about this size, not one write per object
_JSON_BATCH = 64  # objects encoded by one call (a call per object cost more than the encoding)


def _json_stream(objects: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    buffer = [b"["]
    size = 1
    batch: list[dict[str, Any]] = []
    first = True

    def encoded() -> bytes:
        nonlocal first
        # orjson: UTF-8 out directly, ~20x faster than json.dumps on a 300-instance listing (7 ms there).
        part = (b"" if first else b",") + orjson.dumps(batch)[1:-1]  # the objects, without the list's brackets
        first = False
        batch.clear()
        return part

    for obj in objects:
        batch.append(obj)
        if len(batch) >= _JSON_BATCH:
            part = encoded()
            buffer.append(part)
            size += len(part)
            if size >= _JSON_CHUNK:
                yield b"".join(buffer)
                buffer, size = [], 0
    if batch:
        buffer.append(encoded())
    buffer.append(b"]")
    yield b"".join(buffer)


# -- QIDO-RS -------------------------------------------------------------------------


@dataclass
class Search:
    keys: list[MatchKey] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    capped: bool = False


def _keyword(name: str) -> str:
    """A QIDO attribute parameter (keyword or 8 hex digits) as a keyword."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(Tag(int(name, 16)))
        if keyword:
            return str(keyword)
        raise BadRequest(f"attribute {name} is not a known DICOM tag")
    if "." in name:
        raise BadRequest(f"attribute {name!r}: sequence matching is not supported")
    if tag_for_keyword(name) is None:
        raise BadRequest(f"{name!r} is neither a DICOM keyword nor a tag, nor a search parameter")
    return name


def _non_negative(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {value!r}") from None
    if number < 0:
        raise BadRequest(f"{name} must not be negative")
    return number


def parse_search(args: Any, level: Level) -> Search:
    """The search described by QIDO-RS query parameters (PS3.18 §8.3.4)."""
    search = Search(returned=list(DEFAULT_KEYS[level]))
    for name in args:
        values = args.getlist(name)
        lowered = name.lower()
        if lowered == "includefield":
            for value in values:
                for item in value.split(","):
                    item = item.strip()
                    if item == "all":
                        search.returned += [k for k, lv in RETURN_KEYS.items() if lv.depth <= level.depth]
                    elif item:
                        search.returned.append(_keyword(item))
        elif lowered == "limit":
            search.limit = _non_negative("limit", values[-1])
            if search.limit > MAX_LIMIT:
                search.limit, search.capped = MAX_LIMIT, True
        elif lowered == "offset":
            search.offset = _non_negative("offset", values[-1])
        elif lowered == "fuzzymatching":
            if values[-1].lower() not in ("true", "false"):
                raise BadRequest(f"fuzzymatching must be true or false, not {values[-1]!r}")
            search.fuzzy = values[-1].lower() == "true"
        else:
            keyword = _keyword(name)
            value = values[-1]
            if keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
                value = value.replace(",", "\\")  # a list of UIDs (PS3.18 §8.3.4.1)
            search.keys.append(MatchKey(keyword, value))
    if search.limit is None:
        search.limit = MAX_LIMIT
    return search


def _search(level: Level, study_uid: str | None = None, series_uid: str | None = None) -> ResponseReturnValue:
    search = parse_search(request.args, level)
    for keyword, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
        if uid is not None:
            search.keys = [k for k in search.keys if k.keyword != keyword] + [MatchKey(keyword, _uid(uid))]
    matched = {k.keyword for k in search.keys}
    wanted = list(dict.fromkeys(search.returned))
    keys = search.keys + [MatchKey(k, "") for k in wanted if k not in matched and RETURN_KEYS.get(k)]
    try:
        rows = find(get_archive().index, level, keys, fuzzy=search.fuzzy, scope=search_scope(keys))
    except (UnsupportedKey, InvalidValue) as exc:
        raise BadRequest(str(exc)) from None
    page = islice(rows, search.offset, search.offset + (search.limit or MAX_LIMIT))
    first = next(page, None)  # run the query before answering, so a failure gets its status
    result = _result_builder(level, wanted, _base_url())
    pseudonyms = served_pseudonyms()
    if pseudonyms:
        result = _deidentifying(result, pseudonyms)

    def objects() -> Iterator[dict[str, Any]]:
        for row in ([first] if first is not None else []):
            yield result(row)
        for row in page:
            yield result(row)

    headers = {}
    if search.capped:
        headers["Warning"] = f'299 telepacs "limit capped at {MAX_LIMIT}"'
    return Response(stream_with_context(_json_stream(objects())), mimetype=DICOM_JSON, headers=headers)


_RETRIEVE_URL_TAG = "00081190"
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_URL_DEPTH = {Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


def _result_builder(level: Level, wanted: list[str], base: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function from an index row to its DICOM JSON object (attributes in tag order, with the
    Retrieve URL), with the per-keyword work (tag, VR, order) done once per search, not per row."""
    shown = [k for k in wanted if RETURN_KEYS.get(k) is None or RETURN_KEYS[k].depth <= level.depth]
    columns = sorted((*_tag_and_vr(keyword), keyword) for keyword in dict.fromkeys(shown))
    depth = _URL_DEPTH.get(level, 0)
    url_keywords = _UID_KEYWORDS[:depth]
    before_url = [c for c in columns if c[0] < _RETRIEVE_URL_TAG]
    after_url = [c for c in columns if c[0] > _RETRIEVE_URL_TAG]

    def result(row: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for tag, vr, keyword in before_url:
            obj[tag] = _json_value(vr, row.get(keyword))
        uids = [row.get(k) for k in url_keywords]
        if depth and all(uids):
            obj[_RETRIEVE_URL_TAG] = {"vr": "UR", "Value": [_url(*map(str, uids), base=base)]}
        for tag, vr, keyword in after_url:
            obj[tag] = _json_value(vr, row.get(keyword))
        return obj

    return result


def _deidentifying(result: Callable[[dict[str, Any]], dict[str, Any]],
                   pseudonyms: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``result``, de-identified (PS3.15 Basic Profile) for the rows of studies served under a pseudonym."""

    def deidentified(row: dict[str, Any]) -> dict[str, Any]:
        obj = result(row)
        pseudonym = pseudonyms.get(str(row.get("StudyInstanceUID") or ""))
        return obj if pseudonym is None else deidentify_json(obj, pseudonym)

    return deidentified


def _uid(value: str) -> str:
    try:
        return validate_uid(value)
    except InvalidUID as exc:
        raise BadRequest(str(exc)) from None


@bp.get("/studies")
def search_studies() -> ResponseReturnValue:
    return _search(Level.STUDY)


@bp.get("/series")
def search_all_series() -> ResponseReturnValue:
    return _search(Level.SERIES)


@bp.get("/studies/<study>/series")
def search_series(study: str) -> ResponseReturnValue:
    return _search(Level.SERIES, study_uid=study)


@bp.get("/instances")
def search_all_instances() -> ResponseReturnValue:
    return _search(Level.IMAGE)


@bp.get("/studies/<study>/instances")
def search_study_instances(study: str) -> ResponseReturnValue:
    return _search(Level.IMAGE, study_uid=study)


@bp.get("/studies/<study>/series/<series>/instances")
def search_instances(study: str, series: str) -> ResponseReturnValue:
    return _search(Level.IMAGE, study_uid=study, series_uid=series)


# -- WADO-RS ---------------------------------------------------------------------------


def _locations(study: str, series: str | None = None, instance: str | None = None) -> list[InstanceLocation]:
    return get_archive().index.instance_locations(
        _uid(study), _uid(series) if series else None, _uid(instance) if instance else None)


def _not_found(study: str, series: str | None, instance: str | None) -> Response:
    what = f"instance {instance}" if instance else f"series {series}" if series else f"study {study}"
    return error(404, f"{what} is not in the archive")


def _wanted_syntax(accept: str) -> str | None:
    """The transfer syntax an Accept header asks for (None: as stored), or :class:`NotAcceptable`."""
    if not accept.strip():
        return None
    for media in split_media_ranges(accept):
        if media.type in ("*/*", "multipart/*"):
            return None
        if media.type == "multipart/related" and media.params.get("type", "application/dicom") in (
                "application/dicom", "application/*", "*/*"):
            syntax = media.params.get("transfer-syntax")
            return None if syntax in (None, "*") else syntax
    raise NotAcceptable(f"cannot answer with {accept!r}; this resource is "
                        'multipart/related; type="application/dicom"')


class NotAcceptable(ValueError):
    """An Accept header this resource cannot satisfy (406)."""


@bp.errorhandler(NotAcceptable)
def _not_acceptable(exc: NotAcceptable) -> ResponseReturnValue:
    log.warning("DICOMweb %s %s from %s: %s", request.method, request.full_path, request.remote_addr, exc)
    return error(406, str(exc))


def _retrieve(study: str, series: str | None = None, instance: str | None = None) -> ResponseReturnValue:
    syntax = _wanted_syntax(request.headers.get("Accept", ""))
    locations = _locations(study, series, instance)
    if not locations:
        return _not_found(study, series, instance)
    if syntax is not None:
        other = [loc for loc in locations if loc.transfer_syntax_uid != syntax]
        if other:
            return error(406, f"{len(other)} instance(s) are stored in another transfer syntax "
                              f"(e.g. {other[0].transfer_syntax_uid}) and transcoding is not available yet; "
                              'ask with transfer-syntax=* to receive them as stored')
    archive = get_archive()
    boundary = new_boundary()

    def parts() -> Iterator[tuple[str, Iterable[bytes]]]:
        for loc in locations:
            yield (f"application/dicom; transfer-syntax={loc.transfer_syntax_uid}", _object_chunks(loc))

    pseudonym = served_pseudonyms().get(study)

    def _object_chunks(loc: InstanceLocation) -> Iterator[bytes]:
        try:
            with archive.store.open(loc.object_key) as f:
                if pseudonym is not None:  # an observer's copy: headers de-identified, pixels as stored
                    yield from deidentified_part10_stream(f, pseudonym, _CHUNK)
                    return
                while chunk := f.read(_CHUNK):
                    yield chunk
        except (ObjectNotFound, StorageError) as exc:
            # Headers are sent: the only honest thing left is to cut the response short.
            log.error("WADO-RS: object %s of instance %s unreadable: %s", loc.object_key, loc.sop_instance_uid, exc)
            raise

    note_study_viewed(study, "wado-rs")
    log.info("WADO-RS retrieve %d instance(s) of study %s for %s", len(locations), study, request.remote_addr)
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return Response(stream_with_context(write_parts(parts(), boundary)), content_type=content_type)


@bp.get("/studies/<study>")
def retrieve_study(study: str) -> ResponseReturnValue:
    return _retrieve(study)


@bp.get("/studies/<study>/series/<series>")
def retrieve_series(study: str, series: str) -> ResponseReturnValue:
    return _retrieve(study, series)


@bp.get("/studies/<study>/series/<series>/instances/<instance>")
def retrieve_instance(study: str, series: str, instance: str) -> ResponseReturnValue:
    return _retrieve(study, series, instance)


def _metadata(study: str, series: str | None = None, instance: str | None = None) -> ResponseReturnValue:
    locations = _locations(study, series, instance)
    if not locations:
        return _not_found(study, series, instance)
    note_study_viewed(study, "wado-rs metadata")
    archive = get_archive()
    pseudonym = served_pseudonyms().get(study)

    def objects() -> Iterator[dict[str, Any]]:
        for loc in locations:
            with archive.store.open(loc.object_key) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True, defer_size=64 * 1024)
            # Binary values are inline (InlineBinary), except the pixel data, which is
            # referenced by its BulkDataURI. Real files carry values that cannot be
            # encoded (e.g. "P1:" as a DS): those elements are left out.
            attributes = ds.to_json_dict(suppress_invalid_tags=True)
            if "Rows" in ds:
                vr = "OW" if loc.transfer_syntax_uid not in FRAME_MEDIA_TYPES and int(ds.get("BitsAllocated", 8)) > 8 \
                    else "OB"
                url = _url(loc.study_uid, loc.series_uid, loc.sop_instance_uid) + "/bulkdata/7FE00010"
                attributes["7FE00010"] = {"vr": vr, "BulkDataURI": url}
            yield attributes if pseudonym is None else deidentify_json(attributes, pseudonym)

    return Response(stream_with_context(_json_stream(objects())), mimetype=DICOM_JSON)


@bp.get("/studies/<study>/metadata")
def study_metadata(study: str) -> ResponseReturnValue:
    return _metadata(study)


@bp.get("/studies/<study>/series/<series>/metadata")
def series_metadata(study: str, series: str) -> ResponseReturnValue:
    return _metadata(study, series)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/metadata")
def instance_metadata(study: str, series: str, instance: str) -> ResponseReturnValue:
    return _metadata(study, series, instance)


# -- STOW-RS ---------------------------------------------------------------------------


@bp.post("/studies")
def store_instances() -> ResponseReturnValue:
    return _store(None)


@bp.post("/studies/<study>")
@checks_objects_itself  # the study may be new; each part is checked in _store
def store_study_instances(study: str) -> ResponseReturnValue:
    return _store(_uid(study))


def _store(study: str | None) -> ResponseReturnValue:
    media = MediaType.parse(request.content_type or "")
    if media.type != "multipart/related" or not media.params.get("boundary"):
        return error(415, 'send multipart/related; type="application/dicom" with a boundary')
    if media.params.get("type", "application/dicom") != "application/dicom":
        return error(415, f"parts of type {media.params['type']!r} are not accepted; send application/dicom")
    archive = get_archive()
    user = current_user()
    if user is None or user.role == Role.OBSERVER:
        log.warning("STOW-RS from %s refused: observers cannot store", request.remote_addr)
        _discard_body()
        return error(403, "observers cannot store instances")
    # What a user stores belongs to their facility (administrators included: theirs is usually LOCAL).
    source = Source("stow", host=request.remote_addr, facility=user.facility.code if user is not None else None)
    expected = Expected(study_uid=study) if study else None
    stored: list[dict[str, Any]] = []
    failed: list[tuple[dict[str, Any], str]] = []
    warning = ""
    try:
        for number, part in enumerate(read_parts(request.stream, media.params["boundary"],
                                                 archive.new_incoming_path), start=1):
            try:
                part_type = MediaType.parse(part.content_type).type if part.content_type else "application/dicom"
                if part_type != "application/dicom":
                    failed.append(_failed_item(None, 0xC000, f"part {number} is {part_type}, not application/dicom"))
                    continue
                refusal = _foreign_object(part.path)
                if refusal:
                    failed.append(_failed_item(part.path, _NOT_AUTHORIZED, f"part {number}: {refusal}"))
                    continue
                result = archive.ingest_file(part.path, source, expected=expected, move=True)
                forget_study(result.study_uid)
                stored.append({
                    "00081150": {"vr": "UI", "Value": [result.sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [result.sop_instance_uid]},
                    "00081190": {"vr": "UR", "Value": [_url(result.study_uid, result.series_uid,
                                                            result.sop_instance_uid)]},
                })
            except IngestError as exc:
                failed.append(_failed_item(part.path, _FAILURE_REASON[exc.failure], f"part {number}: {exc.message}"))
            finally:
                part.path.unlink(missing_ok=True)
    except MultipartError as exc:
        warning = f"the body was cut short or malformed after {len(stored) + len(failed)} part(s): {exc}"
        log.warning("STOW-RS from %s: %s", request.remote_addr, warning)
    if not stored and not failed:
        return error(400, warning or "the body holds no part")
    body: dict[str, Any] = {}
    if study:
        body["00081190"] = {"vr": "UR", "Value": [_url(study)]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [item for item, _ in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    status = 200 if not failed and not warning else (202 if stored else 409)
    for _item, reason in failed:
        log.warning("STOW-RS from %s: %s", request.remote_addr, reason)
    headers = {"Warning": f'299 telepacs "{warning}"'} if warning else {}
    log.info("STOW-RS from %s: %d stored, %d failed", request.remote_addr, len(stored), len(failed))
    return Response(json.dumps(body), status=status, mimetype=DICOM_JSON, headers=headers)


_DISCARD_LIMIT = 64 << 20


def _discard_body() -> None:
    """Read (and drop) a refused upload, so the client gets the answer instead of a reset connection."""
    remaining = _DISCARD_LIMIT
    while remaining > 0 and (chunk := request.stream.read(min(_CHUNK, remaining))):
        remaining -= len(chunk)


_NOT_AUTHORIZED = 0x0124  # Refused: Not authorized (PS3.7 Annex C)


def _foreign_object(path: Any) -> str:
    """Why a part may not be stored by this user ('' if it may): it would add to or replace what they cannot see."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        study, sop = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return ""  # the ingest refuses it with the precise reason
    if study and study_exists_for_other(study):
        return f"study {study} belongs to another facility; it cannot be added to"
    if sop and instance_exists_for_other(sop):
        return f"instance {sop} belongs to another facility; it cannot be replaced"
    return ""


def _failed_item(path: Any, reason: int, message: str) -> tuple[dict[str, Any], str]:
    """A FailedSOPSequence item, with the UIDs when the part can be read at all."""
    sop_class = sop_instance = ""
    if path is not None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            sop_class, sop_instance = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            pass
    item = {
        "00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
        "00081155": {"vr": "UI", "Value": [sop_instance]} if sop_instance else {"vr": "UI"},
        "00081197": {"vr": "US", "Value": [reason]},
    }
    return item, message


# -- Retrieve Rendered and thumbnails (PS3.18 §10.4.1.1.3, §8.3.5) ------------------------

THUMBNAIL_VIEWPORT = "128,128"
THUMBNAIL_QUALITY = 75
IMMUTABLE = "private, max-age=86400"  # an instance's bytes never change under the same checksum


def _render_caches() -> tuple[ByteLRU[tuple[Any, Frame]], ByteLRU[bytes]]:
    """(decoded frames, rendered images) of this web process, sharing the configured budget."""
    app = current_app
    caches = app.extensions.get("telepacs_render_caches")
    if caches is None:
        budget = int(app.config["TELEPACS_SETTINGS"].render_cache_mb) << 20
        frames: ByteLRU[tuple[Any, Frame]] = ByteLRU(budget * 3 // 4,
                                                      lambda item: int(item[1].pixels.nbytes) + 64 * 1024)
        images: ByteLRU[bytes] = ByteLRU(budget // 4, len)
        caches = (frames, images)
        app.extensions["telepacs_render_caches"] = caches
    return caches  # type: ignore[no-any-return]


def _render_format() -> ImageFormat:
    accept = request.headers.get("Accept", "")
    if not accept.strip():
        return ImageFormat.JPEG
    for media in split_media_ranges(accept):
        if media.type in ("*/*", "image/*"):
            return ImageFormat.JPEG
        if media.type in ("image/jpeg", "image/png", "image/webp"):
            return ImageFormat.parse(media.type)
    raise NotAcceptable(f"cannot render as {accept!r}; ask for image/jpeg, image/png or image/webp")


@dataclass(frozen=True)
class RenderRequest:
    window: Window | None
    viewport: Viewport | None
    quality: int
    fmt: ImageFormat

    @functools.cached_property
    def key(self) -> str:
        return f"{self.window}|{self.viewport}|{self.quality}|{self.fmt.value}"


# Parsed rendering parameters by (query string, Accept, defaults): a warm request (the same URL again)
# skips parsing. Only valid requests are kept; the dict is emptied when full (a plain bound, no LRU
# bookkeeping on the hot path; dict operations are atomic under the GIL).
_PARSED_RENDER_REQUESTS: dict[tuple[bytes, str, str | None, int], RenderRequest] = {}
_PARSED_RENDER_REQUESTS_MAX = 4096


def _render_request(default_viewport: str | None = None, default_quality: int = 90) -> RenderRequest:
    """The rendering parameters of this request (400 for malformed ones, 406 for an unusable Accept)."""
    key = (request.query_string, request.headers.get("Accept", ""), default_viewport, default_quality)
    wanted = _PARSED_RENDER_REQUESTS.get(key)
    if wanted is None:
        wanted = _parse_render_request(default_viewport, default_quality)
        if len(_PARSED_RENDER_REQUESTS) >= _PARSED_RENDER_REQUESTS_MAX:
            _PARSED_RENDER_REQUESTS.clear()
        _PARSED_RENDER_REQUESTS[key] = wanted
    return wanted


def _parse_render_request(default_viewport: str | None, default_quality: int) -> RenderRequest:
    try:
        window = parse_window(request.args["window"]) if request.args.get("window") else None
        viewport_text = request.args.get("viewport") or default_viewport
        viewport = parse_viewport(viewport_text) if viewport_text else None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    quality = _non_negative("quality", request.args.get("quality", str(default_quality)))
    if not 1 <= quality <= 100:
        raise BadRequest("quality must be between 1 and 100")
    return RenderRequest(window, viewport, quality, _render_format())


class FrameNotFound(LookupError):
    """The instance has no such frame (404)."""


def _render_etag(loc: InstanceLocation, frame_number: int, wanted: RenderRequest) -> str:
    return blake3(f"{loc.checksum}|{frame_number}|{wanted.key}".encode()).hexdigest()[:32]


def rendered_image(loc: InstanceLocation, frame_number: int, wanted: RenderRequest, etag: str | None = None) -> bytes:
    """Frame ``frame_number`` (1-based) of an instance rendered as ``wanted`` asks, through this process's caches
    (keyed by ``etag``, computed here when the caller has not already).

    Raises :class:`FrameNotFound`, :class:`RenderError` (pixels that cannot be rendered) and the
    storage errors of reading the object.
    """
    etag = etag or _render_etag(loc, frame_number, wanted)
    frames, images = _render_caches()
    image = images.get(etag)
    if image is not None:
        return image
    decoded = frames.get((loc.checksum, frame_number))
    if decoded is None:
        with get_archive().store.open(loc.object_key) as f:
            data = f.read()
        dataset = load_dataset(data)
        count = number_of_frames(dataset)
        if not 1 <= frame_number <= count:
            raise FrameNotFound(f"instance {loc.sop_instance_uid} has {count} frame(s), not {frame_number}")
        decoded = detach_for_cache(*decode_frame(dataset, frame_number - 1))
        frames.put((loc.checksum, frame_number), decoded)
    dataset, frame = decoded
    image = render_display(dataset, frame, wanted.window, wanted.viewport, wanted.fmt, wanted.quality)
    images.put(etag, image)
    return image


def _render(loc: InstanceLocation, frame_number: int, wanted: RenderRequest) -> ResponseReturnValue:
    """Frame ``frame_number`` (1-based) of an instance, rendered, with ETag and the caches."""
    etag = _render_etag(loc, frame_number, wanted)
    if "If-None-Match" in request.headers and etag in request.if_none_match:
        return Response(status=304, headers={"ETag": f'"{etag}"', "Cache-Control": IMMUTABLE})
    try:
        image = rendered_image(loc, frame_number, wanted, etag)
    except FrameNotFound as exc:
        return error(404, str(exc))
    except RenderError as exc:
        log.warning("cannot render %s frame %d: %s", loc.sop_instance_uid, frame_number, exc)
        return error(422, f"instance {loc.sop_instance_uid} cannot be rendered: {exc}")
    return Response(image, mimetype=wanted.fmt.media_type, headers={"ETag": f'"{etag}"', "Cache-Control": IMMUTABLE})


def _representative(study: str, series: str | None) -> InstanceLocation | None:
    """The instance that stands for a series (its middle slice) or a study (that of its first series)."""
    locations = _locations(study, series)
    if not locations:
        return None
    first_series = locations[0].series_uid
    in_series = [loc for loc in locations if loc.series_uid == first_series]
    return in_series[len(in_series) // 2]


def _rendered_instance(study: str, series: str, instance: str, frame: int,
                       wanted: RenderRequest) -> ResponseReturnValue:
    locations = _locations(study, series, instance)
    if not locations:
        return _not_found(study, series, instance)
    return _render(locations[0], frame, wanted)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/rendered")
def rendered_instance(study: str, series: str, instance: str) -> ResponseReturnValue:
    return _rendered_instance(study, series, instance, 1, _render_request())


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<int:frame>/rendered")
def rendered_frame(study: str, series: str, instance: str, frame: int) -> ResponseReturnValue:
    return _rendered_instance(study, series, instance, frame, _render_request())


@bp.get("/studies/<study>/series/<series>/rendered")
def rendered_series(study: str, series: str) -> ResponseReturnValue:
    """The series' middle instance, rendered (a single image, not every instance)."""
    wanted = _render_request()
    loc = _representative(study, series)
    return _render(loc, 1, wanted) if loc else _not_found(study, series, None)


def _thumbnail(study: str, series: str | None = None, instance: str | None = None) -> ResponseReturnValue:
    wanted = _render_request(THUMBNAIL_VIEWPORT, THUMBNAIL_QUALITY)
    if instance is not None and series is not None:
        found = _locations(study, series, instance)
        loc = found[0] if found else None
    else:
        loc = _representative(study, series)
    return _render(loc, 1, wanted) if loc else _not_found(study, series, instance)


@bp.get("/studies/<study>/thumbnail")
def study_thumbnail(study: str) -> ResponseReturnValue:
    return _thumbnail(study)


@bp.get("/studies/<study>/series/<series>/thumbnail")
def series_thumbnail(study: str, series: str) -> ResponseReturnValue:
    return _thumbnail(study, series)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/thumbnail")
def instance_thumbnail(study: str, series: str, instance: str) -> ResponseReturnValue:
    return _thumbnail(study, series, instance)


# -- frames (PS3.18 §10.4.1.1.2, media types §8.7.3) ---------------------------------------

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
# Stored (compressed) transfer syntax -> the media type of its frames (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def frames_as_stored(accept: str, stored_syntax: str) -> bool:
    """Whether an Accept header wants frames as stored (True) or uncompressed (False); else NotAcceptable.

    Uncompressed frames are ``application/octet-stream`` in Explicit VR Little Endian byte order, the
    default; compressed frames go out as stored when asked for with their media type or ``transfer-syntax=*``.
    """
    compressed = stored_syntax in FRAME_MEDIA_TYPES
    if not accept.strip():
        return False
    for media in split_media_ranges(accept):
        if media.type in ("*/*", "multipart/*"):
            return False
        if media.type != "multipart/related":
            continue
        part_type = media.params.get("type", "application/octet-stream")
        syntax = media.params.get("transfer-syntax")
        if part_type in ("*/*", "application/*"):
            return False  # any type will do: the uncompressed default
        if part_type == "application/octet-stream":
            if syntax in (None, EXPLICIT_VR_LE):
                return False
            if syntax == "*":
                return compressed
        elif compressed and part_type == FRAME_MEDIA_TYPES[stored_syntax] and syntax in (None, "*", stored_syntax):
            return True
    raise NotAcceptable(f"cannot send the frames of this instance (stored as {stored_syntax}) as {accept!r}; "
                        'ask for multipart/related; type="application/octet-stream" (uncompressed)'
                        + (f' or type="{FRAME_MEDIA_TYPES[stored_syntax]}"' if compressed else ""))


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5] (1-based frame numbers, PS3.18 §10.4.1.1.2)."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise BadRequest(f"frame list {text!r} must be numbers separated by commas") from None
    if not numbers or min(numbers) < 1:
        raise BadRequest(f"frame numbers start at 1, not {min(numbers) if numbers else 'nothing'}")
    return numbers


def frame_bytes(ds: pydicom.Dataset, number: int, as_stored: bool) -> bytes:
    """Frame ``number`` (1-based): its stored fragments, or its values as uncompressed little-endian bytes."""
    count = number_of_frames(ds)
    if as_stored:
        return bytes(pydicom.encaps.get_frame(ds.PixelData, number - 1, number_of_frames=count))
    pixels = pydicom.pixels.pixel_array(ds, index=number - 1, raw=True)
    return bytes(pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes())


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<frame_list>")
def retrieve_frames(study: str, series: str, instance: str, frame_list: str) -> ResponseReturnValue:
    numbers = parse_frame_list(frame_list)
    locations = _locations(study, series, instance)
    if not locations:
        return _not_found(study, series, instance)
    loc = locations[0]
    as_stored = frames_as_stored(request.headers.get("Accept", ""), loc.transfer_syntax_uid)
    with get_archive().store.open(loc.object_key) as f:
        ds = load_dataset(f.read())
    count = number_of_frames(ds)
    if "PixelData" not in ds:
        return error(404, f"instance {instance} has no pixel data")
    if max(numbers) > count:
        return error(404, f"instance {instance} has {count} frame(s), not {max(numbers)}")
    if as_stored:
        content_type = f"{FRAME_MEDIA_TYPES[loc.transfer_syntax_uid]}; transfer-syntax={loc.transfer_syntax_uid}"
    else:
        content_type = f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LE}"
    try:
        frames = [frame_bytes(ds, n, as_stored) for n in numbers]
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        log.warning("frames %s of %s cannot be decoded: %s", frame_list, instance, exc)
        return error(422, f"the frames of instance {instance} cannot be decoded: {exc}")
    boundary = new_boundary()
    part_type = "application/octet-stream" if not as_stored else FRAME_MEDIA_TYPES[loc.transfer_syntax_uid]
    body = b"".join(write_parts(((content_type, [frame]) for frame in frames), boundary))
    return Response(body, content_type=f'multipart/related; type="{part_type}"; boundary={boundary}')



@bp.get("/studies/<study>/series/<series>/instances/<instance>/bulkdata/<tag>")
def retrieve_bulkdata(study: str, series: str, instance: str, tag: str) -> ResponseReturnValue:
    """A top-level binary value (e.g. the pixel data 7FE00010) as application/octet-stream (PS3.18 §10.4.1.1.5).

    Encapsulated pixel data comes back frame by frame, each part in its stored media type.
    """
    if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
        raise BadRequest(f"bulk data tag {tag!r} must be 8 hex digits, e.g. 7FE00010")
    locations = _locations(study, series, instance)
    if not locations:
        return _not_found(study, series, instance)
    loc = locations[0]
    with get_archive().store.open(loc.object_key) as f:
        ds = load_dataset(f.read())
    element = ds.get(Tag(int(tag, 16)))
    if element is None or element.VR not in ("OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW"):
        return error(404, f"instance {instance} has no bulk data element {tag.upper()}")
    boundary = new_boundary()
    syntax = loc.transfer_syntax_uid
    if element.tag == 0x7FE00010 and syntax in FRAME_MEDIA_TYPES:
        media = FRAME_MEDIA_TYPES[syntax]
        frames = [frame_bytes(ds, n, as_stored=True) for n in range(1, number_of_frames(ds) + 1)]
        body = b"".join(write_parts(((f"{media}; transfer-syntax={syntax}", [frame]) for frame in frames), boundary))
        return Response(body, content_type=f'multipart/related; type="{media}"; boundary={boundary}')
    value = bytes(element.value or b"")
    content_type = f"application/octet-stream; transfer-syntax={syntax}"
    body = b"".join(write_parts([(content_type, [value])], boundary))
    return Response(body, content_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')
