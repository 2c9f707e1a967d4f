import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from archive.dataset import InvalidDataset, fold_name, read_instance, slice_position, wrap_raw_dataset
from helpers import CT_RAW_DIR, FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files


@pytest.mark.parametrize(
    "name, folded",
    [("Nguyễn^Văn A", "nguyen^van a"), ("Đặng^Thị Hồng", "dang^thi hong"), ("TRẦN^ĐỨC", "tran^duc"), ("", "")],
)
def test_fold_name(name, folded):
    assert fold_name(name) == folded


@pytest.mark.parametrize("path", dicom_files(TS_DIR), ids=lambda p: p.name)
def test_reads_every_transfer_syntax(path):
    parsed, meta = read_instance(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert parsed.sop_instance_uid == ds.SOPInstanceUID
    assert parsed.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert parsed.patient_name == "stc_test"
    assert (parsed.rows, parsed.columns) == (384, 384)


def _write(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.3")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    ds.save_as(path, enforce_file_format=True)
    return path


def _minimal(**values: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def test_vietnamese_name_in_utf8(tmp_path):
    ds = _minimal(SpecificCharacterSet="ISO_IR 192", PatientName="Nguyễn^Văn A", PatientID="P1")
    parsed, _ = read_instance(_write(ds, tmp_path / "a.dcm"))
    assert parsed.patient_name == "Nguyễn^Văn A"


def test_latin1_name(tmp_path):
    ds = _minimal(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    parsed, _ = read_instance(_write(ds, tmp_path / "a.dcm"))
    assert parsed.patient_name == "Müller^Jürgen"


def test_truncated_file_is_refused(tmp_path):
    src = TS_DIR / "1.dcm"
    data = src.read_bytes()
    for cut in (len(data) - 5000, 2000):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidDataset, match="truncated|cut short|cannot decode"):
            read_instance(path)


def test_truncated_encapsulated_file_is_refused(tmp_path):
    data = (TS_DIR / "5.dcm").read_bytes()  # JPEG Lossless: encapsulated pixel data
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(InvalidDataset):
        read_instance(path)


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_refused(tmp_path, missing):
    ds = _minimal()
    delattr(ds, missing)
    with pytest.raises(InvalidDataset, match=missing):
        read_instance(_write(ds, tmp_path / "a.dcm"))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1." + "9" * 70, "1.2.abc"])
def test_bad_uid_is_refused(tmp_path, bad):
    ds = _minimal()
    ds.SOPInstanceUID = bad
    with pytest.raises(InvalidDataset, match="SOPInstanceUID"):
        read_instance(_write(ds, tmp_path / "a.dcm"))


def test_not_dicom_is_refused(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello, this is not DICOM" * 10)
    with pytest.raises(InvalidDataset, match="not a DICOM"):
        read_instance(path)


def test_wrap_raw_dataset_keeps_dataset_bytes(tmp_path):
    raw = dicom_files(CT_RAW_DIR)[0]
    out = io.BytesIO()
    with open(raw, "rb") as src:
        wrap_raw_dataset(src, out)
    assert out.getvalue().endswith(raw.read_bytes())
    path = tmp_path / "w.dcm"
    path.write_bytes(out.getvalue())
    parsed, meta = read_instance(path)
    assert parsed.modality == "CT"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2"


def test_slice_position_along_normal():
    ds = Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100, -100, 42.5]
    assert slice_position(ds) == pytest.approx(42.5)
    ds2 = Dataset()
    ds2.SliceLocation = "7.5"
    assert slice_position(ds2) == 7.5
    assert slice_position(Dataset()) is None


@pytest.mark.parametrize("path", dicom_files(TS_DIR), ids=lambda p: p.name)
def test_dataset_offset_is_where_the_file_meta_ends(path):
    from archive.dataset import dataset_offset

    parsed, _ = read_instance(path)
    with open(path, "rb") as f:
        assert parsed.dataset_offset == dataset_offset(f)


@pytest.mark.parametrize("path", dicom_files(TS_DIR) + dicom_files(MR_STUDY_DIR)[:3] + dicom_files(FMRI_DIR)[:2],
                         ids=lambda p: p.name)
def test_raw_decoding_agrees_with_pydicom(path):
    """The fast raw-element reader gives what pydicom's own conversion gives."""
    from archive.dataset import _Values

    parsed, _ = read_instance(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword, value in [("patient_name", "PatientName"), ("patient_id", "PatientID"), ("modality", "Modality"),
                           ("study_date", "StudyDate"), ("series_description", "SeriesDescription")]:
        assert getattr(parsed, keyword) == str(ds.get(value, "")).strip()
    assert parsed.rows == ds.Rows and parsed.columns == ds.Columns
    assert parsed.instance_number == (int(ds.InstanceNumber) if "InstanceNumber" in ds else None)
    assert parsed.display.get("PixelSpacing") == ([float(v) for v in ds.PixelSpacing] if "PixelSpacing" in ds else None)
    assert parsed.display.get("BitsStored") == ds.get("BitsStored")
    values = _Values(pydicom.dcmread(path, stop_before_pixels=True))
    assert values.text("ImageType") == "\\".join(ds.ImageType)


def test_raw_decoding_of_vietnamese_and_latin1_names(tmp_path):
    for charset, name in [("ISO_IR 192", "Trần^Thị Hồng Đào"), ("ISO_IR 100", "Müller^Jürgen")]:
        ds = _minimal(SpecificCharacterSet=charset, PatientName=name, ReferringPhysicianName=name,
                      StudyDescription="Chụp CT sọ não" if charset == "ISO_IR 192" else "Schädel")
        parsed, _ = read_instance(_write(ds, tmp_path / "a.dcm"))
        assert parsed.patient_name == name
        assert parsed.referring_physician_name == name
        assert parsed.study_description == ds.StudyDescription
