"""mailbox cursors and daily tallies for the IMAP channel

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_cursors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox", sa.String(length=100), nullable=False),
        sa.Column("folder", sa.String(length=1000), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("seen_uid", sa.BigInteger(), nullable=False),
        sa.Column("backlog_uid", sa.BigInteger(), nullable=False),
        sa.Column("last_poll_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("last_ok_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailbox_cursors")),
        sa.UniqueConstraint("mailbox", name=op.f("uq_mailbox_cursors_mailbox")),
    )
    op.create_table(
        "mailbox_tallies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mailbox", sa.String(length=100), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("on_server", sa.Integer(), nullable=False),
        sa.Column("imported", sa.Integer(), nullable=False),
        sa.Column("waiting", sa.Integer(), nullable=False),
        sa.Column("checked_at", store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailbox_tallies")),
        sa.UniqueConstraint("mailbox", "day", name=op.f("uq_mailbox_tallies_mailbox")),
    )


def downgrade() -> None:
    op.drop_table("mailbox_tallies")
    op.drop_table("mailbox_cursors")
