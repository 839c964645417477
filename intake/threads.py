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

from sqlalchemy import select
from sqlalchemy.orm import Session

from intake.domain import Inbound
from intake.tickets import Found, is_participant
from store.models import Message, Ticket


class Ladder:
    def __init__(self, subject_prefix: str) -> None:
        self.token = re.compile(r"\[" + re.escape(subject_prefix) + r"(\d{1,12})\]")

    def find(self, session: Session, inbound: Inbound) -> Found:
        ticket = self.by_headers(session, inbound)
        if ticket is not None:
            return Found(ticket, "headers")

        quoted = self.by_subject_token(session, inbound.subject)
        if quoted is None:
            return Found(None, "new")
        sender = inbound.sender.email if inbound.sender else ""
        if sender and is_participant(session, quoted, sender):
            return Found(quoted, "subject-token")

        # A stranger quoting someone's ticket number must not read or write
        # that ticket; the new ticket points at it for the agents.
        return Found(None, "new", linked=quoted)

    def by_headers(self, session: Session, inbound: Inbound) -> Ticket | None:
        """The ticket of the nearest ancestor we know (RFC 5322 §3.6.4).

        In-Reply-To names the parent; References lists ancestors oldest
        first, so it is read from the end.
        """
        wanted = [*inbound.in_reply_to, *reversed(inbound.references)]
        if not wanted:
            return None

        rows = session.execute(
            select(Message.message_id, Message.ticket_id).where(
                Message.message_id.in_(set(wanted)), Message.ticket_id.is_not(None)
            )
        ).all()
        ticket_of = dict(rows)
        for message_id in wanted:
            if message_id in ticket_of:
                return session.get(Ticket, ticket_of[message_id])

        return None

    def by_subject_token(self, session: Session, subject: str) -> Ticket | None:
        match = self.token.search(subject)
        if match is None:
            return None

        return session.scalar(select(Ticket).where(Ticket.number == int(match[1])))
