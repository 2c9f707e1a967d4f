"""The consult routes in /openapi.json (``viewer.openapi`` adds them): pages (HTML forms) and the small JSON API."""

from __future__ import annotations

from typing import Any

HTML = {"content": {"text/html": {"schema": {"type": "string"}}}}
JSON = {"content": {"application/json": {"schema": {"type": "object"}}}}
PDF = {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}}}
JPEG = {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}
FORM = {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}}
SEE_OTHER = {"description": "done: back to the consult page"}
ID = {"name": "consult_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}


def _page(summary: str, *params: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": list(params),
                    "responses": {"200": {"description": "OK", **HTML}, "403": {"description": "not allowed", **HTML},
                                  "404": {"description": "no such consult (or not yours)", **HTML}}}}


def _action(summary: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "parameters": [ID], "requestBody": FORM,
                     "responses": {"303": SEE_OTHER, "400": {"description": "bad input", **HTML},
                                   "403": {"description": "not allowed for your role", **HTML},
                                   "404": {"description": "no such consult", **HTML},
                                   "409": {"description": "not possible in the consult's state", **HTML}}}}


def _json_post(summary: str, *codes: int) -> dict[str, Any]:
    return {"post": {"summary": summary, "parameters": [ID],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                     "responses": {"201": {"description": "recorded", **JSON},
                                   **{str(c): {"description": "error", **JSON} for c in codes}}}}


def consult_paths() -> dict[str, Any]:
    c = "/consults/{consult_id}"
    inbox = _page("Consult inbox: what needs you, emergency first, with unread counts",
                  {"name": "all", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]},
                   "description": "1: finished consults too"})
    inbox["post"] = {"summary": "Request a consult (the form of /consults/new)", "requestBody": FORM,
                     "responses": {"303": {"description": "created: to its page"},
                                   "400": {"description": "bad input", **HTML},
                                   "403": {"description": "not a requesting doctor", **HTML}}}
    messages = _action("Post a message (form)")
    messages["post"]["requestBody"] = {"required": True, "content": {
        "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
        "application/json": {"schema": {"type": "object", "description": '{"text", "pin": viewer state + study}'}}}}
    messages["post"]["responses"]["201"] = {"description": "posted (JSON request)", **JSON}
    return {
        "/consults": inbox,
        "/consults/new": _page("The consult request form"),
        "/consults/uploads/check": {"post": {
            "summary": "Which files (SOP Instance UID, size, SHA-256) are already stored byte for byte",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": {"description": "per file: stored, same, study", **JSON},
                          "400": {"description": "bad file list", **JSON}}}},
        c: _page("A consult: case, actions, thread, conclusions, review evidence", ID),
        f"{c}/accept": _action("Accept (hub specialist or coordinator)"),
        f"{c}/decline": _action("Decline with a reason (hub specialist or coordinator)"),
        f"{c}/withdraw": _action("Withdraw (requesting doctor)"),
        f"{c}/close": _action("Close after the decision is recorded (requesting doctor)"),
        f"{c}/decision": _action("Record the decision (requesting side)"),
        f"{c}/outcome": _action("Record the outcome (requesting side)"),
        f"{c}/observers": _action("Add an observer"),
        f"{c}/conclusion": _action("Sign the conclusion, or an amendment (specialist)"),
        f"{c}/messages": messages,
        f"{c}/review-events": _json_post("Review evidence from the viewer: images displayed, how long, window, "
                                         "quality", 400, 404),
        f"{c}/pins/{{message_id}}.jpg": {"get": {
            "summary": "A pinned image as its author saw it (window, annotations)",
            "parameters": [ID, {"name": "message_id", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 1}},
                           {"name": "size", "in": "query", "schema": {"type": "integer", "minimum": 64,
                                                                      "maximum": 1024}}],
            "responses": {"200": {"description": "JPEG", **JPEG}, "404": {"description": "not found", **JSON}}}},
        f"{c}/minutes.pdf": {"get": {"summary": "The consult's minutes (biên bản hội chẩn) as PDF", "parameters": [ID],
                                     "responses": {"200": {"description": "PDF", **PDF},
                                                   "404": {"description": "no such consult", **HTML}}}},
        f"{c}/panel.json": {"get": {"summary": "What the viewer's consult panel needs", "parameters": [ID],
                                    "responses": {"200": {"description": "OK", **JSON},
                                                  "404": {"description": "no such consult", **JSON}}}},
    }
