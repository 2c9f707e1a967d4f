"""DIMSE handlers: an event in, archive calls, a named status out.

Each handler is bound with the archive as its extra argument, e.g.
``(evt.EVT_C_STORE, handle_store, [archive])``. No SQL, storage keys or
parsing here: that is the archive's job.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Iterator, cast

import pydicom
import pydicom.config
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import Status

from archive.index import IndexUnavailable, Source
from archive.matching import InvalidValue, Level, MatchKey, UnsupportedKey, parse_level
from archive.query import find
from archive.service import Archive, Expected, IngestError, IngestFailure
from dicom_node import polling
from dicom_node.identifiers import (
    CONTROL_KEYS,
    Elements,
    Identifier,
    ResponseKeys,
    identifier_of,
    response_dataset,
    response_elements,
)
from storage import StorageError

log = logging.getLogger(__name__)

# Named DICOM statuses (PS3.4 Annex B.2 for the Storage Service Class).
Status.add("OUT_OF_RESOURCES", 0xA700)  # Refused: Out of Resources
Status.add("DATASET_DOES_NOT_MATCH_SOP_CLASS", 0xA900)  # Error: Data Set does not match SOP Class
Status.add("CANNOT_UNDERSTAND", 0xC000)  # Error: Cannot understand
Status.add("DUPLICATE_SOP_INSTANCE", 0x0111)  # Failure: Duplicate SOP Instance (PS3.7 C.4.2.1.4)
Status.add("PROCESSING_FAILURE", 0x0110)  # Failure: Processing failure (PS3.7 C.4.2.1.4)
# Query/Retrieve - FIND (PS3.4 C.4.1.1.4, Table C.4-1).
Status.add("IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS", 0xA900)  # Failure: Identifier does not match SOP Class
Status.add("UNABLE_TO_PROCESS", 0xC000)  # Failure: Unable to process (0xC000-0xCFFF)
# Query/Retrieve - MOVE and GET (PS3.4 C.4.2.1.5, C.4.3.1.4): 0xA900 and 0xC000 as for FIND;
Status.add("UNABLE_TO_CALCULATE_MATCHES", 0xA701)  # Refused: Out of Resources - Unable to calculate number of matches
# pynetdicom itself sends 0xA801 (Move Destination unknown, Status.MOVE_DESTINATION_UNKNOWN),
# 0xA702 (all sub-operations failed) and 0xB000 (some failed, with FailedSOPInstanceUIDList).

_STORE_STATUS_FOR_FAILURE: dict[IngestFailure, int] = {
    IngestFailure.INVALID_DATASET: Status.CANNOT_UNDERSTAND,  # type: ignore[attr-defined]
    IngestFailure.UID_MISMATCH: Status.CANNOT_UNDERSTAND,  # type: ignore[attr-defined]
    IngestFailure.SOP_CLASS_MISMATCH: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,  # type: ignore[attr-defined]
    IngestFailure.DUPLICATE_REJECTED: Status.DUPLICATE_SOP_INSTANCE,  # type: ignore[attr-defined]
    IngestFailure.STORAGE_UNAVAILABLE: Status.OUT_OF_RESOURCES,  # type: ignore[attr-defined]
    IngestFailure.INDEX_UNAVAILABLE: Status.OUT_OF_RESOURCES,  # type: ignore[attr-defined]
}


def store_status_for(failure: IngestFailure) -> int:
    """The C-STORE failure status for a refused instance."""
    return _STORE_STATUS_FOR_FAILURE[failure]


def peer_of(event: Event) -> tuple[str, str]:
    """(calling AE title, address) of the association's requestor."""
    requestor = event.assoc.requestor
    return requestor.ae_title.strip(), str(requestor.address)


def handle_echo(event: Event, archive: Archive) -> int:
    ae_title, host = peer_of(event)
    log.info("C-ECHO from %s@%s", ae_title, host)
    return int(Status.SUCCESS)  # 0x0000


def handle_store(event: Event, archive: Archive) -> int:
    """C-STORE: the received dataset is already in a Part 10 file (chunked receive); ingest it."""
    ae_title, host = peer_of(event)
    source = Source("dicom", ae_title=ae_title, host=host, facility=archive.facility_for(ae_title))
    request = cast(C_STORE, event.request)
    expected = Expected(
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
    )
    path = Path(event.dataset_path)
    try:
        archive.ingest_file(path, source, expected=expected, move=True)
    except IngestError as exc:
        return store_status_for(exc.failure)
    return int(Status.SUCCESS)  # 0x0000


def handle_requested(event: Event, archive: Archive) -> None:
    """Association requested: apply the calling-AE allow-list (with host) before negotiation."""
    primitive = event.assoc.requestor.primitive
    ae_title = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    host = str(event.assoc.requestor.address)
    if not archive.settings.caller_allowed(ae_title, host):
        log.warning("association rejected: calling AE %r from %s is not in the allow-list", ae_title, host)
        # Rejected permanent (0x01), by the DUL service user (0x01): calling AE title not recognised (0x03).
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.is_rejected = True
        event.assoc.kill()


def handle_established(event: Event, archive: Archive) -> None:
    ae_title, host = peer_of(event)
    log.info("association from %s@%s established", ae_title, host)


def handle_aborted(event: Event, archive: Archive) -> None:
    ae_title, host = peer_of(event)
    log.warning("association from %s@%s aborted; instances already acknowledged are stored", ae_title, host)
    discard_partial_dataset(event)


def handle_conn_close(event: Event, archive: Archive) -> None:
    discard_partial_dataset(event)


def discard_partial_dataset(event: Event) -> None:
    """Delete the temporary file of a C-STORE cut off mid-transfer (pynetdicom leaves it behind)."""
    message = getattr(event.assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    message._data_set_file = None  # type: ignore[union-attr]
    try:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)
    except OSError as exc:
        log.error("could not remove partial dataset %s: %s", partial.name, exc)
        return
    ae_title, host = peer_of(event)
    log.warning("discarded the incomplete dataset of an interrupted C-STORE from %s@%s", ae_title, host)


# -- C-FIND ----------------------------------------------------------------------

# The levels each information model has (PS3.4 C.3.1, C.3.2): Study Root has no PATIENT level.
_FIND_LEVELS: dict[str, tuple[str, frozenset[Level]]] = {
    str(PatientRootQueryRetrieveInformationModelFind): ("Patient Root", frozenset(Level)),
    str(StudyRootQueryRetrieveInformationModelFind): (
        "Study Root", frozenset({Level.STUDY, Level.SERIES, Level.IMAGE})),
}
# What a malformed identifier raises when pydicom decodes its elements lazily.
_DECODE_ERRORS = (InvalidDicomError, BytesLengthException, ValueError, TypeError, KeyError, IndexError, EOFError,
                  struct.error, NotImplementedError)


class FindRefused(Exception):
    """A C-FIND request we answer with a failure status (and a log line)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def read_identifier(event: Event, models: dict[str, tuple[str, frozenset[Level]]] | None = None,
                     ) -> tuple[Level, str, Identifier, list[MatchKey]]:
    """(level, model name, identifier, keys) of a C-FIND/C-MOVE/C-GET request, or :class:`FindRefused`.

    ``event.identifier`` is pynetdicom's decoded Dataset, or an :class:`Identifier`
    telepacs' own upper layer read from the bytes.
    """
    request = cast(C_FIND | C_MOVE | C_GET, event.request)
    model = (_FIND_LEVELS if models is None else models).get(str(request.AffectedSOPClassUID or ""))
    if model is None:  # not negotiated in build_ae, so not expected here
        raise FindRefused(int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # type: ignore[attr-defined]
                          f"unsupported information model {request.AffectedSOPClassUID}")
    model_name, levels = model
    try:
        source = event.identifier
        identifier = source if isinstance(source, Identifier) else identifier_of(source)
    except _DECODE_ERRORS as exc:
        raise FindRefused(int(Status.UNABLE_TO_PROCESS),  # type: ignore[attr-defined]
                          f"the identifier cannot be decoded: {type(exc).__name__}: {exc}") from exc
    values = identifier.values()
    if not values.get("QueryRetrieveLevel", "").strip():
        raise FindRefused(int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # type: ignore[attr-defined]
                          "the identifier has no QueryRetrieveLevel")
    try:
        level = parse_level(values["QueryRetrieveLevel"].strip())
    except InvalidValue as exc:
        raise FindRefused(int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # type: ignore[attr-defined]
                          str(exc)) from exc
    if level not in levels:
        raise FindRefused(int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # type: ignore[attr-defined]
                          f"the {model_name} information model has no {level.value} level")
    # PatientName is always matched case- and diacritic-insensitively (see handle_find).
    keys = [MatchKey(keyword, value, fuzzy=True if keyword == "PatientName" else None)
            for keyword, value in values.items() if keyword not in CONTROL_KEYS]
    return level, model_name, identifier, keys


def _encodable(texts: list[str], charset: Any) -> bool:
    """Whether the query's single-byte character set can encode ``texts`` without replacement characters.

    Code-extension sets (several values, ISO 2022) are trusted to pydicom.
    """
    if isinstance(charset, (MultiValue, list)) and len(charset) != 1:
        return True
    term = str(charset[0] if isinstance(charset, (MultiValue, list)) else charset).strip()
    codec = python_encoding.get(term)
    if codec is None:
        return True
    try:
        for text in texts:
            text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def response_charset(query_charset: Any, row: dict[str, str | int]) -> Any:
    """The SpecificCharacterSet of a match: the query's, or ISO_IR 192 when a value needs it (None: default)."""
    texts = [v for v in row.values() if isinstance(v, str) and not v.isascii()]
    if query_charset is not None and _encodable(texts, query_charset):
        return query_charset
    return "ISO_IR 192" if texts else query_charset


def handle_find(event: Event, archive: Archive) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND for pynetdicom: :func:`find_matches`, each match as a pydicom Dataset."""
    matches = find_matches(event, archive)
    try:
        for status, elements in matches:
            yield status, None if elements is None else response_dataset(elements)
    finally:
        matches.close()


def find_matches(event: Event, archive: Archive) -> Generator[tuple[int, Elements | None], None, None]:
    """C-FIND (Patient Root and Study Root, PATIENT to IMAGE level): one pending response per match.

    Matches are read from :func:`archive.query.find` as they stream from the
    index; a C-CANCEL is checked before each pending response. PatientName is
    always matched with the folded name (case- and diacritic-insensitive:
    ``nguyen*`` finds ``Nguyễn^Văn A``), whether or not the peer negotiated
    fuzzy semantic matching of person names: Vietnamese names arrive in many
    spellings. Responses carry the query's SpecificCharacterSet; ISO_IR 192
    (UTF-8) instead when the query had none and a value is not ASCII, or when
    a value cannot be written in the query's single-byte set (``Nguyễn`` in
    ISO_IR 100 would otherwise go out as ``Nguy?n``).

    Failures (PS3.4 C.4.1.1.4): 0xA900 for an identifier the information
    model cannot answer (no or an unknown QueryRetrieveLevel, a level the
    model lacks, a value on a key we cannot match, a malformed value);
    0xC000 for an identifier that cannot be decoded; 0xA700 (Out of
    Resources) when the index fails.
    """
    ae_title, host = peer_of(event)
    try:
        level, model_name, identifier, keys = read_identifier(event)
        rows = find(archive.index, level, keys)
    except FindRefused as exc:
        log.warning("C-FIND from %s@%s refused (0x%04X): %s", ae_title, host, exc.status, exc)
        yield exc.status, None
        return
    except (UnsupportedKey, InvalidValue) as exc:
        log.warning("C-FIND from %s@%s refused (0xA900): %s", ae_title, host, exc)
        yield int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS), None  # type: ignore[attr-defined]
        return
    retrieve_ae = archive.settings.ae_title
    response_keys = ResponseKeys.of(identifier)
    matches = 0
    try:
        for row in rows:
            if event.is_cancelled:
                log.info("C-FIND %s %s from %s@%s cancelled after %d matches",
                         model_name, level.value, ae_title, host, matches)
                yield int(Status.CANCEL), None  # 0xFE00
                return
            matches += 1
            # 0xFF00 Pending: matches are continuing, current match supplied.
            yield int(Status.PENDING), response_elements(response_keys, level.value, row, retrieve_ae,
                                                         response_charset(identifier.charset, row))
    except IndexUnavailable as exc:
        log.error("C-FIND from %s@%s failed after %d matches (0xA700): %s", ae_title, host, matches, exc)
        yield int(Status.OUT_OF_RESOURCES), None  # type: ignore[attr-defined]  # 0xA700 Refused: Out of Resources
        return
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    log.info("C-FIND %s %s from %s@%s: %d matches", model_name, level.value, ae_title, host, matches)


# -- C-MOVE and C-GET -----------------------------------------------------------

MOVE_LEVELS: dict[str, tuple[str, frozenset[Level]]] = {
    str(PatientRootQueryRetrieveInformationModelMove): ("Patient Root", frozenset(Level)),
    str(StudyRootQueryRetrieveInformationModelMove): (
        "Study Root", frozenset({Level.STUDY, Level.SERIES, Level.IMAGE})),
}
GET_LEVELS: dict[str, tuple[str, frozenset[Level]]] = {
    str(PatientRootQueryRetrieveInformationModelGet): ("Patient Root", frozenset(Level)),
    str(StudyRootQueryRetrieveInformationModelGet): (
        "Study Root", frozenset({Level.STUDY, Level.SERIES, Level.IMAGE})),
}
# The unique key of each level (PS3.4 C.4.2.2.1: a retrieve identifier holds only unique keys).
_UNIQUE_KEYS: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_LEVEL_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
# pynetdicom associates with a move destination with at most this many presentation contexts (PS3.8).
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class RetrieveMatch:
    """One instance to send: its UID, and its SOP class and transfer syntax (None when it cannot be read)."""

    sop_instance_uid: str
    sop_class_uid: str | None
    transfer_syntax: str | None


def retrieve_keys(level: Level, keys: list[MatchKey]) -> list[MatchKey]:
    """The unique keys of ``level`` and above with a value; :class:`FindRefused` without the level's own."""
    allowed = {_UNIQUE_KEYS[lv] for lv in _LEVEL_ORDER[:_LEVEL_ORDER.index(level) + 1]}
    matching = [k for k in keys if k.keyword in allowed and str(k.value).strip()]
    if _UNIQUE_KEYS[level] not in {k.keyword for k in matching}:
        raise FindRefused(int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # type: ignore[attr-defined]
                          f"the identifier has no {_UNIQUE_KEYS[level]} for a {level.value} level retrieve")
    return [MatchKey(k.keyword, k.value) for k in matching]


def retrieve_matches(archive: Archive, level: Level, keys: list[MatchKey]) -> list[RetrieveMatch]:
    """The instances a retrieve identifier selects, with SOP class and transfer syntax from the index.

    Only UIDs are held in memory; no stored file is opened until its sub-operation.
    """
    asked = {k.keyword for k in keys}
    wanted = [*keys, *(MatchKey(k, "") for k in ("SOPInstanceUID", "SOPClassUID", "TransferSyntaxUID")
                       if k not in asked)]
    rows = find(archive.index, Level.IMAGE, wanted)
    try:
        return [RetrieveMatch(str(row["SOPInstanceUID"]), str(row["SOPClassUID"]) or None,
                       str(row["TransferSyntaxUID"]) or None) for row in rows]
    except IndexUnavailable as exc:
        raise FindRefused(int(Status.UNABLE_TO_CALCULATE_MATCHES), str(exc)) from None  # type: ignore[attr-defined]
    finally:
        rows.close()  # type: ignore[attr-defined]


def _instance(archive: Archive, match: RetrieveMatch) -> Dataset:
    """The stored instance as a dataset; for one that cannot be read, a dataset with only its UID.

    pynetdicom cannot send the latter, so it counts the sub-operation as
    failed and lists the UID in FailedSOPInstanceUIDList (final status 0xB000
    or 0xA702).
    """
    if match.transfer_syntax is not None:
        try:
            with archive.open_instance(match.sop_instance_uid) as f:
                return pydicom.dcmread(f)
        except (StorageError, OSError) + _DECODE_ERRORS as exc:
            log.error("instance %s cannot be read from storage: %s: %s",
                      match.sop_instance_uid, type(exc).__name__, exc)
    failed = Dataset()
    failed.SOPInstanceUID = match.sop_instance_uid
    return failed


def read_retrieve(event: Event, archive: Archive, models: dict[str, tuple[str, frozenset[Level]]]
                  ) -> tuple[Level, str, list[RetrieveMatch]]:
    """(level, model name, matches) of a C-MOVE/C-GET request; :class:`FindRefused` with its status otherwise."""
    try:
        level, model_name, _, keys = read_identifier(event, models)
        return level, model_name, retrieve_matches(archive, level, retrieve_keys(level, keys))
    except (UnsupportedKey, InvalidValue) as exc:
        raise FindRefused(int(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS), str(exc)) from exc  # type: ignore[attr-defined]


def context_pairs(matches: list[RetrieveMatch]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) of the matches, a presentation context each, so each goes out as stored."""
    pairs = sorted({(m.sop_class_uid, m.transfer_syntax) for m in matches
                    if m.sop_class_uid is not None and m.transfer_syntax is not None})
    return pairs[:_MAX_CONTEXTS]


def _contexts(matches: list[RetrieveMatch]) -> list[PresentationContext]:
    return [build_context(sop_class, [ts]) for sop_class, ts in context_pairs(matches)]


def _sub_operations(event: Event, archive: Archive, matches: list[RetrieveMatch], what: str
                    ) -> Iterator[tuple[int, Dataset]]:
    for sent, match in enumerate(matches):
        if event.is_cancelled:
            log.info("%s cancelled after %d of %d sub-operations", what, sent, len(matches))
            yield int(Status.CANCEL), Dataset()  # 0xFE00
            return
        # 0xFF00 Pending: sub-operations are continuing.
        yield int(Status.PENDING), _instance(archive, match)
    log.info("%s: %d sub-operations", what, len(matches))


def prepare_destination_association(event: Event) -> None:
    """EVT_CONN_OPEN of the association with a move destination: TCP_NODELAY, and a guarded reactor.

    pynetdicom leaves Nagle's algorithm on for the sockets it connects; each
    C-STORE sub-operation then waited for the peer's delayed ACK (~40 ms an
    instance). With responses that fast, pynetdicom's requestor pause race
    would lose sub-operations, hence :func:`dicom_node.polling.guard_requestor`
    (which also gives the association the event-driven DUL wait).
    """
    assoc_socket = getattr(event.assoc.dul, "socket", None)
    sock = getattr(assoc_socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    polling.guard_requestor(event.assoc)


def _destination_options(contexts: list[PresentationContext]) -> dict[str, Any]:
    """``AE.associate`` keyword arguments for the association with a move destination."""
    options: dict[str, Any] = {"evt_handlers": [(evt.EVT_CONN_OPEN, prepare_destination_association)]}
    if contexts:
        options["contexts"] = contexts
    return options


def _refuse_move(destination: tuple[str, int], status: int) -> Iterator[Any]:
    """The yields of a C-MOVE answered with a failure ``status``.

    pynetdicom sends a handler's failure status only after it has associated
    with the destination (with at least one presentation context, here
    Verification), so a refused identifier still costs that association; if
    the destination does not answer, the peer gets 0xA801 instead.
    """
    yield destination[0], destination[1], _destination_options([build_context(Verification)])
    yield 1
    yield status, None


def handle_move(event: Event, archive: Archive) -> Iterator[Any]:
    """C-MOVE (Patient Root and Study Root, PATIENT to IMAGE level) to a configured destination.

    Yields, as pynetdicom expects: the destination's (host, port) —
    (None, None) for an AE title not in ``move_destinations``, which
    pynetdicom answers with 0xA801 —, then the number of instances, then
    one (pending, dataset) per instance. The matches are listed first (their
    UIDs and file-meta headers only) so that the association with the
    destination proposes each instance's own SOP class and transfer syntax.
    An instance that cannot be read from storage is a failed sub-operation
    (final status 0xB000 with FailedSOPInstanceUIDList).
    """
    ae_title, host = peer_of(event)
    request = cast(C_MOVE, event.request)
    destination_ae = str(request.MoveDestination or "").strip()
    destination = archive.settings.move_destinations.get(destination_ae)
    if destination is None:
        log.warning("C-MOVE from %s@%s refused (0xA801): move destination %r is unknown",
                    ae_title, host, destination_ae)
        yield None, None
        return
    try:
        level, model_name, matches = read_retrieve(event, archive, MOVE_LEVELS)
    except FindRefused as exc:
        log.warning("C-MOVE from %s@%s refused (0x%04X): %s", ae_title, host, exc.status, exc)
        yield from _refuse_move(destination, exc.status)
        return
    what = f"C-MOVE {model_name} {level.value} from {ae_title}@{host} to {destination_ae}"
    log.info("%s: %d instances to %s:%d", what, len(matches), *destination)
    contexts = _contexts(matches)
    yield destination[0], destination[1], _destination_options(contexts)
    yield len(matches)
    yield from _sub_operations(event, archive, matches, what)


def handle_get(event: Event, archive: Archive) -> Iterator[Any]:
    """C-GET (Patient Root and Study Root, PATIENT to IMAGE level): C-STORE sub-operations on this association.

    The peer must have proposed the instances' storage SOP classes with the
    SCP role (see ``build_ae``). Yields the number of instances, then one
    (pending, dataset) per instance; failures as in :func:`handle_move`.
    """
    ae_title, host = peer_of(event)
    try:
        level, model_name, matches = read_retrieve(event, archive, GET_LEVELS)
    except FindRefused as exc:
        log.warning("C-GET from %s@%s refused (0x%04X): %s", ae_title, host, exc.status, exc)
        yield 1
        yield exc.status, None
        return
    what = f"C-GET {model_name} {level.value} from {ae_title}@{host}"
    yield len(matches)
    yield from _sub_operations(event, archive, matches, what)
