"""The owner's digest: every open ticket, oldest first, and the numbers above.

Built in three steps: ``build_digest`` reads the store with a fixed number of
queries (one for the whole ticket list), ``render`` turns the result into a
plain-text and an HTML part with Jinja2 (customer text escaped in the HTML),
and ``digest_email`` wraps both into one multipart email for the outbox.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from jinja2 import (
    Environment,
    PackageLoader,
    StrictUndefined,
    Template,
    select_autoescape,
)
from sqlalchemy import Connection

from intake.accept import OutgoingEmail
from intake.clock import Clock
from intake.config import WEEKDAYS, Settings, TargetSettings
from intake.domain import Address
from notifier.compose import ticket_token
from notifier.multipart import compose_email
from store import metrics

EXCERPT_LINES = 3
EXCERPT_CHARS = 200
SUBJECT_CHARS = 200
REPORT_WINDOW = timedelta(days=30)
# Upper bounds of the chart's age buckets; the last one is open-ended.
AGE_BUCKETS: tuple[tuple[str, timedelta | None], ...] = (
    ("under 1 day", timedelta(days=1)),
    ("1-3 days", timedelta(days=3)),
    ("3-7 days", timedelta(days=7)),
    ("1-2 weeks", timedelta(days=14)),
    ("2-4 weeks", timedelta(days=28)),
    ("over 4 weeks", None),
)
TEXT_BAR = 30  # characters of the widest bar in the text part
RENDER_CHUNK = 2000  # template output pieces joined at a time

templates = Environment(
    loader=PackageLoader("notifier", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


class Targets:
    """Expected resolution: a due date set by hand, or the priority's target.

    Hours are clock hours. Business days step over the days that are not
    working days and keep the local time of opening: a ticket opened on
    Friday at 15:00 with two business days is due on Tuesday at 15:00.
    """

    def __init__(self, settings: TargetSettings, zone: ZoneInfo) -> None:
        self.zone = zone
        self.spans = {
            priority: settings.span(priority)
            for priority in ("low", "normal", "high", "urgent")
        }
        self.working = frozenset(WEEKDAYS.index(day) for day in settings.working_days)

    def due(
        self, opened_at: datetime, priority: str, due_at: datetime | None
    ) -> datetime:
        if due_at is not None:
            return due_at
        span = self.spans.get(priority, self.spans["normal"])
        if not span.business_days:
            return opened_at + span.clock

        local = opened_at.astimezone(self.zone)
        day = working_day_after(local.date(), span.business_days, self.working)
        # The same wall-clock time on that day; zoneinfo settles DST gaps.
        return datetime.combine(day, local.time(), self.zone)

    def longest(self) -> timedelta:
        """At least the longest time any priority's target can take.

        Every seven days hold each working day once, so n business days take
        at most 7 × ceil(n / working days a week) days; one day more covers
        the time of day and DST.
        """
        longest = timedelta(0)
        for span in self.spans.values():
            weeks = -(-span.business_days // len(self.working))
            longest = max(longest, span.clock, timedelta(days=7 * weeks + 1))

        return longest


@functools.lru_cache(maxsize=4096)
def working_day_after(start: date, count: int, working: frozenset[int]) -> date:
    """The ``count``-th working day after ``start`` (weekdays 0 = Monday)."""
    day = start
    while count:
        day += timedelta(days=1)
        if day.weekday() in working:
            count -= 1

    return day


class Row(NamedTuple):
    """One open ticket as the digest shows it; times already local text.

    A named tuple: the digest builds one per open ticket, and a tuple is the
    cheapest object to build.
    """

    number: int
    status: str
    priority: str
    channel: str
    subject: str
    excerpt: str
    customer: str
    company: str
    email: str
    phone: str
    assignee: str
    opened: str
    age: str
    due: str
    overdue: bool
    last_activity: str
    waiting: str

    # The HTML shows each of these in one cell, one value a line: every
    # value written into HTML is escaped, and escaping per value is most of
    # the cost of a large digest.

    @property
    def contact(self) -> str:
        shown = (self.customer, self.company, self.email, self.phone)
        return "\n".join(value for value in shown if value)

    @property
    def handling(self) -> str:
        return f"{self.assignee}\n{self.status}, {self.priority}"

    @property
    def when_opened(self) -> str:
        return f"{self.opened}\n{self.age} ago, by {self.channel}"

    @property
    def activity(self) -> str:
        return f"{self.last_activity}\n{self.waiting}"


@dataclass(frozen=True, slots=True)
class Bucket:
    label: str
    count: int
    percent: int  # of the largest bucket, for the bar's width
    bar: str  # the text part's bar


@dataclass(frozen=True, slots=True)
class Digest:
    zone: str
    now: datetime
    scheduled_for: datetime | None  # None: sent by hand
    late: bool
    since: datetime
    open: int
    new: int
    resolved: int
    overdue: int
    became_overdue: int
    first_response: metrics.Spread
    resolution: metrics.Spread
    mailboxes: list[dict[str, Any]]
    buckets: list[Bucket]
    rows: list[Row]

    def local(self, moment: datetime, shape: str = "%a %d %b %Y %H:%M") -> str:
        return moment.astimezone(ZoneInfo(self.zone)).strftime(shape)


def build_digest(
    connection: Connection,
    settings: Settings,
    now: datetime,
    *,
    since: datetime,
    scheduled_for: datetime | None = None,
    late: bool = False,
) -> Digest:
    """Everything the digest shows, read with a fixed number of queries."""
    zone = settings.digest.zone
    targets = Targets(settings.targets, zone)

    rows = []
    ages = [0] * len(AGE_BUCKETS)
    overdue = became_overdue = 0
    with collector_paused():
        for ticket in metrics.open_tickets(connection):
            due = targets.due(ticket.opened_at, ticket.priority, ticket.due_at)
            late_now = due <= now
            overdue += late_now
            became_overdue += late_now and due > since
            age = now - ticket.opened_at
            ages[_bucket(age)] += 1
            rows.append(_row(ticket, due, late_now, age, zone))

    first_response = metrics.first_responses(connection, now - REPORT_WINDOW, now)
    resolution = metrics.resolutions(connection, now - REPORT_WINDOW, now)
    counts = metrics.counts_since(connection, since)

    return Digest(
        zone=settings.digest.timezone,
        now=now,
        scheduled_for=scheduled_for,
        late=late,
        since=since,
        open=len(rows),
        new=counts["new"],
        resolved=counts["resolved"],
        overdue=overdue,
        became_overdue=became_overdue,
        first_response=metrics.Spread.of([s for _, s, _ in first_response]),
        resolution=metrics.Spread.of([s for _, s, _ in resolution]),
        mailboxes=metrics.mailbox_reconciliation(connection, since.date()),
        buckets=_buckets(ages),
        rows=rows,
    )


_BUCKET_BOUNDS = [upper for _, upper in AGE_BUCKETS if upper is not None]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a digest is built.

    A digest makes a few objects per ticket, and every few hundred new
    objects the collector walks all those made so far: for 100,000 tickets
    that is a sixth of the building and a third of the rendering. Reference
    counting still frees everything; the collector resumes after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _bucket(age: timedelta) -> int:
    """The index of the age bucket that ``age`` falls in."""
    return bisect.bisect_right(_BUCKET_BOUNDS, age)


def _buckets(counts: Sequence[int]) -> list[Bucket]:
    widest = max(counts) or 1
    return [
        Bucket(
            label,
            count,
            round(100 * count / widest),
            "#" * round(TEXT_BAR * count / widest),
        )
        for (label, _), count in zip(AGE_BUCKETS, counts, strict=True)
    ]


def _row(
    ticket: metrics.OpenTicket,
    due: datetime,
    overdue: bool,
    age: timedelta,
    zone: ZoneInfo,
) -> Row:
    return Row(
        number=ticket.number,
        status=ticket.status,
        priority=ticket.priority,
        channel=ticket.channel,
        subject=(ticket.subject or "(no subject)")[:SUBJECT_CHARS],
        excerpt=_excerpt(ticket.excerpt or ""),
        customer=ticket.customer or "",
        company=ticket.company or "",
        email=ticket.email or "",
        phone=ticket.phone or "",
        assignee=ticket.assignee or "unassigned",
        opened=_minute(ticket.opened_at, zone),
        age=duration(age),
        due=_minute(due, zone),
        overdue=overdue,
        last_activity=_minute(ticket.last_activity_at, zone),
        waiting=_waiting(ticket.status, ticket.last_from),
    )


def _minute(moment: datetime, zone: ZoneInfo) -> str:
    """``2026-03-02 09:00`` in ``zone``; strftime costs several times as much."""
    local = moment.astimezone(zone).replace(tzinfo=None)
    return local.isoformat(" ", "minutes")


def _excerpt(text: str) -> str:
    """The first few non-empty lines of a message, on one line."""
    lines = (line for line in map(str.strip, text.splitlines()) if line)
    own = (line for line in lines if not line.startswith(">"))
    shown = " / ".join(itertools.islice(own, EXCERPT_LINES))

    return shown if len(shown) <= EXCERPT_CHARS else shown[: EXCERPT_CHARS - 1] + "…"


def _waiting(status: str, last_from: str | None) -> str:
    """Who owes the next message: us, or the customer."""
    if status == "pending" or last_from == "out":
        return "waiting on the customer"
    return "waiting on us"


def duration(value: timedelta | float | None) -> str:
    """``3d 4h``, ``5h 12m``, ``40m``: two units at most, for people."""
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    minutes = max(0, int(seconds // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"

    return f"{minutes}m"


def render(digest: Digest) -> tuple[str, str]:
    """The digest's plain-text and HTML parts."""
    values = {"d": digest, "duration": duration}
    with collector_paused():
        text = _render(templates.get_template("digest.txt"), values)
        html = _render(templates.get_template("digest.html"), values)

    return text, html


def _render(template: Template, values: dict[str, Any]) -> str:
    """``template.render``, joining the output in chunks as it comes: a
    whole join would first hold every small piece, dozens per ticket."""
    stream = template.stream(values)
    stream.enable_buffering(RENDER_CHUNK)
    return "".join(stream)


def subject(digest: Digest) -> str:
    when = digest.local(digest.scheduled_for or digest.now, "%a %d %b")
    late = " (late)" if digest.late else ""
    return f"Support digest {when}: {digest.open} open, {digest.overdue} overdue{late}"


def recipients(settings: Settings) -> list[str]:
    """``[digest] to``, or the owner when it is empty."""
    if settings.digest.to:
        return list(settings.digest.to)
    return [settings.owner_email] if settings.owner_email else []


def digest_email(settings: Settings, clock: Clock, digest: Digest) -> OutgoingEmail:
    text, html = render(digest)
    return compose_email(
        settings,
        clock,
        to=[Address("", address) for address in recipients(settings)],
        subject=subject(digest),
        text=text,
        html=html,
    )


def overdue_email(
    settings: Settings,
    clock: Clock,
    *,
    to: Sequence[Address],
    ticket: metrics.OpenTicket,
    due: datetime,
) -> OutgoingEmail:
    """The one reminder an assignee gets when a ticket becomes overdue."""
    zone = settings.digest.zone
    shape = "%a %d %b %Y %H:%M"
    token = ticket_token(settings.tickets.subject_prefix, ticket.number)
    text = templates.get_template("overdue.txt").render(
        token=token,
        due=due.astimezone(zone).strftime(shape),
        subject=ticket.subject or "(no subject)",
        customer=ticket.customer or "(no name)",
        company=ticket.company or "",
        email=ticket.email or "",
        priority=ticket.priority,
        opened=ticket.opened_at.astimezone(zone).strftime(shape),
        assignee=ticket.assignee or "nobody",
    )

    return compose_email(
        settings,
        clock,
        to=to,
        subject=f"Overdue: {ticket.subject or '(no subject)'} {token}",
        text=text,
        ticket_number=ticket.number,
    )


def render_report(data: dict[str, Any], *, first: date, last: date, zone: str) -> str:
    """``intake report`` as text: the same numbers as its ``--json``."""
    return templates.get_template("report.txt").render(
        r=data, first=first, last=last, zone=zone, duration=duration
    )
