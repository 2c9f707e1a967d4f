"""C-FIND and C-MOVE on telepacs' own upper layer (dicom_node.fast_query): cancel, broken destinations, PDUs."""

from __future__ import annotations

import io
import logging
import socket
from pathlib import Path
from typing import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from archive.service import Archive
from dicom_node.dimse import PDU_HEADER, PDV_HEADER, PduSocket, ae, encode_command, uid, us
from dicom_node.fast_query import (
    CANCEL,
    PENDING,
    SUCCESS,
    StoreSubAssociation,
    SubOperations,
    data_set_lead,
)
from helpers import MR_STUDY_DIR, dicom_files, node_archive, read_uids, running_node
from tests.peers import StorescpServer, free_port, run_storescu

EXPLICIT_LE = "1.2.840.10008.1.2.1"
MOVE = str(StudyRootQueryRetrieveInformationModelMove)
FIND = str(StudyRootQueryRetrieveInformationModelFind)
MR_FILES = dicom_files(MR_STUDY_DIR)
MR_STUDY_UID = read_uids(MR_FILES[0])[0]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, int, int]]:
    """A node with the GE MR study (144 instances); DEST at a free port, DOWN where nothing listens."""
    tmp = tmp_path_factory.mktemp("fast-query")
    dest_port, down_port = free_port(), free_port()
    arc = node_archive(tmp, move_destinations=f"DEST=127.0.0.1:{dest_port},DOWN=127.0.0.1:{down_port}")
    with running_node(arc):
        run = run_storescu(MR_FILES, "127.0.0.1", arc.settings.dicom_port, arc.settings.ae_title)
        assert run.returncode == 0, run.stdout + run.stderr
        yield arc, dest_port, down_port
    arc.close()


def _open(arc: Archive, abstract_syntax: str) -> tuple[StoreSubAssociation, int]:
    """A raw association with the node (telepacs' own requestor code), one context in Explicit VR LE."""
    client = StoreSubAssociation.open(("127.0.0.1", arc.settings.dicom_port), "RAWQR", arc.settings.ae_title,
                                      [(abstract_syntax, EXPLICIT_LE)], 30)
    return client, client.contexts[(abstract_syntax, EXPLICIT_LE)]


def _move_request(message_id: int, destination: str) -> tuple[bytes, bytes]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = MR_STUDY_UID
    command = encode_command([(0x0002, uid(MOVE)), (0x0100, us(0x0021)), (0x0110, us(message_id)),
                              (0x0600, ae(destination)), (0x0700, us(0)), (0x0800, us(1))])
    return command, encode(identifier, False, True)


def test_move_cancelled_after_the_first_sub_operation(loaded, tmp_path):
    arc, dest_port, _ = loaded
    client, context_id = _open(arc, MOVE)
    with StorescpServer(out_dir=tmp_path, aet="DEST", port=dest_port):
        try:
            client.link.send_message(context_id, *_move_request(11, "DEST"))
            _, first = client.link.read_command()
            assert first.status == PENDING and first.responded_to == 11
            cancel = encode_command([(0x0100, us(0x0FFF)), (0x0120, us(11)), (0x0800, us(0x0101))])
            client.link.send_message(context_id, cancel)
            statuses = [first.status]
            while statuses[-1] == PENDING:
                statuses.append(client.link.read_command()[1].status)
        finally:
            client.release()
        assert statuses[-1] == CANCEL, [hex(s) for s in statuses]
        arrived = [p for p in tmp_path.iterdir() if not p.name.endswith(".log")]
    assert 1 <= len(arrived) < len(MR_FILES)


def test_move_to_a_destination_that_does_not_answer_gets_a801(loaded, caplog):
    arc, _, _ = loaded
    caplog.set_level(logging.ERROR, logger="dicom_node.fast_query")
    client, context_id = _open(arc, MOVE)
    try:
        client.link.send_message(context_id, *_move_request(3, "DOWN"))
        _, final = client.link.read_command()
    finally:
        client.release()
    assert final.status == 0xA801
    assert any("to DOWN refused (0xA801)" in r.getMessage() and "cannot connect" in r.getMessage()
               for r in caplog.records)


def test_destination_aborting_mid_move_fails_the_rest_and_lists_them(loaded, caplog):
    """The destination aborts at its 3rd C-STORE: 2 completed, the other 142 failed and listed (0xB000)."""
    arc, dest_port, _ = loaded
    caplog.set_level(logging.ERROR, logger="dicom_node.fast_query")
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        if len(received) == 2:
            event.assoc.abort()
            return 0xA700
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    scp = AE(ae_title="DEST")
    scp.add_supported_context(MRImageStorage, [EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"])
    server = scp.start_server(("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    client, context_id = _open(arc, MOVE)
    try:
        client.link.send_message(context_id, *_move_request(4, "DEST"))
        status = PENDING
        while status == PENDING:
            _, response, data = client.link.read_message()
            status = response.status
    finally:
        client.release()
        server.shutdown()
    assert status == 0xB000 and data is not None
    assert response.completed == 2 and response.failed == len(MR_FILES) - 2
    failed = decode(io.BytesIO(data), False, True).FailedSOPInstanceUIDList
    assert len(failed) == len(MR_FILES) - 2 and not set(failed) & set(received)
    assert any("the sub-association broke" in r.getMessage() for r in caplog.records)


def test_index_failing_during_a_move_fails_the_sub_operations_not_the_association(loaded, tmp_path, caplog):
    """The object-key lookup fails after the matches were listed: 0xA702, every instance listed; echo still works."""
    from archive.index import IndexUnavailable

    arc, dest_port, _ = loaded
    caplog.set_level(logging.ERROR, logger="dicom_node.fast_query")

    def unavailable(chunk):  # type: ignore[no-untyped-def]
        raise IndexUnavailable("index lookup failed: OperationalError: disk I/O error")

    arc.index.object_keys = unavailable  # type: ignore[method-assign]
    client, context_id = _open(arc, MOVE)
    try:
        with StorescpServer(out_dir=tmp_path, aet="DEST", port=dest_port):
            client.link.send_message(context_id, *_move_request(21, "DEST"))
            _, final, data = client.link.read_message()
    finally:
        del arc.index.object_keys
        client.release()
    assert final.status == 0xA702 and final.failed == len(MR_FILES) and data is not None
    assert len(decode(io.BytesIO(data), False, True).FailedSOPInstanceUIDList) == len(MR_FILES)
    assert any("disk I/O error" in r.getMessage() and "sub-operations not done" in r.getMessage()
               for r in caplog.records)
    echo, echo_context = _open(arc, "1.2.840.10008.1.1")
    try:
        echo.link.send_message(echo_context, encode_command([(0x0002, uid("1.2.840.10008.1.1")), (0x0100, us(0x0030)),
                                                             (0x0110, us(1)), (0x0800, us(0x0101))]))
        assert echo.link.read_command()[1].status == SUCCESS
    finally:
        echo.release()


def test_find_over_the_fast_path_and_through_pynetdicom_answers_the_same(loaded, tmp_path, caplog):
    """The same C-FIND with the fast path on (this node) and off (a second node on the same index)."""
    arc, _, _ = loaded
    caplog.set_level(logging.INFO, logger="dicom_node.fast_store")

    def served_here() -> bool:
        taken = any(r.name == "dicom_node.fast_store" and "FINDER@127.0.0.1 established" in r.getMessage()
                    for r in caplog.records)
        caplog.clear()
        return taken

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = MR_STUDY_UID
    identifier.SeriesInstanceUID = ""
    identifier.Modality = ""
    identifier.NumberOfSeriesRelatedInstances = ""

    def series(port: int) -> list[tuple[str, str, int]]:
        scu = AE(ae_title="FINDER")
        scu.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = scu.associate("127.0.0.1", port, ae_title=arc.settings.ae_title)
        assert assoc.is_established
        try:
            rows, statuses = [], []
            for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                statuses.append(status.Status)
                if status.Status == PENDING:
                    rows.append((ds.SeriesInstanceUID, ds.Modality, int(ds.NumberOfSeriesRelatedInstances)))
            assert statuses[-1] == SUCCESS and statuses.count(PENDING) == len(rows)
        finally:
            assoc.release()
        return sorted(rows)

    fast = series(arc.settings.dicom_port)
    assert served_here()
    other = node_archive(tmp_path, dicom_fast_store=False, db_url=arc.settings.db_url,
                         storage_url=arc.settings.storage_url)
    with running_node(other):
        through_pynetdicom = series(other.settings.dicom_port)
    other.close()
    assert not served_here()
    assert fast == through_pynetdicom and sorted(n for _, _, n in fast) == [14, 130]


# -- units ----------------------------------------------------------------------------------------


class _Wire:
    """A socket pair: PduSocket on one end, raw bytes read from the other."""

    def __init__(self, peer_max: int) -> None:
        self.a, self.b = socket.socketpair()
        self.link = PduSocket(self.a, 1 << 16, peer_max, 5)

    def pdus(self) -> list[tuple[int, list[tuple[int, bytes]]]]:
        self.a.close()
        raw = b""
        while chunk := self.b.recv(1 << 16):
            raw += chunk
        self.b.close()
        out, offset = [], 0
        while offset < len(raw):
            pdu_type, length = PDU_HEADER.unpack_from(raw, offset)
            body, items, pos = raw[offset + 6:offset + 6 + length], [], 0
            while pos < len(body):
                item_length, _, control = PDV_HEADER.unpack_from(body, pos)
                items.append((control, body[pos + 6:pos + 4 + item_length]))
                pos += 4 + item_length
            out.append((length, items))
            offset += 6 + length
        return out


def test_a_small_message_is_one_pdu_with_both_pdvs():
    wire = _Wire(peer_max=16384)
    wire.link.send_message(1, b"C" * 40, b"D" * 100)
    assert wire.pdus() == [(6 + 40 + 6 + 100, [(0x03, b"C" * 40), (0x02, b"D" * 100)])]


def test_a_large_data_set_is_split_within_the_peers_maximum_length():
    wire = _Wire(peer_max=1000)
    data = bytes(range(256)) * 10  # 2,560 bytes
    wire.link.send_message(1, b"C" * 40, data)
    pdus = wire.pdus()
    assert all(length <= 1000 for length, _ in pdus)
    fragments = [item for _, items in pdus for item in items if not item[0] & 0x01]
    assert b"".join(f for _, f in fragments) == data
    assert [control for control, _ in fragments] == [0x00] * (len(fragments) - 1) + [0x02]


def test_sub_operation_counts_and_final_status():
    counts = SubOperations(remaining=3)
    counts.record("1.1", SUCCESS)
    counts.record("1.2", 0xB007)  # coercion of data elements: a warning
    assert counts.final_status() == 0xB000 and counts.failed_uids == []
    counts.record("1.3", 0xA700)
    assert (counts.remaining, counts.completed, counts.warning, counts.failed) == (0, 1, 1, 1)
    assert counts.failed_uids == ["1.3"]
    all_failed = SubOperations(remaining=1)
    all_failed.record("2.1", None)
    assert all_failed.final_status() == 0xA702
    assert SubOperations(remaining=0).final_status() == SUCCESS


class _Unseekable(io.RawIOBase):
    """A stream that can only be read forward (an object streamed from S3)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        chunk = self._data.read(min(len(buffer), 1000))
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_the_data_set_is_found_past_the_file_meta_group_without_seeking(tmp_path):
    from archive.dataset import dataset_offset

    for path in MR_FILES[:3]:
        raw = Path(path).read_bytes()
        with open(path, "rb") as f:
            expected = raw[dataset_offset(f):]
        stream = io.BufferedReader(_Unseekable(raw))
        assert data_set_lead(stream) + stream.read() == expected
    # A wrong File Meta Group Length does not matter: the group is walked element by element.
    raw = bytearray(Path(MR_FILES[0]).read_bytes())
    raw[140:144] = (int.from_bytes(raw[140:144], "little") - 8).to_bytes(4, "little")
    stream = io.BufferedReader(_Unseekable(bytes(raw)))
    assert data_set_lead(stream) + stream.read() == expected_first(MR_FILES[0])
    with pytest.raises(ValueError):
        data_set_lead(io.BufferedReader(_Unseekable(b"\x00" * 200)))


def expected_first(path: Path) -> bytes:
    from archive.dataset import dataset_offset

    with open(path, "rb") as f:
        f.seek(dataset_offset(f))
        return f.read()


def test_open_instances_looks_keys_up_a_batch_at_a_time_and_names_what_it_cannot_open(loaded):
    arc, _, _ = loaded
    uids = [read_uids(path)[2] for path in MR_FILES]
    missing = uids[70]
    key = arc.index.object_keys([missing])[missing]
    data = arc.store.get_bytes(key)
    arc.store.delete(key)
    try:
        queries = []
        original = arc.index.object_keys
        arc.index.object_keys = lambda chunk: queries.append(len(chunk)) or original(chunk)  # type: ignore[method-assign]
        try:
            results = []
            for sop, stream, why in arc.open_instances([*uids, "1.2.3.999"], batch=50):
                if stream is None:
                    results.append((sop, why))
                else:
                    with stream:
                        assert stream.read(132)[128:] == b"DICM"
        finally:
            del arc.index.object_keys
    finally:
        arc.store.put_bytes(key, data)  # the module's other tests keep their 144 instances
    assert queries == [50, 50, 45]
    assert [uid for uid, _ in results] == [missing, "1.2.3.999"]
    assert "cannot be read from storage" in results[0][1] and "no longer in the index" in results[1][1]
