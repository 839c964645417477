"""flood records, and an index to count a sender's recent mail

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "floods",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=10), nullable=False),
        sa.Column("key", sa.String(length=320), nullable=False),
        sa.Column("started_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("last_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("warning_pk", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["warning_pk"],
            ["messages.id"],
            name=op.f("fk_floods_warning_pk_messages"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_floods")),
    )
    op.create_index("ix_floods_scope_key", "floods", ["scope", "key"])
    op.create_index(
        "ix_messages_sender_received", "messages", ["sender", "received_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_messages_sender_received", table_name="messages")
    op.drop_index("ix_floods_scope_key", table_name="floods")
    op.drop_table("floods")
