"""C-MOVE and C-GET SCP with dcmtk's movescu (to a dcmtk storescp) and getscu, over the test data."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from archive.dataset import dataset_offset
from archive.service import Archive
from helpers import MR_STUDY_DIR, TS_DIR, dicom_files, node_archive, part10_dataset_bytes, read_uids, running_node
from tests.peers import StorescpServer, free_port, run_storescu

MOVESCU = "/usr/bin/movescu"  # dcmtk's (the venv's PATH has pynetdicom's own movescu/getscu)
GETSCU = "/usr/bin/getscu"
DEST_AE = "DEST"

MR_FILES = dicom_files(MR_STUDY_DIR)
MR_UIDS = {path: read_uids(path) for path in MR_FILES}
MR_STUDY_UID = next(iter(MR_UIDS.values()))[0]
# The GE study's two series: the 14-instance DWI one and the 130-instance MP-RAGE one.
_BY_SERIES: dict[str, list[Path]] = {}
for _path, (_, _series, _) in MR_UIDS.items():
    _BY_SERIES.setdefault(_series, []).append(_path)
DWI_SERIES_UID = next(series for series, paths in _BY_SERIES.items() if len(paths) == 14)


@pytest.fixture(scope="module")
def dest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, dest_port: int) -> Iterator[Archive]:
    """A node loaded with the Siemens 9 and the GE MR study, with DEST as its move destination."""
    tmp = tmp_path_factory.mktemp("retrieve")
    arc = node_archive(tmp, move_destinations=f"{DEST_AE}=127.0.0.1:{dest_port}")
    with running_node(arc):
        s = arc.settings
        for folder in (TS_DIR, MR_STUDY_DIR):
            run = run_storescu(dicom_files(folder), "127.0.0.1", s.dicom_port, s.ae_title)
            assert run.returncode == 0, run.stdout + run.stderr
        yield arc
    arc.close()


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def movescu(arc: Archive, level: str, keys: dict[str, str], destination: str = DEST_AE, verbosity: str = "-v"
            ) -> subprocess.CompletedProcess[str]:
    s = arc.settings
    cmd = [MOVESCU, verbosity, "-S", "-aet", "MOVESCU", "-aec", s.ae_title, "-aem", destination,
           "-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        cmd += ["-k", f"{keyword}={value}"]
    cmd += ["127.0.0.1", str(s.dicom_port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


def getscu(arc: Archive, out_dir: Path, level: str, keys: dict[str, str]) -> subprocess.CompletedProcess[str]:
    s = arc.settings
    cmd = [GETSCU, "-v", "-S", "-aet", "GETSCU", "-aec", s.ae_title, "-od", str(out_dir),
           "-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        cmd += ["-k", f"{keyword}={value}"]
    cmd += ["127.0.0.1", str(s.dicom_port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


def received(folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of the Part 10 files in ``folder``."""
    return {read_uids(p)[2]: part10_dataset_bytes(p) for p in folder.iterdir()
            if p.is_file() and not p.name.endswith(".log")}


def stored(arc: Archive, paths: list[Path]) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of the archive's stored objects for the files at ``paths``.

    dcmtk's storescu re-encodes as it sends (undefined-length sequences get
    explicit lengths), so what the archive holds, and must hand out unchanged,
    is what storescu sent rather than the test files' own bytes.
    """
    result = {}
    for path in paths:
        uid = MR_UIDS[path][2]
        with arc.open_instance(uid) as f:
            offset = dataset_offset(f)
            f.seek(offset)
            result[uid] = f.read()
    return result


def test_move_series_and_study_to_storescp(loaded, dest_port, tmp_path):
    series_dir, study_dir = tmp_path / "series", tmp_path / "study"
    for out, level, keys, expected in [
        (series_dir, "SERIES", {"StudyInstanceUID": MR_STUDY_UID, "SeriesInstanceUID": DWI_SERIES_UID},
         _BY_SERIES[DWI_SERIES_UID]),
        (study_dir, "STUDY", {"StudyInstanceUID": MR_STUDY_UID}, MR_FILES),
    ]:
        out.mkdir()
        with StorescpServer(out_dir=out, aet=DEST_AE, port=dest_port):
            run = movescu(loaded, level, keys)
        assert run.returncode == 0, run.stdout + run.stderr
        got = received(out)
        assert len(got) == len(expected)
        assert got == stored(loaded, expected)


def _public(dataset: pydicom.Dataset) -> dict[str, object]:
    """The standard elements of a dataset as {keyword: value} (private ones lose their VR in Implicit VR)."""
    return {elem.keyword: elem.value for elem in dataset if elem.keyword and not elem.tag.is_private}


def test_get_series(loaded, tmp_path):
    run = getscu(loaded, tmp_path, "SERIES", {"StudyInstanceUID": MR_STUDY_UID, "SeriesInstanceUID": DWI_SERIES_UID})
    assert run.returncode == 0, run.stdout + run.stderr
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(files) == 14
    # getscu proposes its storage contexts with every uncompressed syntax and the
    # node, as acceptor, picks by its own order (Implicit VR first): the instances
    # arrive re-encoded, so compare the datasets rather than their bytes.
    got = {read_uids(p)[2]: pydicom.dcmread(p) for p in files}
    assert set(got) == {MR_UIDS[p][2] for p in _BY_SERIES[DWI_SERIES_UID]}
    for uid, dataset in got.items():
        with loaded.open_instance(uid) as f:
            original = pydicom.dcmread(f)
        assert dataset.PixelData == original.PixelData
        assert _public(dataset) == _public(original)


def test_move_to_unknown_destination(loaded, caplog):
    with caplog.at_level(logging.WARNING, logger="dicom_node.handlers"):
        run = movescu(loaded, "STUDY", {"StudyInstanceUID": MR_STUDY_UID}, destination="NOWHERE")
    output = (run.stdout + run.stderr).lower()
    assert "a801" in output or "movedestinationunknown" in output, output
    assert any("'NOWHERE' is unknown" in r.getMessage() and "MOVESCU@127.0.0.1" in r.getMessage()
               for r in caplog.records)


def test_move_without_level_key_is_refused(loaded, dest_port, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dicom_node.handlers"), \
            StorescpServer(out_dir=tmp_path, aet=DEST_AE, port=dest_port):
        run = movescu(loaded, "SERIES", {"StudyInstanceUID": MR_STUDY_UID})
    output = (run.stdout + run.stderr).lower()
    assert "a900" in output or "datasetdoesnotmatchsopclass" in output, output
    assert any("no SeriesInstanceUID" in r.getMessage() for r in caplog.records)


def test_move_with_a_missing_object(tmp_path):
    """One stored object deleted behind the index's back: warning 0xB000 naming it, the others arrive."""
    dest = free_port()
    arc = node_archive(tmp_path, move_destinations=f"{DEST_AE}=127.0.0.1:{dest}")
    paths = _BY_SERIES[DWI_SERIES_UID]
    with running_node(arc):
        run = run_storescu(paths, "127.0.0.1", arc.settings.dicom_port, arc.settings.ae_title)
        assert run.returncode == 0, run.stdout + run.stderr
        lost = MR_UIDS[paths[3]][2]
        found = arc.index.find_instance(lost)
        assert found is not None
        expected = stored(arc, paths)
        arc.store.delete(found.object_key)
        out = tmp_path / "out"
        out.mkdir()
        with StorescpServer(out_dir=out, aet=DEST_AE, port=dest):
            run = movescu(arc, "SERIES", {"StudyInstanceUID": MR_STUDY_UID, "SeriesInstanceUID": DWI_SERIES_UID},
                          verbosity="-d")  # -d: the final response's identifier is printed
    arc.close()
    output = run.stdout + run.stderr
    assert "Warning: SubOperationsCompleteOneOrMoreFailures" in output, output
    failed_list = [line for line in output.splitlines() if "FailedSOPInstanceUIDList" in line]
    assert failed_list and lost in failed_list[-1], output
    got = received(out)
    assert set(got) == {MR_UIDS[p][2] for p in paths} - {lost}
    assert got == {uid: data for uid, data in expected.items() if uid != lost}


def test_sub_association_socket_gets_tcp_nodelay():
    """The handler bound to the move destination's association turns Nagle off on its (real) socket."""
    import queue
    import socket
    from types import SimpleNamespace

    from pynetdicom import evt

    from dicom_node.handlers import _destination_options, prepare_destination_association

    options = _destination_options([])
    assert (evt.EVT_CONN_OPEN, prepare_destination_association) in options["evt_handlers"]
    assert "contexts" not in options
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    try:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        dimse = SimpleNamespace(get_msg=lambda block=False: queue.Queue().get(block=block, timeout=1))
        event = SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=client)),
                                                      dimse=dimse))
        prepare_destination_association(event)  # type: ignore[arg-type]
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        listener.close()
