"""scheduled sends done once, resolution surveys, an index for the digest

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("due_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("ran_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("message_pk", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_pk"],
            ["messages.id"],
            name=op.f("fk_schedule_runs_message_pk_messages"),
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"],
            ["tickets.id"],
            name=op.f("fk_schedule_runs_ticket_id_tickets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule_runs")),
        sa.UniqueConstraint("kind", "key", name=op.f("uq_schedule_runs_kind")),
    )
    op.create_index(op.f("ix_schedule_runs_ticket_id"), "schedule_runs", ["ticket_id"])
    op.create_table(
        "surveys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("scale", sa.String(length=10), nullable=False),
        sa.Column("asked_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("message_pk", sa.Integer(), nullable=True),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("answered_at", store.models.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_pk"],
            ["messages.id"],
            name=op.f("fk_surveys_message_pk_messages"),
        ),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["tickets.id"], name=op.f("fk_surveys_ticket_id_tickets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_surveys")),
        sa.UniqueConstraint("ticket_id", name=op.f("uq_surveys_ticket_id")),
    )

    op.create_index(
        "ix_messages_ticket_kind",
        "messages",
        ["ticket_id", "direction", "kind", "author", "status", "received_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_messages_ticket_kind", table_name="messages")
    op.drop_table("surveys")
    op.drop_index(op.f("ix_schedule_runs_ticket_id"), table_name="schedule_runs")
    op.drop_table("schedule_runs")
