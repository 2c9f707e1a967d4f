"""Consult e-mail (viewer.consults.notify) through a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

from email import message_from_bytes, policy
from typing import Any, Iterator

import pytest

from consult_data import build_world, draft_for, request_for
from tests.peers import free_port
from viewer.consults import notify, service as svc


class Inbox:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[str, Inbox]]:
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}?from=telepacs@bachmai.example", inbox
    finally:
        controller.stop()


def test_who_hears_of_what_and_the_mail_arrives(sqlite_archive, smtp):
    url, inbox = smtp
    with sqlite_archive.index.write_session() as s:
        w = build_world(s)
        for user, address in ((w.doctor, "lan@muongte.example"), (w.radiologist, "hung@bachmai.example"),
                              (w.cardiologist, "tim@bachmai.example"), (w.coordinator, "dieuphoi@bachmai.example"),
                              (w.observer, "an@laichau.example")):
            user.email = address
        c = svc.create_consult(s, w.doctor, request_for())
        s.commit()
        new = notify.mails_for(s, c.id, "requested", w.doctor.id, "https://pacs.example/")
        assert [sorted(m.to) for m in new] == [["dieuphoi@bachmai.example", "hung@bachmai.example"]]  # radiology
        assert "Lò Văn Páo" not in new[0].body and "MT-0001" not in new[0].body
        assert f"https://pacs.example/consults/{c.id}" in new[0].body
        thread = notify.send_in_background(url, new)
        assert thread is not None
        thread.join(10)
        svc.accept(s, c, w.radiologist)
        svc.add_participant(s, c, w.doctor, w.observer, "observer")
        svc.sign_conclusion(s, c, w.radiologist, draft_for(c))
        s.commit()
        assert [m.to for m in notify.mails_for(s, c.id, "concluded", w.radiologist.id, "http://x")] == \
            [("lan@muongte.example",)]
        assert [m.to for m in notify.mails_for(s, c.id, "message", w.doctor.id, "http://x")] == \
            [("hung@bachmai.example",)]  # not the observer, not the author
        svc.record_follow_up(s, c, w.doctor, "decision", "Chuyển viện.", True)
        s.commit()
        decision = notify.mails_for(s, c.id, "decision", w.doctor.id, "http://x")
        assert [m.to for m in decision] == [("hung@bachmai.example",)]
        thread = notify.send_in_background(url, decision)
        assert thread is not None
        thread.join(10)
    assert [sorted(to) for to, _ in inbox.received] == [["dieuphoi@bachmai.example", "hung@bachmai.example"],
                                                          ["hung@bachmai.example"]]
    first = inbox.received[0][1]
    assert first["From"] == "telepacs@bachmai.example"
    assert "Yêu cầu hội chẩn mới" in str(first["Subject"]) and "CẤP CỨU" in str(first["Subject"])


def test_a_dead_mail_server_is_logged_not_raised(caplog):
    mail = [notify.Mail(("a@b.example",), "s", "b")]
    thread = notify.send_in_background(f"smtp://127.0.0.1:{free_port()}", mail)
    assert thread is not None
    thread.join(30)
    assert any("mail via 127.0.0.1" in r.message and r.levelname == "ERROR" for r in caplog.records)
    assert notify.send_in_background("", mail) is None


def test_smtp_url_setting(tmp_path):
    from archive.config import ConfigError, load_settings

    target = notify.parse_smtp_url("smtps://u%40x:p%20w@mail.example?from=pacs@x.example")
    assert (target.host, target.port, target.tls, target.user, target.password, target.sender) == \
        ("mail.example", 465, True, "u@x", "p w", "pacs@x.example")
    with pytest.raises(ConfigError, match="smtp://"):
        load_settings(env={"TELEPACS_SMTP_URL": "http://mail"}, data_dir=str(tmp_path))
    assert load_settings(env={"TELEPACS_SMTP_URL": "smtp://mail:2525"}, data_dir=str(tmp_path)).smtp_url
