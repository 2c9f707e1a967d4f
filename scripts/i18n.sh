#!/usr/bin/env bash
# Extract translatable strings (Python, templates, JavaScript), merge them into the
# Vietnamese catalogue and compile it. Translate the new entries in
# viewer/translations/vi/LC_MESSAGES/messages.po, then run this again to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBABEL="${PYBABEL:-.venv/bin/pybabel}"
"$PYBABEL" extract -F babel.cfg -k _ -k gettext -k ngettext -k lazy_gettext -o viewer/translations/messages.pot --omit-header viewer >/dev/null
if [ -f viewer/translations/vi/LC_MESSAGES/messages.po ]; then
  "$PYBABEL" update --no-fuzzy-matching -i viewer/translations/messages.pot -d viewer/translations -l vi
else
  "$PYBABEL" init -i viewer/translations/messages.pot -d viewer/translations -l vi
fi
"$PYBABEL" compile -d viewer/translations -l vi
