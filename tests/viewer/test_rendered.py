"""WADO-RS Retrieve Rendered and thumbnails over a real gunicorn: the viewer.render pipeline behind HTTP."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from helpers import CT_RAW_DIR, TS_DIR, dicom_files
from tests.viewer.test_dicomweb import _stow, _uids
from viewer.render import render_frame


def _multiframe(path, frames: int = 4):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "MF1", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 24, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    pixels = np.stack([np.full((16, 24), 1000 * (n + 1), dtype=np.uint16) for n in range(frames)])
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def _url(web, path, *tail: str) -> str:
    study, series, sop = _uids(path)
    return "/".join([web.dicomweb, "studies", study, "series", series, "instances", sop, *tail])


def _image(response: requests.Response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


@pytest.fixture
def loaded(web, ct_part10_dir):
    ct = sorted(ct_part10_dir.glob("*.dcm"))
    assert _stow(web, ct + dicom_files(TS_DIR)).status_code == 200
    return web, ct


def test_rendered_instance_is_the_pipeline_output(loaded):
    web, ct = loaded
    response = web.http.get(_url(web, ct[0], "rendered") + "?window=40,400", timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/jpeg"
    assert response.content == render_frame(ct[0].read_bytes(), 0, "40,400")
    assert _image(response).size == (512, 512)
    assert "max-age" in response.headers["Cache-Control"]


def test_every_transfer_syntax_renders(loaded):
    web, _ = loaded
    for path in dicom_files(TS_DIR):
        response = web.http.get(_url(web, path, "rendered"), timeout=30, headers={"Accept": "image/png"})
        assert response.status_code == 200, (path.name, response.text)
        assert response.headers["Content-Type"] == "image/png"
        assert response.content == render_frame(path.read_bytes(), 0, fmt="png")


def test_viewport_quality_formats_and_window_change_the_image(loaded):
    web, ct = loaded
    url = _url(web, ct[0], "rendered")
    small = web.http.get(url + "?viewport=256,256&quality=60", timeout=30)
    assert _image(small).size == (256, 256)
    webp = web.http.get(url, timeout=30, headers={"Accept": "image/webp"})
    assert webp.headers["Content-Type"] == "image/webp" and _image(webp).format == "WEBP"
    bone = web.http.get(url + "?window=500,2000", timeout=30).content
    brain = web.http.get(url + "?window=40,80", timeout=30).content
    assert bone != brain


def test_etag_and_conditional_get(loaded):
    web, ct = loaded
    url = _url(web, ct[1], "rendered") + "?window=40,400"
    first = web.http.get(url, timeout=30)
    etag = first.headers["ETag"]
    again = web.http.get(url, timeout=30, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = web.http.get(_url(web, ct[1], "rendered") + "?window=40,401", timeout=30)
    assert other.headers["ETag"] != etag


def test_frames_of_a_multiframe(web, tmp_path):
    path = _multiframe(tmp_path / "mf.dcm")
    assert _stow(web, [path]).status_code == 200
    levels = []
    for number in (1, 2, 4):
        response = web.http.get(_url(web, path, "frames", str(number), "rendered"), timeout=30,
                                headers={"Accept": "image/png"})
        assert response.status_code == 200
        levels.append(int(np.asarray(_image(response)).mean()))
    assert levels == sorted(levels) and len(set(levels)) == 3  # frame n holds 1000 * n: brighter each time
    missing = web.http.get(_url(web, path, "frames", "5", "rendered"), timeout=30)
    assert missing.status_code == 404 and "4 frame(s)" in missing.json()["error"]


def test_thumbnails_and_series_rendered(loaded):
    web, ct = loaded
    study, series, _ = _uids(ct[0])
    for url in (f"{web.dicomweb}/studies/{study}/thumbnail",
                f"{web.dicomweb}/studies/{study}/series/{series}/thumbnail",
                _url(web, ct[3], "thumbnail")):
        response = web.http.get(url, timeout=30)
        assert response.status_code == 200, response.text
        assert max(_image(response).size) == 128
    series_image = web.http.get(f"{web.dicomweb}/studies/{study}/series/{series}/rendered", timeout=30)
    assert series_image.status_code == 200 and _image(series_image).size == (512, 512)


@pytest.mark.parametrize("query, status, words", [
    ("?window=abc", 400, "window"),
    ("?window=40,0", 400, "width"),
    ("?viewport=0,10", 400, "viewport"),
    ("?quality=0", 400, "quality"),
    ("?quality=high", 400, "quality"),
])
def test_bad_render_parameters(loaded, query, status, words):
    web, ct = loaded
    response = web.http.get(_url(web, ct[0], "rendered") + query, timeout=30)
    assert response.status_code == status
    assert words in response.json()["error"].lower()


def test_unknown_instance_and_unacceptable_media(loaded):
    web, ct = loaded
    study, series, _ = _uids(ct[0])
    unknown = web.http.get(f"{web.dicomweb}/studies/{study}/series/{series}/instances/1.2.3.{uuid.uuid4().int % 999}"
                           "/rendered", timeout=30)
    assert unknown.status_code == 404
    html = web.http.get(_url(web, ct[0], "rendered"), timeout=30, headers={"Accept": "text/html"})
    assert html.status_code == 406


def test_raw_ct_testdata_is_what_was_wrapped(ct_part10_dir):
    # the fixture wraps ../shared/testdata's raw CT datasets unchanged: the rendered tests above use real data
    raw = dicom_files(CT_RAW_DIR)[0]
    wrapped = ct_part10_dir / (raw.stem + ".dcm")
    assert wrapped.read_bytes().endswith(raw.read_bytes())
    assert pydicom.dcmread(wrapped).Modality == "CT"


# -- frames ------------------------------------------------------------------------------


def test_uncompressed_frames_with_dicomweb_client(web, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    files = dicom_files(TS_DIR)
    assert _stow(web, files).status_code == 200
    client = web.client()
    for path in files:
        study, series, sop = _uids(path)
        (frame,) = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
        expected = pydicom.pixels.pixel_array(pydicom.dcmread(path), index=0, raw=True)
        assert frame == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), path.name


def test_frames_as_stored_and_several_frames(web, tmp_path):
    jpeg_ls = TS_DIR / "7.dcm"
    ds = pydicom.dcmread(jpeg_ls)
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"
    mf = _multiframe(tmp_path / "mf.dcm")
    assert _stow(web, [jpeg_ls, mf]).status_code == 200
    stored = web.http.get(_url(web, jpeg_ls, "frames", "1"), timeout=30, headers={
        "Accept": 'multipart/related; type="image/jls"'})
    assert stored.status_code == 200
    fragment = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    assert fragment in stored.content and b"Content-Type: image/jls; transfer-syntax=1.2.840.10008.1.2.4.80" \
        in stored.content
    two = web.http.get(_url(web, mf, "frames", "2,4"), timeout=30)
    assert two.status_code == 200
    frames = pydicom.pixels.pixel_array(pydicom.dcmread(mf), raw=True)
    assert frames[1].tobytes() in two.content and frames[3].tobytes() in two.content
    assert frames[0].tobytes() not in two.content


@pytest.mark.parametrize("tail, accept, status", [
    ("frames/0", None, 400),
    ("frames/1,x", None, 400),
    ("frames/9", None, 404),
    ("frames/1", 'multipart/related; type="image/jp2"', 406),
])
def test_frame_errors(web, tmp_path, tail, accept, status):
    path = _multiframe(tmp_path / "mf.dcm")
    assert _stow(web, [path]).status_code == 200
    response = web.http.get(_url(web, path, *tail.split("/")), timeout=30,
                            headers={"Accept": accept} if accept else {})
    assert response.status_code == status
    assert response.json()["error"]


def test_metadata_pixel_data_is_bulk_data_by_uri(web):
    from dicomweb_client.api import DICOMwebClient

    native, jpeg_ls = TS_DIR / "1.dcm", TS_DIR / "7.dcm"
    assert _stow(web, [native, jpeg_ls]).status_code == 200
    client = web.client()
    for path in (native, jpeg_ls):
        study, series, sop = _uids(path)
        metadata = client.retrieve_instance_metadata(study, series, sop)
        uri = metadata["7FE00010"]["BulkDataURI"]
        assert uri.endswith(f"/instances/{sop}/bulkdata/7FE00010")
        parts = client.retrieve_bulkdata(uri)
        ds = pydicom.dcmread(path)
        if path is native:
            assert parts == [ds.PixelData]
        else:
            assert parts == [pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)]
    study, series, sop = _uids(native)
    missing = web.http.get(f"{web.dicomweb}/studies/{study}/series/{series}/instances/{sop}/bulkdata/00100010",
                           timeout=30)
    assert missing.status_code == 404


def test_rendered_with_dicomweb_client(loaded):
    from dicomweb_client.api import DICOMwebClient

    web, ct = loaded
    client = web.client()
    study, series, sop = _uids(ct[2])
    image = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",),
                                              params={"window": "40,400"})
    assert image == render_frame(ct[2].read_bytes(), 0, "40,400", fmt="png")
    frame_image = client.retrieve_instance_frames_rendered(study, series, sop, frame_numbers=[1],
                                                           media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(frame_image)).size == (512, 512)
