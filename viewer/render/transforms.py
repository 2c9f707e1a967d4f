"""Grey-scale and colour transforms from stored values to 8-bit display values.

The order of operations for grey-scale (MONOCHROME1/2) images, as PS3.3 C.11 and PS3.4 N.2 lay it out:

1. :func:`apply_modality_lut` — stored values → modality values (e.g. HU): Rescale Slope/Intercept or
   the Modality LUT Sequence (PS3.3 C.11.1).
2. VOI — modality values → display levels 0..255: a window (:func:`apply_window`, Window Center/Width
   with the VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2 and C.11.2.1.3) or the
   VOI LUT Sequence (:func:`apply_voi_lut_sequence`, PS3.3 C.11.2.1.1); :func:`default_window` when the
   instance has neither.
3. Presentation — :func:`invert_monochrome1`: MONOCHROME1 means the minimum value is white
   (PS3.3 C.7.6.3.1.2), so display levels are inverted.

:func:`to_display` runs 1–3; for integer stored values of 8 or 16 bits it runs them once over every
possible stored value to make a 256- or 65,536-entry table (cached) and then maps the frame through it
with one ``np.take``, which is several times faster than computing per pixel.

Colour images skip 1–3 (PS3.3 C.11.1/C.11.2 apply to grey-scale only): :func:`ybr_to_rgb` converts
YBR_FULL/YBR_FULL_422 (PS3.3 C.7.6.3.1.2), :func:`apply_palette` maps PALETTE COLOR through the Red,
Green and Blue Palette Color Lookup Tables (PS3.3 C.7.6.3.1.5), and :func:`colour_to_8bit` scales
samples of more than 8 bits.

All computations are in float32 (exact for stored values up to 2**24), never float64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import VR

from viewer.render.params import RenderError, VOIFunction, Window

log = logging.getLogger(__name__)

GREY = ("MONOCHROME1", "MONOCHROME2")


# ---------------------------------------------------------------------------------------------- LUT data
@dataclass(frozen=True)
class LookupTable:
    """A LUT from a Modality, VOI or Palette LUT Sequence item: descriptor and data (PS3.3 C.11.1.1.1).

    ``first`` is the first stored value mapped; values below it map to entry 0 and values above the
    last entry to the last entry. ``bits`` is the nominal entry depth (third descriptor value).
    ``data`` holds the entries as little-endian uint16 bytes (bytes: hashable, for the table cache).
    """

    first: int
    bits: int
    data: bytes

    @property
    def entries(self) -> np.ndarray:
        """The table as a uint16 array."""
        return np.frombuffer(self.data, dtype="<u2")


def _lut_from_item(item: Dataset, ds: Dataset, data_keyword: str = "LUTData",
                   descriptor_keyword: str = "LUTDescriptor", signed_first: bool = False) -> LookupTable:
    """Read a LUT Descriptor and LUT Data pair into a :class:`LookupTable`."""
    try:
        descriptor = [int(v) for v in item[descriptor_keyword].value]
        elem = item[data_keyword]
    except KeyError as exc:
        raise RenderError(f"a lookup table lacks {exc.args[0]}") from None
    if len(descriptor) != 3:
        raise RenderError(f"{descriptor_keyword} must have 3 values, has {len(descriptor)}")
    count, first, bits = descriptor
    count = count or 65536
    if signed_first and first >= 32768:  # PS3.3 C.11.1.1.1: "first value mapped" follows the pixel sign
        first -= 65536
    if elem.VR == VR.OW or isinstance(elem.value, bytes):
        little = _is_little_endian(ds)
        raw = np.frombuffer(bytes(elem.value), dtype="<u2" if little else ">u2")
        if bits <= 8 and raw.size * 2 == count:  # 8-bit entries packed two to a word (PS3.3 C.7.6.3.1.6)
            raw = np.frombuffer(bytes(elem.value), dtype=np.uint8)
    else:
        raw = np.asarray(list(elem.value), dtype=np.int64)
    if raw.size < count:
        raise RenderError(f"{data_keyword} has {raw.size} entries, its descriptor says {count}")
    return LookupTable(first, bits, raw[:count].astype("<u2").tobytes())


def _is_little_endian(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return bool(meta._tsyntax_encoding[1] is not False)
    return ds.original_encoding[1] is not False


def _lookup(arr: np.ndarray, lut: LookupTable) -> np.ndarray:
    """Map values through ``lut``: ``entries[clip(round(x) - first, 0, n - 1)]``."""
    entries = lut.entries
    index = np.rint(arr) if arr.dtype.kind == "f" else arr
    index = np.clip(index.astype(np.int64) - lut.first, 0, entries.size - 1)
    return entries[index]


# ---------------------------------------------------------------------------------------- 1. modality
@dataclass(frozen=True)
class ModalityTransform:
    """The Modality LUT Module of an instance: rescale or a LUT, or identity (PS3.3 C.11.1)."""

    slope: float = 1.0
    intercept: float = 0.0
    lut: LookupTable | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ModalityTransform:
        """Read Rescale Slope/Intercept (0028,1053)/(0028,1052) or the Modality LUT Sequence (0028,3000).

        The Modality LUT Sequence wins when both are present (PS3.3 C.11.1: they shall not both be).
        """
        if ds.get("ModalityLUTSequence"):
            signed = int(ds.get("PixelRepresentation", 0)) == 1
            return cls(lut=_lut_from_item(ds.ModalityLUTSequence[0], ds, signed_first=signed))
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is None or intercept is None:
            return cls()
        return cls(float(slope), float(intercept))

    @property
    def output_range_bits(self) -> int | None:
        """Bit depth of the output when a Modality LUT maps it, else None."""
        return self.lut.bits if self.lut else None


def apply_modality_lut(arr: np.ndarray, modality: ModalityTransform) -> np.ndarray:
    """Stored values → modality values (PS3.3 C.11.1; PS3.4 N.2.1.1).

    ``out = arr * slope + intercept`` in float32, or the Modality LUT: values below its first mapped
    value take entry 0, above its last the last entry (PS3.3 C.11.1.1.1).

    Parameters
    ----------
    arr : numpy.ndarray
        Stored values (after Bits Stored masking).
    modality : ModalityTransform
        From :meth:`ModalityTransform.from_dataset`.

    Returns
    -------
    numpy.ndarray
        float32 modality values (LUT output as float32 too).
    """
    if modality.lut is not None:
        return _lookup(arr, modality.lut).astype(np.float32)
    out = arr.astype(np.float32)
    if modality.slope != 1.0:
        out *= np.float32(modality.slope)
    if modality.intercept != 0.0:
        out += np.float32(modality.intercept)
    return out


# --------------------------------------------------------------------------------------------- 2. VOI
def windows_in_dataset(ds: Dataset) -> list[Window]:
    """The windows of Window Center/Width (0028,1050)/(0028,1051) with VOI LUT Function (0028,1056).

    Both are multi-valued (one pair per alternative view); a pair that is not a valid window is
    skipped with a log line.
    """
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return []
    centers, widths = _as_list(ds.WindowCenter), _as_list(ds.WindowWidth)
    try:
        function = VOIFunction.parse(str(ds.get("VOILUTFunction") or "LINEAR"))
    except ValueError:
        log.warning("render: unknown VOI LUT Function %r in %s, using LINEAR",
                    ds.get("VOILUTFunction"), ds.get("SOPInstanceUID", "?"))
        function = VOIFunction.LINEAR
    windows = []
    for center, width in zip(centers, widths):
        try:
            windows.append(Window(float(center), float(width), function))
        except (TypeError, ValueError) as exc:
            log.warning("render: ignoring window %s/%s of %s: %s", center, width, ds.get("SOPInstanceUID", "?"), exc)
    return windows


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def default_window(modality_values: np.ndarray) -> Window:
    """The window used when neither the request nor the instance gives one: min to max.

    ``center = (min + max + 1) / 2``, ``width = max - min + 1``, LINEAR: with PS3.3 C.11.2.1.2.1's
    ``c - 0.5``/``w - 1`` this maps the smallest modality value of the frame to 0 and the largest to
    255 exactly. Every value stays distinguishable (nothing clipped, which matters when the reader
    cannot ask for another window), it is what dcmtk's ``dcmj2pnm +Wm`` does (so it is checked against
    it), and it costs one min/max pass. A percentile window (e.g. 1–99 %) shows more contrast on
    images with a few extreme pixels, but hides those pixels and varies with the frame's content.
    """
    if modality_values.size == 0:
        return Window(0.5, 1.0)
    lo, hi = float(np.min(modality_values)), float(np.max(modality_values))
    return Window((lo + hi + 1.0) / 2.0, hi - lo + 1.0)


def apply_window(arr: np.ndarray, window: Window, levels: int = 256) -> np.ndarray:
    """Modality values → display levels ``0 .. levels - 1`` by a window (PS3.3 C.11.2.1.2, C.11.2.1.3).

    * LINEAR (C.11.2.1.2.1): with ``c' = c - 0.5`` and ``w' = w - 1``: ``x <= c' - w'/2`` → 0,
      ``x > c' + w'/2`` → max, else ``((x - c') / w' + 0.5) * max``.
    * LINEAR_EXACT (C.11.2.1.3.2): the same with ``c`` and ``w`` as given.
    * SIGMOID (C.11.2.1.3.1): ``max / (1 + exp(-4 (x - c) / w))``.

    Returns float32 levels (not rounded), so that a caller can compare them with pydicom's
    ``apply_windowing`` or round them to integers.
    """
    x = arr.astype(np.float32, copy=False)
    top = np.float32(levels - 1)
    if window.function is VOIFunction.SIGMOID:
        with np.errstate(over="ignore"):  # exp(large) = inf gives level 0, as it should
            exp = np.exp(np.float32(-4.0 / window.width) * (x - np.float32(window.center)))
        return (top / (np.float32(1.0) + exp)).astype(np.float32)
    if window.function is VOIFunction.LINEAR:
        center, width = window.center - 0.5, window.width - 1.0
    else:
        center, width = window.center, window.width
    low, high = center - width / 2.0, center + width / 2.0
    if width <= 0:  # LINEAR with width 1: a threshold at c'
        return np.where(x > np.float32(high), top, np.float32(0.0)).astype(np.float32)
    out = (x - np.float32(center)) * np.float32(1.0 / width) + np.float32(0.5)
    out *= top
    out[x <= np.float32(low)] = 0.0
    out[x > np.float32(high)] = top
    return np.clip(out, 0.0, top, out=out)


def voi_lut_in_dataset(ds: Dataset) -> LookupTable | None:
    """The first item of the VOI LUT Sequence (0028,3010), or None (PS3.3 C.11.2.1.1)."""
    if not ds.get("VOILUTSequence"):
        return None
    return _lut_from_item(ds.VOILUTSequence[0], ds)


def apply_voi_lut_sequence(arr: np.ndarray, lut: LookupTable, levels: int = 256) -> np.ndarray:
    """Modality values → display levels through a VOI LUT (PS3.3 C.11.2.1.1).

    Entries are ``0 .. 2**bits - 1`` (bits: third LUT Descriptor value, PS3.3 C.11.2.1.1) and are
    scaled by ``levels / 2**bits``, so that truncation keeps their high bits (what dcmtk shows).
    Returns float32.
    """
    entries = _lookup(arr, lut).astype(np.float32)
    return entries * np.float32(levels / (1 << lut.bits))


# ------------------------------------------------------------------------------------ 3. presentation
def invert_monochrome1(levels: np.ndarray, photometric: str, top: float = 255.0) -> np.ndarray:
    """MONOCHROME1: the minimum value is displayed white, so invert: ``top - levels`` (PS3.3 C.7.6.3.1.2).

    A Presentation LUT Shape of INVERSE in a MONOCHROME1 image names this same inversion (PS3.3
    C.11.6.1.2) and is not applied a second time. MONOCHROME2 levels are returned unchanged.
    """
    if photometric == "MONOCHROME1":
        return np.float32(top) - levels
    return levels


# ----------------------------------------------------------------------------- grey-scale, composed
@dataclass(frozen=True)
class GreyTransform:
    """Everything that maps a grey-scale stored value to a display level: hashable, so tables cache."""

    modality: ModalityTransform
    window: Window | None
    voi_lut: LookupTable | None
    monochrome1: bool

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """Steps 1–3 on ``arr``: modality → VOI → presentation; returns uint8 display levels."""
        values = apply_modality_lut(arr, self.modality)
        if self.window is not None:
            levels = apply_window(values, self.window)
        elif self.voi_lut is not None:
            levels = apply_voi_lut_sequence(values, self.voi_lut)
        else:
            levels = apply_window(values, default_window(values))
        levels = invert_monochrome1(levels, "MONOCHROME1" if self.monochrome1 else "MONOCHROME2")
        # Truncate to integer levels, as dcmtk does (the dcmj2pnm tests match it pixel for pixel).
        return np.floor(levels).astype(np.uint8)


def grey_transform(ds: Dataset, window: Window | None = None) -> GreyTransform:
    """The transform for ``ds``: ``window`` if given, else the instance's first window, else its VOI LUT.

    The instance's Window Center/Width is preferred over its VOI LUT Sequence when it has both
    (as dcmtk and most viewers do; PS3.3 C.11.2 lets the application choose). With neither,
    :func:`default_window` is computed per frame.
    """
    modality = ModalityTransform.from_dataset(ds)
    voi_lut = None
    if window is None:
        windows = windows_in_dataset(ds)
        window = windows[0] if windows else None
        if window is None:
            voi_lut = voi_lut_in_dataset(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    return GreyTransform(modality, window, voi_lut, photometric == "MONOCHROME1")


@lru_cache(maxsize=64)
def _display_table(transform: GreyTransform, dtype: str, lo: int, hi: int) -> np.ndarray:
    """The uint8 display level of the values ``lo .. hi`` of ``dtype`` (int8/uint8/int16/uint16).

    Indexed by the value's unsigned bit pattern (``-1`` → 65535 for int16), with all 2**bits entries
    so that any value of the type is a valid index; only those in ``lo .. hi`` (the frame's range)
    are computed, the others stay 0. A CT slice spans a few thousand of the 65,536 values: a new
    window costs a table of that size, not of the whole type.
    """
    kind, size = dtype[0], int(dtype[1:])
    table = np.zeros(1 << (8 * size), dtype=np.uint8)
    domain = np.arange(lo, hi + 1, dtype=f"{kind}{size}")
    table[domain.view(f"u{size}")] = transform.apply(domain)
    return table


def to_grey_levels(arr: np.ndarray, transform: GreyTransform) -> np.ndarray:
    """Steps 1–3 for a grey-scale frame, through a cached table for 8- and 16-bit integers.

    When no window applies (neither given nor in the instance), the default window is computed from
    this frame's modality values first, then folded into the table.
    """
    if transform.window is None and transform.voi_lut is None:
        transform = GreyTransform(transform.modality, _frame_default_window(arr, transform.modality),
                                  None, transform.monochrome1)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size:
        table = _display_table(transform, f"{arr.dtype.kind}{arr.dtype.itemsize}", int(arr.min()), int(arr.max()))
        # mode="clip" skips numpy's bounds check (a third of the time); every index is in the table anyway.
        return np.take(table, arr.view(f"u{arr.dtype.itemsize}"), mode="clip")
    return transform.apply(arr)


def _frame_default_window(arr: np.ndarray, modality: ModalityTransform) -> Window:
    if modality.lut is None and arr.size:
        lo, hi = arr.min(), arr.max()  # rescale is monotonic: map only the extremes
        return default_window(apply_modality_lut(np.array([lo, hi]), modality))
    return default_window(apply_modality_lut(arr, modality))


# --------------------------------------------------------------------------------------------- colour
def ybr_to_rgb(arr: np.ndarray, bits: int = 8) -> np.ndarray:
    """YBR_FULL (and YBR_FULL_422 once upsampled) → RGB (PS3.3 C.7.6.3.1.2, ITU-R BT.601 full range).

    ``R = Y + 1.402 (Cr - h)``, ``G = Y - 0.344136 (Cb - h) - 0.714136 (Cr - h)``,
    ``B = Y + 1.772 (Cb - h)`` with ``h = 2**(bits - 1)``; rounded and clipped to ``0 .. 2**bits - 1``.
    """
    ycc = arr.astype(np.float32)
    half = np.float32(1 << (bits - 1))
    y, cb, cr = ycc[..., 0], ycc[..., 1] - half, ycc[..., 2] - half
    rgb = np.empty_like(ycc)
    rgb[..., 0] = y + np.float32(1.402) * cr
    rgb[..., 1] = y - np.float32(0.344136) * cb - np.float32(0.714136) * cr
    rgb[..., 2] = y + np.float32(1.772) * cb
    np.rint(rgb, out=rgb)
    return np.clip(rgb, 0, (1 << bits) - 1).astype(arr.dtype)


def colour_to_8bit(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Colour samples of ``bits_stored`` bits → uint8 by dropping the low bits (8-bit data unchanged)."""
    if bits_stored <= 8:
        return arr.astype(np.uint8, copy=False)
    return (arr >> (bits_stored - 8)).astype(np.uint8)


def palette_tables(ds: Dataset) -> tuple[LookupTable, LookupTable, LookupTable]:
    """The Red, Green and Blue Palette Color Lookup Tables (PS3.3 C.7.6.3.1.5, C.7.9).

    Segmented palettes (C.7.9.2) are not supported and raise :class:`RenderError`.
    """
    if "SegmentedRedPaletteColorLookupTableData" in ds and "RedPaletteColorLookupTableData" not in ds:
        raise RenderError("segmented palette colour lookup tables are not supported")
    tables = []
    for colour in ("Red", "Green", "Blue"):
        tables.append(_lut_from_item(ds, ds, f"{colour}PaletteColorLookupTableData",
                                     f"{colour}PaletteColorLookupTableDescriptor"))
    return tables[0], tables[1], tables[2]


def apply_palette(arr: np.ndarray, palette: Sequence[LookupTable]) -> np.ndarray:
    """PALETTE COLOR stored values → 8-bit RGB (PS3.3 C.7.6.3.1.5).

    Each of the three tables maps a stored value (clipped to its first mapped value and last entry,
    C.7.6.3.1.5) to a 16- or 8-bit intensity (descriptor's third value); 16-bit intensities keep their
    high 8 bits, as for other colour data (:func:`colour_to_8bit`) and as dcmtk does.
    """
    rgb = np.empty(arr.shape + (3,), dtype=np.uint8)
    for channel, lut in enumerate(palette):
        table = colour_to_8bit(lut.entries, lut.bits)
        index = np.clip(arr.astype(np.int64) - lut.first, 0, table.size - 1)
        rgb[..., channel] = table[index]
    return rgb


def to_display(arr: np.ndarray, ds: Dataset, window: Window | None = None,
               photometric: str | None = None) -> np.ndarray:
    """Stored values of one frame → uint8 display values: (rows, cols) grey or (rows, cols, 3) RGB.

    Grey-scale: :func:`to_grey_levels` (modality LUT → VOI → MONOCHROME1 inversion), ``window``
    overriding the instance's. Colour: YBR_FULL/YBR_FULL_422 → RGB, PALETTE COLOR → RGB, more than 8
    bits → 8 (``window`` does not apply to colour, PS3.3 C.11.2).

    ``photometric`` is the colour space ``arr`` is in (see :class:`viewer.render.decode.Frame`),
    by default the dataset's Photometric Interpretation.
    """
    space = (photometric or str(ds.get("PhotometricInterpretation", "MONOCHROME2"))).strip().upper()
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    if space in GREY:
        transform = grey_transform(ds, window)
        if space != ("MONOCHROME1" if transform.monochrome1 else "MONOCHROME2"):
            transform = GreyTransform(transform.modality, transform.window, transform.voi_lut,
                                      space == "MONOCHROME1")
        return to_grey_levels(arr, transform)
    if space == "PALETTE COLOR":
        return apply_palette(arr, palette_tables(ds))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise RenderError(f"{space} pixel data should have 3 samples per pixel, has shape {arr.shape}")
    if space in ("YBR_FULL", "YBR_FULL_422"):
        arr = ybr_to_rgb(arr, bits=bits_stored)
    elif space != "RGB":
        log.warning("render: unsupported photometric interpretation %s in %s", space, ds.get("SOPInstanceUID", "?"))
        raise RenderError(f"photometric interpretation {space} is not supported")
    return colour_to_8bit(arr, bits_stored)

