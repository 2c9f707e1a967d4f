"""The fast header scan reads exactly what pydicom reads, and refuses what pydicom's path refuses."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from archive.dataset import InvalidDataset, read_instance
from archive.header_scan import FIRST_WINDOW, HEAD_BYTES, ScanUnsupported, scan_part10
from helpers import CT_RAW_DIR, FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files


def _part10_testdata():
    files = dicom_files(TS_DIR) + dicom_files(MR_STUDY_DIR)[:20] + dicom_files(FMRI_DIR)[:10]
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in files]


@pytest.mark.parametrize("path", _part10_testdata())
def test_scan_reads_what_pydicom_reads(path):
    fast, fast_meta = read_instance(path)
    reference, reference_meta = read_instance(path, fast_scan=False)
    assert fast == reference
    assert str(fast_meta.TransferSyntaxUID) == str(reference_meta.TransferSyntaxUID)
    with open(path, "rb") as fp:
        scan_part10(fp, path.stat().st_size)  # no fallback: the real files are all in the scan's reach


def _dataset(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Nguyễn^Văn A"
    ds.PatientID = "BN-001"
    ds.Modality = "CT"
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [0, 0, -12.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = b"\x01\x00" * 16
    return ds


def _write(ds: Dataset, path, syntax=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def _nested_sequences() -> Sequence:
    inner = Dataset()
    inner.CodeValue = "T-D1100"
    inner.CodeMeaning = "Head"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.AnatomicRegionSequence = Sequence([inner])
    return Sequence([item, Dataset()])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("undefined_length", [False, True])
def test_sequences_are_skipped_at_any_depth(tmp_path, syntax, undefined_length):
    ds = _dataset(ReferencedImageSequence=_nested_sequences(), StudyDescription="after the sequence")
    if undefined_length:
        ds["ReferencedImageSequence"].is_undefined_length = True
        for item in ds.ReferencedImageSequence:
            item.is_undefined_length_sequence_item = True
        ds.ReferencedImageSequence[0]["AnatomicRegionSequence"].is_undefined_length = True
    path = _write(ds, tmp_path / "seq.dcm", syntax)
    with open(path, "rb") as fp:
        scan_part10(fp, path.stat().st_size)
    fast, _ = read_instance(path)
    assert fast == read_instance(path, fast_scan=False)[0]
    assert fast.study_description == "after the sequence"
    assert fast.patient_name == "Nguyễn^Văn A"
    assert fast.slice_position == -12.5


def test_un_of_undefined_length_holds_implicit_items(tmp_path):
    # A private sequence sent as UN of undefined length: its items are Implicit VR LE (PS3.5 6.2.2),
    # so (0009,1010) inside has a 4-byte length and no VR.
    value_text = b"private value "
    item_body = b"\x09\x00\x10\x10" + len(value_text).to_bytes(4, "little") + value_text
    un_value = (b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item_body + b"\xfe\xff\x0d\xe0" + b"\x00" * 4
                + b"\xfe\xff\xdd\xe0" + b"\x00" * 4)
    un_element = b"\x07\x00\x10\x00" + b"UN\x00\x00" + b"\xff\xff\xff\xff" + un_value  # (0007,0010)
    path = _write(_dataset(StudyDescription="after UN"), tmp_path / "un.dcm")
    data = path.read_bytes()
    at = data.index(b"\x08\x00\x30\x10")  # (0008,1030) StudyDescription: (0007,0010) goes before it
    patched = tmp_path / "un-patched.dcm"
    patched.write_bytes(data[:at] + un_element + data[at:])
    fast, _ = read_instance(patched)
    assert fast.study_description == "after UN"
    assert fast == read_instance(patched, fast_scan=False)[0]


def test_deflated_falls_back_to_pydicom(tmp_path):
    path = _write(_dataset(), tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    with open(path, "rb") as fp, pytest.raises(ScanUnsupported):
        scan_part10(fp, path.stat().st_size)
    parsed, _ = read_instance(path)
    assert parsed.patient_name == "Nguyễn^Văn A"


def test_header_beyond_the_scan_window_falls_back(tmp_path):
    ds = _dataset()
    ds.add_new(0x00291010, "OB", b"\x00" * (HEAD_BYTES + 10))  # a big private blob before the pixel data
    path = _write(ds, tmp_path / "big.dcm")
    with open(path, "rb") as fp, pytest.raises(ScanUnsupported):
        scan_part10(fp, path.stat().st_size)
    parsed, _ = read_instance(path)
    assert parsed.instance_number == 7


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_beyond_the_first_window_is_scanned_in_the_whole_window(tmp_path, transfer_syntax):
    ds = _dataset()
    blob = bytes(range(256)) * ((FIRST_WINDOW + 4096) // 256)  # ends past the first read, within HEAD_BYTES
    ds.add_new(0x00291010, "OB", blob)
    path = _write(ds, tmp_path / "wide.dcm", transfer_syntax)
    with open(path, "rb") as fp:
        header = scan_part10(fp, path.stat().st_size)  # no ScanUnsupported: the second read reaches it
    assert header.elements[0x00291010].value == blob
    assert read_instance(path)[0] == read_instance(path, fast_scan=False)[0]
    cut = tmp_path / "wide-cut.dcm"
    cut.write_bytes(path.read_bytes()[: FIRST_WINDOW + 100])  # truncated inside the blob
    with pytest.raises(InvalidDataset, match="truncated"):
        read_instance(cut)


def _encapsulated(tmp_path, fragments: list[bytes]):
    ds = _dataset()
    del ds.PixelData
    ds.PixelData = pydicom.encaps.encapsulate(fragments)
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    return _write(ds, tmp_path / "encaps.dcm", JPEGBaseline8Bit)


def test_encapsulated_pixel_data_is_walked_and_truncation_refused(tmp_path):
    path = _encapsulated(tmp_path, [b"\xff\xd8" + b"\x11" * 5000 + b"\xff\xd9", b"\xff\xd8" + b"\x22" * 3000 + b"\xff\xd9"])
    assert read_instance(path)[0] == read_instance(path, fast_scan=False)[0]
    data = path.read_bytes()
    for cut in (len(data) - 8, len(data) - 2000, len(data) - 6000):
        cut_path = tmp_path / f"cut-{cut}.dcm"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(InvalidDataset, match="truncated"):
            read_instance(cut_path)


def test_native_pixel_data_cut_short_is_refused(tmp_path):
    path = _write(_dataset(), tmp_path / "native.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-4])
    with pytest.raises(InvalidDataset, match="truncated"):
        read_instance(cut)


def test_raw_dataset_without_file_meta_is_not_scanned(tmp_path):
    raw = dicom_files(CT_RAW_DIR)[0]
    with open(raw, "rb") as fp, pytest.raises(ScanUnsupported):
        scan_part10(fp, raw.stat().st_size)
