"""Helpers shared by the tests (imported as ``helpers``; conftest modules only hold fixtures)."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pydicom

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from archive.config import Settings, load_settings  # noqa: E402
from archive.service import Archive  # noqa: E402
from tests.peers import free_port  # noqa: E402

TESTDATA = Path(os.environ.get("TELEPACS_TESTDATA", REPO.parent / "shared" / "testdata"))
TS_DIR = TESTDATA / "siemens_mr_9_transfer_syntaxes"
CT_RAW_DIR = TESTDATA / "ge_ct_phantom_10slices_nometa"
MR_STUDY_DIR = TESTDATA / "ge_mr_phantom_study"
FMRI_DIR = TESTDATA / "ge_fmri_human_150"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a testdata folder (READMEs and licences left out)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() not in {".md", ".txt"} and not p.name.upper().startswith(("LICEN", "README"))
    )


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test: defaults under ``tmp_path/data``, the process environment ignored."""
    return load_settings(env={}, data_dir=str(tmp_path / "data"), **overrides)  # type: ignore[arg-type]


def part10_dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group."""
    from archive.dataset import dataset_offset

    with open(path, "rb") as f:
        offset = dataset_offset(f)
        f.seek(offset)
        return f.read()


def read_uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def node_archive(tmp_path: Path, **overrides: Any) -> Archive:
    """An archive whose settings put its DICOM node on a free loopback port."""
    overrides.setdefault("dicom_port", free_port())
    overrides.setdefault("dicom_host", "127.0.0.1")
    return Archive.open(make_settings(tmp_path, **overrides))


@contextmanager
def running_node(archive: Archive) -> Iterator[Any]:
    """The archive's DICOM node, listening in this process for the duration of the block."""
    from pynetdicom import _config

    from dicom_node.server import start_node

    server = start_node(archive)
    try:
        yield server
    finally:
        server.shutdown()
        tempfile.tempdir = None
        _config.STORE_RECV_CHUNKED_DATASET = False


# The syntaxes issue 2 names: each is proposed in its own context so the file's own is accepted.
TEST_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
SCU_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
)


def scu(calling: str = "PYSCU") -> Any:
    """A pynetdicom AE proposing the storage SOP classes the tests send, in each of the common syntaxes."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for sop_class in SCU_SOP_CLASSES:
        for syntax in TEST_TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, [syntax])
    return ae


def write_instance(path: Path, **values: object) -> Path:
    """A small Secondary Capture Part 10 file with fresh UIDs; ``None`` removes an attribute."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.PatientName = "Nguyễn^Văn A"
    ds.Modality = "OT"
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
    ds.save_as(path, enforce_file_format=True)
    return path
