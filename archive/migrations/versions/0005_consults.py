"""consults: requests, questions, participants, attached studies, messages with pinned images,
signed conclusions (immutable: triggers refuse UPDATE and DELETE), decisions/outcomes, review evidence, read markers

Revision ID: 0005_consults
Revises: 0004_people_audit
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = '0005_consults'
down_revision = '0004_people_audit'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('consults',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('clinical_summary', sa.Text(), nullable=False),
    sa.Column('patient_informed', sa.Boolean(), nullable=False),
    sa.Column('urgency', sa.String(length=16), nullable=False),
    sa.Column('specialty', sa.String(length=64), nullable=False),
    sa.Column('requester_fk', sa.Integer(), nullable=False),
    sa.Column('requester_facility_fk', sa.Integer(), nullable=False),
    sa.Column('hub_facility_fk', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('decline_reason', sa.Text(), nullable=False),
    sa.Column('observers_allowed', sa.Boolean(), nullable=False),
    sa.Column('deidentify_for_observers', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['hub_facility_fk'], ['facilities.id'], ),
    sa.ForeignKeyConstraint(['requester_facility_fk'], ['facilities.id'], ),
    sa.ForeignKeyConstraint(['requester_fk'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consults', schema=None) as batch_op:
        batch_op.create_index('ix_consults_hub_state', ['hub_facility_fk', 'state'], unique=False)
        batch_op.create_index(batch_op.f('ix_consults_requester_facility_fk'), ['requester_facility_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_consults_requester_fk'), ['requester_fk'], unique=False)
        batch_op.create_index('ix_consults_state_due', ['state', 'due_at'], unique=False)

    op.create_table('consult_conclusions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('amends_fk', sa.Integer(), nullable=True),
    sa.Column('amendment_reason', sa.Text(), nullable=False),
    sa.Column('answers', sa.JSON(), nullable=False),
    sa.Column('findings', sa.Text(), nullable=False),
    sa.Column('impression', sa.Text(), nullable=False),
    sa.Column('recommendation', sa.Text(), nullable=False),
    sa.Column('transfer_recommended', sa.Boolean(), nullable=False),
    sa.Column('transfer_to', sa.String(length=256), nullable=False),
    sa.Column('signed_by_fk', sa.Integer(), nullable=False),
    sa.Column('signed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('signer_name', sa.String(length=256), nullable=False),
    sa.Column('signer_certificate_number', sa.String(length=64), nullable=False),
    sa.Column('signer_certificate_scope', sa.String(length=256), nullable=False),
    sa.Column('signer_facility', sa.String(length=256), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['amends_fk'], ['consult_conclusions.id'], ),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['signed_by_fk'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('consult_fk', 'version', name='uq_consult_conclusions_version')
    )
    with op.batch_alter_table('consult_conclusions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consult_conclusions_consult_fk'), ['consult_fk'], unique=False)

    op.create_table('consult_followups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('follows_advice', sa.Boolean(), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('recorded_by_fk', sa.Integer(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['recorded_by_fk'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consult_followups', schema=None) as batch_op:
        batch_op.create_index('ix_consult_followups_consult', ['consult_fk', 'kind'], unique=False)

    op.create_table('consult_messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('author_fk', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('pin_study_uid', sa.String(length=64), nullable=True),
    sa.Column('pin_series_uid', sa.String(length=64), nullable=True),
    sa.Column('pin_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('pin_frame', sa.Integer(), nullable=True),
    sa.Column('pin_viewport', sa.JSON(), nullable=True),
    sa.Column('pin_annotations', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['author_fk'], ['users.id'], ),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consult_messages', schema=None) as batch_op:
        batch_op.create_index('ix_consult_messages_consult', ['consult_fk', 'id'], unique=False)

    op.create_table('consult_participants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('user_fk', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_fk'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('consult_fk', 'user_fk', name='uq_consult_participants_user')
    )
    with op.batch_alter_table('consult_participants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consult_participants_user_fk'), ['user_fk'], unique=False)

    op.create_table('consult_questions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('consult_fk', 'position', name='uq_consult_questions_position')
    )
    op.create_table('consult_read_markers',
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('user_fk', sa.Integer(), nullable=False),
    sa.Column('last_message_id', sa.Integer(), nullable=False),
    sa.Column('read_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_fk'], ['users.id'], ),
    sa.PrimaryKeyConstraint('consult_fk', 'user_fk')
    )
    op.create_table('consult_studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('attached_by_fk', sa.Integer(), nullable=False),
    sa.Column('attached_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['attached_by_fk'], ['users.id'], ),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('consult_fk', 'study_uid', name='uq_consult_studies_study')
    )
    with op.batch_alter_table('consult_studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consult_studies_study_uid'), ['study_uid'], unique=False)

    op.create_table('review_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('user_fk', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_uid', sa.String(length=64), nullable=False),
    sa.Column('frame', sa.Integer(), nullable=False),
    sa.Column('window_center', sa.Float(), nullable=True),
    sa.Column('window_width', sa.Float(), nullable=True),
    sa.Column('quality', sa.String(length=8), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['consult_fk'], ['consults.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['user_fk'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('review_events', schema=None) as batch_op:
        batch_op.create_index('ix_review_events_consult_user', ['consult_fk', 'user_fk', 'started_at'], unique=False)

    _create_immutability_triggers()



def downgrade() -> None:
    _drop_immutability_triggers()
    with op.batch_alter_table('review_events', schema=None) as batch_op:
        batch_op.drop_index('ix_review_events_consult_user')

    op.drop_table('review_events')
    with op.batch_alter_table('consult_studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consult_studies_study_uid'))

    op.drop_table('consult_studies')
    op.drop_table('consult_read_markers')
    op.drop_table('consult_questions')
    with op.batch_alter_table('consult_participants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consult_participants_user_fk'))

    op.drop_table('consult_participants')
    with op.batch_alter_table('consult_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_consult_messages_consult')

    op.drop_table('consult_messages')
    with op.batch_alter_table('consult_followups', schema=None) as batch_op:
        batch_op.drop_index('ix_consult_followups_consult')

    op.drop_table('consult_followups')
    with op.batch_alter_table('consult_conclusions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consult_conclusions_consult_fk'))

    op.drop_table('consult_conclusions')
    with op.batch_alter_table('consults', schema=None) as batch_op:
        batch_op.drop_index('ix_consults_state_due')
        batch_op.drop_index(batch_op.f('ix_consults_requester_fk'))
        batch_op.drop_index(batch_op.f('ix_consults_requester_facility_fk'))
        batch_op.drop_index('ix_consults_hub_state')

    op.drop_table('consults')


# A signed conclusion never changes and an attached study is never detached: the database refuses it,
# whatever code (or person at a SQL prompt) tries.
_GUARDED = (("consult_conclusions", "UPDATE OR DELETE", "a signed conclusion is immutable"),
            ("consult_studies", "DELETE", "a study attached to a consult cannot be detached"))


def _create_immutability_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, events, message in _GUARDED:
            op.execute(f"CREATE FUNCTION {table}_immutable() RETURNS trigger LANGUAGE plpgsql AS $$ "
                       f"BEGIN RAISE EXCEPTION '{message}'; END $$")
            op.execute(f"CREATE TRIGGER {table}_immutable BEFORE {events} ON {table} "
                       f"FOR EACH ROW EXECUTE FUNCTION {table}_immutable()")
    else:
        for table, events, message in _GUARDED:
            for event in events.split(" OR "):
                op.execute(f"CREATE TRIGGER {table}_no_{event.lower()} BEFORE {event} ON {table} "
                           f"BEGIN SELECT RAISE(ABORT, '{message}'); END")


def _drop_immutability_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, _, _ in _GUARDED:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_immutable()")
    else:
        for table, events, _ in _GUARDED:
            for event in events.split(" OR "):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{event.lower()}")
