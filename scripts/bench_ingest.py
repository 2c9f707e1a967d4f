#!/usr/bin/env python3
"""Ingest benchmark: telepacs vs Orthanc vs dcmtk storescp, side by side, in one run.

    .venv/bin/python scripts/bench_ingest.py [--quick] [--workers 2] [--repeats 3]
                                             [--data-dir DIR] [--out bench-output/ingest.json]

For each data set (the real 10-slice GE CT of ../shared/testdata, a generated
300-slice and a 500-slice 512x512 CT), each receiver and each sender count
(1 and 4 parallel dcmtk ``storescu`` processes, the file list split into
disjoint parts) it measures instances/s and MB/s (MB = 10^6 bytes, from the
first sender's start to the last sender's exit) and the receiving processes'
peak RSS (VmRSS of the process and its children, sampled every 50 ms; MiB).
Every run gets a fresh receiver with an empty data directory, so duplicates
are never measured; the median over ``--repeats`` runs is reported.

Receivers:

- ``telepacs-fs-1w``:  one ``python -m dicom_node`` process, file-system storage, SQLite index;
- ``telepacs-fs-Nw``:  N ``--reuse-port`` workers sharing the port (``--workers``);
- ``telepacs-s3-Nw`` (and ``telepacs-s3-1w`` with ``--receivers all``): the same on S3 (a
  SeaweedFS server this script starts), through telepacs' local receive spool; reported
  both as the acknowledged rate (storescu done) and the durable-in-S3 rate (spool drained;
  the objects are then listed in the bucket);
- ``orthanc``: Debian's Orthanc, default SQLite index, ``TCP_NODELAY=1``;
- ``storescp``: dcmtk ``storescp`` writing the files (``+B``), ``TCP_NODELAY=1``: the plain-disk limit.

Then one ~500 MB multi-frame instance is sent to telepacs (1 worker, file storage):
time, the worker's peak RSS (target < 200 MiB) and a byte check of the stored object.

Results: a markdown table on stdout and JSON in ``--out``. Only loopback traffic;
every server is stopped by the PID this script started, also on error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_test_data import make_ct_series, make_multiframe  # noqa: E402
from tests.peers import (  # noqa: E402
    DCMTK_BIN,
    ORTHANC_BIN,
    OrthancServer,
    PeerError,
    StorescpServer,
    echoscu,
    free_port,
    scan_sop_syntaxes,
    stop_process,
    storescu_config,
)
from tests.s3server import SeaweedS3, find_weed  # noqa: E402

LOOPBACK = "127.0.0.1"
TESTDATA = REPO.parent / "shared" / "testdata"
REAL_CT_DIR = TESTDATA / "ge_ct_phantom_10slices_nometa"
RSS_INTERVAL = 0.05
SEND_TIMEOUT = 900.0
DRAIN_TIMEOUT = 120.0  # the drain normally keeps pace with receiving; longer means it is stuck
MB = 1_000_000
ALL_RECEIVERS = ("fs-1w", "fs-Nw", "s3-1w", "s3-Nw", "orthanc", "storescp")
#: s3-1w is left out by default to stay within ~15 minutes: with one sender only one
#: worker is busy anyway, so s3-Nw covers both sender counts.
DEFAULT_RECEIVERS = "fs-1w,fs-Nw,s3-Nw,orthanc,storescp"
MIB = 1024 * 1024


# =========================================================================== data sets


@dataclass
class DataSet:
    """A list of Part-10 files sent as one batch, and a storescu config proposing their own syntaxes."""

    name: str
    files: list[Path]
    storescu_cfg: Path

    @property
    def instances(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _complete_marker(directory: Path) -> Path:
    return directory / ".complete"


def wrap_real_ct(src_dir: Path, out_dir: Path) -> list[Path]:
    """Wrap raw (no preamble, no file meta) Implicit VR LE datasets into Part-10 files."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian

    if _complete_marker(out_dir).exists():
        return sorted(out_dir.glob("*.dcm"))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    paths: list[Path] = []
    for src in sorted(src_dir.glob("*.ct")):  # the folder also holds README.md and LICENCE.md
        ds = dcmread(src, force=True)
        if "SOPClassUID" not in ds:
            raise ValueError(f"{src}: not a DICOM data set")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        out = out_dir / f"{src.stem}.dcm"
        ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    _complete_marker(out_dir).touch()
    return paths


def generated_ct(out_dir: Path, slices: int) -> list[Path]:
    """A generated CT series in ``out_dir`` (reused when a previous run completed it)."""
    if _complete_marker(out_dir).exists():
        files = sorted(out_dir.glob("CT*.dcm"))
        if len(files) == slices:
            return files
    shutil.rmtree(out_dir, ignore_errors=True)
    files = make_ct_series(out_dir, slices)
    _complete_marker(out_dir).touch()
    return files


def make_dataset(name: str, files: list[Path], directory: Path) -> DataSet:
    cfg = directory / "storescu-ownsyntax.cfg"
    cfg.write_text(storescu_config(scan_sop_syntaxes(files)))
    for path in files:  # warm the page cache: every receiver then reads the same way
        with open(path, "rb") as fp:
            while fp.read(1 << 20):
                pass
    return DataSet(name, files, cfg)


def prepare_datasets(data_dir: Path, quick: bool) -> list[DataSet]:
    sets: list[DataSet] = []
    if not quick:
        real = data_dir / "ct10-real"
        sets.append(make_dataset("ct-real-10", wrap_real_ct(REAL_CT_DIR, real), real))
    for slices in (300,) if quick else (300, 500):
        directory = data_dir / f"ct{slices}"
        t0 = time.perf_counter()
        files = generated_ct(directory, slices)
        print(f"  data set ct-gen-{slices}: {len(files)} files ready in {time.perf_counter() - t0:.1f} s", flush=True)
        sets.append(make_dataset(f"ct-gen-{slices}", files, directory))
    return sets


# =========================================================================== RSS sampling


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/PID/task/TID/children)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fp:
                    stack.extend(int(c) for c in fp.read().split())
            except OSError:
                continue
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fp:
            for line in fp:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (clock ticks), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fp:
            fields = fp.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler:
    """Samples VmRSS of a set of root processes (each with its children) every ``interval`` s.

    Also accounts the CPU time those processes used while sampled (user + system,
    children included), as a hint of where a receiver's time goes.
    """

    def __init__(self, roots: Sequence[int], interval: float = RSS_INTERVAL) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak_total_kib = 0
        self.peak_per_root_kib = [0] * len(self.roots)
        self.first_total_kib: int | None = None
        self.samples = 0
        self._cpu_first: dict[int, int] = {}
        self._cpu_last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        total = 0
        first = self.samples == 0
        for i, root in enumerate(self.roots):
            pids = _descendants(root)
            kib = sum(_rss_kib(p) for p in pids)
            for p in pids:
                ticks = _cpu_ticks(p)
                if ticks:
                    self._cpu_last[p] = ticks
                    self._cpu_first.setdefault(p, ticks if first else 0)
            self.peak_per_root_kib[i] = max(self.peak_per_root_kib[i], kib)
            total += kib
        self.peak_total_kib = max(self.peak_total_kib, total)
        if self.first_total_kib is None:
            self.first_total_kib = total
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def result(self) -> dict[str, float]:
        return {
            "peak_total_mib": round(self.peak_total_kib / 1024, 1),
            "peak_max_process_mib": round(max(self.peak_per_root_kib, default=0) / 1024, 1),
            "idle_total_mib": round((self.first_total_kib or 0) / 1024, 1),
            "samples": self.samples,
            "cpu_seconds": round(self.cpu_seconds(), 3),
        }

    def cpu_seconds(self) -> float:
        ticks = sum(last - self._cpu_first.get(p, 0) for p, last in self._cpu_last.items())
        return ticks / _CLK_TCK


# =========================================================================== receivers


def _listening_sockets(port: int) -> int:
    """Number of LISTEN sockets bound to ``port`` (SO_REUSEPORT workers each have one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fp:
                next(fp)
                for line in fp:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            continue
    return count


_PROBLEM_RE = re.compile(r"\b(ERROR|CRITICAL|WARNING|Traceback|Exception)\b")


def scan_log(path: Path, limit: int = 20) -> list[str]:
    """Lines of a log that look like a problem (errors, warnings, tracebacks)."""
    if not path.exists():
        return []
    hits = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if _PROBLEM_RE.search(line)]
    return hits[:limit]


class Receiver:
    """One kind of receiving server, started fresh in its own directory for every run."""

    name: str = "receiver"
    family: str = "other"
    aet: str = "ANY"
    s3: bool = False

    def __init__(self) -> None:
        self.port = 0
        self.run_dir: Path | None = None

    def start(self, run_dir: Path) -> None:
        raise NotImplementedError

    def root_pids(self) -> list[int]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def count_received(self) -> int:
        """How many instances the receiver holds now."""
        raise NotImplementedError

    def problems(self) -> list[str]:
        return []

    def wait_durable(self, expected: int, timeout: float) -> float | None:
        """Block until what was acknowledged is durable in the final store; the time of that, or None."""
        return None


class TelepacsReceiver(Receiver):
    """``telepacs serve --no-web`` with N DICOM workers (``--reuse-port`` when more than one), configured by env vars."""

    family = "telepacs"
    aet = "TELEPACS"

    def __init__(self, workers: int, s3: SeaweedS3 | None = None) -> None:
        super().__init__()
        self.workers = workers
        self.s3server = s3
        self.s3 = s3 is not None
        self.name = f"telepacs-{'s3' if self.s3 else 'fs'}-{workers}w"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.data_dir: Path | None = None
        self.bucket: str | None = None
        self.notes: list[str] = []

    def env(self) -> dict[str, str]:
        assert self.data_dir is not None
        env = dict(os.environ)
        env.update(
            {
                "TELEPACS_DATA_DIR": str(self.data_dir),
                "TELEPACS_DICOM_HOST": LOOPBACK,
                "TELEPACS_DICOM_PORT": str(self.port),
                "TELEPACS_AE_TITLE": self.aet,
                "TELEPACS_LOG_LEVEL": "WARNING",
                "TCP_NODELAY": "1",
            }
        )
        for key in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL", "TELEPACS_DICOM_WORKERS"):
            env.pop(key, None)
        if self.s3server is not None:
            assert self.bucket is not None
            env["TELEPACS_STORAGE_URL"] = self.s3server.url(self.bucket)
        else:
            env["TELEPACS_STORAGE_URL"] = (self.data_dir / "objects").as_uri()
        return env

    def start(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs, self.logs, self.notes = [], [], []
        self.data_dir = run_dir / "telepacs-data"
        self.data_dir.mkdir(parents=True)
        self.port = free_port()
        if self.s3server is not None:
            self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
            _minio(self.s3server).make_bucket(bucket_name=self.bucket)
        env = self.env()
        init = subprocess.run(
            [telepacs_cli(), "init"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
        )
        if init.returncode != 0:
            raise PeerError(f"telepacs init failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        # `telepacs serve --no-web`: the workers (SO_REUSEPORT when several) and, on S3,
        # the spool uploader process, as an installation runs them.
        env["TELEPACS_DICOM_WORKERS"] = str(self.workers)
        log_path = run_dir / "telepacs-serve.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [telepacs_cli(), "serve", "--no-web"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=run_dir,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.logs.append(log_path)
        deadline = time.monotonic() + 60
        while _listening_sockets(self.port) < self.workers:
            for proc, log_path in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise PeerError(
                        f"telepacs worker {proc.pid} exited with {proc.returncode}:\n"
                        + log_path.read_text(errors="replace")[-3000:]
                    )
            if time.monotonic() > deadline:
                raise PeerError(f"telepacs: {self.workers} workers not listening on {self.port} after 60 s")
            time.sleep(0.02)
        if not echoscu(LOOPBACK, self.port, self.aet):
            raise PeerError(f"telepacs on port {self.port} does not answer C-ECHO")

    def root_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            code = stop_process(proc, signal.SIGTERM, timeout=20)
            if code not in (0, -signal.SIGTERM):
                self.notes.append(f"worker {proc.pid} exited with status {code} after SIGTERM")
        self.procs = []

    def problems(self) -> list[str]:
        out: list[str] = list(self.notes)
        for log_path in self.logs:
            out += [f"{log_path.name}: {line}" for line in scan_log(log_path)]
        return out

    def objects_dir(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "objects"

    def stored_files(self) -> list[Path]:
        return [p for p in self.objects_dir().rglob("*.dcm") if p.is_file()]

    def indexed_instances(self) -> int:
        assert self.data_dir is not None
        db = self.data_dir / "index.sqlite3"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute("SELECT count(*) FROM instances").fetchone()[0])
        finally:
            con.close()

    def count_received(self) -> int:
        indexed = self.indexed_instances()
        if self.s3server is None:
            stored = len(self.stored_files())
        else:
            assert self.bucket is not None
            stored = sum(1 for _ in _minio(self.s3server).list_objects(bucket_name=self.bucket, recursive=True))
        if indexed != stored:
            self.notes.append(f"index has {indexed} instances but storage holds {stored} objects")
        return min(indexed, stored)

    def spool_pending(self) -> int:
        assert self.data_dir is not None
        spool = self.data_dir / "spool"
        pending = 0
        for sub in ("ready", "tmp"):
            directory = spool / sub
            if directory.is_dir():
                pending += sum(1 for p in directory.iterdir() if p.name.endswith(".data") or sub == "tmp")
        return pending

    def wait_durable(self, expected: int, timeout: float) -> float | None:
        if self.s3server is None:
            return None
        deadline = time.monotonic() + timeout
        while self.spool_pending() > 0:
            if time.monotonic() > deadline:
                alive = [f"{p.pid}:{'alive' if p.poll() is None else f'exited {p.returncode}'}" for p in self.procs]
                raise PeerError(f"{self.name}: spool not drained after {timeout:.0f} s "
                                f"({self.spool_pending()} files left; workers {', '.join(alive)})")
            time.sleep(0.01)
        return time.perf_counter()


class PeerReceiver(Receiver):
    """A receiver that is one peer server process from tests/peers.py (Orthanc, storescp)."""

    server: OrthancServer | StorescpServer | None = None

    def root_pids(self) -> list[int]:
        assert self.server is not None and self.server.pid is not None
        return [self.server.pid]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class OrthancReceiver(PeerReceiver):
    name = "orthanc"
    family = "orthanc"
    aet = "ORTHANC"

    def __init__(self) -> None:
        super().__init__()
        self.server: OrthancServer | None = None

    def start(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.server = OrthancServer(work_dir=run_dir / "orthanc", aet=self.aet)
        self.server.start()
        self.port = self.server.dicom_port


    def count_received(self) -> int:
        assert self.server is not None
        stats = self.server.get_json("/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])

    def problems(self) -> list[str]:
        if self.run_dir is None:
            return []
        log_path = self.run_dir / "orthanc" / "orthanc.log"
        if not log_path.exists():
            return []
        lines = log_path.read_text(errors="replace").splitlines()
        return [f"orthanc.log: {line}" for line in lines if re.match(r"^E\d{4} ", line)][:20]


class StorescpReceiver(PeerReceiver):
    name = "storescp"
    family = "storescp"
    aet = "STORESCP"

    def __init__(self, fork: bool = False) -> None:
        super().__init__()
        self.fork = fork
        if fork:
            self.name = "storescp-fork"
        self.server: StorescpServer | None = None

    def start(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.server = StorescpServer(
            out_dir=run_dir / "storescp" / "out", aet=self.aet, extra=["--fork"] if self.fork else []
        )
        (run_dir / "storescp").mkdir(parents=True, exist_ok=True)
        self.server.start()
        self.port = self.server.port


    def count_received(self) -> int:
        assert self.server is not None
        return len(self.server.received_files())


def telepacs_cli() -> str:
    beside = Path(sys.executable).parent / "telepacs"
    if beside.exists():
        return str(beside)
    found = shutil.which("telepacs")
    if not found:
        raise PeerError("telepacs console script not found (pip install -e .)")
    return found


def _minio(server: SeaweedS3) -> Any:
    from minio import Minio

    return Minio(server.endpoint, server.access_key, server.secret_key, secure=False)


# =========================================================================== senders


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``parts`` disjoint contiguous chunks of ``files`` (sizes differ by at most one)."""
    parts = max(1, min(parts, len(files)))
    base, extra = divmod(len(files), parts)
    out: list[list[Path]] = []
    start = 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(files[start : start + size]))
        start += size
    return out


@dataclass
class SendResult:
    seconds: float
    t_start: float
    t_end: float
    returncodes: list[int]
    errors: list[str]


def send(dataset: DataSet, files: Sequence[Path], aet: str, port: int, senders: int, work_dir: Path) -> SendResult:
    """Run ``senders`` dcmtk storescu processes concurrently, each on its own part of ``files``."""
    storescu = str(DCMTK_BIN / "storescu")
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    cmds = []
    for i, part in enumerate(split(files, senders)):
        cmds.append(
            [storescu, "-aet", f"BENCHSCU{i}", "-aec", aet, "-xf", str(dataset.storescu_cfg), "OwnSyntax",
             LOOPBACK, str(port)] + [str(p) for p in part]
        )
    logs = [work_dir / f"storescu-{i}.log" for i in range(len(cmds))]
    handles = [open(p, "wb") for p in logs]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.perf_counter()
        for cmd, handle in zip(cmds, handles):
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            )
        deadline = time.monotonic() + SEND_TIMEOUT
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(proc, signal.SIGKILL, 5)
        t1 = time.perf_counter()
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop_process(proc, signal.SIGKILL, 5)
        for handle in handles:
            handle.close()
    codes = [int(p.returncode) for p in procs]
    errors: list[str] = []
    for code, log_path in zip(codes, logs):
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            errors.append(f"storescu exit {code}: " + " | ".join(tail))
    return SendResult(t1 - t0, t0, t1, codes, errors)


# =========================================================================== one run


@dataclass
class RunResult:
    dataset: str
    receiver: str
    family: str
    senders: int
    repeat: int
    instances: int
    bytes: int
    seconds: float
    inst_per_s: float
    mb_per_s: float
    received: int
    ok: bool
    rss: dict[str, float]
    durable_seconds: float | None = None
    durable_inst_per_s: float | None = None
    durable_mb_per_s: float | None = None
    problems: list[str] = field(default_factory=list)


def run_once(
    dataset: DataSet, receiver: Receiver, senders: int, repeat: int, scratch: Path, keep_logs: Path
) -> RunResult:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=scratch))
    problems: list[str] = []
    try:
        receiver.start(run_dir)
        with RssSampler(receiver.root_pids()) as sampler:
            sent = send(dataset, dataset.files, receiver.aet, receiver.port, senders, run_dir)
            durable_at = receiver.wait_durable(dataset.instances, DRAIN_TIMEOUT)
        received = receiver.count_received()
        problems += sent.errors
        if received != dataset.instances:
            problems.append(f"receiver holds {received} instances, {dataset.instances} were sent")
    except BaseException as exc:
        problems.append(f"run failed: {exc}")  # keeps the logs below
        raise
    finally:
        try:
            receiver.stop()
        finally:
            problems += receiver.problems()
            if problems:
                dest = keep_logs / run_dir.name
                shutil.copytree(run_dir, dest, ignore=_ignore_bulk, dirs_exist_ok=True)
                problems.append(f"logs kept in {dest}")
            shutil.rmtree(run_dir, ignore_errors=True)
    n, size = dataset.instances, dataset.total_bytes
    result = RunResult(
        dataset=dataset.name,
        receiver=receiver.name,
        family=receiver.family,
        senders=senders,
        repeat=repeat,
        instances=n,
        bytes=size,
        seconds=round(sent.seconds, 4),
        inst_per_s=round(n / sent.seconds, 1),
        mb_per_s=round(size / MB / sent.seconds, 1),
        received=received,
        ok=received == n and all(c == 0 for c in sent.returncodes),
        rss=sampler.result(),
        problems=problems,
    )
    if durable_at is not None:
        secs = durable_at - sent.t_start
        result.durable_seconds = round(secs, 4)
        result.durable_inst_per_s = round(n / secs, 1)
        result.durable_mb_per_s = round(size / MB / secs, 1)
    return result


def _ignore_bulk(directory: str, names: list[str]) -> list[str]:
    """copytree filter: keep logs and configs, not received DICOM data."""
    keep = (".log", ".json", ".cfg", ".toml")
    return [n for n in names if Path(directory, n).is_file() and not n.endswith(keep)]


# =========================================================================== large instance


def _dataset_offset(path: Path) -> int:
    """Offset of the first byte after the Part-10 file meta group (from its group length)."""
    with open(path, "rb") as fp:
        head = fp.read(144)
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path}: no Part-10 header with a (0002,0000) group length")
    (length,) = struct.unpack("<I", head[140:144])
    return 144 + int(length)


def _sha256_from(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        fp.seek(offset)
        while chunk := fp.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def bench_large(data_dir: Path, scratch: Path, megabytes: float, keep_logs: Path) -> dict[str, Any]:
    """Send one ~``megabytes`` MB multi-frame to telepacs (1 worker, file storage)."""
    big = data_dir / f"multiframe-{megabytes:g}MB.dcm"
    marker = big.with_suffix(".complete")
    if not marker.exists():
        t0 = time.perf_counter()
        frames = make_multiframe(big, megabytes)
        marker.touch()
        print(f"  multi-frame: {frames} frames, {big.stat().st_size / MB:.0f} MB in {time.perf_counter() - t0:.1f} s",
              flush=True)
    dataset = make_dataset("multiframe", [big], data_dir)
    receiver = TelepacsReceiver(1)
    run = run_once(dataset, receiver, 1, 0, scratch, keep_logs)
    out: dict[str, Any] = {"run": asdict(run), "sent_bytes": big.stat().st_size}
    # run_once removed the receiver's data; repeat once more keeping it, to check the stored bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="telepacs-large-", dir=scratch))
    check = TelepacsReceiver(1)
    try:
        check.start(run_dir)
        with RssSampler(check.root_pids()) as sampler:
            sent = send(dataset, dataset.files, check.aet, check.port, 1, run_dir)
        stored = check.stored_files()
        out["check_run"] = {"seconds": round(sent.seconds, 3), "rss": sampler.result(), "errors": sent.errors}
        if len(stored) != 1:
            out["verified"] = False
            out["verify_note"] = f"{len(stored)} stored objects found, expected 1"
        else:
            obj = stored[0]
            out["stored_bytes"] = obj.stat().st_size
            sent_off, stored_off = _dataset_offset(big), _dataset_offset(obj)
            same_dataset = (big.stat().st_size - sent_off == obj.stat().st_size - stored_off) and (
                _sha256_from(big, sent_off) == _sha256_from(obj, stored_off)
            )
            out["verified"] = same_dataset
            out["verify_note"] = (
                "data set bytes after the file meta identical (sha256)"
                if same_dataset
                else "stored data set differs from the sent one"
            )
            out["file_meta_bytes"] = {"sent": sent_off, "stored": stored_off}
    finally:
        try:
            check.stop()
        finally:
            problems = check.problems()
            if problems:
                out["check_problems"] = problems
            shutil.rmtree(run_dir, ignore_errors=True)
    return out


# =========================================================================== report


def machine_info() -> dict[str, Any]:
    import pydicom
    import pynetdicom

    def first_line(cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
            text = (res.stdout or res.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as fp:
        for line in fp:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as fp:
        for line in fp:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    weed = find_weed()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": first_line([str(DCMTK_BIN / "storescu"), "--version"]),
        "orthanc": first_line([str(ORTHANC_BIN), "--version"]),
        "seaweedfs": first_line([weed, "version"]) if weed else "?",
        "telepacs_commit": commit + (" (+uncommitted changes)" if dirty.strip() else ""),
        "filesystem": first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", tempfile.gettempdir()]),
    }


def summarise(runs: list[RunResult]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.receiver, run.senders), []).append(run)
    rows: list[dict[str, Any]] = []
    for (ds, rc, senders), rs in groups.items():
        good = [r for r in rs if r.ok] or rs
        row: dict[str, Any] = {
            "dataset": ds,
            "receiver": rc,
            "family": rs[0].family,
            "senders": senders,
            "runs": len(rs),
            "runs_ok": sum(r.ok for r in rs),
            "inst_per_s": round(statistics.median(r.inst_per_s for r in good), 1),
            "mb_per_s": round(statistics.median(r.mb_per_s for r in good), 1),
            "peak_rss_total_mib": max(r.rss["peak_total_mib"] for r in rs),
            "peak_rss_max_process_mib": max(r.rss["peak_max_process_mib"] for r in rs),
            "all_inst_per_s": [r.inst_per_s for r in rs],
            "cpu_ms_per_inst": round(statistics.median(1000 * r.rss["cpu_seconds"] / r.instances for r in good), 2),
        }
        durable = [r.durable_inst_per_s for r in good if r.durable_inst_per_s is not None]
        if durable:
            row["durable_inst_per_s"] = round(statistics.median(durable), 1)
            row["durable_mb_per_s"] = round(
                statistics.median(r.durable_mb_per_s for r in good if r.durable_mb_per_s is not None), 1
            )
        rows.append(row)
    ds_order = {r.dataset: i for i, r in reversed(list(enumerate(runs)))}
    rc_order = {r.receiver: i for i, r in reversed(list(enumerate(runs)))}
    rows.sort(key=lambda r: (ds_order[r["dataset"]], r["senders"], rc_order[r["receiver"]]))
    by_key = {(r["dataset"], r["receiver"], r["senders"]): r for r in rows}
    for row in rows:
        orthanc = by_key.get((row["dataset"], "orthanc", row["senders"]))
        row["ratio_to_orthanc"] = round(row["inst_per_s"] / orthanc["inst_per_s"], 2) if orthanc else None
        if row["receiver"].startswith("telepacs-s3-"):
            fs = by_key.get((row["dataset"], row["receiver"].replace("-s3-", "-fs-"), row["senders"]))
            if fs:
                row["ratio_to_own_fs"] = round(row["inst_per_s"] / fs["inst_per_s"], 2)
                if "durable_inst_per_s" in row:
                    row["durable_ratio_to_own_fs"] = round(row["durable_inst_per_s"] / fs["inst_per_s"], 2)
    return rows


def markdown_table(rows: list[dict[str, Any]], info: dict[str, Any], large: dict[str, Any] | None) -> str:
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        "",
        "## Ingest (median over repeats; MB = 10^6 B; RSS in MiB, receiving processes incl. children)",
        "",
        "| dataset | receiver | senders | inst/s (median) | MB/s | peak RSS MB | ratio to Orthanc"
        " | durable-in-S3 inst/s (MB/s) | S3/FS | receiver CPU ms/inst | runs ok |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["family"] == "telepacs" and not r["receiver"].endswith("-1w"):
            rss = f"{r['peak_rss_total_mib']:.0f} (max {r['peak_rss_max_process_mib']:.0f}/worker)"
        else:
            rss = f"{r['peak_rss_total_mib']:.0f}"
        ratio = f"{r['ratio_to_orthanc']:.2f}×" if r.get("ratio_to_orthanc") is not None else "–"
        durable = (
            f"{r['durable_inst_per_s']:.0f} ({r['durable_mb_per_s']:.0f})" if "durable_inst_per_s" in r else "–"
        )
        s3fs = "–"
        if "ratio_to_own_fs" in r:
            s3fs = f"{r['ratio_to_own_fs']:.2f} (durable {r.get('durable_ratio_to_own_fs', 0):.2f})"
        lines.append(
            f"| {r['dataset']} | {r['receiver']} | {r['senders']} | {r['inst_per_s']:.0f} | {r['mb_per_s']:.1f}"
            f" | {rss} | {ratio} | {durable} | {s3fs} | {r['cpu_ms_per_inst']:.1f} | {r['runs_ok']}/{r['runs']} |"
        )
    if large is not None:
        run = large.get("run", {})
        lines += ["", "## Large instance (telepacs, 1 worker, file storage)", ""]
        if "error" in large:
            lines.append(f"- FAILED: {large['error']}")
        else:
            lines += [
                f"- sent: {large['sent_bytes'] / MB:.1f} MB in {run['seconds']:.2f} s "
                f"({run['mb_per_s']:.1f} MB/s), received ok: {run['ok']}",
                f"- worker peak RSS: {run['rss']['peak_max_process_mib']:.0f} MiB (idle "
                f"{run['rss']['idle_total_mib']:.0f} MiB; target < 200 MiB; check run: "
                f"{large.get('check_run', {}).get('rss', {}).get('peak_max_process_mib', '?')} MiB)",
                f"- stored object: {large.get('stored_bytes', '?')} bytes; verified: {large.get('verified')} "
                f"({large.get('verify_note', '')})",
            ]
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], large: dict[str, Any] | None) -> list[str]:
    """The issue's targets, checked on the largest data set measured."""
    out: list[str] = []
    datasets = [r["dataset"] for r in rows]
    if not datasets:
        return out
    ds = sorted(set(datasets), key=lambda d: int(re.sub(r"\D", "", d) or 0))[-1]
    tp = [r for r in rows if r["dataset"] == ds and r["family"] == "telepacs"]
    for senders, need in ((1, 1.5), (4, 2.0)):
        cands = [r for r in tp if r["senders"] == senders and r["receiver"].startswith("telepacs-fs-")
                 and r.get("ratio_to_orthanc") is not None]
        if cands:
            best = max(cands, key=lambda r: r["ratio_to_orthanc"])
            verdict = "met" if best["ratio_to_orthanc"] >= need else "NOT met"
            out.append(f"{ds}, {senders} sender(s): best telepacs ({best['receiver']}) "
                       f"{best['ratio_to_orthanc']:.2f}× Orthanc (target ≥ {need}×): {verdict}")
    for r in tp:
        if "ratio_to_own_fs" in r:
            verdict = "met" if r["ratio_to_own_fs"] >= 0.8 else "NOT met"
            out.append(f"{ds}, {r['senders']} sender(s): {r['receiver']} acknowledged rate "
                       f"{r['ratio_to_own_fs']:.2f} of own FS rate (target ≥ 0.8): {verdict}; "
                       f"durable-in-S3 {r.get('durable_ratio_to_own_fs', 0):.2f}")
    if large is not None and "run" in large:
        peak = large["run"]["rss"]["peak_max_process_mib"]
        out.append(f"large instance: worker peak RSS {peak:.0f} MiB (target < 200): "
                   f"{'met' if peak < 200 else 'NOT met'}; stored bytes verified: {large.get('verified')}")
    return out


# =========================================================================== main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 300-slice set, 1 repeat (development)")
    parser.add_argument("--workers", type=int, default=2, help="telepacs receiving processes for the parallel case")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (data set, receiver, senders); median")
    parser.add_argument("--senders", default="1,4", help="comma list of parallel storescu counts (default 1,4)")
    parser.add_argument("--receivers", default=DEFAULT_RECEIVERS,
                        help=f"comma list from: {', '.join(ALL_RECEIVERS)}, or 'all' (default {DEFAULT_RECEIVERS})")
    parser.add_argument("--storescp-fork", action="store_true",
                        help="run storescp with --fork (one child per association) instead of single-process")
    parser.add_argument("--data-dir", type=Path, help="keep generated data here and reuse it between runs")
    parser.add_argument("--scratch-dir", type=Path, help="where receivers write (default: a temp dir)")
    parser.add_argument("--large-mb", type=float, default=500.0, help="size of the multi-frame instance (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench-output/ingest.json"), help="JSON results")
    return parser


def receivers_for(selection: str, workers: int, s3: Callable[[], SeaweedS3], fork: bool) -> list[Receiver]:
    names = list(ALL_RECEIVERS) if selection == "all" else [
        s.strip() for s in selection.split(",") if s.strip()
    ]
    out: list[Receiver] = []
    for name in names:
        if name == "fs-1w":
            out.append(TelepacsReceiver(1))
        elif name == "fs-Nw":
            if workers > 1:
                out.append(TelepacsReceiver(workers))
        elif name == "s3-1w":
            out.append(TelepacsReceiver(1, s3()))
        elif name == "s3-Nw":
            if workers > 1:
                out.append(TelepacsReceiver(workers, s3()))
        elif name == "orthanc":
            out.append(OrthancReceiver())
        elif name == "storescp":
            out.append(StorescpReceiver(fork))
        else:
            raise SystemExit(f"unknown receiver {name!r}")
    return out


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP: unwind through the ``finally`` blocks so every server we started is stopped."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    repeats = 1 if args.quick else args.repeats
    sender_counts = [int(s) for s in args.senders.split(",") if s.strip()]
    started = time.perf_counter()
    temp_root = Path(tempfile.mkdtemp(prefix="telepacs-bench-"))
    data_dir = args.data_dir.resolve() if args.data_dir else temp_root / "data"
    scratch = args.scratch_dir.resolve() if args.scratch_dir else temp_root / "runs"
    data_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    out_path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    keep_logs = out_path.parent / "ingest-logs"

    s3server: SeaweedS3 | None = None

    def get_s3() -> SeaweedS3:
        nonlocal s3server
        if s3server is None:
            s3server = SeaweedS3(temp_root / "seaweedfs")
            s3server.start()
            print(f"  SeaweedFS S3 at {s3server.endpoint} (pid {s3server.proc.pid if s3server.proc else '?'})",
                  flush=True)
        return s3server

    info = machine_info()
    runs: list[RunResult] = []
    large: dict[str, Any] | None = None
    failures: list[str] = []
    try:
        print("preparing data sets ...", flush=True)
        datasets = prepare_datasets(data_dir, args.quick)
        receivers = receivers_for(args.receivers, args.workers, get_s3, args.storescp_fork)
        total = repeats * len(datasets) * len(sender_counts) * len(receivers)
        done = 0
        # Interleave: each repeat goes through every combination, so slow drifts hit all receivers alike.
        for repeat in range(repeats):
            for dataset in datasets:
                for senders in sender_counts:
                    for receiver in receivers:
                        done += 1
                        label = f"[{done}/{total}] {dataset.name} → {receiver.name}, {senders} sender(s), run {repeat + 1}"
                        try:
                            run = run_once(dataset, receiver, senders, repeat, scratch, keep_logs)
                        except (PeerError, OSError, subprocess.SubprocessError, TimeoutError, RuntimeError) as exc:
                            msg = f"{label}: FAILED: {exc}"
                            print(msg, flush=True)
                            failures.append(msg)
                            continue
                        runs.append(run)
                        extra = ""
                        if run.durable_inst_per_s is not None:
                            extra = f", durable {run.durable_inst_per_s:.0f}/s"
                        print(f"{label}: {run.inst_per_s:.0f} inst/s, {run.mb_per_s:.1f} MB/s{extra}, "
                              f"RSS {run.rss['peak_total_mib']:.0f} MiB{'' if run.ok else ' NOT OK'}", flush=True)
                        for problem in run.problems:
                            print(f"    ! {problem}", flush=True)
        if args.large_mb > 0:
            print(f"large instance ({args.large_mb:g} MB multi-frame) → telepacs-fs-1w ...", flush=True)
            try:
                large = bench_large(data_dir, scratch, args.large_mb, keep_logs)
            except (PeerError, OSError, subprocess.SubprocessError, ValueError) as exc:
                large = {"error": str(exc)}
                failures.append(f"large instance: FAILED: {exc}")
    finally:
        if s3server is not None:
            s3server.stop()
        shutil.rmtree(temp_root, ignore_errors=True)

    rows = summarise(runs)
    report = markdown_table(rows, info, large)
    goals = targets(rows, large)
    print()
    print(report)
    if goals:
        print("\n## Targets (issue 2)\n")
        print("\n".join(f"- {g}" for g in goals))
    problems = sorted({f"{r.receiver}: {p}" for r in runs for p in r.problems if not p.startswith("logs kept")})
    if large is not None:
        problems += [p for p in large.get("run", {}).get("problems", []) if not p.startswith("logs kept")]
        problems += large.get("check_problems", [])
    if failures or problems:
        print("\n## Problems seen\n")
        print("\n".join(f"- {p}" for p in failures + problems[:50]))
    elapsed = time.perf_counter() - started
    print(f"\ntotal time {elapsed / 60:.1f} min; JSON: {out_path}")
    out_path.write_text(
        json.dumps(
            {
                "command": [sys.executable] + sys.argv,
                "machine": info,
                "settings": {"repeats": repeats, "workers": args.workers, "senders": sender_counts,
                             "quick": args.quick, "rss_interval_s": RSS_INTERVAL},
                "summary": rows,
                "targets": goals,
                "runs": [asdict(r) for r in runs],
                "large_instance": large,
                "failures": failures,
                "elapsed_s": round(elapsed, 1),
            },
            indent=2,
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
