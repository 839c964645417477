"""Flood limits: a sender or a ticket past its limit is held back.

Past ``[limits] per_sender`` messages from one address, or ``per_ticket`` on
one ticket, within ``window_minutes``, a message is still stored but opens
no ticket, changes none and triggers no mail; the owner is warned once per
flood. A flood lasts while messages keep coming over the limit; a whole
quiet window ends it.

The count is one query on the store, served by indexes on (sender,
received_at) and (ticket_id, ...), rather than a window kept in memory: it
is right when several daemons share one database, survives a restart, and
costs one index range read per message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)

from intake.config import LimitSettings
from store.models import Base, Flood
from store.tables import messages

log = logging.getLogger(__name__)

_floods: Table = Base.metadata.tables[Flood.__tablename__]

# Built once; see the note in intake.accept. A ticket id of None matches no
# row, so a message for a new ticket counts its sender alone.
RECENT = select(
    func.count().filter(messages.c.sender == bindparam("sender")),
    func.count().filter(messages.c.ticket_id == bindparam("ticket_id")),
).where(
    messages.c.direction == "in",
    messages.c.received_at >= bindparam("since"),
    or_(
        messages.c.sender == bindparam("sender"),
        messages.c.ticket_id == bindparam("ticket_id"),
    ),
)
LAST_FLOOD = (
    select(_floods.c.id, _floods.c.last_at)
    .where(_floods.c.scope == bindparam("scope"), _floods.c.key == bindparam("key"))
    .order_by(_floods.c.id.desc())
    .limit(1)
)
GOES_ON = (
    update(_floods)
    .where(_floods.c.id == bindparam("flood_id"))
    .values(last_at=bindparam("now"), messages=_floods.c.messages + 1)
)
STARTS = insert(_floods).returning(_floods.c.id)
WARNED = (
    update(_floods)
    .where(_floods.c.id == bindparam("flood_id"))
    .values(warning_pk=bindparam("message_pk"))
)


@dataclass(frozen=True, slots=True)
class Over:
    """A limit a message went past: whose, and how many came before it."""

    scope: str  # sender | ticket
    key: str  # the address, or the ticket id
    count: int
    limit: int


class FloodGate:
    def __init__(self, limits: LimitSettings) -> None:
        self.limits = limits
        self.window = timedelta(minutes=limits.window_minutes)

    def over(
        self,
        connection: Connection,
        sender: str,
        ticket_id: int | None,
        now: datetime,
    ) -> Over | None:
        """The limit this message, not yet stored, goes past; None if none."""
        by_sender, on_ticket = connection.execute(
            RECENT,
            {"sender": sender, "ticket_id": ticket_id, "since": now - self.window},
        ).one()
        if by_sender >= self.limits.per_sender:
            return Over("sender", sender, by_sender, self.limits.per_sender)
        if ticket_id is not None and on_ticket >= self.limits.per_ticket:
            return Over("ticket", str(ticket_id), on_ticket, self.limits.per_ticket)

        return None

    def record(self, connection: Connection, over: Over, now: datetime) -> int | None:
        """Count the message in its flood; the id of a flood that starts now
        (the owner is to be warned), None when it goes on."""
        last = connection.execute(
            LAST_FLOOD, {"scope": over.scope, "key": over.key}
        ).first()
        if last is not None and now - last.last_at < self.window:
            connection.execute(GOES_ON, {"flood_id": last.id, "now": now})
            return None

        flood_id = connection.execute(
            STARTS,
            {
                "scope": over.scope,
                "key": over.key,
                "started_at": now,
                "last_at": now,
                "messages": 1,
            },
        ).scalar_one()
        log.warning(
            "flood: %s %s sent more than %d messages in %s; holding back",
            over.scope,
            over.key,
            over.limit,
            self.window,
        )

        return int(flood_id)

    def warned(self, connection: Connection, flood_id: int, message_pk: int) -> None:
        connection.execute(WARNED, {"flood_id": flood_id, "message_pk": message_pk})
