"""The consult minutes as PDF: generated from a real stored CT slice, read back with poppler (pdftotext, pdftoppm)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from archive.index import Source
from consult_data import build_world, draft_for, request_for
from helpers import dicom_files
from viewer.consults import pdf, service as svc
from viewer.consults.record import collect_record

pytestmark = pytest.mark.skipif(not shutil.which("pdftotext") or not shutil.which("pdftoppm"),
                                reason="poppler-utils not installed (scripts/test.sh installs it)")


@pytest.fixture
def concluded(sqlite_archive, ct_part10_dir):
    """A consult on a stored CT study, with a pinned slice (length + arrow), a signed and an amended conclusion."""
    files = dicom_files(ct_part10_dir)[:3]
    for f in files:
        sqlite_archive.ingest_file(f, Source(via="stow", facility="DIST"))
    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    with sqlite_archive.index.write_session() as session:
        w = build_world(session, with_studies=False)
        c = svc.create_consult(session, w.doctor, request_for(study_uids=[str(ds.StudyInstanceUID)]))
        svc.accept(session, c, w.radiologist)
        pin = svc.PinnedImage(study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                              instance_uid=str(ds.SOPInstanceUID), frame=1,
                              viewport={"wc": 40, "ww": 400, "zoom": 1},
                              annotations=[{"type": "length", "points": [[100, 256], [400, 256]]},
                                           {"type": "arrow", "points": [[60, 60], [200, 200]]},
                                           {"type": "text", "points": [[60, 420]], "text": "Tổn thương?"}])
        svc.post_message(session, c, w.radiologist, "Vùng nghi ngờ ở đây, đo 1 đường kính.", pin=pin)
        svc.post_message(session, c, w.doctor, "Cảm ơn, xin kết luận sớm.")
        svc.sign_conclusion(session, c, w.radiologist, draft_for(c))
        svc.sign_conclusion(session, c, w.radiologist, draft_for(
            c, impression="Máu tụ ngoài màng cứng kèm vỡ xương thái dương phải.",
            amendment_reason="Bổ sung vỡ xương sau khi xem cửa sổ xương."))
        svc.record_follow_up(session, c, w.doctor, "decision", "Chuyển viện lúc 03:40 theo tư vấn.", True)
        t0 = dt.datetime(2026, 11, 23, 2, 30, tzinfo=dt.timezone.utc)
        svc.record_review(session, c, w.radiologist, [
            svc.ReviewSample(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), 1,
                             40.0, 400.0, q, t0 + dt.timedelta(seconds=i), t0 + dt.timedelta(seconds=i + 2))
            for i, q in enumerate(["lossy", "full"])])
        session.commit()
        yield sqlite_archive, session, c, w


def _pdf_text(path: Path) -> str:
    """The PDF's text with runs of white space made one space (table cells wrap lines)."""
    text = subprocess.run(["pdftotext", str(path), "-"], check=True, capture_output=True, text=True).stdout
    assert "\u25a0" not in text  # a black square: a glyph the embedded font lacks
    return " ".join(text.split())


def test_minutes_pdf_reads_back_with_the_conclusion_and_pinned_image(concluded, tmp_path):
    archive, session, c, w = concluded
    record = collect_record(session, c)
    data = pdf.build_pdf(record, pdf.archive_pin_renderer(archive.open_instance), generated_by="ts.hung")
    out = tmp_path / "minutes.pdf"
    out.write_bytes(data)
    assert data.startswith(b"%PDF-")
    text = _pdf_text(out)
    for expected in ["BIÊN BẢN HỘI CHẨN TỪ XA", "Bệnh viện Bạch Mai", "Trung tâm Y tế huyện Mường Tè",
                     "Lò Văn Páo", "Có máu tụ nội sọ không?", "Máu tụ ngoài màng cứng cấp tính",
                     "Máu tụ ngoài màng cứng kèm vỡ xương thái dương phải", "0012345/BYT-CCHN",
                     "Chẩn đoán hình ảnh", "TS.BS. Trần Văn Hùng", "Chuyển viện lúc 03:40",
                     "Vùng nghi ngờ ở đây", "Bổ sung vỡ xương", "Theo tư vấn"]:
        assert expected in text, expected
    # Each conclusion version is there with its own signature and hash.
    assert text.count("SHA-256") == 2
    for conclusion in svc.conclusions(session, c):
        assert conclusion.content_hash in text
    assert "lossy" in text and "full" in text  # review evidence per display
    pages = subprocess.run(["pdftoppm", "-r", "60", "-png", str(out), str(tmp_path / "page")], check=True)
    assert pages.returncode == 0
    images = sorted(tmp_path.glob("page-*.png"))
    assert len(images) >= 2
    for p in images:
        shutil.copy(p, Path("test-output") / f"consult-minutes-{p.name}") if Path("test-output").is_dir() else None
    # The thread's page carries the pinned slice with its yellow annotations; the minutes' first page has none.
    def yellow_pixels(page: Path) -> int:
        rgb = np.asarray(Image.open(page).convert("RGB")).astype(int)
        return int(((rgb[..., 0] > 200) & (rgb[..., 1] > 170) & (rgb[..., 2] < 80)).sum())

    counts = [yellow_pixels(p) for p in images]
    assert counts[0] == 0 and max(counts) > 50


def test_pinned_image_has_the_window_and_the_measurement(concluded):
    archive, session, c, _ = concluded
    msg = next(m for m in svc.messages(session, c) if m.pin_instance_uid)
    with archive.open_instance(msg.pin_instance_uid) as f:
        data = f.read()
    narrow = pdf.render_pinned_image(data, msg)
    msg_wide = svc.ConsultMessage(pin_instance_uid=msg.pin_instance_uid, pin_frame=1,
                                  pin_viewport={"wc": 40, "ww": 4000}, pin_annotations=[])
    wide = pdf.render_pinned_image(data, msg_wide)
    assert narrow.size == wide.size == (512, 512)
    a, b = np.asarray(narrow.convert("L")).astype(int), np.asarray(wide.convert("L")).astype(int)
    # A narrower window spreads the soft tissue: more contrast than the wide one.
    assert a.std() > b.std() + 10
    rgb = np.asarray(narrow).astype(int)
    row = rgb[256, 100:400]  # along the length measurement
    assert ((row[:, 0] > 200) & (row[:, 1] > 170) & (row[:, 2] < 80)).mean() > 0.9
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    spacing = float(ds.PixelSpacing[1])
    assert pdf._length_label([(100, 256), (400, 256)], (float(ds.PixelSpacing[0]), spacing)) == \
        f"{300 * spacing:.1f} mm"


def test_deidentified_copy_hides_the_patient(concluded, tmp_path):
    _, session, c, _ = concluded
    out = tmp_path / "deid.pdf"
    out.write_bytes(pdf.build_pdf(collect_record(session, c, deidentify=True)))
    text = _pdf_text(out)
    assert "Lò Văn Páo" not in text and "MT-0001" not in text
    assert f"CONSULT-{c.id}" in text and "ẩn danh" in text
    assert "image could not be rendered" in text  # no renderer given: the pin is described, not drawn


def test_annotation_drawing_is_pure():
    base = Image.new("L", (100, 100), 0)
    drawn = pdf.draw_annotations(base, [{"type": "ellipse", "points": [[10, 10], [90, 90]]},
                                        {"type": "angle", "points": [[10, 50], [50, 50], [50, 10]]}])
    assert base.getpixel((50, 10)) == 0 and drawn.mode == "RGB"
    arr = np.asarray(drawn)
    assert arr[50, 10].tolist() == [255, 214, 0]  # the ellipse's left edge
    assert pdf._angle([(10, 50), (50, 50), (50, 10)]) == pytest.approx(90.0)
