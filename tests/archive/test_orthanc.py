"""`telepacs orthanc pull|push` against a real Orthanc (REST API, HTTP Basic auth), and archive.orthanc itself."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from archive import orthanc as sync
from archive.index import Source
from archive.service import Archive
from helpers import FMRI_DIR, TS_DIR, dicom_files, make_settings, read_uids
from tests.peers import OrthancServer, free_port, wait_until

TELEPACS = [sys.executable, "-m", "telepacs.cli"]
USER, PASSWORD = "radio", "s3cret:pw"
TS_FILES = dicom_files(TS_DIR)
FMRI_FILES = dicom_files(FMRI_DIR)
TS_STUDY = read_uids(TS_FILES[0])[0]
FMRI_STUDY = read_uids(FMRI_FILES[0])[0]


@pytest.fixture(scope="module")
def originals(ct_part10_dir: Path) -> dict[str, dict[str, bytes]]:
    """Study UID -> {SOP Instance UID: the file's bytes} for the three studies Orthanc holds."""
    studies: dict[str, dict[str, bytes]] = {}
    for path in [*TS_FILES, *dicom_files(ct_part10_dir), *FMRI_FILES]:
        study, _, sop = read_uids(path)
        studies.setdefault(study, {})[sop] = path.read_bytes()
    return studies


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, originals) -> Iterator[OrthancServer]:
    """An Orthanc with a login, holding the Siemens series (2014), the GE CT (1998) and the GE fMRI (2018)."""
    server = OrthancServer(work_dir=tmp_path_factory.mktemp("orthanc-rest"), users={USER: PASSWORD})
    with server:
        for files in originals.values():
            for data in files.values():
                assert json.loads(server.request("POST", "/instances", data))["Status"] == "Success"
        yield server


def url(server: OrthancServer, password: str = PASSWORD) -> str:
    from urllib.parse import quote

    return f"http://{USER}:{quote(password, safe='')}@{server.host}:{server.http_port}/"


def run(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    full_env.update(TELEPACS_DATA_DIR=str(data_dir), **env)
    return subprocess.run(TELEPACS + args, env=full_env, capture_output=True, text=True, timeout=300)


def stored_files(data_dir: Path) -> dict[str, bytes]:
    """SOP Instance UID -> bytes of every object the archive at ``data_dir`` (SQLite index) holds."""
    arc = Archive.open(make_settings(data_dir.parent))
    try:
        return archive_files(arc)
    finally:
        arc.close()


def archive_files(arc: Archive) -> dict[str, bytes]:
    """SOP Instance UID -> bytes of every object ``arc`` indexes."""
    result = {}
    for instance in arc.index.iter_instances():
        with arc.open_instance(instance.sop_instance_uid) as f:
            result[instance.sop_instance_uid] = f.read()
    return result


def orthanc_files(server: OrthancServer, study_uid: str) -> dict[str, bytes]:
    """SOP Instance UID -> bytes of Orthanc's file for every instance of ``study_uid`` it holds."""
    hits = json.loads(server.request("POST", "/tools/lookup", study_uid.encode()))
    if not hits:
        return {}
    instances = server.get_json(f"/studies/{hits[0]['ID']}/instances")
    return {i["MainDicomTags"]["SOPInstanceUID"]: server.request("GET", f"/instances/{i['ID']}/file")
            for i in instances}


# --------------------------------------------------------------------------- pull


def test_pull_study_patient_since(orthanc, originals, ct_part10_dir, tmp_path):
    data = tmp_path / "data"
    ct_study = read_uids(dicom_files(ct_part10_dir)[0])[0]

    pulled = run(["orthanc", "pull", url(orthanc), "--study", ct_study], data)
    assert pulled.returncode == 0, pulled.stderr
    assert "stored: 10, skipped (already there): 0, failed: 0 (of 10 instances" in pulled.stdout
    assert "pull: 100%" in pulled.stderr  # the progress bar
    assert stored_files(data) == originals[ct_study]

    pulled = run(["orthanc", "pull", url(orthanc), "--patient", "crlab", "--quiet"], data)
    assert pulled.returncode == 0, pulled.stderr
    assert "stored: 9, skipped (already there): 0, failed: 0 (of 9 instances" in pulled.stdout
    assert stored_files(data) == originals[ct_study] | originals[TS_STUDY]

    # Since 2010: the Siemens series (2014, here already) and the fMRI (2018), not the 1998 CT.
    pulled = run(["orthanc", "pull", url(orthanc), "--since", "2010-01-01", "--quiet"], data)
    assert pulled.returncode == 0, pulled.stderr
    assert "stored: 150, skipped (already there): 9, failed: 0 (of 159 instances" in pulled.stdout
    assert stored_files(data) == originals[ct_study] | originals[TS_STUDY] | originals[FMRI_STUDY]


def _index_count(data_dir: Path) -> int:
    db = data_dir / "index.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0


def test_pull_killed_midway_resumes(orthanc, originals, tmp_path):
    data = tmp_path / "data"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPACS_")}
    full_env["TELEPACS_DATA_DIR"] = str(data)
    proc = subprocess.Popen(TELEPACS + ["orthanc", "pull", url(orthanc), "--study", FMRI_STUDY, "--quiet"],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _index_count(data) >= 20, 120, "20 instances pulled", proc=proc, interval=0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = _index_count(data)
    assert 20 <= done < len(FMRI_FILES)

    resumed = run(["orthanc", "pull", url(orthanc), "--study", FMRI_STUDY, "--quiet"], data)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stored: {150 - done}, skipped (already there): {done}, failed: 0" in resumed.stdout
    assert stored_files(data) == originals[FMRI_STUDY]
    verified = run(["verify", "--quiet"], data)
    assert "missing: 0, corrupt: 0, orphaned: 0" in verified.stdout, verified.stdout


class _Interrupting:
    """The real REST client, with a Ctrl-C arriving in the middle of the ``after``-th download."""

    def __init__(self, api: sync.OrthancRest, after: int) -> None:
        self._api = api
        self.url = api.url
        self.after = after
        self.downloads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._api, name)

    def download(self, orthanc_id: str) -> Iterator[bytes]:
        self.downloads += 1
        chunks = self._api.download(orthanc_id)
        if self.downloads == self.after:
            yield next(chunks)[:100]
            raise KeyboardInterrupt
        yield from chunks


def test_interrupted_pull_leaves_nothing_half_written(orthanc, originals, archive):
    """On SQLite and PostgreSQL: a Ctrl-C in the middle of a download, then the same pull again."""
    api = sync.connect(sync.parse_target(url(orthanc)))
    try:
        instances = sync.plan_pull(api, sync.Selection(study_uid=TS_STUDY))
        with pytest.raises(KeyboardInterrupt):
            sync.pull(archive, _Interrupting(api, after=4), instances)  # type: ignore[arg-type]
        assert archive.index.counts()["instances"] == 3
        assert list(archive.settings.incoming_dir.iterdir()) == []
        report = sync.pull(archive, api, instances)
        assert (report.transferred, report.skipped, report.failed) == (6, 3, [])
    finally:
        api.close()
    assert archive_files(archive) == originals[TS_STUDY]
    assert archive.verify().ok


def test_one_refused_instance_is_reported_and_the_rest_continue(orthanc, originals, tmp_path):
    data = tmp_path / "data"
    arc = Archive.open(make_settings(tmp_path, duplicate_policy="reject"))
    victim = TS_FILES[3]
    victim_uid = read_uids(victim)[2]
    changed = tmp_path / "changed.dcm"
    import pydicom

    ds = pydicom.dcmread(victim)
    ds.SeriesDescription = "not what Orthanc has"
    ds.save_as(changed)
    arc.ingest_file(changed, Source("import"))
    arc.close()

    pulled = run(["orthanc", "pull", url(orthanc), "--study", TS_STUDY, "--quiet"], data,
                 TELEPACS_DUPLICATE_POLICY="reject")
    assert pulled.returncode == 1
    assert "stored: 8, skipped (already there): 0, failed: 1 (of 9 instances" in pulled.stdout
    assert f"FAILED {victim_uid}: instance {victim_uid} already stored with different content" in pulled.stderr
    stored = stored_files(data)
    assert stored[victim_uid] == changed.read_bytes()
    assert {uid: stored[uid] for uid in originals[TS_STUDY] if uid != victim_uid} == \
        {uid: b for uid, b in originals[TS_STUDY].items() if uid != victim_uid}


def test_pull_stops_when_orthanc_goes_away_and_resumes(tmp_path):
    arc = Archive.open(make_settings(tmp_path))
    server = OrthancServer(work_dir=tmp_path / "orthanc", http_port=free_port())
    try:
        with server:
            for path in TS_FILES:
                server.request("POST", "/instances", path.read_bytes())
            api = sync.connect(sync.parse_target(server.http_url))
            instances = sync.plan_pull(api, sync.Selection(study_uid=TS_STUDY))
            done = 0

            def stop_after_three(n: int, nbytes: int) -> None:
                nonlocal done
                done += n
                if done == 3:
                    server.stop()  # by its PID; the storage directory stays

            report = sync.pull(arc, api, instances, stop_after_three)
            api.close()
        assert (report.transferred, report.skipped, report.failed) == (3, 0, [])
        assert report.aborted is not None and "is unreachable" in report.aborted
        assert not report.ok

        with server:  # the same Orthanc again, same port and storage
            api = sync.connect(sync.parse_target(server.http_url))
            report = sync.pull(arc, api, instances)
            api.close()
        assert (report.transferred, report.skipped, report.failed, report.aborted) == (6, 3, [], None)
    finally:
        arc.close()
    assert stored_files(tmp_path / "data") == {read_uids(p)[2]: p.read_bytes() for p in TS_FILES}


def test_pull_errors_are_clear(orthanc, tmp_path):
    data = tmp_path / "data"
    nowhere = f"http://127.0.0.1:{free_port()}/"
    result = run(["orthanc", "pull", nowhere], data)
    assert result.returncode == 2
    assert f"Orthanc at {nowhere} is unreachable" in result.stderr

    result = run(["orthanc", "pull", url(orthanc, password="wrong")], data)
    assert result.returncode == 2
    assert "refused the credentials (HTTP 401)" in result.stderr
    assert "wrong" not in result.stderr
    assert not data.exists()  # nothing is created before the Orthanc answers

    result = run(["orthanc", "pull", url(orthanc), "--study", "1.2.3.4.5"], data)
    assert result.returncode == 2
    assert f"Orthanc at {orthanc.http_url}/ has no study 1.2.3.4.5" in result.stderr

    result = run(["orthanc", "pull", url(orthanc), "--since", "2024-02-30"], data)
    assert result.returncode == 2
    assert "not a date: '2024-02-30'" in result.stderr

    result = run(["orthanc", "pull", "ftp://example/"], data)
    assert result.returncode == 2
    assert "not an Orthanc URL: 'ftp://example/'" in result.stderr


# --------------------------------------------------------------------------- push


def test_push_study_then_nothing_more(tmp_path, ct_part10_dir):
    data = tmp_path / "data"
    files = dicom_files(ct_part10_dir)
    study = read_uids(files[0])[0]
    imported = run(["import", "--quiet", str(ct_part10_dir)], data)
    assert imported.returncode == 0, imported.stderr
    with OrthancServer(work_dir=tmp_path / "orthanc", users={USER: PASSWORD}) as server:
        plain = f"http://{server.host}:{server.http_port}"
        pushed = run(["orthanc", "push", plain, "--study", study, "--user", USER], data,
                     TELEPACS_ORTHANC_PASSWORD=PASSWORD)
        assert pushed.returncode == 0, pushed.stderr
        assert "sent: 10, skipped (already there): 0, failed: 0 (of 10 instances" in pushed.stdout
        assert "push: 100%" in pushed.stderr
        assert orthanc_files(server, study) == {read_uids(p)[2]: p.read_bytes() for p in files}

        again = run(["orthanc", "push", url(server), "--study", study, "--quiet"], data)
        assert again.returncode == 0, again.stderr
        assert "sent: 0, skipped (already there): 10, failed: 0 (of 10 instances" in again.stdout

        unknown = run(["orthanc", "push", url(server), "--study", "1.2.3"], data)
        assert unknown.returncode == 2
        assert "study 1.2.3 is not in this archive" in unknown.stderr


def test_interrupted_push_resumes(tmp_path):
    arc = Archive.open(make_settings(tmp_path))
    for path in TS_FILES:
        arc.ingest_file(path, Source("import"))
    with OrthancServer(work_dir=tmp_path / "orthanc") as server:
        api = sync.connect(sync.parse_target(server.http_url))
        try:
            instances = sync.plan_push(arc, TS_STUDY)
            first = sync.push(arc, api, instances[:4])
            assert (first.transferred, first.skipped) == (4, 0)
            report = sync.push(arc, api, instances)
            assert (report.transferred, report.skipped, report.failed) == (5, 4, [])
        finally:
            api.close()
            arc.close()
        assert orthanc_files(server, TS_STUDY) == {read_uids(p)[2]: p.read_bytes() for p in TS_FILES}


# --------------------------------------------------------------------------- parsing


def test_parse_target_keeps_credentials_out_of_the_url():
    target = sync.parse_target("https://ann:p%40ss@pacs.example:8043/orthanc")
    assert target == sync.OrthancTarget("https://pacs.example:8043/orthanc/", "ann", "p@ss")
    assert sync.parse_target("http://a:b@h/", user="u", password="p") == sync.OrthancTarget("http://h/", "u", "p")


def test_selection_query():
    assert sync.Selection(since=sync.parse_since("20240105")).query() == {"StudyDate": "20240105-"}
    assert sync.Selection(study_uid="1.2").query() == {"StudyInstanceUID": "1.2"}
    assert sync.Selection(patient_id="P1").query() == {"PatientID": "P1"}
    assert sync.Selection().query() == {}
