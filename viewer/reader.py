"""The reading page ``/viewer/<study>`` and its compact JSON API under ``/api/viewer``.

The page embeds the study header and the first series' display list, so the browser asks for the
first slice while it is still reading the page (no round trip for metadata first). The API answers
from the index alone (:mod:`archive.reading`); slices come from the DICOMweb renderer
(``/dicomweb/.../frames/N/rendered``). Text answers (page, JSON, the page's scripts) are gzipped when
the browser accepts it: on a 2 Mbit/s link every kilobyte before the first image costs 4 ms.

References: the viewer page contract in the project's briefs (``window.telepacsViewer``, query
parameters, annotation JSON).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request
from flask.typing import ResponseReturnValue
from flask_babel import gettext
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from archive.index import IndexUnavailable
from archive.keys import InvalidUID, validate_uid
from archive.reading import DisplayInstance, SeriesListing, StudyHeader, series_listing, series_of_instance, study_header
from storage import ObjectNotFound, StorageError
from viewer.auth import note_study_viewed, served_pseudonyms
from viewer.deps import get_archive
from viewer.measure import ellipse_mask, region_stats
from viewer.dicomweb import FrameNotFound, RenderRequest, rendered_image
from viewer.dicomweb import error as _error
from viewer.render import ImageFormat, RenderError, decode_frame, load_dataset, parse_viewport, parse_window
from viewer.render.transforms import ModalityTransform, apply_modality_lut

log = logging.getLogger(__name__)

bp = Blueprint("reader", __name__)
STATIC_PREFIX = "/static/viewer/"  # the page's scripts and styles (viewer/static/viewer), served by the app

# What the viewer asks the renderer for (the page's script builds the same URLs: keep in step with viewer.js).
PREVIEW_QUALITY = 50  # lossy JPEG, small: the first thing on screen on any link
PREVIEW_VIEWPORT = "256,256"
_GZIP_TYPES = frozenset({"text/html", "application/json", "text/javascript", "application/javascript", "text/css"})
_GZIP_MIN = 1024
_gzip_cache: dict[str, bytes] = {}  # static files by ETag: compressed once per process
_gzip_lock = threading.Lock()


class BadRequest(ValueError):
    """A parameter the viewer API cannot use (400)."""


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False, separators=(",", ":")), status=status,
                    mimetype="application/json")


@bp.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> ResponseReturnValue:
    log.warning("viewer %s %s from %s: %s", request.method, request.full_path, request.remote_addr, exc)
    return _error(400, str(exc))


@bp.errorhandler(IndexUnavailable)
def _index_down(exc: IndexUnavailable) -> ResponseReturnValue:
    log.error("viewer %s %s: %s", request.method, request.path, exc)
    return _error(503, "the catalogue is unavailable; try again shortly")


@bp.after_app_request
def _compress(response: Response) -> Response:
    """gzip this blueprint's text answers and the page's static files (Flask and gunicorn do not)."""
    static = request.path.startswith(STATIC_PREFIX)
    if ((request.blueprint != "reader" and not static) or response.status_code != 200
            or response.mimetype not in _GZIP_TYPES or "gzip" not in request.headers.get("Accept-Encoding", "")
            or "Content-Encoding" in response.headers):
        return response
    etag = response.get_etag()[0] if static else None
    response.direct_passthrough = False
    body = response.get_data()
    if len(body) < _GZIP_MIN:
        return response
    compressed = _gzip_cache.get(etag) if etag else None
    if compressed is None:
        compressed = gzip.compress(body, compresslevel=6, mtime=0)
        if etag:
            with _gzip_lock:
                _gzip_cache[etag] = compressed
    response.set_data(compressed)
    response.headers["Content-Encoding"] = "gzip"
    response.headers["Content-Length"] = str(len(compressed))
    response.vary.add("Accept-Encoding")
    return response


def _uid(value: str, what: str) -> str:
    try:
        return validate_uid(value, what)
    except InvalidUID as exc:
        raise BadRequest(str(exc)) from None


# -- JSON shapes ------------------------------------------------------------------------------------


def number_text(value: float) -> str:
    """A number as JavaScript's ``String(n)`` writes it (so page and script build identical URLs)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _study_json(header: StudyHeader) -> dict[str, Any]:
    base = f"{request.script_root}/dicomweb/studies/{header.study_uid}/series/"
    return {
        "uid": header.study_uid,
        "patient": {"name": header.patient_name, "id": header.patient_id, "sex": header.patient_sex,
                    "birth_date": header.patient_birth_date},
        "date": header.study_date, "time": header.study_time, "description": header.description,
        "accession": header.accession_number, "modalities": header.modalities,
        "series": [
            {"uid": s.series_uid, "number": s.number, "modality": s.modality, "description": s.description,
             "body_part": s.body_part, "instances": s.instances, "frames": s.frames, "images": s.images,
             "thumbnail": base + s.series_uid + "/thumbnail" if s.images else None}
            for s in header.series
        ],
    }


def _mm(value: float | None) -> float | None:
    """Millimetres to 0.1 µm: enough for any geometry, and 209.3 instead of 209.29999999999998 on the wire."""
    return None if value is None else round(value, 4)


def _instance_json(inst: DisplayInstance) -> dict[str, Any]:
    return {
        "sop": inst.sop_instance_uid, "sop_class": inst.sop_class_uid, "number": inst.instance_number,
        "frames": inst.frames, "rows": inst.rows, "cols": inst.columns, "position": _mm(inst.slice_position),
        "ipp": [_mm(v) for v in inst.image_position] if inst.image_position else None, "iop": inst.image_orientation, "spacing": inst.pixel_spacing,
        "spacing_source": inst.spacing_source, "thickness": inst.slice_thickness, "slope": inst.rescale_slope,
        "intercept": inst.rescale_intercept, "rescale_type": inst.rescale_type,
        "windows": [{"center": w.center, "width": w.width, "explanation": w.explanation} for w in inst.windows], "photometric": inst.photometric,
        "frame_time": inst.frame_time_ms,
    }


def _hoist(instances: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(values every instance shares, what is left per instance): a 300-slice list shrinks ~4x."""
    if not instances:
        return {}, []
    common = {k: v for k, v in instances[0].items()
              if k != "sop" and all(inst.get(k) == v for inst in instances[1:])}
    return common, [{k: v for k, v in inst.items() if k not in common} for inst in instances]


def series_json(listing: SeriesListing) -> dict[str, Any]:
    common, instances = _hoist([_instance_json(i) for i in listing.instances])
    root = f"{request.script_root}/dicomweb/studies/{listing.study_uid}/series/{listing.series_uid}"
    return {
        "study": listing.study_uid, "uid": listing.series_uid, "number": listing.number,
        "modality": listing.modality, "description": listing.description,
        "rendered": root + "/instances/{sop}/frames/{frame}/rendered",
        "roi": f"{request.script_root}/api/viewer/roi/{listing.study_uid}/{listing.series_uid}/{{sop}}/{{frame}}",
        "common": common, "instances": instances,
    }


# -- API ---------------------------------------------------------------------------------------------


def _as_served(header: StudyHeader | None) -> StudyHeader | None:
    """The header as the current user may see it: a consult's de-identifying observer gets the pseudonym."""
    if header is None:
        return None
    pseudonym = served_pseudonyms().get(header.study_uid)
    if pseudonym is None:
        return header
    return replace(header, patient_name=pseudonym, patient_id=pseudonym, patient_birth_date="",
                   accession_number="")


@bp.get("/api/viewer/studies/<study>")
def study_api(study: str) -> ResponseReturnValue:
    header = _as_served(study_header(get_archive().index, _uid(study, "StudyInstanceUID")))
    if header is None:
        log.info("viewer: study %s not found (from %s)", study, request.remote_addr)
        return _error(404, f"study {study} is not in the archive")
    return _json(_study_json(header))


@bp.get("/api/viewer/series/<series>")
def series_api(series: str) -> ResponseReturnValue:
    listing = series_listing(get_archive().index, _uid(series, "SeriesInstanceUID"))
    if listing is None:
        log.info("viewer: series %s not found (from %s)", series, request.remote_addr)
        return _error(404, f"series {series} is not in the archive")
    return _json(series_json(listing))


def _box(args: Any) -> tuple[float, float, float, float]:
    try:
        values = [float(args[name]) for name in ("x0", "y0", "x1", "y1")]
    except KeyError as exc:
        raise BadRequest(f"parameter {exc.args[0]} is required (the ellipse's bounding box x0,y0,x1,y1)") from None
    except ValueError:
        raise BadRequest("x0, y0, x1 and y1 must be numbers (image pixel coordinates)") from None
    if not all(abs(v) < 1e6 for v in values):
        raise BadRequest("x0, y0, x1 and y1 must be image pixel coordinates")
    return values[0], values[1], values[2], values[3]


@bp.get("/api/viewer/roi/<study>/<series>/<instance>/<int:frame>")
def roi_api(study: str, series: str, instance: str, frame: int) -> ResponseReturnValue:
    """Mean, SD, min, max and pixel count of the modality values inside an ellipse of one frame."""
    x0, y0, x1, y1 = _box(request.args)
    archive = get_archive()
    found = archive.index.instance_locations(_uid(study, "StudyInstanceUID"), _uid(series, "SeriesInstanceUID"),
                                             _uid(instance, "SOPInstanceUID"))
    if not found:
        return _error(404, f"instance {instance} is not in series {series} of study {study}")
    try:
        with archive.store.open(found[0].object_key) as f:
            data = f.read()
    except (ObjectNotFound, StorageError) as exc:
        log.error("viewer ROI: cannot read %s: %s", found[0].object_key, exc)
        return _error(503, f"the stored object of instance {instance} cannot be read now")
    try:
        ds, decoded = decode_frame(load_dataset(data), frame - 1)
    except RenderError as exc:
        return _error(422 if frame >= 1 else 400, f"frame {frame} of instance {instance}: {exc}")
    if decoded.pixels.ndim != 2:
        return _error(422, "region statistics need a grey-scale image; this one is in colour")
    values = apply_modality_lut(decoded.pixels, ModalityTransform.from_dataset(ds))
    stats = region_stats(values, ellipse_mask(values.shape, x0, y0, x1, y1))
    if stats is None:
        return _error(422, "the ellipse holds no pixel centre; draw a larger one")
    unit = "HU" if str(ds.get("Modality", "")) == "CT" else str(ds.get("RescaleType", "") or "")
    return _json({"pixels": stats.pixels, "mean": stats.mean, "sd": stats.sd, "min": stats.minimum,
                  "max": stats.maximum, "unit": unit})


# -- the page ----------------------------------------------------------------------------------------


def _not_found_page(message: str, status: int = 404) -> ResponseReturnValue:
    log.warning("viewer page %s from %s: %s", request.full_path, request.remote_addr, message)
    return render_template("viewer_error.html", message=message), status


def stack_of(listing: SeriesListing) -> list[tuple[int, int]]:
    """The displayed stack: (instance index, 1-based frame) for every frame of every instance, in order.

    A multi-frame instance (US cine, XA, enhanced CT/MR) contributes its frames as slices.
    """
    return [(number, frame) for number, inst in enumerate(listing.instances) if inst.rows is not None
            for frame in range(1, inst.frames + 1)]


def start_position(listing: SeriesListing, instance: str | None, frame_text: str | None) -> int:
    """Index in the stack of the first slice to show: the asked instance/frame, else the middle."""
    stack = stack_of(listing)
    try:
        frame = int(frame_text) if frame_text else 1
    except ValueError:
        frame = 1
    if instance:
        for position, (number, frame_number) in enumerate(stack):
            if listing.instances[number].sop_instance_uid == instance and frame_number == frame:
                return position
        for position, (number, _) in enumerate(stack):
            if listing.instances[number].sop_instance_uid == instance:
                return position
    return len(stack) // 2


def _first_window(inst: DisplayInstance, args: Any) -> tuple[float, float] | None:
    try:
        if args.get("wc") and args.get("ww") and float(args["ww"]) >= 1:
            return float(args["wc"]), float(args["ww"])
    except ValueError:
        pass
    return (inst.windows[0].center, inst.windows[0].width) if inst.windows else None


def preview_url(listing: SeriesListing, inst: DisplayInstance, frame: int, window: tuple[float, float] | None) -> str:
    """The first lossy preview's URL, exactly as viewer.js builds it."""
    root = f"{request.script_root}/dicomweb/studies/{listing.study_uid}/series/{listing.series_uid}"
    query = f"quality={PREVIEW_QUALITY}&viewport={PREVIEW_VIEWPORT}"
    if window is not None:
        query = f"window={number_text(window[0])},{number_text(window[1])},linear&" + query
    return f"{root}/instances/{inst.sop_instance_uid}/frames/{frame}/rendered?{query}"


# The first preview is rendered into the page itself when that is quick (a CT or MR slice): the first image
# then needs no request of its own (a round trip saved, ~200 ms on a 100 ms link, and no wait for a free
# connection). Large or compressed matrices (CR, DX, MG) could hold the page back: their preview is fetched.
INLINE_PREVIEW_MAX_PIXELS = {"native": 1024 * 1024, "compressed": 512 * 512}
INLINE_PREVIEW_BUDGET_S = 0.5
_inline_renders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inline-preview")
_NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})


def inline_preview(listing: SeriesListing, inst: DisplayInstance, frame: int,
                   window: tuple[float, float] | None) -> str | None:
    """The first lossy preview as a ``data:`` URI, or None when it is fetched instead (large, or unrenderable)."""
    pixels = (inst.rows or 0) * (inst.columns or 0)
    if not pixels or pixels > INLINE_PREVIEW_MAX_PIXELS["native"]:
        return None
    locations = get_archive().index.instance_locations(listing.study_uid, listing.series_uid, inst.sop_instance_uid)
    if not locations:
        return None
    compressed = locations[0].transfer_syntax_uid not in _NATIVE_SYNTAXES
    if compressed and pixels > INLINE_PREVIEW_MAX_PIXELS["compressed"]:
        return None
    wanted = RenderRequest(
        parse_window(f"{number_text(window[0])},{number_text(window[1])},linear") if window else None,
        parse_viewport(PREVIEW_VIEWPORT), PREVIEW_QUALITY, ImageFormat.JPEG)
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def render() -> bytes:
        with app.app_context():
            return rendered_image(locations[0], frame, wanted)

    # Within a time budget: a slow object store (S3 far away or failing over) must not hold the page back.
    # A render that overruns goes on and fills the cache, where the browser's request for it finds it.
    pending = _inline_renders.submit(render)
    try:
        image = pending.result(timeout=INLINE_PREVIEW_BUDGET_S)
    except FutureTimeout:
        log.info("viewer page: the preview of %s took over %.0f ms; the browser will ask for it",
                 inst.sop_instance_uid, INLINE_PREVIEW_BUDGET_S * 1000)
        return None
    except (FrameNotFound, RenderError, ObjectNotFound, StorageError, OSError) as exc:
        log.warning("viewer page: no inline preview of %s frame %d (%s); the browser will ask for it",
                    inst.sop_instance_uid, frame, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")


@bp.get("/viewer/<study>")
def viewer_page(study: str) -> ResponseReturnValue:
    try:
        study = validate_uid(study, "StudyInstanceUID")
    except InvalidUID as exc:
        return _not_found_page(gettext("This is not a valid study identifier: %(error)s", error=str(exc)), 400)
    index = get_archive().index
    header = _as_served(study_header(index, study))
    if header is None or not header.series:
        return _not_found_page(gettext("Study %(uid)s is not in the archive.", uid=study))
    wanted_series = request.args.get("series") or ""
    instance = request.args.get("instance") or None
    if not wanted_series and instance:
        wanted_series = series_of_instance(index, study, instance) or ""
    known = {s.series_uid for s in header.series}
    with_images = [s.series_uid for s in header.series if s.images] or [header.series[0].series_uid]
    series_uid = wanted_series if wanted_series in known else with_images[0]
    listing = series_listing(index, series_uid)
    if listing is None or not listing.instances:
        return _not_found_page(gettext("Series %(uid)s has no images.", uid=series_uid))
    note_study_viewed(study, "viewer")
    stack = stack_of(listing)
    start = start_position(listing, instance, request.args.get("frame")) if stack else 0
    data = {"study": _study_json(header), "series": series_json(listing), "start": start}
    if not stack:  # no image to show (e.g. a structured report): the page says so, asks the renderer nothing
        return render_template("viewer.html", data=data, preload=None, study=header, show_first=False,
                               consult=request.args.get("consult"),
                           deidentified=study in served_pseudonyms())
    number, frame = stack[start]
    first = listing.instances[number]
    window = _first_window(first, request.args)
    preload = preview_url(listing, first, frame, window)
    # The plain <img> preview matches the canvas only for the default view of square pixels.
    view_args = ("zoom", "panx", "pany", "invert", "rotate", "flip")
    square = first.pixel_spacing is None or abs(first.pixel_spacing[0] - first.pixel_spacing[1]) < 1e-6
    show_first = square and not any(request.args.get(k) for k in view_args)
    inline = inline_preview(listing, first, frame, window) if show_first else None
    return render_template("viewer.html", data=data, preload=preload, inline_preview=inline, study=header,
                           show_first=show_first, consult=request.args.get("consult"),
                           deidentified=study in served_pseudonyms())


def openapi_paths() -> dict[str, Any]:
    """This blueprint's routes for ``/openapi.json``."""
    from viewer.openapi import UID_SCHEMA, _get, _path_uids, _query

    json_body = {"content": {"application/json": {"schema": {"type": "object"}}}}
    page = {"content": {"text/html": {"schema": {"type": "string"}}}}
    number = {"type": "number"}
    box = [_query(name, number, "ellipse bounding box corner (image pixel coordinates)") for name in
           ("x0", "y0", "x1", "y1")]
    for param in box:
        param["required"] = True
    page_params = [_query("series", UID_SCHEMA, "series to show first"),
                   _query("instance", UID_SCHEMA, "instance to show first"),
                   _query("frame", {"type": "integer", "minimum": 1}, "frame to show first (1-based)"),
                   _query("wc", number, "window centre"), _query("ww", number, "window width")]
    roi = _get("Mean, SD, min, max of the modality values inside an ellipse of one frame",
               _path_uids("study", "series", "instance")
               + [{"name": "frame", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}]
               + box, json_body, 400, 404, 422, 503)
    return {
        "/viewer/{study}": _get("The reading page (HTML)", _path_uids("study") + page_params, page, 400, 404),
        "/api/viewer/studies/{study}": _get("A study's header and series, for the viewer", _path_uids("study"),
                                            json_body, 400, 404, 503),
        "/api/viewer/series/{series}": _get("A series' instances in display order, for the viewer",
                                            _path_uids("series"), json_body, 400, 404, 503),
        "/api/viewer/roi/{study}/{series}/{instance}/{frame}": roi,
    }
