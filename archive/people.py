"""Facilities, users and API tokens: the people side of the catalogue (no Flask here).

Every function works inside the caller's session and transaction (a write session for
writes: ``CatalogIndex.write_session()``) and appends its audit entry there, so a change
and its record commit together. Passwords are hashed with argon2id (argon2-cffi's
``PasswordHasher``, RFC 9106 parameters); API tokens are random and only their SHA-256
is kept.

Login policy: :data:`MAX_FAILURES` consecutive wrong passwords lock the account for
:data:`LOCKOUT`; while locked even the right password is refused. A user's
``password_changed_at`` stamps sessions (see ``viewer.auth``): changing the password or
disabling the user ends every session opened before.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from archive import audit
from archive.audit import AuditAction
from archive.models import ApiToken, Facility, FacilityAETitle, User, utcnow

MAX_FAILURES = 5
LOCKOUT = dt.timedelta(minutes=15)
MIN_PASSWORD = 10
MAX_PASSWORD = 512  # argon2 would take any length; a bound keeps a request from being a CPU sink
TOKEN_PREFIX = "tp_"
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
_FACILITY_CODE = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,63}$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash

_hasher = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4 (RFC 9106 "second recommended option")


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username is unknown, so that answer takes as long as a wrong password."""
    return _hasher.hash(secrets.token_hex(16))


class Role(StrEnum):
    REQUESTER = "requester"  # requesting (district) doctor
    SPECIALIST = "specialist"  # radiologist or other specialist who answers consults
    COORDINATOR = "coordinator"
    OBSERVER = "observer"  # trainee / observer: read-only
    ADMIN = "admin"


class Tier(StrEnum):
    CENTRAL = "central"
    PROVINCIAL = "provincial"
    DISTRICT = "district"
    COMMUNE = "commune"


class PeopleError(ValueError):
    """A request about users or facilities that cannot be carried out (the message says why)."""


class NotFound(PeopleError):
    """No such user, facility or token."""


class LoginOutcome(StrEnum):
    OK = "ok"
    BAD_CREDENTIALS = "bad_credentials"  # unknown user or wrong password: one answer for both
    LOCKED = "locked"
    DISABLED = "disabled"


@dataclass(frozen=True)
class LoginResult:
    outcome: LoginOutcome
    user: User | None = None
    locked_until: dt.datetime | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is LoginOutcome.OK


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite gives datetimes back without their zone: they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def parse_role(value: str | Role) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise PeopleError(f"role must be one of {', '.join(r.value for r in Role)}, not {value!r}") from None


def parse_tier(value: str | Tier) -> Tier:
    try:
        return Tier(value)
    except ValueError:
        raise PeopleError(f"tier must be one of {', '.join(t.value for t in Tier)}, not {value!r}") from None


def check_password_policy(password: str, username: str = "") -> None:
    """:class:`PeopleError` unless ``password`` is long enough, not too long, and not the username."""
    if len(password) < MIN_PASSWORD:
        raise PeopleError(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PeopleError(f"the password must have at most {MAX_PASSWORD} characters")
    if username and username.lower() in password.lower():
        raise PeopleError("the password must not contain the username")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


# -- facilities ------------------------------------------------------------------


def create_facility(session: Session, *, code: str, name: str = "", tier: str | Tier = Tier.DISTRICT,
                    actor: str = "cli", user_id: int | None = None) -> Facility:
    """A new facility; ``code`` is what ``studies.facility`` holds (upper case, e.g. ``BV-HUYEN-A``)."""
    code = code.strip().upper()
    if not _FACILITY_CODE.match(code):
        raise PeopleError(f"facility code {code!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if session.scalar(select(Facility).where(Facility.code == code)) is not None:
        raise PeopleError(f"facility {code} already exists")
    facility = Facility(code=code, name=name.strip() or code, tier=parse_tier(tier).value)
    session.add(facility)
    session.flush()
    audit.record(session, actor=actor, user_id=user_id, action=AuditAction.FACILITY_CREATED, object_type="facility",
                 object_id=code, detail={"name": facility.name, "tier": facility.tier})
    return facility


def get_facility(session: Session, code: str) -> Facility:
    facility = session.scalar(select(Facility).where(Facility.code == code.strip().upper()))
    if facility is None:
        raise NotFound(f"no facility {code!r}")
    return facility


def add_ae_title(session: Session, *, facility_code: str, ae_title: str, actor: str = "cli",
                 user_id: int | None = None) -> FacilityAETitle:
    """Declare that what ``ae_title`` sends belongs to the facility."""
    title = ae_title.strip()
    if not _AE_TITLE.match(title):
        raise PeopleError(f"AE title {ae_title!r} must be 1-16 printable characters without backslash")
    facility = get_facility(session, facility_code)
    existing = session.get(FacilityAETitle, title)
    if existing is not None:
        owner = session.get(Facility, existing.facility_fk)
        raise PeopleError(f"AE title {title} already belongs to facility {owner.code if owner else '?'}")
    row = FacilityAETitle(ae_title=title, facility_fk=facility.id)
    session.add(row)
    session.flush()
    audit.record(session, actor=actor, user_id=user_id, action=AuditAction.FACILITY_UPDATED, object_type="facility",
                 object_id=facility.code, detail={"ae_title_added": title})
    return row


def list_facilities(session: Session) -> list[Facility]:
    stmt = select(Facility).options(joinedload(Facility.ae_titles)).order_by(Facility.code)
    return list(session.scalars(stmt).unique())


def facility_for_ae(session: Session, ae_title: str) -> str | None:
    """The code of the facility an AE title belongs to, if declared."""
    row = session.get(FacilityAETitle, ae_title.strip())
    if row is None:
        return None
    return session.scalar(select(Facility.code).where(Facility.id == row.facility_fk))


# -- users ------------------------------------------------------------------------


def create_user(session: Session, *, username: str, password: str, role: str | Role, facility_code: str,
                display_name: str = "", email: str = "", specialty: str = "", certificate_number: str = "",
                certificate_scope: str = "", actor: str = "cli", user_id: int | None = None) -> User:
    """A new user of a facility, with an argon2id hash of ``password``."""
    username = username.strip().lower()
    if not _USERNAME.match(username):
        raise PeopleError(f"username {username!r} must be 2-64 lower-case letters, digits, '.', '_' or '-'")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise PeopleError(f"user {username} already exists")
    check_password_policy(password, username)
    facility = get_facility(session, facility_code)
    user = User(username=username, display_name=display_name.strip() or username, email=email.strip(),
                password_hash=hash_password(password), role=parse_role(role).value, facility_fk=facility.id,
                specialty=specialty.strip(), certificate_number=certificate_number.strip(),
                certificate_scope=certificate_scope.strip(), password_changed_at=utcnow())
    session.add(user)
    session.flush()
    audit.record(session, actor=actor, user_id=user_id, action=AuditAction.USER_CREATED, object_type="user",
                 object_id=username, detail={"role": user.role, "facility": facility.code})
    return user


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).options(joinedload(User.facility))
                          .where(User.username == username.strip().lower()))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def user_by_id(session: Session, user_id: int) -> User | None:
    return session.scalar(select(User).options(joinedload(User.facility)).where(User.id == user_id))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).options(joinedload(User.facility)).order_by(User.username)))


def count_users(session: Session) -> int:
    return len(session.scalars(select(User.id).limit(1)).all())


def authenticate(session: Session, username: str, password: str, *, remote: str = "",
                 now: dt.datetime | None = None) -> LoginResult:
    """Check a username and password, applying the lockout policy, and record the attempt.

    Call in a write session: a failure counts, a success resets the count.
    An unknown username and a wrong password get the same answer in about the same time.
    """
    now = now or utcnow()
    name = username.strip().lower()[:64]
    user = session.scalar(select(User).options(joinedload(User.facility)).where(User.username == name)
                          .with_for_update())
    detail = {"remote": remote} if remote else {}
    if user is None or len(password) > MAX_PASSWORD:
        _verify(_dummy_hash(), password[:MAX_PASSWORD])
        audit.record(session, actor=name or "?", action=AuditAction.LOGIN_FAILED, object_type="user",
                     object_id=name, detail=detail | {"reason": "unknown user" if user is None else "too long"})
        return LoginResult(LoginOutcome.BAD_CREDENTIALS)
    locked_until = _aware(user.locked_until)
    if locked_until is not None and locked_until > now:
        audit.record(session, actor=name, user_id=user.id, action=AuditAction.LOGIN_FAILED, object_type="user",
                     object_id=name, detail=detail | {"reason": "locked"})
        return LoginResult(LoginOutcome.LOCKED, locked_until=locked_until)
    if not _verify(user.password_hash, password):
        user.failed_logins = (user.failed_logins or 0) + 1
        audit.record(session, actor=name, user_id=user.id, action=AuditAction.LOGIN_FAILED, object_type="user",
                     object_id=name, detail=detail | {"reason": "wrong password", "failures": user.failed_logins})
        if user.failed_logins >= MAX_FAILURES:
            user.locked_until, user.failed_logins = now + LOCKOUT, 0
            audit.record(session, actor=name, user_id=user.id, action=AuditAction.ACCOUNT_LOCKED,
                         object_type="user", object_id=name,
                         detail=detail | {"until": user.locked_until.isoformat(), "after_failures": MAX_FAILURES})
            return LoginResult(LoginOutcome.LOCKED, locked_until=user.locked_until)
        return LoginResult(LoginOutcome.BAD_CREDENTIALS)
    if user.disabled:
        audit.record(session, actor=name, user_id=user.id, action=AuditAction.LOGIN_FAILED, object_type="user",
                     object_id=name, detail=detail | {"reason": "disabled"})
        return LoginResult(LoginOutcome.DISABLED)
    user.failed_logins, user.locked_until = 0, None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    audit.record(session, actor=name, user_id=user.id, action=AuditAction.LOGIN, object_type="user",
                 object_id=name, detail=detail)
    session.flush()
    return LoginResult(LoginOutcome.OK, user=user)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError):
        return False


def change_password(session: Session, user: User, old_password: str, new_password: str, *,
                    actor: str | None = None) -> None:
    """The user's own change: the old password must be right (:class:`PeopleError` otherwise)."""
    if not _verify(user.password_hash, old_password):
        raise PeopleError("the current password is wrong")
    if old_password == new_password:
        raise PeopleError("the new password must differ from the current one")
    _set_password(session, user, new_password, actor=actor or user.username, reset=False)


def set_password(session: Session, username: str, new_password: str, *, actor: str = "cli",
                 user_id: int | None = None) -> User:
    """An administrator's reset: no old password; also lifts a lockout."""
    user = get_user(session, username)
    _set_password(session, user, new_password, actor=actor, reset=True, actor_id=user_id)
    return user


def _set_password(session: Session, user: User, password: str, *, actor: str, reset: bool,
                  actor_id: int | None = None) -> None:
    check_password_policy(password, user.username)
    user.password_hash = hash_password(password)
    user.password_changed_at = utcnow()  # ends the sessions opened before
    user.failed_logins, user.locked_until = 0, None
    audit.record(session, actor=actor, user_id=actor_id if reset else user.id, action=AuditAction.PASSWORD_CHANGED,
                 object_type="user", object_id=user.username, detail={"reset_by_admin": reset})
    session.flush()


def set_disabled(session: Session, username: str, disabled: bool = True, *, actor: str = "cli",
                 user_id: int | None = None) -> User:
    """Disable (or enable again) a user; disabling also revokes their API tokens."""
    user = get_user(session, username)
    user.disabled = disabled
    user.password_changed_at = utcnow()  # ends open sessions either way
    if disabled:
        for token in session.scalars(select(ApiToken).where(ApiToken.user_fk == user.id,
                                                           ApiToken.revoked_at.is_(None))):
            token.revoked_at = utcnow()
    audit.record(session, actor=actor, user_id=user_id,
                 action=AuditAction.USER_DISABLED if disabled else AuditAction.USER_UPDATED,
                 object_type="user", object_id=user.username, detail={"disabled": disabled})
    session.flush()
    return user


def update_user(session: Session, username: str, *, actor: str = "cli", user_id: int | None = None,
                role: str | Role | None = None, facility_code: str | None = None, display_name: str | None = None,
                email: str | None = None, specialty: str | None = None, certificate_number: str | None = None,
                certificate_scope: str | None = None) -> User:
    """Change a user's profile; every change is recorded with its old and new value."""
    user = get_user(session, username)
    changes: dict[str, list[str]] = {}

    def put(field: str, value: str | None) -> None:
        if value is not None and getattr(user, field) != value:
            changes[field] = [str(getattr(user, field)), value]
            setattr(user, field, value)

    put("role", parse_role(role).value if role is not None else None)
    if facility_code is not None:
        facility = get_facility(session, facility_code)
        if facility.id != user.facility_fk:
            changes["facility"] = [user.facility.code, facility.code]
            user.facility_fk = facility.id
            user.password_changed_at = utcnow()  # what they may see changed: sign in again
    put("display_name", display_name)
    put("email", email)
    put("specialty", specialty)
    put("certificate_number", certificate_number)
    put("certificate_scope", certificate_scope)
    if changes:
        audit.record(session, actor=actor, user_id=user_id, action=AuditAction.USER_UPDATED, object_type="user",
                     object_id=user.username, detail={"changes": changes})
    session.flush()
    session.refresh(user)
    return user


# -- API tokens -------------------------------------------------------------------


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(session: Session, username: str, name: str = "", *, actor: str = "cli",
                 user_id: int | None = None) -> tuple[ApiToken, str]:
    """A new bearer token for a user: (its row, the secret, shown once and never stored)."""
    user = get_user(session, username)
    if user.disabled:
        raise PeopleError(f"user {user.username} is disabled")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_fk=user.id, name=name.strip()[:128], token_sha256=token_digest(secret))
    session.add(token)
    session.flush()
    audit.record(session, actor=actor, user_id=user_id, action=AuditAction.TOKEN_CREATED, object_type="token",
                 object_id=str(token.id), detail={"user": user.username, "name": token.name})
    return token, secret


def revoke_token(session: Session, token_id: int, *, actor: str = "cli", user_id: int | None = None) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"no token {token_id}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(session, actor=actor, user_id=user_id, action=AuditAction.TOKEN_REVOKED, object_type="token",
                     object_id=str(token.id), detail={"name": token.name})
    session.flush()
    return token


def list_tokens(session: Session, username: str | None = None) -> list[tuple[ApiToken, str]]:
    """(token, username) pairs, oldest first."""
    stmt = select(ApiToken, User.username).join(User, ApiToken.user_fk == User.id).order_by(ApiToken.id)
    if username is not None:
        stmt = stmt.where(User.username == username.strip().lower())
    return [(token, name) for token, name in session.execute(stmt).all()]


def user_for_token(session: Session, secret: str) -> tuple[User, ApiToken] | None:
    """The active user a bearer token stands for (None: unknown, revoked, or user disabled)."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    row = session.execute(
        select(ApiToken, User).join(User, ApiToken.user_fk == User.id).options(joinedload(User.facility))
        .where(ApiToken.token_sha256 == token_digest(secret))
    ).first()
    if row is None:
        return None
    token, user = row
    if token.revoked_at is not None or user.disabled:
        return None
    return user, token


__all__ = [
    "LOCKOUT", "MAX_FAILURES", "MIN_PASSWORD", "LoginOutcome", "LoginResult", "NotFound", "PeopleError", "Role",
    "Tier", "add_ae_title", "authenticate", "change_password", "check_password_policy", "count_users",
    "create_facility", "create_token", "create_user", "facility_for_ae", "get_facility", "get_user",
    "list_facilities", "list_tokens", "list_users", "revoke_token", "set_disabled", "set_password",
    "token_digest", "update_user", "user_by_id", "user_for_token",
]
