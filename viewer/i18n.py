"""Languages: Vietnamese and English, chosen from the browser and switchable.

The locale comes from, in order: ``?lang=`` on the request, the ``telepacs_lang`` cookie
(set by ``/lang/<code>``), the browser's Accept-Language, then English.
Templates use ``_()``; scripts use ``_()`` too, with the catalogue embedded in the page
(:func:`js_catalog`). ``scripts/i18n.sh`` extracts, updates and compiles the catalogues.
"""

from __future__ import annotations

from flask import Blueprint, Flask, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import Babel, get_locale, get_translations

LANGUAGES: dict[str, str] = {"vi": "Tiếng Việt", "en": "English"}
LANG_COOKIE = "telepacs_lang"

bp = Blueprint("i18n", __name__)


def select_locale() -> str:
    asked = request.args.get("lang") or request.cookies.get(LANG_COOKIE)
    if asked in LANGUAGES:
        return asked
    return request.accept_languages.best_match(list(LANGUAGES), default="en") or "en"


def current_language() -> str:
    locale = get_locale()
    return locale.language if locale is not None else "en"


def js_catalog() -> dict[str, str]:
    """The whole catalogue of the request's language (English message → translation), for a page's scripts.

    Scripts translate with ``_("English text")`` (extracted by ``scripts/i18n.sh`` like the templates);
    the page embeds this dict as JSON so no extra request is needed before the first paint.
    """
    catalog = getattr(get_translations(), "_catalog", {})
    return {key: value for key, value in catalog.items() if isinstance(key, str) and key and value}


def _safe_next(target: str | None) -> str:
    # Only same-site paths: never redirect to another host.
    # Browsers read "/\\host" as "//host": a backslash anywhere is refused too.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("healthz") if "ui.study_list" not in _endpoints() else url_for("ui.study_list")


def _endpoints() -> set[str]:
    from flask import current_app

    return set(current_app.view_functions)


@bp.get("/lang/<code>")
def switch_language(code: str) -> ResponseReturnValue:
    """Remember the chosen language in a cookie and go back to where the user was."""
    response = redirect(_safe_next(request.args.get("next")))
    if code in LANGUAGES:
        response.set_cookie(LANG_COOKIE, code, max_age=365 * 24 * 3600, samesite="Lax", httponly=True)
    return response


def init_i18n(app: Flask) -> None:
    app.config.setdefault("BABEL_DEFAULT_LOCALE", "en")
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", "translations")
    Babel(app, locale_selector=select_locale)
    app.register_blueprint(bp)

    @app.context_processor
    def language_context() -> dict[str, object]:
        return {"LANGUAGES": LANGUAGES, "current_language": current_language(), "js_catalog": js_catalog}
