"""The OpenAPI 3.1 description of telepacs' HTTP endpoints, served at ``/openapi.json``.

Written by hand from the routes in :mod:`viewer.dicomweb` (kept small: one
helper per kind of parameter); ``tests/viewer/test_openapi.py`` checks that
every route is described and runs schemathesis against it.
"""

from __future__ import annotations

from typing import Any

UID_SCHEMA = {"type": "string", "pattern": r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$", "maxLength": 64}
ERROR = {"description": "An error a person can act on",
         "content": {"application/json": {"schema": {
             "type": "object", "required": ["status", "error"],
             "properties": {"status": {"type": "integer"}, "error": {"type": "string"}}}}}}
DICOM_JSON = {"content": {"application/dicom+json": {"schema": {"type": "array", "items": {"type": "object"}}}}}
MULTIPART = {"content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}}}
IMAGE = {"content": {m: {"schema": {"type": "string", "format": "binary"}} for m in
                     ("image/jpeg", "image/png", "image/webp")}}

QIDO_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
             "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
             "StudyInstanceUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SOPInstanceUID", "SOPClassUID",
             "InstanceNumber")


def _path_uids(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": UID_SCHEMA} for n in names]


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


QIDO_PARAMS = [
    _query("limit", {"type": "integer", "minimum": 0}, "at most this many results (capped at 10,000)"),
    _query("offset", {"type": "integer", "minimum": 0}, "skip this many results"),
    _query("fuzzymatching", {"type": "boolean"}, "case- and diacritic-insensitive person names"),
    _query("includefield", {"type": "string"}, "extra attributes to return (keywords or tags, comma separated; all)"),
    *[_query(k, {"type": "string"}, f"matching on {k} (PS3.4 C.2.2.2)") for k in QIDO_KEYS],
]
RENDER_PARAMS = [
    _query("window", {"type": "string"}, "center,width[,linear|linear-exact|sigmoid] (PS3.18 8.3.5.1.3)"),
    _query("viewport", {"type": "string"}, "vw,vh[,sx,sy,sw,sh] (PS3.18 8.3.5.1.2)"),
    _query("quality", {"type": "integer", "minimum": 1, "maximum": 100}, "JPEG/WebP quality"),
]


def _get(summary: str, params: list[dict[str, Any]], ok: dict[str, Any], *codes: int) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK", **ok}}
    for code in codes:
        responses[str(code)] = {"description": "Not Modified"} if code == 304 else ERROR
    return {"get": {"summary": summary, "parameters": params, "responses": responses}}


def _stow(params: list[dict[str, Any]]) -> dict[str, Any]:
    return {"post": {
        "summary": "Store instances (STOW-RS): multipart/related; type=\"application/dicom\"",
        "parameters": params,
        "requestBody": {"required": True, "content": {"multipart/related": {"schema": {"type": "string",
                                                                                         "format": "binary"}}}},
        "responses": {"200": {"description": "all stored", **DICOM_JSON},
                      "202": {"description": "some stored, some failed", **DICOM_JSON},
                      "409": {"description": "none stored", **DICOM_JSON},
                      "400": ERROR, "415": ERROR},
    }}


def openapi_document() -> dict[str, Any]:
    study, series, instance = "{study}", "{series}", "{instance}"
    s = f"/dicomweb/studies/{study}"
    se = f"{s}/series/{series}"
    i = f"{se}/instances/{instance}"
    paths: dict[str, Any] = {
        "/healthz": _get("Liveness", [], {"content": {"application/json": {"schema": {"type": "object"}}}}),
        "/dicomweb/studies": {**_get("Search studies (QIDO-RS)", QIDO_PARAMS, DICOM_JSON, 400, 503),
                              **_stow([])},
        "/dicomweb/series": _get("Search series", QIDO_PARAMS, DICOM_JSON, 400, 503),
        "/dicomweb/instances": _get("Search instances", QIDO_PARAMS, DICOM_JSON, 400, 503),
        s: {**_get("Retrieve a study (WADO-RS)", _path_uids("study"), MULTIPART, 400, 404, 406),
            **_stow(_path_uids("study"))},
        f"{s}/series": _get("Search a study's series", _path_uids("study") + QIDO_PARAMS, DICOM_JSON, 400, 503),
        f"{s}/instances": _get("Search a study's instances", _path_uids("study") + QIDO_PARAMS, DICOM_JSON, 400),
        f"{s}/metadata": _get("A study's metadata", _path_uids("study"), DICOM_JSON, 400, 404),
        f"{s}/thumbnail": _get("A study's thumbnail", _path_uids("study") + RENDER_PARAMS, IMAGE, 304, 400, 404,
                               406, 422),
        se: _get("Retrieve a series", _path_uids("study", "series"), MULTIPART, 400, 404, 406),
        f"{se}/instances": _get("Search a series' instances", _path_uids("study", "series") + QIDO_PARAMS,
                                DICOM_JSON, 400),
        f"{se}/metadata": _get("A series' metadata", _path_uids("study", "series"), DICOM_JSON, 400, 404),
        f"{se}/rendered": _get("A series rendered (its middle slice)", _path_uids("study", "series") + RENDER_PARAMS,
                               IMAGE, 304, 400, 404, 406, 422),
        f"{se}/thumbnail": _get("A series' thumbnail", _path_uids("study", "series") + RENDER_PARAMS, IMAGE, 304,
                                400, 404, 406, 422),
        i: _get("Retrieve an instance", _path_uids("study", "series", "instance"), MULTIPART, 400, 404, 406),
        f"{i}/metadata": _get("An instance's metadata", _path_uids("study", "series", "instance"), DICOM_JSON, 400,
                              404),
        f"{i}/rendered": _get("An instance rendered", _path_uids("study", "series", "instance") + RENDER_PARAMS,
                              IMAGE, 304, 400, 404, 406, 422),
        f"{i}/thumbnail": _get("An instance's thumbnail", _path_uids("study", "series", "instance") + RENDER_PARAMS,
                               IMAGE, 304, 400, 404, 406, 422),
        f"{i}/frames/{{frames}}": _get(
            "Frames (uncompressed octet-stream, or as stored by media type)",
            _path_uids("study", "series", "instance") + [{"name": "frames", "in": "path", "required": True,
                                                           "schema": {"type": "string", "pattern": r"^[0-9,]+$"}}],
            MULTIPART, 400, 404, 406, 422),
        f"{i}/frames/{{frame}}/rendered": _get(
            "A frame rendered",
            _path_uids("study", "series", "instance") + [{"name": "frame", "in": "path", "required": True,
                                                           "schema": {"type": "integer", "minimum": 1}}]
            + RENDER_PARAMS, IMAGE, 304, 400, 404, 406, 422),
        f"{i}/bulkdata/{{tag}}": _get(
            "A bulk data value (e.g. 7FE00010, the pixel data)",
            _path_uids("study", "series", "instance") + [{"name": "tag", "in": "path", "required": True,
                                                           "schema": {"type": "string", "pattern": "^[0-9A-Fa-f]{8}$"}}],
            MULTIPART, 400, 404),
    }
    paths["/healthz"]["get"]["security"] = []  # public: load balancers and the test fixtures poll it
    paths.update(_page_paths())
    from viewer.consults.openapi import consult_paths

    paths.update(consult_paths())
    from viewer.reader import openapi_paths as reader_paths

    paths.update(reader_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "telepacs", "version": "0.1",
                 "description": "DICOMweb (PS3.18: QIDO-RS, WADO-RS, STOW-RS, rendered) of the telepacs archive."},
        "paths": paths,
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API token (`telepacs token create`)"},
            "basic": {"type": "http", "scheme": "basic", "description": "username and an API token as password"},
            "session": {"type": "apiKey", "in": "cookie", "name": "telepacs_session",
                        "description": "the cookie set by /login (unsafe methods also need X-CSRF-Token)"},
        }},
        "security": [{"bearer": []}, {"basic": []}, {"session": []}],
    }


HTML = {"content": {"text/html": {"schema": {"type": "string"}}}}
REDIRECT = {"description": "Found (redirect)"}


def _page_paths() -> dict[str, Any]:
    """The pages of people (study list, log in, log out, password, language): HTML, not an API, listed for
    completeness."""
    public: list[dict[str, Any]] = []  # no security: reachable without logging in
    form = {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}}
    return {
        "/login": {
            "get": {"summary": "The login page", "security": public,
                    "parameters": [_query("next", {"type": "string"}, "where to go after logging in")],
                    "responses": {"200": {"description": "OK", **HTML}, "302": REDIRECT}},
            "post": {"summary": "Log in (username, password, csrf_token)", "security": public, "requestBody": form,
                     "responses": {"302": REDIRECT, "401": {"description": "refused", **HTML},
                                   "403": {"description": "no CSRF token", **HTML}}},
        },
        "/logout": {"post": {"summary": "Log out (csrf_token)", "requestBody": form,
                             "responses": {"302": REDIRECT, "403": {"description": "no CSRF token", **HTML}}}},
        "/account/password": {
            "get": {"summary": "The password change page", "responses": {"200": {"description": "OK", **HTML}}},
            "post": {"summary": "Change one's password", "requestBody": form,
                     "responses": {"200": {"description": "changed", **HTML},
                                   "400": {"description": "refused", **HTML}}},
        },
        "/": {"get": {
            "summary": "The study list: search, sorted, a page at a time (the state is in the query string)",
            "parameters": [
                _query("name", {"type": "string", "maxLength": 64}, "patient name: words in order, each a prefix, "
                       "case- and accent-insensitive; * and ? wildcards"),
                _query("patient_id", {"type": "string", "maxLength": 64}, "patient ID prefix (or wildcards)"),
                _query("accession", {"type": "string", "maxLength": 64}, "accession number prefix (or wildcards)"),
                _query("from", {"type": "string", "format": "date"}, "study date from (YYYY-MM-DD)"),
                _query("to", {"type": "string", "format": "date"}, "study date to (YYYY-MM-DD)"),
                _query("modality", {"type": "string", "pattern": "^[A-Za-z0-9]{0,16}$"}, "a modality in the study"),
                _query("description", {"type": "string", "maxLength": 64}, "study description contains"),
                _query("sort", {"type": "string", "enum": ["date", "name", "id", "modality", "received"]},
                       "sort column (default received)"),
                _query("dir", {"type": "string", "enum": ["asc", "desc"]}, "sort direction"),
                _query("page", {"type": "integer", "minimum": 1}, "page number (from 1)"),
                _query("size", {"type": "integer", "enum": [10, 25, 50, 100]}, "studies per page (default 25)"),
            ],
            "responses": {"200": {"description": "OK", **HTML}, "302": REDIRECT,
                          "400": {"description": "a bad parameter: the page says which", **HTML},
                          "503": {"description": "the index is not answering", **HTML}}}},
        "/lang/{code}": {"get": {
            "summary": "Choose the interface language (a cookie), then go back", "security": public,
            "parameters": [{"name": "code", "in": "path", "required": True, "schema": {"type": "string"}},
                           _query("next", {"type": "string"}, "where to go back to")],
            "responses": {"302": REDIRECT}}},
    }
