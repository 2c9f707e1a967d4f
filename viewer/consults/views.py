"""The consult pages and their small JSON API (blueprint ``consults``). Rules live in ``service``; this adapts HTTP.

Pages: ``/consults`` (inbox), ``/consults/new``, ``/consults/<id>`` (case, actions, thread, conclusions),
``/consults/<id>/minutes.pdf``. Forms post back and redirect (303) on success; a refused action renders
the consult page again with the reason and the proper status (400 bad input, 403 not allowed, 404, 409
wrong state). JSON: ``POST /consults/<id>/messages`` (also from the viewer panel, with a pinned state),
``POST /consults/<id>/review-events``, ``POST /consults/uploads/check``, ``GET /consults/<id>/pins/<mid>.jpg``.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, abort, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import gettext
from sqlalchemy.orm import Session

from archive.models import Consult, ConsultMessage, User
from viewer.auth import current_user
from viewer.consults import notify, pdf, service as svc, uploads
from viewer.consults.record import collect_record
from storage import StorageError
from viewer.deps import get_archive

log = logging.getLogger(__name__)
bp = Blueprint("consults", __name__, url_prefix="/consults")

STATUS = {svc.ConsultNotFound: 404, svc.NotAllowed: 403, svc.InvalidTransition: 409, svc.InvalidInput: 400}


def _status(exc: svc.ConsultError) -> int:
    return next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 400)


@contextmanager
def _write() -> Iterator[tuple[Session, User]]:
    """A write transaction and the logged-in user as a row of it (committed at the end, with its audit rows)."""
    who = current_user()
    if who is None:
        abort(401)
    with get_archive().index.write_session() as session, session.begin():
        user = session.get(User, who.id)
        if user is None or user.disabled:
            abort(401)
        yield session, user


@contextmanager
def _read() -> Iterator[tuple[Session, User]]:
    who = current_user()
    if who is None:
        abort(401)
    with get_archive().index.session() as session:
        user = session.get(User, who.id)
        if user is None or user.disabled:
            abort(401)
        yield session, user


def _json_error(status: int, message: str) -> ResponseReturnValue:
    log.warning("consults %s %s: %s %s", request.method, request.path, status, message)
    return jsonify(error=message, status=status), status


def _wants_json() -> bool:
    return request.is_json or request.accept_mimetypes.best == "application/json"


def _form_text(name: str) -> str:
    return (request.form.get(name) or "").strip()


def _flag(name: str) -> bool:
    return request.form.get(name) in ("1", "on", "true", "yes")


def _due_times() -> svc.DueTimes:
    from flask import current_app

    return svc.DueTimes.from_settings(current_app.config["TELEPACS_SETTINGS"])


def _notify(consult_id: int, event: str | None) -> None:
    """E-mail who needs to hear of it (when ``smtp_url`` is set), after the action committed."""
    from flask import current_app

    settings = current_app.config["TELEPACS_SETTINGS"]
    who = current_user()
    if not event or not settings.smtp_url or who is None:
        return
    with get_archive().index.session() as session:
        mails = notify.mails_for(session, consult_id, event, who.id, settings.public_url or request.host_url)
    notify.send_in_background(settings.smtp_url, mails)


# -- inbox ----------------------------------------------------------------------------------


@bp.get("")
def inbox() -> ResponseReturnValue:
    with _read() as (session, user):
        items = svc.inbox(session, user, include_finished=request.args.get("all") == "1")
        overdue = svc.overdue(session, user) if user.role in (svc.ROLE_COORDINATOR, svc.ROLE_ADMIN) else []
        names = svc.facility_names(session)
        return render_template("consults/inbox.html", items=items, overdue=overdue, names=names, user=user,
                               can_request=user.role == svc.ROLE_REQUESTER, show_all=request.args.get("all") == "1",
                               deid={i.consult.id: svc.sees_deidentified(i.consult, user) for i in items},
                               now=svc.utcnow(), as_utc=svc._as_utc)


# -- new consult ----------------------------------------------------------------------------


@bp.get("/new")
def new_form() -> ResponseReturnValue:
    return _render_new()


def _render_new(error: str = "", status: int = 200) -> ResponseReturnValue:
    with _read() as (session, user):
        if user.role != svc.ROLE_REQUESTER:
            return render_template("consults/error.html", message=gettext(
                "Only a requesting doctor can request a consult."), status=403), 403
        hubs = svc.hub_facilities(session, user)
        return render_template("consults/new.html", studies=svc.facility_studies(session, user), hubs=hubs,
                               specialists=svc.specialists_of(session, [h.id for h in hubs]), error=error,
                               form=request.form, urgencies=list(svc.Urgency)), status


@bp.post("")
def create() -> ResponseReturnValue:
    questions = [q for q in request.form.getlist("question") if q.strip()]
    try:
        specialist_ids = [int(v) for v in request.form.getlist("specialist") if v]
    except ValueError:
        return _render_new(gettext("The specialist chosen is not valid."), 400)
    req = svc.ConsultRequest(
        patient_id=_form_text("patient_id"), patient_name=_form_text("patient_name"),
        clinical_summary=_form_text("clinical_summary"), questions=questions,
        urgency=_form_text("urgency"), hub_facility_code=_form_text("hub"),
        patient_informed=_flag("patient_informed"), specialty=_form_text("specialty"),
        specialist_user_ids=specialist_ids, study_uids=request.form.getlist("study"),
        observers_allowed=_flag("observers_allowed"), deidentify_for_observers=_flag("deidentify"),
    )
    if not req.study_uids:
        return _render_new(gettext("Attach at least one study (or wait until every uploaded file is stored)."), 400)
    try:
        with _write() as (session, user):
            consult = svc.create_consult(session, user, req, due=_due_times())
            consult_id = consult.id
    except svc.ConsultError as exc:
        log.warning("consult request refused: %s", exc)
        return _render_new(str(exc), _status(exc))
    _notify(consult_id, "requested")
    return redirect(url_for("consults.show", consult_id=consult_id), 303)


@bp.post("/uploads/check")
def uploads_check() -> ResponseReturnValue:
    """Which files the browser holds are already stored, byte for byte (resumable uploads)."""
    if current_user() is None:
        return _json_error(401, "log in first")
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("files"), list):
        return _json_error(400, 'send {"files": [{"uid", "size", "sha256"}, ...]}')
    try:
        claims = [uploads.FileClaim(str(f["uid"]), int(f["size"]), str(f["sha256"]).lower()) for f in body["files"]]
        results = uploads.check_stored(get_archive(), claims)
    except (KeyError, TypeError, ValueError) as exc:
        return _json_error(400, f"bad file list: {exc}")
    return jsonify(files=[{"uid": r.sop_instance_uid, "stored": r.stored, "same": r.same, "study": r.study_uid}
                          for r in results])


# -- the consult page -----------------------------------------------------------------------


def viewer_url(msg: ConsultMessage, consult_id: int) -> str:
    """The viewer URL that shows exactly what the message pinned (contracts.md viewer parameters)."""
    vp = msg.pin_viewport or {}
    params: dict[str, Any] = {"series": msg.pin_series_uid, "instance": msg.pin_instance_uid,
                              "frame": msg.pin_frame or 1}
    for key in ("wc", "ww", "zoom", "panx", "pany", "rotate", "flip"):
        if vp.get(key) not in (None, ""):
            params[key] = vp[key]
    if vp.get("invert") in (True, 1, "1", "true"):
        params["invert"] = 1
    if msg.pin_annotations:
        raw = json.dumps(msg.pin_annotations, separators=(",", ":")).encode()
        params["ann"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    params["consult"] = consult_id
    return f"/viewer/{msg.pin_study_uid}?{urlencode(params)}"


MAX_ID = 2**31 - 1  # larger numbers in a URL name nothing (and overflow the database's integers)


def _load(session: Session, consult_id: int, user: User) -> Consult:
    if consult_id > MAX_ID:
        raise svc.ConsultNotFound(f"no consult {consult_id}")
    return svc.get_consult(session, consult_id, user)


@bp.get("/<int:consult_id>")
def show(consult_id: int) -> ResponseReturnValue:
    return _render_consult(consult_id)


def _render_consult(consult_id: int, error: str = "", status: int = 200) -> ResponseReturnValue:
    try:
        with _write() as (session, user):
            consult = _load(session, consult_id, user)
            svc.mark_read(session, consult, user)
            deid = svc.sees_deidentified(consult, user)
            record = collect_record(session, consult, deidentify=deid)
            page = render_template(
                "consults/consult.html", c=consult, record=record, user=user, error=error,
                actions=svc.allowed_actions(consult, user), deid=deid, viewer_url=viewer_url,
                read_only=not svc.can_post(consult, user),
                candidates=svc.observer_candidates(session, consult)
                if "add_observer" in svc.allowed_actions(consult, user) else [],
                names=svc.facility_names(session), now=svc.utcnow(), as_utc=svc._as_utc,
                overdue=svc.is_overdue(consult, svc.utcnow()))
    except svc.ConsultNotFound:
        log.warning("consult %s: not found or not visible to %s", consult_id, getattr(current_user(), "username", "?"))
        return render_template("consults/error.html", message=gettext("No such consult."), status=404), 404
    return page, status


def _act(consult_id: int, action: Callable[[Session, Consult, User], object],
         event: str | Callable[[object], str] | None = None) -> ResponseReturnValue:
    """Run one state action; on refusal show the consult again with the reason (or a JSON error).
    ``event`` (or a function of the action's result giving it) names what to e-mail about."""
    try:
        with _write() as (session, user):
            result = action(session, _load(session, consult_id, user), user)
    except svc.ConsultError as exc:
        log.warning("consult %s %s refused: %s", consult_id, request.path.rsplit("/", 1)[-1], exc)
        if _wants_json():
            return _json_error(_status(exc), str(exc))
        if isinstance(exc, svc.ConsultNotFound):
            return render_template("consults/error.html", message=gettext("No such consult."), status=404), 404
        return _render_consult(consult_id, str(exc), _status(exc))
    _notify(consult_id, event(result) if callable(event) else event)
    return redirect(url_for("consults.show", consult_id=consult_id), 303)


@bp.post("/<int:consult_id>/accept")
def accept(consult_id: int) -> ResponseReturnValue:
    return _act(consult_id, svc.accept, "accepted")


@bp.post("/<int:consult_id>/decline")
def decline(consult_id: int) -> ResponseReturnValue:
    return _act(consult_id, lambda s, c, u: svc.decline(s, c, u, _form_text("reason")), "declined")


@bp.post("/<int:consult_id>/withdraw")
def withdraw(consult_id: int) -> ResponseReturnValue:
    return _act(consult_id, lambda s, c, u: svc.withdraw(s, c, u, _form_text("reason")), "withdrawn")


@bp.post("/<int:consult_id>/close")
def close(consult_id: int) -> ResponseReturnValue:
    return _act(consult_id, svc.close)


@bp.post("/<int:consult_id>/decision")
def decision(consult_id: int) -> ResponseReturnValue:
    follows = {"yes": True, "no": False}.get(request.form.get("follows_advice", ""))
    return _act(consult_id, lambda s, c, u: svc.record_follow_up(s, c, u, "decision", _form_text("text"), follows),
                "decision")


@bp.post("/<int:consult_id>/outcome")
def outcome(consult_id: int) -> ResponseReturnValue:
    return _act(consult_id, lambda s, c, u: svc.record_follow_up(s, c, u, "outcome", _form_text("text")), "outcome")


@bp.post("/<int:consult_id>/observers")
def add_observer(consult_id: int) -> ResponseReturnValue:
    def run(s: Session, c: Consult, u: User) -> None:
        try:
            other = s.get(User, int(request.form.get("user", "")))
        except ValueError:
            other = None
        if other is None:
            raise svc.InvalidInput("choose a user")
        svc.add_participant(s, c, u, other, request.form.get("role", "observer"))
    return _act(consult_id, run)


@bp.post("/<int:consult_id>/conclusion")
def conclude(consult_id: int) -> ResponseReturnValue:
    answers: dict[int, str] = {}
    for key, value in request.form.items():
        if key.startswith("answer-"):
            try:
                answers[int(key.removeprefix("answer-"))] = value
            except ValueError:
                pass
    draft = svc.ConclusionDraft(answers=answers, findings=_form_text("findings"), impression=_form_text("impression"),
                                recommendation=_form_text("recommendation"),
                                transfer_recommended=_flag("transfer_recommended"),
                                transfer_to=_form_text("transfer_to"), amendment_reason=_form_text("amendment_reason"))
    if not _flag("confirm_sign"):
        return _render_consult(consult_id, gettext("Tick the box to sign: a signed conclusion cannot be changed."), 400)
    return _act(consult_id, lambda s, c, u: svc.sign_conclusion(s, c, u, draft),
                lambda signed: "amended" if getattr(signed, "version", 1) > 1 else "concluded")


def _pin_from_json(value: Any) -> svc.PinnedImage | None:
    """The viewer's ``getState()`` (plus the study) as a pin; ``None`` when no image is pinned."""
    if value in (None, {}):
        return None
    if not isinstance(value, dict):
        raise svc.InvalidInput("pin must be an object (the viewer state)")
    try:
        viewport = {k: value[k] for k in svc.VIEWPORT_KEYS if k in value and value[k] is not None}
        annotations = value.get("annotations") or []
        if not isinstance(annotations, list):
            raise svc.InvalidInput("annotations must be a list")
        return svc.PinnedImage(study_uid=str(value["study"]), series_uid=str(value["series"]),
                               instance_uid=str(value["instance"]), frame=int(value.get("frame") or 1),
                               viewport=viewport, annotations=annotations)
    except (KeyError, TypeError, ValueError) as exc:
        raise svc.InvalidInput(f"pin needs study, series, instance and frame: {exc}") from None


@bp.post("/<int:consult_id>/messages")
def post_message(consult_id: int) -> ResponseReturnValue:
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _json_error(400, 'send {"text": ..., "pin": {viewer state}}')
        text = str(body.get("text") or "")
        try:
            pin = _pin_from_json(body.get("pin"))
            with _write() as (session, user):
                msg = svc.post_message(session, _load(session, consult_id, user), user, text, pin)
                msg_id = msg.id
        except svc.ConsultError as exc:
            return _json_error(_status(exc), str(exc))
        _notify(consult_id, "message")
        return jsonify(id=msg_id, url=url_for("consults.show", consult_id=consult_id) + f"#m{msg_id}"), 201
    return _act(consult_id, lambda s, c, u: svc.post_message(s, c, u, _form_text("text")), "message")


@bp.post("/<int:consult_id>/review-events")
def review_events(consult_id: int) -> ResponseReturnValue:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        return _json_error(400, 'send {"events": [{study, series, instance, frame, wc, ww, quality, start, end}]}')
    try:
        samples = [_sample(e) for e in body["events"]]
        with _write() as (session, user):
            count = svc.record_review(session, _load(session, consult_id, user), user, samples)
    except svc.ConsultError as exc:
        return _json_error(_status(exc), str(exc))
    return jsonify(recorded=count), 201


def _sample(e: Any) -> svc.ReviewSample:
    try:
        return svc.ReviewSample(
            study_uid=str(e["study"]), series_uid=str(e["series"]), instance_uid=str(e["instance"]),
            frame=int(e.get("frame") or 1),
            window_center=None if e.get("wc") is None else float(e["wc"]),
            window_width=None if e.get("ww") is None else float(e["ww"]), quality=str(e.get("quality", "")),
            started_at=_epoch_ms(e["start"]), ended_at=_epoch_ms(e["end"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise svc.InvalidInput(f"bad review event: {exc}") from None


def _epoch_ms(value: Any) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(value) / 1000, dt.timezone.utc)


@bp.get("/<int:consult_id>/pins/<int:message_id>.jpg")
def pin_image(consult_id: int, message_id: int) -> ResponseReturnValue:
    """The pinned image as its author saw it (window, annotations): the thread's thumbnail."""
    archive = get_archive()
    with _read() as (session, user):
        try:
            consult = _load(session, consult_id, user)
        except svc.ConsultNotFound:
            return _json_error(404, "no such consult")
        msg = session.get(ConsultMessage, message_id) if message_id <= MAX_ID else None
        if msg is None or msg.consult_fk != consult.id or not msg.pin_instance_uid:
            return _json_error(404, "no such pinned image")
        session.expunge(msg)
    try:
        with archive.open_instance(msg.pin_instance_uid) as f:
            image = pdf.render_pinned_image(f.read(), msg)
    except (OSError, ValueError, KeyError, StorageError) as exc:
        log.warning("consult %s pin %s: %s", consult_id, message_id, exc)
        return _json_error(404, "the pinned image is not available")
    size = request.args.get("size", type=int) or 320
    image.thumbnail((max(64, min(size, 1024)),) * 2)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return Response(buf.getvalue(), mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@bp.get("/<int:consult_id>/minutes.pdf")
def minutes_pdf(consult_id: int) -> ResponseReturnValue:
    archive = get_archive()
    try:
        with _write() as (session, user):
            consult = _load(session, consult_id, user)
            record = collect_record(session, consult, deidentify=svc.sees_deidentified(consult, user))
            data = pdf.build_pdf(record, pdf.archive_pin_renderer(archive.open_instance),
                                 generated_by=user.display_name or user.username)
            svc.record_export(session, consult, user, "pdf")
    except svc.ConsultNotFound:
        return render_template("consults/error.html", message=gettext("No such consult."), status=404), 404
    return Response(data, mimetype="application/pdf", headers={
        "Content-Disposition": f'inline; filename="bien-ban-hoi-chan-{consult_id}.pdf"',
        "Cache-Control": "private, no-store"})


@bp.get("/<int:consult_id>/panel.json")
def panel_info(consult_id: int) -> ResponseReturnValue:
    """What the viewer's consult panel shows: the consult, whether the user may write, the pinned messages."""
    with _read() as (session, user):
        try:
            consult = _load(session, consult_id, user)
        except svc.ConsultNotFound:
            return _json_error(404, "no such consult")
        deid = svc.sees_deidentified(consult, user)
        return jsonify(id=consult.id, state=consult.state, urgency=consult.urgency,
                       patient="" if deid else consult.patient_name, deidentified=deid,
                       can_post="post" in svc.allowed_actions(consult, user),
                       url=url_for("consults.show", consult_id=consult.id))
