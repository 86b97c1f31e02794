"""recovery escrow and emergency grants

Revision ID: 0008_escrow
Revises: 0007_audit
"""

from alembic import op
import sqlalchemy as sa


revision = '0008_escrow'
down_revision = '0007_audit'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('emergency_grants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('grant_id', sa.String(length=32), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('person', sa.String(length=200), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_by', sa.String(length=320), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('wrapped_private_key', sa.LargeBinary(length=128), nullable=True),
    sa.Column('kdf_params', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_emergency_grants_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_emergency_grants')),
    sa.UniqueConstraint('grant_id', name=op.f('uq_emergency_grants_grant_id'))
    )
    with op.batch_alter_table('emergency_grants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_emergency_grants_account_id'), ['account_id'], unique=False)

    op.create_table('recovery_escrow',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('public_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('recipients', sa.Text(), nullable=False),
    sa.Column('blob', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_recovery_escrow_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_recovery_escrow'))
    )


def downgrade() -> None:
    op.drop_table('recovery_escrow')
    with op.batch_alter_table('emergency_grants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_emergency_grants_account_id'))

    op.drop_table('emergency_grants')
