"""Synthetic DICOM images for the render tests, and a wrapper around dcmtk's dcmj2pnm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def new_image(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
              frames: int = 1, planar: int = 0, **attrs: object) -> Dataset:
    """A Secondary Capture dataset (Explicit VR Little Endian) holding ``pixels`` as they are.

    ``pixels`` is (rows, cols), (frames, rows, cols), (rows, cols, 3) or (frames, rows, cols, 3); its
    dtype gives Bits Allocated and Pixel Representation; high bits beyond ``bits_stored`` are kept as
    they are (to test masking).
    """
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.PatientName, ds.PatientID = "Render^Test", "RENDER"
    bits = pixels.dtype.itemsize * 8
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames > 1 else pixels.shape[:2]
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if colour:
        ds.PlanarConfiguration = planar
        if planar:
            pixels = np.moveaxis(pixels, -1, -3)  # R plane, G plane, B plane (per frame)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    data = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(shape: tuple[int, int], lo: int, hi: int, dtype: str) -> np.ndarray:
    """A diagonal ramp from ``lo`` to ``hi`` (every value in between appears) with a noise texture."""
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    t = (x + y) / (rows + cols - 2)
    noise = np.random.default_rng(7).integers(-3, 4, size=shape)
    return np.clip(np.rint(lo + t * (hi - lo)) + noise, lo, hi).astype(dtype)


def colour_picture(rows: int = 96, cols: int = 128) -> np.ndarray:
    """An 8-bit RGB test picture: hue ramps, a saturated block and grey steps."""
    y, x = np.mgrid[0:rows, 0:cols]
    rgb = np.stack([x * 255 // (cols - 1), y * 255 // (rows - 1), (x + y) * 255 // (rows + cols - 2)], axis=-1)
    rgb[10:30, 10:40] = (250, 20, 30)
    rgb[60:80, 70:120] = (16, 200, 90)
    return rgb.astype(np.uint8)


def dcmj2pnm(src: Path, out: Path, *options: str) -> np.ndarray:
    """Render ``src`` with dcmtk's dcmj2pnm as PNG (``+on``) and return the decoded PNG."""
    run = subprocess.run(["dcmj2pnm", "+on", *options, str(src), str(out)],
                         capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert run.returncode == 0, f"dcmj2pnm {' '.join(options)} {src}: {run.stderr}"
    return np.asarray(Image.open(out))


def dcmtk(tool: str, *args: str | Path) -> None:
    """Run a dcmtk tool (dcmcjpeg, dcmcrle, dcmdjpls, img2dcm...) and fail the test on an error."""
    run = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert run.returncode == 0, f"{tool} {args}: {run.stderr}"


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path, force=True)
