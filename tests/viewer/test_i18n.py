"""Languages: the catalogue is complete and compiled, and the locale follows the browser and the switch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po
from flask import Flask, render_template_string

from helpers import REPO, make_settings
from viewer import create_app
from viewer.i18n import LANG_COOKIE

CATALOG_DIR = REPO / "viewer" / "translations" / "vi" / "LC_MESSAGES"


def _read_po(path: Path):
    with open(path, "rb") as handle:
        return read_po(handle)


def test_every_translatable_string_has_a_vietnamese_translation(tmp_path: Path) -> None:
    pot = tmp_path / "messages.pot"
    subprocess.run([sys.executable, "-m", "babel.messages.frontend", "extract", "-F", str(REPO / "babel.cfg"),
                    "-k", "_", "-k", "gettext", "-k", "ngettext", "-k", "lazy_gettext",
                    "--omit-header", "-o", str(pot), "viewer"], cwd=REPO, check=True, capture_output=True)
    extracted = {message.id for message in _read_po(pot) if message.id}
    vietnamese = {message.id: message.string for message in _read_po(CATALOG_DIR / "messages.po") if message.id}
    missing = sorted(str(msgid) for msgid in extracted if not vietnamese.get(msgid))
    assert not missing, f"run scripts/i18n.sh and translate these in messages.po: {missing}"
    assert len(extracted) >= 1


def test_compiled_catalogue_matches_the_po_file() -> None:
    po = {m.id: m.string for m in _read_po(CATALOG_DIR / "messages.po") if m.id and m.string}
    with open(CATALOG_DIR / "messages.mo", "rb") as handle:
        mo = {m.id: m.string for m in read_mo(handle) if m.id}
    assert mo == po, "messages.mo is stale: run scripts/i18n.sh"


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app({"TELEPACS_SETTINGS": make_settings(tmp_path), "TESTING": True})


def _language_of(app: Flask, **request_kwargs: object) -> str:
    with app.test_request_context("/", **request_kwargs):  # type: ignore[arg-type]
        return render_template_string("{{ current_language }}|{{ _('Language') }}")


def test_locale_follows_the_browser_then_the_choice(app: Flask) -> None:
    assert _language_of(app) == "en|Language"
    assert _language_of(app, headers={"Accept-Language": "vi-VN,vi;q=0.9,en;q=0.5"}) == "vi|Ngôn ngữ"
    assert _language_of(app, headers={"Accept-Language": "fr-FR"}) == "en|Language"
    assert _language_of(app, query_string={"lang": "vi"}) == "vi|Ngôn ngữ"
    assert _language_of(app, headers={"Accept-Language": "vi", "Cookie": f"{LANG_COOKIE}=en"}) == "en|Language"


def test_switching_language_sets_a_cookie_and_stays_on_site(app: Flask) -> None:
    client = app.test_client()
    response = client.get("/lang/vi?next=/healthz")
    assert response.status_code == 302 and response.headers["Location"] == "/healthz"
    assert f"{LANG_COOKIE}=vi" in response.headers["Set-Cookie"]
    assert client.get("/lang/en?next=//evil.example/x").headers["Location"] != "//evil.example/x"
    unknown = client.get("/lang/xx?next=/healthz")
    assert unknown.status_code == 302 and "Set-Cookie" not in unknown.headers
