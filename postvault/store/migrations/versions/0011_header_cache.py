"""message_copies.sealed_header: the sealed header cache entry of a copy

Revision ID: 0011_header_cache
Revises: 0010_search_index
"""

from alembic import op
import sqlalchemy as sa


revision = '0011_header_cache'
down_revision = '0010_search_index'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column, as 0010's: ALTER TABLE ADD COLUMN on both SQLite
    # and PostgreSQL (no table rebuild); entries are filled lazily by FETCH.
    with op.batch_alter_table('message_copies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sealed_header', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('message_copies', schema=None) as batch_op:
        batch_op.drop_column('sealed_header')
