"""Read what the index needs from a received DICOM Part 10 file, and refuse what is broken.

The pixel data is never loaded: the header is parsed with large values
deferred, and the declared lengths of the top-level elements are checked
against the file size, so a truncated file is refused instead of being
catalogued as if it were whole.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pydicom
import pydicom.charset
import pydicom.datadict
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID

from archive.header_scan import ScanUnsupported, Truncated, scan_part10
from archive.keys import InvalidUID, validate_uid

_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER_SIZE = 4096


class InvalidDataset(ValueError):
    """A file that is not a usable DICOM instance (not DICOM, truncated, missing required UIDs)."""


@dataclass(frozen=True)
class ParsedInstance:
    """The index attributes of one instance, decoded to Unicode."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    study_id: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None
    number_of_frames: int = 1
    rows: int | None = None
    columns: int | None = None
    slice_position: float | None = None
    display: dict[str, Any] = field(default_factory=dict)
    dataset_offset: int = 0  # where the dataset starts in the Part 10 file (after the file meta group)


def fold_name(name: str) -> str:
    """Lower-case, diacritic-free form of a person name: ``Nguyễn^Văn A`` -> ``nguyen^van a``.

    Vietnamese đ/Đ is not a combining mark, so it is mapped explicitly.
    """
    decomposed = unicodedata.normalize("NFKD", name.replace("đ", "d").replace("Đ", "D"))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


# VRs whose bytes follow Specific Character Set; the rest are ASCII (PS3.5 §6.1.2.3).
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_BINARY_INT_VRS = {"US": 2, "SS": 2, "UL": 4, "SL": 4}
_PN_DELIMITERS = {0x5E, 0x3D, 0x5C}  # ^ = and the value separator
_TEXT_DELIMITERS = set(pydicom.charset.TEXT_VR_DELIMS) | {0x5C}


@functools.lru_cache(maxsize=None)
def _tag_for_keyword(keyword: str) -> int | None:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return int(tag) if tag is not None else None


@functools.lru_cache(maxsize=None)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return pydicom.datadict.dictionary_VR(tag)
    except KeyError:
        return None


class _Values:
    """Reads attribute values straight from a freshly parsed dataset's raw elements.

    Going through ``Dataset.__getattr__`` converts each element with
    pydicom's full machinery (value validation, hooks, MultiValue objects);
    for the ~40 attributes the index takes from every received instance
    that was most of the cost of parsing. Plain text, numbers and names are
    decoded here; anything else (already converted, deferred, unusual VR)
    falls back to pydicom.

    The elements are looked up by plain ``int`` tag: pydicom's ``BaseTag`` keys
    compare through a Python ``__eq__``, which made each lookup cost a microsecond.
    """

    def __init__(self, ds: Dataset | None = None, *,
                 elements: dict[BaseTag, DataElement | RawDataElement] | None = None) -> None:
        self._ds = ds
        self._source = ds._dict if ds is not None else (elements or {})
        self._elements: dict[int, Any] = {int(tag): elem for tag, elem in self._source.items()}
        self._encodings: list[str] | None = None

    @property
    def ds(self) -> Dataset:
        """The elements as a pydicom dataset (built only when a value needs pydicom's conversion)."""
        if self._ds is None:
            self._ds = Dataset(self._source)
        return self._ds

    def _charset(self) -> list[str]:
        if self._encodings is None:
            declared = self.text("SpecificCharacterSet")
            if declared is not None and "\\" in declared:
                self._encodings = pydicom.charset.convert_encodings(declared.split("\\"))
            else:
                self._encodings = pydicom.charset.convert_encodings(declared)
        return self._encodings

    def _raw(self, keyword: str) -> tuple[str, RawDataElement, bytes] | None | Literal[False]:
        """(VR, element, bytes) of a raw element; False when the dataset has no such element;
        None when pydicom must convert the value."""
        tag = _tag_for_keyword(keyword)
        if tag is None:
            return None
        elem = self._elements.get(tag)
        if elem is None:
            return False
        if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes):
            return None
        vr = elem.VR or _dictionary_vr(tag)
        if vr is None:
            return None
        return vr, elem, elem.value

    def text(self, keyword: str) -> str | None:
        """The value as text (multiple values joined by backslash), or None when absent."""
        found = self._raw(keyword)
        if found is False:
            return None
        if found is not None:
            vr, elem, raw = found
            if vr in _CHARSET_VRS:
                if raw.isascii() and 0x1B not in raw:
                    # ASCII without ISO 2022 escapes reads the same in every character set DICOM allows.
                    text = raw.decode("ascii")
                else:
                    delimiters = _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS
                    text = pydicom.charset.decode_bytes(raw, self._charset(), delimiters)
                return "\\".join(v.strip(" \x00") for v in text.split("\\")).strip()
            if vr in _ASCII_VRS:
                text = raw.decode("ascii", "replace")
                return "\\".join(v.strip(" \x00") for v in text.split("\\")).strip()
            if vr in _BINARY_INT_VRS and len(raw) >= _BINARY_INT_VRS[vr]:
                size = _BINARY_INT_VRS[vr]
                order: Literal["little", "big"] = "little" if elem.is_little_endian else "big"
                numbers = [int.from_bytes(raw[i * size:(i + 1) * size], order, signed=vr[0] == "S")
                           for i in range(len(raw) // size)]
                return "\\".join(str(n) for n in numbers)
        value = self.ds.get(keyword)
        if value is None:
            return None
        if isinstance(value, (list, pydicom.multival.MultiValue)):
            return "\\".join(str(v) for v in value)
        return str(value).strip()


def _text(values: _Values, keyword: str, limit: int = 256) -> str:
    return (values.text(keyword) or "")[:limit]


def _int_or_none(values: _Values, keyword: str) -> int | None:
    text = values.text(keyword)
    if not text:
        return None
    try:
        return int(text.split("\\")[0])
    except ValueError:
        try:
            return int(float(text.split("\\")[0]))
        except ValueError:
            return None


def _floats(values: _Values, keyword: str) -> list[float] | None:
    text = values.text(keyword)
    if not text:
        return None
    try:
        floats = [float(v) for v in text.split("\\")]
    except ValueError:
        return None
    return floats if all(math.isfinite(v) for v in floats) else None


def slice_position(ds: Dataset | _Values) -> float | None:
    """Position of the slice along the normal of its plane (PS3.3 C.7.6.2), else SliceLocation."""
    values = ds if isinstance(ds, _Values) else _Values(ds)
    position = _floats(values, "ImagePositionPatient")
    orientation = _floats(values, "ImageOrientationPatient")
    if position and orientation and len(position) == 3 and len(orientation) == 6:
        r, c = orientation[:3], orientation[3:]
        normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        return sum(p * n for p, n in zip(position, normal))
    location = _floats(values, "SliceLocation")
    return location[0] if location else None


_DISPLAY_FLOATS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "WindowCenter",
    "WindowWidth",
    "RescaleSlope",
    "RescaleIntercept",
    "FrameTime",
)
_DISPLAY_INTS = ("BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames")
_DISPLAY_TEXT = ("PhotometricInterpretation", "RescaleType", "WindowCenterWidthExplanation", "ImageType")


def display_metadata(ds: Dataset | _Values) -> dict[str, Any]:
    """What a viewer needs to place and window an image without opening the file."""
    values = ds if isinstance(ds, _Values) else _Values(ds)
    meta: dict[str, Any] = {}
    for keyword in _DISPLAY_FLOATS:
        value = _floats(values, keyword)
        if value is not None:
            meta[keyword] = value
    for keyword in _DISPLAY_INTS:
        number = _int_or_none(values, keyword)
        if number is not None:
            meta[keyword] = number
    for keyword in _DISPLAY_TEXT:
        text = _text(values, keyword)
        if text:
            meta[keyword] = text
    return meta


def _check_complete(ds: Dataset, file_size: int, path: Path) -> None:
    """Refuse a file whose top-level elements declare more bytes than the file holds."""
    for tag in ds._dict:
        elem = ds._dict[tag]
        if not isinstance(elem, RawDataElement) or elem.value_tell is None:
            continue
        if elem.length == _UNDEFINED_LENGTH:
            consumed = len(elem.value) + 8 if isinstance(elem.value, (bytes, bytearray)) else 0
            end = elem.value_tell + consumed
            if isinstance(elem.value, (bytes, bytearray)) and not _items_tile(bytes(elem.value), elem.is_little_endian):
                raise InvalidDataset(f"{path.name}: element {elem.tag} is cut short (encapsulated items incomplete)")
        else:
            end = elem.value_tell + elem.length
        if end > file_size:
            raise InvalidDataset(
                f"{path.name}: truncated: element {elem.tag} needs {end} bytes, the file has {file_size}"
            )


def _items_tile(value: bytes, little_endian: bool) -> bool:
    """True when ``value`` is a whole sequence of (FFFE,E000) items, as encapsulated pixel data is."""
    order: Literal["little", "big"] = "little" if little_endian else "big"
    offset = 0
    while offset < len(value):
        if offset + 8 > len(value):
            return False
        group = int.from_bytes(value[offset:offset + 2], order)
        element = int.from_bytes(value[offset + 2:offset + 4], order)
        length = int.from_bytes(value[offset + 4:offset + 8], order)
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED_LENGTH:
            # Not encapsulated pixel data (e.g. a sequence): nothing more we can check cheaply.
            return True
        offset += 8 + length
    return offset == len(value)


def read_instance(path: Path, *, fast_scan: bool = True) -> tuple[ParsedInstance, FileMetaDataset]:
    """Parse the header of a Part 10 file at ``path``; raise :class:`InvalidDataset` if unusable.

    ``fast_scan=False`` reads with pydicom only (the scan's reference in tests).
    """
    parsed, meta = _read(path, fast_scan)
    return parsed, meta if isinstance(meta, FileMetaDataset) else FileMetaDataset(meta)


def parse_instance(path: Path) -> ParsedInstance:
    """:func:`read_instance` without the file meta dataset (what ingest needs)."""
    return _read(path, True)[0]


def _read(path: Path, fast_scan: bool) -> tuple[ParsedInstance, FileMetaDataset | dict[BaseTag, Any]]:
    size = path.stat().st_size
    meta: FileMetaDataset | dict[BaseTag, Any]
    try:
        if not fast_scan:
            raise ScanUnsupported("pydicom requested")
        with open(path, "rb") as fp:
            header = scan_part10(fp, size)
    except Truncated as exc:
        raise InvalidDataset(f"{path.name}: truncated: {exc}") from None
    except ScanUnsupported:
        ds, meta, offset = _read_with_pydicom(path, size)
        values = _Values(ds)
    else:
        values = _Values(elements=header.elements)
        meta = header.meta
        offset = header.dataset_offset
    try:
        transfer_syntax = validate_uid(_Values(elements=meta).text("TransferSyntaxUID")
                                       if isinstance(meta, dict) else _Values(meta).text("TransferSyntaxUID"),
                                       "TransferSyntaxUID")
        sop_instance_uid = validate_uid(values.text("SOPInstanceUID"), "SOPInstanceUID")
        sop_class_uid = validate_uid(values.text("SOPClassUID"), "SOPClassUID")
        study_uid = validate_uid(values.text("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = validate_uid(values.text("SeriesInstanceUID"), "SeriesInstanceUID")
    except InvalidUID as exc:
        raise InvalidDataset(f"{path.name}: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidDataset(f"{path.name}: cannot decode a UID: {exc}") from None
    try:
        parsed = _parsed(values, sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax, offset)
    except (ValueError, TypeError, KeyError, LookupError, UnicodeDecodeError) as exc:
        raise InvalidDataset(f"{path.name}: cannot decode attributes: {type(exc).__name__}: {exc}") from None
    return parsed, meta


def _read_with_pydicom(path: Path, size: int) -> tuple[Dataset, FileMetaDataset, int]:
    """pydicom's reader, for what the fast scan does not handle (e.g. deflated data sets)."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
    except InvalidDicomError as exc:
        raise InvalidDataset(f"{path.name}: not a DICOM Part 10 file: {exc}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        # pydicom raises these for bytes it cannot decode.
        raise InvalidDataset(f"{path.name}: cannot decode dataset: {type(exc).__name__}: {exc}") from None
    _check_complete(ds, size, path)
    meta = ds.file_meta
    group_length = meta.get("FileMetaInformationGroupLength")
    if isinstance(group_length, int) and 0 < group_length < size:
        # Preamble and "DICM" (132 bytes), the group length element (12), then the group.
        offset = 132 + 12 + group_length
    else:
        with open(path, "rb") as fp:
            offset = dataset_offset(fp)
    return ds, meta, offset


def _parsed(values: _Values, sop: str, sop_class: str, study: str, series: str, ts: str,
            offset: int) -> ParsedInstance:
    frames = _int_or_none(values, "NumberOfFrames")
    return ParsedInstance(
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        study_uid=study,
        series_uid=series,
        transfer_syntax_uid=ts,
        patient_id=_text(values, "PatientID", 64),
        issuer_of_patient_id=_text(values, "IssuerOfPatientID", 64),
        patient_name=_text(values, "PatientName", 324),
        patient_birth_date=_text(values, "PatientBirthDate", 8),
        patient_sex=_text(values, "PatientSex", 16),
        study_date=_text(values, "StudyDate", 8),
        study_time=_text(values, "StudyTime", 16),
        accession_number=_text(values, "AccessionNumber", 64),
        study_description=_text(values, "StudyDescription", 256),
        referring_physician_name=_text(values, "ReferringPhysicianName", 324),
        study_id=_text(values, "StudyID", 16),
        modality=_text(values, "Modality", 16),
        series_number=_int_or_none(values, "SeriesNumber"),
        series_description=_text(values, "SeriesDescription", 256),
        body_part_examined=_text(values, "BodyPartExamined", 64),
        instance_number=_int_or_none(values, "InstanceNumber"),
        number_of_frames=frames if frames and frames > 0 else 1,
        rows=_int_or_none(values, "Rows"),
        columns=_int_or_none(values, "Columns"),
        slice_position=slice_position(values),
        display=display_metadata(values),
        dataset_offset=offset,
    )


def dataset_offset(fp: BinaryIO) -> int:
    """Offset of the dataset after the preamble and file meta group of a Part 10 stream."""
    fp.seek(0)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return fp.tell()


def wrap_raw_dataset(src: BinaryIO, dst: BinaryIO, *, source_ae: str | None = None) -> None:
    """Write a Part 10 file to ``dst`` from a raw dataset (no preamble, no file meta) in ``src``.

    The dataset bytes are copied unchanged; the transfer syntax is the one
    pydicom detects (implicit or explicit VR little endian).
    """
    src.seek(0)
    try:
        ds = pydicom.dcmread(src, force=True, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bytes that are not DICOM
        raise InvalidDataset(f"not DICOM: cannot decode ({type(exc).__name__}: {exc})") from None
    if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID"):
        raise InvalidDataset("not DICOM: no DICM header and no SOP Class/Instance UID in the data")
    implicit = ds.original_encoding[0]
    little = ds.original_encoding[1]
    if implicit:
        ts = pydicom.uid.ImplicitVRLittleEndian
    elif little:
        ts = pydicom.uid.ExplicitVRLittleEndian
    else:
        ts = pydicom.uid.ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.get("SOPClassUID", "")))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", "")))
    meta.TransferSyntaxUID = ts
    write_part10_header(dst, meta, source_ae=source_ae)
    src.seek(0)
    while chunk := src.read(1 << 20):
        dst.write(chunk)


# A UUID-derived UID (PS3.5 §B.2): ours without registering a root.
TELEPACS_IMPLEMENTATION_UID = UID("2.25.161225328703702992941866406200778916275")
TELEPACS_IMPLEMENTATION_VERSION = "TELEPACS_010"


def write_part10_header(dst: BinaryIO, meta: FileMetaDataset, *, source_ae: str | None = None) -> None:
    """Preamble, ``DICM`` and the file meta group (PS3.10 §7.1) with telepacs as the implementation."""
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = TELEPACS_IMPLEMENTATION_UID
    meta.ImplementationVersionName = TELEPACS_IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae.strip()
    dst.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(dst, meta, enforce_standard=True)  # type: ignore[arg-type]
