"""Optional e-mail about consults (``Settings.smtp_url``): who needs to hear of what just happened. No Flask.

Recipients per event: a new request goes to the hub's coordinators and its specialists of the specialty
asked (or all of them), and to named specialists; acceptance, refusal, the conclusion and its amendments
go to the requesting side; the decision and the outcome go to the specialists of the consult (the rules
ask the requesting side to tell the consultant what happened); a message goes to every other
participant except observers. Users without an address are skipped. Mail is sent after the action
committed, from a background thread: a slow or absent mail server never delays or fails the action
(failures are logged). The text is in Vietnamese, then English; it names no patient (e-mail is not a
safe place for health data): only the consult number, its urgency and a link.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from archive.models import Consult, User
from viewer.consults import service as svc

log = logging.getLogger(__name__)

SUBJECTS = {
    "requested": ("Yêu cầu hội chẩn mới", "New consult request"),
    "accepted": ("Ca hội chẩn đã được tiếp nhận", "Consult accepted"),
    "declined": ("Ca hội chẩn bị từ chối", "Consult declined"),
    "concluded": ("Đã có kết luận hội chẩn", "Conclusion signed"),
    "amended": ("Kết luận hội chẩn được sửa đổi", "Conclusion amended"),
    "decision": ("Tuyến dưới đã ghi nhận quyết định", "Decision recorded"),
    "outcome": ("Tuyến dưới đã ghi nhận kết quả điều trị", "Outcome recorded"),
    "message": ("Trao đổi mới trong ca hội chẩn", "New message in a consult"),
    "withdrawn": ("Yêu cầu hội chẩn đã được rút", "Consult withdrawn"),
}
URGENCY = {"emergency": ("CẤP CỨU", "EMERGENCY"), "urgent": ("Khẩn", "Urgent"), "routine": ("Thường quy", "Routine")}


@dataclass(frozen=True)
class Mail:
    to: tuple[str, ...]
    subject: str
    body: str


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    sender: str
    tls: bool  # smtps://
    starttls: bool
    user: str = ""
    password: str = ""


def parse_smtp_url(url: str) -> SmtpTarget:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    tls = parts.scheme == "smtps"
    host = parts.hostname or ""
    return SmtpTarget(host=host, port=parts.port or (465 if tls else 25),
                      sender=query.get("from", [f"telepacs@{host}"])[0], tls=tls,
                      starttls=query.get("starttls", ["0"])[0] in ("1", "true", "yes"),
                      user=unquote(parts.username or ""), password=unquote(parts.password or ""))


def recipients(session: Session, consult: Consult, event: str, actor_id: int) -> list[User]:
    """Who hears of ``event`` on ``consult`` (the person who did it never does)."""
    people: list[User] = []
    if event == "requested":
        hub_staff = session.execute(select(User).where(
            User.facility_fk == consult.hub_facility_fk, User.disabled.is_(False),
            User.role.in_([svc.ROLE_COORDINATOR, svc.ROLE_SPECIALIST]))).scalars()
        people = [u for u in hub_staff if u.role == svc.ROLE_COORDINATOR or not consult.specialty
                  or u.specialty.lower() == consult.specialty.lower()]
        people += [p.user for p in consult.participants if p.role == svc.ParticipantRole.SPECIALIST]
    elif event in ("accepted", "declined", "concluded", "amended"):
        people = [p.user for p in consult.participants if p.role == svc.ParticipantRole.REQUESTER]
    elif event in ("decision", "outcome"):
        people = [p.user for p in consult.participants if p.role == svc.ParticipantRole.SPECIALIST]
    elif event in ("message", "withdrawn"):
        people = [p.user for p in consult.participants if p.role != svc.ParticipantRole.OBSERVER]
    unique = {u.id: u for u in people if u.id != actor_id and not u.disabled and u.email.strip()}
    return list(unique.values())


def compose(consult: Consult, event: str, link: str) -> tuple[str, str]:
    vi, en = SUBJECTS.get(event, (event, event))
    u_vi, u_en = URGENCY.get(consult.urgency, (consult.urgency, consult.urgency))
    subject = f"[telepacs] {vi} / {en} #{consult.id} ({u_vi})"
    body = (f"{vi}: ca hội chẩn số {consult.id} ({u_vi}).\nXem tại: {link}\n\n"
            f"{en}: consult #{consult.id} ({u_en}).\nOpen: {link}\n\n"
            "Thư này không chứa thông tin người bệnh. / This e-mail holds no patient information.\n")
    return subject, body


def mails_for(session: Session, consult_id: int, event: str, actor_id: int, base_url: str) -> list[Mail]:
    consult = session.get(Consult, consult_id)
    if consult is None:
        return []
    to = tuple(u.email.strip() for u in recipients(session, consult, event, actor_id))
    if not to:
        return []
    subject, body = compose(consult, event, f"{base_url.rstrip('/')}/consults/{consult_id}")
    return [Mail(to, subject, body)]


def send(target: SmtpTarget, mails: list[Mail], timeout: float = 20.0) -> None:
    """Send now (raises ``OSError``/``smtplib.SMTPException`` on failure)."""
    if not mails:
        return
    smtp: smtplib.SMTP = (smtplib.SMTP_SSL(target.host, target.port, timeout=timeout,
                                           context=ssl.create_default_context())
                          if target.tls else smtplib.SMTP(target.host, target.port, timeout=timeout))
    with smtp:
        if target.starttls:
            smtp.starttls(context=ssl.create_default_context())
        if target.user:
            smtp.login(target.user, target.password)
        for mail in mails:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = target.sender, ", ".join(mail.to), mail.subject
            msg.set_content(mail.body)
            smtp.send_message(msg)


def send_in_background(smtp_url: str, mails: list[Mail]) -> threading.Thread | None:
    """Send from a daemon thread; failures are logged, never raised. Returns the thread (tests join it)."""
    if not smtp_url or not mails:
        return None
    target = parse_smtp_url(smtp_url)

    def run() -> None:
        try:
            send(target, mails)
            log.info("mail sent to %d recipient(s) via %s:%d: %s", sum(len(m.to) for m in mails), target.host,
                     target.port, mails[0].subject)
        except (OSError, smtplib.SMTPException) as exc:
            log.error("mail via %s:%d failed: %s: %s", target.host, target.port, exc.__class__.__name__, exc)

    thread = threading.Thread(target=run, name="telepacs-mail", daemon=True)
    thread.start()
    return thread
