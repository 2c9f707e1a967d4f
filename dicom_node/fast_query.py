"""C-FIND and C-MOVE on telepacs' own upper layer (:mod:`dicom_node.fast_store`).

The query logic is :mod:`dicom_node.handlers`' own — identifier checks,
matching in :mod:`archive.query`, refusals and their log lines:

- C-FIND runs :func:`handlers.handle_find` with :class:`QueryEvent`, just the
  part of a pynetdicom event it reads; each pending response goes out as one
  PDU (command and identifier), and a C-CANCEL is read between responses.
- C-MOVE reads the matches with the helpers of :func:`handlers.handle_move`
  and sends every stored object over a C-STORE sub-association
  (:class:`StoreSubAssociation`): the bytes after the file meta group go out
  unchanged, as stored, in PDUs of the destination's size — never decoded,
  never re-encoded, so what arrives is byte for byte what was received.

Message layouts: PS3.7 9.3.2 (C-FIND), 9.3.4 (C-MOVE), 9.3.1 (C-STORE);
statuses PS3.4 C.4.1.1.4 and C.4.2.1.5.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from types import SimpleNamespace
from typing import Any, BinaryIO, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context

from archive.dataset import dataset_offset
from archive.index import IndexUnavailable
from archive.service import Archive
from dicom_node import handlers
from dicom_node.identifiers import Identifier, encode_elements, read_raw_identifier, response_dataset
from dicom_node.dimse import (
    APPLICATION_CONTEXT_NAME,
    C_FIND_RSP,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    DATA_SET_PRESENT,
    NO_DATA_SET,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_HEADER,
    PDU_P_DATA_TF,
    PDU_RELEASE_RP,
    PDV_HEADER,
    RELEASE_RQ_PDU,
    PduSocket,
    PeerGone,
    ProtocolError,
    abort_pdu,
    ae,
    encode_command,
    peer_max_pdu,
    uid,
    us,
    user_information,
)
from storage import StorageError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # Pending: optional keys not supported (PS3.4 C.4.1.1.4)
CANCEL = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702
SUB_OPERATIONS_WITH_FAILURES = 0xB000
UNABLE_TO_PROCESS = 0xC000
_STORE_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})  # PS3.4 B.2.3
_SUB_ASSOCIATION_MAX_PDU = 1 << 16  # we only read C-STORE-RSPs on it


class Association(Protocol):
    """What the C-FIND and C-MOVE services need of the association they answer on."""

    link: PduSocket
    archive: Archive
    calling_ae: str
    host: str
    timeout: float

    def peer(self) -> str: ...

    def transfer_syntax(self, context_id: int) -> str: ...

    def cancel_requested(self, message_id: int) -> bool: ...


def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a negotiated transfer syntax, for identifiers."""
    ts = UID(transfer_syntax)
    return bool(ts.is_implicit_VR), bool(ts.is_little_endian), bool(ts.is_deflated)


class QueryEvent:
    """The part of a pynetdicom C-FIND/C-MOVE event that :mod:`dicom_node.handlers` reads."""

    def __init__(self, assoc: Association, message_id: int, sop_class_uid: str, transfer_syntax: str,
                 raw_identifier: bytes, move_destination: str = "") -> None:
        self.request = SimpleNamespace(AffectedSOPClassUID=sop_class_uid, MoveDestination=move_destination)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=assoc.calling_ae, address=assoc.host))
        self._association = assoc
        self._message_id = message_id
        self._transfer_syntax = transfer_syntax
        self._raw_identifier = raw_identifier

    @cached_property
    def identifier(self) -> Identifier | Dataset:
        """Read when first asked for, inside the handlers' own error handling (a bad one gets 0xC000)."""
        implicit, little, deflated = _encoding(self._transfer_syntax)
        if little and not deflated:
            identifier = read_raw_identifier(self._raw_identifier, implicit)
            if identifier is not None:
                return identifier
        return decode(BytesIO(self._raw_identifier), implicit, little, deflated)

    @property
    def is_cancelled(self) -> bool:
        return self._association.cancel_requested(self._message_id)


# -- C-FIND -------------------------------------------------------------------


def find_response(request_message_id: int, sop_class_uid: str, status: int, with_identifier: bool) -> bytes:
    """C-FIND-RSP (PS3.7 9.3.2.2)."""
    return encode_command([
        (0x0002, uid(sop_class_uid)),
        (0x0100, us(C_FIND_RSP)),
        (0x0120, us(request_message_id)),
        (0x0800, us(DATA_SET_PRESENT if with_identifier else NO_DATA_SET)),
        (0x0900, us(status)),
    ])


def serve_find(assoc: Association, message_id: int, sop_class_uid: str, context_id: int,
               raw_identifier: bytes) -> None:
    """Answer one C-FIND-RQ: a pending response per match, then the final status."""
    ts = assoc.transfer_syntax(context_id)
    implicit, little, deflated = _encoding(ts)
    event = QueryEvent(assoc, message_id, sop_class_uid, ts, raw_identifier)
    responses = handlers.find_matches(cast(Any, event), assoc.archive)
    final = SUCCESS
    sent = 0
    try:
        for status, elements in responses:
            if status not in (PENDING, PENDING_WARNING):
                final = status
                break
            data = None
            if elements is not None:
                data = encode_elements(elements, implicit) if little and not deflated else None
                if data is None:
                    data = encode(response_dataset(elements), implicit, little, deflated)
            if data is None:
                log.error("C-FIND from %s: a matching identifier could not be encoded in %s", assoc.peer(), ts)
                final = UNABLE_TO_PROCESS
                break
            # The first match goes out at once; the next ones in batches (the final response flushes them).
            assoc.link.send_message(context_id, find_response(message_id, sop_class_uid, status, True), data,
                                    hold=sent > 0)
            sent += 1
    except (PeerGone, ProtocolError, OSError):
        raise
    except Exception:  # noqa: BLE001 - a bug must cost this query, not the association
        log.exception("C-FIND from %s failed (0xC000)", assoc.peer())
        final = UNABLE_TO_PROCESS
    finally:
        responses.close()
    assoc.link.send_message(context_id, find_response(message_id, sop_class_uid, final, False))


# -- C-MOVE -------------------------------------------------------------------


class DestinationError(Exception):
    """The move destination cannot be associated with, or broke the sub-association."""


class SubOperationFailed(Exception):
    """One C-STORE sub-operation could not be attempted (object unreadable, no accepted context)."""


@dataclass
class SubOperations:
    """The counts every C-MOVE response carries (PS3.7 9.3.4.2), and the failed instances."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def record(self, sop_instance_uid: str, status: int | None) -> None:
        """Count one sub-operation by its C-STORE-RSP status (None: it could not be attempted)."""
        self.remaining -= 1
        if status == SUCCESS:
            self.completed += 1
        elif status in _STORE_WARNINGS:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_instance_uid)

    def fail_rest(self, matches: list[handlers.RetrieveMatch]) -> None:
        """Count every sub-operation not yet done as failed (the last ``remaining`` of ``matches``)."""
        for left in matches[len(matches) - self.remaining:]:
            self.record(left.sop_instance_uid, None)

    def final_status(self) -> int:
        if self.failed and not self.completed and not self.warning:
            return UNABLE_TO_PERFORM_SUB_OPERATIONS
        if self.failed or self.warning:
            return SUB_OPERATIONS_WITH_FAILURES
        return SUCCESS


def move_response(request_message_id: int, sop_class_uid: str, status: int, counts: SubOperations | None,
                  with_identifier: bool = False) -> bytes:
    """C-MOVE-RSP (PS3.7 9.3.4.2): remaining sub-operations only in pending and cancel responses."""
    elements = [
        (0x0002, uid(sop_class_uid)),
        (0x0100, us(C_MOVE_RSP)),
        (0x0120, us(request_message_id)),
        (0x0800, us(DATA_SET_PRESENT if with_identifier else NO_DATA_SET)),
        (0x0900, us(status)),
    ]
    if counts is not None:
        if status in (PENDING, CANCEL):
            elements.append((0x1020, us(counts.remaining)))
        elements += [(0x1021, us(counts.completed)), (0x1022, us(counts.failed)), (0x1023, us(counts.warning))]
    return encode_command(elements)


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def data_set_lead(stream: BinaryIO) -> bytes:
    """Read a stored Part 10 object past its file meta group; the data set's first bytes read with it.

    The meta group is walked element by element (Explicit VR Little Endian,
    PS3.10 7.1) rather than trusted to its group length, from one read of
    the head, so that objects streamed from S3 (not seekable) work too;
    anything unusual is left to pydicom on a seekable stream.
    """
    head = stream.read(132 + 4096)
    if head[128:132] == b"DICM":
        position = 132
        while position + 8 <= len(head):
            if head[position:position + 2] != b"\x02\x00":
                return head[position:]
            if head[position + 4:position + 6] in _LONG_VRS:
                position += 12 + int.from_bytes(head[position + 8:position + 12], "little")
            else:
                position += 8 + int.from_bytes(head[position + 6:position + 8], "little")
    if not stream.seekable():
        raise ValueError("no file meta group that can be read in the first 4 KB")
    stream.seek(dataset_offset(stream))
    return b""


_SEND_WINDOW = 1 << 20


def _read_full(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``stream``; the bytes read (fewer only at the end of the stream)."""
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not count:
            break
        filled += count
    return filled


class StoreSubAssociation:
    """A C-STORE SCU association with a move destination, sending stored objects as they are."""

    def __init__(self, link: PduSocket, contexts: dict[tuple[str, str], int]) -> None:
        self.link = link
        self.contexts = contexts  # (SOP class, transfer syntax) -> accepted context ID
        self._message_id = 0
        self._windows: tuple[memoryview, memoryview] | None = None

    @classmethod
    def open(cls, address: tuple[str, int], calling_ae: str, called_ae: str, pairs: list[tuple[str, str]],
             timeout: float) -> StoreSubAssociation:
        """Associate, proposing one context per (SOP class, transfer syntax); :class:`DestinationError` if refused."""
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            raise DestinationError(f"cannot connect to {address[0]}:{address[1]}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proposed: dict[int, tuple[str, str]] = {}
            primitive = A_ASSOCIATE()
            primitive.application_context_name = APPLICATION_CONTEXT_NAME
            primitive.calling_ae_title = calling_ae
            primitive.called_ae_title = called_ae
            contexts = []
            for number, (sop_class, ts) in enumerate(pairs):
                context = build_context(sop_class, [ts])
                context.context_id = 2 * number + 1
                proposed[context.context_id] = (sop_class, ts)
                contexts.append(context)
            primitive.presentation_context_definition_list = contexts
            primitive.user_information = user_information(_SUB_ASSOCIATION_MAX_PDU)
            rq = A_ASSOCIATE_RQ()
            rq.from_primitive(primitive)
            sock.sendall(bytes(rq.encode()))
            link = PduSocket(sock, _SUB_ASSOCIATION_MAX_PDU, 0, timeout)
            pdu_type, length = link.read_pdu()
            if pdu_type == PDU_ASSOCIATE_RJ:
                result, source, reason = bytes(link.view[1:4])
                raise DestinationError(f"{called_ae} rejected the association "
                                       f"(result {result}, source {source}, reason {reason})")
            if pdu_type != PDU_ASSOCIATE_AC:
                raise DestinationError(f"{called_ae} answered the association request with PDU type 0x{pdu_type:02X}")
            ac = A_ASSOCIATE_AC()
            ac.decode(PDU_HEADER.pack(pdu_type, length) + bytes(link.view[:length]))
            answer = ac.to_primitive()
            peer_max = peer_max_pdu(answer.user_information)
            link.send_limit = peer_max if peer_max > 0 else link.send_limit
            accepted = {proposed[cx.context_id]: cx.context_id
                        for cx in answer.presentation_context_definition_results_list
                        if cx.result == 0x00 and cx.context_id in proposed}
        except (OSError, PeerGone, ProtocolError, ValueError, struct.error) as exc:
            sock.close()
            raise DestinationError(f"association with {called_ae} failed: {type(exc).__name__}: {exc}") from None
        except DestinationError:
            sock.close()
            raise
        return cls(link, accepted)

    def store(self, match: handlers.RetrieveMatch, stream: BinaryIO, originator_ae: str,
              originator_message_id: int) -> int:
        """Send one stored instance from its open ``stream`` (closed here); the destination's C-STORE-RSP status.

        :class:`SubOperationFailed` when it cannot be sent (the association
        stays usable), :class:`DestinationError` when the association broke.
        """
        with stream:
            key = (match.sop_class_uid or "", match.transfer_syntax or "")
            context_id = self.contexts.get(key)
            if context_id is None:
                raise SubOperationFailed(f"the destination accepted no presentation context for {key[0]} in {key[1]}")
            try:
                lead = data_set_lead(stream)
            except (StorageError, OSError, ValueError, EOFError, struct.error) as exc:
                raise SubOperationFailed(f"is not a readable Part 10 object: {type(exc).__name__}: {exc}") from None
            self._message_id = self._message_id % 0xFFFF + 1  # US, 1..65535
            message_id = self._message_id
            command = encode_command([
                (0x0002, uid(key[0])),
                (0x0100, us(C_STORE_RQ)),
                (0x0110, us(message_id)),
                (0x0700, us(0x0000)),  # Priority: medium
                (0x0800, us(DATA_SET_PRESENT)),
                (0x1000, uid(match.sop_instance_uid)),
                (0x1030, ae(originator_ae)),
                (0x1031, us(originator_message_id)),
            ])
            try:
                self._send_data_set(context_id, command, lead, stream)
                _, response = self.link.read_command()
            except (OSError, PeerGone, ProtocolError) as exc:
                raise DestinationError(f"the sub-association broke: {type(exc).__name__}: {exc}") from None
        if response.field != C_STORE_RSP or response.responded_to != message_id:
            raise DestinationError(f"expected the C-STORE-RSP to message {message_id}, got command "
                                   f"0x{response.field:04X} to {response.responded_to}")
        return response.status

    def _send_data_set(self, context_id: int, command: bytes, lead: bytes, stream: BinaryIO) -> None:
        """The command, then the data set (``lead``, then the rest of ``stream``) in PDUs, the last marked last.

        The object is read a window (about 1 MB) at a time into two reused
        buffers — the next window is read before the current one is sent, to
        know which fragment is the last — and each window goes out with one
        ``sendmsg`` of its PDU headers and slices: no copy per PDU, not one
        system call per 16 KB PDU.
        """
        limit = self.link.send_limit - 6
        if self._windows is None or len(self._windows[0]) < limit:
            size = max(limit, _SEND_WINDOW // limit * limit)
            self._windows = (memoryview(bytearray(size)), memoryview(bytearray(size)))
        current, following = self._windows
        self.link.send_message(context_id, command, hold=True)  # goes out with the first window
        current[:len(lead)] = lead
        filled = len(lead) + _read_full(stream, current[len(lead):])
        while True:
            more = _read_full(stream, following) if filled == len(current) else 0
            buffers: list[bytes | memoryview] = []
            for start in range(0, max(filled, 1), limit):
                end = min(start + limit, filled)
                last = not more and end == filled
                buffers.append(PDU_HEADER.pack(PDU_P_DATA_TF, end - start + 6)
                               + PDV_HEADER.pack(end - start + 2, context_id, 0x02 if last else 0x00))
                buffers.append(current[start:end])
            self.link.send_buffers(buffers)
            if not more:
                return
            current, following, filled = following, current, more

    def release(self) -> None:
        """A-RELEASE; the connection is closed whatever the destination answers."""
        try:
            self.link.sock.sendall(RELEASE_RQ_PDU)
            pdu_type, _ = self.link.read_pdu()
            if pdu_type != PDU_RELEASE_RP:
                log.warning("move destination answered A-RELEASE-RQ with PDU type 0x%02X", pdu_type)
        except (OSError, PeerGone, ProtocolError) as exc:
            log.warning("move destination did not release the association cleanly: %s", exc)
        finally:
            self.link.sock.close()

    def abort(self) -> None:
        try:
            self.link.sock.sendall(abort_pdu())
        except OSError:
            pass
        finally:
            self.link.sock.close()


def serve_move(assoc: Association, message_id: int, sop_class_uid: str, context_id: int, raw_identifier: bytes,
               destination_ae: str) -> None:
    """Answer one C-MOVE-RQ: C-STORE sub-operations to the destination, a pending response after each."""
    archive = assoc.archive
    peer = assoc.peer()
    link = assoc.link
    destination_ae = destination_ae.strip()
    destination = archive.settings.move_destinations.get(destination_ae)
    if destination is None:
        log.warning("C-MOVE from %s refused (0xA801): move destination %r is unknown", peer, destination_ae)
        link.send_message(context_id, move_response(message_id, sop_class_uid, MOVE_DESTINATION_UNKNOWN, None))
        return
    ts = assoc.transfer_syntax(context_id)
    event = QueryEvent(assoc, message_id, sop_class_uid, ts, raw_identifier, destination_ae)
    try:
        level, model_name, matches = handlers.read_retrieve(cast(Any, event), archive, handlers.MOVE_LEVELS)
    except handlers.FindRefused as exc:
        log.warning("C-MOVE from %s refused (0x%04X): %s", peer, exc.status, exc)
        link.send_message(context_id, move_response(message_id, sop_class_uid, exc.status, None))
        return
    what = f"C-MOVE {model_name} {level.value} from {peer} to {destination_ae}"
    log.info("%s: %d instances to %s:%d", what, len(matches), *destination)
    counts = SubOperations(remaining=len(matches))
    final = _run_sub_operations(assoc, message_id, sop_class_uid, context_id, matches, destination,
                                destination_ae, counts, what)
    failed_list = None
    if counts.failed_uids and final != MOVE_DESTINATION_UNKNOWN:
        listing = Dataset()
        listing.FailedSOPInstanceUIDList = counts.failed_uids
        failed_list = encode(listing, *_encoding(ts))
    link.send_message(context_id,
                      move_response(message_id, sop_class_uid, final, counts, with_identifier=failed_list is not None),
                      failed_list)


def _run_sub_operations(assoc: Association, message_id: int, sop_class_uid: str, context_id: int,
                        matches: list[handlers.RetrieveMatch], destination: tuple[str, int], destination_ae: str,
                        counts: SubOperations, what: str) -> int:
    """Send the matches; the final status (sub-operation counts in ``counts``)."""
    if not matches:
        return SUCCESS
    archive = assoc.archive
    try:
        sub = StoreSubAssociation.open(destination, archive.settings.ae_title, destination_ae,
                                       handlers.context_pairs(matches), assoc.timeout)
    except DestinationError as exc:
        log.error("%s refused (0xA801): %s", what, exc)
        return MOVE_DESTINATION_UNKNOWN
    opened = archive.open_instances([match.sop_instance_uid for match in matches])
    released = False
    try:
        for match in matches:
            if assoc.cancel_requested(message_id):
                log.info("%s cancelled after %d of %d sub-operations", what,
                         len(matches) - counts.remaining, len(matches))
                return CANCEL
            try:
                _, stream, why = next(opened)
            except IndexUnavailable as exc:
                log.error("%s: %s; %d sub-operations not done", what, exc, counts.remaining)
                counts.fail_rest(matches)
                return counts.final_status()
            status: int | None = None
            try:
                if stream is None:
                    raise SubOperationFailed(why)
                status = sub.store(match, stream, assoc.calling_ae, message_id)
            except SubOperationFailed as exc:
                log.error("instance %s not sent: %s", match.sop_instance_uid, exc)
            except DestinationError as exc:
                log.error("%s: %s; %d sub-operations not done", what, exc, counts.remaining)
                counts.fail_rest(matches)
                sub.abort()
                released = True
                return counts.final_status()
            counts.record(match.sop_instance_uid, status)
            if status is not None and status != SUCCESS:
                log.warning("%s: the destination answered 0x%04X for %s", what, status, match.sop_instance_uid)
            if counts.remaining:
                assoc.link.send_message(context_id, move_response(message_id, sop_class_uid, PENDING, counts))
        log.info("%s: %d sub-operations (%d completed, %d failed, %d warning)", what, len(matches),
                 counts.completed, counts.failed, counts.warning)
        return counts.final_status()
    finally:
        opened.close()
        if not released:
            sub.release()
