"""What resolving a ticket sends: the customer's note (with the owner copied
and, once per ticket, one survey question), and a day later the owner's
check-in listing the customers to reach out to personally.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from intake.accept import OutgoingEmail, enqueue_email
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address
from notifier.compose import ticket_token
from notifier.digest import duration, templates
from notifier.multipart import compose_email
from store.models import ContactPoint, Customer, Message, Outbox, Survey, Ticket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Thread:
    """Where the customer last wrote on a ticket, so the note threads there."""

    to: Address
    in_reply_to: str | None
    references: list[str]


def notify_resolved(
    connection: Connection,
    settings: Settings,
    clock: Clock,
    ticket_id: int,
    now: datetime,
) -> int | None:
    """Queue the resolution note for a ticket just resolved; its outbox id.

    Call it in the transaction that resolved the ticket. The owner is copied
    as ``[resolution] copy_owner`` says; the survey question is asked on the
    first resolution only, so a ticket is surveyed once. None when the
    customer cannot be reached by email.
    """
    ticket = connection.execute(
        select(Ticket.number, Ticket.subject, Ticket.channel, Customer.name)
        .join(Customer, Customer.id == Ticket.customer_id)
        .where(Ticket.id == ticket_id)
    ).one()
    thread = _thread(connection, ticket_id, ticket.name)
    if thread is None:
        # TODO(sms-outbox): SMS tickets get their note once the outbox sends SMS.
        log.warning(
            "resolution: ticket %s has no deliverable email address; no note sent",
            ticket.number,
        )
        return None

    survey = settings.resolution.survey
    if survey != "none" and _surveyed(connection, ticket_id):
        survey = "none"

    mail = resolution_email(
        settings,
        clock,
        number=ticket.number,
        subject=ticket.subject,
        thread=thread,
        survey=survey,
    )
    outbox_id = enqueue_email(connection, ticket_id, mail, kind="resolution", when=now)
    if survey != "none":
        message_pk = connection.scalar(
            select(Outbox.message_pk).where(Outbox.id == outbox_id)
        )
        connection.execute(
            insert(Survey).values(
                ticket_id=ticket_id,
                scale=survey,
                asked_at=now,
                message_pk=message_pk,
                comment="",
            )
        )
    log.info(
        "resolution: ticket %s note queued to %s survey=%s copy_owner=%s",
        ticket.number,
        thread.to.email,
        survey,
        settings.resolution.copy_owner if settings.owner_email else "none",
    )

    return outbox_id


def resolution_email(
    settings: Settings,
    clock: Clock,
    *,
    number: int,
    subject: str,
    thread: Thread,
    survey: str,
) -> OutgoingEmail:
    token = ticket_token(settings.tickets.subject_prefix, number)
    shown = " ".join(subject.replace(token, " ").split()) or "(no subject)"
    text = templates.get_template("resolution.txt").render(
        name=thread.to.name,
        token=token,
        subject=shown,
        survey=survey,
        reopen_days=settings.tickets.reopen_days,
        signature=settings.outbound.from_name,
    )
    owner = settings.owner_email
    copy = settings.resolution.copy_owner if owner else "none"

    return compose_email(
        settings,
        clock,
        to=[thread.to],
        cc=[Address("", owner)] if copy == "cc" else [],
        bcc=[owner] if copy == "bcc" else [],
        subject=f"Resolved: {shown} {token}",
        text=text,
        in_reply_to=thread.in_reply_to,
        references=thread.references,
        ticket_number=number,
    )


def _thread(connection: Connection, ticket_id: int, name: str) -> Thread | None:
    """The customer's last email on the ticket, or their first address."""
    rows = connection.execute(
        select(Message.sender, Message.message_id)
        .where(
            Message.ticket_id == ticket_id,
            Message.direction == "in",
            Message.kind == "human",
            Message.channel == "email",
        )
        .order_by(Message.id)
    ).all()
    ids = [message_id for _, message_id in rows if message_id]
    address = rows[-1].sender if rows else None
    if address is None:
        address = connection.scalar(
            select(ContactPoint.value)
            .join(Ticket, Ticket.customer_id == ContactPoint.customer_id)
            .where(Ticket.id == ticket_id, ContactPoint.kind == "email")
            .order_by(ContactPoint.id)
            .limit(1)
        )
    if not address or _undeliverable(connection, address):
        return None

    # The thread's first and the customer's last message: enough for every
    # client to place the note (RFC 5322 §3.6.4).
    references = list(dict.fromkeys(ids[:1] + ids[-1:]))
    return Thread(Address(name, address), ids[-1] if ids else None, references[:-1])


def _undeliverable(connection: Connection, address: str) -> bool:
    return (
        connection.scalar(
            select(ContactPoint.id).where(
                ContactPoint.kind == "email",
                ContactPoint.value == address,
                ContactPoint.undeliverable_at.is_not(None),
            )
        )
        is not None
    )


def _surveyed(connection: Connection, ticket_id: int) -> bool:
    found = connection.scalar(select(Survey.id).where(Survey.ticket_id == ticket_id))
    return found is not None


# -- the check-in -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckIn:
    """One customer to reach out to, as the check-in shows them."""

    number: int
    subject: str
    customer: str
    company: str
    email: str
    phone: str
    assignee: str
    channel: str
    resolved: str
    took: str
    survey: str  # "" when not asked or not answered
    comment: str


def checkin_rows(rows: Sequence[Any], settings: Settings) -> list[CheckIn]:
    zone = settings.digest.zone
    found = []
    for row in rows:
        survey = ""
        if row.score is not None:
            top = 5 if row.scale == "csat" else 10
            survey = f"{row.scale.upper()} {row.score}/{top}"
        found.append(
            CheckIn(
                number=row.number,
                subject=row.subject or "(no subject)",
                customer=row.customer or "(no name)",
                company=row.company or "",
                email=row.email or "",
                phone=row.phone or "",
                assignee=row.assignee or "unassigned",
                channel=row.channel,
                resolved=row.resolved_at.astimezone(zone).strftime("%a %d %b %H:%M"),
                took=duration(row.resolved_at - row.opened_at),
                survey=survey,
                comment=row.comment or "",
            )
        )

    return found


def checkin_email(
    settings: Settings, clock: Clock, items: Sequence[CheckIn]
) -> OutgoingEmail:
    values = {
        "items": items,
        "after": settings.checkin.after,
        "business": settings.outbound.from_name,
    }
    text = templates.get_template("checkin.txt").render(values)
    html = templates.get_template("checkin.html").render(values)
    people = "customer" if len(items) == 1 else "customers"

    return compose_email(
        settings,
        clock,
        to=[Address("", settings.owner_email)],
        subject=f"Check in with {len(items)} {people} whose tickets were resolved",
        text=text,
        html=html,
    )
