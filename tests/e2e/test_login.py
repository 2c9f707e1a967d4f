"""Log in, see the page, change language, log out — in Debian's chromium (Playwright), against gunicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.viewer.conftest import WebServer, serve_web

PASSWORD = "Bác sĩ Lan 2026 mật khẩu"
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "e2e-login"


@pytest.fixture
def login_web(tmp_path: Path) -> Iterator[WebServer]:
    yield from serve_web(tmp_path)


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_login_see_the_page_and_log_out(browser, login_web):
    from playwright.sync_api import expect

    web = login_web
    web.add_user("bs.lan", PASSWORD, role="requester", facility="BV-HUYEN-A")
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 700}, locale="en-US")
    try:
        page = context.new_page()
        page.goto(web.url + "/account/password")
        assert "/login?next=/account/password" in page.url  # anonymous: sent to the login page
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()

        page.fill("#username", "bs.lan")
        page.fill("#password", "not the password")
        page.click("button[type=submit]")
        expect(page.get_by_role("alert")).to_have_text("Wrong username or password.")
        page.screenshot(path=str(SHOTS / "1-wrong-password.png"))

        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: url.endswith("/account/password"))
        expect(page.locator(".usermenu .who")).to_contain_text("bs.lan · BV-HUYEN-A")
        expect(page.get_by_role("heading", name="Change password")).to_be_visible()
        page.screenshot(path=str(SHOTS / "2-logged-in.png"))

        page.get_by_role("link", name="Tiếng Việt").click()
        expect(page.get_by_role("heading", name="Đổi mật khẩu")).to_be_visible()
        expect(page.get_by_role("button", name="Đăng xuất")).to_be_visible()
        page.screenshot(path=str(SHOTS / "3-vietnamese.png"))

        page.get_by_role("button", name="Đăng xuất").click()
        page.wait_for_url(lambda url: "/login" in url)
        expect(page.get_by_role("heading", name="Đăng nhập")).to_be_visible()
        page.screenshot(path=str(SHOTS / "4-logged-out.png"))
        page.goto(web.url + "/account/password")
        assert "/login?next=" in page.url  # the session is gone
    finally:
        context.close()


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_lockout_message_in_the_browser(browser, login_web):
    from playwright.sync_api import expect

    web = login_web
    web.add_user("bs.nam", PASSWORD, role="specialist", facility="BV-TINH")
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 700}, locale="vi-VN")
    try:
        page = context.new_page()
        page.goto(web.url + "/login")
        for attempt in range(5):
            page.fill("#username", "bs.nam")
            page.fill("#password", f"sai mật khẩu {attempt}")
            page.click("button[type=submit]")
        expect(page.get_by_role("alert")).to_contain_text("tài khoản này đã bị khoá")
        page.screenshot(path=str(SHOTS / "5-locked-vi.png"))
    finally:
        context.close()
