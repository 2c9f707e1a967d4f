"""query indexes: modality per study, prefix search on patient names in PostgreSQL

Revision ID: 0002_query_indexes
Revises: 0001
Create Date: 2026-11-22

- ``ix_series_study_modality`` (series.study_fk, series.modality): the
  ModalitiesInStudy test (``EXISTS`` on the study's series) is one index probe
  per candidate study instead of reading every series of a modality.
- PostgreSQL only: ``varchar_pattern_ops`` indexes on patients.patient_name_folded
  and patients.patient_name. Under any collation other than "C" a plain
  b-tree cannot serve ``LIKE 'nguyen%'``; these can. (SQLite's ``GLOB``
  prefix uses the existing indexes: the columns have BINARY collation.)
"""
from alembic import op


revision = '0002_query_indexes'
down_revision = '0001'
branch_labels = None
depends_on = None

_PATTERN_INDEXES = {
    'ix_patients_name_folded_pattern': 'patient_name_folded',
    'ix_patients_name_pattern': 'patient_name',
}


def upgrade() -> None:
    op.create_index('ix_series_study_modality', 'series', ['study_fk', 'modality'], unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        for name, column in _PATTERN_INDEXES.items():
            op.create_index(name, 'patients', [column], unique=False,
                            postgresql_ops={column: 'varchar_pattern_ops'})


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        for name in _PATTERN_INDEXES:
            op.drop_index(name, table_name='patients')
    op.drop_index('ix_series_study_modality', table_name='series')
