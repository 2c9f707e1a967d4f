#!/usr/bin/env python3
"""Rendered-slice and QIDO benchmark: telepacs vs Orthanc, side by side, in one run.

    .venv/bin/python scripts/bench_render.py [--quick] [--requests 250] [--duration 6]
                                             [--data-dir DIR] [--out bench-output/render.json]

Servers (each started by this script on free loopback ports and stopped by its PID):

- telepacs' web app under gunicorn, 2 gthread workers x 8 threads, as ``telepacs serve`` runs it
  (its gunicorn settings: workers warm up before serving; access log on), file storage and SQLite in a fresh data dir, loaded with ``telepacs import`` into
  facility BENCH; every telepacs request carries the API token of a specialist of BENCH (authentication
  and the visibility check are measured with the rest);
- Debian's Orthanc with the ``orthanc-dicomweb`` plugin (``TCP_NODELAY=1``), loaded with the same
  files through ``POST /instances``.

Data: the real 10-slice GE CT of ../shared/testdata (512x512, wrapped into Part-10 files) and a
generated 300-slice 512x512 CT series. The rendered slice is the 5th GE slice, as JPEG, window 40/400,
quality 90, full size.

Measured:

- latency (p50/p95 ms), one keep-alive ``http.client`` connection, ``Accept: image/jpeg``,
  ``Accept-Encoding: identity``:
  ``telepacs cold-window`` (same slice, a window centre never asked before on every request: the
  display table is rebuilt and the image encoded; the decoded frame is cached),
  ``telepacs cold-slice`` (a slice of the 300-series never rendered before and a new window: read +
  decode + render + encode), ``telepacs warm`` (the same request again: the cached JPEG),
  ``orthanc /rendered`` (``/instances/{id}/rendered?window-center=40&window-width=400``) and
  ``orthanc dicomweb /rendered`` (``/dicom-web/.../rendered?window=40,400,linear``: this Orthanc
  wants all three parts; telepacs gets the same), and the same over the slices of the 300-series
  with a new window each time (``orthanc dicomweb /rendered cold-slice``: the same images as
  telepacs' cold-slice);
- throughput (requests/s) with ``wrk`` at 2 and 4 connections: telepacs cold-window (a wrk Lua
  script gives every request a new window centre), telepacs warm, Orthanc's two endpoints;
- QIDO: listing the 300-instance series (``/studies/{s}/series/{se}/instances``) on both.

Orthanc has no rendered-image cache, so its figures stand for its cold and warm case alike.
Results: a markdown table and the issue's targets with ratios on stdout, JSON in ``--out``.
On a shared 2-core machine the figures are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
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
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_ingest import generated_ct, scan_log, telepacs_cli, wrap_real_ct  # noqa: E402
from tests.peers import ORTHANC_BIN, OrthancServer, PeerError, free_port, stop_process  # noqa: E402

LOOPBACK = "127.0.0.1"
TESTDATA = REPO.parent / "shared" / "testdata"
REAL_CT_DIR = TESTDATA / "ge_ct_phantom_10slices_nometa"
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
WINDOW = (40, 400)
FUNCTION = "linear"  # Orthanc's DICOMweb wants all three parts of window=center,width,function
QUALITY = 90
WEB_WORKERS = 2
WEB_THREADS = 8  # as `telepacs serve` runs gunicorn
CONNECTIONS = (2, 4)
DICOM_JSON = "application/dicom+json"
# The issue's figures for Orthanc on this machine, used only when Orthanc could not be measured.
ISSUE_ORTHANC = {"rendered_p50_ms": 0.95, "rendered_rps": 1100, "dicomweb_p50_ms": 2.2, "dicomweb_rps": 830,
                 "qido_ms": 137}


# =========================================================================== data


@dataclass
class Data:
    real: list[Path]  # the 10 GE CT slices (Part 10)
    series: list[Path]  # the generated 300-slice series
    target: Path  # the slice rendered in the latency/throughput runs

    @property
    def all_files(self) -> list[Path]:
        return self.real + self.series


def prepare_data(data_dir: Path, slices: int) -> Data:
    t0 = time.perf_counter()
    real = wrap_real_ct(REAL_CT_DIR, data_dir / "ct10-real")
    series = generated_ct(data_dir / f"ct{slices}", slices)
    print(f"  data: {len(real)} GE CT slices, {len(series)}-slice generated CT "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return Data(real, series, real[len(real) // 2])


@dataclass(frozen=True)
class Uids:
    study: str
    series: str
    instance: str


def uids_of(path: Path) -> Uids:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return Uids(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


# =========================================================================== servers


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, TCP_NODELAY="1")
    for key in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL"):
        env.pop(key, None)
    env.update(extra)
    return env


BENCH_FACILITY = "BENCH"  # the imported studies belong to it; the bench user works there
BENCH_USER = "bench"


def bench_token(env: dict[str, str], facility: str = BENCH_FACILITY, user: str = BENCH_USER) -> str:
    """A facility, a specialist of it and an API token of theirs, made with ``telepacs`` (the web app
    answers only authenticated requests): every request of the benchmark carries the token, so the
    per-request identity and visibility checks are part of what is measured."""
    def cli(*args: str) -> str:
        res = subprocess.run([telepacs_cli(), *args], env=env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
        if res.returncode != 0:
            raise PeerError(f"telepacs {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res.stdout

    cli("facility", "add", facility)
    cli("user", "add", user, "--facility", facility, "--role", "specialist", "--random-password")
    found = re.search(r"token \d+ for \S+: (\S+)", cli("token", "create", user))
    if found is None:
        raise PeerError("telepacs token create printed no token")
    return found.group(1)


class TelepacsWeb:
    """telepacs' web app under gunicorn (gthread), in its own data dir, stopped by PID."""

    def __init__(self, work_dir: Path, workers: int = WEB_WORKERS) -> None:
        self.work_dir = work_dir
        self.workers = workers
        self.port = free_port()
        self.log = work_dir / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""  # the bench user's API token (made by load())
        self.env = _env({"TELEPACS_DATA_DIR": str(work_dir / "telepacs-data"), "TELEPACS_LOG_LEVEL": "WARNING",
                         "TELEPACS_HTTP_HOST": LOOPBACK, "TELEPACS_HTTP_PORT": str(self.port)})

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def load(self, files: Sequence[Path]) -> float:
        """``telepacs init``, then ``telepacs import`` of ``files`` in 2 parallel processes; seconds taken."""
        t0 = time.perf_counter()
        res = subprocess.run([telepacs_cli(), "init"], env=self.env, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=120)
        if res.returncode != 0:
            raise PeerError(f"telepacs init failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        self.token = bench_token(self.env)
        importers = [
            subprocess.Popen([telepacs_cli(), "import", "--quiet", "--facility", BENCH_FACILITY,
                              *map(str, files[i::2])], env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            for i in range(2)
        ]
        for proc in importers:
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise PeerError(f"telepacs import failed ({proc.returncode}):\n{out.decode(errors='replace')}")
        return time.perf_counter() - t0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--bind", f"{LOOPBACK}:{self.port}",
                 "--workers", str(self.workers), "--worker-class", "gthread", "--threads", str(WEB_THREADS),
                 "--config", "python:viewer.gunicorn_conf", "--access-logfile", str(self.work_dir / "access.log"),
                 "viewer:create_app()"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
    orthanc = OrthancServer(work_dir, plugins=[DICOMWEB_PLUGIN],
                            config={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    orthanc.start()
    return orthanc


def load_orthanc(orthanc: OrthancServer, files: Sequence[Path]) -> float:
    """POST every file to ``/instances``; seconds taken."""
    t0 = time.perf_counter()
    for path in files:
        answer = json.loads(orthanc.request("POST", "/instances", path.read_bytes()))
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise PeerError(f"Orthanc refused {path}: {answer}")
    return time.perf_counter() - t0


def orthanc_instance_id(orthanc: OrthancServer, sop_instance_uid: str) -> str:
    """Orthanc's own ID of an instance (``/tools/lookup``)."""
    found = json.loads(orthanc.request("POST", "/tools/lookup", sop_instance_uid.encode()))
    ids = [str(f["ID"]) for f in found if f.get("Type") == "Instance"]
    if not ids:
        raise PeerError(f"Orthanc does not know instance {sop_instance_uid}")
    return ids[0]


# =========================================================================== latency


@dataclass
class Latency:
    name: str
    url: str  # an example request
    requests: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    bytes: int  # size of the last answer
    notes: list[str] = field(default_factory=list)


class Client:
    """One keep-alive HTTP/1.1 connection that does not ask for gzip."""

    def __init__(self, base: str, token: str = "") -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, accept: str) -> tuple[int, str, bytes]:
        self.conn.request("GET", path, headers={"Accept": accept, "Accept-Encoding": "identity", **self.auth})
        resp = self.conn.getresponse()
        body = resp.read()
        return resp.status, resp.getheader("Content-Type", ""), body

    def close(self) -> None:
        self.conn.close()


def check_jpeg(body: bytes, what: str) -> None:
    """The answer is a 512x512 JPEG (the full-size slice), or the run is meaningless."""
    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        if img.format != "JPEG" or img.size != (512, 512):
            raise PeerError(f"{what}: expected a 512x512 JPEG, got {img.format} {img.size}")


@dataclass
class Probe:
    """One latency measurement: GETs of ``paths(i)`` for i = 0, 1, ... on one keep-alive connection."""

    name: str
    base: str
    paths: Callable[[int], str]
    accept: str
    warmup: int = 3
    token: str = ""  # telepacs' API token (Orthanc: none)
    times_ms: list[float] = field(default_factory=list)
    last_bytes: int = 0
    _next: int = 0

    def run(self, count: int) -> None:
        """The next ``count`` requests (after ``warmup`` unmeasured ones the first time)."""
        client = Client(self.base, self.token)
        try:
            first = self._next
            if first == 0:
                self._next = -self.warmup
            while self._next < first + count:
                i = self._next
                path = self.paths(i)
                t0 = time.perf_counter()
                status, ctype, body = client.get(path, self.accept)
                elapsed = time.perf_counter() - t0
                if status != 200 or not ctype.startswith(self.accept):
                    raise PeerError(f"{self.name}: GET {path} answered {status} {ctype}: {body[:300]!r}")
                if i == 0 and self.accept == "image/jpeg":
                    check_jpeg(body, self.name)
                if i >= 0:
                    self.times_ms.append(elapsed * 1000)
                self.last_bytes = len(body)
                self._next += 1
        finally:
            client.close()

    def result(self) -> Latency:
        times = sorted(self.times_ms)
        return Latency(self.name, self.base + self.paths(0), len(times), round(statistics.median(times), 3),
                       round(times[min(len(times) - 1, int(len(times) * 0.95))], 3),
                       round(statistics.fmean(times), 3), self.last_bytes)


def measure_interleaved(probes: Sequence[Probe], count: int, rounds: int) -> list[Latency]:
    """``count`` requests per probe, in ``rounds`` rounds taking the probes in turn, so that the
    load of a shared machine changing during the run falls on all of them alike."""
    done = 0
    for r in range(rounds):
        chunk = count * (r + 1) // rounds - done
        for probe in probes:
            probe.run(chunk)
        done += chunk
    return [probe.result() for probe in probes]


# =========================================================================== throughput


@dataclass
class Throughput:
    name: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float | None
    errors: str  # non-2xx and socket errors as wrk reports them, "" if none


WRK_COLD_LUA = """-- every request asks for a window centre not asked for before (a "cold window")
local counter = {start}
request = function()
  counter = counter + 1
  local center = string.format("%.5f", {center} + counter * 1e-5)
  return wrk.format("GET", "{path}" .. center .. ",{width},{function}&quality={quality}")
end
"""


def _wrk_ms(text: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        return None
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "us" else value * 1000 if m.group(2) == "s" else value


def run_wrk(name: str, url: str, connections: int, seconds: float, accept: str,
            lua: str | None, scratch: Path, token: str = "") -> Throughput:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
           "-H", f"Accept: {accept}", "-H", "Accept-Encoding: identity"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if lua is not None:
        script = scratch / f"wrk-{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{connections}.lua"
        script.write_text(lua)
        cmd += ["-s", str(script)]
    res = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60,
                         stdin=subprocess.DEVNULL)
    out = res.stdout
    if res.returncode != 0 or "Requests/sec" not in out:
        raise PeerError(f"wrk {name} failed ({res.returncode}): {out}\n{res.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    errors = "; ".join(line.strip() for line in out.splitlines()
                       if "Non-2xx" in line or "Socket errors" in line)
    return Throughput(name, connections, seconds, total, round(rps, 1), _wrk_ms(p50.group(1)) if p50 else None,
                      errors)


# =========================================================================== report


def machine_info() -> dict[str, Any]:
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
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "orthanc": first_line([str(ORTHANC_BIN), "--version"]),
        "orthanc_dicomweb": first_line(["dpkg-query", "-W", "-f", "${Version}", "orthanc-dicomweb"]),
        "wrk": first_line(["wrk", "--version"]),
        "telepacs_commit": first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        + (" (+uncommitted changes)" if dirty.strip() else ""),
    }


def markdown(info: dict[str, Any], latencies: list[Latency], throughputs: list[Throughput]) -> str:
    lines = [
        "# Rendered slice (512x512 CT, JPEG q90, window 40/400) and QIDO: telepacs vs Orthanc",
        "",
        f"machine: {info['cpu']}, {info['cores']} cores (shared: load {info['load_avg_at_start'][0]:.1f} at "
        f"start; figures are noisy), Python {info['python']}, {info['orthanc']}, DICOMweb plugin "
        f"{info['orthanc_dicomweb']}, telepacs {info['telepacs_commit']}, gunicorn {WEB_WORKERS} gthread workers",
        "",
        "| latency (one keep-alive client, no gzip) | requests | p50 ms | p95 ms | mean ms | bytes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for lat in latencies:
        lines.append(f"| {lat.name} | {lat.requests} | {lat.p50_ms:.2f} | {lat.p95_ms:.2f} | {lat.mean_ms:.2f}"
                     f" | {lat.bytes} |")
    lines += ["", "| throughput (wrk) | connections | req/s | p50 ms | errors |", "| --- | --- | --- | --- | --- |"]
    for tp in throughputs:
        p50 = f"{tp.p50_ms:.2f}" if tp.p50_ms is not None else "?"
        lines.append(f"| {tp.name} | {tp.connections} | {tp.rps:.0f} | {p50} | {tp.errors or '–'} |")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(latencies: list[Latency], throughputs: list[Throughput]) -> list[str]:
    """The issue's targets, as ratios against Orthanc measured in the same run."""
    lat = {x.name: x for x in latencies}
    out: list[str] = []
    ortho = lat.get("orthanc /rendered")
    odw = lat.get("orthanc dicomweb /rendered")
    for cold, theirs in (("telepacs cold-window", odw), ("telepacs cold-slice", odw),
                         ("telepacs cold-slice", lat.get("orthanc dicomweb /rendered cold-slice"))):
        if cold in lat and theirs:
            ratio = lat[cold].p50_ms / theirs.p50_ms
            out.append(f"{cold} p50 {lat[cold].p50_ms:.2f} ms = {ratio:.2f}x {theirs.name} "
                       f"({theirs.p50_ms:.2f} ms; target <= 1x): {_verdict(ratio <= 1)}")
    if "telepacs warm" in lat and ortho:
        ratio = lat["telepacs warm"].p50_ms / ortho.p50_ms
        out.append(f"telepacs warm p50 {lat['telepacs warm'].p50_ms:.2f} ms = {ratio:.2f}x Orthanc /rendered "
                   f"({ortho.p50_ms:.2f} ms; target <= 0.5x): {_verdict(ratio <= 0.5)}")
    tps = {(t.name, t.connections): t for t in throughputs}
    for conns in CONNECTIONS:
        cold_tp = tps.get(("telepacs cold-window", conns))
        orth = tps.get(("orthanc /rendered", conns))
        if cold_tp and orth:
            ratio = cold_tp.rps / orth.rps
            out.append(f"{conns} connections: telepacs cold-window {cold_tp.rps:.0f} req/s = {ratio:.2f}x Orthanc "
                       f"/rendered ({orth.rps:.0f} req/s; target >= 1x, issue's figure ~1,100): "
                       f"{_verdict(ratio >= 1)}")
    qido = lat.get("telepacs QIDO 300-instance series")
    oqido = lat.get("orthanc dicomweb QIDO 300-instance series")
    if qido:
        vs = f", {qido.p50_ms / oqido.p50_ms:.2f}x Orthanc's {oqido.p50_ms:.1f} ms" if oqido else ""
        out.append(f"QIDO 300-instance series listing p50 {qido.p50_ms:.1f} ms (p95 {qido.p95_ms:.1f}){vs}; "
                   f"target < 20 ms: {_verdict(qido.p50_ms < 20)}")
    out.append("QIDO study search p95 with 1,000,000 indexed instances (target < 50 ms): measured by "
               "scripts/bench_query.py (its QIDO-RS part on the 1M-instance catalogue)")
    return out


# =========================================================================== main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, 2 s wrk runs (under a minute)")
    parser.add_argument("--requests", type=int, default=250, help="requests per latency measurement")
    parser.add_argument("--qido-requests", type=int, default=40, help="requests per QIDO latency measurement")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run")
    parser.add_argument("--slices", type=int, default=300, help="instances in the generated series")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-output/render-data"),
                        help="generated data, kept and reused between runs (default bench-output/render-data)")
    parser.add_argument("--keep-servers", action="store_true",
                        help="leave the servers running after the measurements until Enter (for py-spy)")
    parser.add_argument("--out", type=Path, default=Path("bench-output/render.json"), help="JSON results")
    return parser


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP: unwind through the ``finally`` blocks so every server we started is stopped."""
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace, data: Data, scratch: Path) -> tuple[list[Latency], list[Throughput], list[str]]:
    requests = 60 if args.quick else args.requests
    qido_requests = 8 if args.quick else args.qido_requests
    seconds = 2.0 if args.quick else args.duration
    notes: list[str] = []
    target = uids_of(data.target)
    series_uids = [uids_of(p) for p in data.series]
    listing = series_uids[0]
    latencies: list[Latency] = []
    throughputs: list[Throughput] = []
    telepacs = TelepacsWeb(scratch / "telepacs")
    (scratch / "telepacs").mkdir()
    orthanc: OrthancServer | None = None
    try:
        print(f"  telepacs import: {telepacs.load(data.all_files):.1f} s", flush=True)
        telepacs.start()
        print(f"  telepacs web at {telepacs.url} (gunicorn pid {telepacs.proc.pid if telepacs.proc else '?'})",
              flush=True)
        orthanc = start_orthanc(scratch / "orthanc")
        took = load_orthanc(orthanc, data.all_files)
        print(f"  Orthanc at {orthanc.http_url} (pid {orthanc.pid}), loaded in {took:.1f} s", flush=True)

        tp_base = telepacs.url
        rendered = (f"/dicomweb/studies/{target.study}/series/{target.series}/instances/{target.instance}"
                    f"/rendered")
        fixed = f"?window={WINDOW[0]},{WINDOW[1]},{FUNCTION}&quality={QUALITY}"
        o_rendered = (f"/instances/{orthanc_instance_id(orthanc, target.instance)}/rendered?window-center={WINDOW[0]}"
                      f"&window-width={WINDOW[1]}&quality={QUALITY}")
        o_dicomweb = (f"/dicom-web/studies/{target.study}/series/{target.series}/instances/{target.instance}"
                      f"/rendered{fixed}")
        notes += check_orthanc_windowing(orthanc.http_url, o_rendered, o_dicomweb)

        def cold_window(k: int) -> str:
            """Window ``k``: the centre moves by 1e-5 per k, so the image is that of 40/400 (not a blank
            one, cheaper to encode) but the request and the display table are new."""
            return f"{WINDOW[0] + k * 1e-5:.5f},{WINDOW[1]},{FUNCTION}"

        def series_path(i: int, prefix: str = "/dicomweb") -> str:
            u = series_uids[(i + 3) % len(series_uids)]  # the warm-up takes 3; measured ones are never seen before
            return (f"{prefix}/studies/{u.study}/series/{u.series}/instances/{u.instance}/rendered"
                    f"?window={cold_window(10_000 + i)}&quality={QUALITY}")

        jpeg = "image/jpeg"
        if requests + 3 > len(series_uids):
            notes.append(f"cold-slice: {requests} requests over {len(series_uids)} slices: some slices repeat "
                         "(new window each time; the frame may be in the decoded-frame cache)")
        rendering = [
            Probe("telepacs cold-window", tp_base,
                  lambda i: f"{rendered}?window={cold_window(i + 3)}&quality={QUALITY}", jpeg, token=telepacs.token),
            Probe("telepacs cold-slice", tp_base, series_path, jpeg, token=telepacs.token),
            Probe("telepacs warm", tp_base, lambda i: rendered + fixed, jpeg, token=telepacs.token),
            Probe("orthanc /rendered", orthanc.http_url, lambda i: o_rendered, jpeg),
            Probe("orthanc dicomweb /rendered", orthanc.http_url, lambda i: o_dicomweb, jpeg),
            Probe("orthanc dicomweb /rendered cold-slice", orthanc.http_url,
                  lambda i: series_path(i, "/dicom-web"), jpeg),
        ]
        latencies += measure_interleaved(rendering, requests, rounds=3)
        qido = f"/studies/{listing.study}/series/{listing.series}/instances"
        listings = [
            Probe("telepacs QIDO 300-instance series", tp_base, lambda i: "/dicomweb" + qido, DICOM_JSON, 2,
                  token=telepacs.token),
            Probe("orthanc dicomweb QIDO 300-instance series", orthanc.http_url, lambda i: "/dicom-web" + qido,
                  DICOM_JSON, 2),
        ]
        latencies += measure_interleaved(listings, qido_requests, rounds=2)
        for lat in latencies:
            print(f"  {lat.name}: p50 {lat.p50_ms:.2f} ms, p95 {lat.p95_ms:.2f} ms", flush=True)

        for conns in CONNECTIONS:
            start = 100_000 * conns  # window centres never asked before in this run
            lua = WRK_COLD_LUA.format(start=start, path=rendered + "?window=", center=WINDOW[0], width=WINDOW[1],
                                      function=FUNCTION, quality=QUALITY)
            for name, url, lua_script, token in (
                ("telepacs cold-window", tp_base + rendered, lua, telepacs.token),
                ("telepacs warm", tp_base + rendered + fixed, None, telepacs.token),
                ("orthanc /rendered", orthanc.http_url + o_rendered, None, ""),
                ("orthanc dicomweb /rendered", orthanc.http_url + o_dicomweb, None, ""),
            ):
                tp = run_wrk(name, url, conns, seconds, jpeg, lua_script, scratch, token)
                throughputs.append(tp)
                print(f"  wrk {name}, {conns} connections: {tp.rps:.0f} req/s"
                      f"{' (' + tp.errors + ')' if tp.errors else ''}", flush=True)
        if args.keep_servers:
            print(f"servers kept: telepacs gunicorn pid {telepacs.proc.pid if telepacs.proc else '?'} "
                  f"{telepacs.url}{rendered}{fixed} ; Orthanc pid {orthanc.pid}. Press Enter to stop.", flush=True)
            sys.stdin.readline()
    finally:
        telepacs.stop()
        if orthanc is not None:
            orthanc.stop()
        notes += [f"telepacs log: {line}" for line in scan_log(telepacs.log)]
    return latencies, throughputs, notes


def check_orthanc_windowing(base: str, o_rendered: str, o_dicomweb: str) -> list[str]:
    """Does each Orthanc endpoint honour the window? (A different window must give a different image.)"""
    notes: list[str] = []
    client = Client(base)
    try:
        for name, path, other in (
            ("orthanc /rendered", o_rendered, o_rendered.replace(f"window-center={WINDOW[0]}", "window-center=900")),
            ("orthanc dicomweb /rendered", o_dicomweb, o_dicomweb.replace(f"window={WINDOW[0]},", "window=900,")),
        ):
            first = client.get(path, "image/jpeg")[2]
            second = client.get(other, "image/jpeg")[2]
            if first == second:
                notes.append(f"{name}: the window parameter seems to be ignored (same image for 40/400 and 900/400)")
    finally:
        client.close()
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    started = time.perf_counter()
    temp_root = Path(tempfile.mkdtemp(prefix="telepacs-bench-render-"))
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    try:
        print("preparing data ...", flush=True)
        data = prepare_data(data_dir, args.slices)
        latencies, throughputs, notes = run(args, data, temp_root)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    goals = targets(latencies, throughputs)
    print()
    print(markdown(info, latencies, throughputs))
    print("\n## Targets (issue 4)\n")
    print("\n".join(f"- {g}" for g in goals))
    if notes:
        print("\n## Notes\n")
        print("\n".join(f"- {n}" for n in notes))
    elapsed = time.perf_counter() - started
    print(f"\ntotal time {elapsed:.0f} s; JSON: {out_path}")
    out_path.write_text(json.dumps({
        "command": [sys.executable] + sys.argv,
        "machine": info,
        "settings": {"quick": args.quick, "web_workers": WEB_WORKERS, "web_threads": WEB_THREADS,
                     "window": WINDOW, "quality": QUALITY, "slices": args.slices},
        "latency": [vars(x) for x in latencies],
        "throughput": [vars(x) for x in throughputs],
        "targets": goals,
        "issue_figures_orthanc": ISSUE_ORTHANC,
        "notes": notes,
        "elapsed_s": round(elapsed, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
