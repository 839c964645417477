"""``accept()``: inbound messages, one transaction, one outcome each.

Everything a channel receives comes through here: the source key and the
content hash make it idempotent, the classifier keeps machine mail from
creating tickets, the threading ladder finds the ticket, and any reply we owe
is written to the outbox in the same transaction. Only after the commit does
the channel acknowledge its source (SMTP 250, IMAP flag, Twilio 200).

Several messages may share one transaction (``accept_batch``): a commit
costs a disk flush, and a batch of ten pays it once. The rows are written
with SQL expressions rather than the ORM's unit of work, which cost ten times
as much per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from intake import surveys, tickets
from intake.classify import classify, wants_no_reply
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address, Inbound, Kind
from intake.errors import StoreUnavailable
from intake.threads import Ladder
from intake.tickets import TicketRef
from store.engine import SessionFactory
from store.tables import (
    attachments,
    contacts,
    counters,
    customers,
    messages,
    source_keys,
)
from store.tables import outbox as outbox_table
from store.tables import quarantine as quarantine_table

log = logging.getLogger(__name__)

Status = Literal[
    "created", "appended", "reopened", "duplicate", "machine", "quarantined"
]
T = TypeVar("T")

# Built once: SQLAlchemy memoises a statement's cache key on the object, so
# reusing it skips most of the per-call cost of building SQL.
SOURCE_SEEN = select(source_keys.c.message_pk, source_keys.c.quarantine_id).where(
    source_keys.c.source == bindparam("source"), source_keys.c.key == bindparam("key")
)
SAME_CONTENT = select(messages.c.id).where(
    messages.c.content_hash == bindparam("digest")
)
COUNT_DUPLICATE = (
    update(counters)
    .where(counters.c.name == "duplicates")
    .values(value=counters.c.value + 1)
)
INSERT_MESSAGE = insert(messages).returning(messages.c.id)
INSERT_ATTACHMENT = insert(attachments)
INSERT_SOURCE_KEY = insert(source_keys)
RELEASE_HELD = (
    update(quarantine_table)
    .where(
        quarantine_table.c.content_hash == bindparam("digest"),
        quarantine_table.c.status == "held",
    )
    .values(
        status="released",
        retried_at=bindparam("now"),
        message_pk=bindparam("stored_pk"),
    )
)
CUSTOMER_BY_EMAIL = select(contacts.c.customer_id).where(
    contacts.c.kind == "email", contacts.c.value == bindparam("email")
)
INSERT_CUSTOMER = insert(customers).returning(customers.c.id)
INSERT_CONTACT = insert(contacts)
UNDELIVERABLE = select(contacts.c.id).where(
    contacts.c.kind == "email",
    contacts.c.value == bindparam("email"),
    contacts.c.undeliverable_at.is_not(None),
)
INSERT_OUTBOX = insert(outbox_table).returning(outbox_table.c.id)
ANY_HELD = (
    select(quarantine_table.c.id).where(quarantine_table.c.status == "held").limit(1)
)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    ticket_number: int | None = None
    message_pk: int | None = None
    quarantine_id: int | None = None
    queued_sends: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One piece of raw input on its way in, parsed or not.

    ``inbound`` is None when the channel could not parse it; ``reason`` then
    says why, and the raw bytes go to the quarantine.
    """

    raw: bytes
    digest: str
    source: str
    source_key: str | None = None
    inbound: Inbound | None = None
    reason: str = ""
    acknowledge: bool = True


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
        arrival = Arrival(
            inbound.raw, digest, source, source_key, inbound, acknowledge=acknowledge
        )
        return self.accept_batch([arrival])[0]

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
        held = Arrival(raw, digest, source, source_key, None, reason)
        return self.accept_batch([held])[0]

    def accept_batch(self, arrivals: Sequence[Arrival]) -> list[Outcome]:
        """Store every arrival in one transaction; one outcome each, in order.

        A message whose processing fails for any reason but the store is
        quarantined with that reason: the batch is then redone one message
        per transaction, so the failure costs no other message anything.
        Raises StoreUnavailable when the database cannot take the write.
        """
        try:
            outcomes = self._transaction(
                lambda connection: self._each(connection, arrivals)
            )
        except _ProcessingFailed:
            outcomes = [self._alone(arrival) for arrival in arrivals]

        for arrival, outcome in zip(arrivals, outcomes, strict=True):
            _log_outcome(arrival, outcome)

        return outcomes

    # -- the transaction -----------------------------------------------

    def _alone(self, arrival: Arrival) -> Outcome:
        try:
            return self._transaction(
                lambda connection: self._each(connection, [arrival])[0]
            )
        except _ProcessingFailed as failed:
            log.error(
                "processing failed source=%s key=%s message_id=%s",
                arrival.source,
                arrival.source_key or "-",
                arrival.inbound.message_id if arrival.inbound else "-",
                exc_info=failed.__cause__,
            )
            cause = failed.__cause__
            reason = f"processing failed: {type(cause).__name__}: {cause}"
            held = Arrival(
                arrival.raw,
                arrival.digest,
                arrival.source,
                arrival.source_key,
                None,
                reason,
            )
            return self._transaction(
                lambda connection: self._each(connection, [held])[0]
            )

    def _transaction(self, work: Callable[[Connection], T]) -> T:
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
                    return work(session.connection())
            except IntegrityError:
                if attempt == 2:
                    raise
                log.info("store: lost a race on a unique key, retrying once")
            except (OperationalError, DBAPIError) as exc:
                raise StoreUnavailable(str(exc.orig or exc)) from exc
        raise AssertionError("unreachable")

    def _each(
        self, connection: Connection, arrivals: Sequence[Arrival]
    ) -> list[Outcome]:
        # Whether anything is held at all, asked once: a message stored
        # while an identical copy sits in the quarantine releases that copy.
        any_held = connection.scalar(ANY_HELD) is not None

        return [self._one(connection, arrival, any_held) for arrival in arrivals]

    def _one(self, connection: Connection, arrival: Arrival, any_held: bool) -> Outcome:
        try:
            if arrival.inbound is None:
                return self._hold(connection, arrival, arrival.reason)
            return self._accept(connection, arrival, arrival.inbound, any_held)
        except (DBAPIError, StoreUnavailable):
            raise
        except Exception as exc:
            raise _ProcessingFailed from exc

    def _accept(
        self,
        connection: Connection,
        arrival: Arrival,
        inbound: Inbound,
        any_held: bool,
    ) -> Outcome:
        now = self.clock.now()

        known = self._known(connection, arrival)
        if known is not None:
            return known

        kind = classify(
            inbound, own_addresses=self.own_addresses, own_domains=self.own_domains
        )
        if kind is Kind.HUMAN and inbound.sender is None:
            return self._hold(
                connection,
                arrival,
                "no sender address: the message has no usable From, Sender "
                "or envelope sender, so no customer can be told apart",
            )

        found, reused = self.ladder.find(connection, inbound)
        flags = ["reused-message-id"] if reused else []

        if kind.is_machine:
            # Machine mail is recorded on the ticket it concerns and changes
            # nothing: no ticket, no reply, no reopen (never answer a robot).
            ticket = found.ticket
            message_pk = self._store_message(
                connection, arrival, kind, ticket, None, flags=flags, now=now
            )
            if any_held:
                self._release_quarantined(connection, arrival.digest, message_pk, now)
            number = ticket.number if ticket else None
            return Outcome("machine", number, message_pk, detail=kind.value)

        assert inbound.sender is not None
        customer_id, known_customer = self._customer_for(
            connection, inbound.sender, now
        )
        ticket, status = self._apply(connection, found, customer_id, inbound, now)
        message_pk = self._store_message(
            connection, arrival, kind, ticket, customer_id, flags=flags, now=now
        )
        if any_held:
            self._release_quarantined(connection, arrival.digest, message_pk, now)
        others = self._participants(inbound, customer_id, ticket)
        tickets.add_participants(connection, ticket.id, others)

        queued = 0
        wanted = arrival.acknowledge and status == "created"
        if wanted and self._should_acknowledge(connection, inbound, known_customer):
            self._enqueue_ack(connection, ticket, inbound, now)
            queued = 1

        return Outcome(status, ticket.number, message_pk, queued_sends=queued)

    def _known(self, connection: Connection, arrival: Arrival) -> Outcome | None:
        """An Outcome("duplicate") when this input was stored before."""
        if arrival.source_key is not None:
            seen = connection.execute(
                SOURCE_SEEN, {"source": arrival.source, "key": arrival.source_key}
            ).first()
            if seen is not None:
                return self._duplicate_of(connection, seen[0], seen[1])

        same = connection.scalar(SAME_CONTENT, {"digest": arrival.digest})
        if same is None:
            return None
        self._record_source(connection, arrival, message_pk=same)

        return self._duplicate_of(connection, same, None)

    def _duplicate_of(
        self, connection: Connection, message_pk: int | None, quarantine_id: int | None
    ) -> Outcome:
        number = None
        if message_pk is not None:
            number = tickets.number_of_message(connection, message_pk)
        connection.execute(COUNT_DUPLICATE)

        return Outcome("duplicate", number, message_pk, quarantine_id=quarantine_id)

    def _store_message(
        self,
        connection: Connection,
        arrival: Arrival,
        kind: Kind,
        ticket: TicketRef | None,
        customer_id: int | None,
        *,
        flags: list[str],
        now: datetime,
    ) -> int:
        inbound = arrival.inbound
        assert inbound is not None
        message_pk: int = connection.execute(
            INSERT_MESSAGE,
            {
                "ticket_id": ticket.id if ticket else None,
                "direction": "in",
                "channel": inbound.channel.value,
                "kind": kind.value,
                "author": "customer",
                "source": arrival.source,
                "customer_id": customer_id,
                "agent_id": None,
                "message_id": inbound.message_id,
                "in_reply_to": " ".join(inbound.in_reply_to) or None,
                "content_hash": arrival.digest,
                "sender": inbound.sender.email if inbound.sender else "",
                "recipients": [a.email for a in [*inbound.to, *inbound.cc]],
                "subject": inbound.subject,
                "text": inbound.text,
                "html": inbound.html,
                "raw": inbound.raw,
                "defects": inbound.defects,
                "flags": flags,
                "sent_date": inbound.date,
                "received_at": now,
                "status": "stored",
            },
        ).scalar_one()
        if inbound.attachments:
            connection.execute(
                INSERT_ATTACHMENT,
                [
                    {
                        "message_pk": message_pk,
                        "filename": part.filename,
                        "content_type": part.content_type,
                        "content_id": part.content_id,
                        "inline": part.inline,
                        "size": len(part.content),
                        "content": part.content,
                    }
                    for part in inbound.attachments
                ],
            )
        self._record_source(connection, arrival, message_pk=message_pk)

        return message_pk

    def _record_source(
        self,
        connection: Connection,
        arrival: Arrival,
        *,
        message_pk: int | None = None,
        quarantine_id: int | None = None,
    ) -> None:
        if arrival.source_key is None:
            return
        connection.execute(
            INSERT_SOURCE_KEY,
            {
                "source": arrival.source,
                "key": arrival.source_key,
                "message_pk": message_pk,
                "quarantine_id": quarantine_id,
                "created_at": self.clock.now(),
            },
        )

    def _release_quarantined(
        self, connection: Connection, digest: str, message_pk: int, now: datetime
    ) -> None:
        connection.execute(
            RELEASE_HELD, {"digest": digest, "now": now, "stored_pk": message_pk}
        )

    def _customer_for(
        self, connection: Connection, sender: Address, now: datetime
    ) -> tuple[int, bool]:
        """The sender's customer id, and whether the customer was known."""
        customer_id = connection.scalar(CUSTOMER_BY_EMAIL, {"email": sender.email})
        if customer_id is not None:
            return int(customer_id), True

        customer_id = connection.execute(
            INSERT_CUSTOMER,
            {"name": sender.name, "company": "", "created_at": now},
        ).scalar_one()
        connection.execute(
            INSERT_CONTACT,
            {"customer_id": customer_id, "kind": "email", "value": sender.email},
        )

        return int(customer_id), False

    def _apply(
        self,
        connection: Connection,
        found: tickets.Found,
        customer_id: int,
        inbound: Inbound,
        now: datetime,
    ) -> tuple[TicketRef, Status]:
        """Create, append to or reopen a ticket for a customer's message."""
        ticket = found.ticket
        channel = inbound.channel.value

        if ticket is None:
            new = tickets.open_ticket(
                connection,
                customer_id,
                inbound.subject,
                channel,
                now,
                linked=found.linked,
            )
            return new, "created"

        if ticket.status != "resolved":
            tickets.touch(connection, ticket, now)
            return ticket, "appended"

        # A survey answer is recorded on the resolved ticket; it never reopens.
        if surveys.take_answer(connection, ticket.id, inbound.text, now):
            return ticket, "appended"

        assert ticket.resolved_at is not None
        if now - ticket.resolved_at <= self.reopen_window:
            tickets.reopen(connection, ticket, now, actor=customer_email(inbound))
            return ticket, "reopened"

        # Past the reopen window a reply starts a new ticket linked to the old.
        new = tickets.open_ticket(
            connection, customer_id, inbound.subject, channel, now, linked=ticket
        )
        return new, "created"

    def _participants(
        self, inbound: Inbound, customer_id: int, ticket: TicketRef
    ) -> list[str]:
        """Addresses to remember on the ticket besides its customer's own.

        The ticket's customer is a participant through their contact
        points; a sender who is someone else (a colleague on the thread)
        and everyone in Cc join the ticket's participants.
        """
        addresses = list(inbound.cc)
        if inbound.sender is not None and customer_id != ticket.customer_id:
            addresses.append(inbound.sender)

        return [a.email for a in addresses if a.email not in self.own_addresses]

    def _should_acknowledge(
        self, connection: Connection, inbound: Inbound, known_customer: bool
    ) -> bool:
        if not self.settings.tickets.acknowledge or wants_no_reply(inbound):
            return False
        recipient = self._reply_address(inbound)
        if not known_customer and recipient == inbound.sender:
            return True  # a contact created just now has never bounced

        return not connection.scalar(UNDELIVERABLE, {"email": recipient.email})

    def _reply_address(self, inbound: Inbound) -> Address:
        assert inbound.sender is not None
        for address in inbound.reply_to:
            if address.email not in self.own_addresses:
                return address
        return inbound.sender

    def _enqueue_ack(
        self, connection: Connection, ticket: TicketRef, inbound: Inbound, now: datetime
    ) -> None:
        mail = self.composer.acknowledgement(
            ticket_number=ticket.number,
            subject=inbound.subject,
            to=self._reply_address(inbound),
            inbound=inbound,
        )
        enqueue_email(connection, ticket.id, mail, kind="ack", when=now)

    def _hold(self, connection: Connection, arrival: Arrival, reason: str) -> Outcome:
        now = self.clock.now()
        if arrival.source_key is not None:
            seen = connection.execute(
                SOURCE_SEEN, {"source": arrival.source, "key": arrival.source_key}
            ).first()
            if seen is not None:
                return self._duplicate_of(connection, seen[0], seen[1])

        held_id = connection.scalar(
            select(quarantine_table.c.id).where(
                quarantine_table.c.content_hash == arrival.digest
            )
        )
        if held_id is None:
            held_id = connection.execute(
                insert(quarantine_table).returning(quarantine_table.c.id),
                {
                    "source": arrival.source,
                    "reason": reason,
                    "content_hash": arrival.digest,
                    "raw": arrival.raw,
                    "size": len(arrival.raw),
                    "status": "held",
                    "created_at": now,
                },
            ).scalar_one()
        else:
            connection.execute(
                update(quarantine_table)
                .where(quarantine_table.c.id == held_id)
                .values(reason=reason, retried_at=now)
            )
        self._record_source(connection, arrival, quarantine_id=held_id)

        return Outcome("quarantined", quarantine_id=held_id, detail=reason)


class _ProcessingFailed(Exception):
    """Processing one arrival raised; its ``__cause__`` says what."""


def _log_outcome(arrival: Arrival, outcome: Outcome) -> None:
    inbound = arrival.inbound
    if outcome.status == "quarantined":
        log.warning(
            "quarantined source=%s key=%s id=%s reason=%s",
            arrival.source,
            arrival.source_key or "-",
            outcome.quarantine_id,
            outcome.detail,
        )
        return

    log.info(
        "accepted channel=%s source=%s key=%s message_id=%s ticket=%s outcome=%s%s",
        inbound.channel if inbound else "-",
        arrival.source,
        arrival.source_key or "-",
        (inbound.message_id if inbound else None) or "-",
        outcome.ticket_number or "-",
        outcome.status,
        f" detail={outcome.detail}" if outcome.detail else "",
    )


def customer_email(inbound: Inbound) -> str:
    return inbound.sender.email if inbound.sender else ""


def enqueue_email(
    connection: Connection,
    ticket_id: int | None,
    mail: OutgoingEmail,
    *,
    kind: str,
    when: datetime,
    author: str = "system",
) -> int:
    """Store an outbound message and its outbox row in the caller's
    transaction; the outbox row's id."""
    row: dict[str, Any] = {
        "ticket_id": ticket_id,
        "direction": "out",
        "channel": "email",
        "kind": kind,
        "author": author,
        "source": "",
        "message_id": mail.message_id,
        "content_hash": None,
        "sender": mail.envelope_from,
        "recipients": mail.recipients,
        "subject": mail.subject,
        "text": mail.text,
        "raw": mail.raw,
        "defects": [],
        "flags": [],
        "received_at": when,
        "status": "queued",
    }
    message_pk = connection.execute(INSERT_MESSAGE, row).scalar_one()

    return int(
        connection.execute(
            INSERT_OUTBOX,
            {
                "message_pk": message_pk,
                "channel": "email",
                "envelope_from": mail.envelope_from,
                "recipients": mail.recipients,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": when,
                "last_error": "",
                "claimed_by": "",
                "created_at": when,
            },
        ).scalar_one()
    )
