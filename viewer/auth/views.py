"""The pages of ``viewer.auth``: log in, log out, change one's password (blueprint ``auth``)."""

from __future__ import annotations

import datetime as dt
import logging
import math

from flask import Blueprint, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import gettext

from archive import audit, people
from archive.audit import AuditAction
from archive.models import utcnow
from viewer.auth.identity import current_user, end_session, forget_cached_users, start_session
from viewer.deps import get_archive

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)


def safe_next(target: str | None) -> str:
    """A same-site path to go to after the login (never another host: no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target \
            and not target.startswith("/login"):
        return target
    return "/"


def _locked_message(until: dt.datetime | None) -> str:
    minutes = max(1, math.ceil(((until or utcnow()) - utcnow()).total_seconds() / 60))
    return gettext("Too many failed attempts: this account is locked. "
                   "Try again in %(num)d min or ask your administrator.", num=minutes)


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if current_user() is not None:
            return redirect(target)
        return render_template("auth/login.html", next=target, username="", error=None)
    username = request.form.get("username", "")
    password = request.form.get("password", "")
    with get_archive().index.write_session() as db, db.begin():
        result = people.authenticate(db, username, password, remote=request.remote_addr or "")
    if result.ok and result.user is not None:
        start_session(result.user)
        log.info("auth: %s logged in from %s", result.user.username, request.remote_addr)
        return redirect(target)
    if result.outcome is people.LoginOutcome.LOCKED:
        error = _locked_message(result.locked_until)
    elif result.outcome is people.LoginOutcome.DISABLED:
        error = gettext("This account is disabled. Ask your administrator.")
    else:
        error = gettext("Wrong username or password.")
    log.warning("auth: login as %r from %s refused: %s", username[:64], request.remote_addr, result.outcome.value)
    return render_template("auth/login.html", next=target, username=username[:64], error=error), 401


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    user = current_user()
    if user is not None:
        with get_archive().index.write_session() as db, db.begin():
            audit.record(db, actor=user.username, user_id=user.id, action=AuditAction.LOGOUT, object_type="user",
                         object_id=user.username, detail={"remote": request.remote_addr or ""})
        log.info("auth: %s logged out", user.username)
    end_session()
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
def change_password() -> ResponseReturnValue:
    user = current_user()
    assert user is not None  # the guard lets no anonymous request through
    if request.method == "GET":
        return render_template("auth/password.html", error=None, done=False)
    new = request.form.get("new_password", "")
    if new != request.form.get("confirm_password", ""):
        return render_template("auth/password.html", error=gettext("The two new passwords differ."),
                               done=False), 400
    try:
        with get_archive().index.write_session() as db, db.begin():
            me = people.get_user(db, user.username)
            people.change_password(db, me, request.form.get("current_password", ""), new)
            changed = me
    except people.PeopleError as exc:
        log.warning("auth: password change of %s refused: %s", user.username, exc)
        return render_template("auth/password.html", error=_translated(exc), done=False), 400
    forget_cached_users()
    start_session(changed)  # this browser stays logged in; every other session of the user ends
    log.info("auth: %s changed their password", user.username)
    return render_template("auth/password.html", error=None, done=True)


def _translated(exc: people.PeopleError) -> str:
    text = str(exc)
    if text == "the current password is wrong":
        return gettext("The current password is wrong.")
    if text == "the new password must differ from the current one":
        return gettext("The new password must differ from the current one.")
    if text == "the password must not contain the username":
        return gettext("The password must not contain the username.")
    if text.startswith("the password must have at least"):
        return gettext("The password must have at least %(num)d characters.", num=people.MIN_PASSWORD)
    if text.startswith("the password must have at most"):
        return gettext("The password is too long.")
    current_app.logger.error("untranslated people error: %s", text)
    return text
