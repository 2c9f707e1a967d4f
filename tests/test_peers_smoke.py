"""Smoke tests for tests/peers.py launchers and scripts/make_test_data.py."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.peers import (  # noqa: E402
    ORTHANC_BIN,
    OrthancServer,
    PostgresServer,
    StorescpServer,
    echoscu,
    free_port,
    run_storescu,
)

TESTDATA = Path("/work/shared/testdata")
NINE_TS = TESTDATA / "siemens_mr_9_transfer_syntaxes"
MAKE_TEST_DATA = ROOT / "scripts" / "make_test_data.py"


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.postgres
def test_postgres_start_select_stop():
    server = PostgresServer(fast=True)
    with server:
        assert server.psql("SELECT 1").strip() == "1"
        url = server.create_database("telepacs_smoke")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/telepacs_smoke"
        assert server.psql("SHOW fsync").strip() == "off"
        assert server.psql("SELECT current_database()", dbname="telepacs_smoke").strip() == "telepacs_smoke"
        pid = server.pid
        assert pid is not None
    assert server.proc is None
    assert not Path(f"/proc/{pid}").exists()
    assert not server.base_dir.exists()


@pytest.mark.skipif(not ORTHANC_BIN.exists(), reason="Orthanc not installed")
def test_orthanc_system_and_echo():
    with OrthancServer(aet="ORTHANCT", modalities={"telepacs": ["TELEPACS", "127.0.0.1", free_port()]}) as orthanc:
        with urllib.request.urlopen(orthanc.http_url + "/system", timeout=10) as resp:
            system = json.loads(resp.read())
        assert system["DicomAet"] == "ORTHANCT"
        assert system["DicomPort"] == orthanc.dicom_port
        assert echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet)
        result = run_storescu(NINE_TS / "1.dcm", "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert result.returncode == 0, result.stderr
        assert len(orthanc.get_json("/instances")) == 1
        assert orthanc.pid is not None
    assert orthanc.proc is None


def test_storescp_receives_each_file_in_its_own_syntax(tmp_path):
    files = sorted(NINE_TS.glob("*.dcm"))
    with StorescpServer(tmp_path / "in", aet="SMOKESCP") as scp:
        result = run_storescu(files, "127.0.0.1", scp.port, scp.aet)
        assert result.returncode == 0, result.stdout + result.stderr
        received = scp.received_files()
    assert len(received) == len(files)
    sent = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID for f in files}
    got = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID for f in received}
    assert got == sent  # compressed files were not decompressed on the way


def test_storescu_directory_recursive(tmp_path):
    with StorescpServer(tmp_path / "in", ignore=True) as scp:
        result = run_storescu(TESTDATA / "ge_mr_phantom_study" / "Ax_DWI_TENSOR_R2", "127.0.0.1", scp.port, scp.aet)
        assert result.returncode == 0, result.stdout + result.stderr
        assert scp.received_files() == []  # --ignore: received, not stored


def test_make_ct_series(tmp_path):
    out = tmp_path / "ct"
    subprocess.run(
        [sys.executable, str(MAKE_TEST_DATA), "ct-series", "--slices", "3", "--rows", "64", "--cols", "64",
         "--out", str(out)],
        check=True,
    )
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 3
    datasets = [pydicom.dcmread(f) for f in files]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [0.0, 1.0, 2.0]
    ds = datasets[1]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert str(ds.PatientName) == "Nguyễn^Văn A"
    arr = ds.pixel_array
    assert arr.shape == (64, 64) and arr.dtype.kind == "i"
    assert arr.min() < arr.max()


def test_make_multiframe(tmp_path):
    out = tmp_path / "mf.dcm"
    subprocess.run(
        [sys.executable, str(MAKE_TEST_DATA), "multiframe", "--megabytes", "2", "--out", str(out)],
        check=True,
    )
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    assert ds.NumberOfFrames == 4
    full = pydicom.dcmread(out)
    assert full.pixel_array.shape == (4, 512, 512)
    dump = subprocess.run(["/usr/bin/dcmdump", "-q", "+P", "7fe0,0010", str(out)], capture_output=True, text=True)
    assert dump.returncode == 0 and "# 2097152, 1 PixelData" in dump.stdout
