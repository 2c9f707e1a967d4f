"""Launchers for real peer servers: PostgreSQL, Orthanc, dcmtk ``storescp``.

Used by pytest fixtures and by the benchmark scripts under ``scripts/``, so this
module imports nothing from pytest. Every server listens on 127.0.0.1 on a free
port, is polled until it answers (never a blind sleep) and is stopped by the PID
we started, never by process name.

dcmtk binaries are called by absolute path (``/usr/bin/storescu`` …): the venv
also ships pynetdicom's ``storescp``/``storescu``/``echoscu`` console scripts,
which would shadow dcmtk's on a PATH that starts with ``.venv/bin``.

Import from a benchmark script with::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.peers import OrthancServer, PostgresServer, StorescpServer, run_storescu
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "PeerError",
    "free_port",
    "wait_for_port",
    "wait_until",
    "stop_process",
    "PostgresServer",
    "OrthancServer",
    "StorescpServer",
    "run_storescu",
    "scan_sop_syntaxes",
    "storescu_config",
    "echoscu",
    "DCMTK_BIN",
    "ORTHANC_BIN",
    "ORTHANC_PLUGIN_DIR",
]

# Captured at import, before anything changes tempfile.tempdir.
SYSTEM_TMP = os.environ.get("TMPDIR") or "/tmp"

DCMTK_BIN = Path(os.environ.get("TELEPACS_DCMTK_BIN", "/usr/bin"))
ORTHANC_BIN = Path(os.environ.get("TELEPACS_ORTHANC_BIN", "/usr/sbin/Orthanc"))
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
LOOPBACK = "127.0.0.1"


class PeerError(RuntimeError):
    """A peer server could not be started, or did not become ready in time."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0).

    There is an unavoidable window between closing this socket and the peer
    binding the port; on a quiet test machine that is good enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``predicate`` until it returns true, or raise :class:`PeerError`.

    If ``proc`` is given and exits while we wait, fail at once and include the
    tail of ``log`` in the message.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"{what}: process exited with {proc.returncode}{_log_tail(log)}")
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise PeerError(f"{what}: not ready after {timeout:.0f} s{_log_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, interval)


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll until a TCP connection to ``host:port`` succeeds (or raise :class:`PeerError`)."""

    def connects() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(connects, timeout, f"port {host}:{port}", proc=proc)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Send ``sig`` to ``proc`` (by its PID), wait, SIGKILL if it outlives ``timeout``.

    Returns the exit status. Safe to call on a process that already exited.
    """
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)


def _log_tail(log: Path | None, n: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-n:]
    return f"\n--- {log} (last {len(lines)} lines) ---\n" + "\n".join(lines)


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _dcmtk(name: str) -> str:
    path = DCMTK_BIN / name
    if not path.exists():
        raise PeerError(f"dcmtk binary {path} not found (apt-get install dcmtk)")
    return str(path)


class _Server:
    """Context-manager plumbing shared by the launchers."""

    def start(self) -> "_Server":  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> "_Server":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bindir() -> Path:
    env = os.environ.get("TELEPACS_PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise PeerError("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
    return Path(candidates[-1]).parent


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as the ``postgres`` user.

    ``initdb`` refuses to run as root, so every server process runs as the
    ``postgres`` system user (``subprocess`` ``user=``/``group=``); the data
    directory is chowned to it. Its parent directories must be traversable by
    that user: pytest's ``tmp_path`` (under a 0700 ``/tmp/pytest-of-root``) is
    NOT, so leave ``data_dir`` unset to get a fresh ``/tmp/telepacs-pg-*`` dir
    (removed again by :meth:`stop`).

    Authentication is ``trust`` for the unix socket (in the data dir) and
    loopback TCP. ``fast=True`` turns off ``fsync``, ``synchronous_commit`` and
    ``full_page_writes``: fine for tests, wrong for durability benchmarks.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        fast: bool = False,
        settings: Mapping[str, str | int] | None = None,
        user: str = "postgres",
        start_timeout: float = 60.0,
    ) -> None:
        self._own_dir = data_dir is None
        # The system temp dir, not tempfile.tempdir: a DICOM node running in this process
        # points that at its own incoming dir, which the postgres user cannot enter.
        self.base_dir = (Path(data_dir) if data_dir is not None
                         else Path(tempfile.mkdtemp(prefix="telepacs-pg-", dir=SYSTEM_TMP)))
        self.data_dir = self.base_dir / "pgdata"
        self.log_path = self.base_dir / "postgres.log"
        self.host = LOOPBACK
        self.port = port or free_port()
        self.fast = fast
        self.settings = dict(settings or {})
        self.os_user = user
        self.start_timeout = start_timeout
        self.bindir = _postgres_bindir()
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        """PID of the postmaster (it is the process we started, not a wrapper)."""
        return self.proc.pid if self.proc else None

    def start(self) -> "PostgresServer":
        if self.proc is not None:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base_dir, self.os_user, self.os_user)
        self.base_dir.chmod(0o700)
        probe = subprocess.run(
            ["test", "-w", str(self.base_dir)], user=self.os_user, group=self.os_user, extra_groups=[]
        )
        if probe.returncode != 0:
            raise PeerError(
                f"{self.base_dir} is not reachable by user {self.os_user!r} (a parent directory is not "
                "traversable?); pass no data_dir to use a fresh /tmp/telepacs-pg-* directory"
            )
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in self._settings().items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self.os_user,
                group=self.os_user,
                extra_groups=[],
                cwd=self.base_dir,
                env=_env({"HOME": str(self.base_dir), "LC_ALL": "C.UTF-8"}),
                start_new_session=True,  # a Ctrl-C in the terminal is not meant for it
            )
        try:
            wait_until(self._is_ready, self.start_timeout, "PostgreSQL", proc=self.proc, log=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster PID), SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT, timeout)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _initdb(self) -> None:
        cmd = [
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C.UTF-8",
        ]
        if self.fast:
            cmd.append("--no-sync")
        result = subprocess.run(
            cmd,
            user=self.os_user,
            group=self.os_user,
            extra_groups=[],
            cwd=self.base_dir,
            env=_env({"HOME": str(self.base_dir), "LC_ALL": "C.UTF-8"}),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise PeerError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def _settings(self) -> dict[str, str | int]:
        settings: dict[str, str | int] = {
            "port": self.port,
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.data_dir),
            "max_connections": 200,
            "logging_collector": "off",
        }
        if self.fast:
            settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        settings.update(self.settings)
        return settings

    def _is_ready(self) -> bool:
        result = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-U", "postgres"],
            stdin=subprocess.DEVNULL,
        )
        return result.returncode == 0

    # -- clients
    def url(self, dbname: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL, e.g. ``postgresql+psycopg://postgres@127.0.0.1:PORT/dbname``."""
        return f"{driver}://postgres@{self.host}:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq URI without a driver part (for psql, psycopg.connect)."""
        return self.url(dbname, driver="postgresql")

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with the ``psql`` binary (unaligned, tuples only) and return its stdout."""
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", dbname,
                "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise PeerError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """``createdb name`` (UTF8); returns :meth:`url` for it."""
        result = subprocess.run(
            [
                str(self.bindir / "createdb"),
                "-h", self.host, "-p", str(self.port), "-U", "postgres", "-E", "UTF8", name,
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise PeerError(f"createdb {name} failed ({result.returncode}): {result.stderr.strip()}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """``dropdb --if-exists --force name``."""
        result = subprocess.run(
            [
                str(self.bindir / "dropdb"),
                "-h", self.host, "-p", str(self.port), "-U", "postgres", "--if-exists", "--force", name,
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise PeerError(f"dropdb {name} failed ({result.returncode}): {result.stderr.strip()}")

    def __enter__(self) -> "PostgresServer":
        return self.start()


# --------------------------------------------------------------------------- Orthanc


class OrthancServer(_Server):
    """Debian's Orthanc with its own JSON configuration in ``work_dir``.

    Orthanc 1.10 has no bind-address option: its HTTP and DICOM ports listen on
    all interfaces. HTTP from non-loopback hosts is refused
    (``RemoteAccessAllowed: false``); send it loopback DICOM traffic only.

    ``modalities`` maps a name to ``[AET, host, port]`` (Orthanc's
    ``DicomModalities``). ``plugins`` is a list of ``.so`` paths or names in
    :data:`ORTHANC_PLUGIN_DIR` (e.g. ``"libOrthancDicomWeb.so"`` when
    ``orthanc-dicomweb`` is installed); missing plugins raise :class:`PeerError`.
    ``config`` entries override/extend the generated configuration.
    ``users`` (name -> password) turns HTTP Basic authentication on; the
    readiness poll and :meth:`request` then log in as the first of them.
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str] | None = None,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        plugins: Iterable[str] = (),
        http_port: int | None = None,
        dicom_port: int | None = None,
        config: Mapping[str, object] | None = None,
        verbose: bool = False,
        start_timeout: float = 60.0,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="telepacs-orthanc-"))
        self.users = dict(users or {})
        self.aet = aet
        self.modalities = {k: list(v) for k, v in (modalities or {}).items()}
        self.plugins = [self._plugin_path(p) for p in plugins]
        self.host = LOOPBACK
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.extra_config = dict(config or {})
        self.verbose = verbose
        self.start_timeout = start_timeout
        self.config_path = self.work_dir / "orthanc.json"
        self.log_path = self.work_dir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _plugin_path(plugin: str) -> str:
        path = Path(plugin)
        if not path.is_absolute():
            path = ORTHANC_PLUGIN_DIR / plugin
        if not path.exists():
            raise PeerError(f"Orthanc plugin {path} not found")
        return str(path)

    @property
    def http_url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        """PID of the Orthanc process (for RSS measurement)."""
        return self.proc.pid if self.proc else None

    def configuration(self) -> dict[str, object]:
        """The JSON configuration this server is started with."""
        config: dict[str, object] = {
            "Name": f"telepacs-test-{self.aet}",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "Plugins": self.plugins,
            "StableAge": 1,
            "SaveJobs": False,
            "JobsHistorySize": 100,
            "HttpTimeout": 60,
            "ExecuteLuaEnabled": False,
            "UnknownSopClassAccepted": True,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> "OrthancServer":
        if self.proc is not None:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2))
        cmd = [str(ORTHANC_BIN), "--no-jobs", str(self.config_path)]
        if self.verbose:
            cmd.insert(1, "--verbose")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.work_dir,
                env=_env(),
                start_new_session=True,
            )
        try:
            wait_until(self._is_ready, self.start_timeout, "Orthanc", proc=self.proc, log=self.log_path)
            wait_for_port(self.host, self.dicom_port, timeout=self.start_timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self._request("GET", "/system"), timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _request(self, method: str, path: str, body: bytes | None = None) -> urllib.request.Request:
        request = urllib.request.Request(self.http_url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return request

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> bytes:
        """Call the REST API (as the first of ``users`` if any) and return the answer's bytes."""
        with urllib.request.urlopen(self._request(method, path, body), timeout=timeout) as resp:
            return bytes(resp.read())

    def get_json(self, path: str) -> object:
        """GET ``path`` (e.g. ``/system``, ``/instances``) and decode the JSON answer."""
        return json.loads(self.request("GET", path, timeout=30))

    def post_json(self, path: str, payload: object, timeout: float = 120) -> object:
        """POST ``payload`` as JSON to ``path`` and decode the JSON answer."""
        return json.loads(self.request("POST", path, json.dumps(payload).encode(), timeout=timeout))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to our PID, wait, SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "OrthancServer":
        return self.start()


# --------------------------------------------------------------------------- dcmtk


def echoscu(host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU", timeout: float = 10.0) -> bool:
    """C-ECHO with dcmtk's ``echoscu``; True if the peer answered with success."""
    try:
        result = subprocess.run(
            [
                _dcmtk("echoscu"), "-q", "-to", "2", "-ta", "2",
                "-aet", calling_aet, "-aec", called_aet, host, str(port),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=_env(),
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


class StorescpServer(_Server):
    """dcmtk ``storescp`` (single process) on a free loopback port, files into ``out_dir``.

    ``ignore=True`` adds ``--ignore`` (receive but do not store: a pure network
    benchmark); otherwise ``bit_preserving=True`` (``+B``) writes the received
    bytes as they came. ``accept_all=True`` (``+xa``) accepts every transfer
    syntax dcmtk knows, compressed included. ``promiscuous`` (``-pm``) accepts
    unknown SOP classes. Readiness is polled with ``echoscu``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str] | None = None,
        aet: str = "STORESCP",
        port: int | None = None,
        ignore: bool = False,
        accept_all: bool = True,
        bit_preserving: bool = True,
        promiscuous: bool = True,
        max_pdu: int | None = None,
        extra: Sequence[str] = (),
        start_timeout: float = 30.0,
    ) -> None:
        self._own_dir = out_dir is None
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="telepacs-storescp-"))
        self.aet = aet
        self.host = LOOPBACK
        self.port = port or free_port()
        self.ignore = ignore
        self.accept_all = accept_all
        self.bit_preserving = bit_preserving
        self.promiscuous = promiscuous
        self.max_pdu = max_pdu
        self.extra = list(extra)
        self.start_timeout = start_timeout
        self.log_path = self.out_dir.parent / f"storescp-{self.port}.log" if not self._own_dir else self.out_dir / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        cmd = [_dcmtk("storescp"), "-aet", self.aet, "-od", str(self.out_dir), "-dhl"]
        if self.ignore:
            cmd.append("--ignore")
        elif self.bit_preserving:
            cmd.append("+B")
        if self.accept_all:
            cmd.append("+xa")
        if self.promiscuous:
            cmd.append("-pm")
        if self.max_pdu:
            cmd += ["-pdu", str(self.max_pdu)]
        cmd += self.extra
        cmd.append(str(self.port))
        return cmd

    def start(self) -> "StorescpServer":
        if self.proc is not None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: echoscu(self.host, self.port, self.aet),
                self.start_timeout,
                "storescp",
                proc=self.proc,
                log=self.log_path,
                interval=0.1,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def received_files(self) -> list[Path]:
        """Files storescp wrote so far (excluding its log)."""
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file() and p != self.log_path)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def __enter__(self) -> "StorescpServer":
        return self.start()


EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def _iter_input_files(inputs: Sequence[str | os.PathLike[str]]) -> Iterable[Path]:
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def scan_sop_syntaxes(inputs: Sequence[str | os.PathLike[str]]) -> dict[str, set[str]]:
    """Map SOP Class UID -> transfer syntaxes found in the Part-10 files under ``inputs``.

    Reads only the file meta group (pydicom ``read_file_meta_info``); files that
    are not Part-10 DICOM are skipped (storescu reports them itself).
    """
    from pydicom.filereader import read_file_meta_info  # lazy: only this helper needs pydicom

    found: dict[str, set[str]] = {}
    for path in _iter_input_files(inputs):
        try:
            meta = read_file_meta_info(path)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not DICOM for us
            continue
        sop = str(meta.get("MediaStorageSOPClassUID", "") or "")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        if sop and ts:
            found.setdefault(sop, set()).add(ts)
    return found


def storescu_config(sop_syntaxes: Mapping[str, Iterable[str]], profile: str = "OwnSyntax") -> str:
    """A storescu ``-xf`` configuration proposing each file's own transfer syntax.

    For every SOP class: one presentation context per transfer syntax seen in
    the files (one syntax each, so the SCP can accept them independently) and
    one uncompressed fallback context (Explicit LE, Implicit LE).
    """
    syntaxes: dict[str, str] = {}
    lines_ts = ["[[TransferSyntaxes]]", "[Uncompressed]", f"TransferSyntax1 = {EXPLICIT_LE}", f"TransferSyntax2 = {IMPLICIT_LE}"]
    contexts: list[str] = []
    for sop in sorted(sop_syntaxes):
        for ts in sorted(set(sop_syntaxes[sop])):
            if ts not in syntaxes:
                syntaxes[ts] = f"TS{len(syntaxes) + 1}"
                lines_ts += [f"[{syntaxes[ts]}]", f"TransferSyntax1 = {ts}"]
            contexts.append(f"{sop}\\{syntaxes[ts]}")
        contexts.append(f"{sop}\\Uncompressed")
    if len(contexts) > 128:
        raise PeerError(f"{len(contexts)} presentation contexts needed, DICOM allows 128: send in batches")
    lines_pc = ["[[PresentationContexts]]", "[Contexts]"]
    lines_pc += [f"PresentationContext{i} = {pc}" for i, pc in enumerate(contexts, start=1)]
    lines_profile = ["[[Profiles]]", f"[{profile}]", "PresentationContexts = Contexts"]
    return "\n".join(lines_ts + lines_pc + lines_profile) + "\n"


def run_storescu(
    files_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    extra: Sequence[str] = (),
    timeout: float | None = 600.0,
    own_syntax: bool = True,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Send DICOM files (or directories, recursively) with dcmtk ``storescu`` in one association.

    ``own_syntax=True`` (default): the inputs' file meta is scanned first and a
    storescu configuration (``-xf FILE OwnSyntax``, see :func:`storescu_config`)
    proposes, per SOP class, each file's own transfer syntax plus an
    uncompressed fallback, so every file goes out exactly as stored, compressed
    or not (storescu then sends it without conversion). Without it storescu
    proposes only uncompressed syntaxes (``-R``: only the SOP classes of the
    files) and fails on compressed files it cannot decompress; its built-in
    ``-xs``/``-xr``/``-xv``… flags add only ONE compressed syntax.

    ``+sd +r`` scan directories recursively (storescu expands them, no argv
    limit). ``extra`` goes before the peer address (e.g. ``["-pdu", "131072"]``,
    ``["-v"]``, ``["-nh"]`` to continue after a failed store). Output is
    captured as text; ``returncode`` is non-zero if a store failed.
    """
    if isinstance(files_or_dir, (str, os.PathLike)):
        inputs: list[str | os.PathLike[str]] = [files_or_dir]
    else:
        inputs = list(files_or_dir)
    cmd = [_dcmtk("storescu"), "-aet", calling_aet, "-aec", called_aet]
    if any(Path(p).is_dir() for p in inputs):
        cmd += ["+sd", "+r"]
    cfg_dir: str | None = None
    try:
        if own_syntax:
            cfg_dir = tempfile.mkdtemp(prefix="telepacs-storescu-")
            cfg = Path(cfg_dir) / "storescu.cfg"
            cfg.write_text(storescu_config(scan_sop_syntaxes(inputs)))
            cmd += ["-xf", str(cfg), "OwnSyntax"]
        else:
            cmd += ["-R"]
        cmd += list(extra)
        cmd += [host, str(port)]
        cmd += [os.fspath(p) for p in inputs]
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
            check=check,
        )
    finally:
        if cfg_dir is not None:
            shutil.rmtree(cfg_dir, ignore_errors=True)
