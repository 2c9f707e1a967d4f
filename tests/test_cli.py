"""The `telepacs` command as an operator runs it: import, verify, reindex, serve with several workers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import CT_RAW_DIR, MR_STUDY_DIR, TS_DIR, dicom_files
from tests.peers import free_port, run_storescu

TELEPACS = [sys.executable, "-m", "telepacs.cli"]


def run(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    full_env.update(TELEPACS_DATA_DIR=str(data_dir), **env)
    return subprocess.run(TELEPACS + args, env=full_env, capture_output=True, text=True, timeout=300)


def test_import_verify_reindex(tmp_path):
    data = tmp_path / "data"
    imported = run(["import", "--quiet", str(TS_DIR), str(CT_RAW_DIR)], data)
    assert imported.returncode == 1  # the READMEs and licences in the folders are refused...
    assert "stored: 19" in imported.stdout  # ...and every DICOM file is stored
    assert "refused: " in imported.stderr and "not DICOM" in imported.stderr

    verified = run(["verify", "--quiet"], data)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "checked: 19, missing: 0, corrupt: 0, orphaned: 0" in verified.stdout

    victim = next((data / "objects").rglob("*.dcm"))
    victim.unlink()
    verified = run(["verify", "--quiet"], data)
    assert verified.returncode == 1
    assert "MISSING" in verified.stdout and victim.name in verified.stdout

    (data / "index.sqlite3").unlink()
    for extra in ("index.sqlite3-wal", "index.sqlite3-shm"):
        (data / extra).unlink(missing_ok=True)
    reindexed = run(["reindex", "--quiet"], data)
    assert reindexed.returncode == 0, reindexed.stderr
    assert "indexed: 18, skipped: 0" in reindexed.stdout
    assert run(["verify", "--quiet"], data).returncode == 0


def test_bad_setting_is_reported(tmp_path):
    result = run(["verify"], tmp_path, TELEPACS_DICOM_PORT="eleven")
    assert result.returncode == 2
    assert "configuration error: DICOM port must be an integer" in result.stderr


def test_serve_with_two_workers_on_one_port(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    env.update(TELEPACS_DATA_DIR=str(data), TELEPACS_DICOM_PORT=str(port), TELEPACS_DICOM_HOST="127.0.0.1",
               TELEPACS_DICOM_WORKERS="2", TELEPACS_LOG_LEVEL="INFO")
    log_path = tmp_path / "serve.log"
    log_file = open(log_path, "w")
    serve = subprocess.Popen(TELEPACS + ["serve", "--no-web"], env=env, stdout=subprocess.PIPE, stderr=log_file,
                             text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            lines.append(line)
            if line.startswith("telepacs: data in"):
                break
        assert any("2 receiving processes" in line for line in lines), lines
        workers = subprocess.run(["pgrep", "-f", "-P", str(serve.pid), "dicom_node"], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2

        files = dicom_files(MR_STUDY_DIR / "3D_Ax_T1_MP_RAGE_R22")[:80]
        codes: list[int] = []

        def sender(chunk: list[Path]) -> None:
            for part in (chunk[j::4] for j in range(4)):  # four associations per sender
                codes.append(run_storescu(part, "127.0.0.1", port, "TELEPACS", own_syntax=False).returncode)

        senders = [threading.Thread(target=sender, args=(files[i::4],)) for i in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        assert codes == [0] * 16
        with sqlite3.connect(data / "index.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 80
            assert db.execute("SELECT num_instances FROM studies").fetchone()[0] == 80
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
        log_file.close()
    assert serve.returncode == 0
    # Both workers stored instances: the kernel spread the 16 associations over the shared port.
    storing_pids = {line.split("[")[1].split("]")[0] for line in log_path.read_text().splitlines()
                    if "archive.service: stored" in line}
    assert storing_pids == set(workers)


def test_serve_on_s3_uploads_through_a_separate_drainer(own_s3_server, tmp_path):
    """Workers spool and acknowledge; `telepacs drain` (started by serve) uploads; an outage seen
    by the drainer makes the workers refuse new instances with 0xA700."""
    from s3server import make_s3_store, new_bucket

    data = tmp_path / "data"
    port = free_port()
    bucket = new_bucket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    env.update(TELEPACS_DATA_DIR=str(data), TELEPACS_DICOM_PORT=str(port), TELEPACS_DICOM_HOST="127.0.0.1",
               TELEPACS_DICOM_WORKERS="2", TELEPACS_STORAGE_URL=own_s3_server.url(bucket),
               TELEPACS_LOG_LEVEL="WARNING")
    serve = subprocess.Popen(TELEPACS + ["serve", "--no-web"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    spool_ready = data / "spool" / "ready"
    try:
        while not serve.stdout.readline().startswith("telepacs: data in"):
            assert serve.poll() is None
        files = dicom_files(TS_DIR)
        assert run_storescu(files[:5], "127.0.0.1", port, "TELEPACS").returncode == 0
        deadline = time.monotonic() + 60
        while list(spool_ready.glob("*.data")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(spool_ready.glob("*.data")) == []
        assert len(list(make_s3_store(own_s3_server, bucket).list_keys())) == 5

        own_s3_server.stop()
        run_storescu(files[5:6], "127.0.0.1", port, "TELEPACS")  # may still be spooled: durable locally
        deadline = time.monotonic() + 60
        while not (data / "spool" / "remote-down").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = run_storescu(files[6:7], "127.0.0.1", port, "TELEPACS", extra=["-v"])
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr
        own_s3_server.start()
        deadline = time.monotonic() + 90
        while list(spool_ready.glob("*.data")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(spool_ready.glob("*.data")) == []  # what was acknowledged reached S3 after the outage
    finally:
        own_s3_server.start()
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    with sqlite3.connect(data / "index.sqlite3") as db:
        indexed = {row[0] for row in db.execute("SELECT object_key FROM instances")}
    assert indexed == set(make_s3_store(own_s3_server, bucket).list_keys())
