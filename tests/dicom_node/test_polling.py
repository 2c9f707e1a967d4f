"""The event-driven reactor waits: prompt when something arrives, quiet when nothing does."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from dicom_node import polling


def fake_dul() -> tuple[SimpleNamespace, socket.socket]:
    ours, peer = socket.socketpair()
    dul = SimpleNamespace(to_provider_queue=queue.Queue(), event_queue=queue.Queue(),
                          socket=SimpleNamespace(socket=ours))
    return dul, peer


def later(delay: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), action()))
    thread.start()
    return thread


def test_dul_wait_times_out_when_idle():
    dul, _peer = fake_dul()
    start = time.monotonic()
    polling.dul_wait(dul, timeout=0.05)
    assert 0.04 <= time.monotonic() - start < 0.5


def test_dul_wait_wakes_on_incoming_data():
    dul, peer = fake_dul()
    t = later(0.02, lambda: peer.send(b"PDU"))
    start = time.monotonic()
    polling.dul_wait(dul, timeout=5)
    assert time.monotonic() - start < 1.0
    t.join()


def test_dul_wait_wakes_when_a_primitive_is_queued():
    dul, _peer = fake_dul()
    polling._wake_pair(dul)

    def send_primitive() -> None:
        dul.to_provider_queue.put("P-DATA")
        polling.wake_dul(dul)

    t = later(0.02, send_primitive)
    start = time.monotonic()
    polling.dul_wait(dul, timeout=5)
    assert time.monotonic() - start < 1.0
    t.join()
    # Work already queued: no wait at all.
    start = time.monotonic()
    polling.dul_wait(dul, timeout=5)
    assert time.monotonic() - start < 0.01


def test_reactor_wait_wakes_on_dimse_message_and_times_out_otherwise():
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=queue.Queue()))
    start = time.monotonic()
    polling.reactor_wait(assoc, timeout=0.05)
    assert 0.04 <= time.monotonic() - start < 0.5
    t = later(0.02, lambda: assoc.dimse.msg_queue.put((1, "C-STORE-RQ")))
    start = time.monotonic()
    polling.reactor_wait(assoc, timeout=5)
    assert time.monotonic() - start < 1.0
    t.join()


def test_other_sleeps_are_left_alone():
    polling.install()
    import pynetdicom.dul

    start = time.monotonic()
    pynetdicom.dul.time.sleep(0.03)  # not the reactor's 1 ms poll: a real sleep
    assert time.monotonic() - start >= 0.03


IDLE_PEER = """
import sys, time
from pynetdicom import AE
ae = AE(ae_title="IDLER")
ae.add_requested_context("1.2.840.10008.1.1")
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title=sys.argv[2])
assert assoc.is_established
print("up", flush=True)
time.sleep(float(sys.argv[3]))
assoc.release()
"""


def test_idle_association_costs_almost_no_cpu(node):
    """An association that stays open with nothing to do must not keep the node busy."""
    s = node.settings
    peer = subprocess.Popen([sys.executable, "-c", IDLE_PEER, str(s.dicom_port), s.ae_title, "3"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "up"
        time.sleep(0.5)  # past the association's start-up
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(1.5)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
    finally:
        peer.wait(timeout=30)
    # Stock pynetdicom wakes two threads 1,000 times a second each; here a few dozen.
    assert cpu / wall < 0.05, f"{cpu / wall:.1%} of a core while idle"
