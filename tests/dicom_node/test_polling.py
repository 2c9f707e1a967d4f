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


def test_guarded_requestor_reactor_never_takes_a_response():
    """The association's own thread sees an empty DIMSE queue; the sender's blocking wait gets the response."""
    messages: queue.Queue = queue.Queue()

    def get_msg(block: bool = False):
        try:
            return messages.get(block=block, timeout=1)
        except queue.Empty:
            return None, None

    seen: list[object] = []

    class Assoc(threading.Thread):
        def __init__(self) -> None:
            super().__init__()
            self.dimse = SimpleNamespace(get_msg=get_msg)
            self.assoc = self

        def run(self) -> None:  # what pynetdicom's reactor does each turn
            seen.append(self.dimse.get_msg(block=False))

    assoc = Assoc()
    polling.guard_requestor(assoc)
    messages.put((1, "C-STORE-RSP"))
    assoc.start()
    assoc.join()
    assert seen == [(None, None)]
    assert assoc.dimse.get_msg(block=True) == (1, "C-STORE-RSP")  # the sender, on another thread
    assert getattr(assoc, polling._GUARDED_ATTR) is True


def test_wake_dul_pokes_only_a_waiting_dul():
    """A DUL busy sending is not poked once per PDU; a waiting one is."""
    dul, _peer = fake_dul()
    reader, _writer = polling._wake_pair(dul)
    polling.wake_dul(dul)  # not waiting: nothing written
    try:
        reader.recv(16)
        raise AssertionError("a DUL that was not waiting was poked")
    except BlockingIOError:
        pass
    setattr(dul, polling._WAITING_ATTR, True)
    polling.wake_dul(dul)
    assert reader.recv(16) == b"\0"
