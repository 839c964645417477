"""Ticket state changes, each recorded as an event in the same transaction."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.models import Counter, Customer, Event, Participant, Ticket

OPEN_STATUSES = ("open", "pending")


@dataclass(frozen=True, slots=True)
class Found:
    """Where the threading ladder placed a message.

    ``ticket`` is the ticket it belongs to (None for a new one); ``linked`` a
    ticket the new one should point at, such as one whose token a stranger
    quoted; ``step`` names the rung that matched, for the log.
    """

    ticket: Ticket | None
    step: str
    linked: Ticket | None = None


def next_number(session: Session) -> int:
    """The next ticket number; the counter row's lock serialises writers."""
    number = session.scalar(
        update(Counter)
        .where(Counter.name == "ticket")
        .values(value=Counter.value + 1)
        .returning(Counter.value)
    )
    if number is None:
        raise RuntimeError("the ticket counter is missing; run `intake init`")

    return int(number)


def record(
    session: Session,
    ticket: Ticket,
    kind: str,
    at: datetime,
    actor: str = "",
    **detail: Any,
) -> None:
    session.add(
        Event(ticket_id=ticket.id, at=at, kind=kind, actor=actor, detail=detail)
    )


def open_ticket(
    session: Session,
    customer: Customer,
    subject: str,
    channel: str,
    now: datetime,
    *,
    linked: Ticket | None = None,
) -> Ticket:
    ticket = Ticket(
        number=next_number(session),
        subject=subject,
        status="open",
        priority="normal",
        channel=channel,
        customer_id=customer.id,
        linked_ticket_id=linked.id if linked else None,
        opened_at=now,
        last_activity_at=now,
        reopen_count=0,
    )
    session.add(ticket)
    session.flush()
    record(
        session,
        ticket,
        "created",
        now,
        linked=linked.number if linked else None,
    )

    return ticket


def touch(ticket: Ticket, now: datetime) -> None:
    """A customer wrote again: the ticket is waiting on us once more."""
    ticket.last_activity_at = now
    if ticket.status == "pending":
        ticket.status = "open"


def reopen(session: Session, ticket: Ticket, now: datetime, *, actor: str) -> None:
    ticket.status = "open"
    ticket.reopen_count += 1
    ticket.last_activity_at = now
    record(session, ticket, "reopened", now, actor=actor)


def resolve(session: Session, ticket: Ticket, now: datetime, *, actor: str) -> None:
    ticket.status = "resolved"
    ticket.resolved_at = now
    ticket.last_activity_at = now
    record(session, ticket, "resolved", now, actor=actor)


def add_participants(
    session: Session, ticket: Ticket, addresses: Iterable[str]
) -> None:
    wanted = set(addresses)
    if not wanted:
        return
    known = set(
        session.scalars(
            select(Participant.address).where(
                Participant.ticket_id == ticket.id, Participant.address.in_(wanted)
            )
        )
    )
    session.add_all(
        Participant(ticket_id=ticket.id, address=address)
        for address in sorted(wanted - known)
    )


def is_participant(session: Session, ticket: Ticket, address: str) -> bool:
    return (
        session.scalar(
            select(Participant.id).where(
                Participant.ticket_id == ticket.id, Participant.address == address
            )
        )
        is not None
    )
