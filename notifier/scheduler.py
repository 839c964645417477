"""The scheduler: the digest, the check-ins and the overdue reminders.

APScheduler only wakes us up. What is due is decided by pure functions of
(now, settings, what was already sent), with "now" from the injected clock,
and what was sent lives in the ``schedule_runs`` table under a unique key:
a run is claimed by inserting its row in the same transaction that queues
the mail. So a restart, a clock change, a catch-up after downtime or a second
daemon on the same PostgreSQL database never sends anything twice, and a
digest missed while the daemon was down goes out once when it starts,
marked late.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from intake.accept import OutgoingEmail, enqueue_email
from intake.clock import Clock
from intake.config import WEEKDAYS, DigestSettings, Settings
from intake.domain import Address
from intake.runner import StoreRunner
from notifier import digest as digests
from notifier import resolution
from notifier.outbox import OutboxWorker, make_sender
from store import metrics
from store.engine import SessionFactory
from store.models import Agent, Outbox, ScheduleRun

log = logging.getLogger(__name__)

# A digest sent more than this after its time says that it is late.
LATE_AFTER = timedelta(minutes=10)
# How far back a check-in or an overdue reminder is still worth sending
# after the daemon was down; older ones are skipped, not sent in a flood.
CHECKIN_CATCH_UP = timedelta(days=7)
REMINDER_CATCH_UP = timedelta(days=1)
# APScheduler runs a job this late at most; "what is due" decides the rest.
MISFIRE_GRACE_SECONDS = 6 * 3600


# -- what is due: pure ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    """When digests go out: a local time on some local days."""

    zone: ZoneInfo
    at: time
    every: str  # day | weekday | 2 days | week
    weekday: int  # the day of a weekly digest, 0 = Monday

    @classmethod
    def from_settings(cls, digest: DigestSettings) -> Schedule:
        return cls(
            digest.zone, digest.local_time, digest.every, WEEKDAYS.index(digest.day)
        )

    def runs_on(self, day: date) -> bool:
        if self.every == "weekday":
            return day.weekday() < 5
        if self.every == "week":
            return day.weekday() == self.weekday
        if self.every == "2 days":
            # Every other day on a fixed rhythm, so no restart can shift it.
            return day.toordinal() % 2 == 0
        return True

    def slot(self, day: date) -> datetime:
        """The UTC instant of ``day``'s digest.

        A local time that a DST change skips is read with the offset before
        the change (03:30 for a skipped 02:30); one it repeats, the first time.
        """
        return datetime.combine(day, self.at, self.zone).astimezone(UTC)

    @property
    def length(self) -> timedelta:
        """The usual time between two digests."""
        return timedelta(days={"2 days": 2, "week": 7}.get(self.every, 1))


@dataclass(frozen=True, slots=True)
class Due:
    """A digest to send now: its period (a local date), time and lateness."""

    period: date
    scheduled_for: datetime
    late: bool


def latest_slot(now: datetime, schedule: Schedule) -> tuple[date, datetime] | None:
    """The most recent digest time at or before ``now``, with its local date."""
    today = now.astimezone(schedule.zone).date()
    for back in range(8):
        day = today - timedelta(days=back)
        if schedule.runs_on(day) and schedule.slot(day) <= now:
            return day, schedule.slot(day)

    return None


def due_digest(
    now: datetime, schedule: Schedule, last_period: date | None
) -> Due | None:
    """The digest to send at ``now``, given the last period already sent.

    Only the latest period is ever due: after a long downtime one late
    digest goes out, not one per missed day.
    """
    latest = latest_slot(now, schedule)
    if latest is None:
        return None
    day, at = latest
    if last_period is not None and last_period >= day:
        return None

    return Due(day, at, late=now - at > LATE_AFTER)


def due_checkins(
    now: datetime, after: timedelta, resolved: list[tuple[int, datetime]]
) -> list[int]:
    """Of (ticket id, resolved at), the tickets whose check-in is due now."""
    oldest = now - after - CHECKIN_CATCH_UP
    return [ticket for ticket, at in resolved if oldest <= at <= now - after]


# -- runs done once -----------------------------------------------------------------


def claim(
    connection: Connection,
    kind: str,
    key: str,
    *,
    due_at: datetime,
    ran_at: datetime,
    late: bool = False,
    ticket_id: int | None = None,
) -> int | None:
    """Record that a run is done; its id, or None when it was done before.

    On PostgreSQL a second daemon's insert waits for the first one's
    transaction and then fails on the unique key, so exactly one sends.
    """
    try:
        with connection.begin_nested():
            return int(
                connection.execute(
                    insert(ScheduleRun).returning(ScheduleRun.id),
                    {
                        "kind": kind,
                        "key": key,
                        "ticket_id": ticket_id,
                        "due_at": due_at,
                        "ran_at": ran_at,
                        "late": late,
                    },
                ).scalar_one()
            )
    except IntegrityError:
        return None


def last_period(connection: Connection) -> date | None:
    key = connection.scalar(
        select(func.max(ScheduleRun.key)).where(ScheduleRun.kind == "digest")
    )
    return date.fromisoformat(key) if key else None


def last_digest_at(connection: Connection) -> datetime | None:
    """When the last digest, scheduled or sent by hand, went out."""
    return connection.scalar(
        select(func.max(ScheduleRun.ran_at)).where(
            ScheduleRun.kind.in_(("digest", "digest-now"))
        )
    )


def _enqueue(
    connection: Connection,
    run_id: int | None,
    ticket_id: int | None,
    mail: OutgoingEmail,
    *,
    kind: str,
    now: datetime,
) -> int:
    """Queue ``mail`` and point the run at its message; the outbox id."""
    outbox_id = enqueue_email(connection, ticket_id, mail, kind=kind, when=now)
    if run_id is not None:
        message_pk = select(Outbox.message_pk).where(Outbox.id == outbox_id)
        connection.execute(
            update(ScheduleRun)
            .where(ScheduleRun.id == run_id)
            .values(message_pk=message_pk.scalar_subquery())
        )

    return outbox_id


# -- the jobs ---------------------------------------------------------------------


class Jobs:
    """Each job is one transaction and returns how many mails it queued."""

    def __init__(
        self, session_factory: SessionFactory, clock: Clock, settings: Settings
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.settings = settings
        self.schedule = Schedule.from_settings(settings.digest)

    def digest_if_due(self) -> int:
        """Send the current period's digest unless it was sent already."""
        if not digests.recipients(self.settings):
            return 0
        now = self.clock.now()

        with self.session_factory.begin() as session:
            connection = session.connection()
            due = due_digest(now, self.schedule, last_period(connection))
            if due is None:
                return 0
            since = self._since(connection, now)
            run_id = claim(
                connection,
                "digest",
                due.period.isoformat(),
                due_at=due.scheduled_for,
                ran_at=now,
                late=due.late,
            )
            if run_id is None:
                log.info("digest: %s was sent by another daemon", due.period)
                return 0
            built = digests.build_digest(
                connection,
                self.settings,
                now,
                since=since,
                scheduled_for=due.scheduled_for,
                late=due.late,
            )
            mail = digests.digest_email(self.settings, self.clock, built)
            _enqueue(connection, run_id, None, mail, kind="digest", now=now)

        log.info(
            "digest: %s queued to %s: %d open, %d overdue%s",
            due.period,
            ",".join(mail.recipients),
            built.open,
            built.overdue,
            " (late)" if due.late else "",
        )
        return 1

    def digest_now(self) -> int | None:
        """Send a digest now, by hand; the outbox id (None: no recipients)."""
        if not digests.recipients(self.settings):
            return None
        now = self.clock.now()

        with self.session_factory.begin() as session:
            connection = session.connection()
            since = self._since(connection, now)
            run_id = claim(
                connection, "digest-now", now.isoformat(), due_at=now, ran_at=now
            )
            built = digests.build_digest(connection, self.settings, now, since=since)
            mail = digests.digest_email(self.settings, self.clock, built)
            return _enqueue(connection, run_id, None, mail, kind="digest", now=now)

    def preview(self) -> digests.Digest:
        """Today's digest as it would go out now; sends and records nothing."""
        now = self.clock.now()
        with self.session_factory.begin() as session:
            connection = session.connection()
            since = self._since(connection, now)
            return digests.build_digest(connection, self.settings, now, since=since)

    def _since(self, connection: Connection, now: datetime) -> datetime:
        """The last digest's time, or one period ago before the first."""
        return last_digest_at(connection) or now - self.schedule.length

    def checkins(self) -> int:
        """One email to the owner listing the check-ins that came due."""
        settings = self.settings
        if not settings.checkin.enabled or not settings.owner_email:
            return 0
        now = self.clock.now()
        after = settings.checkin.delay

        with self.session_factory.begin() as session:
            connection = session.connection()
            rows = metrics.recently_resolved(
                connection, now - after - CHECKIN_CATCH_UP, now
            )
            due = set(due_checkins(now, after, [(r.id, r.resolved_at) for r in rows]))
            claimed = []
            for row in rows:
                if row.id not in due:
                    continue
                key = f"{row.id}@{row.resolved_at.isoformat()}"
                if claim(
                    connection,
                    "checkin",
                    key,
                    due_at=row.resolved_at + after,
                    ran_at=now,
                    ticket_id=row.id,
                ):
                    claimed.append(row)
            if not claimed:
                return 0
            items = resolution.checkin_rows(claimed, settings)
            mail = resolution.checkin_email(settings, self.clock, items)
            _enqueue(connection, None, None, mail, kind="checkin", now=now)

        log.info(
            "check-in: queued to %s for tickets %s",
            settings.owner_email,
            ",".join(str(item.number) for item in items),
        )
        return 1

    def reminders(self) -> int:
        """One reminder per ticket that became overdue, to its assignee."""
        now = self.clock.now()
        targets = digests.Targets(self.settings.targets, self.settings.digest.zone)
        queued = 0

        with self.session_factory.begin() as session:
            connection = session.connection()
            opened_since = now - targets.longest() - REMINDER_CATCH_UP
            dues = {}
            for ticket_id, priority, opened_at, due_at in metrics.due_candidates(
                connection, opened_since
            ):
                due = targets.due(opened_at, priority, due_at)
                if now - REMINDER_CATCH_UP < due <= now:
                    dues[ticket_id] = due
            if not dues:
                return 0

            everyone = self._everyone(connection)
            for ticket in metrics.open_tickets(connection, ids=dues):
                due = dues[ticket.id]
                to = (
                    [Address(ticket.assignee or "", ticket.assignee_email)]
                    if ticket.assignee_email
                    else everyone
                )
                if not to:
                    continue
                run_id = claim(
                    connection,
                    "overdue",
                    f"{ticket.id}@{due.isoformat()}",
                    due_at=due,
                    ran_at=now,
                    ticket_id=ticket.id,
                )
                if run_id is None:
                    continue
                mail = digests.overdue_email(
                    self.settings, self.clock, to=to, ticket=ticket, due=due
                )
                _enqueue(connection, run_id, ticket.id, mail, kind="reminder", now=now)
                log.info("overdue: ticket %s reminder queued", ticket.number)
                queued += 1

        return queued

    def _everyone(self, connection: Connection) -> list[Address]:
        """Who hears about an unassigned ticket: every agent, else the owner."""
        agents = [
            Address(name, email)
            for name, email in connection.execute(
                select(Agent.name, Agent.email).order_by(Agent.id)
            )
        ]
        if agents:
            return agents
        owner = self.settings.owner_email

        return [Address("", owner)] if owner else []

    def each(self) -> list[tuple[str, Callable[[], int]]]:
        """Every job by name, each one transaction of its own."""
        return [
            ("digest", self.digest_if_due),
            ("check-ins", self.checkins),
            ("reminders", self.reminders),
        ]

    def everything_due(self) -> int:
        """Every job once, as the daemon's start and each tick run them."""
        return sum(work() for _, work in self.each())


# -- APScheduler in the daemon's loop ---------------------------------------------


class Scheduler:
    """Wakes the jobs on time; APScheduler keeps nothing that matters.

    The digest has its own cron trigger at the local time; a tick every
    fifteen minutes runs every job (each checks what is due, so it also
    catches a digest whose trigger a clock change made APScheduler skip),
    and one run at start catches up with what was missed while down.
    """

    def __init__(
        self,
        jobs: Jobs,
        run_in_store: StoreRunner,
        on_queued: Callable[[], None],
    ) -> None:
        self.jobs = jobs
        self.run_in_store = run_in_store
        self.on_queued = on_queued
        self.zone = jobs.settings.digest.zone
        self._scheduler: AsyncIOScheduler | None = None

    def triggers(self) -> dict[str, CronTrigger]:
        """The cron triggers, each with the business's zone given explicitly."""
        schedule = self.jobs.schedule
        days = {"weekday": "mon-fri", "week": WEEKDAYS[schedule.weekday]}
        return {
            "digest": CronTrigger(
                day_of_week=days.get(schedule.every, "*"),
                hour=schedule.at.hour,
                minute=schedule.at.minute,
                timezone=self.zone,
            ),
            "tick": CronTrigger(minute="*/15", timezone=self.zone),
        }

    def start(self) -> None:
        """Start inside the running event loop (APScheduler needs it)."""
        scheduler = AsyncIOScheduler(
            timezone=self.zone,
            jobstores={"default": MemoryJobStore()},
            job_defaults={
                "misfire_grace_time": MISFIRE_GRACE_SECONDS,
                "coalesce": True,
                "max_instances": 1,
            },
        )
        triggers = self.triggers()
        scheduler.add_job(self._digest, triggers["digest"], id="digest")
        scheduler.add_job(self._tick, triggers["tick"], id="tick")
        scheduler.add_job(self._tick, id="catch-up")  # once, now
        scheduler.start()
        self._scheduler = scheduler
        if not digests.recipients(self.jobs.settings):
            log.warning("digest: no [digest] to and no owner_email; none is sent")
        log.info(
            "scheduler: digest every %s at %s %s",
            self.jobs.schedule.every,
            self.jobs.schedule.at.strftime("%H:%M"),
            self.zone.key,
        )

    def shutdown(self) -> None:
        """Stop waking jobs; a job in its transaction finishes or rolls back."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    async def _digest(self) -> None:
        await self._run("digest", self.jobs.digest_if_due)

    async def _tick(self) -> None:
        # One by one, so that a job that fails leaves the others to run.
        for name, work in self.jobs.each():
            await self._run(name, work)

    async def _run(self, name: str, work: Callable[[], int]) -> None:
        try:
            queued = await self.run_in_store(work)
        except Exception:  # a failed run must not stop the scheduler
            log.exception("scheduler: %s failed; the next run tries again", name)
            return
        if queued:
            self.on_queued()


async def deliver_now(
    session_factory: SessionFactory, clock: Clock, settings: Settings, outbox_id: int
) -> str:
    """Run outbox passes until row ``outbox_id`` is handled; its status.

    For ``intake digest --send`` without a daemon: the row is sent like any
    other (older rows first), so a running daemon and this never clash.
    """
    store = StoreRunner(1)
    worker = OutboxWorker(
        session_factory,
        clock,
        settings.outbound,
        make_sender(settings.outbound, settings.outbox_maildir),
        store,
    )

    def status() -> str:
        with session_factory() as session:
            return session.get_one(Outbox, outbox_id).status

    try:
        while await store(status) in ("pending", "sending"):
            if not await worker.run_once():
                break
        return await store(status)
    finally:
        store.shutdown()
