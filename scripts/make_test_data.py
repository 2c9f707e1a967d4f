#!/usr/bin/env python3
"""Generate synthetic but realistic DICOM test data with pydicom.

    make_test_data.py ct-series --slices 300 --out /tmp/ct [--rows 512 --cols 512]
    make_test_data.py multiframe --megabytes 500 --out /tmp/big.dcm

``ct-series``: one CT Image Storage study/series, one Explicit VR Little Endian
Part-10 file per slice, pixels from an ellipsoid phantom (HU = stored - 1024).

``multiframe``: one Multi-frame Grayscale Word Secondary Capture instance of
512x512 16-bit frames, the header written by pydicom and the Pixel Data value
streamed frame by frame, so memory stays flat whatever the size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import struct
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    generate_uid,
)

PATIENT_NAME = "Nguyễn^Văn A"
PATIENT_ID = "TP-000123"
MAX_PIXEL_DATA_BYTES = 0xFFFFFFFE  # 32-bit length, even, 0xFFFFFFFF means undefined


# --------------------------------------------------------------------------- phantom


def phantom_slice(rows: int, cols: int, z: float, z_extent: float) -> np.ndarray:
    """HU values of a head-sized ellipsoid phantom at height ``z`` (mm, 0..z_extent).

    Air (-1000) outside, a bone shell (+700), soft tissue (40), two fat
    inserts (-100), a contrast insert (200) and a lung-like insert (-700).
    Inserts are ellipsoids, so slices differ along z.
    """
    y, x = np.ogrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j]
    zc = (2.0 * z / z_extent - 1.0) if z_extent > 0 else 0.0  # -1..1
    img = np.full((rows, cols), -1000.0, dtype=np.float32)

    def ellipsoid(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((zc - cz) / az) ** 2 <= 1.0

    img[ellipsoid(0, 0, 0, 0.85, 0.95, 1.2)] = 700.0  # skull
    img[ellipsoid(0, 0, 0, 0.78, 0.88, 1.15)] = 40.0  # brain
    img[ellipsoid(-0.35, -0.2, 0.3, 0.15, 0.25, 0.5)] = -100.0
    img[ellipsoid(0.35, -0.2, -0.3, 0.15, 0.25, 0.5)] = -100.0
    img[ellipsoid(0.0, 0.4, 0.0, 0.2, 0.12, 0.8)] = 200.0
    img[ellipsoid(0.0, -0.1, -0.5, 0.1, 0.1, 0.4)] = -700.0
    return img


# --------------------------------------------------------------------------- CT series


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TELEPACS_GEN"
    return meta


def _patient_study(ds: Dataset, when: dt.datetime) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.AccessionNumber = "A" + when.strftime("%y%m%d%H%M%S")  # SH: at most 16
    ds.ReferringPhysicianName = "Trần^Thị B"
    ds.StudyDescription = "CT Head synthetic"
    ds.InstitutionName = "telepacs test"
    ds.Manufacturer = "telepacs"


def ct_template(rows: int, cols: int, slice_thickness: float, when: dt.datetime) -> Dataset:
    """A CT Image Storage dataset with everything but the per-slice attributes."""
    ds = Dataset()
    _patient_study(ds, when)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.SeriesDescription = "Axial 0.7mm synthetic phantom"
    ds.BodyPartExamined = "HEAD"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = "120"
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def make_ct_series(
    out_dir: Path,
    slices: int,
    rows: int = 512,
    cols: int = 512,
    slice_thickness: float = 1.0,
) -> list[Path]:
    """Write an N-slice CT series (one study, one series) into ``out_dir``; return the paths.

    Files are named ``CT{InstanceNumber:05d}.dcm``; z = (i - 1) * SliceThickness.
    One template dataset is reused and only per-slice attributes change.
    """
    if slices < 1:
        raise ValueError("slices must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    when = dt.datetime.now().replace(microsecond=0)
    ds = ct_template(rows, cols, slice_thickness, when)
    x0 = -0.7 * (cols - 1) / 2
    y0 = -0.7 * (rows - 1) / 2
    z_extent = slice_thickness * (slices - 1)
    paths: list[Path] = []
    for i in range(1, slices + 1):
        z = (i - 1) * slice_thickness
        uid = generate_uid()
        ds.file_meta = _file_meta(CTImageStorage, uid)
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = i
        ds.ImagePositionPatient = [f"{x0:.2f}", f"{y0:.2f}", f"{z:.2f}"]
        ds.SliceLocation = f"{z:.2f}"
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        stored = (phantom_slice(rows, cols, z, z_extent) + 1024.0).astype("<i2")
        ds.PixelData = stored.tobytes()
        path = out_dir / f"CT{i:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- multi-frame


def multiframe_header(frames: int, rows: int, cols: int) -> Dataset:
    """Multi-frame Grayscale Word SC dataset (no Pixel Data) for ``frames`` 16-bit frames."""
    when = dt.datetime.now().replace(microsecond=0)
    ds = Dataset()
    _patient_study(ds, when)
    uid = generate_uid()
    ds.file_meta = _file_meta(MultiFrameGrayscaleWordSecondaryCaptureImageStorage, uid)
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic multi-frame"
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "40"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _frames(frames: int, rows: int, cols: int) -> Iterator[bytes]:
    """Frame bytes (little-endian uint16), each a phantom slice, varying along the frames."""
    for i in range(frames):
        hu = phantom_slice(rows, cols, float(i), float(max(frames - 1, 1)))
        yield (hu + 1024.0).astype("<u2").tobytes()


def make_multiframe(out_file: Path, megabytes: float, rows: int = 512, cols: int = 512) -> int:
    """Write one multi-frame instance with ~``megabytes`` MB of pixel data; return its frame count.

    The header (preamble, file meta, data set up to Pixel Data) is written by
    pydicom; then the Pixel Data element header (7FE0,0010) OW with its exact
    explicit length, then the frames streamed one at a time. Pixel Data is the
    last element, so the file is a valid Part-10 file.
    """
    frame_bytes = rows * cols * 2
    frames = max(1, round(megabytes * 1024 * 1024 / frame_bytes))
    length = frames * frame_bytes  # even: 2 bytes per pixel
    if length > MAX_PIXEL_DATA_BYTES:
        raise ValueError(f"{length} bytes of Pixel Data does not fit a 32-bit element length")
    ds = multiframe_header(frames, rows, cols)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "wb") as fp:
        dcmwrite(fp, ds, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length
        fp.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", length))
        written = 0
        for chunk in _frames(frames, rows, cols):
            fp.write(chunk)
            written += len(chunk)
        assert written == length, (written, length)
    return frames


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ct = sub.add_parser("ct-series", help="N-slice CT series, one Part-10 file per slice")
    ct.add_argument("--slices", type=int, required=True)
    ct.add_argument("--out", type=Path, required=True, help="output directory")
    ct.add_argument("--rows", type=int, default=512)
    ct.add_argument("--cols", type=int, default=512)
    ct.add_argument("--slice-thickness", type=float, default=1.0, help="mm, also the z step")

    mf = sub.add_parser("multiframe", help="one large multi-frame instance, streamed to disk")
    mf.add_argument("--megabytes", type=float, required=True, help="approximate pixel data size in MiB")
    mf.add_argument("--out", type=Path, required=True, help="output file")
    mf.add_argument("--rows", type=int, default=512)
    mf.add_argument("--cols", type=int, default=512)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ct-series":
        paths = make_ct_series(args.out, args.slices, args.rows, args.cols, args.slice_thickness)
        print(f"wrote {len(paths)} CT slices to {args.out}")
    elif args.command == "multiframe":
        frames = make_multiframe(args.out, args.megabytes, args.rows, args.cols)
        print(f"wrote {args.out}: {frames} frames, {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
