"""The threading ladder: which ticket does a message belong to?

First match wins, and nothing fuzzy is ever tried:
1. In-Reply-To / References naming a Message-ID we stored, in or out.
3. A subject token ``[#1234]``, only from a participant of that ticket; from
   anyone else it starts a new ticket linked to the quoted one.
5. Otherwise a new ticket.
(Steps 2, the signed reply address, and 4, the phone number, belong to the
channels that carry them.)
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, bindparam, select

from intake.domain import Inbound
from intake.tickets import REF_COLUMNS, Found, TicketRef, by_number, is_participant
from store.tables import messages, tickets

# Known Message-IDs with their tickets, one query for the whole first rung.
KNOWN_IDS = (
    select(messages.c.message_id, *REF_COLUMNS)
    .select_from(messages.outerjoin(tickets, tickets.c.id == messages.c.ticket_id))
    .where(messages.c.message_id.in_(bindparam("ids", expanding=True)))
)


class Ladder:
    def __init__(self, subject_prefix: str) -> None:
        self.token = re.compile(r"\[" + re.escape(subject_prefix) + r"(\d{1,12})\]")

    def find(self, connection: Connection, inbound: Inbound) -> tuple[Found, bool]:
        """Where ``inbound`` belongs, and whether its own Message-ID was
        seen before (some senders reuse them; the message is still new)."""
        ticket, reused = self.by_headers(connection, inbound)
        if ticket is not None:
            return Found(ticket, "headers"), reused

        quoted = self.by_subject_token(connection, inbound.subject)
        if quoted is None:
            return Found(None, "new"), reused
        sender = inbound.sender.email if inbound.sender else ""
        if sender and is_participant(connection, quoted, sender):
            return Found(quoted, "subject-token"), reused

        # A stranger quoting someone's ticket number must not read or write
        # that ticket; the new ticket points at it for the agents.
        return Found(None, "new", linked=quoted), reused

    def by_headers(
        self, connection: Connection, inbound: Inbound
    ) -> tuple[TicketRef | None, bool]:
        """The ticket of the nearest ancestor we know (RFC 5322 §3.6.4).

        In-Reply-To names the parent; References lists ancestors oldest
        first, so it is read from the end. The same query tells whether the
        message's own Message-ID is known already.
        """
        wanted = [*inbound.in_reply_to, *reversed(inbound.references)]
        own = inbound.message_id
        if not wanted and own is None:
            return None, False

        asked = set(wanted) | ({own} if own else set())
        rows = connection.execute(KNOWN_IDS, {"ids": sorted(asked)}).all()
        reused = any(row[0] == own for row in rows)
        ticket_of = {row[0]: TicketRef(*row[1:]) for row in rows if row[1] is not None}
        for message_id in wanted:
            if message_id in ticket_of:
                return ticket_of[message_id], reused

        return None, reused

    def by_subject_token(
        self, connection: Connection, subject: str
    ) -> TicketRef | None:
        match = self.token.search(subject)
        if match is None:
            return None

        return by_number(connection, int(match[1]))
