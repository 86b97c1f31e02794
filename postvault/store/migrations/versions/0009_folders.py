"""accounts.last_uidvalidity: folders can be deleted and renamed

Revision ID: 0009_folders
Revises: 0008_escrow
"""

from alembic import op
import sqlalchemy as sa


revision = '0009_folders'
down_revision = '0008_escrow'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_uidvalidity', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_column('last_uidvalidity')
