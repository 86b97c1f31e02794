"""office attachment allowances

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('office_allowances',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.Integer(), nullable=False),
    sa.Column('extension', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=320), nullable=False),
    sa.ForeignKeyConstraint(['member_id'], ['accounts.id'], name=op.f('fk_office_allowances_member_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_office_allowances')),
    sa.UniqueConstraint('member_id', 'extension', name=op.f('uq_office_allowances_member_id'))
    )
    with op.batch_alter_table('office_allowances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_office_allowances_member_id'), ['member_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('office_allowances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_office_allowances_member_id'))

    op.drop_table('office_allowances')
