"""The forwarder: sends queued instances on to their destination AE (the hub), with retries.

One loop, one process (``telepacs forward run``; ``telepacs serve`` starts it
when forward rules exist): scan the catalogue for new instances that match a
rule (:meth:`ForwardQueue.scan`), claim a batch of due queue rows with a lease,
open one association per destination, C-STORE each instance exactly as it is
stored (the presentation context proposed is the instance's own SOP class and
transfer syntax; the file's dataset bytes are streamed unchanged), and mark
each row sent, or back off:

- destination unreachable, association rejected or aborted: the rows stay
  pending and the destination is left alone for the back-off delay
  (``forward.retry_initial`` doubling up to ``forward.retry_max``);
- the destination answers with a failure status, accepts no presentation
  context for the instance, or the instance cannot be read: a refusal; after
  ``forward.max_attempts`` refusals the row is ``failed`` until
  ``telepacs forward retry``.

Several forwarders may run against one catalogue: leases keep them from
sending the same row twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from archive.forward_queue import Backoff, ClaimedItem, ForwardQueue, QueueUnavailable
from archive.index import IndexUnavailable
from archive.service import Archive
from storage import StorageError

log = logging.getLogger(__name__)

MAX_PDU = 1 << 20


def configure_pynetdicom() -> None:
    """Send a file's dataset straight from disk, as stored, instead of decoding and re-encoding it."""
    _config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class _Refusal:
    """Why an instance was not sent; ``rejected`` when the destination (or the instance) is at fault."""

    error: str
    status: int | None = None
    rejected: bool = True


def _status_text(code: int, status: Dataset) -> str:
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    meaning = meaning or category
    comment = str(status.get("ErrorComment", "") or "").strip()
    return f"status 0x{code:04X} ({meaning}{'; ' + comment if comment else ''})"


class Forwarder:
    """Claims due queue rows and sends them; :meth:`run` loops until stopped."""

    def __init__(self, archive: Archive, queue: ForwardQueue, *, owner: str | None = None) -> None:
        self.archive = archive
        self.queue = queue
        settings = archive.settings
        self.settings = settings
        self.rules = settings.forward_rules
        self.backoff = Backoff(settings.forward_retry_initial, settings.forward_retry_max,
                               settings.forward_max_attempts)
        self.owner = owner or f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.work_dir = settings.data_dir / "forward"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._down: dict[str, tuple[int, float]] = {}  # destination -> (consecutive failures, retry at, monotonic)
        self.stop_event = threading.Event()  # run() takes the caller's; checked between instances

    # -- the loop -------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Scan, claim and send until ``stop`` is set; waits ``forward.poll_interval`` when idle."""
        self.stop_event = stop
        configure_pynetdicom()
        self.queue.ensure_cursors(self.rules)
        log.info("forwarder %s: %d rule(s): %s", self.owner, len(self.rules),
                 "; ".join(rule.key for rule in self.rules))
        while not stop.is_set():
            try:
                handled = self.run_once()
            except QueueUnavailable as exc:
                log.error("forwarder: %s; trying again in %.1f s", exc, self.settings.forward_poll_interval)
                handled = 0
            if handled == 0:
                stop.wait(self.settings.forward_poll_interval)
        log.info("forwarder %s stopping", self.owner)

    def run_once(self) -> int:
        """One pass: queue new instances, then send one batch per destination; returns the rows handled."""
        self.queue.scan(self.rules)
        available = self._available_destinations()
        if not available:
            return 0
        unavailable = set(self.settings.move_destinations) - set(available)
        claimed = self.queue.claim(self.owner, self.settings.forward_batch_size, self.settings.forward_lease,
                                   exclude=unavailable)
        by_destination: dict[str, list[ClaimedItem]] = {}
        for item in claimed:
            by_destination.setdefault(item.destination, []).append(item)
        for destination, items in by_destination.items():
            if self.stop_event.is_set():
                self.queue.release([i.id for i in items], self.owner)
                continue
            self._send_batch(destination, items)
        return len(claimed)

    def _available_destinations(self) -> list[str]:
        """Configured destinations not in back-off."""
        now = time.monotonic()
        return [d for d in self.settings.move_destinations
                if d not in self._down or self._down[d][1] <= now]

    # -- one batch ------------------------------------------------------------

    def _send_batch(self, destination: str, items: list[ClaimedItem]) -> None:
        address = self.settings.move_destinations.get(destination)
        if address is None:  # the claim excludes them; a row claimed just before a config change
            self.queue.mark_unsent([i.id for i in items], f"destination {destination} is not configured",
                                   self.backoff)
            return
        present = [i for i in items if i.sop_class_uid and i.transfer_syntax_uid]
        for item in items:
            if item not in present:
                self._unsent(destination, [item], _Refusal(f"instance {item.sop_instance_uid} is no longer in "
                                                           "the archive"))
        if not present:
            return
        claimed_at = time.monotonic()
        assoc = self._associate(destination, address, present)
        if assoc is None:
            return
        sent: list[tuple[int, int]] = []  # marked in one transaction (a crash before it means a resend, not a loss)
        try:
            for n, item in enumerate(present):
                if time.monotonic() - claimed_at > self.settings.forward_lease / 2:
                    self.queue.extend_lease([i.id for i in present[n:]], self.owner, self.settings.forward_lease)
                    claimed_at = time.monotonic()
                if self.stop_event.is_set():  # stopping: what is left goes back to the queue, untried
                    self.queue.release([i.id for i in present[n:]], self.owner)
                    log.info("forward to %s: stopping; %d instance(s) left for later", destination, len(present) - n)
                    return
                if not assoc.is_established:
                    self._destination_down(destination, address, present[n:], "the association was aborted")
                    return
                outcome = self._store(assoc, destination, item)
                if isinstance(outcome, int):
                    sent.append((item.id, outcome))
                    continue
                if not outcome.rejected:
                    self._destination_down(destination, address, present[n:], outcome.error)
                    return
                self._unsent(destination, [item], outcome)
            self._down.pop(destination, None)
        finally:
            if assoc.is_established:
                assoc.release()
            self.queue.mark_sent(sent)

    def _associate(self, destination: str, address: tuple[str, int], items: list[ClaimedItem]
                   ) -> Association | None:
        ae = AE(ae_title=self.settings.ae_title)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 120, 120
        for sop_class, syntax in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items}):
            ae.add_requested_context(str(sop_class), [str(syntax)])
        connected: list[bool] = []
        assoc = ae.associate(address[0], address[1], ae_title=destination, max_pdu=MAX_PDU,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))])
        if assoc.is_established:
            try:
                assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
            except (AttributeError, OSError) as exc:
                log.debug("forward to %s: TCP_NODELAY not set: %s", destination, exc)
            return assoc
        if connected and assoc.rejected_contexts and not assoc.accepted_contexts:
            # It accepted the association but none of our contexts (pynetdicom then aborts it).
            for item in items:
                self._unsent(destination, [item], self._no_context(destination, item))
            return None
        if assoc.is_rejected:
            why = "rejected the association"
        elif connected:
            why = "aborted the association"
        else:
            why = "cannot be reached"
        self._destination_down(destination, address, items, f"{destination} at {address[0]}:{address[1]} {why}")
        return None

    def _store(self, assoc: Association, destination: str, item: ClaimedItem) -> _Refusal | int:
        """C-STORE one instance; the status when sent (success or warning), else why not."""
        sop_class, syntax = UID(str(item.sop_class_uid)), UID(str(item.transfer_syntax_uid))
        if not any(cx.abstract_syntax == sop_class and cx.transfer_syntax and cx.transfer_syntax[0] == syntax
                   for cx in assoc.accepted_contexts):
            return self._no_context(destination, item)
        path = self._local_copy(item)
        if isinstance(path, _Refusal):
            return path
        try:
            status = assoc.send_c_store(path)
        except (ValueError, AttributeError) as exc:  # pynetdicom: no usable context, or missing file meta
            return _Refusal(f"instance {item.sop_instance_uid} cannot be sent: {exc}")
        except RuntimeError as exc:  # the association ended under us
            return _Refusal(f"the association with {destination} ended: {exc}", rejected=False)
        finally:
            path.unlink(missing_ok=True)
        if "Status" not in status:
            return _Refusal(f"{destination} sent no C-STORE response (timeout or abort)", rejected=False)
        code = int(status.Status)
        category = code_to_category(code)
        if category in ("Success", "Warning"):
            level = logging.INFO if category == "Success" else logging.WARNING
            log.log(level, "forwarded %s to %s: %s", item.sop_instance_uid, destination, _status_text(code, status))
            return code
        return _Refusal(f"{destination} refused {item.sop_instance_uid}: {_status_text(code, status)}", code)

    @staticmethod
    def _no_context(destination: str, item: ClaimedItem) -> _Refusal:
        sop_class, syntax = UID(str(item.sop_class_uid)), UID(str(item.transfer_syntax_uid))
        return _Refusal(f"{destination} accepted no presentation context for {sop_class.name} in {syntax.name}")

    def _local_copy(self, item: ClaimedItem) -> Path | _Refusal:
        """The stored object copied to a temporary file (pynetdicom streams a file's dataset from its path)."""
        fd, name = tempfile.mkstemp(prefix="fwd-", suffix=".dcm", dir=self.work_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, self.archive.open_instance(item.sop_instance_uid) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except IndexUnavailable as exc:  # the catalogue is down: the loop waits and tries again
            path.unlink(missing_ok=True)
            raise QueueUnavailable(str(exc)) from None
        except (StorageError, OSError) as exc:
            path.unlink(missing_ok=True)
            return _Refusal(f"instance {item.sop_instance_uid} cannot be read from storage: "
                            f"{type(exc).__name__}: {exc}")
        return path

    # -- outcomes -------------------------------------------------------------

    def _unsent(self, destination: str, items: list[ClaimedItem], refusal: _Refusal) -> None:
        failed = set(self.queue.mark_unsent([i.id for i in items], refusal.error, self.backoff,
                                            status=refusal.status, rejected=refusal.rejected))
        for item in items:
            if item.id in failed:
                log.error("forward of %s to %s failed for good after %d refusal(s): %s "
                          "(`telepacs forward retry` to try again)", item.sop_instance_uid, destination,
                          self.backoff.max_rejections, refusal.error)
            else:
                log.warning("forward of %s to %s not done (attempt %d): %s; retry in %.1f s", item.sop_instance_uid,
                            destination, item.attempts, refusal.error, self.backoff.delay(item.attempts))

    def _destination_down(self, destination: str, address: tuple[str, int], items: list[ClaimedItem],
                          why: str) -> None:
        failures = self._down.get(destination, (0, 0.0))[0] + 1
        delay = self.backoff.delay(failures)
        self._down[destination] = (failures, time.monotonic() + delay)
        self.queue.mark_unsent([i.id for i in items], why, self.backoff, rejected=False)
        log.warning("forward to %s (%s:%d): %s; %d instance(s) wait, next try in %.1f s", destination, *address,
                    why, len(items), delay)


__all__ = ["Forwarder", "configure_pynetdicom"]
