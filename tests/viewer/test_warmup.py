"""Web workers warm up before their first request (viewer/warmup.py, viewer/gunicorn_conf.py)."""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from pathlib import Path

import pytest

from archive.service import Archive
from helpers import make_settings
from tests.peers import free_port
from tests.viewer.conftest import _wait_healthy, start_gunicorn, stop_server
from viewer import create_app, warmup
from viewer.render import decode_frame, load_dataset

STEPS = {"render", "templates", "translations", "index"}


@pytest.fixture
def app(tmp_path: Path):
    archive = Archive.open(make_settings(tmp_path))
    yield create_app({"TELEPACS_ARCHIVE": archive})
    archive.close()


def test_the_synthetic_slice_is_a_renderable_ct_image():
    ds = load_dataset(warmup.synthetic_ct_slice())
    assert ds.Modality == "CT" and (ds.Rows, ds.Columns) == (512, 512)
    _, frame = decode_frame(ds, 0)
    assert frame.pixels.shape == (512, 512) and frame.pixels.max() > frame.pixels.min()


def test_warm_worker_runs_every_step_and_compiles_the_pages(app):
    took = warmup.warm_worker(app)
    assert set(took) == STEPS and all(ms >= 0 for ms in took.values())
    compiled = {key[1] for key in app.jinja_env.cache.keys()}
    assert {"viewer.html", "base.html", "study_list.html", "auth/login.html", "consults/consult.html"} <= compiled


def test_a_failing_step_is_logged_and_skipped(app, monkeypatch, caplog):
    def broken(_app):
        raise OSError("index file unreadable")

    monkeypatch.setattr(warmup, "warm_index", broken)
    with caplog.at_level(logging.ERROR, logger="viewer.warmup"):
        took = warmup.warm_worker(app)
    assert set(took) == STEPS - {"index"}
    assert "warm-up step 'index' failed" in caplog.text and "index file unreadable" in caplog.text


def test_gunicorn_workers_warm_up_before_they_serve(tmp_path):
    """`telepacs serve`'s gunicorn settings: every worker logs its warm-up, then serves."""
    archive = Archive.open(make_settings(tmp_path))
    archive.close()
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(archive.settings.data_dir, port, log, workers=2, threads=2, TELEPACS_LOG_LEVEL="INFO")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login") as response:
            assert response.status == 200
        booted = set(re.findall(r"Booting worker with pid: (\d+)", log.read_text()))
        text = ""
        for _ in range(100):  # the second worker may still be warming when the first answers
            text = log.read_text()
            warmed = set(re.findall(r"INFO \[(\d+)\] viewer\.warmup: web worker warmed up: render [\d.]+ ms, "
                                    r"templates [\d.]+ ms, translations [\d.]+ ms, index [\d.]+ ms", text))
            if len(booted) == 2 and warmed == booted:
                break
            time.sleep(0.1)
        assert len(booted) == 2 and warmed == booted, text[-3000:]
    finally:
        stop_server(proc)
