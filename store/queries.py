"""Read-only queries for the CLI and reports, returning plain dicts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from store.models import (
    ContactPoint,
    Counter,
    Customer,
    Message,
    Outbox,
    Quarantine,
    Ticket,
)

OPEN = ("open", "pending")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def tickets(session: Session, status: str = "open") -> list[dict[str, Any]]:
    """Tickets oldest opened first, with the customer's name and address."""
    linked = aliased(Ticket)
    query = (
        select(Ticket, Customer, linked.number)
        .join(Customer, Customer.id == Ticket.customer_id)
        .outerjoin(linked, linked.id == Ticket.linked_ticket_id)
        .order_by(Ticket.opened_at, Ticket.number)
    )
    if status == "open":
        query = query.where(Ticket.status.in_(OPEN))
    elif status != "all":
        query = query.where(Ticket.status == status)

    rows = session.execute(query).all()
    emails = _emails(session, [customer.id for _, customer, _ in rows])
    counts = dict(
        session.execute(
            select(Message.ticket_id, func.count())
            .where(Message.direction == "in")
            .group_by(Message.ticket_id)
        ).all()
    )

    return [
        {
            "number": ticket.number,
            "status": ticket.status,
            "subject": ticket.subject,
            "customer": customer.name,
            "company": customer.company,
            "email": emails.get(customer.id, ""),
            "channel": ticket.channel,
            "opened_at": _iso(ticket.opened_at),
            "last_activity_at": _iso(ticket.last_activity_at),
            "resolved_at": _iso(ticket.resolved_at),
            "messages": counts.get(ticket.id, 0),
            "linked_ticket": linked_number,
        }
        for ticket, customer, linked_number in rows
    ]


def _emails(session: Session, customer_ids: list[int]) -> dict[int, str]:
    if not customer_ids:
        return {}
    rows = session.execute(
        select(ContactPoint.customer_id, ContactPoint.value)
        .where(ContactPoint.kind == "email")
        .order_by(ContactPoint.id)
    ).all()
    wanted = set(customer_ids)
    found: dict[int, str] = {}
    for customer_id, value in rows:
        if customer_id in wanted:
            found.setdefault(customer_id, value)

    return found


def ticket(session: Session, number: int) -> dict[str, Any] | None:
    row = session.scalar(select(Ticket).where(Ticket.number == number))
    if row is None:
        return None
    summary = next(item for item in tickets(session, "all") if item["number"] == number)
    summary["messages"] = [
        {
            "id": message.id,
            "direction": message.direction,
            "kind": message.kind,
            "from": message.sender,
            "to": message.recipients,
            "subject": message.subject,
            "message_id": message.message_id,
            "received_at": _iso(message.received_at),
            "status": message.status,
            "text": message.text,
            "attachments": [a.filename for a in message.attachments],
        }
        for message in row.messages
    ]

    return summary


def messages(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Message, Ticket.number)
        .outerjoin(Ticket, Ticket.id == Message.ticket_id)
        .where(Message.direction == "in")
        .order_by(Message.id)
    ).all()

    return [
        {
            "id": message.id,
            "channel": message.channel,
            "message_id": message.message_id,
            "ticket": number,
            "classification": message.kind,
            "from": message.sender,
            "subject": message.subject,
            "received_at": _iso(message.received_at),
            "flags": message.flags,
        }
        for message, number in rows
    ]


def quarantined(session: Session, status: str = "held") -> list[dict[str, Any]]:
    query = select(Quarantine).order_by(Quarantine.id)
    if status != "all":
        query = query.where(Quarantine.status == status)

    return [quarantined_row(row) for row in session.scalars(query)]


def quarantined_row(row: Quarantine) -> dict[str, Any]:
    return {
        "id": row.id,
        "status": row.status,
        "source": row.source,
        "reason": row.reason,
        "size": row.size,
        "created_at": _iso(row.created_at),
        "retried_at": _iso(row.retried_at),
        "message": row.message_pk,
    }


def outbox(session: Session, status: str = "all") -> list[dict[str, Any]]:
    query = (
        select(Outbox, Message.subject, Message.kind, Message.message_id)
        .join(Message, Message.id == Outbox.message_pk)
        .order_by(Outbox.id)
    )
    if status != "all":
        query = query.where(Outbox.status == status)

    return [
        {
            "id": row.id,
            "status": row.status,
            "kind": kind,
            "to": row.recipients,
            "subject": subject,
            "message_id": message_id,
            "attempts": row.attempts,
            "last_error": row.last_error,
            "created_at": _iso(row.created_at),
            "sent_at": _iso(row.sent_at),
        }
        for row, subject, kind, message_id in session.execute(query).all()
    ]


def stats(session: Session) -> dict[str, int]:
    def count(query: Any) -> int:
        return int(session.scalar(query) or 0)

    inbound = select(func.count()).select_from(Message).where(Message.direction == "in")

    return {
        "received": count(inbound),
        "tickets": count(select(func.count()).select_from(Ticket)),
        "open": count(
            select(func.count()).select_from(Ticket).where(Ticket.status.in_(OPEN))
        ),
        "quarantined": count(
            select(func.count())
            .select_from(Quarantine)
            .where(Quarantine.status == "held")
        ),
        "duplicates": count(select(Counter.value).where(Counter.name == "duplicates")),
        "machine": count(inbound.where(Message.kind.not_in(("human", "agent")))),
        "outbox_pending": count(
            select(func.count())
            .select_from(Outbox)
            .where(Outbox.status.in_(("pending", "sending")))
        ),
        "outbox_failed": count(
            select(func.count()).select_from(Outbox).where(Outbox.status == "failed")
        ),
    }
