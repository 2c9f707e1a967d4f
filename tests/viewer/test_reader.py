"""The reading page's server side: /api/viewer JSON (from the index only), ROI statistics, the page itself.

Against the real app under gunicorn (the ``web`` fixture), with generated phantoms of known geometry
and the CT of ../shared/testdata.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import re
import statistics
import time

import pydicom
import pytest
import requests

from archive.index import Source
from helpers import dicom_files
from tests.e2e import phantoms
from viewer import create_app


def _load(web, files) -> None:
    for path in files:
        web.archive.ingest_file(path, Source(via="import"))


def _page_data(text: str) -> dict:
    found = re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', text, re.S)
    assert found, "the page embeds no viewer data"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture
def ct(web, ct_part10_dir):
    files = dicom_files(ct_part10_dir)
    _load(web, files)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_study_header_and_series(web, ct):
    study, series = ct
    response = web.http.get(f"{web.url}/api/viewer/studies/{study}", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["uid"] == study
    assert body["patient"] == {"name": "BAREX CYLINDER", "id": "PR0002", "sex": "", "birth_date": ""} or \
        body["patient"]["name"] == "BAREX CYLINDER"
    assert body["date"] == "19980528" and body["description"] == "PHANTOM TEST"
    (entry,) = body["series"]
    assert entry["uid"] == series and entry["modality"] == "CT"
    assert entry["instances"] == 10 and entry["frames"] == 10
    thumbnail = web.http.get(web.url + entry["thumbnail"], timeout=30)
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"].startswith("image/")


def test_series_listing_follows_slice_position(web, tmp_path):
    study = phantoms.ct_series(tmp_path / "thin", 40)
    _load(web, study.files)
    body = web.http.get(f"{web.url}/api/viewer/series/{study.series_uids[0]}", timeout=10).json()
    instances = [{**body["common"], **inst} for inst in body["instances"]]
    assert len(instances) == 40
    positions = [inst["position"] for inst in instances]
    assert positions == sorted(positions) and positions[0] == 0.0 and positions[-1] == pytest.approx(39 * 0.7)
    # Instance numbers run against the position: the list follows position, not number.
    assert [inst["number"] for inst in instances] == list(range(40, 0, -1))
    first = instances[0]
    assert first["spacing"] == [0.7, 0.7] and first["spacing_source"] == "PixelSpacing"
    assert first["rows"] == 64 and first["cols"] == 64 and first["frames"] == 1
    assert first["slope"] == 1.0 and first["intercept"] == -1024.0 and first["rescale_type"] == "HU"
    assert first["windows"] == [{"center": 40.0, "width": 400.0, "explanation": ""}]
    assert first["photometric"] == "MONOCHROME2" and first["iop"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    # What every slice shares is said once; what differs, per slice.
    assert "spacing" in body["common"] and "windows" in body["common"]
    assert set(body["instances"][0]) == {"sop", "number", "position", "ipp"}
    url = body["rendered"].replace("{sop}", first["sop"]).replace("{frame}", "1")
    image = web.http.get(web.url + url + "?window=40,400,linear", headers={"Accept": "image/png"}, timeout=30)
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"


def test_series_listing_of_300_slices_is_small_and_fast(web, tmp_path):
    study = phantoms.ct_series(tmp_path / "big", 300, rows=16, cols=16)
    _load(web, study.files)
    path = f"/api/viewer/series/{study.series_uids[0]}"
    with web.http as session:
        wall = []
        for _ in range(15):
            started = time.perf_counter()
            response = session.get(web.url + path, headers={"Accept-Encoding": "gzip"}, timeout=10)
            wall.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        raw = session.get(web.url + path, headers={"Accept-Encoding": "identity"}, timeout=10)
    assert len(response.json()["instances"]) == 300
    wire = int(response.headers["Content-Length"])
    assert response.headers["Content-Encoding"] == "gzip"
    # The work one answer costs (CPU time of the thread that serves it, same app and index in this process):
    # unlike wall-clock time, it does not grow when other processes share the CPU.
    client = create_app({"TELEPACS_ARCHIVE": web.archive}).test_client()
    cpu = []
    for _ in range(15):
        started = time.thread_time()
        assert client.get(path, headers={"Accept-Encoding": "gzip",
                                         "Authorization": f"Bearer {web.token}"}).status_code == 200
        cpu.append((time.thread_time() - started) * 1000)
    print(f"300-slice listing: {len(raw.content)} bytes, {wire} gzipped; over HTTP median {statistics.median(wall):.1f} ms "
          f"(min {min(wall):.1f}); CPU per answer median {statistics.median(cpu):.1f} ms")
    assert len(raw.content) < 40_000 and wire < 15_000
    # Target 20 ms (met over HTTP at load ~8: 16-19 ms); CPU time still inflates on this shared 2-core
    # machine (15-30 ms measured at load 7-18), so the guard here is against regressions, not the target.
    assert statistics.median(cpu) < 40


def test_unknown_and_malformed_uids(web, ct):
    for path in ("/api/viewer/studies/1.2.3.4", "/api/viewer/series/1.2.3.4"):
        response = web.http.get(web.url + path, timeout=10)
        assert response.status_code == 404 and "not in the archive" in response.json()["error"]
    bad = web.http.get(web.url + "/api/viewer/series/not-a-uid", timeout=10)
    assert bad.status_code == 400 and "not a valid DICOM UID" in bad.json()["error"]
    assert "not a valid DICOM UID" in web.log.read_text()


def test_roi_statistics_in_hounsfield_units(web, tmp_path):
    study = phantoms.measurement_study(tmp_path / "m")
    _load(web, study.files)
    sop = str(pydicom.dcmread(study.files[0], stop_before_pixels=True).SOPInstanceUID)
    base = f"{web.url}/api/viewer/roi/{study.study_uid}/{study.series_uids[0]}/{sop}/1"
    x0, y0, x1, y1 = phantoms.SQUARE
    inside = web.http.get(base, params={"x0": x0 + 5, "y0": y0 + 5, "x1": x1 - 5, "y1": y1 - 5}, timeout=30)
    assert inside.status_code == 200, inside.text
    stats = inside.json()
    assert stats["unit"] == "HU"
    assert stats["mean"] == pytest.approx(phantoms.SQUARE_MEAN, abs=0.3)
    assert stats["sd"] == pytest.approx(phantoms.SQUARE_SD, abs=0.1)
    assert stats["min"] == 90 and stats["max"] == 110
    assert stats["pixels"] == pytest.approx(3.14159 * 25 * 35, rel=0.02)  # the ellipse inscribed in 50 x 70 pixels
    empty = web.http.get(base, params={"x0": 10, "y0": 10, "x1": 10.2, "y1": 10.2}, timeout=30)
    assert empty.status_code == 422 and "no pixel centre" in empty.json()["error"]
    missing = web.http.get(base, params={"x0": 1}, timeout=30)
    assert missing.status_code == 400 and "y0" in missing.json()["error"]
    words = web.http.get(base, params={"x0": "a", "y0": 1, "x1": 2, "y1": 3}, timeout=30)
    assert words.status_code == 400
    unknown = web.http.get(base.replace(sop, "1.2.3.4"), params={"x0": 1, "y0": 1, "x1": 9, "y1": 9}, timeout=30)
    assert unknown.status_code == 404
    no_frame = web.http.get(base[:-1] + "7", params={"x0": 1, "y0": 1, "x1": 9, "y1": 9}, timeout=30)
    assert no_frame.status_code == 422 and "frame 7" in no_frame.json()["error"]


@pytest.mark.parametrize("keyword,spacing,source", [
    ("ImagerPixelSpacing", (0.2, 0.2), "ImagerPixelSpacing"),
    ("PixelSpacing", None, None),
])
def test_spacing_source_and_unknown_spacing(web, tmp_path, keyword, spacing, source):
    study = phantoms.measurement_study(tmp_path / "s", spacing=spacing, keyword=keyword, slices=1)
    _load(web, study.files)
    body = web.http.get(f"{web.url}/api/viewer/series/{study.series_uids[0]}", timeout=10).json()
    inst = {**body["common"], **body["instances"][0]}
    assert inst["spacing_source"] == source
    assert inst["spacing"] == (list(spacing) if spacing else None)


def test_multiframe_is_counted_in_frames(web, tmp_path):
    study = phantoms.multiframe_study(tmp_path / "mf")
    _load(web, study.files)
    header = web.http.get(f"{web.url}/api/viewer/studies/{study.study_uid}", timeout=10).json()
    assert header["series"][0]["instances"] == 1 and header["series"][0]["frames"] == phantoms.FRAMES
    body = web.http.get(f"{web.url}/api/viewer/series/{study.series_uids[0]}", timeout=10).json()
    inst = {**body["common"], **body["instances"][0]}
    assert inst["frames"] == phantoms.FRAMES and inst["frame_time"] == 50.0
    # The page starts on the middle frame of the stack the frames form.
    page = web.http.get(f"{web.url}/viewer/{study.study_uid}", timeout=10)
    data = _page_data(page.text)
    assert data["start"] == phantoms.FRAMES // 2
    assert f"/frames/{phantoms.FRAMES // 2 + 1}/rendered?window=500,1000,linear&amp;quality=50" in page.text


def test_page_embeds_the_header_and_first_series(web, ct):
    study, series = ct
    response = web.http.get(f"{web.url}/viewer/{study}", headers={"Accept-Encoding": "gzip"}, timeout=10, stream=True)
    wire = response.raw.read()
    assert response.status_code == 200 and response.headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(wire).decode()
    data = _page_data(text)
    assert data["study"]["uid"] == study and data["series"]["uid"] == series
    assert len(data["series"]["instances"]) == 10 and data["start"] == 5
    sop = data["series"]["instances"][5]["sop"]
    # The first slice (the middle one) comes inside the page, as a small lossy preview: the very image the
    # renderer answers for that URL (which viewer.js would ask for), so no request is needed for it.
    preview = f"/instances/{sop}/frames/1/rendered?window=0,200,linear&amp;quality=50&amp;viewport=256,256"
    img = re.search(r'<img src="data:image/jpeg;base64,([^"]+)" data-url="([^"]+)"', text)
    assert img and img.group(2).endswith(preview)
    rendered = web.http.get(web.url + html.unescape(img.group(2)), timeout=10)
    assert rendered.status_code == 200 and base64.b64decode(img.group(1)) == rendered.content
    # Nothing from elsewhere: every script, style and image is ours.
    for url in re.findall(r'(?:src|href)="([^"]+)"', text):
        assert url.startswith("/") or url.startswith("data:"), url
    print(f"viewer page: {len(text)} bytes, {len(wire)} gzipped, {len(rendered.content)} of them the first image")
    assert len(wire) < 12_000 + len(img.group(1))


def test_large_images_first_preview_is_fetched_not_inlined(web, tmp_path):
    """A large matrix (CR, DX, MG) could hold the page back while it renders: its preview is a URL."""
    large = phantoms.large_study(tmp_path / "large")
    _load(web, large.files)
    text = web.http.get(f"{web.url}/viewer/{large.study_uid}", timeout=10).text
    img = re.search(r'<img src="([^"]+)" data-url="([^"]+)"', text)
    assert img and img.group(1) == img.group(2) and "/rendered?" in img.group(1)


def test_page_opens_the_series_of_a_given_instance(web, ct, tmp_path):
    study, series = ct
    body = web.http.get(f"{web.url}/api/viewer/series/{series}", timeout=10).json()
    third = body["instances"][2]["sop"]
    data = _page_data(web.http.get(f"{web.url}/viewer/{study}", params={"instance": third}, timeout=10).text)
    assert data["start"] == 2 and data["series"]["uid"] == series


def test_page_errors_are_pages(web, ct):
    """A person's browser (a login session, not a token) gets pages, not JSON, for a study it cannot open."""
    browser = web.login()
    browser.headers["Accept"] = "text/html"
    missing = browser.get(f"{web.url}/viewer/1.2.3.4", timeout=10)
    assert missing.status_code == 404 and "text/html" in missing.headers["Content-Type"]
    assert "1.2.3.4" in missing.text
    bad = browser.get(f"{web.url}/viewer/abc", timeout=10)
    assert bad.status_code == 400 and "text/html" in bad.headers["Content-Type"]
    assert "not a valid DICOM UID" in bad.text
    vietnamese = browser.get(f"{web.url}/viewer/1.2.3.4", params={"lang": "vi"}, timeout=10)
    assert vietnamese.status_code == 404 and '<html lang="vi">' in vietnamese.text


def test_scripts_are_served_compressed(web):
    script = web.http.get(f"{web.url}/static/viewer/viewer.js", headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert script.status_code == 200 and script.headers["Content-Encoding"] == "gzip"
    assert "javascript" in script.headers["Content-Type"] and "telepacsViewer" in script.text
    plain = web.http.get(f"{web.url}/static/viewer/viewer.js", headers={"Accept-Encoding": "identity"}, timeout=10)
    assert "Content-Encoding" not in plain.headers and plain.text == script.text


def test_viewer_needs_a_login_and_hides_other_facilities_studies(web, ct):
    study, series = ct
    anonymous = requests.get(f"{web.url}/api/viewer/studies/{study}", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["status"] == 401
    page = requests.get(f"{web.url}/viewer/{study}", timeout=10, allow_redirects=False,
                        headers={"Accept": "text/html"})
    assert page.status_code == 302 and page.headers["Location"].startswith("/login?next=/viewer/")
    # The CT was imported without a facility: a district doctor elsewhere may not see it.
    other = web.token_session(web.add_user("district", "a long enough password 1", facility="DISTRICT1"))
    sop = web.http.get(f"{web.url}/api/viewer/series/{series}", timeout=10).json()["instances"][0]["sop"]
    for path in (f"/api/viewer/studies/{study}", f"/api/viewer/series/{series}", f"/viewer/{study}",
                 f"/api/viewer/roi/{study}/{series}/{sop}/1?x0=1&y0=1&x1=9&y1=9"):
        assert other.get(web.url + path, timeout=10).status_code == 404, path


def test_a_slow_store_does_not_hold_the_page_back(tmp_path, ct_part10_dir, monkeypatch):
    """The inline preview is rendered within a time budget; past it the page goes out with a fetched <img>."""
    import time

    from archive.reading import series_listing
    from archive.service import Archive
    from helpers import make_settings
    from viewer import reader

    archive = Archive.open(make_settings(tmp_path))
    try:
        for path in dicom_files(ct_part10_dir):
            archive.ingest_file(path, Source(via="import"))
        series = pydicom.dcmread(dicom_files(ct_part10_dir)[0], stop_before_pixels=True).SeriesInstanceUID
        app = create_app({"TELEPACS_ARCHIVE": archive})
        listing = series_listing(archive.index, str(series))
        first = listing.instances[5]
        with app.test_request_context("/"):
            inline = reader.inline_preview(listing, first, 1, None)
            assert inline is not None and inline.startswith("data:image/jpeg;base64,")

            real = reader.rendered_image

            def slow(*args):
                time.sleep(2)
                return real(*args)

            monkeypatch.setattr(reader, "rendered_image", slow)
            started = time.monotonic()
            assert reader.inline_preview(listing, listing.instances[4], 1, (40.0, 400.0)) is None
            assert time.monotonic() - started < reader.INLINE_PREVIEW_BUDGET_S + 0.5
    finally:
        archive.close()
