"""Generated DICOM phantoms with known geometry and values, for the viewer's tests.

Every phantom is a CT (HU = stored - 1024) unless said otherwise, written with pydicom as a Part 10 file.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
                         generate_uid)

ROWS = COLS = 256
# Two bright dots (3x3 pixels of +1000 HU) centred on these pixel centres (column, row).
DOT_A = (40, 50)
DOT_B = (200, 170)
# A square of known values: a checkerboard of 90 and 110 HU -> mean 100 HU, SD 10 HU exactly.
SQUARE = (60, 140, 120, 220)  # x0, y0, x1, y1 (columns x0..x1-1, rows y0..y1-1)
SQUARE_MEAN, SQUARE_SD = 100.0, 10.0


@dataclass
class Study:
    study_uid: str
    series_uids: list[str]
    files: list[Path]


def _base(study_uid: str, series_uid: str, sop_class: str, number: int, description: str) -> Dataset:
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.PatientName = "Phantom^Đo Đạc"
    ds.PatientID = "PH-" + study_uid[-6:]
    ds.PatientSex = "O"
    ds.PatientBirthDate = "20000101"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.StudyDescription = "Measurement phantom"
    ds.AccessionNumber = "PH1"
    ds.StudyID = "1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    return ds


def _ct(ds: Dataset, hu: np.ndarray, z: float, spacing: tuple[float, float] | None, keyword: str) -> None:
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.SliceThickness = 5
    if spacing is not None:
        setattr(ds, keyword, [spacing[0], spacing[1]])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = (hu + 1024).astype("<i2").tobytes()


def measurement_image() -> np.ndarray:
    """HU: air, two dots, the checkerboard square, and a soft-tissue disc so the image is not empty."""
    hu = np.full((ROWS, COLS), -1000, dtype=np.int16)
    y, x = np.ogrid[:ROWS, :COLS]
    hu[(x - 128) ** 2 + (y - 128) ** 2 < 120 ** 2] = 0
    for cx, cy in (DOT_A, DOT_B):
        hu[cy - 1:cy + 2, cx - 1:cx + 2] = 1000
    x0, y0, x1, y1 = SQUARE
    board = np.where((np.add.outer(np.arange(y1 - y0), np.arange(x1 - x0)) % 2) == 0, 90, 110)
    hu[y0:y1, x0:x1] = board
    return hu


def measurement_study(out: Path, spacing: tuple[float, float] | None = (0.8, 0.5),
                      keyword: str = "PixelSpacing", slices: int = 3) -> Study:
    """A few identical slices of :func:`measurement_image` with the given spacing (or none)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(slices):
        ds = _base(study, series, CTImageStorage, 1, "Dots and square")
        ds.InstanceNumber = i + 1
        _ct(ds, measurement_image(), 5.0 * i, spacing, keyword)
        path = out / f"m{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(study, [series], files)


def parallel_study(out: Path) -> Study:
    """Two axial CT series of one study: 10 slices every 5 mm, and 4 slices every 15 mm (same planes).

    Each slice's value is its z in HU (so a slice can be told apart by its pixels).
    """
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    files: list[Path] = []
    series_uids = []
    for number, (count, step) in enumerate(((10, 5.0), (4, 15.0)), start=1):
        series = generate_uid()
        series_uids.append(series)
        for i in range(count):
            z = step * i
            ds = _base(study, series, CTImageStorage, number, f"{step:g} mm")
            ds.InstanceNumber = i + 1
            hu = np.full((64, 64), int(z), dtype=np.int16)
            _ct(ds, hu, z, (1.0, 1.0), "PixelSpacing")
            path = out / f"s{number}-{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return Study(study, series_uids, files)


FRAMES = 12


def multiframe_study(out: Path) -> Study:
    """One Multi-frame Grayscale Word SC instance (cine-like): frame k (1-based) is a bar at row 8*k."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    ds = _base(study, series, MultiFrameGrayscaleWordSecondaryCaptureImageStorage, 1, "Cine")
    ds.Modality = "US"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = FRAMES
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 50
    ds.Rows = ds.Columns = 128
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = 500
    ds.WindowWidth = 1000
    frames = np.zeros((FRAMES, 128, 128), dtype="<u2")
    for k in range(FRAMES):
        frames[k, 8 * (k + 1):8 * (k + 1) + 6, :] = 1000
    ds.PixelData = frames.tobytes()
    path = out / "cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Study(study, [series], [path])


def ct_series(out: Path, slices: int, rows: int = 64, cols: int = 64) -> Study:
    """An axial CT series of ``slices`` small slices (for the size and speed of the series API)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = []
    hu = np.zeros((rows, cols), dtype=np.int16)
    order = np.random.default_rng(5).permutation(slices)  # stored in a shuffled order
    for i in order:
        ds = _base(study, series, CTImageStorage, 1, "Thin axial")
        ds.InstanceNumber = int(slices - i)  # numbers run against the position: the order must follow position
        _ct(ds, hu, float(i) * 0.7, (0.7, 0.7), "PixelSpacing")
        path = out / f"c{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(study, [series], files)


def large_study(out: Path, rows: int = 2048, cols: int = 1664) -> Study:
    """One DX-like projection image larger than a screen (ImagerPixelSpacing 0.15 mm), 16-bit."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    ds = _base(study, series, "1.2.840.10008.5.1.4.1.1.1.1", 1, "Chest PA")  # Digital X-Ray Image (presentation)
    ds.Modality = "DX"
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    y, x = np.mgrid[:rows, :cols]
    pixels = ((x * 7 + y * 3) % 4096).astype("<u2")  # fine diagonal ramps: detail that only full resolution shows
    ds.PixelData = pixels.tobytes()
    path = out / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Study(study, [series], [path])
