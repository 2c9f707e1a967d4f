"""C-STORE into S3 object storage (a real SeaweedFS) through the receive spool, and S3 outages."""

from __future__ import annotations

import time

from sqlalchemy import select

from archive.models import Instance
from helpers import TS_DIR, dicom_files, node_archive, part10_dataset_bytes, running_node
from s3server import make_s3_store, new_bucket
from tests.peers import run_storescu


def send(archive, files, calling="MODALITY1"):
    # -v makes storescu print each response status.
    return run_storescu(files, "127.0.0.1", archive.settings.dicom_port, archive.settings.ae_title,
                        calling_aet=calling, extra=["-v"])


def refused_out_of_resources(run) -> bool:
    return "Received Store Response (Refused: OutOfResources)" in run.stdout + run.stderr  # 0xA700


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def indexed(archive) -> dict[str, Instance]:
    with archive.index.session() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def test_store_to_s3_round_trips_byte_for_byte(s3_server, tmp_path):
    bucket = new_bucket()
    archive = node_archive(tmp_path, storage_url=s3_server.url(bucket))
    with running_node(archive):
        run = send(archive, dicom_files(TS_DIR))
        assert run.returncode == 0, run.stderr
    assert archive.store.drain(60)  # the spool empties into S3
    direct = make_s3_store(s3_server, bucket)
    rows = indexed(archive)
    assert len(rows) == 9
    from blake3 import blake3

    for row in rows.values():
        data = direct.get_bytes(row.object_key)
        assert blake3(data).hexdigest() == row.checksum
    for path in dicom_files(TS_DIR):
        import pydicom

        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        obj = tmp_path / "o.dcm"
        obj.write_bytes(direct.get_bytes(rows[uid].object_key))
        assert part10_dataset_bytes(obj) == part10_dataset_bytes(path)
    assert list((archive.settings.spool_dir / "ready").glob("*.data")) == []
    assert archive.verify().ok
    archive.close()


def test_s3_outage_fails_stores_cleanly_and_loses_nothing(own_s3_server, tmp_path):
    """S3 stops mid-run: what was acknowledged stays (spooled, then uploaded); later stores fail with 0xA700."""
    files = dicom_files(TS_DIR)
    bucket = new_bucket()
    archive = node_archive(tmp_path, storage_url=own_s3_server.url(bucket))
    store = archive.store
    try:
        with running_node(archive):
            assert send(archive, files[:2]).returncode == 0
            assert store.drain(60)
            own_s3_server.stop()
            # The first store after the outage may still be accepted: it is durable in the local spool.
            send(archive, files[2:3])
            wait_for(lambda: not store.remote_healthy(), 30, "the spool to notice S3 is down")
            refused = send(archive, files[3:4])
            assert refused_out_of_resources(refused), refused.stdout + refused.stderr
        rows = indexed(archive)
        import pydicom

        refused_uid = str(pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)
        assert refused_uid not in rows  # no index row for what was refused
        own_s3_server.start()
        assert store.drain(90)
        direct = make_s3_store(own_s3_server, bucket)
        for row in rows.values():
            assert direct.exists(row.object_key)  # everything acknowledged reached S3
        assert archive.verify().ok
    finally:
        own_s3_server.start()
        archive.close()


def test_s3_without_spool_refuses_at_once_when_down(own_s3_server, tmp_path):
    bucket = new_bucket()
    archive = node_archive(tmp_path, storage_url=own_s3_server.url(bucket) + "&spool=false")
    try:
        with running_node(archive):
            assert send(archive, dicom_files(TS_DIR)[:1]).returncode == 0
            own_s3_server.stop()
            started = time.monotonic()
            refused = send(archive, dicom_files(TS_DIR)[1:2])
            assert time.monotonic() - started < 20
            assert refused_out_of_resources(refused), refused.stdout + refused.stderr
        assert len(indexed(archive)) == 1
    finally:
        own_s3_server.start()
        archive.close()


def test_move_from_s3_sends_the_stored_bytes(s3_server, tmp_path):
    """C-MOVE of a series whose objects are only in S3 (the spool drained): read as a stream, sent unchanged."""
    from helpers import MR_STUDY_DIR, read_uids
    from tests.dicom_node.test_retrieve import DEST_AE, DWI_SERIES_UID, MR_STUDY_UID, movescu, received
    from tests.peers import StorescpServer, free_port

    dest_port = free_port()
    bucket = new_bucket()
    archive = node_archive(tmp_path, storage_url=s3_server.url(bucket),
                           move_destinations=f"{DEST_AE}=127.0.0.1:{dest_port}")
    dwi = [p for p in dicom_files(MR_STUDY_DIR) if read_uids(p)[1] == DWI_SERIES_UID]
    out = tmp_path / "out"
    out.mkdir()
    with running_node(archive):
        assert send(archive, dwi).returncode == 0
        assert archive.store.drain(60)
        assert list((archive.settings.spool_dir / "ready").glob("*.data")) == []
        with archive.open_instance(read_uids(dwi[0])[2]) as stream:
            assert not stream.seekable()  # streamed from S3, as every sub-operation below reads it
        with StorescpServer(out_dir=out, aet=DEST_AE, port=dest_port):
            run = movescu(archive, "SERIES", {"StudyInstanceUID": MR_STUDY_UID, "SeriesInstanceUID": DWI_SERIES_UID})
    assert run.returncode == 0, run.stdout + run.stderr
    direct = make_s3_store(s3_server, bucket)
    stored = {}
    for uid, row in indexed(archive).items():
        obj = tmp_path / "o.dcm"
        obj.write_bytes(direct.get_bytes(row.object_key))
        stored[uid] = part10_dataset_bytes(obj)
    assert received(out) == stored and len(stored) == 14
