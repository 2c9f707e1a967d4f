#!/usr/bin/env python3
"""Viewer benchmark: telepacs' reading page vs Orthanc's Web Viewer, in headless Debian chromium, one run.

    .venv/bin/python scripts/bench_viewer.py [--runs 3] [--slices 300] [--quick]
                                             [--telepacs-repo DIR] [--no-orthanc] [--links loopback,2mbit]
                                             [--ohif [--ohif-dir DIR]]
                                             [--data-dir DIR] [--out bench-output/viewer.json]

Servers (each started by this script on free loopback ports, in its own directory, stopped by its PID):

- telepacs' web app under gunicorn (2 gthread workers x 8 threads, as ``telepacs serve``), file storage
  and SQLite in a fresh data dir, loaded with ``telepacs init`` + ``telepacs import``. ``--telepacs-repo``
  runs another checkout's code with that checkout's ``.venv`` (e.g. the viewer branch's worktree);
- Debian's Orthanc with the ``orthanc-webviewer`` plugin (``apt-get install orthanc-webviewer``),
  ``RemoteAccessAllowed: false``, its own storage and web-viewer cache, loaded through ``POST /instances``.

With ``--ohif``, also the OHIF Viewer v3 that telepacs serves at ``/ohif/`` (``TELEPACS_OHIF_DIR`` or
``--ohif-dir``; see the README): first image, bytes and the series load (every frame fetched, from
Resource Timing); its scroll rate is not measured, and it is measured on loopback only unless
``--ohif-slow`` is given (20+ MB of scripts before its first image, then every frame uncompressed).

Data: a generated 300-slice 512x512 16-bit CT series (scripts/bench_ingest.py's generator), kept in
``--data-dir`` between runs.

Each run opens the series in a fresh browser context (empty cache) of Playwright's chromium
(``/usr/bin/chromium``, headless), on loopback and with CDP ``Network.emulateNetworkConditions``
(2 Mbit/s down and up, 100 ms latency), the viewers taking turns. Measured:

- **first image** (ms after navigation start): telepacs' own marker ``document.body.dataset.firstImageMs``
  (the viewer-page contract); for both viewers also "first pixels": a requestAnimationFrame poll, injected
  before the page loads, of every canvas and image of 200 px or more until one shows non-blank pixels;
- **bytes before the first image**: the document and every response complete by then (Resource Timing
  ``transferSize``: headers and encoded body, the same clock as the markers); from CDP
  ``Network.loadingFinished``: the page's own bytes (document, scripts, styles, fonts) and the data bytes
  (everything else) per slice;
- **series loaded** (ms): telepacs' marker ``seriesLoadedMs`` (every slice in memory at full quality).
  Orthanc's viewer fetches a slice only when it is shown: it is driven to load them all through its own
  loader (``cornerstone.loadAndCacheImage`` of every slice at once, after the first image);
- **scroll rate** once loaded: for 3 s, every animation frame moves to the next slice
  (``telepacsViewer.scrollTo``; Orthanc: its mouse-wheel handler), bouncing between the ends; counted per
  second: slices the viewer says it shows (``dataset.slice``; Orthanc: cornerstone's displayed image),
  frames whose canvas changed, and blank frames;
- peak RSS of each server (VmHWM of the server's processes, summed), the machine (nproc, CPU model).

Medians of ``--runs`` runs; the first run is cold for both servers (rendering and web-viewer caches
empty), the others warm. Each run starts once both servers are idle (under 5 % of a core for 0.5 s):
Orthanc's web viewer goes on decoding the series in the background after its page is closed. A request that leaves the server's origin is counted and reported.
Results: a markdown table with ratios and the issue's targets on stdout, JSON in ``--out``.
On a shared 2-core machine the figures are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_ingest import generated_ct, scan_log  # noqa: E402
from tests.peers import ORTHANC_BIN, OrthancServer, PeerError, free_port, stop_process  # noqa: E402

LOOPBACK = "127.0.0.1"
CHROMIUM = Path("/usr/bin/chromium")
WEBVIEWER_PLUGIN = "libOrthancWebViewer.so"
WEB_WORKERS = 2
WEB_THREADS = 8  # as `telepacs serve` runs gunicorn
VIEWPORT = {"width": 1280, "height": 900}
SCROLL_SECONDS = 3.0
SLOW_LINK = {"name": "2 Mbit/s, 100 ms", "down_bps": 2_000_000, "up_bps": 2_000_000, "latency_ms": 100}
PAGE_TYPES = {"Document", "Script", "Stylesheet", "Font", "Manifest"}
# The issue's figures for the other viewers on this kind of machine (for the table when not measured).
ISSUE_FIGURES = {"orthanc first image loopback ms": 510, "orthanc first image 2mbit ms": 1700,
                 "orthanc bytes before first image": 250_000, "ohif first image loopback ms": 2300,
                 "ohif first image 2mbit ms": 119_000}
TARGETS = {"first image loopback ms": 300, "first image 2mbit ms": 1000, "scroll slices/s": 30}


# =========================================================================== servers


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, TCP_NODELAY="1")
    for key in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL"):
        env.pop(key, None)
    env.update(extra)
    return env


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time used so far by ``pids`` and their descendants (from /proc)."""
    ticks = 0
    for pid in pids:
        for member in process_tree(pid):
            try:
                fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pids: Sequence[int], quiet_share: float = 0.05, window_s: float = 0.5,
                    limit_s: float = 60.0) -> float:
    """Wait until the servers use under ``quiet_share`` of a core over ``window_s``; returns the seconds waited.

    A viewer's server may go on working after its page was closed (Orthanc's web viewer decodes the
    rest of the series into its cache in the background): the next run, of either viewer, would pay for it.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = cpu_seconds(pids)
        time.sleep(window_s)
        if cpu_seconds(pids) - before < quiet_share * window_s:
            break
    return time.monotonic() - started


def peak_rss_mb(pid: int | None) -> float | None:
    """Sum of VmHWM (peak resident set) over ``pid`` and its descendants, MB."""
    if pid is None:
        return None
    total_kb = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return round(total_kb / 1024, 1)


class TelepacsServer:
    """telepacs' web app under gunicorn from ``repo`` (its own .venv), in its own data dir, stopped by PID."""

    def __init__(self, repo: Path, work_dir: Path, ohif_dir: Path | None = None) -> None:
        self.repo = repo
        self.work_dir = work_dir
        self.python = repo / ".venv" / "bin" / "python"
        if not self.python.exists():
            self.python = Path(sys.executable)
        self.port = free_port()
        self.log = work_dir / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = _env({"TELEPACS_DATA_DIR": str(work_dir / "telepacs-data"), "TELEPACS_LOG_LEVEL": "WARNING",
                         "TELEPACS_HTTP_HOST": LOOPBACK, "TELEPACS_HTTP_PORT": str(self.port)})
        if ohif_dir is not None:
            self.env["TELEPACS_OHIF_DIR"] = str(ohif_dir)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _cli(self, *args: str, timeout: float = 900, stdin: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        cli = self.python.parent / "telepacs"
        command = [str(cli), *args] if cli.exists() else [str(self.python), "-m", "telepacs.cli", *args]
        res = subprocess.run(command, cwd=self.repo, env=self.env, capture_output=True, text=True,
                             input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL, timeout=timeout)
        if check and res.returncode != 0:
            raise PeerError(f"telepacs {args[0]} failed ({res.returncode}):\n"
                            f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return res

    def add_reader(self) -> tuple[str, str] | None:
        """An administrator to log in as (checkouts with the login); None when this checkout has no users."""
        if "user" not in self._cli("--help", timeout=60).stdout:
            return None
        username, password = "bench-reader", "pw-" + os.urandom(12).hex()
        add = ["user", "add", "--facility", "LOCAL", "--role", "admin", "--password-stdin", username]
        if self._cli(*add, stdin=password + "\n", timeout=120, check=False).returncode != 0:
            self._cli("facility", "add", "LOCAL", timeout=60)  # no facility LOCAL yet on this fresh install
            self._cli(*add, stdin=password + "\n", timeout=120)
        return username, password

    def load(self, files: Sequence[Path]) -> float:
        t0 = time.perf_counter()
        self._cli("init", timeout=120)
        self._cli("import", "--quiet", *map(str, files))
        return time.perf_counter() - t0

    @property
    def config_args(self) -> list[str]:
        """`telepacs serve`'s gunicorn settings module (each worker warms up first), in checkouts that have it."""
        return ["--config", "python:viewer.gunicorn_conf"] if (self.repo / "viewer" / "gunicorn_conf.py").exists() else []

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "gunicorn", "--bind", f"{LOOPBACK}:{self.port}", "--workers",
                 str(WEB_WORKERS), "--worker-class", "gthread", "--threads", str(WEB_THREADS), *self.config_args,
                 "viewer:create_app()"],
                cwd=self.repo, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(f"gunicorn exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)  # poll interval, not a wait for readiness
        raise PeerError(f"gunicorn did not answer /healthz within 60 s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 20)
            self.proc = None


def start_orthanc(work_dir: Path) -> OrthancServer:
    orthanc = OrthancServer(work_dir, plugins=[WEBVIEWER_PLUGIN],
                            config={"WebViewer": {"CachePath": str(work_dir / "webviewer-cache")}})
    orthanc.start()
    return orthanc


def load_orthanc(orthanc: OrthancServer, files: Sequence[Path]) -> float:
    t0 = time.perf_counter()
    for path in files:
        answer = json.loads(orthanc.request("POST", "/instances", path.read_bytes()))
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise PeerError(f"Orthanc refused {path}: {answer}")
    return time.perf_counter() - t0


def orthanc_series(orthanc: OrthancServer, series_uid: str) -> tuple[str, list[str]]:
    """Orthanc's ID of the series and its web viewer's slice IDs (in its display order)."""
    found = json.loads(orthanc.request("POST", "/tools/lookup", series_uid.encode()))
    ids = [str(f["ID"]) for f in found if f.get("Type") == "Series"]
    if not ids:
        raise PeerError(f"Orthanc does not know series {series_uid}")
    slices = json.loads(orthanc.request("GET", f"/web-viewer/series/{ids[0]}"))["Slices"]
    return ids[0], [str(s) for s in slices]


# =========================================================================== in the page

# Injected before any page script: polls every canvas and image of 200 px or more, each animation frame,
# until one shows non-blank pixels (at least 8 bright pixels in a 32x32 reduction).
FIRST_PIXELS_SCRIPT = """(() => {
  performance.setResourceTimingBufferSize(5000);  // every slice request, for the bytes before the first image
  const bench = window.__bench = { firstPixels: null, firstPixelsBy: '' };
  const probe = document.createElement('canvas');
  probe.width = probe.height = 32;
  const ctx = probe.getContext('2d', { willReadFrequently: true });
  function shows(el) {
    const r = el.getBoundingClientRect();
    if (r.width < 200 || r.height < 200) return false;
    if (el.tagName === 'IMG' && !(el.complete && el.naturalWidth)) return false;
    if (el.tagName === 'CANVAS' && !(el.width && el.height)) return false;
    ctx.clearRect(0, 0, 32, 32);
    ctx.drawImage(el, 0, 0, 32, 32);
    const d = ctx.getImageData(0, 0, 32, 32).data;
    let bright = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i] + d[i + 1] + d[i + 2] > 120) bright++;
    return bright >= 8;
  }
  function tick() {
    for (const el of document.querySelectorAll('canvas, img')) {
      try {
        if (shows(el)) { bench.firstPixels = performance.now(); bench.firstPixelsBy = el.tagName.toLowerCase() + '.' + el.className; return; }
      } catch (e) { /* not drawable yet */ }
    }
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(tick);
})();"""

# Scroll for `seconds`: each animation frame shows the next slice (bouncing between the ends) through
# `step(index)`; counts the slices the viewer reports (`shown()`), canvas changes and blank frames.
SCROLL_SCRIPT = """async ({ kind, seconds, count }) => {
  const canvas = kind === 'telepacs' ? document.querySelector('canvas.rv-image')
                                     : document.querySelector('#dicomImage canvas');
  if (!canvas) throw new Error('no canvas to watch');
  const probe = document.createElement('canvas');
  probe.width = probe.height = 96;
  const ctx = probe.getContext('2d', { willReadFrequently: true });
  let index, direction = 1;
  let step, shown;
  if (kind === 'telepacs') {
    const viewer = window.telepacsViewer;
    index = Number(document.body.dataset.slice || 1) - 1;
    step = (i) => viewer.scrollTo(i);
    shown = () => document.body.dataset.slice;
  } else {
    const element = document.getElementById('dicomImage');
    const $ = window.jQuery;
    index = 0;
    step = (i, dir) => $('#dicomImage').trigger($.Event('mousewheel', { originalEvent: {
      wheelDelta: dir > 0 ? -120 : 120, detail: 0, preventDefault() {}, stopPropagation() {} } }));
    shown = () => { try { return window.cornerstone.getEnabledElement(element).image.imageId; } catch (e) { return null; } };
  }
  let ticks = 0, slices = 0, changed = 0, blank = 0, lastShown = shown(), lastHash = -1;
  const t0 = performance.now();
  return await new Promise((resolve, reject) => {
    function tick(now) {
      try { frame(now); } catch (e) { reject(e); }
    }
    function frame(now) {
      const current = shown();
      if (current !== lastShown) { slices++; lastShown = current; }
      ctx.drawImage(canvas, 0, 0, 96, 96);
      const d = ctx.getImageData(0, 0, 96, 96).data;
      let hash = 0, bright = 0;
      for (let i = 0; i < d.length; i += 4) { hash = (Math.imul(hash, 31) + d[i]) | 0; if (d[i] > 40) bright++; }
      if (hash !== lastHash) changed++;
      if (bright < 8) blank++;
      lastHash = hash;
      ticks++;
      if (now - t0 >= seconds * 1000) { resolve({ ticks, slices, changed, blank, seconds: (now - t0) / 1000 }); return; }
      if (index + direction < 0 || index + direction >= count) direction = -direction;
      index += direction;
      step(index, direction);
      requestAnimationFrame(tick);
    }
    requestAnimationFrame(tick);
  });
}"""

# Bytes and requests the page had fully received at `ms` (Resource Timing: the same clock as the markers;
# transferSize includes the headers; the document counts whole).
BYTES_BEFORE = """(ms) => {
  const nav = performance.getEntriesByType('navigation')[0];
  const done = performance.getEntriesByType('resource').filter((e) => e.responseEnd > 0 && e.responseEnd <= ms);
  return { bytes: (nav ? nav.transferSize : 0) + done.reduce((n, e) => n + e.transferSize, 0), requests: done.length + 1 };
}"""

# OHIF preloads the series itself (one WADO-RS request per frame): when all were in, page clock.
OHIF_FRAMES_DONE = """(count) => {
  const frames = performance.getEntriesByType('resource').filter((e) => e.name.includes('/frames/') && e.responseEnd > 0);
  const urls = new Set(frames.map((e) => e.name));
  return urls.size >= count ? Math.max(...frames.map((e) => e.responseEnd)) : null;
}"""

ORTHANC_LOAD_ALL = """async ({ ids, timeoutMs }) => {
  const all = Promise.all(ids.map((id) => new Promise((resolve, reject) => {
    window.cornerstone.loadAndCacheImage(id).then(resolve, () => reject(new Error('slice ' + id + ' failed')));
  })));
  const limit = new Promise((_, reject) => setTimeout(() => reject(new Error('timeout')), timeoutMs));
  await Promise.race([all, limit]);
  return performance.now();
}"""


# =========================================================================== one run


@dataclass
class Target:
    viewer: str  # "telepacs" | "orthanc" | "ohif"
    origin: str
    url: str
    slices: int
    slice_ids: list[str] = field(default_factory=list)  # Orthanc's, to drive its loader
    login: tuple[str, str] | None = None  # telepacs' user and password, when its pages need a login


@dataclass
class Run:
    viewer: str
    link: str
    run: int
    first_image_ms: float | None = None  # the viewer's own marker (telepacs)
    first_pixels_ms: float | None = None  # the pixel poll (both)
    first_pixels_by: str = ""
    bytes_before_first_image: int | None = None
    requests_before_first_image: int | None = None
    series_loaded_ms: float | None = None
    series_loaded_how: str = ""
    page_bytes: int = 0  # document, scripts, styles, fonts
    data_bytes: int = 0  # everything else received until the series was loaded (or the time limit)
    bytes_per_slice: float | None = None
    scroll_slices_per_s: float | None = None
    scroll_changed_frames_per_s: float | None = None
    scroll_blank_frames: int | None = None
    scroll_ticks: int | None = None
    off_origin_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class NetworkLog:
    """Bytes received per request, from the page's CDP Network events."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.types: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.finished: dict[str, int] = {}  # requestId -> encoded bytes incl. headers
        self.off_origin: list[str] = []
        self.failed: list[str] = []

    def attach(self, cdp: Any) -> None:
        cdp.on("Network.requestWillBeSent", self._sent)
        cdp.on("Network.loadingFinished", self._finished)
        cdp.on("Network.loadingFailed", self._failed)
        cdp.on("Network.responseReceived", self._response)

    def _sent(self, event: dict[str, Any]) -> None:
        url = event["request"]["url"]
        self.types[event["requestId"]] = event.get("type", "Other")
        self.urls[event["requestId"]] = url
        if not url.startswith(self.origin + "/") and not url.startswith("data:") and not url.startswith("blob:"):
            self.off_origin.append(url)

    def _finished(self, event: dict[str, Any]) -> None:
        self.finished[event["requestId"]] = int(event.get("encodedDataLength", 0))

    def _failed(self, event: dict[str, Any]) -> None:
        if not event.get("canceled"):
            self.failed.append(f"{event.get('errorText')} {self.urls.get(event['requestId'], '?')}")

    def _response(self, event: dict[str, Any]) -> None:
        status = event["response"]["status"]
        if status >= 400:
            self.failed.append(f"{status} {event['response']['url']}")

    def totals(self) -> tuple[int, int]:
        """(page bytes, data bytes) of the finished requests (data: not document/script/style/font)."""
        page = data = 0
        for rid, n in self.finished.items():
            if self.types.get(rid, "Other") in PAGE_TYPES:
                page += n
            else:
                data += n
        return page, data


def measure(browser: Any, target: Target, link: dict[str, Any] | None, run_no: int, load_timeout_s: float,
            shots: Path | None) -> Run:
    link_name = link["name"] if link else "loopback"
    result = Run(target.viewer, link_name, run_no)
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(FIRST_PIXELS_SCRIPT)
    if target.viewer == "ohif":  # start as a returning user: the first-visit tour covers the viewport
        context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    if target.login is not None:
        _log_in(context, target.origin, *target.login)  # before the measured page: not counted
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    network = NetworkLog(target.origin)
    network.attach(cdp)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": False})
    if link:
        cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": link["latency_ms"],
            "downloadThroughput": link["down_bps"] / 8, "uploadThroughput": link["up_bps"] / 8})
    timeout_ms = load_timeout_s * 1000
    try:
        page.goto(target.url, wait_until="commit", timeout=timeout_ms)
        page.wait_for_function("window.__bench && window.__bench.firstPixels !== null", timeout=timeout_ms,
                               polling=50)
        bench = page.evaluate("window.__bench")
        result.first_pixels_ms = round(bench["firstPixels"], 1)
        result.first_pixels_by = bench["firstPixelsBy"]
        first = result.first_pixels_ms
        if target.viewer == "telepacs":
            page.wait_for_function("document.body && document.body.dataset.firstImageMs", timeout=timeout_ms,
                                   polling=50)
            result.first_image_ms = round(float(page.evaluate("document.body.dataset.firstImageMs")), 1)
            first = result.first_image_ms
        before = page.evaluate(BYTES_BEFORE, first)
        result.bytes_before_first_image, result.requests_before_first_image = before["bytes"], before["requests"]
        if shots is not None:
            page.screenshot(path=str(shots / f"{target.viewer}-{link_name.split()[0]}-run{run_no}-first.png"))
        loaded_at = _series_loaded(page, target, timeout_ms, result)
        if loaded_at is not None and target.viewer == "ohif":
            result.series_loaded_ms = round(loaded_at, 1)
            result.notes.append("scroll rate not measured for OHIF")
        elif loaded_at is not None:
            result.series_loaded_ms = round(loaded_at, 1)
            scroll = page.evaluate(SCROLL_SCRIPT, {"kind": target.viewer, "seconds": SCROLL_SECONDS,
                                                   "count": target.slices})
            seconds = scroll["seconds"] or SCROLL_SECONDS
            result.scroll_slices_per_s = round(scroll["slices"] / seconds, 1)
            result.scroll_changed_frames_per_s = round(scroll["changed"] / seconds, 1)
            result.scroll_blank_frames = scroll["blank"]
            result.scroll_ticks = scroll["ticks"]
            if shots is not None:
                page.screenshot(path=str(shots / f"{target.viewer}-{link_name.split()[0]}-run{run_no}-scrolled.png"))
    except Exception as exc:  # a viewer that fails one step still reports the others
        result.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    finally:
        page_bytes, data_bytes = network.totals()
        result.page_bytes, result.data_bytes = page_bytes, data_bytes
        if result.series_loaded_ms is not None:
            result.bytes_per_slice = round(data_bytes / target.slices)
        result.off_origin_requests = network.off_origin
        result.failed_requests = network.failed[:20]
        context.close()
    return result


def _log_in(context: Any, origin: str, username: str, password: str) -> None:
    """Log the browser context in through telepacs' login form (the session cookie stays in the context)."""
    import re

    form = context.request.get(origin + "/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text()) or re.search(
        r'<meta name="csrf-token" content="([^"]+)"', form.text())
    if token is None:
        raise PeerError("telepacs' login page has no CSRF token")
    answer = context.request.post(origin + "/login", form={"username": username, "password": password,
                                                           "csrf_token": token.group(1)}, max_redirects=0)
    if answer.status != 302:
        raise PeerError(f"telepacs refused the benchmark's login: {answer.status} {answer.text()[:300]}")


def _series_loaded(page: Any, target: Target, timeout_ms: float, result: Run) -> float | None:
    """ms after navigation start when every slice was loaded; None when not within the time limit."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        if target.viewer == "telepacs":
            result.series_loaded_how = "dataset.seriesLoadedMs (the viewer's own prefetch)"
            page.wait_for_function("document.body.dataset.seriesLoadedMs", timeout=timeout_ms, polling=100)
            return float(page.evaluate("document.body.dataset.seriesLoadedMs"))
        if target.viewer == "ohif":
            result.series_loaded_how = "every frame fetched (Resource Timing; OHIF preloads the series)"
            handle = page.wait_for_function(OHIF_FRAMES_DONE, arg=target.slices, timeout=timeout_ms, polling=250)
            return float(handle.json_value())
        result.series_loaded_how = "driven: cornerstone.loadAndCacheImage of every slice after the first image"
        page.wait_for_function("window.cornerstone && window.jQuery && document.querySelector('#dicomImage canvas')",
                               timeout=timeout_ms)
        page.set_default_timeout(timeout_ms)
        return float(page.evaluate(ORTHANC_LOAD_ALL, {"ids": target.slice_ids, "timeoutMs": timeout_ms}))
    except PlaywrightError as exc:
        if "timeout" not in str(exc).lower():
            raise
        result.notes.append(f"series not loaded within {timeout_ms / 1000:.0f} s")
        return None


# =========================================================================== report


def machine_info(telepacs_repo: Path) -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (res.stdout or res.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    cpu = "?"
    with open("/proc/cpuinfo") as fp:
        for line in fp:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dirty = subprocess.run(["git", "-C", str(telepacs_repo), "status", "--porcelain"], capture_output=True,
                           text=True).stdout
    return {
        "cpu": cpu,
        "nproc": first_line(["nproc"]),
        "load_avg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "chromium": first_line([str(CHROMIUM), "--version"]),
        "orthanc": first_line([str(ORTHANC_BIN), "--version"]),
        "orthanc_webviewer": first_line(["dpkg-query", "-W", "-f", "${Version}", "orthanc-webviewer"]),
        "telepacs_repo": str(telepacs_repo),
        "telepacs_commit": first_line(["git", "-C", str(telepacs_repo), "rev-parse", "--short", "HEAD"])
        + (" (+uncommitted changes)" if dirty.strip() else ""),
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    """Medians per (viewer, link)."""
    rows: list[dict[str, Any]] = []
    for key in dict.fromkeys((r.viewer, r.link) for r in runs):
        group = [r for r in runs if (r.viewer, r.link) == key]
        first = [r.first_image_ms if r.first_image_ms is not None else r.first_pixels_ms for r in group]
        rows.append({
            "viewer": key[0], "link": key[1], "runs": len(group),
            "first_image_ms": _median(first),
            "first_pixels_ms": _median([r.first_pixels_ms for r in group]),
            "first_image_cold_ms": first[0],
            "bytes_before_first_image": _median([r.bytes_before_first_image for r in group]),
            "series_loaded_ms": _median([r.series_loaded_ms for r in group]),
            "series_loaded_runs": sum(r.series_loaded_ms is not None for r in group),
            "page_bytes": _median([r.page_bytes for r in group]),
            "bytes_per_slice": _median([r.bytes_per_slice for r in group]),
            "scroll_slices_per_s": _median([r.scroll_slices_per_s for r in group]),
            "scroll_changed_frames_per_s": _median([r.scroll_changed_frames_per_s for r in group]),
            "scroll_blank_frames": max((r.scroll_blank_frames or 0 for r in group), default=0),
            "off_origin_requests": sum(len(r.off_origin_requests) for r in group),
        })
    return rows


def _fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], rss: dict[str, float | None]) -> str:
    lines = [
        "# Viewer: 300-slice 512x512 CT in headless chromium, telepacs vs Orthanc Web Viewer",
        "",
        f"machine: {info['cpu']}, nproc {info['nproc']} (shared: load {info['load_avg_at_start'][0]:.1f} at start),"
        f" {info['chromium']}, {info['orthanc']}, orthanc-webviewer {info['orthanc_webviewer']},"
        f" telepacs {info['telepacs_commit']} ({info['telepacs_repo']})",
        "",
        "| viewer | link | runs | first image ms (cold) | first pixels ms | bytes before 1st image | series loaded s"
        " | page bytes | bytes/slice | scroll slices/s | canvas changes/s | blank frames | off-origin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        loaded = _fmt(row["series_loaded_ms"] / 1000 if row["series_loaded_ms"] else None, 1)
        if row["series_loaded_runs"] < row["runs"]:
            loaded += f" ({row['series_loaded_runs']}/{row['runs']} runs)"
        lines.append(
            f"| {row['viewer']} | {row['link']} | {row['runs']} | {_fmt(row['first_image_ms'])}"
            f" ({_fmt(row['first_image_cold_ms'])}) | {_fmt(row['first_pixels_ms'])}"
            f" | {_fmt(row['bytes_before_first_image'])} | {loaded} | {_fmt(row['page_bytes'])}"
            f" | {_fmt(row['bytes_per_slice'])} | {_fmt(row['scroll_slices_per_s'], 1)}"
            f" | {_fmt(row['scroll_changed_frames_per_s'], 1)} | {row['scroll_blank_frames']}"
            f" | {row['off_origin_requests']} |")
    lines += ["", "peak RSS: " + ", ".join(f"{name} {_fmt(mb, 0)} MB" for name, mb in rss.items())]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["viewer"], r["link"]): r for r in rows}
    out: list[str] = []
    for link, target_key in (("loopback", "first image loopback ms"), (SLOW_LINK["name"], "first image 2mbit ms")):
        ours = by.get(("telepacs", link))
        theirs = by.get(("orthanc", link))
        if ours and ours["first_image_ms"] is not None:
            limit = TARGETS[target_key]
            ratio = (f" = {ours['first_image_ms'] / theirs['first_image_ms']:.2f}x Orthanc's "
                     f"{theirs['first_image_ms']:.0f} ms" if theirs and theirs["first_image_ms"] else "")
            out.append(f"first image, {link}: {ours['first_image_ms']:.0f} ms{ratio} (target < {limit} ms): "
                       f"{_verdict(ours['first_image_ms'] < limit)}")
        ohif = by.get(("ohif", link))
        if ours and ohif and ours["first_image_ms"] and ohif["first_image_ms"]:
            out.append(f"first image, {link}: telepacs = {ours['first_image_ms'] / ohif['first_image_ms']:.2f}x "
                       f"OHIF's {ohif['first_image_ms']:,.0f} ms")
        if ours and theirs and ours["bytes_before_first_image"] and theirs["bytes_before_first_image"]:
            out.append(f"bytes before the first image, {link}: {ours['bytes_before_first_image']:,.0f} = "
                       f"{ours['bytes_before_first_image'] / theirs['bytes_before_first_image']:.2f}x Orthanc's "
                       f"{theirs['bytes_before_first_image']:,.0f}")
        if ours and theirs and ours["bytes_per_slice"] and theirs["bytes_per_slice"]:
            out.append(f"bytes per slice, {link}: {ours['bytes_per_slice']:,.0f} = "
                       f"{ours['bytes_per_slice'] / theirs['bytes_per_slice']:.2f}x Orthanc's "
                       f"{theirs['bytes_per_slice']:,.0f}")
    ours = by.get(("telepacs", "loopback"))
    if ours and ours["scroll_slices_per_s"] is not None:
        ok = ours["scroll_slices_per_s"] >= TARGETS["scroll slices/s"] and ours["scroll_blank_frames"] == 0
        out.append(f"scroll once loaded, loopback: {ours['scroll_slices_per_s']:.1f} slices/s, "
                   f"{ours['scroll_blank_frames']} blank frames (target >= 30/s, none blank): {_verdict(ok)}")
    return out


# =========================================================================== main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per viewer and link (median reported)")
    parser.add_argument("--quick", action="store_true", help="1 run, 60 s limit per series load on the slow link")
    parser.add_argument("--slices", type=int, default=300, help="slices in the generated CT series")
    parser.add_argument("--telepacs-repo", type=Path, default=REPO,
                        help="the telepacs checkout to run (its .venv's python), default this one")
    parser.add_argument("--no-orthanc", action="store_true", help="measure telepacs only")
    parser.add_argument("--ohif", action="store_true", help="also measure OHIF v3 at telepacs' /ohif/")
    parser.add_argument("--ohif-dir", type=Path, default=None,
                        help="the OHIF bundle (default TELEPACS_OHIF_DIR, else .cache/ohif)")
    parser.add_argument("--ohif-slow", action="store_true",
                        help="measure OHIF on the 2 Mbit/s link too (each run takes minutes)")
    parser.add_argument("--links", default="loopback,2mbit", help="loopback and/or 2mbit (comma-separated)")
    parser.add_argument("--load-timeout", type=float, default=240.0,
                        help="seconds allowed for a first image or a whole-series load (per run)")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-output/viewer-data"),
                        help="generated data, kept and reused between runs")
    parser.add_argument("--out", type=Path, default=Path("bench-output/viewer.json"), help="JSON results")
    parser.add_argument("--screenshots", type=Path, default=Path("bench-output/viewer-screenshots"),
                        help="screenshots of each viewer's first image and after scrolling")
    return parser


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP: unwind through the ``finally`` blocks so every server we started is stopped."""
    raise SystemExit(128 + signum)


def _uids(path: Path) -> tuple[str, str]:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def run_all(args: argparse.Namespace, files: list[Path], scratch: Path,
            shots: Path) -> tuple[list[Run], dict[str, float | None], list[str]]:
    from playwright.sync_api import sync_playwright

    runs_per = 1 if args.quick else args.runs
    load_timeout = min(args.load_timeout, 60.0) if args.quick else args.load_timeout
    links: list[dict[str, Any] | None] = []
    for name in args.links.split(","):
        if name.strip() == "loopback":
            links.append(None)
        elif name.strip() == "2mbit":
            links.append(SLOW_LINK)
        else:
            raise SystemExit(f"unknown link {name!r}: loopback or 2mbit")
    study_uid, series_uid = _uids(files[0])
    notes: list[str] = []
    ohif_dir = (args.ohif_dir or Path(os.environ.get("TELEPACS_OHIF_DIR") or REPO / ".cache" / "ohif")).resolve()
    if args.ohif and not (ohif_dir / "index.html").is_file():
        raise SystemExit(f"OHIF bundle not found in {ohif_dir}: run scripts/fetch_ohif.py or pass --ohif-dir")
    telepacs = TelepacsServer(args.telepacs_repo.resolve(), scratch / "telepacs", ohif_dir if args.ohif else None)
    (scratch / "telepacs").mkdir()
    orthanc: OrthancServer | None = None
    runs: list[Run] = []
    rss: dict[str, float | None] = {}
    try:
        print(f"  telepacs import: {telepacs.load(files):.1f} s", flush=True)
        login = telepacs.add_reader()
        telepacs.start()
        print(f"  telepacs web at {telepacs.url} (gunicorn pid {telepacs.proc.pid if telepacs.proc else '?'},"
              f" code from {telepacs.repo})", flush=True)
        targets_: list[Target] = [Target("telepacs", telepacs.url, f"{telepacs.url}/viewer/{study_uid}", len(files),
                                         login=login)]
        if args.ohif:
            targets_.append(Target("ohif", telepacs.url,
                                   f"{telepacs.url}/ohif/viewer?StudyInstanceUIDs={study_uid}", len(files),
                                   login=login))
        if not args.no_orthanc:
            orthanc = start_orthanc(scratch / "orthanc")
            took = load_orthanc(orthanc, files)
            series_id, slice_ids = orthanc_series(orthanc, series_uid)
            print(f"  Orthanc at {orthanc.http_url} (pid {orthanc.pid}), loaded in {took:.1f} s", flush=True)
            targets_.append(Target("orthanc", orthanc.http_url,
                                   f"{orthanc.http_url}/web-viewer/app/viewer.html?series={series_id}",
                                   len(slice_ids), slice_ids))
        server_pids = [pid for pid in (telepacs.proc.pid if telepacs.proc else None,
                                       orthanc.pid if orthanc is not None else None) if pid is not None]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            # OHIF needs WebGL (SwiftShader). Its own browser: with SwiftShader on, the 2D canvases of the
            # other viewers go through it too and draw several times slower.
            webgl = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                       args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]) \
                if args.ohif else None
            try:
                for link in links:
                    for run_no in range(1, runs_per + 1):
                        for target in targets_:  # the viewers take turns: the machine's load falls on both
                            if target.viewer == "ohif" and link is not None and not args.ohif_slow:
                                continue  # 20+ MB of scripts, then every frame uncompressed: minutes per run
                            waited = wait_until_idle(server_pids)
                            result = measure(webgl if target.viewer == "ohif" else browser, target, link, run_no,
                                             load_timeout, shots)
                            if waited > 1.0:
                                result.notes.append(f"waited {waited:.1f} s for the servers to go idle first")
                            runs.append(result)
                            print(f"  {target.viewer:8} {result.link:16} run {run_no}: first image "
                                  f"{_fmt(result.first_image_ms or result.first_pixels_ms)} ms, "
                                  f"{_fmt(result.bytes_before_first_image)} B before it; series "
                                  f"{_fmt((result.series_loaded_ms or 0) / 1000 or None, 1)} s; scroll "
                                  f"{_fmt(result.scroll_slices_per_s, 1)} slices/s "
                                  f"({result.scroll_blank_frames} blank)"
                                  + (f"; {'; '.join(result.notes)}" if result.notes else ""), flush=True)
            finally:
                browser.close()
                if webgl is not None:
                    webgl.close()
        rss["telepacs gunicorn (master + workers)"] = peak_rss_mb(telepacs.proc.pid if telepacs.proc else None)
        if orthanc is not None:
            rss["Orthanc + web viewer"] = peak_rss_mb(orthanc.pid)
    finally:
        telepacs.stop()
        if orthanc is not None:
            orthanc.stop()
        notes += [f"telepacs log: {line}" for line in scan_log(telepacs.log)]
    return runs, rss, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} not found: apt-get install chromium")
    if not args.no_orthanc and not (Path("/usr/share/orthanc/plugins") / WEBVIEWER_PLUGIN).exists():
        raise SystemExit("Orthanc's web viewer plugin not found: apt-get install orthanc-webviewer")
    started = time.perf_counter()
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shots = args.screenshots.resolve()
    shots.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.telepacs_repo.resolve())
    temp_root = Path(tempfile.mkdtemp(prefix="telepacs-bench-viewer-"))
    try:
        print("preparing data ...", flush=True)
        t0 = time.perf_counter()
        files = generated_ct(data_dir / f"ct{args.slices}", args.slices)
        print(f"  {len(files)}-slice generated CT ({time.perf_counter() - t0:.1f} s)", flush=True)
        runs, rss, notes = run_all(args, files, temp_root, shots)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    rows = summarise(runs)
    goals = targets(rows)
    for r in runs:
        notes += [f"{r.viewer} {r.link} run {r.run}: {n}" for n in r.notes]
        notes += [f"{r.viewer} {r.link} run {r.run}: request off the origin: {u}" for u in r.off_origin_requests[:5]]
        notes += [f"{r.viewer} {r.link} run {r.run}: failed request: {u}" for u in r.failed_requests[:5]]
    print()
    print(markdown(info, rows, rss))
    print("\n## Targets (issue 5)\n")
    print("\n".join(f"- {g}" for g in goals) or "- (nothing measured)")
    if not args.ohif:
        print(f"\nissue's figures for comparison (not measured here): OHIF v3 first image "
              f"{ISSUE_FIGURES['ohif first image loopback ms']} ms loopback, "
              f"{ISSUE_FIGURES['ohif first image 2mbit ms'] / 1000:.0f} s at 2 Mbit/s (--ohif measures it)")
    if notes:
        print("\n## Notes\n")
        print("\n".join(f"- {n}" for n in notes))
    elapsed = time.perf_counter() - started
    print(f"\ntotal time {elapsed:.0f} s; JSON: {out_path}; screenshots: {shots}")
    out_path.write_text(json.dumps({
        "command": [sys.executable] + sys.argv,
        "machine": info,
        "settings": {"runs": 1 if args.quick else args.runs, "slices": args.slices, "links": args.links,
                     "slow_link": SLOW_LINK, "scroll_seconds": SCROLL_SECONDS, "viewport": VIEWPORT,
                     "web_workers": WEB_WORKERS, "web_threads": WEB_THREADS},
        "summary": rows,
        "runs": [vars(r) for r in runs],
        "peak_rss_mb": rss,
        "targets": goals,
        "issue_figures": ISSUE_FIGURES,
        "notes": notes,
        "elapsed_s": round(elapsed, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
