"""telepacs' own DICOM upper layer for the associations modalities and workstations open most.

Why this exists: profiling the node receiving a CT series showed ~7 ms per
instance spent in pynetdicom's upper layer (a DUL thread and an association
reactor handing each PDU through queues, state-machine events and polling
waits) against ~5 ms for the actual work (parse, fsync, index); C-FIND paid
about 2 ms per match the same way, and C-MOVE decoded and re-encoded every
instance. Associations that only store, echo, find and move are therefore
served here, with one blocking thread per association:

- the A-ASSOCIATE-RQ is read with ``MSG_PEEK`` and decoded with pynetdicom's
  own PDU classes; an association is taken here only if it is one we would
  accept and every proposed abstract syntax is a storage SOP class,
  Verification, or a FIND or MOVE query/retrieve model, with no extended
  negotiation. Anything else (C-GET, role selection, user identity, a
  rejected caller) is handed, unread, to pynetdicom, which keeps doing
  everything it does today;
- presentation contexts are negotiated with pynetdicom's
  ``negotiate_as_acceptor`` against the node's supported contexts, so both
  paths accept exactly the same things;
- P-DATA-TF PDUs are read with ``recv_into`` into one reusable buffer; command
  fragments are collected and decoded (:mod:`dicom_node.dimse`); C-STORE data
  set fragments are written straight to a Part 10 file in the incoming
  directory (behind the file meta group) and hashed on the way, so a 500 MB
  multi-frame never sits in memory and is not read back to checksum;
- the file then goes through ``Archive.ingest_file`` exactly as from the
  pynetdicom handler, and the C-STORE-RSP carries the same named status (with
  an Error Comment on failure);
- C-FIND and C-MOVE identifiers are collected in memory and answered by
  :mod:`dicom_node.fast_query` (the matching and refusals of
  :mod:`dicom_node.handlers`), which reads a C-CANCEL between responses;
- A-RELEASE-RQ is answered, A-ABORT and a dropped connection discard the
  partial data set; what was acknowledged before is stored.

Message layouts: PS3.7 9.3.1 (C-STORE) and 9.3.5 (C-ECHO).
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass

from blake3 import blake3
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import Status

from archive.dataset import TELEPACS_IMPLEMENTATION_UID, TELEPACS_IMPLEMENTATION_VERSION
from archive.index import Source
from archive.service import Archive, Checksums, Expected, IngestError
from dicom_node import fast_query
from dicom_node.dimse import (
    ABORT_REASON_UNEXPECTED_PDU,
    ABORT_SOURCE_PROVIDER,
    APPLICATION_CONTEXT_NAME,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    C_STORE_RSP,
    NO_DATA_SET,
    PDU_ABORT,
    PDU_ASSOCIATE_RQ,
    PDU_HEADER,
    PDU_P_DATA_TF,
    PDU_RELEASE_RQ,
    RELEASE_RP_PDU,
    Command,
    PduSocket,
    PeerGone,
    ProtocolError,
    abort_pdu,
    decode_command,
    encode_command,
    p_data_command,
    uid,
    us,
    user_information,
)
from dicom_node.handlers import store_status_for

log = logging.getLogger(__name__)

_STORAGE_PREFIX = "1.2.840.10008.5.1.4."  # every storage SOP class UID lives under this root
_QUERY_RETRIEVE_PREFIX = "1.2.840.10008.5.1.4.1.2."  # the query/retrieve models, also under it
_FAST_QUERY_MODELS = frozenset(str(model) for model in (
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove))
_MAX_IDENTIFIER = 1 << 20  # a C-FIND/C-MOVE identifier larger than this is not a query


# -- deciding who serves an association -------------------------------------


@dataclass(frozen=True)
class AssociationRequest:
    """What we need of an A-ASSOCIATE-RQ."""

    calling_ae: str
    called_ae: str
    contexts: list[PresentationContext]
    peer_max_pdu: int
    served_here: bool  # every abstract syntax is one we serve here, and no extended negotiation
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
    served_here = not extended and bool(contexts) and all(
        is_served_here(str(cx.abstract_syntax)) for cx in contexts)
    return AssociationRequest(
        calling_ae=str(primitive.calling_ae_title).strip(),
        called_ae=str(primitive.called_ae_title).strip(),
        contexts=contexts,
        peer_max_pdu=peer_max_pdu,
        served_here=served_here,
        raw_length=len(pdu),
    )


def is_served_here(abstract_syntax: str) -> bool:
    """Storage SOP classes, Verification, and the FIND and MOVE models (C-GET stays with pynetdicom)."""
    if abstract_syntax == str(Verification) or abstract_syntax in _FAST_QUERY_MODELS:
        return True
    return abstract_syntax.startswith(_STORAGE_PREFIX) and not abstract_syntax.startswith(_QUERY_RETRIEVE_PREFIX)


def peek_associate_rq(sock: socket.socket, timeout: float) -> bytes | None:
    """The A-ASSOCIATE-RQ PDU at the head of ``sock``, left unread; None if it is something else."""
    sock.settimeout(timeout)
    try:
        header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(header) < 6:
            return None
        pdu_type, length = PDU_HEADER.unpack(header)
        if pdu_type != PDU_ASSOCIATE_RQ or length > 1 << 20:
            return None
        pdu = sock.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)
        return pdu if len(pdu) == 6 + length else None
    except (OSError, ValueError):
        return None
    finally:
        sock.settimeout(None)


# -- encoding ---------------------------------------------------------------


def store_response(request: Command, status: int, comment: str = "") -> bytes:
    """C-STORE-RSP (PS3.7 9.3.1.2)."""
    elements = [
        (0x0002, uid(request.sop_class_uid)),
        (0x0100, us(C_STORE_RSP)),
        (0x0120, us(request.message_id)),
        (0x0800, us(NO_DATA_SET)),
        (0x0900, us(status)),
        (0x1000, uid(request.sop_instance_uid)),
    ]
    if comment:
        elements.append((0x0902, comment[:64].encode("ascii", "replace")))  # Error Comment, LO
    return encode_command(elements)


def echo_response(request: Command) -> bytes:
    """C-ECHO-RSP (PS3.7 9.3.5.2)."""
    return encode_command([
        (0x0002, uid(request.sop_class_uid or str(Verification))),
        (0x0100, us(C_ECHO_RSP)),
        (0x0120, us(request.message_id)),
        (0x0800, us(NO_DATA_SET)),
        (0x0900, us(int(Status.SUCCESS))),  # 0x0000
    ])


def associate_ac_pdu(request: AssociationRequest, results: list[PresentationContext], max_pdu: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = request.calling_ae
    primitive.called_ae_title = request.called_ae
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = user_information(max_pdu)
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


# -- serving ----------------------------------------------------------------


class _IncomingDataSet:
    """A C-STORE data set being received: a Part 10 file in the incoming directory, hashed as it is written."""

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


class _IncomingIdentifier:
    """A C-FIND or C-MOVE identifier being received, in memory (it is a handful of elements)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: memoryview) -> None:
        if len(self.data) + len(data) > _MAX_IDENTIFIER:
            raise ProtocolError(f"a query identifier of more than {_MAX_IDENTIFIER} bytes")
        self.data += data

    def discard(self) -> None:
        self.data.clear()


class FastAssociation:
    """Serve one accepted association on a blocking socket, until release, abort or close."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], archive: Archive,
                 request: AssociationRequest, accepted: dict[int, tuple[str, str]], max_pdu: int,
                 timeout: float) -> None:
        self.link = PduSocket(sock, max_pdu, request.peer_max_pdu, timeout)
        self.timeout = timeout
        self.host = address[0]
        self.archive = archive
        self.request = request
        self.calling_ae = request.calling_ae
        self.accepted = accepted  # context ID -> (abstract syntax, transfer syntax)
        self.source = Source("dicom", ae_title=request.calling_ae, host=self.host,
                             facility=archive.facility_for(request.calling_ae))
        self.stored = 0
        self._cancelled: set[int] = set()  # message IDs a C-CANCEL-RQ named while they ran

    def peer(self) -> str:
        return f"{self.request.calling_ae}@{self.host}"

    def transfer_syntax(self, context_id: int) -> str:
        return self.accepted[context_id][1]

    def serve(self) -> None:
        command_bytes = bytearray()
        command: Command | None = None
        context_id = 0
        incoming: _IncomingDataSet | _IncomingIdentifier | None = None
        link = self.link
        try:
            while True:
                pdu_type, length = link.read_pdu()
                if pdu_type == PDU_RELEASE_RQ:
                    if incoming is not None or command_bytes:
                        raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                    link.sock.sendall(RELEASE_RP_PDU)
                    log.info("association from %s released after %d instance(s)", self.peer(), self.stored)
                    return
                if pdu_type == PDU_ABORT:
                    raise PeerGone("the peer aborted the association")
                if pdu_type != PDU_P_DATA_TF:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                for pdv_context, control, data in link.pdvs(length):
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
                            else:
                                incoming = self._incoming(command, context_id)
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
                link.sock.sendall(abort_pdu(ABORT_SOURCE_PROVIDER, ABORT_REASON_UNEXPECTED_PDU))
            except OSError:
                pass

    def _incoming(self, command: Command, context_id: int) -> _IncomingDataSet | _IncomingIdentifier:
        if command.field == C_STORE_RQ:
            return _IncomingDataSet(self.archive, command, self.transfer_syntax(context_id))
        if command.field in (C_FIND_RQ, C_MOVE_RQ):
            return _IncomingIdentifier()
        raise ProtocolError(f"unsupported command 0x{command.field:04X} with a data set")

    def _dropped(self, reason: str, incoming: _IncomingDataSet | _IncomingIdentifier | None) -> None:
        log.warning("association from %s ended without release (%s); %d instance(s) acknowledged before are stored",
                    self.peer(), reason, self.stored)
        self._discard(incoming)

    def _discard(self, incoming: _IncomingDataSet | _IncomingIdentifier | None) -> None:
        if incoming is None:
            return
        incoming.discard()
        if isinstance(incoming, _IncomingDataSet):
            log.warning("discarded the incomplete dataset of an interrupted C-STORE from %s", self.peer())

    def _answer(self, command: Command, context_id: int,
                incoming: _IncomingDataSet | _IncomingIdentifier | None) -> None:
        if command.field == C_ECHO_RQ and incoming is None:
            log.info("C-ECHO from %s", self.peer())
            self.link.sock.sendall(p_data_command(context_id, echo_response(command)))
        elif command.field == C_STORE_RQ and isinstance(incoming, _IncomingDataSet):
            status, comment = self._store(command, incoming)
            self.link.sock.sendall(p_data_command(context_id, store_response(command, status, comment)))
        elif command.field == C_FIND_RQ and isinstance(incoming, _IncomingIdentifier):
            fast_query.serve_find(self, command.message_id, command.sop_class_uid, context_id, bytes(incoming.data))
        elif command.field == C_MOVE_RQ and isinstance(incoming, _IncomingIdentifier):
            fast_query.serve_move(self, command.message_id, command.sop_class_uid, context_id, bytes(incoming.data),
                                  command.move_destination)
        elif command.field == C_CANCEL_RQ and incoming is None:
            # For an operation that has already ended (PS3.7 9.3.2.3: no response to a C-CANCEL).
            log.debug("C-CANCEL from %s for message %d, which has ended", self.peer(), command.responded_to)
        else:
            raise ProtocolError(f"unsupported command 0x{command.field:04X}")

    def cancel_requested(self, message_id: int) -> bool:
        """Whether the peer has sent a C-CANCEL-RQ for ``message_id`` (read without waiting).

        While a C-FIND or C-MOVE runs, the only message a peer may send on
        the association is a C-CANCEL (no asynchronous operations are
        negotiated); anything else aborts it.
        """
        while message_id not in self._cancelled and self.link.readable():
            _context_id, command = self.link.read_command()
            if command.field != C_CANCEL_RQ:
                raise ProtocolError(f"command 0x{command.field:04X} while message {message_id} is being answered")
            self._cancelled.add(command.responded_to)
        return message_id in self._cancelled

    def _store(self, command: Command, incoming: _IncomingDataSet) -> tuple[int, str]:
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


def serve_if_fast(sock: socket.socket, address: tuple[str, int], archive: Archive,
                  supported: list[PresentationContext], max_pdu: int, timeouts: tuple[float, float]) -> bool:
    """Serve the association on ``sock`` here if we can; False leaves it, unread, to pynetdicom."""
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
    if not request.served_here or request.called_ae != settings.ae_title \
            or not settings.caller_allowed(request.calling_ae, address[0]):
        return False  # pynetdicom negotiates, or rejects with its log line
    results, _roles = negotiate_as_acceptor(request.contexts, supported, None)
    accepted = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0x00 and cx.context_id is not None}
    sock.recv(request.raw_length, socket.MSG_WAITALL)  # consume the A-ASSOCIATE-RQ we peeked
    sock.sendall(associate_ac_pdu(request, results, max_pdu))
    log.info("association from %s@%s established (%d of %d contexts accepted)", request.calling_ae, address[0],
             len(accepted), len(request.contexts))
    FastAssociation(sock, address, archive, request, accepted, max_pdu, network_timeout).serve()
    return True
