"""The packages are typed (setup.cfg [mypy]: disallow_untyped_defs) and mypy agrees."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mypy_is_clean():
    run = subprocess.run([sys.executable, "-m", "mypy", "storage", "archive", "dicom_node", "viewer", "telepacs"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
