"""Report queries: the owner's numbers and the digest's rows.

The definitions, once (the README's "Numbers" repeats them for owners):

- First response time: opened-at to the first agent reply sent to the
  customer, that is an outbound message written by an agent (author
  ``agent``, kind ``reply``) that did not fail. Acknowledgements, internal
  notes, resolution notes and machine mail never count. Measured for the
  tickets whose first response falls in the period.
- Resolution time: opened-at to the last resolution, so a reopen continues
  the clock. Measured for the tickets resolved now whose last resolution
  falls in the period.
- Touches: agent replies plus agent commands on a ticket, for the tickets
  resolved in the period.
- Volume: tickets opened per local day and channel.
- Reopen rate: of the tickets resolved in the period, the share reopened
  after that resolution, within the period.
- NPS: percent of 9-10 answers minus percent of 0-6 answers; CSAT: percent
  of 4-5 answers, with the mean beside it; both over the answers given in
  the period, with their counts.

Medians and 90th percentiles interpolate linearly between the sorted
values: the p-th percentile of n values sits at position p × (n − 1).
Per agent, a first response belongs to the agent who sent it; every other
number belongs to the ticket's assignee.

Every function reads with a fixed number of queries, whatever the number of
tickets: nothing here queries once per ticket.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, tzinfo
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Connection, Row, and_, case, func, or_, select
from sqlalchemy.orm import aliased

from store.models import (
    Agent,
    ContactPoint,
    Customer,
    Event,
    MailboxTally,
    Message,
    Survey,
    Ticket,
)

OPEN = ("open", "pending")
EXCERPT_CHARS = 300


def agent_reply() -> ColumnElement[bool]:
    """The messages that count as a response to the customer."""
    return and_(
        Message.direction == "out",
        Message.author == "agent",
        Message.kind == "reply",
        Message.status != "failed",
    )


# -- statistics ---------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` percentile of ``values``, interpolated; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)

    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


@dataclass(frozen=True, slots=True)
class Spread:
    """How a measure is spread: count, median and 90th percentile."""

    count: int
    median: float | None
    p90: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(len(values), percentile(values, 0.5), percentile(values, 0.9))


@dataclass(frozen=True, slots=True)
class Nps:
    count: int
    promoters: int
    passives: int
    detractors: int
    score: float | None  # -100 to 100

    @classmethod
    def of(cls, scores: Sequence[int]) -> Nps:
        promoters = sum(score >= 9 for score in scores)
        detractors = sum(score <= 6 for score in scores)
        passives = len(scores) - promoters - detractors
        value = None
        if scores:
            value = 100 * (promoters - detractors) / len(scores)

        return cls(len(scores), promoters, passives, detractors, value)


@dataclass(frozen=True, slots=True)
class Csat:
    count: int
    satisfied: int
    percent: float | None  # of 4-5 answers
    mean: float | None

    @classmethod
    def of(cls, scores: Sequence[int]) -> Csat:
        satisfied = sum(score >= 4 for score in scores)
        if not scores:
            return cls(0, 0, None, None)

        return cls(
            len(scores),
            satisfied,
            100 * satisfied / len(scores),
            statistics.fmean(scores),
        )


# -- the report -----------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    """The numbers for one agent, or for everyone."""

    first_response: Spread = field(default_factory=lambda: Spread.of([]))
    resolution: Spread = field(default_factory=lambda: Spread.of([]))
    touches: Spread = field(default_factory=lambda: Spread.of([]))
    touches_mean: float | None = None
    resolved: int = 0
    reopened: int = 0
    reopen_rate: float | None = None  # percent
    nps: Nps = field(default_factory=lambda: Nps.of([]))
    csat: Csat = field(default_factory=lambda: Csat.of([]))


@dataclass(frozen=True, slots=True)
class _Collected:
    """Per-agent lists of raw values, before they become ``Figures``."""

    first_response: list[float] = field(default_factory=list)
    resolution: list[float] = field(default_factory=list)
    touches: list[float] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    reopened: list[int] = field(default_factory=list)
    nps: list[int] = field(default_factory=list)
    csat: list[int] = field(default_factory=list)

    def figures(self) -> Figures:
        resolved = len(self.resolved)
        reopened = len(self.reopened)
        return Figures(
            first_response=Spread.of(self.first_response),
            resolution=Spread.of(self.resolution),
            touches=Spread.of(self.touches),
            touches_mean=statistics.fmean(self.touches) if self.touches else None,
            resolved=resolved,
            reopened=reopened,
            reopen_rate=100 * reopened / resolved if resolved else None,
            nps=Nps.of(self.nps),
            csat=Csat.of(self.csat),
        )


def first_responses(
    connection: Connection, since: datetime, until: datetime
) -> list[tuple[int, float, int | None]]:
    """(ticket id, seconds, responding agent) for first responses in the period."""
    ranked = (
        select(
            Message.ticket_id,
            Message.received_at,
            Message.agent_id,
            func.row_number()
            .over(
                partition_by=Message.ticket_id,
                order_by=(Message.received_at, Message.id),
            )
            .label("rank"),
        )
        .where(agent_reply(), Message.ticket_id.is_not(None))
        .subquery()
    )
    rows = connection.execute(
        select(ranked.c.ticket_id, ranked.c.received_at, ranked.c.agent_id)
        .add_columns(Ticket.opened_at)
        .join(Ticket, Ticket.id == ranked.c.ticket_id)
        .where(
            ranked.c.rank == 1,
            ranked.c.received_at >= since,
            ranked.c.received_at < until,
        )
    )

    return [
        (ticket_id, (at - opened).total_seconds(), agent_id)
        for ticket_id, at, agent_id, opened in rows
    ]


def resolutions(
    connection: Connection, since: datetime, until: datetime
) -> list[tuple[int, float, int | None]]:
    """(ticket id, seconds, assignee) for tickets resolved in the period."""
    rows = connection.execute(
        select(Ticket.id, Ticket.opened_at, Ticket.resolved_at, Ticket.assignee_id)
        .where(
            Ticket.status == "resolved",
            Ticket.resolved_at >= since,
            Ticket.resolved_at < until,
        )
        .order_by(Ticket.id)
    )

    return [
        (ticket_id, (resolved - opened).total_seconds(), assignee)
        for ticket_id, opened, resolved, assignee in rows
        if resolved is not None
    ]


def report(
    connection: Connection, since: datetime, until: datetime, zone: tzinfo
) -> dict[str, Any]:
    """Every number of ``intake report`` for [since, until), as plain data."""
    overall = _Collected()
    per_agent: defaultdict[int | None, _Collected] = defaultdict(_Collected)

    def both(agent: int | None) -> tuple[_Collected, _Collected]:
        return overall, per_agent[agent]

    for _, seconds, agent in first_responses(connection, since, until):
        for collected in both(agent):
            collected.first_response.append(seconds)

    resolved = resolutions(connection, since, until)
    touches = _touches(connection, [ticket_id for ticket_id, _, _ in resolved])
    for ticket_id, seconds, assignee in resolved:
        for collected in both(assignee):
            collected.resolution.append(seconds)
            collected.touches.append(touches[ticket_id])

    for ticket_id, assignee, reopened in _reopens(connection, since, until):
        for collected in both(assignee):
            collected.resolved.append(ticket_id)
            if reopened:
                collected.reopened.append(ticket_id)

    answers = connection.execute(
        select(Survey.scale, Survey.score, Ticket.assignee_id)
        .join(Ticket, Ticket.id == Survey.ticket_id)
        .where(Survey.answered_at >= since, Survey.answered_at < until)
    )
    for scale, score, assignee in answers:
        if score is None:
            continue
        for collected in both(assignee):
            (collected.nps if scale == "nps" else collected.csat).append(score)

    agents = {
        agent_id: (name, email)
        for agent_id, name, email in connection.execute(
            select(Agent.id, Agent.name, Agent.email)
        )
    }
    rows = []
    for agent_id, collected in per_agent.items():
        name, email = agents.get(agent_id, ("(no agent)", "")) if agent_id else ("", "")
        rows.append(
            {
                "agent": name or "(unassigned)",
                "email": email,
                **asdict(collected.figures()),
            }
        )
    rows.sort(key=lambda row: (row["agent"] == "(unassigned)", row["agent"]))

    return {
        "since": since.isoformat(timespec="seconds"),
        "until": until.isoformat(timespec="seconds"),
        "overall": asdict(overall.figures()),
        "agents": rows,
        "volume": volume(connection, since, until, zone),
    }


def _touches(connection: Connection, ticket_ids: list[int]) -> Counter[int]:
    """Agent replies plus agent commands on each of ``ticket_ids``."""
    touches: Counter[int] = Counter(dict.fromkeys(ticket_ids, 0))
    if not ticket_ids:
        return touches
    wanted = set(ticket_ids)

    replies = connection.execute(
        select(Message.ticket_id, func.count())
        .where(agent_reply(), Message.ticket_id.is_not(None))
        .group_by(Message.ticket_id)
    )
    commands = connection.execute(
        select(Event.ticket_id, func.count())
        .where(Event.kind == "command")
        .group_by(Event.ticket_id)
    )
    for ticket_id, count in [*replies, *commands]:
        if ticket_id in wanted:
            touches[ticket_id] += count

    return touches


def _reopens(
    connection: Connection, since: datetime, until: datetime
) -> Iterable[tuple[int, int | None, bool]]:
    """(ticket id, assignee, reopened after) for tickets resolved in the period."""
    rows = connection.execute(
        select(Event.ticket_id, Event.kind, Ticket.assignee_id)
        .join(Ticket, Ticket.id == Event.ticket_id)
        .where(
            Event.kind.in_(("resolved", "reopened")),
            Event.at >= since,
            Event.at < until,
        )
        .order_by(Event.at, Event.id)
    )
    assignees: dict[int, int | None] = {}
    reopened: dict[int, bool] = {}
    for ticket_id, kind, assignee in rows:
        if kind == "resolved":
            assignees[ticket_id] = assignee
            reopened.setdefault(ticket_id, False)
        elif ticket_id in reopened:
            reopened[ticket_id] = True

    return [
        (ticket_id, assignees[ticket_id], again)
        for ticket_id, again in reopened.items()
    ]


def volume(
    connection: Connection, since: datetime, until: datetime, zone: tzinfo
) -> list[dict[str, Any]]:
    """Tickets opened per local day and channel."""
    counts: Counter[tuple[date, str]] = Counter()
    for opened, channel in connection.execute(
        select(Ticket.opened_at, Ticket.channel).where(
            Ticket.opened_at >= since, Ticket.opened_at < until
        )
    ):
        counts[opened.astimezone(zone).date(), channel] += 1

    return [
        {"day": day.isoformat(), "channel": channel, "tickets": count}
        for (day, channel), count in sorted(counts.items())
    ]


# -- the digest -----------------------------------------------------------------


class OpenTicket(NamedTuple):
    """An open or pending ticket with what the digest shows of it."""

    id: int
    number: int
    status: str
    priority: str
    channel: str
    subject: str
    opened_at: datetime
    due_at: datetime | None
    last_activity_at: datetime
    customer: str
    company: str
    email: str | None
    phone: str | None
    assignee: str | None
    assignee_email: str | None
    excerpt: str | None
    last_from: str  # who wrote last: "in" the customer, "out" an agent


def open_tickets(
    connection: Connection, ids: Collection[int] | None = None
) -> list[OpenTicket]:
    """Every open and pending ticket (or those of ``ids``), oldest opened
    first, in one query.

    The per-ticket parts (first email and phone, the first customer message,
    who wrote last) are correlated subqueries answered from indexes;
    grouping all messages instead grows faster than the number of tickets.
    The rows are sorted here: the database would sort them wide, on disk.
    """
    first = aliased(Message)
    customer_wrote = and_(Message.direction == "in", Message.kind == "human")
    # An agent's reply after the customer's last message (or after the
    # opening, when the ticket came by phone): the customer's turn.
    customer_at = _about_ticket(func.max(Message.received_at), customer_wrote)
    agent_at = _about_ticket(func.max(Message.received_at), agent_reply())
    last_from = case(
        (agent_at > func.coalesce(customer_at, Ticket.opened_at), "out"), else_="in"
    )
    columns: dict[str, Any] = {
        "id": Ticket.id,
        "number": Ticket.number,
        "status": Ticket.status,
        "priority": Ticket.priority,
        "channel": Ticket.channel,
        "subject": Ticket.subject,
        "opened_at": Ticket.opened_at,
        "due_at": Ticket.due_at,
        "last_activity_at": Ticket.last_activity_at,
        "customer": Customer.name,
        "company": Customer.company,
        "email": first_contact("email"),
        "phone": first_contact("phone"),
        "assignee": Agent.name,
        "assignee_email": Agent.email,
        "excerpt": func.substr(first.text, 1, EXCERPT_CHARS),
        "last_from": last_from,
    }
    query = (
        select(*(columns[name].label(name) for name in OpenTicket._fields))
        .join(Customer, Customer.id == Ticket.customer_id)
        .outerjoin(Agent, Agent.id == Ticket.assignee_id)
        .outerjoin(
            first, first.id == _about_ticket(func.min(Message.id), customer_wrote)
        )
        .where(Ticket.status.in_(OPEN))
    )
    if ids is not None:
        query = query.where(Ticket.id.in_(ids))
    rows = [OpenTicket._make(row) for row in connection.execute(query)]
    rows.sort(key=lambda row: (row.opened_at, row.number))

    return rows


def due_candidates(
    connection: Connection, opened_since: datetime
) -> list[Row[int, str, datetime, datetime | None]]:
    """(id, priority, opened at, due at) of the open tickets opened since
    ``opened_since`` or with a due date: those that may have come due."""
    rows = connection.execute(
        select(Ticket.id, Ticket.priority, Ticket.opened_at, Ticket.due_at).where(
            Ticket.status.in_(OPEN),
            or_(Ticket.opened_at >= opened_since, Ticket.due_at.is_not(None)),
        )
    )

    return list(rows)


def _about_ticket(aggregate: Any, *conditions: ColumnElement[bool]) -> Any:
    """``aggregate`` over the messages of the ticket in the outer query."""
    return (
        select(aggregate)
        .where(Message.ticket_id == Ticket.id, *conditions)
        .correlate(Ticket)
        .scalar_subquery()
    )


def first_contact(kind: str) -> Any:
    """The first recorded contact point of ``kind`` of the outer ticket's
    customer."""
    return (
        select(ContactPoint.value)
        .where(
            ContactPoint.customer_id == Ticket.customer_id, ContactPoint.kind == kind
        )
        .order_by(ContactPoint.id)
        .limit(1)
        .correlate(Ticket)
        .scalar_subquery()
    )


def counts_since(connection: Connection, since: datetime) -> dict[str, int]:
    """Tickets opened and resolved since ``since`` (resolved: and still so)."""
    opened = connection.scalar(
        select(func.count()).select_from(Ticket).where(Ticket.opened_at >= since)
    )
    resolved = connection.scalar(
        select(func.count())
        .select_from(Ticket)
        .where(Ticket.status == "resolved", Ticket.resolved_at >= since)
    )

    return {"new": int(opened or 0), "resolved": int(resolved or 0)}


def mailbox_reconciliation(
    connection: Connection, since_day: date
) -> list[dict[str, Any]]:
    """Per mailbox from ``since_day`` (UTC days): arrived, imported, waiting.

    ``waiting`` is what the last check left above the cursor.
    """
    rows = connection.execute(
        select(
            MailboxTally.mailbox,
            MailboxTally.on_server,
            MailboxTally.imported,
            MailboxTally.waiting,
        )
        .where(MailboxTally.day >= since_day.isoformat())
        .order_by(MailboxTally.mailbox, MailboxTally.day)
    )
    found: dict[str, dict[str, Any]] = {}
    for mailbox, on_server, imported, waiting in rows:
        entry = found.setdefault(
            mailbox, {"mailbox": mailbox, "arrived": 0, "imported": 0, "waiting": 0}
        )
        entry["arrived"] += on_server
        entry["imported"] += imported
        entry["waiting"] = waiting

    return list(found.values())


def recently_resolved(
    connection: Connection, since: datetime, until: datetime
) -> list[Any]:
    """Tickets resolved in [since, until) and still resolved, for the check-in:
    the customer's contact details, the assignee and any survey answer."""
    query = (
        select(
            Ticket.id,
            Ticket.number,
            Ticket.subject,
            Ticket.channel,
            Ticket.opened_at,
            Ticket.resolved_at,
            Customer.name.label("customer"),
            Customer.company,
            first_contact("email").label("email"),
            first_contact("phone").label("phone"),
            Agent.name.label("assignee"),
            Survey.scale,
            Survey.score,
            Survey.comment,
        )
        .join(Customer, Customer.id == Ticket.customer_id)
        .outerjoin(Agent, Agent.id == Ticket.assignee_id)
        .outerjoin(Survey, Survey.ticket_id == Ticket.id)
        .where(
            Ticket.status == "resolved",
            Ticket.resolved_at >= since,
            Ticket.resolved_at < until,
        )
        .order_by(Ticket.resolved_at, Ticket.number)
    )

    return list(connection.execute(query))
