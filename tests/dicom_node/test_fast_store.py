"""The storage-only upper layer (dicom_node.fast_store): which associations it takes, and how it fails."""

from __future__ import annotations

import io
import socket
import struct

import pydicom
import pytest
from pynetdicom import build_context
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from archive.dataset import TELEPACS_IMPLEMENTATION_UID
from dicom_node.dimse import C_STORE_RQ, Command, decode_command, encode_command
from dicom_node.fast_store import file_meta, parse_associate_rq, store_response
from helpers import TS_DIR, dicom_files, node_archive, part10_dataset_bytes, running_node, scu
from tests.dicom_node.test_store import stored_instances
from tests.peers import run_storescu

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _rq_pdu(contexts, *, roles=(), calling="RAWSCU", called="TELEPACS") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = list(contexts)
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length, *roles]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


# -- units --------------------------------------------------------------------------------


def test_storage_find_and_move_associations_are_taken_get_is_not():
    storage = parse_associate_rq(_rq_pdu([build_context(CTImageStorage), build_context(Verification)]))
    assert storage.served_here and storage.calling_ae == "RAWSCU" and storage.peer_max_pdu == 16384
    query = parse_associate_rq(_rq_pdu([build_context(CTImageStorage),
                                        build_context(StudyRootQueryRetrieveInformationModelFind),
                                        build_context(PatientRootQueryRetrieveInformationModelMove)]))
    assert query.served_here
    get = parse_associate_rq(_rq_pdu([build_context(StudyRootQueryRetrieveInformationModelFind),
                                      build_context(StudyRootQueryRetrieveInformationModelGet)]))
    assert not get.served_here
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = False, True
    with_roles = parse_associate_rq(_rq_pdu([build_context(CTImageStorage)], roles=[role]))
    assert not with_roles.served_here


def test_command_encoding_round_trips_and_matches_pydicom():
    request = Command(field=C_STORE_RQ, message_id=7, data_set_type=0x0000, sop_class_uid=CT,
                      sop_instance_uid="1.2.3.45")
    response = store_response(request, 0xA700, "storage full")
    decoded = decode(io.BytesIO(response), True, True)
    assert decoded.CommandField == 0x8001 and decoded.MessageIDBeingRespondedTo == 7
    assert decoded.Status == 0xA700 and decoded.ErrorComment == "storage full"
    assert decoded.AffectedSOPInstanceUID == "1.2.3.45" and decoded.CommandGroupLength == len(response) - 12
    raw = encode_command([(0x0100, struct.pack("<H", C_STORE_RQ)), (0x0110, struct.pack("<H", 9)),
                          (0x0800, struct.pack("<H", 0)), (0x0002, CT.encode()), (0x1000, b"1.2.3")])
    command = decode_command(raw)
    assert (command.field, command.message_id, command.data_set_type, command.sop_class_uid,
            command.sop_instance_uid) == (C_STORE_RQ, 9, 0, CT, "1.2.3")


def test_file_meta_is_valid_part10(tmp_path):
    path = tmp_path / "meta.dcm"
    path.write_bytes(file_meta(CT, "1.2.3.4", EXPLICIT_LE))
    meta = pydicom.filereader.read_file_meta_info(path)
    assert meta.MediaStorageSOPClassUID == CT and meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert meta.TransferSyntaxUID == EXPLICIT_LE and meta.ImplementationClassUID == TELEPACS_IMPLEMENTATION_UID
    assert meta.FileMetaInformationGroupLength == path.stat().st_size - 132 - 12


def _storescu(archive, files, extra=()):
    return run_storescu(files, "127.0.0.1", archive.settings.dicom_port, archive.settings.ae_title, extra=extra)


# -- over the network ---------------------------------------------------------------------


@pytest.fixture
def fast_node(tmp_path):
    archive = node_archive(tmp_path)
    with running_node(archive):
        yield archive
    archive.close()


def _stored_meta(archive, sop_uid: str) -> pydicom.dataset.FileMetaDataset:
    with archive.open_instance(sop_uid) as f:
        return pydicom.dcmread(f, stop_before_pixels=True).file_meta


def test_storescu_with_small_pdus_is_served_by_the_fast_path(fast_node, tmp_path):
    # 4 KiB PDUs: every command and data set arrives in many fragments over many PDUs.
    files = dicom_files(TS_DIR)
    result = _storescu(fast_node, files, extra=["--max-pdu", "4096"])
    assert result.returncode == 0, result.stderr
    instances = stored_instances(fast_node)
    assert len(instances) == len(files)
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        with fast_node.open_instance(sop) as f:
            stored = tmp_path / "stored.dcm"
            stored.write_bytes(f.read())
        assert part10_dataset_bytes(stored) == part10_dataset_bytes(path)
        assert _stored_meta(fast_node, sop).ImplementationClassUID == TELEPACS_IMPLEMENTATION_UID


def test_switched_off_every_association_goes_through_pynetdicom(tmp_path):
    archive = node_archive(tmp_path, dicom_fast_store=False)
    with running_node(archive):
        path = dicom_files(TS_DIR)[0]
        assert _storescu(archive, [path]).returncode == 0
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert _stored_meta(archive, sop).ImplementationClassUID != TELEPACS_IMPLEMENTATION_UID
    archive.close()


def test_role_selection_association_is_left_to_pynetdicom(fast_node):
    ae = scu()
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = "1.2.840.10008.5.1.4.1.1.4"
    role.scu_role, role.scp_role = True, False
    assoc = ae.associate("127.0.0.1", fast_node.settings.dicom_port, ae_title="TELEPACS", ext_neg=[role])
    assert assoc.is_established
    path = dicom_files(TS_DIR)[0]
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0x0000
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert _stored_meta(fast_node, sop).ImplementationClassUID != TELEPACS_IMPLEMENTATION_UID


def _connect(archive, sop_class: str = CT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", archive.settings.dicom_port), timeout=10)
    sock.sendall(_rq_pdu([build_context(sop_class, [EXPLICIT_LE])]))
    header = sock.recv(6, socket.MSG_WAITALL)
    assert header[0] == 0x02  # A-ASSOCIATE-AC
    sock.recv(struct.unpack(">L", header[2:6])[0], socket.MSG_WAITALL)
    return sock


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxL", 0x04, len(item)) + item


def _store_command(sop_uid: str, sop_class: str) -> bytes:
    return encode_command([(0x0002, sop_class.encode()), (0x0100, struct.pack("<H", C_STORE_RQ)),
                           (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
                           (0x0800, struct.pack("<H", 0)), (0x1000, sop_uid.encode())])


def _read_abort(sock: socket.socket) -> bytes:
    return sock.recv(10, socket.MSG_WAITALL)


def test_unexpected_pdu_is_answered_with_abort_and_the_node_keeps_serving(fast_node, caplog):
    sock = _connect(fast_node)
    sock.sendall(_rq_pdu([build_context(CT)]))  # a second A-ASSOCIATE-RQ on an established association
    abort = _read_abort(sock)
    assert abort[0] == 0x07 and abort[8:10] == bytes([0x02, 0x02])  # A-ABORT by the provider: unexpected PDU
    assert sock.recv(1) == b""
    sock.close()
    assert "unexpected PDU type 0x01" in caplog.text
    assert _storescu(fast_node, dicom_files(TS_DIR)[:1]).returncode == 0


def test_data_set_before_its_command_is_a_protocol_error(fast_node, caplog):
    sock = _connect(fast_node)
    sock.sendall(_pdv(1, 0x02, b"\x00" * 64))
    assert _read_abort(sock)[0] == 0x07
    sock.close()
    assert "without its command" in caplog.text


def test_peer_abort_mid_data_set_leaves_nothing(fast_node, caplog):
    path = dicom_files(TS_DIR)[0]
    ds = pydicom.dcmread(path)
    sock = _connect(fast_node, str(ds.SOPClassUID))
    sock.sendall(_pdv(1, 0x03, _store_command(str(ds.SOPInstanceUID), str(ds.SOPClassUID))))
    body = part10_dataset_bytes(path)
    sock.sendall(_pdv(1, 0x00, body[: len(body) // 2]))  # half the data set, not the last fragment
    sock.sendall(struct.pack(">BxL", 0x07, 4) + bytes([0, 0, 0, 0]))  # A-ABORT from the user
    sock.settimeout(10)
    assert sock.recv(1) == b""  # the node closes
    sock.close()
    assert stored_instances(fast_node) == {}
    assert list(fast_node.settings.incoming_dir.iterdir()) == []
    assert "discarded the incomplete dataset" in caplog.text


def test_store_over_raw_socket_returns_status_and_stores(fast_node):
    path = dicom_files(TS_DIR)[0]  # Explicit VR Little Endian
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == EXPLICIT_LE
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop = str(ds.SOPInstanceUID)
    sock = _connect(fast_node, str(ds.SOPClassUID))
    command = _store_command(sop, str(ds.SOPClassUID))
    sock.sendall(_pdv(1, 0x01, command[:20]) + _pdv(1, 0x03, command[20:]))  # the command in two fragments
    body = part10_dataset_bytes(path)
    sock.sendall(_pdv(1, 0x00, body[:1000]) + _pdv(1, 0x02, body[1000:]))
    header = sock.recv(6, socket.MSG_WAITALL)
    assert header[0] == 0x04
    pdu = sock.recv(struct.unpack(">L", header[2:6])[0], socket.MSG_WAITALL)
    response = decode(io.BytesIO(pdu[6:]), True, True)
    assert response.Status == 0x0000 and response.AffectedSOPInstanceUID == sop
    sock.sendall(struct.pack(">BxL", 0x05, 4) + b"\x00" * 4)  # A-RELEASE-RQ
    assert sock.recv(10, socket.MSG_WAITALL)[0] == 0x06  # A-RELEASE-RP
    sock.close()
    assert sop in stored_instances(fast_node)

