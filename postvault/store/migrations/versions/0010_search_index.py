"""message_copies.sealed_search: the sealed SEARCH index entry of a copy

Revision ID: 0010_search_index
Revises: 0009_folders
"""

from alembic import op
import sqlalchemy as sa


revision = '0010_search_index'
down_revision = '0009_folders'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: ALTER TABLE ADD COLUMN on both SQLite and
    # PostgreSQL (no table rebuild); entries are filled lazily by SEARCH.
    with op.batch_alter_table('message_copies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sealed_search', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('message_copies', schema=None) as batch_op:
        batch_op.drop_column('sealed_search')
