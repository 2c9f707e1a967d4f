"""A fast scan of a Part 10 file's header: its top-level elements up to the pixel data, as raw elements.

``pydicom.dcmread`` took ~1 ms per received CT slice here, most of it in
generic machinery (file-like reads per element, file meta validation,
deferred-value bookkeeping); ingest needs only the top-level elements
before the pixel data, as raw bytes. This module reads the head of the file
once and walks the elements with ``struct.unpack_from`` (PS3.5 §7.1):

- explicit VR (little or big endian) and implicit VR little endian;
- sequences are skipped (with defined or undefined length, nested to any
  depth): the index takes nothing from inside them;
- the pixel data element is located, and its extent checked against the file
  size (for encapsulated pixel data, fragment by fragment), so a truncated
  file is refused.

It returns pydicom ``RawDataElement``s, so the values are decoded by the
same code as before. Anything it does not handle (deflated transfer syntax,
a header larger than ``HEAD_BYTES``, bytes that do not parse) raises
:class:`ScanUnsupported`, and the caller falls back to pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag

HEAD_BYTES = 256 * 1024
# Most headers end within a few KB: read that much first, the whole window only when it is not enough
# (copying 256 KB of every received slice cost ~50 µs).
FIRST_WINDOW = 16 * 1024
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"})
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})


class ScanUnsupported(Exception):
    """The fast scan cannot read this file; use pydicom."""


class _WindowTooSmall(ScanUnsupported):
    """The elements before the pixel data do not fit in the bytes read."""


class Truncated(Exception):
    """The file ends before an element it declares."""


@dataclass(frozen=True)
class Header:
    meta: dict[BaseTag, DataElement | RawDataElement]  # group 0002
    elements: dict[BaseTag, DataElement | RawDataElement]  # top-level dataset elements before the pixel data, sequences left out
    dataset_offset: int  # where the dataset starts (after the file meta group)
    transfer_syntax: str


@dataclass(frozen=True)
class _Syntax:
    implicit: bool
    little: bool

    @property
    def u16(self) -> struct.Struct:
        return _U16LE if self.little else _U16BE

    @property
    def u32(self) -> struct.Struct:
        return _U32LE if self.little else _U32BE

    @property
    def tag(self) -> struct.Struct:
        return _TAGLE if self.little else _TAGBE


_U16LE, _U16BE = struct.Struct("<H"), struct.Struct(">H")
_U32LE, _U32BE = struct.Struct("<L"), struct.Struct(">L")
_TAGLE, _TAGBE = struct.Struct("<HH"), struct.Struct(">HH")
_EXPLICIT_LE = _Syntax(implicit=False, little=True)
_IMPLICIT_LE = _Syntax(implicit=True, little=True)


def scan_part10(fp: BinaryIO, file_size: int) -> Header:
    """Scan the Part 10 stream ``fp`` (positioned at 0) of ``file_size`` bytes."""
    try:
        return _scan(fp, file_size, FIRST_WINDOW)
    except _WindowTooSmall:
        if file_size <= FIRST_WINDOW:
            raise
    fp.seek(0)
    return _scan(fp, file_size, HEAD_BYTES)


def _scan(fp: BinaryIO, file_size: int, window: int) -> Header:
    head = fp.read(window)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ScanUnsupported("no DICM prefix")
    meta: dict[BaseTag, DataElement | RawDataElement] = {}
    offset = _read_elements(head, 132, _EXPLICIT_LE, meta, stop_group=0x0002, file_size=file_size)
    ts_element = meta.get(BaseTag(0x00020010))
    if ts_element is None or not isinstance(ts_element.value, bytes):
        raise ScanUnsupported("no TransferSyntaxUID in the file meta")
    transfer_syntax = ts_element.value.decode("ascii", "replace").rstrip("\x00 ")
    if transfer_syntax in DEFLATED:
        raise ScanUnsupported("deflated transfer syntax")
    syntax = _Syntax(implicit=transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                     little=transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    end = _read_elements(head, offset, syntax, elements, stop_group=None, file_size=file_size)
    pixel_end = _pixel_data_extent(fp, head, end, syntax, file_size)
    if pixel_end is not None and pixel_end > file_size:
        raise Truncated(f"element (7FE0,0010) needs {pixel_end} bytes, the file has {file_size}")
    return Header(meta, elements, offset, transfer_syntax)


def _read_elements(buf: bytes, offset: int, syntax: _Syntax, out: dict[BaseTag, DataElement | RawDataElement],
                   stop_group: int | None, file_size: int) -> int:
    """Collect elements from ``offset`` into ``out``; return where the scan stopped.

    With ``stop_group`` it stops at the first element of another group;
    otherwise at the pixel data or the end of ``buf``.
    """
    size = len(buf)
    tag_struct, u16, u32 = syntax.tag, syntax.u16, syntax.u32
    while offset + 8 <= size:
        group, element = tag_struct.unpack_from(buf, offset)
        tag = group << 16 | element
        if stop_group is not None and group != stop_group:
            return offset
        if stop_group is None and tag >= PIXEL_DATA:
            return offset
        vr, length, value_offset = _element_header(buf, offset, syntax, tag, u16, u32)
        if length == UNDEFINED:
            offset = _skip_undefined(buf, value_offset, _nested_syntax(vr, syntax))
            continue
        end = value_offset + length
        if end > size:
            if end > file_size and size >= file_size:
                raise Truncated(f"element ({group:04X},{element:04X}) needs {end} bytes, the file has {file_size}")
            raise _WindowTooSmall("header larger than the scan window")
        if vr != "SQ":
            out[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, length, buf[value_offset:end], value_offset,
                                      syntax.implicit, syntax.little, True, False)
        offset = end
    if stop_group is None and size < file_size:
        raise _WindowTooSmall("header larger than the scan window")  # no pixel data within the window
    return offset


def _nested_syntax(vr: str | None, syntax: _Syntax) -> _Syntax:
    """UN of undefined length holds implicit VR little endian items (PS3.5 6.2.2)."""
    return _IMPLICIT_LE if vr == "UN" and not syntax.implicit else syntax


def _element_header(buf: bytes, offset: int, syntax: _Syntax, tag: int, u16: struct.Struct,
                    u32: struct.Struct) -> tuple[str | None, int, int]:
    """(VR, value length, value offset) of the element at ``offset``."""
    if syntax.implicit or tag >> 16 == 0xFFFE:
        vr: str | None
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = None  # private or unknown: pydicom treats it as UN
        return vr, u32.unpack_from(buf, offset + 4)[0], offset + 8
    raw_vr = buf[offset + 4:offset + 6]
    if raw_vr in LONG_VRS:
        if offset + 12 > len(buf):
            raise _WindowTooSmall("header larger than the scan window")
        return raw_vr.decode("ascii"), u32.unpack_from(buf, offset + 8)[0], offset + 12
    if not (65 <= raw_vr[0] <= 90 and 65 <= raw_vr[1] <= 90):
        raise ScanUnsupported(f"not a VR: {raw_vr!r}")
    return raw_vr.decode("ascii"), u16.unpack_from(buf, offset + 6)[0], offset + 8


def _tag_at(buf: bytes, offset: int, syntax: _Syntax) -> int:
    """The tag (group << 16 | element) of the element or item header at ``offset``, with its length in reach."""
    if offset + 8 > len(buf):
        raise _WindowTooSmall("header larger than the scan window")
    group, element = syntax.tag.unpack_from(buf, offset)
    return int(group << 16 | element)


def _skip_undefined(buf: bytes, offset: int, syntax: _Syntax) -> int:
    """Skip the items of an undefined-length sequence (or UN) starting at ``offset``; return the offset after it."""
    while True:
        tag = _tag_at(buf, offset, syntax)
        length = syntax.u32.unpack_from(buf, offset + 4)[0]
        offset += 8
        if tag == SEQUENCE_DELIMITER:
            return offset
        if tag != ITEM:
            raise ScanUnsupported(f"expected an item in a sequence, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if length != UNDEFINED:
            offset += length
            continue
        offset = _skip_item(buf, offset, syntax)


def _skip_item(buf: bytes, offset: int, syntax: _Syntax) -> int:
    """Skip the elements of an undefined-length item up to and including its delimiter."""
    while True:
        tag = _tag_at(buf, offset, syntax)
        if tag == ITEM_DELIMITER:
            return offset + 8
        vr, length, value_offset = _element_header(buf, offset, syntax, tag, syntax.u16, syntax.u32)
        if length == UNDEFINED:
            offset = _skip_undefined(buf, value_offset, _nested_syntax(vr, syntax))
        else:
            offset = value_offset + length


def _pixel_data_extent(fp: BinaryIO, head: bytes, offset: int, syntax: _Syntax, file_size: int) -> int | None:
    """Where the pixel data element ends (None when there is none), walking encapsulated fragments."""
    if offset + 8 > len(head):
        return None
    group, element = syntax.tag.unpack_from(head, offset)
    if (group << 16 | element) != PIXEL_DATA:
        return None
    _vr, length, value_offset = _element_header(head, offset, syntax, PIXEL_DATA, syntax.u16, syntax.u32)
    if length != UNDEFINED:
        return value_offset + length
    position = value_offset
    while True:  # encapsulated: items (offset table, fragments) then the sequence delimiter (PS3.5 A.4)
        if position + 8 > file_size:
            raise Truncated(f"element (7FE0,0010) is cut short (encapsulated items incomplete) at {position}")
        fp.seek(position)
        item = fp.read(8)
        item_group, item_element = syntax.tag.unpack_from(item, 0)
        item_length = syntax.u32.unpack_from(item, 4)[0]
        item_tag = item_group << 16 | item_element
        if item_tag == SEQUENCE_DELIMITER:
            return position + 8
        if item_tag != ITEM or item_length == UNDEFINED:
            raise Truncated(f"element (7FE0,0010): expected a fragment item at {position}")
        position += 8 + item_length
