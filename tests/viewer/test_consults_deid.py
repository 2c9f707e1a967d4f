"""De-identification served to consult observers (archive.deidentify): PS3.15 Basic Profile, Retain UIDs."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from archive.deidentify import (action_for, burned_in_text_risk, deidentify_dataset, deidentify_json)
from helpers import dicom_files


def _identified() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Lò^Văn Páo"
    ds.PatientID = "MT-0001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "M"
    ds.PatientAge = "045Y"
    ds.PatientAddress = "Bản Nậm Củm, Mường Tè"
    ds.OtherPatientIDs = "CMND 012345678"
    ds.InstitutionName = "TTYT huyện Mường Tè"
    ds.ReferringPhysicianName = "Nguyễn^Thị Lan"
    ds.AccessionNumber = "ACC42"
    ds.StudyDate = "20261123"
    ds.StudyDescription = "CT sọ não Lò Văn Páo"
    ds.OperatorsName = "KTV^Hà"
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.add_new(0x00091010, "LO", "private vendor note: Lò Văn Páo")
    ds.add_new(0x60000022, "LO", "overlay description with a name")
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    item.PatientName = "nested^name"
    ds.ReferencedImageSequence = Sequence([item])
    return ds


def test_dataset_is_deidentified_and_uids_kept():
    original = _identified()
    result = deidentify_dataset(original, "CONSULT-12")
    ds = result.dataset
    assert str(ds.PatientName) == "CONSULT^12" and ds.PatientID == "CONSULT-12"
    for keyword in ("PatientAge", "PatientAddress", "OtherPatientIDs", "InstitutionName", "StudyDescription",
                    "OperatorsName"):
        assert keyword not in ds, keyword
    for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyDate"):
        assert ds[keyword].value in (None, "", b""), keyword
    assert 0x00091010 not in ds and 0x60000022 not in ds and 0x60003000 not in ds
    assert str(ds.ReferencedImageSequence[0].PatientName) == "CONSULT^12"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == ("1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6")
    assert ds.WindowCenter == 40 and ds.Modality == "CT"
    assert ds.PatientIdentityRemoved == "YES" and "Retain UIDs" in ds.DeidentificationMethod
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    assert "PatientAddress" in result.removed and "PatientName" in result.emptied
    assert str(original.PatientName) == "Lò^Văn Páo"  # the stored original is untouched
    assert result.burned_in_warning == ""
    # Nothing identifying anywhere in the written bytes.
    raw = pydicom.filebase.DicomBytesIO()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(raw, enforce_file_format=False)
    for secret in ("Páo", "MT-0001", "Mường Tè", "Lan", "ACC42", "19800101"):
        assert secret.encode() not in raw.getvalue(), secret


def test_real_ct_file_keeps_its_pixels(ct_part10_dir):
    path = dicom_files(ct_part10_dir)[0]
    ds = pydicom.dcmread(path)
    out = deidentify_dataset(ds, "CONSULT-3").dataset
    assert out.PixelData == ds.PixelData and out.Rows == ds.Rows
    assert out.PatientID == "CONSULT-3" and "InstitutionName" not in out
    assert not [e for e in out.iterall() if e.tag.is_private]


def test_json_metadata_same_profile():
    ds = _identified()
    obj = ds.to_json_dict()
    out = deidentify_json(obj, "CONSULT-12")
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "CONSULT^12"}]}
    assert out["00100020"]["Value"] == ["CONSULT-12"]
    assert "00101040" not in out and "00080080" not in out and "00091010" not in out and "60000022" not in out
    assert out["00080050"] == {"vr": "SH"} and out["00080020"] == {"vr": "DA"}
    assert out["0020000D"]["Value"] == ["1.2.3.4"]
    assert out["00120062"]["Value"] == ["YES"]
    assert out["00081140"]["Value"][0]["00100010"]["Value"][0]["Alphabetic"] == "CONSULT^12"
    assert "Páo" not in str(out) and "MT-0001" not in str(out)
    assert obj["00100010"]["Value"][0]["Alphabetic"] == "Lò^Văn Páo"  # input untouched


@pytest.mark.parametrize("setup,expected", [
    ({"Modality": "US"}, "modality US"),
    ({"Modality": "US", "BurnedInAnnotation": "NO"}, ""),
    ({"Modality": "CT", "BurnedInAnnotation": "YES"}, "BurnedInAnnotation is YES"),
    ({"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "modality OT"),
    ({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4"}, "secondary capture"),
    ({"Modality": "MR"}, ""),
])
def test_burned_in_text_warning(setup, expected):
    ds = Dataset()
    for k, v in setup.items():
        setattr(ds, k, v)
    assert (expected in burned_in_text_risk(ds)) if expected else burned_in_text_risk(ds) == ""
    assert (expected in burned_in_text_risk(ds.to_json_dict())) if expected else \
        burned_in_text_risk(ds.to_json_dict()) == ""


def test_actions():
    assert action_for(0x00100010) == "Z" and action_for(0x00101040) == "X"
    assert action_for(0x0020000D) == "K" and action_for(0x00280010) == "K"
    assert action_for(0x60023000) == "X" and action_for(0x60000010) == "K"  # overlay data goes, rows stay
    assert action_for(0x00291010) == "X" and action_for(0x50000010) == "X"


def test_served_to_an_observer_through_the_consult(sqlite_archive, ct_part10_dir):
    """What DICOMweb hands an observer of another facility: de-identified JSON and Part 10 bytes."""
    from archive.index import Source
    from consult_data import build_world, request_for
    from viewer.consults import service as svc

    path = dicom_files(ct_part10_dir)[0]
    sqlite_archive.ingest_file(path, Source(via="stow", facility="DIST"))
    ds = pydicom.dcmread(path)
    study = str(ds.StudyInstanceUID)
    with sqlite_archive.index.write_session() as s:
        w = build_world(s, with_studies=False)
        c = svc.create_consult(s, w.doctor, request_for(study_uids=[study]))
        svc.add_participant(s, c, w.doctor, w.observer, "observer")
        s.commit()
        raw = path.read_bytes()
        assert svc.deidentify_part10_for(s, w.doctor.id, study, raw) is raw
        served = pydicom.dcmread(pydicom.filebase.DicomBytesIO(svc.deidentify_part10_for(s, w.observer.id, study, raw)))
        assert served.PatientID == f"CONSULT-{c.id}" and served.PatientIdentityRemoved == "YES"
        assert served.PixelData == ds.PixelData and served.SOPInstanceUID == ds.SOPInstanceUID
        rows = [ds.to_json_dict()]
        assert svc.deidentify_json_for(s, w.radiologist.id, study, rows) is rows
        shown = svc.deidentify_json_for(s, w.observer.id, study, rows)
        assert shown[0]["00100020"]["Value"] == [f"CONSULT-{c.id}"] and "00080080" not in shown[0]


# -- Part 10 files served to observers, streamed (archive.deidentify.deidentified_part10_stream) -----------

def _part10(ds: Dataset, path, syntax) -> bytes:
    from pydicom.dataset import FileMetaDataset

    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _with_pixels(frames: int = 3) -> Dataset:
    import numpy as np

    ds = _identified()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 64, 48, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(frames * 64 * 48, dtype="<u2") % 4096).tobytes()
    return ds


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
                                    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99"])
def test_streamed_copy_equals_the_whole_one(tmp_path, syntax):
    """Explicit/implicit little endian, big endian, RLE (encapsulated), deflated (done whole): the streamed
    copy is byte for byte what de-identifying the whole file in memory gives, in pieces of at most a chunk."""
    import io

    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    from archive.deidentify import deidentified_part10, deidentified_part10_stream

    ds = _with_pixels()
    if syntax == RLELossless:
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.compress(RLELossless)
        data = _part10(ds, tmp_path / "rle.dcm", syntax)
    else:
        if syntax == "1.2.840.10008.1.2.2":
            ds.PixelData = __import__("numpy").frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
        data = _part10(ds, tmp_path / "x.dcm", syntax)
    chunks = list(deidentified_part10_stream(io.BytesIO(data), "CONSULT-7", chunk=1000))
    assert b"".join(chunks) == deidentified_part10(data, "CONSULT-7")
    if syntax != DeflatedExplicitVRLittleEndian:
        assert max(len(c) for c in chunks[1:]) <= 1000 and len(chunks) > 3
    served = pydicom.dcmread(io.BytesIO(b"".join(chunks)))
    assert served.PatientID == "CONSULT-7" and "InstitutionName" not in served
    assert served.PatientIdentityRemoved == "YES"
    original = pydicom.dcmread(io.BytesIO(data))
    assert served.PixelData == original.PixelData


def test_streamed_copy_drops_what_follows_the_pixel_data(tmp_path):
    """Trailing elements after Pixel Data (a digital signature, padding, private data) are not copied."""
    import io

    from archive.deidentify import deidentified_part10_stream

    ds = _with_pixels(1)
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 16)  # Data Set Trailing Padding
    data = _part10(ds, tmp_path / "padded.dcm", "1.2.840.10008.1.2.1")
    served = pydicom.dcmread(io.BytesIO(b"".join(deidentified_part10_stream(io.BytesIO(data), "CONSULT-7"))))
    assert served.PixelData == ds.PixelData and 0xFFFCFFFC not in served


def test_streamed_copy_of_a_real_ct_and_a_dataset_without_pixels(ct_part10_dir, tmp_path):
    import io

    from archive.deidentify import deidentified_part10, deidentified_part10_stream

    data = dicom_files(ct_part10_dir)[0].read_bytes()
    assert b"".join(deidentified_part10_stream(io.BytesIO(data), "CONSULT-3")) == deidentified_part10(data, "CONSULT-3")
    report = _part10(_identified(), tmp_path / "no-pixels.dcm", "1.2.840.10008.1.2.1")
    served = pydicom.dcmread(io.BytesIO(b"".join(deidentified_part10_stream(io.BytesIO(report), "CONSULT-3"))))
    assert served.PatientID == "CONSULT-3" and "PixelData" not in served


def test_a_large_instance_is_streamed_without_being_held_in_memory(tmp_path):
    """A 48 MB multi-frame goes to an observer with only its header and one chunk in memory at a time."""
    import tracemalloc

    from archive.deidentify import deidentified_part10_stream

    ds = _with_pixels(1)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1024, 1024, 24
    ds.PixelData = bytes(1024 * 1024 * 2 * 24)
    path = tmp_path / "large.dcm"
    _part10(ds, path, "1.2.840.10008.1.2.1")
    del ds
    total = 0
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            for piece in deidentified_part10_stream(f, "CONSULT-9", chunk=1 << 20):
                total += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 48 << 20
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MB"


def test_a_truncated_instance_is_an_error_not_a_short_success(tmp_path):
    import io

    from archive.deidentify import deidentified_part10_stream

    data = _part10(_with_pixels(), tmp_path / "x.dcm", "1.2.840.10008.1.2.1")
    with pytest.raises(EOFError, match="short inside the pixel data"):
        b"".join(deidentified_part10_stream(io.BytesIO(data[:-100]), "CONSULT-7"))
