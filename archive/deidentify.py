"""De-identification for observers of a consult: PS3.15 Basic Application Level Confidentiality Profile.

Pure functions over a pydicom :class:`~pydicom.dataset.Dataset` (WADO-RS instances) and over the DICOM JSON
model (QIDO-RS results, WADO-RS metadata), applying the same table to both, recursively into sequences:

* identifying attributes are removed (``X``) or emptied / replaced by a pseudonym (``Z``/``D``),
* private attributes are removed, and so are overlay data and overlay text (groups 60xx) and curves (50xx),
* with the **Retain UIDs Option** (PS3.15 E.3.9): observers fetch the images through the same archive by
  UID, so UIDs are kept; the de-identified copy is served, never stored,
* the result says so: Patient Identity Removed = YES, De-identification Method and its Code Sequence
  (DCM 113100 Basic profile, 113110 Retain UIDs), Longitudinal Temporal Information Modified = REMOVED.

Pixel data are not touched: text burned into the pixels (ultrasound, secondary captures, scanned
documents, ...) would still show. :func:`burned_in_text_risk` says when to warn the observer.

References
----------
DICOM PS3.15 Annex E, Table E.1-1 (Application Level Confidentiality Profile Attributes), E.3.9.
"""

from __future__ import annotations

import copy
import io
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import pydicom

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

# Table E.1-1, Basic Profile column: Z = zero-length (or a dummy value), X = remove.
EMPTIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName",
    "StudyID", "StudyDate", "StudyTime", "ContentCreatorName", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "VerifyingObserverName", "PersonName",
)
REMOVED = (
    "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientTelephoneNumbers",
    "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "MilitaryRank",
    "BranchOfService", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "PatientReligiousPreference", "PatientInsurancePlanCodeSequence", "MedicalRecordLocator", "MedicalAlerts",
    "Allergies", "CountryOfResidence", "RegionOfResidence", "PregnancyStatus", "SmokingStatus",
    "LastMenstrualDate", "PatientState", "SpecialNeeds", "ResponsiblePerson", "ResponsibleOrganization",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "StationName", "DeviceSerialNumber", "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "RequestingPhysician", "RequestingService", "ScheduledPerformingPhysicianName", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence", "DischargeDiagnosisDescription",
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "DerivationDescription",
    "RequestAttributesSequence", "ReferencedStudySequence", "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "RequestedProcedureDescription", "RequestedProcedureID",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepID", "ReasonForStudy", "RequestedContrastAgent",
    "StudyComments", "InterpretationText", "TextString", "TextComments", "FrameComments", "ContentSequence",
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "ContentDate",
    "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "InstanceCreatorUID", "CurrentPatientLocation",
    "PatientInstitutionResidence", "AssignedLocation", "ConsultingPhysicianName", "EvaluatorName",
    "PersonAddress", "PersonTelephoneNumbers", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "DigitalSignaturesSequence", "PatientPrimaryLanguageCodeSequence", "AuthorObserverSequence",
    "ParticipantSequence", "VisitComments", "ServiceEpisodeDescription", "ServiceEpisodeID",
    "AcquisitionComments", "DetectorID",
)


def _tags(keywords: tuple[str, ...]) -> frozenset[int]:
    found = {tag_for_keyword(k) for k in keywords}
    missing = [k for k in keywords if tag_for_keyword(k) is None]
    if missing:  # a typo here would silently leak an attribute
        raise RuntimeError(f"unknown DICOM keywords in the de-identification table: {missing}")
    return frozenset(t for t in found if t is not None)


EMPTIED_TAGS = _tags(EMPTIED)
REMOVED_TAGS = _tags(REMOVED)
_PATIENT_NAME = int(Tag("PatientName"))
_PATIENT_ID = int(Tag("PatientID"))

# Modalities and SOP classes whose pixels often carry burned-in text (names, dates, hospital).
BURNED_IN_MODALITIES = frozenset({"US", "ES", "XC", "SC", "OT", "DOC", "GM", "SM", "IVUS", "OP", "XA", "RF"})
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_DOCUMENT_PREFIX = "1.2.840.10008.5.1.4.1.1.104"

DEID_METHOD = "DICOM PS3.15 Basic Application Level Confidentiality Profile, Retain UIDs Option (telepacs)"
DEID_CODES = (("113100", "Basic Application Confidentiality Profile"), ("113110", "Retain UIDs Option"))


def _removed_group(tag: int) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    if group & 1:  # private (odd group), including private creators
        return True
    if 0x5000 <= group <= 0x50FF and not group & 1:  # curves (retired)
        return True
    if 0x6000 <= group <= 0x60FF and not group & 1:
        # Overlay Data (60xx,3000), Description (0022), Label (1500), Comments (4000): pictures and text.
        return element in (0x3000, 0x0022, 0x1500, 0x4000)
    return False


def action_for(tag: int) -> str:
    """``X`` remove, ``Z`` empty (or pseudonym), ``K`` keep."""
    if tag in REMOVED_TAGS or _removed_group(tag):
        return "X"
    if tag in EMPTIED_TAGS:
        return "Z"
    return "K"


@dataclass
class DeidResult:
    dataset: Dataset
    removed: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)
    burned_in_warning: str = ""


def _pseudonym_value(tag: int, pseudonym: str) -> str:
    if tag == _PATIENT_NAME:
        return pseudonym.replace("-", "^", 1)
    if tag == _PATIENT_ID:
        return pseudonym
    return ""


def _clean(ds: Dataset, pseudonym: str, result: DeidResult) -> None:
    for elem in list(ds):
        tag = int(elem.tag)
        action = action_for(tag)
        if action == "X":
            del ds[elem.tag]
            result.removed.append(elem.keyword or f"{tag:08X}")
        elif action == "Z":
            elem.value = _pseudonym_value(tag, pseudonym) or None
            result.emptied.append(elem.keyword)
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, pseudonym, result)


def _mark(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    codes = []
    for value, meaning in DEID_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def deidentify_dataset(ds: Dataset, pseudonym: str) -> DeidResult:
    """A de-identified copy of ``ds`` (the original is untouched). ``pseudonym`` e.g. ``CONSULT-12``."""
    out = copy.deepcopy(ds)
    result = DeidResult(out)
    _clean(out, pseudonym, result)
    _mark(out)
    if out.get("PatientName") is None:
        out.PatientName = _pseudonym_value(_PATIENT_NAME, pseudonym)
    if out.get("PatientID") is None:
        out.PatientID = pseudonym
    result.burned_in_warning = burned_in_text_risk(ds)
    return result


def burned_in_text_risk(ds: Dataset | dict[str, Any]) -> str:
    """Why text may be burned into the pixels ('' when nothing suggests it)."""
    get = (lambda kw: str(ds.get(kw, "") or "")) if isinstance(ds, Dataset) else \
        (lambda kw: _json_first(ds, kw))
    if get("BurnedInAnnotation").upper() == "YES":
        return "BurnedInAnnotation is YES"
    modality = get("Modality").upper()
    if modality in BURNED_IN_MODALITIES and get("BurnedInAnnotation").upper() != "NO":
        return f"modality {modality} often carries burned-in text"
    sop_class = get("SOPClassUID")
    if sop_class.startswith((SECONDARY_CAPTURE_PREFIX, ENCAPSULATED_DOCUMENT_PREFIX)):
        return "secondary capture or document: may show identifying text"
    return ""


def _json_key(keyword: str) -> str:
    return f"{int(Tag(keyword)):08X}"


def _json_first(obj: dict[str, Any], keyword: str) -> str:
    values = obj.get(_json_key(keyword), {}).get("Value") or []
    first = values[0] if values else ""
    return str(first.get("Alphabetic", "")) if isinstance(first, dict) else str(first)


def deidentify_json(obj: dict[str, Any], pseudonym: str) -> dict[str, Any]:
    """The same profile over one DICOM JSON object (PS3.18 F.2); returns a new object, adds the markers."""
    out = _clean_json(obj, pseudonym)
    out[_json_key("PatientIdentityRemoved")] = {"vr": "CS", "Value": ["YES"]}
    out[_json_key("DeidentificationMethod")] = {"vr": "LO", "Value": [DEID_METHOD]}
    out[_json_key("DeidentificationMethodCodeSequence")] = {"vr": "SQ", "Value": [
        {"00080100": {"vr": "SH", "Value": [v]}, "00080102": {"vr": "SH", "Value": ["DCM"]},
         "00080104": {"vr": "LO", "Value": [m]}} for v, m in DEID_CODES]}
    out[_json_key("LongitudinalTemporalInformationModified")] = {"vr": "CS", "Value": ["REMOVED"]}
    for keyword in ("PatientName", "PatientID"):
        key = _json_key(keyword)
        if key not in out:
            out[key] = _json_pseudonym(int(Tag(keyword)), pseudonym)
    return dict(sorted(out.items()))


def _json_pseudonym(tag: int, pseudonym: str) -> dict[str, Any]:
    vr = dictionary_VR(BaseTag(tag))
    value = _pseudonym_value(tag, pseudonym)
    if not value:
        return {"vr": vr}
    return {"vr": vr, "Value": [{"Alphabetic": value} if vr == "PN" else value]}


def _clean_json(obj: dict[str, Any], pseudonym: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, element in obj.items():
        tag = int(key, 16)
        action = action_for(tag)
        if action == "X":
            continue
        if action == "Z":
            out[key] = _json_pseudonym(tag, pseudonym) | {"vr": element.get("vr", dictionary_VR(BaseTag(tag)))}
        elif element.get("vr") == "SQ" and element.get("Value"):
            out[key] = {"vr": "SQ", "Value": [_clean_json(item, pseudonym) for item in element["Value"]]}
        else:
            out[key] = element
    return out


# -- Part 10 files, streamed ------------------------------------------------------------------------------

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float and Double Float Pixel Data
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
HEADER_LIMIT = 4 << 20  # a header (everything before the pixel data) larger than this is de-identified whole


def deidentified_part10(data: bytes, pseudonym: str) -> bytes:
    """A whole stored Part 10 instance, de-identified (pixel data as stored), in memory."""
    ds = pydicom.dcmread(io.BytesIO(data))
    out = io.BytesIO()
    deidentify_dataset(ds, pseudonym).dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


class _Stream:
    """Bytes already read (the head of the file), then the rest of a binary stream: exact reads and copies."""

    def __init__(self, head: bytes, rest: BinaryIO, chunk: int) -> None:
        self._head = memoryview(head)
        self._rest = rest
        self._chunk = chunk

    def read(self, size: int) -> bytes:
        taken = bytes(self._head[:size])
        self._head = self._head[len(taken):]
        while len(taken) < size:
            more = self._rest.read(size - len(taken))
            if not more:
                raise EOFError(f"the stored object ends {size - len(taken)} bytes short inside the pixel data")
            taken += more
        return taken

    def copy(self, size: int) -> Iterator[bytes]:
        while size > 0:
            piece = self.read(min(size, self._chunk))
            size -= len(piece)
            yield piece


def _pixel_element(stream: _Stream, implicit: bool, little: bool) -> Iterator[bytes]:
    """The pixel data element as stored: its header and value (native or encapsulated), and nothing after it.

    What may follow the pixel data in a file (Data Set Trailing Padding, Digital Signatures Sequence, private
    elements) is removed by the Basic Profile anyway: the copy stops at the end of the element.
    """
    order = "<" if little else ">"
    header = stream.read(8)
    group, element = struct.unpack(order + "HH", header[:4])
    if implicit:
        (length,) = struct.unpack(order + "L", header[4:])
    elif header[4:6] in _LONG_VRS:
        header += stream.read(4)
        (length,) = struct.unpack(order + "L", header[8:])
    else:
        (length,) = struct.unpack(order + "H", header[6:])
    yield header
    if length != _UNDEFINED:
        yield from stream.copy(length)
        return
    while True:  # encapsulated: items (always little endian, PS3.5 A.4) up to the sequence delimiter
        item = stream.read(8)
        tag_group, tag_element, item_length = struct.unpack("<HHL", item)
        yield item
        if (tag_group << 16) | tag_element == _SEQUENCE_END:
            return
        if (tag_group << 16) | tag_element != _ITEM or item_length == _UNDEFINED:
            raise ValueError(f"unexpected tag ({tag_group:04X},{tag_element:04X}) in encapsulated pixel data")
        yield from stream.copy(item_length)


def deidentified_part10_stream(f: BinaryIO, pseudonym: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A stored Part 10 instance read from ``f``, de-identified, as chunks; the pixel data are copied through.

    Only the header (at most :data:`HEADER_LIMIT` bytes) is held in memory: a 500 MB multi-frame is served
    to an observer in ``chunk``-sized pieces. The output equals :func:`deidentified_part10` of the whole
    file but for elements after the pixel data, which the profile removes. A deflated dataset, or a header
    larger than the limit, is de-identified whole (in memory).
    """
    head = f.read(HEADER_LIMIT)
    truncated = len(head) == HEADER_LIMIT  # the file goes on past what was read
    buffer = io.BytesIO(head)
    try:
        ds = pydicom.dcmread(buffer, stop_before_pixels=True)
    except (EOFError, ValueError, OSError):
        if not truncated:
            raise
        ds = None  # a header larger than the limit
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds is not None else ""
    little = syntax != ExplicitVRBigEndian
    pixel_at = buffer.tell()
    tag = struct.unpack(("<" if little else ">") + "HH", head[pixel_at:pixel_at + 4]) if len(head) >= pixel_at + 8 else None
    has_pixels = tag is not None and (tag[0] << 16 | tag[1]) in _PIXEL_TAGS
    if ds is None or syntax == DeflatedExplicitVRLittleEndian or (truncated and not has_pixels):
        yield deidentified_part10(head + f.read(), pseudonym)
        return
    out = io.BytesIO()
    deidentify_dataset(ds, pseudonym).dataset.save_as(out, enforce_file_format=True)
    yield out.getvalue()
    if has_pixels:
        yield from _pixel_element(_Stream(head[pixel_at:], f, chunk), syntax == ImplicitVRLittleEndian, little)
