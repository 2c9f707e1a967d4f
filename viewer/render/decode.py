"""Decode one frame of pixel data (the first step of the rendering pipeline).

Order of operations in :func:`decode_frame`: read the dataset (if given a path or bytes) → decode the
one requested frame with pydicom 3's decoders (native, RLE, JPEG, JPEG-LS, JPEG 2000 through pylibjpeg
and its plugins) *without* colour conversion → :func:`mask_bits_stored` (ignore the bits above Bits
Stored, sign-extend signed data).

Only the requested frame is decoded: pydicom's ``Decoder.as_array(index=n)`` slices one frame out of
native pixel data and decodes one fragment set of encapsulated data.

References
----------
* DICOM PS3.3 C.7.6.3 Image Pixel Module (Bits Allocated, Bits Stored, High Bit, Pixel Representation).
* DICOM PS3.5 §8 (native and encapsulated pixel data), Annex A.4 (encapsulation).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options, get_nr_frames
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                         JPEGExtended12Bit)

from viewer.render.params import RenderError

log = logging.getLogger(__name__)

Source = Dataset | str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its stored values and the colour space they are in.

    ``pixels`` is (rows, columns) for one sample per pixel, (rows, columns, 3) for colour.
    ``photometric`` is the colour space of ``pixels`` as decoded, which can differ from the dataset's
    Photometric Interpretation: a JPEG decoder may already have converted YBR_FULL_422 to RGB.
    """

    pixels: np.ndarray
    photometric: str


def load_dataset(src: Source) -> Dataset:
    """Read a dataset from a path or bytes (Part 10 or a raw dataset without file meta).

    A raw dataset (no preamble, no file meta; read with ``force=True``) gets a Transfer Syntax UID
    from the encoding pydicom found, so that its pixel data can be decoded.

    Raises
    ------
    RenderError
        When the input is not a DICOM dataset or has no Pixel Data.
    """
    if isinstance(src, Dataset):
        ds = src
    else:
        try:
            ds = pydicom.dcmread(io.BytesIO(src) if isinstance(src, bytes) else src, force=True)
        except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
            what = "bytes" if isinstance(src, bytes) else os.fspath(src)
            log.warning("render: cannot read %s as DICOM: %s", what, exc)
            raise RenderError(f"not a readable DICOM dataset: {exc}") from exc
    _ensure_transfer_syntax(ds)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        log.warning("render: dataset %s has no pixel data", ds.get("SOPInstanceUID", "?"))
        raise RenderError("the dataset has no Pixel Data to render")
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a raw dataset (read without file meta) the Transfer Syntax UID it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if little is None:
        raise RenderError("the dataset has no Transfer Syntax UID and its encoding is unknown")
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent."""
    return int(get_nr_frames(ds, warn=False))


def mask_bits_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Ignore the bits above Bits Stored; sign-extend signed values from bit ``bits_stored - 1``.

    PS3.5 §8.1.1: bits of a stored value above High Bit are not part of the value (they may hold
    overlay planes or garbage). For unsigned data they are cleared; for signed (two's complement,
    Pixel Representation 1) data bit ``bits_stored - 1`` is the sign and is copied into them.
    An integer array whose item size already equals ``bits_stored`` is returned as it is.

    Parameters
    ----------
    arr : numpy.ndarray
        Integer stored values, of the dtype of Bits Allocated (signed when ``signed``).
    bits_stored : int
        Bits Stored (0028,0101).
    signed : bool
        Pixel Representation (0028,0103) is 1.

    Returns
    -------
    numpy.ndarray
        The corrected values, same dtype (modified in place when writeable).
    """
    if arr.dtype.kind not in "iu":
        return arr
    shift = arr.dtype.itemsize * 8 - bits_stored
    if shift <= 0:
        return arr
    if not arr.flags.writeable:
        arr = arr.copy()
    if signed:
        work = arr if arr.dtype.kind == "i" else arr.view(np.dtype(f"i{arr.dtype.itemsize}"))
        np.left_shift(work, shift, out=work)
        np.right_shift(work, shift, out=work)  # arithmetic shift on a signed dtype: sign extension
    else:
        np.bitwise_and(arr, np.array((1 << bits_stored) - 1, dtype=arr.dtype), out=arr)
    return arr


# JPEG baseline/extended: Pillow's libjpeg(-turbo) upsamples subsampled chroma smoothly ("fancy
# upsampling", as IJG libjpeg and dcmtk do); pylibjpeg-libjpeg replicates it, up to 14 levels off at edges.
_PREFER_PILLOW = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})


def _decode(decoder: Any, ds: Dataset, frame: int, options: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """One frame, raw (no colour conversion); JPEG through Pillow first when it can (8-bit only)."""
    if decoder.UID in _PREFER_PILLOW and "pillow" in decoder.available_plugins:
        try:
            arr, meta = decoder.as_array(ds, index=frame, raw=True, validate=True, decoding_plugin="pillow", **options)
            return arr, meta
        except (ValueError, RuntimeError, OSError) as exc:  # e.g. 12-bit JPEG: the other plugins follow
            log.debug("render: Pillow could not decode %s (%s), trying pylibjpeg", ds.get("SOPInstanceUID", "?"), exc)
    arr, meta = decoder.as_array(ds, index=frame, raw=True, validate=True, **options)
    return arr, meta


_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def native_frame(ds: Dataset, frame: int) -> np.ndarray | None:
    """Frame ``frame`` of native little-endian grey-scale pixel data, read straight from its bytes.

    The common case of a CT or MR slice (one sample, 8 or 16 bits allocated, uncompressed) needs no
    decoder: the frame is a slice of Pixel Data. This skips pydicom's decoder set-up and validation,
    which cost more than the rest of a cold render. None when the dataset is not that case (colour,
    other bit depths, big endian, float or encapsulated data, Pixel Data too short): the caller then
    uses pydicom's decoders, which check and report everything.
    """
    if UID(ds.file_meta.TransferSyntaxUID) not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    try:
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        rows, columns = int(ds.Rows), int(ds.Columns)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or bits not in (8, 16) or rows <= 0 or columns <= 0:
        return None
    data = ds.PixelData
    size = bits // 8
    count = rows * columns
    offset = frame * count * size
    if not isinstance(data, bytes) or len(data) < offset + count * size:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{size}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(rows, columns)


def decode_frame(src: Source, frame: int = 0) -> tuple[Dataset, Frame]:
    """Decode frame ``frame`` (0-based) of ``src`` and return the dataset with it.

    Order: read → decode one frame (no colour conversion) → :func:`mask_bits_stored` → native byte
    order. Colour conversion (YBR → RGB, palette) is a later step, :mod:`viewer.render.transforms`.

    Raises
    ------
    RenderError
        Unreadable input, no pixel data, a frame number out of range, an unsupported transfer
        syntax, or pixel data that fails to decode.
    """
    ds = load_dataset(src)
    frames = number_of_frames(ds)
    if not 0 <= frame < frames:
        log.warning("render: frame %d requested from %s, which has %d frame(s)",
                    frame + 1, ds.get("SOPInstanceUID", "?"), frames)
        raise RenderError(f"frame {frame + 1} does not exist: the instance has {frames} frame(s)")
    native = native_frame(ds, frame)
    if native is not None:
        arr = mask_bits_stored(native, int(ds.BitsStored), int(ds.get("PixelRepresentation", 0)) == 1)
        return ds, Frame(arr, str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper())
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        log.warning("render: no decoder for transfer syntax %s (%s)", syntax, syntax.name)
        raise RenderError(f"transfer syntax {syntax} ({syntax.name}) cannot be decoded") from exc
    if not decoder.is_available:
        raise RenderError(f"no decoding plugin installed for {syntax.name}")
    options: dict[str, Any] = as_pixel_options(ds)
    options.update(correct_unused_bits=False)  # done below by mask_bits_stored, on every path
    try:
        arr, meta = _decode(decoder, ds, frame, options)
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError) as exc:
        log.warning("render: cannot decode frame %d of %s (%s): %s",
                    frame + 1, ds.get("SOPInstanceUID", "?"), syntax.name, exc)
        raise RenderError(f"the pixel data cannot be decoded ({syntax.name}): {exc}") from exc
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind in "iu":
        arr = mask_bits_stored(arr, int(ds.BitsStored), int(ds.get("PixelRepresentation", 0)) == 1)
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "MONOCHROME2")))
    return ds, Frame(arr, photometric.strip().upper())


PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def detach_for_cache(ds: Dataset, frame: Frame) -> tuple[Dataset, Frame]:
    """A decoded frame that holds no more memory than it shows, for a long-lived cache.

    A native frame (:func:`native_frame`) is a view into the dataset's whole Pixel Data (for a multi-frame
    instance: every frame), and the dataset holds that buffer too. The returned pair holds only the one
    frame's pixels and the attributes the later steps read: the dataset loses its pixel data element, and
    a view into a multi-frame buffer is copied out (a single frame's view is that frame's memory already).
    ``ds`` is changed in place; the caller must not need its pixel data afterwards.
    """
    single_frame = number_of_frames(ds) == 1
    for keyword in PIXEL_DATA_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    pixels = frame.pixels
    if not single_frame and (pixels.base is not None or not pixels.flags.owndata):
        pixels = np.ascontiguousarray(pixels).copy()
    return ds, Frame(pixels, frame.photometric)
