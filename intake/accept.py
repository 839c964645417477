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

Mail from an agent is told apart by an in-memory lookup of the configured
addresses. On a ticket the agent proved they were sent (our Message-ID in
the headers, or the signed reply address), its commands change the ticket
and its text, stripped of quotes and signature, goes to the customer.
Everyone else's mail passes the flood limits, then opens or joins a ticket
and notifies the agents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from intake import replies, surveys, tickets
from intake.agents import Agent, Commands, Roster, looks_like_commands, read_commands
from intake.classify import classify, delivery_failures, wants_no_reply
from intake.clock import Clock
from intake.config import AgentSettings, Settings
from intake.domain import Address, Channel, Inbound, Kind
from intake.errors import StoreUnavailable
from intake.floods import FloodGate, Over
from intake.threads import PROVEN, Ladder, ReplyAddresses
from intake.tickets import TicketRef
from store.engine import SessionFactory
from store.models import Base
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
    "created",
    "appended",
    "reopened",
    "duplicate",
    "machine",
    "quarantined",
    "flooded",
    "agent",
]
# Called in the transaction that resolved a ticket (connection, ticket id,
# time): the notifier queues the customer's resolution note there.
ResolutionHook = Callable[[Connection, int, datetime], object]
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
# Several rows in one statement; the rows come back in no promised order,
# so each carries the key that names it.
INSERT_OUTBOX = insert(outbox_table).returning(
    outbox_table.c.message_pk, outbox_table.c.id
)
INSERT_MESSAGES = insert(messages).returning(messages.c.message_id, messages.c.id)
ANY_HELD = (
    select(quarantine_table.c.id).where(quarantine_table.c.status == "held").limit(1)
)
# What the customer saw of a ticket, oldest first: their mail and ours.
CUSTOMER_FACING = ("ack", "reply", "resolution")
THREAD = (
    select(messages.c.direction, messages.c.sender, messages.c.message_id)
    .where(
        messages.c.ticket_id == bindparam("ticket_id"),
        or_(
            and_(messages.c.direction == "in", messages.c.kind == "human"),
            and_(
                messages.c.direction == "out",
                messages.c.kind.in_(CUSTOMER_FACING),
            ),
        ),
    )
    .order_by(messages.c.id)
)
FIRST_EMAIL = (
    select(contacts.c.value)
    .where(
        contacts.c.customer_id == bindparam("customer_id"),
        contacts.c.kind == "email",
    )
    .order_by(contacts.c.id)
    .limit(1)
)
NAME_OF_ADDRESS = (
    select(customers.c.name)
    .join(contacts, contacts.c.customer_id == customers.c.id)
    .where(contacts.c.kind == "email", contacts.c.value == bindparam("email"))
)
# Delivery reports: the messages they are about, and what they change.
OURS = select(
    messages.c.id, messages.c.ticket_id, messages.c.message_id, messages.c.recipients
).where(
    messages.c.message_id.in_(bindparam("ids", expanding=True)),
    messages.c.direction == "out",
)
MESSAGES_FAILED = (
    update(messages)
    .where(messages.c.id.in_(bindparam("pks", expanding=True)))
    .values(status="failed")
)
OUTBOX_FAILED = (
    update(outbox_table)
    .where(outbox_table.c.message_pk.in_(bindparam("pks", expanding=True)))
    .values(status="failed", last_error=bindparam("reason"))
)
UNDELIVERABLE_NOW = (
    update(contacts)
    .where(
        contacts.c.kind == "email",
        contacts.c.value.in_(bindparam("addresses", expanding=True)),
        contacts.c.undeliverable_at.is_(None),
    )
    .values(undeliverable_at=bindparam("now"))
)
_agents = Base.metadata.tables["agents"]


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


@dataclass(frozen=True, slots=True)
class TicketView:
    """What a notification tells the agents about a ticket."""

    number: int
    subject: str
    status: str
    priority: str
    assignee: str  # the agent's name; "" when nobody has it
    customer: Address
    event: str  # created | appended | reopened


class Composer(Protocol):
    """Renders what we send; implemented by the notifier."""

    def acknowledgement(
        self, *, ticket_number: int, subject: str, to: Address, inbound: Inbound
    ) -> OutgoingEmail: ...

    def notification(
        self,
        *,
        to: Sequence[Address],
        ticket: TicketView,
        inbound: Inbound,
        reply_to: str,
    ) -> OutgoingEmail: ...

    def agent_reply(
        self,
        *,
        ticket_number: int,
        subject: str,
        text: str,
        agent_name: str,
        to: Address,
        in_reply_to: str | None,
        references: Sequence[str],
    ) -> OutgoingEmail: ...

    def notice(
        self,
        *,
        to: Address,
        explanation: str,
        problems: Sequence[str],
        inbound: Inbound,
        ticket_number: int | None,
    ) -> OutgoingEmail: ...

    def flood_warning(
        self,
        *,
        to: Address,
        what: str,
        limit: int,
        window_minutes: int,
        inbound: Inbound,
    ) -> OutgoingEmail: ...


@dataclass(slots=True)
class _Sends:
    """Mail queued while one message is applied, written in one go."""

    mails: list[tuple[OutgoingEmail, str, str, int | None]] = field(
        default_factory=list
    )

    def add(
        self,
        mail: OutgoingEmail,
        kind: str,
        *,
        author: str = "system",
        agent_id: int | None = None,
    ) -> None:
        self.mails.append((mail, kind, author, agent_id))


class Intake:
    """The domain's entry point, built once per process with its dependencies."""

    def __init__(
        self,
        session_factory: SessionFactory,
        clock: Clock,
        settings: Settings,
        composer: Composer,
        *,
        on_resolved: ResolutionHook | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.settings = settings
        self.composer = composer
        self.on_resolved = on_resolved
        self.own_addresses = frozenset({settings.support_address})
        self.own_domains = frozenset({settings.message_id_domain})
        secret = settings.tickets.reply_key
        self.reply_addresses = (
            ReplyAddresses(secret, settings.support_address, settings.smtp.domains)
            if secret
            else None
        )
        self.ladder = Ladder(settings.tickets.subject_prefix, self.reply_addresses)
        self.reopen_window = timedelta(days=settings.tickets.reopen_days)
        self.floods = FloodGate(settings.limits)
        self.roster = self._register_agents(settings.agents)

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
        stored = _Stored(arrival, flags, any_held, now)

        if kind.is_machine:
            return self._machine(connection, stored, kind, found.ticket)

        assert inbound.sender is not None
        agent = self.roster.by_email(inbound.sender.email)
        if agent is not None:
            handled = self._from_agent(connection, stored, agent, found)
            if handled is not None:
                return handled

        # Only live mail is limited: an import of old mail has its own pace.
        if arrival.acknowledge and agent is None:
            ticket_id = found.ticket.id if found.ticket else None
            over = self.floods.over(connection, inbound.sender.email, ticket_id, now)
            if over is not None:
                return self._flooded(connection, stored, over, found.ticket)

        return self._from_customer(connection, stored, found)

    def _machine(
        self,
        connection: Connection,
        stored: _Stored,
        kind: Kind,
        ticket: TicketRef | None,
    ) -> Outcome:
        """Machine mail is recorded on the ticket it concerns and changes
        nothing: no ticket, no reply, no reopen (never answer a robot). A
        delivery report marks the message it is about as failed."""
        if kind is Kind.BOUNCE:
            ticket = self._bounced(connection, stored.inbound, stored.now) or ticket
        message_pk = self._store_message(connection, stored, kind.value, ticket)
        number = ticket.number if ticket else None

        return Outcome("machine", number, message_pk, detail=kind.value)

    def _from_customer(
        self, connection: Connection, stored: _Stored, found: tickets.Found
    ) -> Outcome:
        inbound, now = stored.inbound, stored.now
        assert inbound.sender is not None
        customer_id, known_customer = self._customer_for(
            connection, inbound.sender, now
        )
        ticket, status = self._apply(connection, found, customer_id, inbound, now)
        message_pk = self._store_message(
            connection, stored, Kind.HUMAN.value, ticket, customer_id=customer_id
        )
        others = self._participants(inbound, customer_id, ticket)
        tickets.add_participants(connection, ticket.id, others)

        sends = _Sends()
        live = stored.arrival.acknowledge
        if live and looks_like_commands(inbound.text):
            self._refuse_commands(connection, sends, inbound, ticket, known_customer)
        elif (
            live
            and status == "created"
            and self.settings.tickets.acknowledge
            and self._may_answer(connection, inbound, known_customer)
        ):
            sends.add(self._acknowledgement(ticket, inbound), "ack")
        # A survey answer leaves its ticket resolved and needs nobody's eyes.
        answered_survey = status == "appended" and ticket.status == "resolved"
        if live and self.roster and not answered_survey:
            sends.add(self._notification(ticket, status, inbound), "notification")
        queued = self._queue(connection, ticket.id, sends, now)

        return Outcome(status, ticket.number, message_pk, queued_sends=queued)

    # -- mail from agents -------------------------------------------------

    def _from_agent(
        self,
        connection: Connection,
        stored: _Stored,
        agent: Agent,
        found: tickets.Found,
    ) -> Outcome | None:
        """Apply an agent's reply; None when it starts a new conversation.

        Only a ticket the agent proved they were sent (step 1 or 2 of the
        ladder) may be changed: the From header alone is easy to forge.
        """
        inbound, now = stored.inbound, stored.now
        text = replies.visible_text(inbound.text)
        commands = read_commands(
            text,
            self.roster,
            sender=agent,
            now=now,
            zone=self.settings.digest.zone,
        )
        ticket = found.ticket if found.step in PROVEN else None
        wants_ticket = commands.commands or commands.problems or commands.note
        if ticket is None and not wants_ticket and found.linked is None:
            return None  # a new conversation, as from anyone

        sends = _Sends()
        if ticket is None:
            message_pk = self._store_agent_mail(connection, stored, agent, None, text)
            explanation = (
                "Nothing was changed: Intake cannot tell which ticket this is "
                "about. Reply to the ticket's notification; its reply address "
                "carries the ticket's signature."
            )
            self._tell(sends, agent, inbound, explanation, number=None)
            queued = self._queue(connection, None, sends, now)
            return Outcome(
                "agent", None, message_pk, queued_sends=queued, detail="no ticket"
            )

        message_pk = self._store_agent_mail(connection, stored, agent, ticket, text)
        problems = commands.problems + _state_problems(ticket, commands)
        nothing = not (commands.commands or commands.text or commands.note)
        if problems or nothing:
            explanation = (
                f"Your reply was not sent and nothing was changed on ticket "
                f"{self._token(ticket)}, because:"
                if problems
                else "Your reply had no text once the quoted message and your "
                "signature were taken out, so nothing was sent to the customer."
            )
            self._tell(
                sends,
                agent,
                inbound,
                explanation,
                problems=problems,
                number=ticket.number,
            )
            queued = self._queue(connection, ticket.id, sends, now)
            detail = "rejected" if problems else "empty"
            return Outcome(
                "agent", ticket.number, message_pk, queued_sends=queued, detail=detail
            )

        self._apply_commands(
            connection, sends, commands, agent=agent, ticket=ticket, now=now
        )
        queued = self._queue(connection, ticket.id, sends, now)
        if commands.named("resolve") is not None:
            queued += self._resolved(connection, ticket, agent, now)
        names = [command.name for command in commands.commands]
        names += ["note"] if commands.note else []
        names += ["reply"] if commands.text else []

        return Outcome(
            "agent",
            ticket.number,
            message_pk,
            queued_sends=queued,
            detail=",".join(names),
        )

    def _apply_commands(
        self,
        connection: Connection,
        sends: _Sends,
        commands: Commands,
        *,
        agent: Agent,
        ticket: TicketRef,
        now: datetime,
    ) -> None:
        """Commands in a fixed order: reopen before a reply, the reply before
        the resolution, so the customer reads them in that order."""
        actor = agent.email
        for command in commands.commands:
            tickets.record(
                connection,
                ticket.id,
                "command",
                now,
                actor=actor,
                command=command.name,
                value=_shown(command.value),
            )
        if commands.note:
            tickets.record(
                connection, ticket.id, "command", now, actor=actor, command="note"
            )

        if commands.named("reopen") is not None:
            tickets.reopen(connection, ticket, now, actor=actor)
        assign = commands.named("assign")
        if assign is not None:
            assert assign.value is None or isinstance(assign.value, int)
            tickets.assign(connection, ticket, assign.value, now, actor=actor)
        priority = commands.named("priority")
        if priority is not None:
            tickets.set_priority(
                connection, ticket, str(priority.value), now, actor=actor
            )
        due = commands.named("due")
        if due is not None:
            assert isinstance(due.value, datetime)
            tickets.set_due(connection, ticket, due.value, now, actor=actor)
        if commands.note:
            self._store_note(connection, ticket, agent, commands.note, now)
        if commands.text:
            self._relay(connection, sends, agent, ticket, commands.text)

    def _relay(
        self,
        connection: Connection,
        sends: _Sends,
        agent: Agent,
        ticket: TicketRef,
        text: str,
    ) -> None:
        """The agent's words to the customer, threaded on their last mail."""
        rows = connection.execute(THREAD, {"ticket_id": ticket.id}).all()
        last = max(
            (i for i, row in enumerate(rows) if row.direction == "in"), default=-1
        )
        address = rows[last].sender if last >= 0 else None
        address = address or self._first_email(connection, ticket)
        parent = rows[last].message_id if last >= 0 else None
        # The thread up to the parent (RFC 5322 §3.6.4), its first and its
        # latest few ids: enough for every client to place the reply.
        ids = [row.message_id for row in rows[: last + 1] if row.message_id]
        references = list(dict.fromkeys(ids[:1] + ids[-9:]))

        # TODO(sms-outbox): a customer who wrote by SMS gets the reply by SMS
        # once the outbox sends SMS; until then the agent is told it was not sent.
        problem = _unreachable(connection, address)
        if problem or not address:
            explanation = (
                f"Your reply was saved on ticket {self._token(ticket)} but not "
                f"sent: {problem}. Any commands in it were applied."
            )
            self._tell(sends, agent, None, explanation, number=ticket.number)
            return

        # The name of whoever owns the address: the customer or a colleague.
        name = connection.scalar(NAME_OF_ADDRESS, {"email": address})
        mail = self.composer.agent_reply(
            ticket_number=ticket.number,
            subject=ticket.subject,
            text=text,
            agent_name=agent.name,
            to=Address(name or "", address),
            in_reply_to=parent,
            references=references,
        )
        sends.add(mail, "reply", author="agent", agent_id=agent.id)
        tickets.answered(connection, ticket, self.clock.now())

    def _resolved(
        self, connection: Connection, ticket: TicketRef, agent: Agent, now: datetime
    ) -> int:
        """``#resolve``: the same change and note as ``intake tickets resolve``;
        the number of mails that queued."""
        tickets.resolve(connection, ticket, now, actor=agent.email)
        if self.on_resolved is None:
            return 0

        return int(self.on_resolved(connection, ticket.id, now) is not None)

    def _store_agent_mail(
        self,
        connection: Connection,
        stored: _Stored,
        agent: Agent,
        ticket: TicketRef | None,
        text: str,
    ) -> int:
        """The agent's mail as it came (raw) with what they wrote (text);
        kind "agent", so nobody takes it for the customer's words."""
        return self._store_message(
            connection,
            stored,
            "agent",
            ticket,
            author="agent",
            agent_id=agent.id,
            text=text,
        )

    def _store_note(
        self,
        connection: Connection,
        ticket: TicketRef,
        agent: Agent,
        note: str,
        now: datetime,
    ) -> None:
        connection.execute(
            INSERT_MESSAGE,
            {
                **_OUTBOUND_DEFAULTS,
                "ticket_id": ticket.id,
                "channel": "email",
                "kind": "note",
                "author": "agent",
                "agent_id": agent.id,
                "sender": agent.email,
                "recipients": [],
                "subject": "",
                "text": note,
                "raw": b"",
                "received_at": now,
                "status": "stored",
            },
        )

    def _first_email(self, connection: Connection, ticket: TicketRef) -> str | None:
        found = connection.scalar(FIRST_EMAIL, {"customer_id": ticket.customer_id})
        return str(found) if found else None

    def _register_agents(self, configured: Sequence[AgentSettings]) -> Roster:
        """The configured agents, each with a row in the store (created or
        renamed here), so tickets and messages can point at them."""
        if not configured:
            return Roster([])

        wanted = {agent.email.casefold(): agent.name for agent in configured}
        with self.session_factory.begin() as session:
            connection = session.connection()
            rows = connection.execute(
                select(_agents.c.id, _agents.c.name, _agents.c.email)
            ).all()
            known = {row.email.casefold(): row for row in rows}
            for email, name in wanted.items():
                row = known.get(email)
                if row is None:
                    _insert_ignoring_conflict(
                        connection, _agents, {"name": name, "email": email}
                    )
                elif row.name != name:
                    connection.execute(
                        update(_agents).where(_agents.c.id == row.id).values(name=name)
                    )
            rows = connection.execute(
                select(_agents.c.id, _agents.c.name, _agents.c.email)
            ).all()

        return Roster(
            Agent(row.id, row.name, row.email.casefold())
            for row in rows
            if row.email.casefold() in wanted
        )

    # -- floods and bounces -----------------------------------------------

    def _flooded(
        self,
        connection: Connection,
        stored: _Stored,
        over: Over,
        ticket: TicketRef | None,
    ) -> Outcome:
        """Stored on the ticket it names, if any, and nothing more; the
        owner hears of the flood once."""
        stored.flags.append("flood")
        message_pk = self._store_message(connection, stored, Kind.HUMAN.value, ticket)
        number = ticket.number if ticket else None

        queued = 0
        flood_id = self.floods.record(connection, over, stored.now)
        owner = self.settings.owner_email
        if flood_id is not None and owner:
            what = (
                over.key if over.scope == "sender" else f"ticket {self._token(ticket)}"
            )
            mail = self.composer.flood_warning(
                to=Address("", owner),
                what=what,
                limit=over.limit,
                window_minutes=self.settings.limits.window_minutes,
                inbound=stored.inbound,
            )
            sends = _Sends()
            sends.add(mail, "flood-warning")
            pks = self._write_sends(connection, None, sends, stored.now)
            self.floods.warned(connection, flood_id, pks[0])
            queued = 1

        return Outcome(
            "flooded",
            number,
            message_pk,
            queued_sends=queued,
            detail=f"{over.scope} {over.key}",
        )

    def _bounced(
        self, connection: Connection, inbound: Inbound, now: datetime
    ) -> TicketRef | None:
        """Mark the messages a delivery report is about as failed, and a
        permanently failed address undeliverable; the ticket concerned."""
        if not inbound.report_message_ids:
            return None
        ours = connection.execute(OURS, {"ids": inbound.report_message_ids}).all()
        if not ours:
            return None

        failures = delivery_failures(inbound)
        reported = any(a.content_type in _STATUS_TYPES for a in inbound.attachments)
        if failures or not reported:
            # A report that says nothing of failure (delayed, relayed) is news
            # only; a bounce without a report is a failure of unknown kind.
            reason = "bounced: " + (
                ", ".join(f"{f.recipient} {f.status}" for f in failures) or "no details"
            )
            pks = [row.id for row in ours]
            connection.execute(MESSAGES_FAILED, {"pks": pks})
            connection.execute(OUTBOX_FAILED, {"pks": pks, "reason": reason})
        # Reports lower-case addresses at will; the contact is named as we
        # sent to it.
        as_sent = {r.lower(): r for row in ours for r in row.recipients}
        permanent = sorted(
            {as_sent.get(f.recipient, f.recipient) for f in failures if f.permanent}
        )
        if permanent:
            connection.execute(UNDELIVERABLE_NOW, {"addresses": permanent, "now": now})
        for row in ours:
            if row.ticket_id is not None:
                tickets.record(
                    connection,
                    row.ticket_id,
                    "bounced",
                    now,
                    message_id=row.message_id,
                    failed=[f"{f.recipient} {f.status}" for f in failures],
                )
        log.warning(
            "bounce: %s about %s; undeliverable now: %s",
            ",".join(f"{f.recipient} {f.status}" for f in failures) or "no details",
            ",".join(row.message_id for row in ours),
            ",".join(permanent) or "none",
        )
        ticket_id = next((row.ticket_id for row in ours if row.ticket_id), None)

        return tickets.by_id(connection, ticket_id) if ticket_id else None

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
        stored: _Stored,
        kind: str,
        ticket: TicketRef | None,
        *,
        customer_id: int | None = None,
        author: str = "customer",
        agent_id: int | None = None,
        text: str | None = None,
    ) -> int:
        arrival, inbound, now = stored.arrival, stored.inbound, stored.now
        message_pk: int = connection.execute(
            INSERT_MESSAGE,
            {
                "ticket_id": ticket.id if ticket else None,
                "direction": "in",
                "channel": inbound.channel.value,
                "kind": kind,
                "author": author,
                "source": arrival.source,
                "customer_id": customer_id,
                "agent_id": agent_id,
                "message_id": inbound.message_id,
                "in_reply_to": " ".join(inbound.in_reply_to) or None,
                "content_hash": arrival.digest,
                "sender": inbound.sender.email if inbound.sender else "",
                "recipients": [a.email for a in [*inbound.to, *inbound.cc]],
                "subject": inbound.subject,
                "text": inbound.text if text is None else text,
                "html": inbound.html,
                "raw": inbound.raw,
                "defects": inbound.defects,
                "flags": stored.flags,
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
        if stored.any_held:
            self._release_quarantined(connection, arrival.digest, message_pk, now)
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

    def _may_answer(
        self, connection: Connection, inbound: Inbound, known_customer: bool
    ) -> bool:
        """Whether an automatic answer may go to the sender at all."""
        if wants_no_reply(inbound):
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

    def _acknowledgement(self, ticket: TicketRef, inbound: Inbound) -> OutgoingEmail:
        return self.composer.acknowledgement(
            ticket_number=ticket.number,
            subject=inbound.subject,
            to=self._reply_address(inbound),
            inbound=inbound,
        )

    def _notification(
        self, ticket: TicketRef, status: Status, inbound: Inbound
    ) -> OutgoingEmail:
        """For the ticket's assignee, or every agent while it has none."""
        assert self.reply_addresses is not None  # agents require the secret
        assert inbound.sender is not None
        assignee = self.roster.by_id(ticket.assignee_id)
        to = [assignee] if assignee else list(self.roster.agents)
        view = TicketView(
            number=ticket.number,
            subject=ticket.subject or inbound.subject,
            status="open",
            priority=ticket.priority,
            assignee=assignee.name if assignee else "",
            customer=inbound.sender,
            event=status,
        )

        return self.composer.notification(
            to=[Address(agent.name, agent.email) for agent in to],
            ticket=view,
            inbound=inbound,
            reply_to=self.reply_addresses.for_ticket(ticket.number),
        )

    def _refuse_commands(
        self,
        connection: Connection,
        sends: _Sends,
        inbound: Inbound,
        ticket: TicketRef,
        known_customer: bool,
    ) -> None:
        """Someone who is not an agent wrote commands: they change nothing,
        and the sender is told so (instead of an acknowledgement)."""
        if not self._may_answer(connection, inbound, known_customer):
            return
        assert inbound.sender is not None
        lines = [
            line.strip()
            for line in replies.visible_text(inbound.text).splitlines()
            if line.strip().startswith("#")
        ]
        explanation = (
            f"Commands are taken only from agents' addresses, and "
            f"{inbound.sender.email} is not one, so these did nothing. Your "
            f"message itself is on ticket {self._token(ticket)}:"
        )
        sends.add(
            self.composer.notice(
                to=self._reply_address(inbound),
                explanation=explanation,
                problems=lines,
                inbound=inbound,
                ticket_number=ticket.number,
            ),
            "notice",
        )

    def _tell(
        self,
        sends: _Sends,
        agent: Agent,
        inbound: Inbound | None,
        explanation: str,
        *,
        problems: Sequence[str] = (),
        number: int | None,
    ) -> None:
        """A notice to an agent: what was not understood or not done."""
        about = inbound or Inbound(Channel.EMAIL, b"", None, "", "")
        mail = self.composer.notice(
            to=Address(agent.name, agent.email),
            explanation=explanation,
            problems=problems,
            inbound=about,
            ticket_number=number,
        )
        sends.add(mail, "notice")

    def _queue(
        self,
        connection: Connection,
        ticket_id: int | None,
        sends: _Sends,
        now: datetime,
    ) -> int:
        """Write what ``sends`` holds; the number of mails queued."""
        if sends.mails:
            self._write_sends(connection, ticket_id, sends, now)
        return len(sends.mails)

    def _write_sends(
        self,
        connection: Connection,
        ticket_id: int | None,
        sends: _Sends,
        now: datetime,
    ) -> list[int]:
        return [
            message_pk
            for message_pk, _ in enqueue_emails(
                connection, ticket_id, sends.mails, when=now
            )
        ]

    def _token(self, ticket: TicketRef | None) -> str:
        number = ticket.number if ticket else 0
        return f"[{self.settings.tickets.subject_prefix}{number}]"

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
    [(_, outbox_id)] = enqueue_emails(
        connection, ticket_id, [(mail, kind, author, None)], when=when
    )
    return outbox_id


def enqueue_emails(
    connection: Connection,
    ticket_id: int | None,
    mails: Sequence[tuple[OutgoingEmail, str, str, int | None]],
    *,
    when: datetime,
) -> list[tuple[int, int]]:
    """Store outbound messages, each (mail, kind, author, agent id), and one
    outbox row for each, in two statements; (message id, outbox id) pairs."""
    rows: list[dict[str, Any]] = [
        {
            **_OUTBOUND_DEFAULTS,
            "ticket_id": ticket_id,
            "channel": "email",
            "kind": kind,
            "author": author,
            "agent_id": agent_id,
            "message_id": mail.message_id,
            "sender": mail.envelope_from,
            "recipients": mail.recipients,
            "subject": mail.subject,
            "text": mail.text,
            "raw": mail.raw,
            "received_at": when,
            "status": "queued",
        }
        for mail, kind, author, agent_id in mails
    ]
    pk_of: dict[str, int] = dict(connection.execute(INSERT_MESSAGES, rows).all())
    message_pks = [pk_of[mail.message_id] for mail, *_ in mails]
    inserted = connection.execute(
        INSERT_OUTBOX,
        [
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
            }
            for message_pk, (mail, *_) in zip(message_pks, mails, strict=True)
        ],
    )
    outbox_of: dict[int, int] = dict(inserted.all())

    return [(pk, outbox_of[pk]) for pk in message_pks]


# Columns an outbound or internal message leaves at their plain values.
_OUTBOUND_DEFAULTS: dict[str, Any] = {
    "direction": "out",
    "source": "",
    "customer_id": None,
    "agent_id": None,
    "message_id": None,
    "in_reply_to": None,
    "content_hash": None,
    "html": None,
    "defects": [],
    "flags": [],
    "sent_date": None,
}
_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})


@dataclass(slots=True)
class _Stored:
    """One arrival on its way into the store, with what goes with it."""

    arrival: Arrival
    flags: list[str]
    any_held: bool
    now: datetime

    @property
    def inbound(self) -> Inbound:
        assert self.arrival.inbound is not None
        return self.arrival.inbound


def _state_problems(ticket: TicketRef, commands: Commands) -> list[str]:
    """Commands that make no sense for the ticket as it is now."""
    token = f"ticket {ticket.number}"
    problems = []
    resolved = ticket.status == "resolved"
    if commands.named("resolve") is not None and resolved:
        problems.append(f"#resolve: {token} is resolved already")
    if commands.named("reopen") is not None and not resolved:
        problems.append(f"#reopen: {token} is not resolved, it is {ticket.status}")

    return problems


def _unreachable(connection: Connection, address: str | None) -> str:
    """Why mail cannot go to ``address``; "" when it can."""
    if not address:
        return "the ticket's customer has no email address"
    if connection.scalar(UNDELIVERABLE, {"email": address}):
        return (
            f"mail to {address} bounced. Once it works again, clear it with"
            f"\n\n    intake contacts clear {address}\n\nand send your reply again"
        )
    return ""


def _shown(value: object) -> str | int | None:
    if isinstance(value, datetime):
        return value.isoformat(timespec="minutes")
    if value is None or isinstance(value, str | int):
        return value
    return str(value)


def _insert_ignoring_conflict(
    connection: Connection, table: Table, row: dict[str, Any]
) -> None:
    dialect = connection.dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    connection.execute(builder(table).on_conflict_do_nothing(), row)
