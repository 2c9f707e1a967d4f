"""The whole rendering pipeline against dcmtk's dcmj2pnm (Debian dcmtk), pixel by pixel.

Our PNG (``render_frame(..., fmt="png")``, no viewport) and dcmj2pnm's PNG (``+on``) of the same
instance, frame and window are decoded and compared. Tolerances:

* grey-scale: at most 1 grey level anywhere and at least 99.9 % of pixels identical. We truncate
  window output to integer levels as dcmtk does, so the renderings agree exactly but for values that
  fall on a level boundary, where our float32 and dcmtk's double arithmetic may round the other way.
* YBR_FULL (native): at most 2 levels. dcmtk converts with integer tables that truncate each of the
  three terms of the conversion; ours rounds once (and agrees with pydicom within 1, see
  test_render.py).
* lossy 12-bit JPEG: at most 1 level, at least 97 % identical: two different 12-bit IJG decoders
  (dcmtk's own, pylibjpeg-libjpeg) round their inverse DCTs differently.
* everything else (RGB, 8-bit JPEG with 4:2:2 chroma, palette colour, Modality and VOI LUTs, masked
  signed data, multi-frame): identical.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space

from helpers import CT_RAW_DIR, FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files
from tests.viewer.render_data import colour_picture, dcmj2pnm, dcmtk, new_image, ramp, read, save
from viewer.render import render_frame

CT = sorted(CT_RAW_DIR.glob("*.ct"))


def ours(path: Path, **kwargs: object) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render_frame(path, fmt="png", **kwargs))))  # type: ignore[arg-type]


def assert_close(mine: np.ndarray, reference: np.ndarray, max_diff: int = 1, identical: float = 0.999) -> None:
    assert mine.shape == reference.shape and mine.dtype == reference.dtype == np.uint8
    diff = np.abs(mine.astype(int) - reference.astype(int))
    same = float((diff == 0).mean())
    assert diff.max() <= max_diff and same >= identical, f"max diff {diff.max()}, {same:.4%} identical"


def assert_window_used(image: np.ndarray) -> None:
    """Guard against comparing two blank images: the rendering uses a good part of the grey range."""
    assert len(np.unique(image)) > 32


# ---------------------------------------------------------------------------- every transfer syntax
@pytest.mark.parametrize("name", ["1.dcm", "2.dcm", "3.dcm", "4.dcm", "5.dcm", "6.dcm"])
def test_transfer_syntaxes_dcmtk_reads(tmp_path, name):
    """Explicit LE, Implicit LE, Explicit BE, RLE, JPEG Lossless SV1 (x2): the file's window (+Wi 1)."""
    reference = dcmj2pnm(TS_DIR / name, tmp_path / "ref.png", "+Wi", "1")
    assert_window_used(reference)
    assert_close(ours(TS_DIR / name), reference, max_diff=0, identical=1.0)


@pytest.mark.parametrize("name", ["7.dcm", "8.dcm"])
def test_jpeg_ls_against_dcmtks_own_decoder(tmp_path, name):
    """dcmj2pnm does not read JPEG-LS; dcmtk's dcmdjpls decodes it, then dcmj2pnm renders."""
    dcmtk("dcmdjpls", TS_DIR / name, tmp_path / "native.dcm")
    assert_close(ours(TS_DIR / name), dcmj2pnm(tmp_path / "native.dcm", tmp_path / "ref.png", "+Wi", "1"),
                 max_diff=0, identical=1.0)


def test_jpeg2000_against_the_same_pixels_in_explicit_le(tmp_path):
    """Debian's dcmtk has no JPEG 2000 codec: 9.dcm holds the pixels of 1.dcm (see test_render.py)."""
    assert_close(ours(TS_DIR / "9.dcm"), dcmj2pnm(TS_DIR / "1.dcm", tmp_path / "ref.png", "+Wi", "1"),
                 max_diff=0, identical=1.0)


@pytest.mark.parametrize("window, options", [("700,1500,sigmoid", ("+Ww", "700", "1500", "+Wfs")),
                                             ("300,200", ("+Ww", "300", "200")),
                                             ("4000,1", ("+Ww", "4000", "1"))])
def test_requested_window_on_mr(tmp_path, window, options):
    assert_close(ours(TS_DIR / "3.dcm", window=window), dcmj2pnm(TS_DIR / "3.dcm", tmp_path / "ref.png", *options))


# ------------------------------------------------------------------------------------------------ CT
@pytest.mark.parametrize("path", [CT[0], CT[5]], ids=["slice1", "slice6"])
@pytest.mark.parametrize("window, options", [(None, ("+Wi", "1")), ("40,400", ("+Ww", "40", "400")),
                                             ("40,400,SIGMOID", ("+Ww", "40", "400", "+Wfs")),
                                             ("-600,1500", ("+Ww", "-600", "1500"))])
def test_ct(tmp_path, path, window, options):
    """The raw CT datasets (no file meta, signed 16-bit), the file's window and chosen ones."""
    reference = dcmj2pnm(path, tmp_path / "ref.png", "-f", *options)
    assert_window_used(reference)
    assert_close(ours(path, window=window), reference)


def test_ct_without_a_window_gets_min_max(tmp_path):
    ds = read(CT[2])
    del ds.WindowCenter, ds.WindowWidth
    path = tmp_path / "nowindow.dcm"
    ds.save_as(path)
    reference = dcmj2pnm(path, tmp_path / "ref.png", "+Wm")
    assert_window_used(reference)
    assert_close(ours(path), reference)


# ------------------------------------------------------------------------------------------------ MR
@pytest.mark.parametrize("path", [dicom_files(MR_STUDY_DIR / "3D_Ax_T1_MP_RAGE_R22")[60],
                                  dicom_files(MR_STUDY_DIR / "Ax_DWI_TENSOR_R2")[3],
                                  dicom_files(FMRI_DIR)[7]], ids=["mprage", "dwi", "fmri"])
def test_mr(tmp_path, path):
    option = ("+Wi", "1") if "WindowCenter" in read(path) else ("+Wm",)
    reference = dcmj2pnm(path, tmp_path / "ref.png", *option)
    assert_window_used(reference)
    assert_close(ours(path), reference)
    assert_close(ours(path, window="500,1000"), dcmj2pnm(path, tmp_path / "ref2.png", "+Ww", "500", "1000"))


def test_monochrome1(tmp_path):
    ds = read(TS_DIR / "1.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = save(ds, tmp_path / "mono1.dcm")
    for window, options in [(None, ("+Wi", "1")), ("700,1500,sigmoid", ("+Ww", "700", "1500", "+Wfs"))]:
        reference = dcmj2pnm(path, tmp_path / "ref.png", *options)
        assert_close(ours(path, window=window), reference)
    inverted = ours(path)
    assert_close(255 - inverted, ours(TS_DIR / "1.dcm"), max_diff=1, identical=0.0)  # the same picture, inverted


# ----------------------------------------------------------------------------------------- synthetic
def test_modality_lut_sequence(tmp_path):
    ds = new_image(ramp((64, 64), 0, 4095, "uint16"), bits_stored=12, WindowCenter=8000, WindowWidth=12000)
    item = Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [3000, 500, 16], "US"
    item.LUTData = (np.arange(3000) * 7 + 300).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.ModalityLUTSequence = [item]
    path = save(ds, tmp_path / "mlut.dcm")
    assert_close(ours(path), dcmj2pnm(path, tmp_path / "ref.png", "+Wi", "1"), max_diff=0, identical=1.0)


def test_voi_lut_sequence(tmp_path):
    ds = new_image(ramp((64, 64), 0, 4095, "uint16"), bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [2048, 1000, 12]
    item.LUTData = (np.sqrt(np.arange(2048) / 2047) * 4095).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    path = save(ds, tmp_path / "voilut.dcm")
    assert_close(ours(path), dcmj2pnm(path, tmp_path / "ref.png", "+Wl", "1"), max_diff=0, identical=1.0)


@pytest.mark.parametrize("dtype", ["int16", "uint16"])
def test_bits_stored_masking(tmp_path, dtype):
    """12 of 16 bits, the 4 high bits random: dcmtk and we both ignore them (and sign-extend int16)."""
    rng = np.random.default_rng(11)
    lo, hi = (-2048, 2048) if dtype == "int16" else (0, 4096)
    values = rng.integers(lo, hi, size=(64, 64)).astype(dtype)
    garbage = (rng.integers(0, 16, size=values.shape) << 12).astype(np.uint16)
    stored = ((values.view(np.uint16) & 0x0FFF) | garbage).view(dtype)
    ds = new_image(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-100, WindowCenter=0, WindowWidth=3000)
    path = save(ds, tmp_path / "masked.dcm")
    assert_close(ours(path), dcmj2pnm(path, tmp_path / "ref.png", "+Wi", "1"), max_diff=0, identical=1.0)
    assert_close(ours(path, window=None), dcmj2pnm(path, tmp_path / "ref2.png", "+Wi", "1"), max_diff=0, identical=1.0)


@pytest.mark.parametrize("rle", [False, True])
def test_multiframe(tmp_path, rle):
    frames = np.stack([ramp((40, 48), 0, 4095, "uint16") // (i + 1) for i in range(4)]).astype(np.uint16)
    path = save(new_image(frames, bits_stored=12, frames=4, WindowCenter=1000, WindowWidth=2000), tmp_path / "mf.dcm")
    if rle:
        dcmtk("dcmcrle", path, tmp_path / "rle.dcm")
        path = tmp_path / "rle.dcm"
        assert read(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    for index in (0, 2, 3):
        reference = dcmj2pnm(path, tmp_path / "ref.png", "+Wi", "1", "+F", str(index + 1))
        assert_close(ours(path, frame=index), reference, max_diff=0, identical=1.0)
    assert not np.array_equal(ours(path, frame=0), ours(path, frame=2))


def test_jpeg_lossy_grey(tmp_path):
    """dcmcjpeg: 12-bit extended (+ee) from the MR, 8-bit baseline (+eb) from a synthetic image."""
    dcmtk("dcmcjpeg", "+ee", TS_DIR / "1.dcm", tmp_path / "mr12.dcm")
    assert_close(ours(tmp_path / "mr12.dcm"), dcmj2pnm(tmp_path / "mr12.dcm", tmp_path / "ref.png", "+Wi", "1"),
                 max_diff=1, identical=0.97)
    eight = save(new_image(ramp((64, 64), 0, 255, "uint8")), tmp_path / "g8.dcm")
    dcmtk("dcmcjpeg", "+eb", eight, tmp_path / "g8j.dcm")
    assert_close(ours(tmp_path / "g8j.dcm"), dcmj2pnm(tmp_path / "g8j.dcm", tmp_path / "ref8.png", "+Wm"),
                 max_diff=0, identical=1.0)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_and_ybr_full(tmp_path, planar):
    rgb = colour_picture()
    path = save(new_image(rgb, "RGB", planar=planar), tmp_path / "rgb.dcm")
    assert_close(ours(path), dcmj2pnm(path, tmp_path / "ref.png"), max_diff=0, identical=1.0)
    path = save(new_image(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL", planar=planar),
                tmp_path / "ybr.dcm")
    assert_close(ours(path), dcmj2pnm(path, tmp_path / "ref2.png"), max_diff=2, identical=0.0)


def test_jpeg_ybr_full_422_from_img2dcm(tmp_path):
    """A JPEG made by Pillow, wrapped by dcmtk's img2dcm: YBR_FULL_422, JPEG baseline, as cameras send."""
    Image.fromarray(colour_picture()).save(tmp_path / "picture.jpg", quality=90)
    dcmtk("img2dcm", tmp_path / "picture.jpg", tmp_path / "jpeg.dcm")
    ds = read(tmp_path / "jpeg.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    mine = ours(tmp_path / "jpeg.dcm")
    assert_close(mine, dcmj2pnm(tmp_path / "jpeg.dcm", tmp_path / "ref.png"), max_diff=0, identical=1.0)
    assert np.abs(mine.astype(int) - colour_picture().astype(int)).mean() < 3  # and it is the picture


@pytest.mark.parametrize("dtype, bits", [("uint8", 8), ("uint16", 16)])
def test_palette_colour(tmp_path, dtype, bits):
    pixels = ramp((64, 80), 0, (1 << bits) - 1, dtype)
    ds = new_image(pixels, "PALETTE COLOR", bits_stored=bits)
    n = 1 << bits
    up = (np.arange(n) * 65535 // (n - 1)).astype(np.uint16)
    for colour, table in (("Red", up), ("Green", up[::-1]), ("Blue", (up // 3).astype(np.uint16))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [n % 65536, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    path = save(ds, tmp_path / "palette.dcm")
    assert_close(ours(path), dcmj2pnm(path, tmp_path / "ref.png"), max_diff=0, identical=1.0)
