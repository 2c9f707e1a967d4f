"""The indexes of migration 0002 serve the typical study-level C-FIND queries, on SQLite and PostgreSQL.

The plans are asked of the real databases (``EXPLAIN``) after the
benchmark's bulk loader has put 2,000 studies (20,000 instances) in the index
and ANALYZE has run, so the planners choose with realistic statistics.
Latencies at a million instances are measured by ``scripts/bench_query.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import select

from archive.matching import Level, MatchKey, build_query
from archive.models import Patient, Study
from archive.query import find
from archive.service import Archive
from helpers import REPO


def _bench_query() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_query", REPO / "scripts" / "bench_query.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_query", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def loaded(archive: Archive, db_url: str) -> Archive:
    cat = _bench_query().load_catalogue(db_url, studies=2_000, instances=20_000, seed=7)
    assert cat.instances == 20_000
    return archive


def _plan(archive: Archive, keys: dict[str, str]) -> str:
    engine = archive.index.engine
    stmt = build_query(Level.STUDY, [MatchKey(k, v, fuzzy=True if k == "PatientName" else None)
                                     for k, v in keys.items()])
    sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows: Any = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)
            return "\n".join(str(row[-1]) for row in rows)
        return "\n".join(str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + sql))


def test_modalities_in_study_is_an_index_probe_per_study(loaded: Archive) -> None:
    plan = _plan(loaded, {"ModalitiesInStudy": "CT", "StudyDate": "20240105"})
    assert "ix_series_study_modality" in plan, plan
    assert "ix_studies_date_time" in plan, plan


def test_folded_name_prefix_uses_an_index(loaded: Archive) -> None:
    plan = _plan(loaded, {"PatientName": "Nguyễn^Văn Hù*"})
    expected = ("ix_patients_patient_name_folded" if loaded.index.engine.dialect.name == "sqlite"
                else "ix_patients_name_folded_pattern")
    assert expected in plan, plan


def test_postgresql_sessions_cost_random_reads_as_on_ssd_and_plan_cursors_for_all_rows(archive: Archive) -> None:
    """Every telepacs session on PostgreSQL plans with random_page_cost 1.1 and plans cursors for
    their whole answer (archive.db), including the per-thread lookup connections; SQLite has no such
    settings."""
    from archive.db import POSTGRES_RANDOM_PAGE_COST

    engine = archive.index.engine
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL planner setting")
    with engine.connect() as conn:
        assert float(conn.exec_driver_sql("SHOW random_page_cost").scalar_one()) == POSTGRES_RANDOM_PAGE_COST
        assert float(conn.exec_driver_sql("SHOW cursor_tuple_fraction").scalar_one()) == 1.0
    reader = archive.index._readers._connection()
    assert float(reader.execute("SHOW random_page_cost").fetchone()[0]) == POSTGRES_RANDOM_PAGE_COST
    assert float(reader.execute("SHOW cursor_tuple_fraction").fetchone()[0]) == 1.0


def test_pattern_indexes_exist_only_on_postgresql(archive: Archive) -> None:
    engine = archive.index.engine
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            names = {row[0] for row in conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'patients'")}
        else:
            names = {row[0] for row in conn.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'patients'")}
    assert ("ix_patients_name_folded_pattern" in names) is (engine.dialect.name == "postgresql"), names


def test_a_family_name_prefix_does_not_drive_a_dated_query(loaded: Archive) -> None:
    """``TRAN*`` matches a tenth of the patients: a month of study dates is the way in."""
    plan = _plan(loaded, {"PatientName": "TRAN*", "StudyDate": "20200101-20200131"})
    assert "ix_studies_date_time" in plan, plan
    assert "ix_patients_patient_name_folded" not in plan, plan


def test_family_name_prefix_still_matches_alone(loaded: Archive) -> None:
    """The planner hint changes the plan only: a family prefix alone finds what a full scan would."""
    rows = list(find(loaded.index, Level.STUDY, [MatchKey("PatientName", "TRAN*", fuzzy=True),
                                                 MatchKey("StudyInstanceUID", "")]))
    with loaded.index.session() as session:
        expected = session.scalars(select(Study.study_uid).join(Patient, Study.patient_fk == Patient.id)
                                   .where(Patient.patient_name_folded.startswith("tran"))).all()
    assert expected and sorted(str(r["StudyInstanceUID"]) for r in rows) == sorted(expected)


def test_parents_are_joined_once_and_only_when_needed(loaded: Archive) -> None:
    """A PatientName key joins patients once: the returned patient columns come from that join (no
    second, unfiltered join); a query that neither matches nor returns a patient attribute does not
    join patients at all."""
    from archive.query import select_matches

    engine = loaded.index.engine
    for level, keys, returned, joins in [
        (Level.STUDY, [MatchKey("PatientName", "Nguyễn^Văn*", fuzzy=True)], ["PatientName", "StudyInstanceUID"], 1),
        (Level.IMAGE, [MatchKey("PatientID", "P00000001"), MatchKey("Modality", "CT")],
         ["PatientID", "Modality", "SOPInstanceUID"], 1),
        (Level.STUDY, [MatchKey("StudyDate", "20200101")], ["PatientName", "StudyDate"], 1),
        (Level.STUDY, [MatchKey("StudyDate", "20200101")], ["StudyDate", "StudyInstanceUID"], 0),
        (Level.IMAGE, [MatchKey("SeriesInstanceUID", "1.2.3")], ["SOPInstanceUID", "StudyInstanceUID"], 0),
    ]:
        sql = str(select_matches(level, keys, returned).compile(engine))
        assert sql.count("JOIN patients") == joins, sql
    rows = list(find(loaded.index, Level.IMAGE, [MatchKey("PatientName", "NGUYEN*", fuzzy=True),
                                                 MatchKey("SOPInstanceUID", "")]))
    assert rows and all(str(r["PatientName"]).startswith("Nguyễn") for r in rows)
