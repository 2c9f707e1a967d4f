"""`telepacs verify` reports a study attached to a consult that went missing (records and images are kept 10 years)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import delete, update

from archive.index import Source
from archive.models import Instance, Study
from consult_data import build_world, request_for
from helpers import dicom_files, make_settings
from telepacs.cli import main
from viewer.consults import service as svc


def test_verify_reports_an_attached_study_that_lost_instances(tmp_path, ct_part10_dir, monkeypatch, capsys):
    monkeypatch.setenv("TELEPACS_DATA_DIR", str(tmp_path / "data"))
    from archive.service import Archive

    archive = Archive.open(make_settings(tmp_path))
    files = dicom_files(ct_part10_dir)[:3]
    for f in files:
        archive.ingest_file(f, Source(via="stow", facility="DIST"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with archive.index.write_session() as session:
        w = build_world(session, with_studies=False)
        c = svc.create_consult(session, w.doctor, request_for(study_uids=[study_uid]))
        session.commit()
        consult_id = c.id
    archive.close()

    assert main(["verify", "--quiet"]) == 0
    assert "consult studies incomplete: 0" in capsys.readouterr().out

    # Someone removes an instance of the attached study from the catalogue and storage behind our back.
    archive = Archive.open(make_settings(tmp_path))
    with archive.index.write_session() as session, session.begin():
        victim = session.query(Instance).first()
        key = victim.object_key
        session.execute(delete(Instance).where(Instance.id == victim.id))
        session.execute(update(Study).where(Study.study_uid == study_uid).values(num_instances=2))
    archive.store.delete(key)
    archive.close()
    assert main(["verify", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"CONSULT  consult {consult_id}: study {study_uid} had 3 instances when attached, 2 now" in out
    assert "consult studies incomplete: 1" in out
    assert Path(tmp_path / "data").is_dir()
