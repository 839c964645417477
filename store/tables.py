"""The models' tables, typed as ``Table``, for SQL expressions on hot paths.

The ORM's unit of work costs far more per row than an INSERT statement; the
message path writes through these instead.
"""

from __future__ import annotations

from sqlalchemy import Table

from store.models import Base


def _table(name: str) -> Table:
    return Base.metadata.tables[name]


attachments = _table("attachments")
contacts = _table("contact_points")
counters = _table("counters")
customers = _table("customers")
events = _table("events")
messages = _table("messages")
outbox = _table("outbox")
participants = _table("participants")
quarantine = _table("quarantine")
source_keys = _table("source_keys")
tickets = _table("tickets")
