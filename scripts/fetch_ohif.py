#!/usr/bin/env python3
"""Fetch the OHIF Viewer v3 bundle (npm package ``@ohif/app``, its prebuilt ``dist/``) for telepacs to serve at /ohif/.

    scripts/fetch_ohif.py [DEST]      # DEST defaults to $TELEPACS_OHIF_DIR or .cache/ohif

Nothing is built: ``npm pack`` downloads the published tarball, ``dist/`` is extracted and
adapted to live under ``/ohif/`` instead of the site root (the bundle hard-codes "/" as its
webpack public path, in its CSS font URLs and in index.html). The demo ``app-config.js``
(which points at a public cloud server) is removed: telepacs generates its own.
Does nothing when DEST already holds this version. Needs ``npm`` and access to the npm registry once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OHIF_VERSION = "3.11.1"
BASE = "/ohif/"
REPO = Path(__file__).resolve().parents[1]
STAMP = ".telepacs-ohif-version"


def _replace(path: Path, old: str, new: str, required: bool = True) -> int:
    text = path.read_text(encoding="utf-8")
    count = text.count(old)
    if required and count == 0:
        raise SystemExit(f"fetch_ohif: {path.name} does not contain {old!r}: is @ohif/app {OHIF_VERSION} what was fetched?")
    if count:
        path.write_text(text.replace(old, new), encoding="utf-8")
    return count


def rebase(dist: Path, base: str = BASE) -> None:
    """Make a root-served OHIF dist work under ``base`` (e.g. "/ohif/")."""
    index = dist / "index.html"
    _replace(index, "window.PUBLIC_URL = '/'", f"window.PUBLIC_URL = '{base}'")
    _replace(index, 'href="/', f'href="{base}')
    _replace(index, 'src="/', f'src="{base}')
    patched = sum(_replace(js, '__webpack_require__.p = "/";', f'__webpack_require__.p = "{base}";', required=False)
                  for js in dist.glob("*.js"))
    if patched == 0:
        raise SystemExit("fetch_ohif: no webpack public path found in the bundle's scripts")
    for css in dist.glob("*.css"):
        _replace(css, "url(/", f"url({base}", required=False)
    for name in ("app-config.js", "_headers", "_redirects", "serve.json"):
        (dist / name).unlink(missing_ok=True)


def fetch(dest: Path) -> None:
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == OHIF_VERSION:
        print(f"OHIF {OHIF_VERSION} already in {dest}")
        return
    if shutil.which("npm") is None:
        raise SystemExit("fetch_ohif: npm is needed once to fetch @ohif/app (apt-get install npm)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".ohif-") as tmp:
        work = Path(tmp)
        print(f"fetching @ohif/app@{OHIF_VERSION} from npm (about 50 MB) ...", flush=True)
        subprocess.run(["npm", "pack", "--silent", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(work)],
                       check=True, stdout=subprocess.DEVNULL)
        (tarball,) = work.glob("*.tgz")
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(work, members=members, filter="data")
        dist = work / "package" / "dist"
        rebase(dist)
        (dist / STAMP).write_text(OHIF_VERSION + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dist.rename(dest)  # same file system: the folder appears whole or not at all
    print(f"OHIF {OHIF_VERSION} ready in {dest}")


def main() -> None:
    default = os.environ.get("TELEPACS_OHIF_DIR") or str(REPO / ".cache" / "ohif")
    fetch(Path(sys.argv[1] if len(sys.argv) > 1 else default).resolve())


if __name__ == "__main__":
    main()
