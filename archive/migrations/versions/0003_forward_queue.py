"""forward queue and its scan cursors

Revision ID: 0003_forward_queue
Revises: 0002_query_indexes
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_forward_queue'
down_revision = '0002_query_indexes'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('forward_cursors',
    sa.Column('rule', sa.String(length=200), nullable=False),
    sa.Column('destination', sa.String(length=16), nullable=False),
    sa.Column('last_instance_id', sa.BigInteger(), nullable=False),
    sa.Column('last_replacement_id', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('rule')
    )
    op.create_table('forward_queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=16), nullable=False),
    sa.Column('rule', sa.String(length=200), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('origin_id', sa.BigInteger(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('rejections', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.String(length=512), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('destination', 'origin', 'origin_id', 'sop_instance_uid', name='uq_forward_queue_origin')
    )
    with op.batch_alter_table('forward_queue', schema=None) as batch_op:
        batch_op.create_index('ix_forward_queue_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_forward_queue_destination_state', ['destination', 'state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('forward_queue', schema=None) as batch_op:
        batch_op.drop_index('ix_forward_queue_destination_state')
        batch_op.drop_index('ix_forward_queue_due')
    op.drop_table('forward_queue')
    op.drop_table('forward_cursors')
