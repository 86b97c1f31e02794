"""auth failures

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('auth_failures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account', sa.String(length=320), nullable=False),
    sa.Column('client_ip', sa.String(length=64), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auth_failures'))
    )
    with op.batch_alter_table('auth_failures', schema=None) as batch_op:
        batch_op.create_index('ix_auth_failures_account_at', ['account', 'at'], unique=False)
        batch_op.create_index('ix_auth_failures_ip_at', ['client_ip', 'at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('auth_failures', schema=None) as batch_op:
        batch_op.drop_index('ix_auth_failures_ip_at')
        batch_op.drop_index('ix_auth_failures_account_at')

    op.drop_table('auth_failures')
