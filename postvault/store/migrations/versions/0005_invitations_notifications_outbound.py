"""invitation escrow, notification preferences, outbound queue

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbound_queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('account', sa.String(length=320), nullable=True),
    sa.Column('mail_from', sa.String(length=320), nullable=False),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('give_up_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbound_queue'))
    )
    with op.batch_alter_table('outbound_queue', schema=None) as batch_op:
        batch_op.create_index('ix_outbound_queue_state_next', ['state', 'next_attempt_at'], unique=False)

    op.create_table('invitation_escrow',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('colleague_id', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.Integer(), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['colleague_id'], ['accounts.id'], name=op.f('fk_invitation_escrow_colleague_id_accounts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['member_id'], ['accounts.id'], name=op.f('fk_invitation_escrow_member_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invitation_escrow')),
    sa.UniqueConstraint('colleague_id', 'member_id', name=op.f('uq_invitation_escrow_colleague_id'))
    )
    with op.batch_alter_table('invitation_escrow', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invitation_escrow_colleague_id'), ['colleague_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_invitation_escrow_member_id'), ['member_id'], unique=False)

    op.create_table('notification_prefs',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('interval_minutes', sa.Integer(), nullable=False),
    sa.Column('last_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('held_since', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_notification_prefs_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_notification_prefs'))
    )
    with op.batch_alter_table('notification_prefs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_notification_prefs_held_since'), ['held_since'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('notification_prefs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_notification_prefs_held_since'))

    op.drop_table('notification_prefs')
    with op.batch_alter_table('invitation_escrow', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_invitation_escrow_member_id'))
        batch_op.drop_index(batch_op.f('ix_invitation_escrow_colleague_id'))

    op.drop_table('invitation_escrow')
    with op.batch_alter_table('outbound_queue', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_queue_state_next')

    op.drop_table('outbound_queue')
