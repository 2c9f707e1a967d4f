"""Query identifiers in and out: what a C-FIND/C-MOVE identifier asks, and the bytes of a C-FIND match.

Both DICOM paths share these. pynetdicom hands the handlers a decoded
pydicom Dataset (:func:`identifier_of`); telepacs' own upper layer reads the
identifier's bytes directly (:func:`read_raw_identifier`) and writes each
match's bytes directly (:func:`encode_elements`) — per element, pydicom's
generic decoding, keyword lookups and writer were most of a small query's
time. Either fast reader or writer declines (returns None) for anything
beyond the plain cases (big endian, deflate, ISO 2022 character sets,
sequences with items, binary values), and pydicom does those.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import pydicom.config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

# Identifier elements that steer the query rather than match (PS3.4 C.4.1.1.3, C.4.1.2.1).
CONTROL_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})
QUERY_LEVEL = 0x00080052
CHARSET = 0x00080005
RETRIEVE_AE = 0x00080054

# Specific Character Set values read and written here; others go through pydicom.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
# VRs whose values use the Specific Character Set (PS3.5 6.1.2.3); the others are the default repertoire.
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_TEXT_VRS = _CHARSET_VRS | frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l"}


@dataclass(frozen=True)
class Identifier:
    """A query identifier's public elements as (tag, VR, keyword, value as text), and its character set."""

    elements: tuple[tuple[int, str, str, str], ...]
    charset: Any  # SpecificCharacterSet as given: None, a term, or several (MultiValue)

    def values(self) -> dict[str, str]:
        return {keyword: text for _, _, keyword, text in self.elements}


def _as_text(value: Any) -> str:
    """An element's value as a matching string (multiple values backslash-joined)."""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def identifier_of(dataset: Dataset) -> Identifier:
    """The identifier pynetdicom decoded (pydicom raises on a malformed element as it is read)."""
    elements = tuple((int(elem.tag), str(elem.VR), elem.keyword, "" if elem.VR == "SQ" else _as_text(elem.value))
                     for elem in dataset if not elem.tag.is_private and elem.keyword)
    return Identifier(elements, dataset.get("SpecificCharacterSet"))


@lru_cache(maxsize=4096)
def _dictionary(tag: int) -> tuple[str, str]:
    """(keyword, VR) of a public tag ("" when unknown)."""
    try:
        return keyword_for_tag(tag), str(dictionary_VR(tag))
    except KeyError:
        return "", ""


def read_raw_identifier(raw: bytes, implicit_vr: bool) -> Identifier | None:
    """The identifier in Little Endian ``raw`` bytes, or None to leave it to pydicom.

    Raises ValueError for bytes that are not a data set (a truncated element).
    """
    elements: list[tuple[int, str, str, str]] = []
    codec = "ascii"
    charset: str | None = None
    position, end = 0, len(raw)
    while position < end:
        if position + 8 > end:
            raise ValueError(f"truncated element header at byte {position}")
        group, number = struct.unpack_from("<HH", raw, position)
        tag = group << 16 | number
        keyword, dictionary_vr = _dictionary(tag) if not group & 1 else ("", "")
        if implicit_vr:
            vr = dictionary_vr
            length = struct.unpack_from("<L", raw, position + 4)[0]
            position += 8
        else:
            vr = raw[position + 4:position + 6].decode("ascii", "replace")
            if vr in _LONG_VRS:
                if position + 12 > end:
                    raise ValueError(f"truncated element header at byte {position}")
                length = struct.unpack_from("<L", raw, position + 8)[0]
                position += 12
            else:
                length = struct.unpack_from("<H", raw, position + 6)[0]
                position += 8
        if length == 0xFFFFFFFF:
            return None  # undefined length (a sequence with items)
        value = raw[position:position + length]
        if len(value) != length:
            raise ValueError(f"element ({group:04X},{number:04X}) runs past the end of the identifier")
        position += length
        if not keyword:
            continue  # private or unknown: neither matched nor returned
        if vr == "SQ":
            if length:
                return None
            text = ""
        elif vr in _TEXT_VRS:
            try:
                text = value.decode(codec if vr in _CHARSET_VRS else "ascii")
            except UnicodeDecodeError:
                return None
            text = _without_padding(vr, text)
        elif length == 0 and vr:
            text = ""
        else:
            return None  # a binary value, or an unknown VR with one
        if tag == CHARSET:
            if text not in _CODECS:
                return None
            charset, codec = text or None, _CODECS[text]
        elements.append((tag, vr, keyword, text))
    return Identifier(tuple(elements), charset)


def _without_padding(vr: str, text: str) -> str:
    """The value as pydicom reads it (per VR: which padding and spaces are not significant), joined again."""
    if vr == "AE":
        return "\\".join(value.strip() for value in text.split("\\"))
    if vr in ("SH", "LO", "UC"):
        return "\\".join(value.rstrip("\x00 ") for value in text.split("\\"))
    if vr in ("DS", "IS"):
        return text.strip().rstrip("\x00 ")
    return text.rstrip("\x00 ")


# -- responses ----------------------------------------------------------------


@dataclass(frozen=True)
class ResponseKeys:
    """What every pending response of one C-FIND carries: the identifier's keys, read once per request.

    Each key is (tag, VR, keyword); sequences go back empty, RetrieveAETitle
    and InstanceAvailability are ours to fill, the rest come from the row.
    """

    keys: tuple[tuple[int, str, str], ...]
    charset: Any

    @classmethod
    def of(cls, identifier: Identifier) -> ResponseKeys:
        keys = tuple((tag, vr, keyword) for tag, vr, keyword, _ in identifier.elements if keyword not in CONTROL_KEYS)
        return cls(keys, identifier.charset)


Elements = dict[int, tuple[str, Any]]  # tag -> (VR, value) of one response identifier


def response_elements(keys: ResponseKeys, level_name: str, row: dict[str, str | int], retrieve_ae: str,
                      response_charset: Any) -> Elements:
    """A pending response's identifier: every key asked for, filled from ``row`` or empty."""
    elements: Elements = {}
    for tag, vr, keyword in keys.keys:
        if vr == "SQ":
            value: Any = None
        elif keyword == "RetrieveAETitle":
            value = retrieve_ae
        elif keyword == "InstanceAvailability":
            value = "ONLINE"
        else:
            value = row.get(keyword, "")
        elements[tag] = (vr, value)
    elements[QUERY_LEVEL] = ("CS", level_name)
    if response_charset is not None:
        elements[CHARSET] = ("CS", response_charset)
    elements[RETRIEVE_AE] = ("AE", retrieve_ae)
    return elements


def response_dataset(elements: Elements) -> Dataset:
    """The response identifier as a pydicom Dataset.

    The values are the index's own (checked when they were received), so the
    elements are built without pydicom's per-value validation: at thousands
    of matches that validation was most of a C-FIND's time.
    """
    dataset = Dataset()
    for tag, (vr, value) in elements.items():
        dataset.add(DataElement(BaseTag(tag), vr, Sequence() if vr == "SQ" else value,
                                validation_mode=pydicom.config.IGNORE))
    return dataset


def encode_elements(elements: Elements, implicit_vr: bool) -> bytes | None:
    """The response identifier in Little Endian bytes, or None to leave it to pydicom."""
    charset = elements.get(CHARSET, ("CS", None))[1]
    codec = _CODECS.get(charset or "") if charset is None or isinstance(charset, str) else None
    if codec is None:
        return None  # several character sets (ISO 2022) or one we do not write here
    parts: list[bytes] = []
    for tag in sorted(elements):
        vr, value = elements[tag]
        raw = _value_bytes(vr, value, codec)
        if raw is None:
            return None
        prefix, length_format, limit = _element_prefix(tag, vr, implicit_vr)
        if len(raw) > limit:
            return None
        parts.append(prefix)
        parts.append(struct.pack(length_format, len(raw)))
        parts.append(raw)
    return b"".join(parts)


@lru_cache(maxsize=1024)
def _element_prefix(tag: int, vr: str, implicit_vr: bool) -> tuple[bytes, str, int]:
    """(tag, VR and reserved bytes; the length's struct format; the largest length it holds) of an element."""
    group, number = tag >> 16, tag & 0xFFFF
    if implicit_vr:
        return struct.pack("<HH", group, number), "<L", 0xFFFFFFFE
    if vr in _LONG_VRS:
        return struct.pack("<HH2sH", group, number, vr.encode("ascii"), 0), "<L", 0xFFFFFFFE
    return struct.pack("<HH2s", group, number, vr.encode("ascii")), "<H", 0xFFFF


def _value_bytes(vr: str, value: Any, codec: str) -> bytes | None:
    if vr == "SQ" or value is None or value == "":
        return b""  # an empty value (a sequence: empty, of defined length)
    if type(value) is str and vr in _TEXT_VRS:
        try:
            raw = value.encode(codec if vr in _CHARSET_VRS else "ascii")
        except UnicodeEncodeError:
            return None
        return raw + (b"\x00" if vr == "UI" else b" ") if len(raw) % 2 else raw
    if vr in _BINARY_NUMBERS:
        numbers: Iterable[Any] = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        try:
            return b"".join(struct.pack("<" + _BINARY_NUMBERS[vr], int(n)) for n in numbers)
        except (ValueError, struct.error):
            return None
    if vr not in _TEXT_VRS:
        return None
    try:
        raw = _as_text(value).encode(codec if vr in _CHARSET_VRS else "ascii")
    except UnicodeEncodeError:
        return None
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw
