"""Forwarding to a real dcmtk storescp: a destination down at first, a telepacs restart, a refused SOP class."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from archive.forward_queue import ForwardQueue
from archive.index import Source
from archive.service import Archive
from dicom_node.forwarding import Forwarder
from helpers import TS_DIR, dicom_files, make_settings, part10_dataset_bytes, read_uids
from tests.peers import StorescpServer, free_port, run_storescu

TELEPACS = [sys.executable, "-m", "telepacs.cli"]
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def originals(folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of the Part 10 files in ``folder``."""
    return {read_uids(p)[2]: part10_dataset_bytes(p) for p in sorted(folder.iterdir())}


def received(storescp: StorescpServer) -> dict[str, bytes]:
    return {read_uids(p)[2]: part10_dataset_bytes(p) for p in storescp.received_files()}


def forwarding_archive(tmp_path: Path, hub_port: int, **overrides: Any) -> Archive:
    overrides.setdefault("forward_rules", "HUB:calling_ae=CT1,modality=CT")
    overrides.setdefault("forward_retry_initial", 0.05)
    overrides.setdefault("forward_retry_max", 0.2)
    return Archive.open(make_settings(
        tmp_path, move_destinations=f"HUB=127.0.0.1:{hub_port}", forward_max_attempts=2,
        forward_poll_interval=0.05, **overrides))


def import_as(archive: Archive, folder: Path, ae: str) -> None:
    for path in dicom_files(folder):
        archive.ingest_file(path, Source("dicom", ae_title=ae, host="127.0.0.1"))


def test_forwarder_waits_for_a_destination_that_is_down_then_sends_everything_as_stored(
        tmp_path, db_url, ct_part10_dir):
    hub_port = free_port()
    # Back-off of 2 s: long enough to see the destination left alone, short enough for a test.
    archive = forwarding_archive(tmp_path, hub_port, db_url=db_url, forward_retry_initial=2.0, forward_retry_max=2.0)
    queue = ForwardQueue(archive.index.engine)
    forwarder = Forwarder(archive, queue, owner="test-forwarder")
    queue.ensure_cursors(archive.settings.forward_rules)
    try:
        import_as(archive, ct_part10_dir, "CT1")
        import_as(archive, TS_DIR, "CT1")  # MR and secondary captures: the rule wants CT only

        assert forwarder.run_once() == 10  # the hub is down: all claimed, none sent
        (status,) = queue.status()
        assert (status.destination, status.pending, status.sent, status.failed) == ("HUB", 10, 0, 0)
        assert status.last_error == f"HUB at 127.0.0.1:{hub_port} cannot be reached"
        assert forwarder.run_once() == 0  # the destination is in back-off

        with StorescpServer(out_dir=tmp_path / "hub", aet="HUB", port=hub_port) as hub:
            wait_for(lambda: forwarder.run_once() == 0 and queue.status()[0].pending == 0, 30, "the queue to drain")
            (status,) = queue.status()
            assert (status.pending, status.sent, status.failed) == (0, 10, 0)
            assert received(hub) == originals(ct_part10_dir)  # dataset-identical, in their stored syntax
    finally:
        archive.close()


def test_destination_refusing_the_sop_class_ends_in_failed_with_the_reason(tmp_path, ct_part10_dir, caplog):
    hub_port = free_port()
    archive = forwarding_archive(tmp_path, hub_port, forward_rules="HUB:*")
    queue = ForwardQueue(archive.index.engine)
    forwarder = Forwarder(archive, queue)
    queue.ensure_cursors(archive.settings.forward_rules)
    config = tmp_path / "mr-only.cfg"
    config.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = 1.2.840.10008.1.2.1\n"
        "TransferSyntax2 = 1.2.840.10008.1.2\n"
        "[[PresentationContexts]]\n[MROnly]\n"
        f"PresentationContext1 = {MR_IMAGE_STORAGE}\\Uncompressed\nPresentationContext2 = {VERIFICATION}\\Uncompressed\n"
        "[[Profiles]]\n[MROnly]\nPresentationContexts = MROnly\n")
    try:
        with StorescpServer(out_dir=tmp_path / "hub", aet="HUB", port=hub_port, accept_all=False,
                            promiscuous=False, extra=["-xf", str(config), "MROnly"]) as hub:
            import_as(archive, ct_part10_dir, "CT1")
            wait_for(lambda: forwarder.run_once() == 0 and queue.status()[0].failed == 10, 30,
                     "every CT instance to be failed")
            (status,) = queue.status()
            assert (status.pending, status.sent, status.failed) == (0, 0, 10)
            assert status.last_error == "HUB accepted no presentation context for CT Image Storage in " \
                                        "Implicit VR Little Endian"
            assert hub.received_files() == []
        assert "failed for good after 2 refusal(s): HUB accepted no presentation context" in caplog.text
        assert queue.retry("HUB") == 10  # the admin fixed the hub's configuration
        assert queue.status()[0].pending == 10
    finally:
        archive.close()


# -- the whole thing: telepacs serve, dcmtk storescu in, dcmtk storescp out -------------------------------


def _env(data: Path, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    env.update(TELEPACS_DATA_DIR=str(data), TELEPACS_CONFIG=str(config), TELEPACS_LOG_LEVEL="INFO")
    return env


def forward_status(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(TELEPACS + ["forward", "status", "--json"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    return rows[0] if rows else {}


class Serve:
    """``telepacs serve --no-web`` in its own process group, its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(TELEPACS + ["serve", "--no-web"], env=self.env, stdout=subprocess.PIPE,
                                         stderr=log, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        lines = []
        while not (line := self.proc.stdout.readline()).startswith("telepacs: data in"):
            lines.append(line)
            assert line or self.proc.poll() is None, f"serve exited: {lines} {self.log_path.read_text()}"
        assert any(line.startswith("telepacs: forwarding: HUB:calling_ae=CT1,modality=CT") for line in lines), lines

    def stop(self) -> int:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code


@pytest.fixture
def serve_config(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, int]]:
    port, hub_port = free_port(), free_port()
    config = tmp_path / "telepacs.toml"
    config.write_text(
        f"[dicom]\nhost = \"127.0.0.1\"\nport = {port}\n"
        f"[dicom.destinations]\nHUB = \"127.0.0.1:{hub_port}\"\n"
        "[forward]\nretry_initial = 0.2\nretry_max = 1.0\npoll_interval = 0.1\n"
        "[[forward.rules]]\ndestination = \"HUB\"\ncalling_ae = \"CT1\"\nmodality = \"CT\"\n")
    yield _env(tmp_path / "data", config), port, hub_port


def test_forwarding_survives_a_down_destination_and_a_telepacs_restart(tmp_path, serve_config, ct_part10_dir):
    env, port, hub_port = serve_config
    serve = Serve(env, tmp_path / "serve.log")
    serve.start()
    try:
        sent = run_storescu(ct_part10_dir, "127.0.0.1", port, "TELEPACS", calling_aet="CT1")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        other = run_storescu(dicom_files(TS_DIR), "127.0.0.1", port, "TELEPACS", calling_aet="MR1")
        assert other.returncode == 0, other.stdout + other.stderr

        status = wait_for(lambda: (s := forward_status(env)).get("last_error") and s, 30,
                          "the forwarder to find the hub down")
        assert (status["pending"], status["sent"], status["failed"]) == (10, 0, 0)
        assert status["last_error"] == f"HUB at 127.0.0.1:{hub_port} cannot be reached"
        assert status["oldest_pending_age_seconds"] >= 0 and status["next_retry"]
        assert serve.stop() == 0
    finally:
        if serve.proc is not None:
            serve.stop()

    # telepacs is down; so is the hub. The queue is in the catalogue.
    table = subprocess.run(TELEPACS + ["forward", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["DESTINATION", "PENDING", "SENT", "FAILED"]
    assert row.split()[:4] == ["HUB", "10", "0", "0"] and "cannot be reached" in row

    with StorescpServer(out_dir=tmp_path / "hub", aet="HUB", port=hub_port) as hub:
        serve.start()
        try:
            status = wait_for(lambda: (s := forward_status(env)).get("sent") == 10 and s, 60,
                              "the ten CT instances to reach the hub")
            assert (status["pending"], status["failed"], status["oldest_pending_age_seconds"]) == (0, 0, None)
            assert received(hub) == originals(ct_part10_dir)  # byte for byte (datasets), and only the CT series
        finally:
            assert serve.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    some_uid = next(iter(originals(ct_part10_dir)))
    assert f"forwarded {some_uid} to HUB: status 0x0000 (Success)" in log
    retried = subprocess.run(TELEPACS + ["forward", "retry", "--destination", "HUB"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert retried.returncode == 0 and retried.stdout.strip() == "0 failed instance(s) queued again for HUB"


def test_rule_naming_an_unknown_destination_stops_telepacs_with_a_clear_error(tmp_path, serve_config):
    env, _, _ = serve_config
    env = {**env, "TELEPACS_FORWARD_RULES": "NOWHERE:modality=CT"}
    result = subprocess.run(TELEPACS + ["serve", "--no-web"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configuration error: forward rule NOWHERE:modality=CT names destination NOWHERE, which is not in " \
           "[dicom.destinations] (HUB)" in result.stderr


def test_a_stopping_forwarder_gives_its_claimed_rows_back(tmp_path, ct_part10_dir):
    archive = forwarding_archive(tmp_path, free_port())
    queue = ForwardQueue(archive.index.engine)
    forwarder = Forwarder(archive, queue)
    queue.ensure_cursors(archive.settings.forward_rules)
    try:
        import_as(archive, ct_part10_dir, "CT1")
        forwarder.stop_event.set()  # SIGTERM arrives as the pass claims its batch
        assert forwarder.run_once() == 10
        rows = queue.items("HUB")
        assert len(rows) == 10
        assert {(r["state"], r["attempts"], r["claimed_by"]) for r in rows} == {("pending", 0, None)}
    finally:
        archive.close()


def test_failure_status_from_the_destination_is_retried_then_failed_with_its_meaning(tmp_path, ct_part10_dir):
    """A destination answering C-STORE with 0xA700 (here a pynetdicom SCP: dcmtk's storescp cannot be told to)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    hub_port = free_port()
    scp = AE(ae_title="HUB")
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax)
    calls: list[str] = []

    def refuse(event):
        calls.append(event.request.AffectedSOPInstanceUID)
        return 0xA700  # Refused: Out of Resources

    server = scp.start_server(("127.0.0.1", hub_port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    archive = forwarding_archive(tmp_path, hub_port)
    queue = ForwardQueue(archive.index.engine)
    forwarder = Forwarder(archive, queue)
    queue.ensure_cursors(archive.settings.forward_rules)
    try:
        path = dicom_files(ct_part10_dir)[0]
        archive.ingest_file(path, Source("dicom", ae_title="CT1", host="127.0.0.1"))
        wait_for(lambda: forwarder.run_once() == 0 and queue.status()[0].failed == 1, 30, "the instance to fail")
        (status,) = queue.status()
        assert status.last_error == f"HUB refused {read_uids(path)[2]}: status 0xA700 (Refused: Out of Resources)"
        assert calls == [read_uids(path)[2]] * 2  # forward.max_attempts
        assert queue.items("HUB")[0]["last_status"] == 0xA700
    finally:
        server.shutdown()
        archive.close()
