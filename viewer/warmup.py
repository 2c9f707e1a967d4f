"""Warm a freshly started web process before it takes requests.

A new gunicorn worker would otherwise make its first reader wait while it imports the pixel decoders
and image encoders, compiles the page templates, loads the translations and opens the index: several
hundred milliseconds on the first image of the day, which is the one a specialist sees first.
``viewer/gunicorn_conf.py`` calls :func:`warm_worker` once per worker, before the worker accepts a
connection. Nothing here reads patient data: the image rendered is a synthetic one made here.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from flask import Flask
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (JPEG2000, CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1,
                         JPEGLSLossless, RLELossless, generate_uid)

log = logging.getLogger(__name__)

# Decoders whose plugins are imported on first use (pylibjpeg, openjpeg, RLE): looked up once here.
_COMPRESSED_SYNTAXES = (JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless)


def synthetic_ct_slice(rows: int = 512, columns: int = 512) -> bytes:
    """A Part 10 CT-like image (signed 16-bit, rescale to HU, a window) made in memory, not patient data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelSpacing = [0.7, 0.7]
    yy, xx = np.mgrid[0:rows, 0:columns]
    ds.PixelData = ((xx + yy) % 2048).astype(np.int16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def warm_render_pipeline() -> None:
    """Decode, window, resize and encode a synthetic slice in every output format the viewer asks for."""
    from viewer.render import (ImageFormat, decode_frame, detach_for_cache, load_dataset, parse_viewport,
                               parse_window, render_display)

    dataset, frame = detach_for_cache(*decode_frame(load_dataset(synthetic_ct_slice()), 0))
    render_display(dataset, frame, parse_window("40,400,linear"), parse_viewport("256,256"), ImageFormat.JPEG, 50)
    for fmt in (ImageFormat.JPEG, ImageFormat.WEBP, ImageFormat.PNG):
        render_display(dataset, frame, None, None, fmt, 90)
    for syntax in _COMPRESSED_SYNTAXES:
        try:
            get_decoder(syntax).is_available  # noqa: B018 - imports the decoding plugins
        except NotImplementedError:
            pass


def warm_templates(app: Flask) -> int:
    """Compile every page template (Jinja compiles each on first use); returns how many."""
    names = [name for name in app.jinja_env.list_templates() if name.endswith(".html")]
    for name in names:
        app.jinja_env.get_template(name)
    return len(names)


def warm_translations(app: Flask) -> None:
    """Load every language's catalogue (Flask-Babel reads the .mo files on first use)."""
    from flask_babel import force_locale, gettext

    from viewer.i18n import LANGUAGES, js_catalog

    with app.test_request_context("/"):
        for language in LANGUAGES:
            with force_locale(language):
                gettext("Studies")
                js_catalog()


def warm_index(app: Flask) -> None:
    """Open the archive (index engine, object store) and one index connection."""
    from viewer.deps import get_archive

    with app.app_context():
        get_archive().index.ping()


def warm_worker(app: Flask) -> dict[str, float]:
    """Run every warm-up step; a step that fails is logged and skipped (the worker serves regardless).

    Returns each step's duration in milliseconds.
    """
    steps = {
        "render": warm_render_pipeline,
        "templates": lambda: warm_templates(app),
        "translations": lambda: warm_translations(app),
        "index": lambda: warm_index(app),
    }
    took: dict[str, float] = {}
    for name, step in steps.items():
        started = time.perf_counter()
        try:
            step()
        except Exception:  # a warm-up must never stop a worker from serving; the request path reports errors
            log.exception("web worker warm-up step %r failed; the first request will pay for it", name)
            continue
        took[name] = round((time.perf_counter() - started) * 1000, 1)
    log.info("web worker warmed up: %s", ", ".join(f"{name} {ms} ms" for name, ms in took.items()))
    return took
