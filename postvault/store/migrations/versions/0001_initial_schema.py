"""initial schema

Revision ID: 0001
Revises: (none)
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key_owner', sa.String(length=32), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('practice_name', sa.String(length=200), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('mailbox_name', sa.String(length=200), nullable=False),
    sa.Column('notify_enabled', sa.Boolean(), nullable=False),
    sa.Column('notify_email', sa.String(length=320), nullable=True),
    sa.Column('password_hash', sa.LargeBinary(length=128), nullable=True),
    sa.Column('public_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('wrapped_private_key', sa.LargeBinary(length=128), nullable=False),
    sa.Column('kdf_params', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('email', name=op.f('uq_accounts_email')),
    sa.UniqueConstraint('key_owner', name=op.f('uq_accounts_key_owner'))
    )
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('actor', sa.String(length=320), nullable=False),
    sa.Column('account', sa.String(length=320), nullable=True),
    sa.Column('message', sa.String(length=32), nullable=True),
    sa.Column('client_ip', sa.String(length=64), nullable=True),
    sa.Column('protocol', sa.String(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.LargeBinary(length=32), nullable=False),
    sa.Column('hash', sa.LargeBinary(length=32), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_account'), ['account'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_at'), ['at'], unique=False)

    op.create_table('blob_chunks',
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('blob_id', 'seq', name=op.f('pk_blob_chunks'))
    )
    op.create_table('server_secrets',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.LargeBinary(length=64), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_server_secrets'))
    )
    op.create_table('threads',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_threads'))
    )
    op.create_table('address_book',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.Integer(), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('practice', sa.String(length=200), nullable=False),
    sa.Column('extra', sa.Text(), nullable=False),
    sa.Column('colleague_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['colleague_id'], ['accounts.id'], name=op.f('fk_address_book_colleague_id_accounts'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['member_id'], ['accounts.id'], name=op.f('fk_address_book_member_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_address_book')),
    sa.UniqueConstraint('member_id', 'email', name=op.f('uq_address_book_member_id'))
    )
    with op.batch_alter_table('address_book', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_address_book_colleague_id'), ['colleague_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_address_book_member_id'), ['member_id'], unique=False)

    op.create_table('invitations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('colleague_id', sa.Integer(), nullable=False),
    sa.Column('member_id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.LargeBinary(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['colleague_id'], ['accounts.id'], name=op.f('fk_invitations_colleague_id_accounts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['member_id'], ['accounts.id'], name=op.f('fk_invitations_member_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invitations')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_invitations_token_hash'))
    )
    with op.batch_alter_table('invitations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invitations_colleague_id'), ['colleague_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_invitations_member_id'), ['member_id'], unique=False)

    op.create_table('mailboxes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('special_use', sa.String(length=16), nullable=True),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('uidnext', sa.BigInteger(), nullable=False),
    sa.Column('highestmodseq', sa.BigInteger(), nullable=False),
    sa.Column('subscribed', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_mailboxes_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mailboxes')),
    sa.UniqueConstraint('account_id', 'name', name=op.f('uq_mailboxes_account_id'))
    )
    with op.batch_alter_table('mailboxes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mailboxes_account_id'), ['account_id'], unique=False)

    op.create_table('messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=32), nullable=False),
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('mid_hash', sa.LargeBinary(length=32), nullable=True),
    sa.Column('thread_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['thread_id'], ['threads.id'], name=op.f('fk_messages_thread_id_threads')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('public_id', name=op.f('uq_messages_public_id'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_blob_id'), ['blob_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_mid_hash'), ['mid_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_thread_id'), ['thread_id'], unique=False)

    op.create_table('thread_participants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('thread_id', sa.Integer(), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.ForeignKeyConstraint(['thread_id'], ['threads.id'], name=op.f('fk_thread_participants_thread_id_threads'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_thread_participants')),
    sa.UniqueConstraint('thread_id', 'email', name=op.f('uq_thread_participants_thread_id'))
    )
    with op.batch_alter_table('thread_participants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_thread_participants_thread_id'), ['thread_id'], unique=False)

    op.create_table('message_copies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=False),
    sa.Column('flags', sa.Text(), nullable=False),
    sa.Column('internal_date', sa.DateTime(timezone=True), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('modseq', sa.BigInteger(), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(length=128), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_message_copies_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_message_copies_message_id_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message_copies')),
    sa.UniqueConstraint('mailbox_id', 'uid', name=op.f('uq_message_copies_mailbox_id'))
    )
    with op.batch_alter_table('message_copies', schema=None) as batch_op:
        batch_op.create_index('ix_message_copies_mailbox_modseq', ['mailbox_id', 'modseq'], unique=False)
        batch_op.create_index(batch_op.f('ix_message_copies_message_id'), ['message_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('message_copies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_message_copies_message_id'))
        batch_op.drop_index('ix_message_copies_mailbox_modseq')

    op.drop_table('message_copies')
    with op.batch_alter_table('thread_participants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_thread_participants_thread_id'))

    op.drop_table('thread_participants')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_thread_id'))
        batch_op.drop_index(batch_op.f('ix_messages_mid_hash'))
        batch_op.drop_index(batch_op.f('ix_messages_blob_id'))

    op.drop_table('messages')
    with op.batch_alter_table('mailboxes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mailboxes_account_id'))

    op.drop_table('mailboxes')
    with op.batch_alter_table('invitations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_invitations_member_id'))
        batch_op.drop_index(batch_op.f('ix_invitations_colleague_id'))

    op.drop_table('invitations')
    with op.batch_alter_table('address_book', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_address_book_member_id'))
        batch_op.drop_index(batch_op.f('ix_address_book_colleague_id'))

    op.drop_table('address_book')
    op.drop_table('threads')
    op.drop_table('server_secrets')
    op.drop_table('blob_chunks')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_at'))
        batch_op.drop_index(batch_op.f('ix_audit_events_account'))

    op.drop_table('audit_events')
    op.drop_table('accounts')
