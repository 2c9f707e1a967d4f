"""Build and run the DICOM node: application entity, association policy, presentation contexts.

Several receiving processes can share one port (``dicom.workers``):
each binds with SO_REUSEPORT and the kernel spreads connections over them.
Every accepted socket gets TCP_NODELAY (small DIMSE responses must not wait
for Nagle's algorithm).
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from archive.service import Archive
from dicom_node import fast_store, handlers, polling

log = logging.getLogger(__name__)

MAX_PDU = 1 << 20  # 1 MiB: fewer PDUs (and fewer reactor turns) per instance


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT on the listener and TCP_NODELAY on connections.

    With ``archive`` set, associations that only store, echo, find and move
    are served by :mod:`dicom_node.fast_store`; all others by pynetdicom.
    """

    reuse_port = False
    archive: Archive | None = None

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.archive is not None:
            timeouts = (float(self.ae.acse_timeout or 30), float(self.ae.network_timeout or 60))
            if fast_store.serve_if_fast(request, client_address, self.archive, self.contexts,
                                           self.ae.maximum_pdu_size, timeouts):
                self.shutdown_request(request)  # pynetdicom's association threads close their own; we close ours
                return
        super().finish_request(request, client_address)


class SharedContexts(list):  # type: ignore[type-arg]
    """The supported presentation contexts, shared by every association instead of deep-copied.

    pynetdicom deep-copies the server's supported contexts for each new
    association; with every storage SOP class in every transfer syntax that
    is ~6,000 UIDs and about 0.25 s per association here. Negotiation only
    reads them (it builds new result contexts), so one shared list is safe.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


def configure_pynetdicom(archive: Archive) -> None:
    """Process-wide pynetdicom settings for a receiving node."""
    # Write received datasets straight to a Part 10 file instead of memory
    # (a 500 MB multi-frame must not be held whole), on the data dir's file
    # system so that storing it is a rename.
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(archive.settings.incoming_dir)
    quiet_pynetdicom()
    polling.install()


def quiet_pynetdicom() -> None:
    """Skip pynetdicom's per-message log work when its logger would drop the lines anyway.

    pynetdicom formats every C-FIND request and response identifier
    (``pretty_dataset``) and binds per-PDU logging handlers whatever its
    logger's level; with ``pynetdicom`` at WARNING (telepacs.logs) that was
    about a tenth of a C-FIND's time in the node, and a cost per pending response.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "none"


def build_ae(archive: Archive) -> AE:
    settings = archive.settings
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = MAX_PDU
    ae.maximum_associations = 64
    ae.network_timeout = 60
    ae.dimse_timeout = 60
    ae.acse_timeout = 30
    ae.require_called_aet = True
    # Storage both ways: as SCP for C-STORE, and as SCU when a C-GET peer takes
    # the SCP role (SCP/SCU role selection, PS3.7 D.3.3.4) for the sub-operations.
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for qr_model in (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
                     PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
                     PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet):
        ae.add_supported_context(qr_model, ALL_TRANSFER_SYNTAXES)
    return ae


def event_handlers(archive: Archive) -> list[Any]:
    return [
        (evt.EVT_REQUESTED, handlers.handle_requested, [archive]),
        (evt.EVT_ESTABLISHED, handlers.handle_established, [archive]),
        (evt.EVT_ABORTED, handlers.handle_aborted, [archive]),
        (evt.EVT_CONN_CLOSE, handlers.handle_conn_close, [archive]),
        (evt.EVT_C_ECHO, handlers.handle_echo, [archive]),
        (evt.EVT_C_STORE, handlers.handle_store, [archive]),
        (evt.EVT_C_FIND, handlers.handle_find, [archive]),
        (evt.EVT_C_MOVE, handlers.handle_move, [archive]),
        (evt.EVT_C_GET, handlers.handle_get, [archive]),
    ]


def start_node(archive: Archive, *, reuse_port: bool = False) -> NodeServer:
    """Start the node in a background thread and return its server (``.shutdown()`` stops it)."""
    configure_pynetdicom(archive)
    archive.remove_stale_incoming()
    ae = build_ae(archive)
    settings = archive.settings
    fast_archive = archive if settings.dicom_fast_store else None
    server_class = type("NodeServerInstance", (NodeServer,), {"reuse_port": reuse_port, "archive": fast_archive})
    server = ae.make_server(
        (settings.dicom_host, settings.dicom_port),
        evt_handlers=event_handlers(archive),
        server_class=server_class,
    )
    server.contexts = SharedContexts(server.contexts)
    ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
    thread = threading.Thread(target=server.serve_forever, name="dicom-node", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("DICOM node %s listening on %s:%s", settings.ae_title, host, port)
    return server  # type: ignore[return-value]
