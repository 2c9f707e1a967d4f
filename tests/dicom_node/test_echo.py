"""C-ECHO with dcmtk's echoscu."""

import subprocess

from tests.peers import DCMTK_BIN


def test_echoscu(node):
    s = node.settings
    run = subprocess.run([str(DCMTK_BIN / "echoscu"), "-aet", "ECHOER", "-aec", s.ae_title, "127.0.0.1",
                          str(s.dicom_port)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_echoscu_wrong_called_aet_is_rejected(node):
    s = node.settings
    run = subprocess.run([str(DCMTK_BIN / "echoscu"), "-aec", "NOT_US", "127.0.0.1", str(s.dicom_port)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "Called AE Title Not Recognized" in run.stderr or "Rejected" in run.stderr
