"""viewer.render, step by step, against pydicom's own pixel processing (pydicom.pixels)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut as pd_modality, apply_voi, apply_windowing
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless

from helpers import CT_RAW_DIR, FMRI_DIR, TS_DIR, dicom_files
from tests.viewer.render_data import new_image, ramp, save
from viewer.render import (ImageFormat, RenderError, Viewport, VOIFunction, Window, decode_frame, detach_for_cache,
                           encode, mask_bits_stored, parse_viewport, parse_window, render_frame, resize, to_display)
from viewer.render.output import crop_source, fit_size
from viewer.render.transforms import (GreyTransform, ModalityTransform, apply_modality_lut, apply_palette,
                                      apply_voi_lut_sequence, apply_window, default_window, grey_transform,
                                      invert_monochrome1, palette_tables, to_grey_levels, voi_lut_in_dataset,
                                      ybr_to_rgb)

CT = sorted(CT_RAW_DIR.glob("*.ct"))


# ------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("text, expected", [
    ("40,400", Window(40, 400, VOIFunction.LINEAR)),
    ("-600, 1500", Window(-600, 1500, VOIFunction.LINEAR)),
    ("40,400,linear-exact", Window(40, 400, VOIFunction.LINEAR_EXACT)),
    ("40.5,0.5,SIGMOID", Window(40.5, 0.5, VOIFunction.SIGMOID)),
    ("1,1,LINEAR", Window(1, 1, VOIFunction.LINEAR)),
])
def test_parse_window(text, expected):
    assert parse_window(text) == expected


@pytest.mark.parametrize("text, message", [
    ("40", "center,width"), ("40,400,linear,x", "center,width"), ("a,400", "numbers"),
    ("40,400,cubic", "unknown VOI LUT function"), ("40,0.5", ">= 1 for LINEAR"), ("40,0,sigmoid", "> 0"),
    ("nan,400", "finite"), ("", "center,width"),
])
def test_parse_window_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        parse_window(text)


def test_parse_viewport():
    assert parse_viewport("256,128") == Viewport(256, 128)
    assert parse_viewport("256,256,10,20,100,-50") == Viewport(256, 256, 10, 20, 100, -50)
    assert parse_viewport("256,256,,,,") == Viewport(256, 256)
    for bad, message in [("256", "vw,vh"), ("0,10", "positive"), ("a,b", "integers"), ("10,10,1,1,0,5", "not be 0"),
                         ("10,10,-1,0,5,5", "not be negative"), (",10", "required")]:
        with pytest.raises(ValueError, match=message):
            parse_viewport(bad)


# ------------------------------------------------------------------------------------------------ decode
def test_every_transfer_syntax_decodes_to_the_same_pixels():
    """The 9 files hold the same pixels in 9 transfer syntaxes (testdata README)."""
    files = sorted(TS_DIR.glob("*.dcm"))
    _, reference = decode_frame(files[0])
    assert reference.pixels.shape == (384, 384) and reference.pixels.dtype == np.uint16
    np.testing.assert_array_equal(reference.pixels, pydicom.dcmread(files[0]).pixel_array)
    for path in files[1:]:
        ds, frame = decode_frame(path)
        assert frame.pixels.dtype.isnative
        np.testing.assert_array_equal(frame.pixels, reference.pixels, err_msg=f"{path.name}: {ds.file_meta.TransferSyntaxUID.name}")


def test_raw_dataset_without_file_meta_decodes():
    ds, frame = decode_frame(CT[0])
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"  # Implicit VR Little Endian, as read
    assert frame.pixels.shape == (512, 512) and frame.pixels.dtype == np.int16
    raw = pydicom.dcmread(CT[0], force=True)
    expected = np.frombuffer(raw.PixelData, dtype="<i2").reshape(512, 512)
    np.testing.assert_array_equal(frame.pixels, expected)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_masking(signed):
    """12 bits stored in 16: the 4 high bits hold garbage (e.g. an overlay) and must be ignored."""
    rng = np.random.default_rng(1)
    if signed:
        values = rng.integers(-2048, 2048, size=(32, 32)).astype(np.int16)
    else:
        values = rng.integers(0, 4096, size=(32, 32)).astype(np.uint16)
    garbage = (rng.integers(0, 16, size=values.shape) << 12).astype(np.uint16)
    stored = ((values.view(np.uint16) & 0x0FFF) | garbage).view(values.dtype)
    np.testing.assert_array_equal(mask_bits_stored(stored.copy(), 12, signed), values)
    ds = new_image(stored, bits_stored=12)
    _, frame = decode_frame(ds)
    np.testing.assert_array_equal(frame.pixels, values)
    np.testing.assert_array_equal(frame.pixels, pixel_array(ds))  # pydicom corrects unused bits the same way


def test_bits_stored_equal_to_allocated_is_untouched():
    arr = np.array([[-32768, 32767]], dtype=np.int16)
    assert mask_bits_stored(arr, 16, True) is arr


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_one_frame_of_a_multiframe(tmp_path, syntax):
    frames = np.stack([ramp((40, 48), 0, 4095, "uint16") + 100 * i for i in range(5)]).astype(np.uint16)
    ds = new_image(frames, bits_stored=13, frames=5)
    if syntax is not None:
        ds.compress(syntax)
    path = save(ds, tmp_path / "multi.dcm")
    for index in (0, 3, 4):
        _, frame = decode_frame(path, index)
        np.testing.assert_array_equal(frame.pixels, frames[index])
    with pytest.raises(RenderError, match="frame 6 does not exist: the instance has 5"):
        decode_frame(path, 5)


def test_a_frame_detached_for_the_cache_holds_only_itself(tmp_path):
    """A cached frame must not keep the instance's whole Pixel Data (every frame of a multi-frame) alive."""
    frames = np.stack([ramp((64, 64), 0, 4095, "uint16") + i for i in range(8)]).astype(np.uint16)
    ds, frame = decode_frame(save(new_image(frames, bits_stored=12, frames=8), tmp_path / "multi.dcm"), 3)
    kept_ds, kept = detach_for_cache(ds, frame)
    assert kept.pixels.flags.owndata and kept.pixels.base is None
    assert kept.pixels.nbytes == 64 * 64 * 2
    assert "PixelData" not in kept_ds
    np.testing.assert_array_equal(kept.pixels, frames[3] & 0x0FFF)
    # the later steps still render it from what was kept
    assert encode(resize(to_display(kept.pixels, kept_ds, None, kept.photometric), None), ImageFormat.PNG)
    # a single frame's pixels are kept as they are (a view of exactly that frame), not copied again
    one_ds, one = decode_frame(save(new_image(frames[0]), tmp_path / "one.dcm"), 0)
    _, kept_one = detach_for_cache(one_ds, one)
    assert kept_one.pixels is one.pixels and kept_one.pixels.nbytes == 64 * 64 * 2


@pytest.mark.parametrize("dtype,bits_stored", [("uint8", 8), ("int8", 8), ("uint16", 12), ("int16", 12),
                                               ("int16", 16), ("uint16", 16)])
@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_native_frames_are_read_straight_from_pixel_data_as_pydicom_decodes_them(tmp_path, dtype, bits_stored, syntax):
    from pydicom.uid import ImplicitVRLittleEndian

    from viewer.render.decode import native_frame

    info = np.iinfo(dtype)
    frames = np.stack([ramp((24, 40), max(info.min, -2000), min(info.max, 3000), dtype) + i for i in range(3)])
    ds = new_image(frames.astype(dtype), bits_stored=bits_stored, frames=3)
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = save(ds, tmp_path / "native.dcm")
    for index in range(3):
        read = pydicom.dcmread(path)
        assert native_frame(read, index) is not None  # the fast path is the one taken
        _, frame = decode_frame(read, index)
        expected = pixel_array(path, index=index)
        assert frame.pixels.dtype == expected.dtype
        np.testing.assert_array_equal(frame.pixels, expected)


def test_native_fast_path_leaves_other_pixel_data_to_pydicom(tmp_path):
    from pydicom.uid import ExplicitVRBigEndian

    from viewer.render.decode import native_frame

    grey = new_image(ramp((16, 16), 0, 4095, "uint16"), bits_stored=12)
    rle = new_image(ramp((16, 16), 0, 4095, "uint16"), bits_stored=12)
    rle.compress(RLELossless)
    colour = new_image(np.zeros((16, 16, 3), dtype=np.uint8), photometric="RGB")
    big = new_image(ramp((16, 16), 0, 4095, "uint16"), bits_stored=12)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    short = new_image(ramp((16, 16), 0, 4095, "uint16"), bits_stored=12)
    short.PixelData = short.PixelData[:100]
    assert native_frame(grey, 0) is not None
    assert all(native_frame(ds, 0) is None for ds in (rle, colour, big, short))
    assert native_frame(grey, 1) is None  # past the end: pydicom's decoder reports it


def test_one_frame_is_decoded_not_all(monkeypatch):
    """decode_frame asks the decoder for one index, never for the whole pixel data."""
    from pydicom.pixels.decoders.base import Decoder

    frames = np.stack([ramp((16, 16), 0, 255, "uint8")] * 4)
    ds = new_image(frames, frames=4)
    ds.compress(RLELossless)
    seen = []
    original = Decoder.as_array

    def spy(self, src, *, index=None, **kwargs):
        seen.append(index)
        return original(self, src, index=index, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", spy)
    decode_frame(ds, 2)
    assert seen == [2]


def test_lossy_jpeg2000_decodes_like_pydicom(tmp_path):
    pixels = ramp((64, 64), 0, 4095, "uint16")
    ds = new_image(pixels, bits_stored=12)
    ds.compress(JPEG2000, j2k_cr=[10])
    path = save(ds, tmp_path / "j2k.dcm")
    _, frame = decode_frame(path)
    reference = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(frame.pixels, reference)
    assert 0 < np.abs(frame.pixels.astype(int) - pixels).max() < 400  # lossy, but close


@pytest.mark.parametrize("content, message", [(b"not dicom at all" * 10, "no Pixel Data|not a readable")])
def test_bad_input_is_a_render_error(content, message, caplog):
    with pytest.raises(RenderError, match=message):
        render_frame(content)
    assert any("render:" in r.getMessage() for r in caplog.records)


def test_dataset_without_pixels_is_a_render_error(caplog):
    ds = new_image(np.zeros((4, 4), np.uint8))
    del ds.PixelData
    with pytest.raises(RenderError, match="no Pixel Data"):
        render_frame(ds)
    assert any("has no pixel data" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------------- modality
def test_modality_rescale_matches_pydicom_on_ct():
    ds, frame = decode_frame(CT[0])
    ours = apply_modality_lut(frame.pixels, ModalityTransform.from_dataset(ds))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, pd_modality(frame.pixels, ds), rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype, bits, slope, intercept", [
    ("uint16", 12, 1.0, -1024.0), ("int16", 12, 0.5, 10.25), ("uint8", 8, 2.0, -100.0), ("int16", 16, 1.0, 0.0),
    ("uint16", 16, 0.001, -5.0),
])
def test_modality_rescale_matches_pydicom_synthetic(dtype, bits, slope, intercept):
    info = np.iinfo(dtype)
    lo = max(info.min, -(1 << (bits - 1))) if info.min < 0 else 0
    hi = min(info.max, (1 << (bits - 1)) - 1 if info.min < 0 else (1 << bits) - 1)
    ds = new_image(ramp((64, 64), lo, hi, dtype), bits_stored=bits, RescaleSlope=slope, RescaleIntercept=intercept)
    _, frame = decode_frame(ds)
    ours = apply_modality_lut(frame.pixels, ModalityTransform.from_dataset(ds))
    np.testing.assert_allclose(ours, pd_modality(frame.pixels, ds), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("as_ow", [False, True])
def test_modality_lut_sequence_matches_pydicom(as_ow):
    pixels = ramp((32, 32), 0, 1023, "uint16")
    ds = new_image(pixels, bits_stored=10)
    item = Dataset()
    table = (np.arange(600) * 7 + 300).astype(np.uint16)  # first mapped 100; values above 699 take the last entry
    item.LUTDescriptor = [600, 100, 16]
    item.ModalityLUTType = "HU"
    if as_ow:
        item.LUTData = table.astype("<u2").tobytes()
        item["LUTData"].VR = "OW"
    else:
        item.LUTData = table.tolist()
        item["LUTData"].VR = "US"
    ds.ModalityLUTSequence = [item]
    ours = apply_modality_lut(pixels, ModalityTransform.from_dataset(ds))
    np.testing.assert_array_equal(ours, pd_modality(pixels, ds).astype(np.float32))
    assert ours[pixels < 100].min() == 300 and ours[pixels > 699].max() == 599 * 7 + 300


# ------------------------------------------------------------------------------------------------- VOI
def _pydicom_levels(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's windowing output rescaled from its output range (Bits Stored after rescale) to 0..255."""
    out = apply_windowing(arr.copy(), ds)
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    y_min, y_max = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return (out - y_min) / (y_max - y_min) * 255.0


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("center, width", [(40, 400), (-600, 1500), (0.5, 1), (1000, 2.5)])
def test_window_matches_pydicom_on_ct(function, center, width):
    if function == "LINEAR" and width < 1:
        pytest.skip("not a LINEAR window")
    ds, frame = decode_frame(CT[3])
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    values = apply_modality_lut(frame.pixels, ModalityTransform.from_dataset(ds))
    ours = apply_window(values, Window(center, width, VOIFunction(function)))
    np.testing.assert_allclose(ours, _pydicom_levels(values.astype(np.float64), ds), rtol=0, atol=2e-3)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("dtype, bits", [("uint8", 8), ("uint16", 12), ("int16", 12), ("int16", 16), ("uint16", 16)])
def test_window_matches_pydicom_synthetic(function, dtype, bits):
    signed = dtype.startswith("int")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    pixels = ramp((64, 64), lo, hi, dtype)
    center, width = (lo + hi) / 3, (hi - lo) / 4
    ds = new_image(pixels, bits_stored=bits, WindowCenter=center, WindowWidth=width, VOILUTFunction=function,
                   RescaleSlope=1, RescaleIntercept=0)
    values = apply_modality_lut(pixels, ModalityTransform.from_dataset(ds))
    ours = apply_window(values, grey_transform(ds).window)  # type: ignore[arg-type]
    np.testing.assert_allclose(ours, _pydicom_levels(values.astype(np.float64), ds), rtol=0, atol=2e-3)


def test_voi_lut_sequence_matches_pydicom():
    pixels = ramp((64, 64), 0, 4095, "uint16")
    ds = new_image(pixels, bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [2048, 1000, 12]
    item.LUTData = (np.sqrt(np.arange(2048) / 2047) * 4095).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    lut = voi_lut_in_dataset(ds)
    assert lut is not None
    ours = apply_voi_lut_sequence(pixels, lut)
    np.testing.assert_allclose(ours, apply_voi(pixels, ds) * (256 / 4096), rtol=0, atol=1e-3)
    assert grey_transform(ds).voi_lut == lut and grey_transform(ds).window is None


def test_window_in_the_file_is_preferred_to_its_voi_lut_and_the_request_to_both():
    ds = new_image(ramp((8, 8), 0, 255, "uint8"), WindowCenter=[100, 50], WindowWidth=[80, 20])
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [256, 0, 8], list(range(256))
    ds.VOILUTSequence = [item]
    assert grey_transform(ds).window == Window(100, 80)
    assert grey_transform(ds, Window(5, 10)).window == Window(5, 10)


def test_default_window_is_min_max():
    """No window anywhere: the frame's smallest modality value maps to 0, the largest to 255."""
    pixels = ramp((64, 64), 200, 3000, "uint16")
    ds = new_image(pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000)
    window = default_window(apply_modality_lut(pixels, ModalityTransform.from_dataset(ds)))
    lo, hi = int(pixels.min()) * 2 - 1000, int(pixels.max()) * 2 - 1000
    assert window == Window((lo + hi + 1) / 2, hi - lo + 1)
    shown = to_display(pixels, ds)
    assert shown[pixels == pixels.min()].max() == 0 and shown[pixels == pixels.max()].min() == 255
    order = np.argsort(pixels, axis=None, kind="stable")
    assert np.all(np.diff(shown.ravel()[order].astype(int)) >= 0)  # monotonic: brighter never shown darker


# ---------------------------------------------------------------------------------------- presentation
def test_monochrome1_inverts():
    pixels = ramp((32, 32), 0, 4095, "uint16")
    pixels[0, 0] = 0
    mono2 = new_image(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    mono1 = new_image(pixels, "MONOCHROME1", bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    levels = apply_window(pixels, Window(2048, 4096))
    np.testing.assert_array_equal(invert_monochrome1(levels, "MONOCHROME1"), 255 - levels)
    np.testing.assert_array_equal(invert_monochrome1(levels, "MONOCHROME2"), levels)
    darkest = pixels == 0
    assert to_display(pixels, mono1)[darkest].min() == 255 and to_display(pixels, mono2)[darkest].max() == 0
    np.testing.assert_array_equal(to_display(pixels, mono1), np.floor(255 - levels).astype(np.uint8))


@pytest.mark.parametrize("dtype, bits", [("uint8", 8), ("int8", 8), ("uint16", 12), ("int16", 12), ("int16", 16),
                                         ("uint16", 16)])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_table_path_equals_direct_computation(dtype, bits, photometric):
    """The cached 8/16-bit table gives exactly what the steps compute pixel by pixel."""
    info = np.iinfo(dtype)
    pixels = np.arange(info.min, info.max + 1, dtype=dtype)  # every value once
    ds = new_image(pixels.reshape(-1, 256), photometric, bits_stored=bits, RescaleSlope=1.5, RescaleIntercept=-20,
                   WindowCenter=30, WindowWidth=100)
    transform = grey_transform(ds)
    np.testing.assert_array_equal(to_grey_levels(pixels, transform), transform.apply(pixels))
    sigmoid = GreyTransform(transform.modality, Window(30, 100, VOIFunction.SIGMOID), None, transform.monochrome1)
    np.testing.assert_array_equal(to_grey_levels(pixels, sigmoid), sigmoid.apply(pixels))


def test_tables_of_frames_with_different_value_ranges_are_not_shared():
    """Tables are built over each frame's value range: a later frame with other values (same window)
    gets its own table, not the entries the first frame left at 0."""
    rng = np.random.default_rng(4)
    first = rng.integers(-1500, 1426, size=(64, 64), dtype=np.int16)
    second = rng.integers(-3000, 3000, size=(64, 64), dtype=np.int16)
    ds = new_image(first, "MONOCHROME2", bits_stored=16, RescaleSlope=1, RescaleIntercept=0,
                   WindowCenter=40, WindowWidth=400)
    transform = grey_transform(ds)
    for pixels in (first, second, first[:8, :8]):
        np.testing.assert_array_equal(to_grey_levels(pixels, transform), transform.apply(pixels))


# ---------------------------------------------------------------------------------------------- colour
def test_ybr_full_to_rgb_matches_pydicom():
    rgb = np.random.default_rng(3).integers(0, 256, size=(48, 64, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ours = ybr_to_rgb(ybr)
    assert ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - convert_color_space(ybr, "YBR_FULL", "RGB").astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - rgb.astype(int)).max() <= 2  # round trip through 8-bit YCbCr


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_and_ybr_full_datasets(planar):
    rgb = np.random.default_rng(4).integers(0, 256, size=(2, 24, 32, 3)).astype(np.uint8)
    ds = new_image(rgb, "RGB", frames=2, planar=planar)
    ds, frame = decode_frame(ds, 1)
    np.testing.assert_array_equal(to_display(frame.pixels, ds, photometric=frame.photometric), rgb[1])
    ybr = new_image(np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in rgb]), "YBR_FULL", frames=2, planar=planar)
    ybr, frame = decode_frame(ybr, 1)
    assert frame.photometric == "YBR_FULL"
    shown = to_display(frame.pixels, ybr, photometric=frame.photometric)
    assert np.abs(shown.astype(int) - rgb[1].astype(int)).max() <= 2


def test_ybr_full_422_native_is_upsampled_and_converted():
    """Native YBR_FULL_422: pairs of pixels share Cb/Cr (PS3.3 C.7.6.3.1.2); pydicom expands, we convert."""
    ybr = convert_color_space(np.random.default_rng(5).integers(0, 256, size=(8, 16, 3)).astype(np.uint8),
                              "RGB", "YBR_FULL")
    ybr[:, 1::2, 1:] = ybr[:, 0::2, 1:]  # a chroma shared by each pair
    packed = np.concatenate([ybr[:, 0::2, 0:1], ybr[:, 1::2, 0:1], ybr[:, 0::2, 1:]], axis=-1)  # Y1 Y2 Cb Cr
    ds = new_image(ybr, "YBR_FULL_422")
    ds.PixelData = packed.tobytes()
    ds, frame = decode_frame(ds)
    np.testing.assert_array_equal(frame.pixels, ybr)
    np.testing.assert_array_equal(to_display(frame.pixels, ds, photometric=frame.photometric), ybr_to_rgb(ybr))


@pytest.mark.parametrize("photometric", ["RGB", "YBR_RCT"])
def test_jpeg2000_colour(photometric):
    """Lossless JPEG 2000 colour; with YBR_RCT the decoder undoes the component transform (RGB out)."""
    from tests.viewer.render_data import colour_picture

    rgb = colour_picture()
    ds = new_image(rgb, "RGB")
    ds.compress(JPEG2000Lossless, use_mct=photometric == "YBR_RCT")
    ds.PhotometricInterpretation = photometric
    ds, frame = decode_frame(ds)
    np.testing.assert_array_equal(to_display(frame.pixels, ds, photometric=frame.photometric), rgb)


def test_sixteen_bit_rgb_is_scaled_to_eight():
    rgb = np.random.default_rng(6).integers(0, 4096, size=(8, 8, 3)).astype(np.uint16)
    ds = new_image(rgb, "RGB", bits_stored=12)
    np.testing.assert_array_equal(to_display(rgb, ds), (rgb >> 4).astype(np.uint8))


def _palette_dataset(pixels: np.ndarray, bits: int, first: int = 0) -> Dataset:
    ds = new_image(pixels, "PALETTE COLOR", bits_stored=bits)
    n = 1 << bits
    ramp_up = (np.arange(n) * 65535 // (n - 1)).astype(np.uint16)
    for colour, table in (("Red", ramp_up), ("Green", ramp_up[::-1]), ("Blue", (ramp_up // 3).astype(np.uint16))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [n % 65536, first, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    return ds


@pytest.mark.parametrize("dtype, bits", [("uint8", 8), ("uint16", 16)])
def test_palette_matches_pydicom(dtype, bits):
    pixels = ramp((32, 64), 0, (1 << bits) - 1, dtype)
    ds = _palette_dataset(pixels, bits)
    ours = apply_palette(pixels, palette_tables(ds))
    reference = apply_color_lut(pixels, ds).astype(np.float64) * 255 / 65535
    assert ours.dtype == np.uint8 and ours.shape == pixels.shape + (3,)
    assert np.abs(ours - reference).max() < 1  # the high 8 bits of each 16-bit intensity


def test_segmented_palette_is_refused():
    ds = new_image(np.zeros((4, 4), np.uint8), "PALETTE COLOR")
    ds.RedPaletteColorLookupTableDescriptor = [256, 0, 16]
    ds.SegmentedRedPaletteColorLookupTableData = b"\0\0"
    with pytest.raises(RenderError, match="segmented"):
        to_display(np.zeros((4, 4), np.uint8), ds)


# ----------------------------------------------------------------------------------- resize and encode
def test_fit_size_keeps_the_aspect_ratio():
    assert fit_size(512, 512, 256, 128) == (128, 128)
    assert fit_size(384, 256, 96, 96) == (96, 64)
    assert fit_size(100, 50, 400, 400) == (400, 200)
    assert fit_size(5000, 1, 10, 10) == (10, 1)


def test_viewport_source_region_and_flip():
    arr = np.arange(100, dtype=np.uint8).reshape(10, 10)
    np.testing.assert_array_equal(crop_source(arr, Viewport(5, 5, 2, 3, 4, 2)), arr[3:5, 2:6])
    np.testing.assert_array_equal(crop_source(arr, Viewport(5, 5, 6, 0, -4, None)), arr[:, 5:1:-1])
    with pytest.raises(RenderError, match="outside"):
        crop_source(arr, Viewport(5, 5, 10, 0))


@pytest.mark.parametrize("fmt, mode", [("jpeg", "L"), ("png", "L"), ("webp", "RGB"), ("image/png", "L")])
def test_render_formats_and_viewport(fmt, mode):
    data = render_frame(TS_DIR / "1.dcm", window="763,1639", viewport="100,60", fmt=fmt, quality=80)
    image = Image.open(io.BytesIO(data))
    assert image.format == ImageFormat.parse(fmt).name
    assert image.size == (60, 60) and image.mode == mode  # 384x384 fitted into 100x60; WebP decodes as RGB


def test_png_without_viewport_is_the_display_array():
    ds, frame = decode_frame(FMRI_DIR / dicom_files(FMRI_DIR)[0].name)
    shown = to_display(frame.pixels, ds)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode(resize(shown, None), "png")))), shown)


@pytest.mark.parametrize("size, tolerance", [(64, 1), (128, 1), (77, 5), (200, 5)])
def test_downscale_is_smooth(size, tolerance):
    """A checkerboard (the finest pattern there is) scaled down becomes near uniform grey: no aliasing.

    Whole factors average areas (127.5 everywhere); other factors go through Lanczos, whose ringing
    leaves a few levels (nearest-neighbour sampling would leave 0/255 patterns).
    """
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = np.asarray(resize(board, Viewport(size, size)))
    assert small.shape == (size, size) and np.abs(small.astype(int)[3:-3, 3:-3] - 128).max() <= tolerance


@pytest.mark.parametrize("kwargs, message", [({"fmt": "gif"}, "unsupported image format"),
                                             ({"quality": 0}, "quality"), ({"window": "1"}, "center,width"),
                                             ({"viewport": "0,0"}, "positive")])
def test_render_frame_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_frame(TS_DIR / "1.dcm", **kwargs)


def test_ct_window_renders_bone_white_and_air_black():
    data = render_frame(CT[0], window="40,400", fmt="png")
    shown = np.asarray(Image.open(io.BytesIO(data)))
    _, frame = decode_frame(CT[0])
    assert shown[frame.pixels <= -160].max() == 0 and shown[frame.pixels > 240].min() == 255


def test_path_bytes_and_dataset_render_alike(tmp_path: Path):
    path = TS_DIR / "4.dcm"
    assert render_frame(path, fmt="png") == render_frame(path.read_bytes(), fmt="png") == \
        render_frame(pydicom.dcmread(path), fmt="png")
