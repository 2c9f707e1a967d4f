#!/usr/bin/env bash
# Set up (first time) and run telepacs on the embedded defaults:
#   SQLite index and file storage in ./telepacs-data, DICOM node TELEPACS on port 11112,
#   web on http://127.0.0.1:8042/.
# Run again, it reuses the installed environment and needs no network.
# Settings: a TOML file (TELEPACS_CONFIG, or telepacs-data/telepacs.toml) and TELEPACS_* variables.
# Extra arguments go to `telepacs serve` (e.g. --no-web).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
stamp=.venv/.telepacs-installed
if [ ! -x .venv/bin/telepacs ] || [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "telepacs: setting up the virtual environment in .venv (first run needs the package registry)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q -e .
  touch "$stamp"
fi
# The OHIF viewer at /ohif/ (npm @ohif/app, fetched once; optional: telepacs runs without it).
ohif_dir=${TELEPACS_OHIF_DIR:-.cache/ohif}
if [ ! -f "$ohif_dir/.telepacs-ohif-version" ]; then
  if command -v npm >/dev/null; then
    .venv/bin/python scripts/fetch_ohif.py "$ohif_dir" || echo "telepacs: OHIF not fetched (no registry?); /ohif/ stays off"
  else
    echo "telepacs: npm not found: the OHIF viewer at /ohif/ stays off (apt-get install npm, then run again)"
  fi
fi
export TELEPACS_DATA_DIR=${TELEPACS_DATA_DIR:-$PWD/telepacs-data}
exec .venv/bin/telepacs serve "$@"
