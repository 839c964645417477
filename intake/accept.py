"""``accept()``: one inbound message, one transaction, one outcome.

Everything a channel receives comes through here: the source key and the
content hash make it idempotent, the classifier keeps machine mail from
creating tickets, the threading ladder finds the ticket, and any reply we owe
is written to the outbox in the same transaction. Only after the commit does
the channel acknowledge its source (SMTP 250, IMAP flag, Twilio 200).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from intake import tickets
from intake.classify import classify, wants_no_reply
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address, Inbound, Kind
from intake.errors import StoreUnavailable
from intake.threads import Ladder
from store.engine import SessionFactory
from store.models import (
    Attachment,
    ContactPoint,
    Counter,
    Customer,
    Message,
    Outbox,
    Quarantine,
    SourceKey,
    Ticket,
)

log = logging.getLogger(__name__)

Status = Literal[
    "created", "appended", "reopened", "duplicate", "machine", "quarantined"
]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    ticket_number: int | None = None
    message_pk: int | None = None
    quarantine_id: int | None = None
    queued_sends: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """A rendered email, ready to be stored in the outbox and sent as is."""

    raw: bytes
    message_id: str
    envelope_from: str
    recipients: list[str]
    subject: str
    text: str


class Composer(Protocol):
    """Renders what we send; implemented by the notifier."""

    def acknowledgement(
        self, *, ticket_number: int, subject: str, to: Address, inbound: Inbound
    ) -> OutgoingEmail: ...


class Intake:
    """The domain's entry point, built once per process with its dependencies."""

    def __init__(
        self,
        session_factory: SessionFactory,
        clock: Clock,
        settings: Settings,
        composer: Composer,
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.settings = settings
        self.composer = composer
        self.own_addresses = frozenset({settings.support_address})
        self.own_domains = frozenset({settings.message_id_domain})
        self.ladder = Ladder(settings.tickets.subject_prefix)
        self.reopen_window = timedelta(days=settings.tickets.reopen_days)

    # -- entry points ---------------------------------------------------

    def accept(
        self,
        inbound: Inbound,
        *,
        digest: str,
        source: str,
        source_key: str | None = None,
        acknowledge: bool = True,
    ) -> Outcome:
        """Store ``inbound`` and apply it; raises StoreUnavailable only.

        ``acknowledge=False`` stores without queueing the acknowledgement,
        for imports of mail that customers sent long ago.
        """
        outcome = self._transaction(
            lambda session: self._accept(
                session,
                inbound,
                digest=digest,
                source=source,
                source_key=source_key,
                acknowledge=acknowledge,
            )
        )
        log.info(
            "accepted channel=%s source=%s key=%s message_id=%s ticket=%s outcome=%s%s",
            inbound.channel,
            source,
            source_key or "-",
            inbound.message_id or "-",
            outcome.ticket_number or "-",
            outcome.status,
            f" detail={outcome.detail}" if outcome.detail else "",
        )

        return outcome

    def quarantine(
        self,
        raw: bytes,
        reason: str,
        *,
        digest: str,
        source: str,
        source_key: str | None = None,
    ) -> Outcome:
        """Hold raw input a person must look at; never drops it."""
        outcome = self._transaction(
            lambda session: self._hold(
                session,
                raw,
                reason,
                digest=digest,
                source=source,
                source_key=source_key,
            )
        )
        log.warning(
            "quarantined source=%s key=%s id=%s reason=%s",
            source,
            source_key or "-",
            outcome.quarantine_id,
            reason,
        )

        return outcome

    # -- the transaction -----------------------------------------------

    def _transaction(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction, retrying once on a lost race.

        A unique-constraint clash means another worker stored the same
        message or source key a moment ago; the retry finds it and answers
        "duplicate". A database that cannot be reached or is locked past the
        busy timeout becomes StoreUnavailable, which channels turn into a
        temporary failure (SMTP 451) so the sender tries again.
        """
        for attempt in (1, 2):
            try:
                with self.session_factory.begin() as session:
                    return work(session)
            except IntegrityError:
                if attempt == 2:
                    raise
                log.info("store: lost a race on a unique key, retrying once")
            except (OperationalError, DBAPIError) as exc:
                raise StoreUnavailable(str(exc.orig or exc)) from exc
        raise AssertionError("unreachable")

    def _accept(
        self,
        session: Session,
        inbound: Inbound,
        *,
        digest: str,
        source: str,
        source_key: str | None,
        acknowledge: bool,
    ) -> Outcome:
        now = self.clock.now()

        known = self._known(session, digest, source, source_key)
        if known is not None:
            return known

        kind = classify(
            inbound,
            own_addresses=self.own_addresses,
            own_domains=self.own_domains,
        )
        if kind is Kind.HUMAN and inbound.sender is None:
            return self._hold(
                session,
                inbound.raw,
                "no sender address: the message has no usable From, Sender "
                "or envelope sender, so no customer can be told apart",
                digest=digest,
                source=source,
                source_key=source_key,
            )

        found = self.ladder.find(session, inbound)
        message = self._store_message(
            session, inbound, kind, digest=digest, source=source, now=now
        )
        self._record_source(session, source, source_key, message_pk=message.id)
        self._release_quarantined(session, digest, message.id, now)

        if kind.is_machine:
            # Machine mail is recorded on the ticket it concerns and changes
            # nothing: no ticket, no reply, no reopen (never answer a robot).
            message.ticket_id = found.ticket.id if found.ticket else None
            number = found.ticket.number if found.ticket else None
            return Outcome("machine", number, message.id, detail=kind.value)

        assert inbound.sender is not None
        customer = self._customer_for(session, inbound.sender, now)
        message.customer_id = customer.id
        ticket, status = self._apply(session, found, customer, inbound, now)
        message.ticket_id = ticket.id
        tickets.add_participants(session, ticket, self._participants(inbound))

        queued = 0
        wanted = acknowledge and status == "created"
        if wanted and self._should_acknowledge(session, inbound):
            self._enqueue_ack(session, ticket, inbound, now)
            queued = 1

        return Outcome(status, ticket.number, message.id, queued_sends=queued)

    def _known(
        self, session: Session, digest: str, source: str, source_key: str | None
    ) -> Outcome | None:
        """An Outcome("duplicate") when this input was stored before."""
        if source_key is not None:
            seen = session.scalar(
                select(SourceKey).where(
                    SourceKey.source == source, SourceKey.key == source_key
                )
            )
            if seen is not None:
                return self._duplicate_of(session, seen.message_pk, seen.quarantine_id)

        same = session.scalar(select(Message.id).where(Message.content_hash == digest))
        if same is None:
            return None
        self._record_source(session, source, source_key, message_pk=same)

        return self._duplicate_of(session, same, None)

    def _duplicate_of(
        self, session: Session, message_pk: int | None, quarantine_id: int | None
    ) -> Outcome:
        number = None
        if message_pk is not None:
            number = session.scalar(
                select(Ticket.number)
                .join(Message, Message.ticket_id == Ticket.id)
                .where(Message.id == message_pk)
            )

        session.execute(
            update(Counter)
            .where(Counter.name == "duplicates")
            .values(value=Counter.value + 1)
        )

        return Outcome("duplicate", number, message_pk, quarantine_id=quarantine_id)

    def _store_message(
        self,
        session: Session,
        inbound: Inbound,
        kind: Kind,
        *,
        digest: str,
        source: str,
        now: datetime,
    ) -> Message:
        flags = []
        if inbound.message_id and session.scalar(
            select(Message.id).where(Message.message_id == inbound.message_id).limit(1)
        ):
            # Some senders reuse Message-IDs; the content differs (or the
            # hash above would have matched), so this is a new message.
            flags.append("reused-message-id")

        message = Message(
            direction="in",
            channel=inbound.channel.value,
            kind=kind.value,
            author="customer",
            source=source,
            message_id=inbound.message_id,
            in_reply_to=" ".join(inbound.in_reply_to) or None,
            content_hash=digest,
            sender=inbound.sender.email if inbound.sender else "",
            recipients=[a.email for a in [*inbound.to, *inbound.cc]],
            subject=inbound.subject,
            text=inbound.text,
            html=inbound.html,
            raw=inbound.raw,
            defects=inbound.defects,
            flags=flags,
            sent_date=inbound.date,
            received_at=now,
        )
        message.attachments = [
            Attachment(
                filename=part.filename,
                content_type=part.content_type,
                content_id=part.content_id,
                inline=part.inline,
                size=len(part.content),
                content=part.content,
            )
            for part in inbound.attachments
        ]
        session.add(message)
        session.flush()

        return message

    def _record_source(
        self,
        session: Session,
        source: str,
        source_key: str | None,
        *,
        message_pk: int | None = None,
        quarantine_id: int | None = None,
    ) -> None:
        if source_key is None:
            return
        session.add(
            SourceKey(
                source=source,
                key=source_key,
                message_pk=message_pk,
                quarantine_id=quarantine_id,
                created_at=self.clock.now(),
            )
        )

    def _release_quarantined(
        self, session: Session, digest: str, message_pk: int, now: datetime
    ) -> None:
        held = session.scalar(
            select(Quarantine).where(
                Quarantine.content_hash == digest, Quarantine.status == "held"
            )
        )
        if held is not None:
            held.status = "released"
            held.retried_at = now
            held.message_pk = message_pk

    def _customer_for(
        self, session: Session, sender: Address, now: datetime
    ) -> Customer:
        contact = session.scalar(
            select(ContactPoint).where(
                ContactPoint.kind == "email", ContactPoint.value == sender.email
            )
        )
        if contact is not None:
            return contact.customer

        customer = Customer(name=sender.name, company="", created_at=now)
        customer.contacts.append(ContactPoint(kind="email", value=sender.email))
        session.add(customer)
        session.flush()

        return customer

    def _apply(
        self,
        session: Session,
        found: tickets.Found,
        customer: Customer,
        inbound: Inbound,
        now: datetime,
    ) -> tuple[Ticket, Status]:
        """Create, append to or reopen a ticket for a customer's message."""
        ticket = found.ticket
        subject = inbound.subject

        if ticket is None:
            new = tickets.open_ticket(
                session,
                customer,
                subject,
                inbound.channel.value,
                now,
                linked=found.linked,
            )
            return new, "created"

        if ticket.status != "resolved":
            tickets.touch(ticket, now)
            return ticket, "appended"

        assert ticket.resolved_at is not None
        if now - ticket.resolved_at <= self.reopen_window:
            tickets.reopen(session, ticket, now, actor=customer_email(inbound))
            return ticket, "reopened"

        # Past the reopen window a reply starts a new ticket linked to the old.
        new = tickets.open_ticket(
            session,
            customer,
            subject,
            inbound.channel.value,
            now,
            linked=ticket,
        )
        return new, "created"

    def _participants(self, inbound: Inbound) -> list[str]:
        addresses = [inbound.sender, *inbound.cc] if inbound.sender else inbound.cc
        return [
            a.email
            for a in addresses
            if a is not None and a.email not in self.own_addresses
        ]

    def _should_acknowledge(self, session: Session, inbound: Inbound) -> bool:
        if not self.settings.tickets.acknowledge or wants_no_reply(inbound):
            return False
        recipient = self._reply_address(inbound)

        return not session.scalar(
            select(ContactPoint.id).where(
                ContactPoint.kind == "email",
                ContactPoint.value == recipient.email,
                ContactPoint.undeliverable_at.is_not(None),
            )
        )

    def _reply_address(self, inbound: Inbound) -> Address:
        assert inbound.sender is not None
        for address in inbound.reply_to:
            if address.email not in self.own_addresses:
                return address
        return inbound.sender

    def _enqueue_ack(
        self, session: Session, ticket: Ticket, inbound: Inbound, now: datetime
    ) -> None:
        recipient = self._reply_address(inbound)
        mail = self.composer.acknowledgement(
            ticket_number=ticket.number,
            subject=ticket.subject,
            to=recipient,
            inbound=inbound,
        )
        enqueue_email(session, ticket, mail, kind="ack", when=now)

    def _hold(
        self,
        session: Session,
        raw: bytes,
        reason: str,
        *,
        digest: str,
        source: str,
        source_key: str | None,
    ) -> Outcome:
        now = self.clock.now()
        if source_key is not None:
            seen = session.scalar(
                select(SourceKey).where(
                    SourceKey.source == source, SourceKey.key == source_key
                )
            )
            if seen is not None:
                return self._duplicate_of(session, seen.message_pk, seen.quarantine_id)

        held = session.scalar(
            select(Quarantine).where(Quarantine.content_hash == digest)
        )
        if held is None:
            held = Quarantine(
                source=source,
                reason=reason,
                content_hash=digest,
                raw=raw,
                size=len(raw),
                status="held",
                created_at=now,
            )
            session.add(held)
        else:
            held.reason = reason
            held.retried_at = now
        session.flush()
        self._record_source(session, source, source_key, quarantine_id=held.id)

        return Outcome("quarantined", quarantine_id=held.id, detail=reason)


def customer_email(inbound: Inbound) -> str:
    return inbound.sender.email if inbound.sender else ""


def enqueue_email(
    session: Session,
    ticket: Ticket | None,
    mail: OutgoingEmail,
    *,
    kind: str,
    when: datetime,
) -> Outbox:
    """Store an outbound message and its outbox row in the caller's transaction."""
    message = Message(
        ticket_id=ticket.id if ticket else None,
        direction="out",
        channel="email",
        kind=kind,
        author="system",
        message_id=mail.message_id,
        content_hash=None,
        sender=mail.envelope_from,
        recipients=mail.recipients,
        subject=mail.subject,
        text=mail.text,
        raw=mail.raw,
        received_at=when,
        status="queued",
    )
    session.add(message)
    session.flush()
    row = Outbox(
        message_pk=message.id,
        channel="email",
        envelope_from=mail.envelope_from,
        recipients=mail.recipients,
        status="pending",
        attempts=0,
        next_attempt_at=when,
        created_at=when,
    )
    session.add(row)

    return row
