"""Builders for the owner's tests: a settings file with an owner, and a
``Story`` that writes tickets, replies, notes and resolutions at chosen
times through the same domain functions the daemon uses."""

from __future__ import annotations

from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from intake import tickets
from intake.daemon import Parts
from store.models import (
    Agent,
    ContactPoint,
    Counter,
    Customer,
    Message,
    Survey,
    Ticket,
)
from store.tables import messages
from tests.conftest import write_config

OWNER = "owner@example.com"


def owner_config(
    directory: Path, owner: str = OWNER, **sections: dict[str, Any]
) -> Path:
    """``write_config`` with ``owner_email`` set at the top level."""
    sections.setdefault("smtp", {"domains": ["example.com"]})
    path = write_config(directory, **sections)
    lines = path.read_text().splitlines()
    lines.insert(1, f'owner_email = "{owner}"')
    path.write_text("\n".join(lines) + "\n")

    return path


class Story:
    """Tickets and what happens to them, each at the time given."""

    def __init__(self, parts: Parts) -> None:
        self.engine = parts.engine
        self._serial = 0

    def _write(self, work: Any) -> Any:
        with self.engine.begin() as connection:
            return work(connection)

    def agent(self, name: str, email: str) -> int:
        return int(
            self._write(
                lambda c: c.execute(
                    insert(Agent).values(name=name, email=email).returning(Agent.id)
                ).scalar_one()
            )
        )

    def customer(
        self,
        name: str,
        email: str | None = None,
        *,
        company: str = "",
        phone: str | None = None,
        at: datetime,
    ) -> int:
        def work(connection: Connection) -> int:
            customer_id = connection.execute(
                insert(Customer)
                .values(name=name, company=company, created_at=at)
                .returning(Customer.id)
            ).scalar_one()
            for kind, value in (("email", email), ("phone", phone)):
                if value:
                    connection.execute(
                        insert(ContactPoint).values(
                            customer_id=customer_id, kind=kind, value=value
                        )
                    )
            return int(customer_id)

        return int(self._write(work))

    def ticket(
        self,
        customer_id: int,
        at: datetime,
        *,
        subject: str = "Printer on fire",
        text: str = "Hello, my printer is on fire.",
        channel: str = "email",
        priority: str = "normal",
        assignee: int | None = None,
        sender: str = "",
    ) -> int:
        """A ticket opened by a customer's first message at ``at``."""

        def work(connection: Connection) -> int:
            ref = tickets.open_ticket(connection, customer_id, subject, channel, at)
            connection.execute(
                update(Ticket)
                .where(Ticket.id == ref.id)
                .values(priority=priority, assignee_id=assignee)
            )
            self._message(
                connection,
                ref.id,
                at,
                direction="in",
                kind="human",
                author="customer",
                text=text,
                sender=sender,
                channel=channel,
            )
            return ref.id

        return int(self._write(work))

    def number(self, ticket_id: int) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.scalar(select(Ticket.number).where(Ticket.id == ticket_id))
            )

    def customer_writes(self, ticket_id: int, at: datetime, text: str = "Hi") -> None:
        self._write(
            lambda c: self._message(
                c,
                ticket_id,
                at,
                direction="in",
                kind="human",
                author="customer",
                text=text,
            )
        )

    def agent_replies(
        self, ticket_id: int, at: datetime, agent: int, *, status: str = "sent"
    ) -> None:
        self._write(
            lambda c: self._message(
                c,
                ticket_id,
                at,
                direction="out",
                kind="reply",
                author="agent",
                agent_id=agent,
                status=status,
            )
        )

    def acknowledged(self, ticket_id: int, at: datetime) -> None:
        self._write(
            lambda c: self._message(
                c, ticket_id, at, direction="out", kind="ack", author="system"
            )
        )

    def note(self, ticket_id: int, at: datetime, agent: int) -> None:
        self._write(
            lambda c: self._message(
                c,
                ticket_id,
                at,
                direction="out",
                kind="note",
                author="agent",
                agent_id=agent,
                status="stored",
            )
        )

    def machine_mail(self, ticket_id: int, at: datetime) -> None:
        self._write(
            lambda c: self._message(
                c, ticket_id, at, direction="in", kind="auto-reply", author="customer"
            )
        )

    def command(self, ticket_id: int, at: datetime, actor: str) -> None:
        self._write(lambda c: tickets.record(c, ticket_id, "command", at, actor=actor))

    def resolve(self, ticket_id: int, at: datetime) -> None:
        self._write(
            lambda c: tickets.resolve(c, self._ref(c, ticket_id), at, actor="t")
        )

    def reopen(self, ticket_id: int, at: datetime) -> None:
        self._write(lambda c: tickets.reopen(c, self._ref(c, ticket_id), at, actor="t"))

    def survey(
        self, ticket_id: int, scale: str, score: int | None, at: datetime
    ) -> None:
        self._write(
            lambda c: c.execute(
                insert(Survey).values(
                    ticket_id=ticket_id,
                    scale=scale,
                    asked_at=at,
                    score=score,
                    comment="",
                    answered_at=at if score is not None else None,
                )
            )
        )

    def many(self, count: int, now: datetime) -> None:
        """``count`` open tickets aged up to 60 days, each with a customer,
        an email (every other one a phone too) and a first message; every
        third one answered by an agent. A few statements in all."""
        agent = self.agent("Bulk Agent", f"bulk{count}@example.com")

        def work(connection: Connection) -> None:
            first = int(
                connection.scalar(select(func.count()).select_from(Customer)) or 0
            )
            base = int(connection.scalar(select(func.max(Ticket.number))) or 0)
            connection.execute(
                insert(Customer),
                [
                    {
                        "name": f"Customer {i}",
                        "company": f"Company {i % 97}",
                        "created_at": now,
                    }
                    for i in range(count)
                ],
            )
            ids = list(
                connection.scalars(
                    select(Customer.id).order_by(Customer.id).offset(first)
                )
            )
            contacts = [
                {"customer_id": c, "kind": "email", "value": f"c{c}@customer.example"}
                for c in ids
            ] + [
                {"customer_id": c, "kind": "phone", "value": f"+4930{c:07d}"}
                for c in ids[::2]
            ]
            connection.execute(insert(ContactPoint), contacts)
            ages = [
                timedelta(minutes=(i * 7919) % (60 * 24 * 60)) for i in range(count)
            ]
            connection.execute(
                insert(Ticket),
                [
                    {
                        "number": base + i + 1,
                        "subject": f"Order {i} has not arrived",
                        "status": "open" if i % 5 else "pending",
                        "priority": ("low", "normal", "high", "urgent")[i % 4],
                        "channel": "email",
                        "customer_id": customer,
                        "assignee_id": agent if i % 2 else None,
                        "opened_at": now - ages[i],
                        "last_activity_at": now - ages[i] / 2,
                        "reopen_count": 0,
                    }
                    for i, customer in enumerate(ids)
                ],
            )
            connection.execute(
                update(Counter)
                .where(Counter.name == "ticket")
                .values(value=base + count)
            )
            opened = connection.execute(
                select(Ticket.id, Ticket.opened_at).where(Ticket.number > base)
            ).all()
            text = "Hello,\nmy order has not arrived.\nIt was due last week."
            rows = []
            for ticket_id, at in opened:
                rows.append(
                    self._row(
                        ticket_id,
                        at,
                        direction="in",
                        kind="human",
                        author="customer",
                        text=text,
                    )
                )
                if ticket_id % 3 == 0:
                    rows.append(
                        self._row(
                            ticket_id,
                            at + timedelta(hours=2),
                            direction="out",
                            kind="reply",
                            author="agent",
                            agent_id=agent,
                            status="sent",
                            text="On its way.",
                        )
                    )
            connection.execute(insert(messages), rows)

        self._write(work)

    def _ref(self, connection: Connection, ticket_id: int) -> tickets.TicketRef:
        found = tickets.by_id(connection, ticket_id)
        assert found is not None
        return found

    def _message(
        self, connection: Connection, ticket_id: int, at: datetime, **fields: Any
    ) -> None:
        connection.execute(insert(messages), [self._row(ticket_id, at, **fields)])

    def _row(
        self,
        ticket_id: int,
        at: datetime,
        *,
        direction: str,
        kind: str,
        author: str,
        text: str = "",
        sender: str = "",
        channel: str = "email",
        agent_id: int | None = None,
        status: str = "stored",
    ) -> dict[str, Any]:
        """A ``messages`` row with a Message-ID of its own."""
        self._serial += 1
        return {
            "ticket_id": ticket_id,
            "direction": direction,
            "channel": channel,
            "kind": kind,
            "author": author,
            "source": "story",
            "agent_id": agent_id,
            "message_id": f"story-{self._serial}@customer.example",
            "content_hash": None,
            "sender": sender,
            "recipients": [],
            "subject": "",
            "text": text,
            "raw": b"",
            "defects": [],
            "flags": [],
            "received_at": at,
            "status": status,
        }


def outgoing(parts: Parts, kind: str) -> list[EmailMessage]:
    """The mails of ``kind`` in the outbox, oldest first, parsed."""
    with parts.intake.session_factory() as session:
        raws = session.scalars(
            select(Message.raw)
            .where(Message.direction == "out", Message.kind == kind)
            .order_by(Message.id)
        ).all()

    return [message_from_bytes(raw, policy=policy.default) for raw in raws]


def body(mail: EmailMessage, subtype: str = "plain") -> str:
    part = mail.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    return str(part.get_content())
