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
        # Set up, serve became the small supervisor (telepacs.supervise): same PID, only the standard library.
        cmdline = Path(f"/proc/{serve.pid}/cmdline").read_bytes().split(b"\0")
        assert b"telepacs.supervise" in cmdline, cmdline
        status = Path(f"/proc/{serve.pid}/status").read_text()
        rss_kib = int(status.split("VmRSS:")[1].split()[0])
        assert rss_kib < 40 * 1024, f"supervisor RSS {rss_kib} KiB"

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


# -- people: facilities, users, tokens, audit -------------------------------------------------------


def _stdin_run(args: list[str], data_dir: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    full_env.update(TELEPACS_DATA_DIR=str(data_dir))
    return subprocess.run(TELEPACS + args, env=full_env, input=stdin, capture_output=True, text=True, timeout=120)


def test_facilities_users_and_tokens_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    added = run(["facility", "add", "bv-huyen-a", "--name", "Bệnh viện huyện A", "--tier", "district",
                 "--ae", "CT_HUYEN_A", "--ae", "CR_HUYEN_A"], data)
    assert added.returncode == 0, added.stderr
    assert "facility BV-HUYEN-A (district) added with AE title(s) CT_HUYEN_A, CR_HUYEN_A" in added.stdout
    again = run(["facility", "add", "BV-HUYEN-A"], data)
    assert again.returncode == 1 and "facility BV-HUYEN-A already exists" in again.stderr
    taken = run(["facility", "add", "BV-HUYEN-B", "--ae", "CT_HUYEN_A"], data)
    assert taken.returncode == 1 and "CT_HUYEN_A already belongs to facility BV-HUYEN-A" in taken.stderr
    assert run(["facility", "add", "X", "--tier", "village"], data).returncode == 2  # argparse: not a tier
    assert run(["facility", "ae", "BV-HUYEN-A", "US_HUYEN_A"], data).returncode == 0
    listing = run(["facility", "list"], data).stdout
    assert "BV-HUYEN-A" in listing and "CR_HUYEN_A,CT_HUYEN_A,US_HUYEN_A" in listing
    assert "BV-HUYEN-B" not in listing  # the refused add left nothing behind (one transaction)

    user = _stdin_run(["user", "add", "BS.Lan", "--facility", "BV-HUYEN-A", "--role", "requester",
                       "--name", "BS. Trần Thị Lan"], data, "một mật khẩu dài\n")
    assert user.returncode == 0, user.stderr
    assert "user bs.lan (requester) added to facility BV-HUYEN-A" in user.stdout
    weak = _stdin_run(["user", "add", "bs.nam", "--facility", "BV-HUYEN-A", "--role", "specialist"], data, "short\n")
    assert weak.returncode == 1 and "at least 10 characters" in weak.stderr
    nowhere = _stdin_run(["user", "add", "bs.nam", "--facility", "NOWHERE", "--role", "specialist"], data,
                         "một mật khẩu dài\n")
    assert nowhere.returncode == 1 and "no facility 'NOWHERE'" in nowhere.stderr
    generated = run(["user", "add", "admin2", "--facility", "BV-HUYEN-A", "--role", "admin", "--random-password"],
                    data)
    assert generated.returncode == 0 and generated.stdout.startswith("password: ")

    token = run(["token", "create", "bs.lan", "--name", "workstation"], data)
    assert token.returncode == 0
    secret = token.stdout.split(": ", 1)[1].split()[0]
    assert secret.startswith("tp_") and len(secret) > 40
    with sqlite3.connect(data / "index.sqlite3") as db:
        stored = [row[0] for row in db.execute("SELECT token_sha256 FROM api_tokens")]
    assert secret not in stored and len(stored) == 1  # only its SHA-256 is kept
    tokens = run(["token", "list"], data).stdout
    assert "bs.lan" in tokens and "active" in tokens and secret not in tokens
    assert run(["token", "revoke", "1"], data).returncode == 0
    assert "revoked" in run(["token", "list", "--user", "bs.lan"], data).stdout
    missing = run(["token", "revoke", "99"], data)
    assert missing.returncode == 1 and "no token 99" in missing.stderr

    passwd = _stdin_run(["user", "passwd", "bs.lan", "--password-stdin"], data, "mật khẩu mới dài hơn\n")
    assert passwd.returncode == 0 and "password of bs.lan changed" in passwd.stdout
    assert run(["user", "disable", "bs.lan"], data).returncode == 0
    users = run(["user", "list"], data).stdout
    assert any(line.startswith("bs.lan") and "disabled" in line for line in users.splitlines()), users
    assert run(["user", "disable", "nobody"], data).returncode == 1

    verified = run(["audit", "verify"], data)
    assert verified.returncode == 0, verified.stdout
    assert "audit chain intact" in verified.stdout


def test_audit_verify_finds_tampering(tmp_path):
    data = tmp_path / "data"
    assert run(["facility", "add", "BV-TINH", "--tier", "provincial"], data).returncode == 0
    for name in ("bs.an", "bs.binh", "bs.chi"):
        assert _stdin_run(["user", "add", name, "--facility", "BV-TINH", "--role", "specialist"], data,
                          "một mật khẩu dài\n").returncode == 0
    intact = run(["audit", "verify"], data)
    assert intact.returncode == 0 and "4 entries verified" in intact.stdout
    with sqlite3.connect(data / "index.sqlite3") as db:
        last_id, last_hash = db.execute("SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    assert f"head: entry {last_id} {last_hash}" in intact.stdout  # to keep outside, against truncation
    with sqlite3.connect(data / "index.sqlite3") as db:  # someone edits the log behind telepacs' back
        db.execute("UPDATE audit_log SET detail = '{\"role\": \"admin\", \"facility\": \"BV-TINH\"}' WHERE id = 3")
    broken = run(["audit", "verify"], data)
    assert broken.returncode == 1
    assert "AUDIT CHAIN BROKEN at entry 3: content changed after it was written (2 entries before it verified)" \
        in broken.stdout
    with sqlite3.connect(data / "index.sqlite3") as db:
        db.execute("UPDATE audit_log SET detail = '{\"role\": \"specialist\", \"facility\": \"BV-TINH\"}' "
                   "WHERE id = 3")
    assert run(["audit", "verify"], data).returncode == 0  # put back exactly: the chain holds again
    with sqlite3.connect(data / "index.sqlite3") as db:
        db.execute("DELETE FROM audit_log WHERE id = 2")
    deleted = run(["audit", "verify"], data)
    assert deleted.returncode == 1 and "AUDIT CHAIN BROKEN at entry 3: link broken" in deleted.stdout


def test_serve_creates_the_first_admin_once(tmp_path):
    from archive import people
    from archive.config import load_settings
    from archive.db import make_engine
    from archive.index import CatalogIndex
    from telepacs.cli import bootstrap_admin

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    env.update(TELEPACS_DATA_DIR=str(data), TELEPACS_DICOM_PORT=str(free_port()), TELEPACS_DICOM_HOST="127.0.0.1",
               TELEPACS_LOCAL_TIER="district")
    serve = subprocess.Popen(TELEPACS + ["serve", "--no-web"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        while not (lines and lines[-1].startswith("telepacs: data in")):
            lines.append(serve.stdout.readline())
            assert serve.poll() is None, lines
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
    printed = "".join(lines)
    assert "created facility LOCAL and user 'admin'" in printed
    secret_file = data / "initial-admin-password"
    password = secret_file.read_text().strip()
    assert password in printed and len(password) >= 20
    assert secret_file.stat().st_mode & 0o777 == 0o600
    settings = load_settings(env={"TELEPACS_DATA_DIR": str(data)})
    engine = make_engine(settings.db_url)
    try:
        index = CatalogIndex(engine)
        with index.write_session() as session, session.begin():
            assert people.authenticate(session, "admin", password).ok
            assert people.get_facility(session, "LOCAL").tier == "district"
            assert people.get_user(session, "admin").role == "admin"
        assert bootstrap_admin(engine, settings) is None  # users exist: nothing created, nothing printed
    finally:
        engine.dispose()
    assert len(run(["user", "list"], data).stdout.strip().splitlines()) == 2  # the header and admin
