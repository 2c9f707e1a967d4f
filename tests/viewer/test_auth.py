"""Login, lockout, CSRF, API tokens, password change and disabled users, against the real gunicorn."""

from __future__ import annotations

import base64
import time

import pytest
import requests
from sqlalchemy import select

from archive import audit, people
from archive.audit import AuditAction
from archive.models import AuditEntry
from helpers import TS_DIR, dicom_files, make_settings
from tests.viewer.test_dicomweb import _stow, _uids
from tests.viewer.conftest import ADMIN, ADMIN_PASSWORD, csrf_from
from viewer import create_app

PASSWORD = "Mật khẩu đủ dài 2026"


def _actions(web, username: str) -> list[str]:
    with web.archive.index.session() as session:
        return list(session.scalars(select(AuditEntry.action).where(AuditEntry.object_id == username)
                                    .order_by(AuditEntry.id)))


def _post_login(session: requests.Session, web, username: str, password: str, **extra: str) -> requests.Response:
    token = csrf_from(session.get(web.url + "/login", timeout=10).text)
    return session.post(web.url + "/login", data={"username": username, "password": password, "csrf_token": token,
                                                  **extra}, timeout=30, allow_redirects=False)


def _wait_until(check, seconds: float = 10.0) -> bool:
    """Poll ``check`` (identity caches in the server live a few seconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return False


def test_anonymous_requests_are_refused(web):
    page = requests.get(web.url + "/ohif/", timeout=10, allow_redirects=False)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login?next=/ohif/")
    api = requests.get(web.dicomweb + "/studies", timeout=10)
    assert api.status_code == 401 and api.json()["status"] == 401
    assert api.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.get(web.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(web.url + "/openapi.json", timeout=10).status_code == 200
    login = requests.get(web.url + "/login", timeout=10)
    assert login.status_code == 200 and 'name="password"' in login.text
    unknown = requests.get(web.url + "/no/such/page", timeout=10, allow_redirects=False)
    assert unknown.status_code == 302  # an anonymous visitor learns nothing about which routes exist


def test_login_sets_a_safe_cookie_and_opens_the_api(web):
    session = requests.Session()
    answer = _post_login(session, web, ADMIN, ADMIN_PASSWORD, next="/ohif/viewer?StudyInstanceUIDs=1.2.3")
    assert answer.status_code == 302 and answer.headers["Location"] == "/ohif/viewer?StudyInstanceUIDs=1.2.3"
    cookie = answer.headers["Set-Cookie"]
    assert "telepacs_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # the fixture's public URL is http://
    assert session.get(web.dicomweb + "/studies", timeout=10).status_code == 200
    page = session.get(web.url + "/account/password", timeout=10)
    assert page.status_code == 200 and "Log out" in page.text and 'name="csrf-token"' in page.text
    assert AuditAction.LOGIN in _actions(web, ADMIN)


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example"])
def test_login_never_redirects_to_another_site(web, target):
    answer = _post_login(requests.Session(), web, ADMIN, ADMIN_PASSWORD, next=target)
    assert answer.status_code == 302 and answer.headers["Location"] == "/"


def test_wrong_password_and_unknown_user_get_the_same_answer(web):
    wrong = _post_login(requests.Session(), web, ADMIN, "not the password at all")
    unknown = _post_login(requests.Session(), web, "nobody", "not the password at all")
    for answer in (wrong, unknown):
        assert answer.status_code == 401 and "Wrong username or password." in answer.text
        assert "telepacs_session" not in answer.cookies or "uid" not in answer.text
    assert _actions(web, ADMIN)[-1] == AuditAction.LOGIN_FAILED
    assert _actions(web, "nobody") == [AuditAction.LOGIN_FAILED]


def test_lockout_after_five_failures(web):
    web.add_user("bacsi.lan", PASSWORD, facility="BV-HUYEN-A")
    session = requests.Session()
    for attempt in range(1, people.MAX_FAILURES):
        answer = _post_login(session, web, "bacsi.lan", f"wrong guess {attempt}")
        assert answer.status_code == 401 and "Wrong username or password." in answer.text
    fifth = _post_login(session, web, "bacsi.lan", "wrong guess 5")
    assert fifth.status_code == 401 and "this account is locked. Try again in 15 min" in fifth.text
    right = _post_login(session, web, "bacsi.lan", PASSWORD)  # even the right password, while locked
    assert right.status_code == 401 and "this account is locked" in right.text
    assert session.get(web.dicomweb + "/studies", timeout=10).status_code == 401
    in_vietnamese = requests.Session()
    in_vietnamese.cookies.set("telepacs_lang", "vi")
    vietnamese = _post_login(in_vietnamese, web, "bacsi.lan", PASSWORD)
    assert "bị khoá" in vietnamese.text or "bị khóa" in vietnamese.text
    actions = _actions(web, "bacsi.lan")
    assert actions.count(AuditAction.ACCOUNT_LOCKED) == 1 and actions.count(AuditAction.LOGIN) == 0
    # An administrator's reset lifts the lockout.
    with web.archive.index.write_session() as db, db.begin():
        people.set_password(db, "bacsi.lan", PASSWORD + "!", actor="test")
    assert _post_login(requests.Session(), web, "bacsi.lan", PASSWORD + "!").status_code == 302


def test_csrf_is_required_for_session_posts(web):
    anonymous = requests.post(web.url + "/login", data={"username": ADMIN, "password": ADMIN_PASSWORD},
                              timeout=10, allow_redirects=False)
    assert anonymous.status_code == 403 and "reload the page" in anonymous.text
    session = web.login()
    forged = requests.Session()
    forged.cookies.update(session.cookies)  # a cross-site form: the cookie rides along, the token does not
    refused = forged.post(web.url + "/logout", timeout=10, allow_redirects=False)
    assert refused.status_code == 403
    wrong_token = forged.post(web.url + "/logout", data={"csrf_token": "x" * 43}, timeout=10, allow_redirects=False)
    assert wrong_token.status_code == 403
    stow = forged.post(web.dicomweb + "/studies", data=b"--x--", timeout=10,
                       headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert stow.status_code == 403 and stow.json()["status"] == 403
    assert session.get(web.dicomweb + "/studies", timeout=10).status_code == 200  # still logged in
    logout = session.post(web.url + "/logout", timeout=10, allow_redirects=False)  # X-CSRF-Token header
    assert logout.status_code == 302
    assert session.get(web.dicomweb + "/studies", timeout=10).status_code == 401
    assert AuditAction.LOGOUT in _actions(web, ADMIN)


def test_api_tokens_bearer_and_basic(web):
    token = web.add_user("pacs.client", PASSWORD, facility="BV-HUYEN-A")
    assert web.token_session(token).get(web.dicomweb + "/studies", timeout=10).status_code == 200
    basic = base64.b64encode(f"pacs.client:{token}".encode()).decode()
    assert requests.get(web.dicomweb + "/studies", headers={"Authorization": f"Basic {basic}"},
                        timeout=10).status_code == 200
    for header in (f"Bearer {token}x", "Bearer ", "Token abc",
                   "Basic " + base64.b64encode(f"pacs.client:{PASSWORD}".encode()).decode(),  # never a password
                   "Basic " + base64.b64encode(f"admin:{token}".encode()).decode(),  # someone else's token
                   "Basic !!!"):
        answer = requests.get(web.dicomweb + "/studies", headers={"Authorization": header}, timeout=10)
        assert answer.status_code == 401, header
    # A token needs no CSRF token (a browser never sends it by itself); what it stores is its user's facility's.
    path = dicom_files(TS_DIR)[0]
    assert _stow(web, [path], http=web.token_session(token)).status_code == 200
    assert web.archive.index.study_summary(_uids(path)[0])["facility"] == "BV-HUYEN-A"
    with web.archive.index.write_session() as db, db.begin():
        (row, _), = [(t, u) for t, u in people.list_tokens(db, "pacs.client")]
        people.revoke_token(db, row.id, actor="test")
    assert _wait_until(lambda: web.token_session(token).get(web.dicomweb + "/studies", timeout=10)
                       .status_code == 401)


def test_password_change_ends_other_sessions(web):
    web.add_user("bs.minh", PASSWORD, role="specialist", facility="BV-TINH")
    here, elsewhere = web.login("bs.minh", PASSWORD), web.login("bs.minh", PASSWORD)
    form = {"current_password": "not my password", "new_password": "một mật khẩu mới hơn",
            "confirm_password": "một mật khẩu mới hơn"}
    refused = here.post(web.url + "/account/password", data=form, timeout=30)
    assert refused.status_code == 400 and "The current password is wrong." in refused.text
    short = here.post(web.url + "/account/password", timeout=30,
                      data=dict(form, current_password=PASSWORD, new_password="short", confirm_password="short"))
    assert short.status_code == 400 and "at least 10 characters" in short.text
    done = here.post(web.url + "/account/password", data=dict(form, current_password=PASSWORD), timeout=30)
    assert done.status_code == 200 and "Your password was changed." in done.text
    assert here.get(web.dicomweb + "/studies", timeout=10).status_code == 200  # this browser stays in
    assert _wait_until(lambda: elsewhere.get(web.dicomweb + "/studies", timeout=10).status_code == 401)
    assert _post_login(requests.Session(), web, "bs.minh", PASSWORD).status_code == 401
    assert _post_login(requests.Session(), web, "bs.minh", "một mật khẩu mới hơn").status_code == 302
    assert AuditAction.PASSWORD_CHANGED in _actions(web, "bs.minh")


def test_disabled_user_is_out(web):
    token = web.add_user("bs.cu", PASSWORD, facility="BV-HUYEN-A")
    session = web.login("bs.cu", PASSWORD)
    with web.archive.index.write_session() as db, db.begin():
        people.set_disabled(db, "bs.cu", actor="test")
    assert _wait_until(lambda: session.get(web.dicomweb + "/studies", timeout=10).status_code == 401)
    assert web.token_session(token).get(web.dicomweb + "/studies", timeout=10).status_code == 401
    answer = _post_login(requests.Session(), web, "bs.cu", PASSWORD)
    assert answer.status_code == 401 and "This account is disabled." in answer.text
    assert AuditAction.USER_DISABLED in _actions(web, "bs.cu")


def test_login_page_in_vietnamese(web):
    page = requests.get(web.url + "/login?lang=vi", timeout=10)
    assert page.status_code == 200 and "Đăng nhập" in page.text and "Mật khẩu" in page.text


def test_secure_cookie_behind_https_and_a_generated_secret_key(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)
    monkeypatch.setenv("TELEPACS_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TELEPACS_PUBLIC_URL", "https://pacs.example.vn")
    monkeypatch.delenv("TELEPACS_SECRET_KEY", raising=False)
    app = create_app()
    assert app.config["SESSION_COOKIE_SECURE"] is True and app.config["SESSION_COOKIE_HTTPONLY"] is True
    key_file = settings.data_dir / "secret-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert create_app().config["SECRET_KEY"] == app.config["SECRET_KEY"] == key_file.read_text().strip()


def test_audit_chain_holds_after_all_that(web):
    web.add_user("kt.vien", PASSWORD, facility="BV-HUYEN-A")
    _post_login(requests.Session(), web, "kt.vien", "wrong password here")
    web.login("kt.vien", PASSWORD).post(web.url + "/logout", timeout=10)
    with web.archive.index.session() as db:
        result = audit.verify(db)
    assert result.ok and result.entries >= 6
