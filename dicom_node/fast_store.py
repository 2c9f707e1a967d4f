"""A storage-only DICOM upper layer: C-STORE and C-ECHO straight from the socket to a file.

Why this exists: profiling the node receiving a CT series showed ~7 ms per
instance spent in pynetdicom's upper layer (a DUL thread and an association
reactor handing each PDU through queues, state-machine events and polling
waits) against ~5 ms for the actual work (parse, fsync, index). Modalities
open associations that only store (and echo), so such associations are
served here instead, with one blocking thread per association:

- the A-ASSOCIATE-RQ is read with ``MSG_PEEK`` and decoded with pynetdicom's
  own PDU classes; an association is taken here only if it is one we would
  accept and every proposed abstract syntax is a storage SOP class or
  Verification, with no extended negotiation. Anything else (query/retrieve,
  role selection, user identity, a rejected caller) is handed, unread, to
  pynetdicom, which keeps doing everything it does today;
- presentation contexts are negotiated with pynetdicom's
  ``negotiate_as_acceptor`` against the node's supported contexts, so both
  paths accept exactly the same things;
- P-DATA-TF PDUs are read with ``recv_into`` into one reusable buffer; command
  fragments are collected and decoded (Implicit VR Little Endian, PS3.7 6.3.1);
  data set fragments are written straight to a Part 10 file in the incoming
  directory (behind the file meta group) and hashed on the way, so
  a 500 MB multi-frame never sits in memory and is not read back to checksum;
- the file then goes through ``Archive.ingest_file`` exactly as from the
  pynetdicom handler, and the C-STORE-RSP carries the same named status (with
  an Error Comment on failure);
- A-RELEASE-RQ is answered, A-ABORT and a dropped connection discard the
  partial data set; what was acknowledged before is stored.

PDU layouts are PS3.8 9.3; message layouts PS3.7 9.3.1 (C-STORE) and 9.3.5 (C-ECHO).
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from typing import Iterable

from blake3 import blake3
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status

from archive.dataset import TELEPACS_IMPLEMENTATION_UID, TELEPACS_IMPLEMENTATION_VERSION
from archive.index import Source
from archive.service import Archive, Checksums, Expected, IngestError
from dicom_node.handlers import store_status_for

log = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
_STORAGE_PREFIX = "1.2.840.10008.5.1.4."  # every storage SOP class UID lives under this root

# PDU types (PS3.8 9.3.1)
PDU_ASSOCIATE_RQ = 0x01
PDU_P_DATA_TF = 0x04
PDU_RELEASE_RQ = 0x05
PDU_ABORT = 0x07
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101

# A-ABORT source/reason (PS3.8 9.3.8)
ABORT_SOURCE_PROVIDER = 0x02
ABORT_REASON_UNEXPECTED_PDU = 0x02
ABORT_REASON_NOT_SPECIFIED = 0x00


class ProtocolError(Exception):
    """The peer broke the protocol: we abort the association."""


class PeerGone(Exception):
    """The connection closed, or the peer aborted."""


# -- deciding who serves an association -------------------------------------


@dataclass(frozen=True)
class AssociationRequest:
    """What we need of an A-ASSOCIATE-RQ."""

    calling_ae: str
    called_ae: str
    contexts: list[PresentationContext]
    peer_max_pdu: int
    only_storage: bool  # every abstract syntax is storage or Verification, no extended negotiation
    raw_length: int  # bytes of the whole PDU, header included


def parse_associate_rq(pdu: bytes) -> AssociationRequest:
    """Decode an A-ASSOCIATE-RQ PDU (header included) with pynetdicom's PDU classes."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(pdu)
    primitive = rq.to_primitive()
    contexts = list(primitive.presentation_context_definition_list)
    peer_max_pdu = 0
    extended = False
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max_pdu = int(item.maximum_length_received or 0)
        elif not isinstance(item, (ImplementationClassUIDNotification, ImplementationVersionNameNotification)):
            extended = True  # role selection, user identity, async window, SOP class negotiation
    only_storage = not extended and bool(contexts) and all(
        _is_storage_or_echo(str(cx.abstract_syntax)) for cx in contexts)
    return AssociationRequest(
        calling_ae=str(primitive.calling_ae_title).strip(),
        called_ae=str(primitive.called_ae_title).strip(),
        contexts=contexts,
        peer_max_pdu=peer_max_pdu,
        only_storage=only_storage,
        raw_length=len(pdu),
    )


def _is_storage_or_echo(abstract_syntax: str) -> bool:
    return abstract_syntax == str(Verification) or (
        abstract_syntax.startswith(_STORAGE_PREFIX) and not abstract_syntax.startswith("1.2.840.10008.5.1.4.1.2.")
    )  # 1.2.840.10008.5.1.4.1.2.x are the query/retrieve models


def peek_associate_rq(sock: socket.socket, timeout: float) -> bytes | None:
    """The A-ASSOCIATE-RQ PDU at the head of ``sock``, left unread; None if it is something else."""
    sock.settimeout(timeout)
    try:
        header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(header) < 6:
            return None
        pdu_type, length = _PDU_HEADER.unpack(header)
        if pdu_type != PDU_ASSOCIATE_RQ or length > 1 << 20:
            return None
        pdu = sock.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)
        return pdu if len(pdu) == 6 + length else None
    except (OSError, ValueError):
        return None
    finally:
        sock.settimeout(None)


# -- encoding ---------------------------------------------------------------


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000 (value padded to even length)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0x0000, tag, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def encode_command(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """A command set: the elements (sorted by tag) after their Command Group Length (0000,0000)."""
    body = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def store_response(request: Command, status: int, comment: str = "") -> bytes:
    """C-STORE-RSP (PS3.7 9.3.1.2)."""
    elements = [
        (0x0002, _uid(request.sop_class_uid)),
        (0x0100, struct.pack("<H", C_STORE_RSP)),
        (0x0120, struct.pack("<H", request.message_id)),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", status)),
        (0x1000, _uid(request.sop_instance_uid)),
    ]
    if comment:
        elements.append((0x0902, comment[:64].encode("ascii", "replace")))  # Error Comment, LO
    return encode_command(elements)


def echo_response(request: Command) -> bytes:
    """C-ECHO-RSP (PS3.7 9.3.5.2)."""
    return encode_command([
        (0x0002, _uid(request.sop_class_uid or str(Verification))),
        (0x0100, struct.pack("<H", C_ECHO_RSP)),
        (0x0120, struct.pack("<H", request.message_id)),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", int(Status.SUCCESS))),  # 0x0000
    ])


def p_data_command(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV: a whole command (message control header 0b11)."""
    pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU_HEADER.pack(PDU_P_DATA_TF, len(pdv)) + pdv


def abort_pdu(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return _PDU_HEADER.pack(PDU_ABORT, 4) + bytes([0, 0, source, reason])


RELEASE_RP_PDU = _PDU_HEADER.pack(0x06, 4) + b"\x00" * 4


def associate_ac_pdu(request: AssociationRequest, results: list[PresentationContext], max_pdu: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = request.calling_ae
    primitive.called_ae_title = request.called_ae
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = TELEPACS_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = TELEPACS_IMPLEMENTATION_VERSION
    primitive.user_information = [max_length, class_uid, version]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta group (Explicit VR LE, PS3.10 7.1), telepacs as the implementation."""

    def ui(tag: int, value: str) -> bytes:
        raw = value.encode("ascii")
        if len(raw) % 2:
            raw += b"\x00"
        return struct.pack("<HH2sH", 0x0002, tag, b"UI", len(raw)) + raw

    version_name = TELEPACS_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version_name) % 2:
        version_name += b" "
    body = (
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
        + ui(0x0002, sop_class_uid)
        + ui(0x0003, sop_instance_uid)
        + ui(0x0010, transfer_syntax)
        + ui(0x0012, str(TELEPACS_IMPLEMENTATION_UID))
        + struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", len(version_name)) + version_name
    )
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


# -- decoding ---------------------------------------------------------------


@dataclass
class Command:
    """The command elements a storage SCP reads (PS3.7 9.3.1.1, 9.3.5.1)."""

    field: int = 0
    message_id: int = 0
    data_set_type: int = NO_DATA_SET
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


def decode_command(raw: bytes | bytearray) -> Command:
    """Decode a command set (always Implicit VR Little Endian)."""
    command = Command()
    view = memoryview(raw)
    offset = 0
    end = len(view)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", view, offset)
        offset += 8
        if offset + length > end or group != 0x0000:
            raise ProtocolError(f"malformed command set at ({group:04X},{element:04X})")
        value = bytes(view[offset:offset + length])
        offset += length
        if element == 0x0100:
            command.field = struct.unpack("<H", value[:2])[0]
        elif element == 0x0110:
            command.message_id = struct.unpack("<H", value[:2])[0]
        elif element == 0x0800:
            command.data_set_type = struct.unpack("<H", value[:2])[0]
        elif element == 0x0002:
            command.sop_class_uid = value.decode("ascii", "replace").rstrip("\x00 ")
        elif element == 0x1000:
            command.sop_instance_uid = value.decode("ascii", "replace").rstrip("\x00 ")
    if offset != end or not command.field:
        raise ProtocolError("malformed command set")
    return command


# -- serving ----------------------------------------------------------------


class _IncomingDataSet:
    """A data set being received: a Part 10 file in the incoming directory, hashed as it is written."""

    def __init__(self, archive: Archive, command: Command, transfer_syntax: str) -> None:
        self.path = archive.new_incoming_path()
        self._file = open(self.path, "wb", buffering=0)
        meta = file_meta(command.sop_class_uid, command.sop_instance_uid, transfer_syntax)
        self.offset = len(meta)
        self._whole = blake3(meta)
        self._dataset = blake3()
        self.size = len(meta)
        self._file.write(meta)

    def write(self, data: memoryview) -> None:
        self._file.write(data)
        self._whole.update(data)
        self._dataset.update(data)
        self.size += len(data)

    def finish(self) -> Checksums:
        self._file.close()
        return Checksums(self._whole.hexdigest(), self._dataset.hexdigest(), self.size)

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class StoreAssociation:
    """Serve one storage-only association on a blocking socket, until release, abort or close."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], archive: Archive,
                 request: AssociationRequest, accepted: dict[int, str], max_pdu: int, timeout: float) -> None:
        self.sock = sock
        self.host = address[0]
        self.archive = archive
        self.request = request
        self.accepted = accepted  # context ID -> transfer syntax
        self.source = Source("dicom", ae_title=request.calling_ae, host=self.host,
                             facility=archive.facility_for(request.calling_ae))
        self.buffer = bytearray(max_pdu + 6)
        self.view = memoryview(self.buffer)
        self.timeout = timeout
        self.stored = 0

    def peer(self) -> str:
        return f"{self.request.calling_ae}@{self.host}"

    def serve(self) -> None:
        self.sock.settimeout(self.timeout)
        command_bytes = bytearray()
        command: Command | None = None
        context_id = 0
        incoming: _IncomingDataSet | None = None
        try:
            while True:
                pdu_type, length = self._read_pdu()
                if pdu_type == PDU_RELEASE_RQ:
                    if incoming is not None or command_bytes:
                        raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                    self.sock.sendall(RELEASE_RP_PDU)
                    log.info("association from %s released after %d instance(s)", self.peer(), self.stored)
                    return
                if pdu_type == PDU_ABORT:
                    raise PeerGone("the peer aborted the association")
                if pdu_type != PDU_P_DATA_TF:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                offset = 0
                while offset < length:
                    if offset + 6 > length:
                        raise ProtocolError("truncated PDV item")
                    item_length, pdv_context, control = _PDV_HEADER.unpack_from(self.view, offset)
                    data_start = offset + 6
                    offset += 4 + item_length
                    if item_length < 2 or offset > length:
                        raise ProtocolError("PDV item length out of range")
                    data = self.view[data_start:offset]
                    if control & 0x01:  # command fragment
                        if command is not None:
                            raise ProtocolError("a command fragment while a data set was expected")
                        command_bytes += data
                        if control & 0x02:
                            context_id = pdv_context
                            if context_id not in self.accepted:
                                raise ProtocolError(f"presentation context {context_id} was not accepted")
                            command = decode_command(command_bytes)
                            command_bytes.clear()
                            if command.data_set_type == NO_DATA_SET:
                                self._answer(command, context_id, None)
                                command = None
                            elif command.field == C_STORE_RQ:
                                incoming = _IncomingDataSet(self.archive, command, self.accepted[context_id])
                            else:
                                raise ProtocolError(f"unsupported command 0x{command.field:04X} with a data set")
                    else:  # data set fragment
                        if command is None or incoming is None or pdv_context != context_id:
                            raise ProtocolError("a data set fragment without its command")
                        incoming.write(data)
                        if control & 0x02:
                            self._answer(command, context_id, incoming)
                            command, incoming = None, None
        except PeerGone as exc:
            self._dropped(str(exc), incoming)
        except (ConnectionError, socket.timeout, OSError) as exc:
            self._dropped(f"{type(exc).__name__}: {exc}", incoming)
        except ProtocolError as exc:
            log.warning("aborting association from %s: %s", self.peer(), exc)
            self._discard(incoming)
            try:
                self.sock.sendall(abort_pdu(ABORT_SOURCE_PROVIDER, ABORT_REASON_UNEXPECTED_PDU))
            except OSError:
                pass

    def _dropped(self, reason: str, incoming: _IncomingDataSet | None) -> None:
        log.warning("association from %s ended without release (%s); %d instance(s) acknowledged before are stored",
                    self.peer(), reason, self.stored)
        self._discard(incoming)

    def _discard(self, incoming: _IncomingDataSet | None) -> None:
        if incoming is not None:
            incoming.discard()
            log.warning("discarded the incomplete dataset of an interrupted C-STORE from %s", self.peer())

    def _read_exact(self, start: int, count: int) -> None:
        view = self.view[start:start + count]
        while view:
            received = self.sock.recv_into(view)
            if not received:
                raise PeerGone("the connection closed")
            view = view[received:]

    def _read_pdu(self) -> tuple[int, int]:
        self._read_exact(0, 6)
        pdu_type, length = _PDU_HEADER.unpack_from(self.buffer, 0)
        if length > len(self.buffer):
            raise ProtocolError(f"PDU of {length} bytes exceeds the negotiated maximum {len(self.buffer) - 6}")
        self._read_exact(0, length)
        return pdu_type, length

    def _answer(self, command: Command, context_id: int, incoming: _IncomingDataSet | None) -> None:
        if command.field == C_ECHO_RQ and incoming is None:
            log.info("C-ECHO from %s", self.peer())
            response = echo_response(command)
        elif command.field == C_STORE_RQ and incoming is not None:
            status, comment = self._store(command, context_id, incoming)
            response = store_response(command, status, comment)
        else:
            raise ProtocolError(f"unsupported command 0x{command.field:04X}")
        self.sock.sendall(p_data_command(context_id, response))

    def _store(self, command: Command, context_id: int, incoming: _IncomingDataSet) -> tuple[int, str]:
        checksums = incoming.finish()
        expected = Expected(sop_instance_uid=command.sop_instance_uid, sop_class_uid=command.sop_class_uid)
        try:
            self.archive.ingest_file(incoming.path, self.source, expected=expected, move=True,
                                     checksums=checksums)
        except IngestError as exc:
            return store_status_for(exc.failure), exc.message
        finally:
            incoming.path.unlink(missing_ok=True)
        self.stored += 1
        return int(Status.SUCCESS), ""  # 0x0000


def serve_if_storage(sock: socket.socket, address: tuple[str, int], archive: Archive,
                     supported: list[PresentationContext], max_pdu: int, timeouts: tuple[float, float]) -> bool:
    """Serve the association on ``sock`` here if it only stores; False leaves it, unread, to pynetdicom."""
    acse_timeout, network_timeout = timeouts
    raw = peek_associate_rq(sock, acse_timeout)
    if raw is None:
        return False
    try:
        request = parse_associate_rq(raw)
    except (ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
        log.debug("A-ASSOCIATE-RQ from %s not decoded here (%s); pynetdicom answers it", address[0], exc)
        return False
    settings = archive.settings
    if not request.only_storage or request.called_ae != settings.ae_title \
            or not settings.caller_allowed(request.calling_ae, address[0]):
        return False  # pynetdicom negotiates, or rejects with its log line
    results, _roles = negotiate_as_acceptor(request.contexts, supported, None)
    accepted = {cx.context_id: str(cx.transfer_syntax[0])
                for cx in results if cx.result == 0x00 and cx.context_id is not None}
    sock.recv(request.raw_length, socket.MSG_WAITALL)  # consume the A-ASSOCIATE-RQ we peeked
    sock.sendall(associate_ac_pdu(request, results, max_pdu))
    log.info("association from %s@%s established (%d of %d contexts accepted)", request.calling_ae, address[0],
             len(accepted), len(request.contexts))
    StoreAssociation(sock, address, archive, request, accepted, max_pdu, network_timeout).serve()
    return True

