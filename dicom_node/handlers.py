"""DIMSE handlers: an event in, archive calls, a named status out.

Each handler is bound with the archive as its extra argument, e.g.
``(evt.EVT_C_STORE, handle_store, [archive])``. No SQL, storage keys or
parsing here: that is the archive's job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.status import Status

from archive.index import Source
from archive.service import Archive, Expected, IngestError, IngestFailure

log = logging.getLogger(__name__)

# Named DICOM statuses (PS3.4 Annex B.2 for the Storage Service Class).
Status.add("OUT_OF_RESOURCES", 0xA700)  # Refused: Out of Resources
Status.add("DATASET_DOES_NOT_MATCH_SOP_CLASS", 0xA900)  # Error: Data Set does not match SOP Class
Status.add("CANNOT_UNDERSTAND", 0xC000)  # Error: Cannot understand
Status.add("DUPLICATE_SOP_INSTANCE", 0x0111)  # Failure: Duplicate SOP Instance (PS3.7 C.4.2.1.4)
Status.add("PROCESSING_FAILURE", 0x0110)  # Failure: Processing failure (PS3.7 C.4.2.1.4)

_STORE_STATUS_FOR_FAILURE: dict[IngestFailure, int] = {
    IngestFailure.INVALID_DATASET: Status.CANNOT_UNDERSTAND,  # type: ignore[attr-defined]
    IngestFailure.UID_MISMATCH: Status.CANNOT_UNDERSTAND,  # type: ignore[attr-defined]
    IngestFailure.SOP_CLASS_MISMATCH: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,  # type: ignore[attr-defined]
    IngestFailure.DUPLICATE_REJECTED: Status.DUPLICATE_SOP_INSTANCE,  # type: ignore[attr-defined]
    IngestFailure.STORAGE_UNAVAILABLE: Status.OUT_OF_RESOURCES,  # type: ignore[attr-defined]
    IngestFailure.INDEX_UNAVAILABLE: Status.OUT_OF_RESOURCES,  # type: ignore[attr-defined]
}


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
    source = Source("dicom", ae_title=ae_title, host=host, facility=archive.settings.facility_for(ae_title))
    request = cast(C_STORE, event.request)
    expected = Expected(
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
    )
    path = Path(event.dataset_path)
    try:
        archive.ingest_file(path, source, expected=expected, move=True)
    except IngestError as exc:
        return _STORE_STATUS_FOR_FAILURE[exc.failure]
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
