"""Ticket state changes, each recorded as an event in the same transaction.

They take the caller's connection, so a change and whatever caused it (a
message stored, an outbox row queued) commit or fail together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    case,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from store.models import UTCDateTime
from store.tables import contacts, counters, events, messages, participants, tickets

OPEN_STATUSES = ("open", "pending")


@dataclass(frozen=True, slots=True)
class TicketRef:
    """What the domain needs to know of a ticket to place a message on it."""

    id: int
    number: int
    status: str
    resolved_at: datetime | None
    customer_id: int
    subject: str = ""
    priority: str = "normal"
    assignee_id: int | None = None


REF_COLUMNS = (
    tickets.c.id,
    tickets.c.number,
    tickets.c.status,
    tickets.c.resolved_at,
    tickets.c.customer_id,
    tickets.c.subject,
    tickets.c.priority,
    tickets.c.assignee_id,
)
# Built once; see the note in intake.accept.
REF_BY_ID = select(*REF_COLUMNS).where(tickets.c.id == bindparam("id"))
NEXT_NUMBER = (
    update(counters)
    .where(counters.c.name == "ticket")
    .values(value=counters.c.value + 1)
    .returning(counters.c.value)
)
INSERT_EVENT = insert(events)
INSERT_TICKET = insert(tickets).returning(tickets.c.id)
TOUCH = (
    update(tickets)
    .where(tickets.c.id == bindparam("ticket_id"))
    .values(last_activity_at=bindparam("now"), status="open")
)


@dataclass(frozen=True, slots=True)
class Found:
    """Where the threading ladder placed a message.

    ``ticket`` is the ticket it belongs to (None for a new one); ``linked`` a
    ticket the new one should point at, such as one whose token a stranger
    quoted; ``step`` names the rung that matched, for the log.
    """

    ticket: TicketRef | None
    step: str
    linked: TicketRef | None = None


def by_id(connection: Connection, ticket_id: int) -> TicketRef | None:
    row = connection.execute(REF_BY_ID, {"id": ticket_id})
    found = row.first()
    return TicketRef(*found) if found else None


def by_number(connection: Connection, number: int) -> TicketRef | None:
    row = connection.execute(select(*REF_COLUMNS).where(tickets.c.number == number))
    found = row.first()
    return TicketRef(*found) if found else None


def number_of_message(connection: Connection, message_pk: int) -> int | None:
    number = connection.scalar(
        select(tickets.c.number)
        .join(messages, messages.c.ticket_id == tickets.c.id)
        .where(messages.c.id == message_pk)
    )
    return int(number) if number is not None else None


def next_number(connection: Connection) -> int:
    """The next ticket number; the counter row's lock serialises writers."""
    number = connection.scalar(NEXT_NUMBER)
    if number is None:
        raise RuntimeError("the ticket counter is missing; run `intake init`")

    return int(number)


def record(
    connection: Connection,
    ticket_id: int,
    kind: str,
    at: datetime,
    actor: str = "",
    **detail: Any,
) -> None:
    connection.execute(
        INSERT_EVENT,
        {
            "ticket_id": ticket_id,
            "at": at,
            "kind": kind,
            "actor": actor,
            "detail": detail,
        },
    )


def open_ticket(
    connection: Connection,
    customer_id: int,
    subject: str,
    channel: str,
    now: datetime,
    *,
    linked: TicketRef | None = None,
) -> TicketRef:
    number = next_number(connection)
    ticket_id = connection.execute(
        INSERT_TICKET,
        {
            "number": number,
            "subject": subject,
            "status": "open",
            "priority": "normal",
            "channel": channel,
            "customer_id": customer_id,
            "linked_ticket_id": linked.id if linked else None,
            "opened_at": now,
            "last_activity_at": now,
            "reopen_count": 0,
        },
    ).scalar_one()
    record(
        connection, ticket_id, "created", now, linked=linked.number if linked else None
    )

    return TicketRef(ticket_id, number, "open", None, customer_id, subject)


def touch(connection: Connection, ticket: TicketRef, now: datetime) -> None:
    """A customer wrote again: the ticket is waiting on us once more."""
    connection.execute(TOUCH, {"ticket_id": ticket.id, "now": now})


def reopen(
    connection: Connection, ticket: TicketRef, now: datetime, *, actor: str
) -> None:
    connection.execute(
        update(tickets)
        .where(tickets.c.id == ticket.id)
        .values(
            status="open",
            reopen_count=tickets.c.reopen_count + 1,
            last_activity_at=now,
        )
    )
    record(connection, ticket.id, "reopened", now, actor=actor)


def resolve(
    connection: Connection, ticket: TicketRef, now: datetime, *, actor: str
) -> None:
    connection.execute(
        update(tickets)
        .where(tickets.c.id == ticket.id)
        .values(status="resolved", resolved_at=now, last_activity_at=now)
    )
    record(connection, ticket.id, "resolved", now, actor=actor)


def add_participants(
    connection: Connection, ticket_id: int, addresses: Iterable[str]
) -> None:
    """Remember who wrote on a ticket; addresses already known are skipped."""
    rows = [{"ticket_id": ticket_id, "address": a} for a in sorted(set(addresses))]
    if not rows:
        return

    dialect = connection.dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    connection.execute(builder(participants).on_conflict_do_nothing(), rows)


def is_participant(connection: Connection, ticket: TicketRef, address: str) -> bool:
    """The ticket's customer (by any of their addresses) or a participant."""
    customer = connection.scalar(
        select(contacts.c.customer_id).where(
            contacts.c.kind == "email", contacts.c.value == address
        )
    )
    if customer == ticket.customer_id:
        return True

    listed = connection.scalar(
        select(participants.c.id).where(
            participants.c.ticket_id == ticket.id, participants.c.address == address
        )
    )
    return listed is not None


# -- changes an agent asks for (by command or on the command line) -----------


def assign(
    connection: Connection,
    ticket: TicketRef,
    agent_id: int | None,
    now: datetime,
    *,
    actor: str,
) -> None:
    """Give the ticket to an agent, or to nobody with None."""
    connection.execute(
        update(tickets)
        .where(tickets.c.id == ticket.id)
        .values(assignee_id=agent_id, last_activity_at=now)
    )
    record(connection, ticket.id, "assigned", now, actor=actor, agent_id=agent_id)


def set_priority(
    connection: Connection, ticket: TicketRef, level: str, now: datetime, *, actor: str
) -> None:
    connection.execute(
        update(tickets).where(tickets.c.id == ticket.id).values(priority=level)
    )
    record(connection, ticket.id, "priority", now, actor=actor, level=level)


def set_due(
    connection: Connection,
    ticket: TicketRef,
    due_at: datetime,
    now: datetime,
    *,
    actor: str,
) -> None:
    """A due date set by hand; it replaces the priority's resolution target."""
    connection.execute(
        update(tickets).where(tickets.c.id == ticket.id).values(due_at=due_at)
    )
    record(connection, ticket.id, "due", now, actor=actor, due_at=due_at.isoformat())


def answered(connection: Connection, ticket: TicketRef, now: datetime) -> None:
    """An agent's reply went to the customer: the ticket waits on them now,
    and the first such reply is the ticket's first response."""
    connection.execute(
        update(tickets)
        .where(tickets.c.id == ticket.id)
        .values(
            first_response_at=func.coalesce(
                tickets.c.first_response_at, literal(now, UTCDateTime())
            ),
            status=case(
                (tickets.c.status == "open", "pending"), else_=tickets.c.status
            ),
            last_activity_at=now,
        )
    )
