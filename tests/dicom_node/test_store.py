"""C-STORE SCP: dcmtk's storescu and pynetdicom as senders, good and bad input."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import _config
from sqlalchemy import select

from archive.models import Instance
from helpers import (
    MR_STUDY_DIR, TS_DIR, dicom_files, node_archive, part10_dataset_bytes, running_node, scu, write_instance,
)
from storage import LocalObjectStore, StorageError
from tests.peers import run_storescu


def stored_instances(archive) -> dict[str, Instance]:
    with archive.index.session() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def test_storescu_every_transfer_syntax_round_trips(node, tmp_path):
    files = dicom_files(TS_DIR)
    run = run_storescu(files, "127.0.0.1", node.settings.dicom_port, node.settings.ae_title, calling_aet="MODALITY1")
    assert run.returncode == 0, run.stderr
    rows = stored_instances(node)
    assert len(rows) == 9
    for path in files:
        row = rows[sop_uid(path)]
        original = pydicom.dcmread(path, stop_before_pixels=True)
        assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID  # stored as it arrived
        obj = tmp_path / "obj.dcm"
        obj.write_bytes(node.store.get_bytes(row.object_key))
        assert part10_dataset_bytes(obj) == part10_dataset_bytes(path)  # the dataset, byte for byte
        assert row.source_ae == "MODALITY1"
        assert row.source_host == "127.0.0.1"
    assert node.verify().ok


def test_storescu_ct_and_mr_study(node, ct_part10_dir):
    port, aet = node.settings.dicom_port, node.settings.ae_title
    assert run_storescu([ct_part10_dir], "127.0.0.1", port, aet).returncode == 0
    assert run_storescu(dicom_files(MR_STUDY_DIR), "127.0.0.1", port, aet).returncode == 0
    assert node.index.counts() == {"patients": 2, "studies": 2, "series": 3, "instances": 154}


def test_facility_is_recorded_from_calling_ae(tmp_path):
    archive = node_archive(tmp_path, facilities="CT_HUYEN_A=BV-HUYEN-A")
    with running_node(archive):
        run = run_storescu([TS_DIR / "1.dcm"], "127.0.0.1", archive.settings.dicom_port, "TELEPACS",
                           calling_aet="CT_HUYEN_A")
        assert run.returncode == 0, run.stderr
        run = run_storescu([TS_DIR / "2.dcm"], "127.0.0.1", archive.settings.dicom_port, "TELEPACS",
                           calling_aet="OTHER")
        assert run.returncode == 0, run.stderr
    rows = stored_instances(archive)
    assert rows[sop_uid(TS_DIR / "1.dcm")].facility == "BV-HUYEN-A"
    assert rows[sop_uid(TS_DIR / "2.dcm")].facility is None
    archive.close()


def test_allow_list_rejects_unknown_callers(tmp_path, caplog):
    archive = node_archive(tmp_path, allowed_callers="CT1@127.0.0.1,MR1@10.9.9.9")
    port = archive.settings.dicom_port
    with running_node(archive), caplog.at_level(logging.WARNING):
        ok = run_storescu([TS_DIR / "1.dcm"], "127.0.0.1", port, "TELEPACS", calling_aet="CT1")
        assert ok.returncode == 0, ok.stderr
        evil = run_storescu([TS_DIR / "2.dcm"], "127.0.0.1", port, "TELEPACS", calling_aet="EVIL")
        assert evil.returncode != 0
        wrong_host = run_storescu([TS_DIR / "3.dcm"], "127.0.0.1", port, "TELEPACS", calling_aet="MR1")
        assert wrong_host.returncode != 0
    assert "calling AE 'EVIL' from 127.0.0.1 is not in the allow-list" in caplog.text
    assert "calling AE 'MR1' from 127.0.0.1 is not in the allow-list" in caplog.text
    assert len(stored_instances(archive)) == 1
    archive.close()


def _send_file(archive, path: Path, calling: str = "PYSCU") -> int:
    """Send a Part 10 file as it is on disk (its file meta gives the command's UIDs)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = scu(calling)
        assoc = ae.associate("127.0.0.1", archive.settings.dicom_port, ae_title=archive.settings.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
            return int(status.Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _instance_file(path: Path, **values: object) -> Path:
    return write_instance(path, **values)


BAD = {
    "no Study Instance UID": (dict(StudyInstanceUID=None), 0xC000),
    "no Series Instance UID": (dict(SeriesInstanceUID=None), 0xC000),
    "path traversal Study UID": (dict(StudyInstanceUID="../../etc/passwd"), 0xC000),
    "65-character Series UID": (dict(SeriesInstanceUID="1." + "2" * 63), 0xC000),
    "letters in Study UID": (dict(StudyInstanceUID="1.2.abc.4"), 0xC000),
}


@pytest.mark.parametrize("values, status", BAD.values(), ids=BAD.keys())
def test_bad_dataset_gets_failure_status_and_leaves_nothing(node, tmp_path, values, status, caplog):
    path = _instance_file(tmp_path / "bad.dcm", **values)
    assert _send_file(node, path) == status
    assert stored_instances(node) == {}
    assert list(node.store.list_keys()) == []
    assert "refused instance from PYSCU@127.0.0.1" in caplog.text


def test_command_uid_differing_from_dataset_is_refused(node, tmp_path, caplog):
    path = _instance_file(tmp_path / "m.dcm", SOPInstanceUID="1.2.3.4.5")
    data = path.read_bytes()
    # The file meta (which gives the command's UID) comes first: change the UID there only.
    path.write_bytes(data.replace(b"1.2.3.4.5", b"1.2.3.4.6", 1))
    assert _send_file(node, path) == 0xC000  # Error: Cannot understand
    assert "differs from the dataset's" in caplog.text
    assert stored_instances(node) == {}


def test_truncated_dataset_is_refused(node, tmp_path):
    data = (TS_DIR / "1.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-5000])
    assert _send_file(node, cut) == 0xC000
    assert stored_instances(node) == {} and list(node.store.list_keys()) == []


def test_undecodable_dataset_is_refused(node, tmp_path):
    good = (TS_DIR / "1.dcm").read_bytes()
    with open(TS_DIR / "1.dcm", "rb") as f:
        from archive.dataset import dataset_offset
        offset = dataset_offset(f)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(good[:offset] + b"\xff\xff\xff\xff\xff\xff\xff\xff" * 100)
    assert _send_file(node, garbage) == 0xC000
    assert stored_instances(node) == {}


class FullDiskStore(LocalObjectStore):
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        raise StorageError(f"disk full writing {key} under {self.root}")


def test_full_disk_gets_out_of_resources(tmp_path, caplog):
    archive = node_archive(tmp_path)
    archive.store = FullDiskStore(tmp_path / "objects")
    with running_node(archive):
        assert _send_file(archive, TS_DIR / "1.dcm") == 0xA700  # Refused: Out of Resources
    assert stored_instances(archive) == {}
    assert "disk full" in caplog.text
    archive.close()


def test_several_associations_at_once(node):
    files = dicom_files(MR_STUDY_DIR / "3D_Ax_T1_MP_RAGE_R22")[:60]
    results: list[int] = []
    port, aet = node.settings.dicom_port, node.settings.ae_title

    def sender(chunk: list[Path]) -> None:
        results.append(run_storescu(chunk, "127.0.0.1", port, aet, own_syntax=False).returncode)

    threads = [threading.Thread(target=sender, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0, 0]
    assert len(stored_instances(node)) == 60
    assert node.index.counts()["series"] == 1


def test_dropped_association_keeps_acknowledged_instances(node, tmp_path):
    """Three instances acknowledged, then the connection drops in the middle of a big one."""
    import socket
    import sys

    from pynetdicom import evt

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from make_test_data import make_multiframe

    big = tmp_path / "big.dcm"
    make_multiframe(big, 100)
    big_started = threading.Event()
    pdus_after_start = []

    def count_pdus(event) -> None:
        if big_started.is_set():
            pdus_after_start.append(1)

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = scu()
        assoc = ae.associate("127.0.0.1", node.settings.dicom_port, ae_title=node.settings.ae_title,
                             evt_handlers=[(evt.EVT_PDU_SENT, count_pdus)])
        for path in dicom_files(TS_DIR)[:3]:
            assert assoc.send_c_store(path).Status == 0x0000
        big_started.set()
        sender = threading.Thread(target=lambda: assoc.send_c_store(big), daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while len(pdus_after_start) < 20 and time.monotonic() < deadline:  # ~20 MB of the 100 MB (1 MiB PDUs)
            time.sleep(0.005)
        assert len(pdus_after_start) >= 20
        # The district link drops: the connection is cut, no A-ABORT, no A-RELEASE.
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=30)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False

    rows = stored_instances(node)
    assert set(rows) == {sop_uid(p) for p in dicom_files(TS_DIR)[:3]}
    assert node.verify().ok
    deadline = time.monotonic() + 10  # the node notices the dropped connection, then cleans up
    while list(node.settings.incoming_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(node.settings.incoming_dir.iterdir()) == []  # no half-received file left behind


def test_large_multiframe_is_streamed_to_storage(node, tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from make_test_data import make_multiframe

    big = tmp_path / "mf.dcm"
    frames = make_multiframe(big, 120)
    run = run_storescu([big], "127.0.0.1", node.settings.dicom_port, node.settings.ae_title)
    assert run.returncode == 0, run.stderr
    (row,) = stored_instances(node).values()
    assert row.number_of_frames == frames
    assert row.size == node.store.size(row.object_key)
    copy = tmp_path / "copy.dcm"
    with node.store.open(row.object_key) as src, open(copy, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    assert part10_dataset_bytes(copy) == part10_dataset_bytes(big)
    assert node.verify().ok
