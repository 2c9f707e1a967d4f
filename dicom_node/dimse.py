"""DIMSE messages over a blocking socket: PDUs, command sets and the few encodings telepacs' own upper layer needs.

Used by :mod:`dicom_node.fast_store` (associations we accept) and
:mod:`dicom_node.fast_query` (C-FIND, C-MOVE, and the C-STORE sub-association
to a move destination). PDU layouts are PS3.8 9.3; command sets PS3.7 E
(always Implicit VR Little Endian, group 0000).
"""

from __future__ import annotations

import select
import socket
import struct
from dataclasses import dataclass
from typing import Any, Iterable

from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from archive.dataset import TELEPACS_IMPLEMENTATION_UID, TELEPACS_IMPLEMENTATION_VERSION

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3.1)
PDU_ASSOCIATE_RQ = 0x01
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_P_DATA_TF = 0x04
PDU_RELEASE_RQ = 0x05
PDU_RELEASE_RP = 0x06
PDU_ABORT = 0x07
PDU_HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0001  # any value but 0x0101 (PS3.7 E.1: CommandDataSetType)

# A-ABORT source/reason (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
ABORT_REASON_UNEXPECTED_PDU = 0x02
ABORT_REASON_NOT_SPECIFIED = 0x00

RELEASE_RQ_PDU = PDU_HEADER.pack(PDU_RELEASE_RQ, 4) + b"\x00" * 4
RELEASE_RP_PDU = PDU_HEADER.pack(PDU_RELEASE_RP, 4) + b"\x00" * 4
UNLIMITED_PDU = 1 << 20  # what we send in when the peer's maximum is 0 ("no limit")


class ProtocolError(Exception):
    """The peer broke the protocol: we abort the association."""


class PeerGone(Exception):
    """The connection closed, or the peer aborted."""


# -- command sets -----------------------------------------------------------


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000 (value padded to even length)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0x0000, tag, len(value)) + value


def uid(value: str) -> bytes:
    return value.encode("ascii")


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def ae(value: str) -> bytes:
    """An AE title value: padded with a space, not a NUL, to even length."""
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_command(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """A command set: the elements (sorted by tag) after their Command Group Length (0000,0000)."""
    body = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x0000, struct.pack("<L", len(body))) + body


@dataclass
class Command:
    """The command elements telepacs reads (PS3.7 9.3.1, 9.3.4, 9.3.5, 9.3.2.3)."""

    field: int = 0
    message_id: int = 0
    responded_to: int = 0  # MessageIDBeingRespondedTo (0000,0120)
    data_set_type: int = NO_DATA_SET
    status: int = 0
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    move_destination: str = ""
    remaining: int = 0  # Number of Remaining/Completed/Failed/Warning Sub-operations (0000,1020-1023)
    completed: int = 0
    failed: int = 0
    warning: int = 0


_NUMBERS = {0x0100: "field", 0x0110: "message_id", 0x0120: "responded_to", 0x0800: "data_set_type",
            0x0900: "status", 0x1020: "remaining", 0x1021: "completed", 0x1022: "failed", 0x1023: "warning"}


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\x00 ")


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
        number_field = _NUMBERS.get(element)
        if number_field is not None:
            if length < 2:
                raise ProtocolError(f"malformed command element (0000,{element:04X})")
            setattr(command, number_field, struct.unpack("<H", value[:2])[0])
        elif element == 0x0002:
            command.sop_class_uid = _text(value)
        elif element == 0x1000:
            command.sop_instance_uid = _text(value)
        elif element == 0x0600:
            command.move_destination = _text(value)
    if offset != end or not command.field:
        raise ProtocolError("malformed command set")
    return command


# -- PDUs -------------------------------------------------------------------


def p_data_command(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV: a whole command (message control header 0b11)."""
    pdv = PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return PDU_HEADER.pack(PDU_P_DATA_TF, len(pdv)) + pdv


def abort_pdu(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return PDU_HEADER.pack(PDU_ABORT, 4) + bytes([0, 0, source, reason])


def user_information(max_pdu: int) -> list[Any]:
    """Our A-ASSOCIATE user information: maximum length, implementation class UID and version name."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = TELEPACS_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = TELEPACS_IMPLEMENTATION_VERSION
    return [max_length, class_uid, version]


def peer_max_pdu(user_info: Iterable[object]) -> int:
    """The peer's Maximum Length Received (0: no limit) from its A-ASSOCIATE user information."""
    for item in user_info:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return 0


class PduSocket:
    """Whole PDUs read from a blocking socket into one reusable buffer; messages written as PDUs."""

    def __init__(self, sock: socket.socket, max_pdu: int, peer_max: int, timeout: float) -> None:
        self.sock = sock
        self.buffer = bytearray(max_pdu + 6)
        self.view = memoryview(self.buffer)
        # The most we put in one P-DATA-TF PDU's variable field.
        self.send_limit = peer_max if peer_max > 0 else UNLIMITED_PDU
        sock.settimeout(timeout)

    def _read_exact(self, count: int) -> None:
        view = self.view[:count]
        while view:
            received = self.sock.recv_into(view)
            if not received:
                raise PeerGone("the connection closed")
            view = view[received:]

    def read_pdu(self) -> tuple[int, int]:
        """(PDU type, length); the variable field is in ``view[:length]``."""
        self._read_exact(6)
        pdu_type, length = PDU_HEADER.unpack_from(self.buffer, 0)
        if length > len(self.buffer):
            raise ProtocolError(f"PDU of {length} bytes exceeds the negotiated maximum {len(self.buffer) - 6}")
        self._read_exact(length)
        return pdu_type, length

    def readable(self) -> bool:
        """Whether the peer has sent something we have not read (without waiting)."""
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def pdvs(self, length: int) -> Iterable[tuple[int, int, memoryview]]:
        """(context ID, message control header, data) of each PDV item in the P-DATA-TF just read."""
        offset = 0
        while offset < length:
            if offset + 6 > length:
                raise ProtocolError("truncated PDV item")
            item_length, context_id, control = PDV_HEADER.unpack_from(self.view, offset)
            data_start = offset + 6
            offset += 4 + item_length
            if item_length < 2 or offset > length:
                raise ProtocolError("PDV item length out of range")
            yield context_id, control, self.view[data_start:offset]

    def read_message(self) -> tuple[int, Command, bytes | None]:
        """(context ID, command, data set or None) of the next message.

        A-ABORT and a closed connection raise :class:`PeerGone`; any PDU but
        P-DATA-TF, or fragments out of order, a :class:`ProtocolError`.
        """
        command_bytes = bytearray()
        data_set = bytearray()
        command: Command | None = None
        while True:
            pdu_type, length = self.read_pdu()
            if pdu_type == PDU_ABORT:
                raise PeerGone("the peer aborted the association")
            if pdu_type != PDU_P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} while a message was awaited")
            for context_id, control, fragment in self.pdvs(length):
                if control & 0x01:
                    if command is not None:
                        raise ProtocolError("a command fragment while a data set was expected")
                    command_bytes += fragment
                    if control & 0x02:
                        command = decode_command(command_bytes)
                        if command.data_set_type == NO_DATA_SET:
                            return context_id, command, None
                else:
                    if command is None:
                        raise ProtocolError("a data set fragment without its command")
                    data_set += fragment
                    if control & 0x02:
                        return context_id, command, bytes(data_set)

    def read_command(self) -> tuple[int, Command]:
        """(context ID, command) of the next message, which must be one without a data set."""
        context_id, command, data_set = self.read_message()
        if data_set is not None:
            raise ProtocolError(f"a data set with command 0x{command.field:04X} where none was expected")
        return context_id, command

    def send_message(self, context_id: int, command: bytes, data_set: bytes | None = None) -> None:
        """Send a command and its data set (if any) as P-DATA-TF PDUs within the peer's maximum length.

        Small messages (a C-FIND response) go out as one PDU with both PDVs.
        """
        limit = self.send_limit - 6  # one PDV item header per PDU
        pdus = [p_data_command(context_id, command)] if len(command) <= limit else \
            [self.pdu(context_id, 0x01 | (0x02 if end >= len(command) else 0), command[start:end])
             for start, end in _spans(len(command), limit)]
        if data_set is not None:
            spans = _spans(len(data_set), limit) or [(0, 0)]
            first, *rest = [self.pdu(context_id, 0x02 if end >= len(data_set) else 0x00, data_set[start:end])
                            for start, end in spans]
            if len(pdus) == 1 and (len(pdus[0]) - 6) + (len(first) - 6) <= self.send_limit:
                pdus[0] = _join_pdus(pdus[0], first)
            else:
                pdus.append(first)
            pdus.extend(rest)
        self.sock.sendall(b"".join(pdus))

    @staticmethod
    def pdu(context_id: int, control: int, data: bytes) -> bytes:
        pdv = PDV_HEADER.pack(len(data) + 2, context_id, control) + data
        return PDU_HEADER.pack(PDU_P_DATA_TF, len(pdv)) + pdv


def _spans(total: int, limit: int) -> list[tuple[int, int]]:
    return [(start, min(start + limit, total)) for start in range(0, total, limit)]


def _join_pdus(first: bytes, second: bytes) -> bytes:
    """Two P-DATA-TF PDUs as one, with both PDV items."""
    items = first[6:] + second[6:]
    return PDU_HEADER.pack(PDU_P_DATA_TF, len(items)) + items
