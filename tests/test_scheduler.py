"""The scheduler: what is due when, across DST changes, restarts, downtime,
clock changes and two daemons on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from pathlib import Path
from time import monotonic, sleep
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update

from intake.clock import FrozenClock
from intake.config import DigestSettings, load_settings
from intake.daemon import Parts, prepare
from intake.runner import StoreRunner
from notifier.scheduler import (
    Jobs,
    Schedule,
    Scheduler,
    due_checkins,
    due_digest,
    latest_slot,
)
from store.models import Ticket
from tests.conftest import DaemonProcess, free_port, query
from tests.owner import OWNER, Story, body, outgoing, owner_config

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def schedule(
    zone: str, every: str = "day", at: str = "08:00", day: str = "mon"
) -> Schedule:
    settings = DigestSettings(timezone=zone, at=at, every=every, day=day)  # type: ignore[arg-type]
    return Schedule.from_settings(settings)


def sends_over(
    plan: Schedule, start: datetime, days: int, step: timedelta = timedelta(minutes=15)
) -> list[datetime]:
    """When a daemon ticking every ``step`` from ``start`` sends digests;
    the digest due before ``start`` had gone out."""
    clock = FrozenClock(start)
    before = latest_slot(start, plan)
    last = before[0] if before else None
    sent = []
    while clock.now() < start + timedelta(days=days):
        due = due_digest(clock.now(), plan, last)
        if due is not None:
            sent.append(due.scheduled_for)
            last = due.period
        clock.advance(step)

    return sent


# -- what is due: pure ------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "change", "before_utc", "after_utc"),
    [
        # Spring forward: 08:00 EST is 13:00 UTC, 08:00 EDT is 12:00 UTC.
        ("America/New_York", date(2026, 3, 8), time(13), time(12)),
        # Fall back.
        ("America/New_York", date(2026, 11, 1), time(12), time(13)),
        # Summer time starts: 08:00 CET is 07:00 UTC, 08:00 CEST is 06:00 UTC.
        ("Europe/Berlin", date(2026, 3, 29), time(7), time(6)),
        ("Europe/Berlin", date(2026, 10, 25), time(6), time(7)),
    ],
)
def test_the_digest_goes_out_at_eight_local_on_both_sides_of_a_dst_change(
    zone: str, change: date, before_utc: time, after_utc: time
) -> None:
    start = datetime.combine(change - timedelta(days=2), time(0), UTC)

    sent = sends_over(schedule(zone), start, days=4)

    assert [moment.astimezone(ZoneInfo(zone)).time() for moment in sent] == [
        time(8)
    ] * 4
    assert [moment.date() for moment in sent] == [
        change + timedelta(days=offset) for offset in (-2, -1, 0, 1)
    ]
    assert sent[1].time() == before_utc
    assert sent[2].time() == after_utc


def test_a_digest_time_that_dst_skips_goes_out_once_that_morning() -> None:
    # 02:30 does not exist in New York on 2026-03-08; it is read as 03:30 EDT.
    plan = schedule("America/New_York", at="02:30")

    sent = sends_over(plan, datetime(2026, 3, 7, 0, 0, tzinfo=UTC), days=3)

    local = [moment.astimezone(NEW_YORK) for moment in sent]
    assert [(m.day, m.hour, m.minute) for m in local] == [
        (7, 2, 30),
        (8, 3, 30),
        (9, 2, 30),
    ]


def test_a_digest_time_that_dst_repeats_goes_out_once() -> None:
    # 01:30 happens twice in New York on 2026-11-01; the first one counts.
    plan = schedule("America/New_York", at="01:30")

    sent = sends_over(plan, datetime(2026, 10, 31, 0, 0, tzinfo=UTC), days=3)

    assert len(sent) == 3
    assert sent[1] == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # the first 01:30


def test_weekday_digests_skip_saturday_and_sunday() -> None:
    monday = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)

    sent = sends_over(schedule("Europe/Berlin", every="weekday"), monday, days=14)

    assert [moment.strftime("%a") for moment in sent] == [
        "Mon",
        "Tue",
        "Wed",
        "Thu",
        "Fri",
    ] * 2


def test_every_two_days_keeps_its_rhythm_across_restarts() -> None:
    plan = schedule("Europe/Berlin", every="2 days")
    start = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)

    whole = sends_over(plan, start, days=10)
    # A daemon that restarts after four days with what it sent so far.
    first = sends_over(plan, start, days=4)
    rest = sends_over(plan, start + timedelta(days=4), days=6)

    assert len(whole) == 5
    assert [b - a for a, b in pairwise(whole)] == [timedelta(days=2)] * 4
    assert first + rest == whole


def test_a_weekly_digest_goes_out_on_its_day_only() -> None:
    plan = schedule("America/New_York", every="week", day="fri")

    sent = sends_over(plan, datetime(2026, 3, 2, tzinfo=UTC), days=21)

    assert [m.astimezone(NEW_YORK).strftime("%a %H:%M") for m in sent] == [
        "Fri 08:00"
    ] * 3


def test_a_digest_missed_while_down_is_due_once_marked_late() -> None:
    plan = schedule("Europe/Berlin")
    eleven = datetime(2026, 3, 4, 10, 0, tzinfo=UTC)  # 11:00 in Berlin

    due = due_digest(eleven, plan, last_period=date(2026, 3, 3))

    assert due is not None
    assert due.period == date(2026, 3, 4)
    assert due.late
    assert due_digest(eleven, plan, last_period=due.period) is None


def test_after_days_down_only_the_latest_digest_is_due() -> None:
    plan = schedule("Europe/Berlin")
    back = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)

    due = due_digest(back, plan, last_period=date(2026, 3, 3))

    assert due is not None
    assert due.period == date(2026, 3, 9)


def test_a_digest_on_time_is_not_late() -> None:
    plan = schedule("Europe/Berlin")

    due = due_digest(datetime(2026, 3, 4, 7, 0, 5, tzinfo=UTC), plan, None)

    assert due is not None
    assert not due.late


def test_a_check_in_is_due_after_the_delay_and_not_long_after() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    resolved = [
        (1, now - timedelta(hours=23)),  # not yet
        (2, now - timedelta(hours=24)),  # just due
        (3, now - timedelta(days=3)),  # the daemon was down: still sent
        (4, now - timedelta(days=9)),  # too old to be worth a call now
    ]

    assert due_checkins(now, timedelta(hours=24), resolved) == [2, 3]


# -- the jobs on a real store -------------------------------------------------------


@pytest.fixture
def owner_parts(tmp_path: Path) -> Iterator[tuple[Parts, FrozenClock]]:
    config = owner_config(tmp_path, digest={"timezone": "Europe/Berlin"})
    clock = FrozenClock(datetime(2026, 3, 2, 6, 0, tzinfo=UTC))  # 07:00 Berlin
    parts = prepare(load_settings(config, environ={}), clock)
    yield parts, clock
    parts.engine.dispose()


def jobs_of(parts: Parts) -> Jobs:
    """What a (re)started daemon builds: nothing carried over in memory."""
    return Jobs(parts.intake.session_factory, parts.clock, parts.settings)


def test_daemon_down_over_eight_and_started_at_eleven_sends_one_late_digest(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, clock = owner_parts
    clock.advance(timedelta(hours=1, minutes=5))  # 08:05: the daemon runs
    assert jobs_of(parts).everything_due() == 1
    clock.advance(timedelta(days=1, hours=-1, minutes=-5))  # down from 07:00 ...

    clock.advance(timedelta(hours=4))  # ... and started at 11:00
    queued = jobs_of(parts).everything_due()
    again = jobs_of(parts).everything_due()

    digests = outgoing(parts, "digest")
    assert (queued, again) == (1, 0)
    assert len(digests) == 2
    assert "(late)" in str(digests[1]["Subject"])
    assert "Late: this digest was due Tue 03 Mar 2026 08:00" in body(digests[1])
    assert "(late)" not in str(digests[0]["Subject"])


def test_a_restart_and_a_clock_set_back_send_nothing_twice(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, clock = owner_parts
    clock.advance(timedelta(hours=2))  # 09:00 Berlin
    jobs_of(parts).everything_due()

    clock.advance(timedelta(hours=-3))  # NTP sets the clock back to 06:00
    before = jobs_of(parts).everything_due()
    clock.advance(timedelta(hours=3))  # and 08:00 comes round again
    after = jobs_of(parts).everything_due()

    assert (before, after) == (0, 0)
    assert len(outgoing(parts, "digest")) == 1


def test_the_digest_goes_to_the_configured_addresses(tmp_path: Path) -> None:
    config = owner_config(
        tmp_path, digest={"to": ["a@example.com", "b@example.com"], "at": "06:00"}
    )
    parts = prepare(
        load_settings(config, environ={}),
        FrozenClock(datetime(2026, 3, 2, 7, tzinfo=UTC)),
    )

    jobs_of(parts).digest_if_due()

    [mail] = outgoing(parts, "digest")
    assert [a.addr_spec for a in mail["To"].addresses] == [
        "a@example.com",
        "b@example.com",
    ]
    assert mail.get_content_type() == "multipart/alternative"
    parts.engine.dispose()


def test_without_any_recipient_no_digest_is_queued(tmp_path: Path) -> None:
    config = owner_config(tmp_path, owner="")
    clock = FrozenClock(datetime(2026, 3, 2, 12, tzinfo=UTC))
    parts = prepare(load_settings(config, environ={}), clock)

    assert jobs_of(parts).everything_due() == 0
    assert outgoing(parts, "digest") == []
    parts.engine.dispose()


def test_two_daemons_on_one_postgresql_database_send_one_digest(
    tmp_path: Path, postgres_url: str
) -> None:
    config = owner_config(tmp_path, store={"url": postgres_url})
    clock = FrozenClock(datetime(2026, 3, 2, 8, 30, tzinfo=UTC))
    daemons = [prepare(load_settings(config, environ={}), clock) for _ in range(2)]
    jobs = [jobs_of(parts) for parts in daemons]
    together = threading.Barrier(2)
    queued: list[int] = []

    def run(job: Jobs) -> None:
        together.wait()
        queued.append(job.everything_due())

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(queued) == [0, 1]
    assert query(config, "select count(*) from messages where kind = 'digest'") == [
        (1,)
    ]
    for parts in daemons:
        parts.engine.dispose()


def test_a_check_in_lists_the_tickets_resolved_a_day_before(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, clock = owner_parts
    story = Story(parts)
    now = clock.now()
    ann = story.customer(
        "Ann Customer",
        "ann@customer.example",
        phone="+4930123456",
        company="Ann GmbH",
        at=now,
    )
    bob = story.customer("Bob Buyer", "bob@customer.example", at=now)
    first = story.ticket(ann, now - timedelta(days=2))
    second = story.ticket(bob, now - timedelta(days=2))
    reopened = story.ticket(bob, now - timedelta(days=2), subject="Came back")
    story.resolve(first, now)
    story.survey(first, "csat", 5, now + timedelta(hours=2))
    story.resolve(second, now + timedelta(minutes=30))
    story.resolve(reopened, now)
    story.reopen(reopened, now + timedelta(hours=3))

    clock.advance(timedelta(hours=23, minutes=59))
    early = jobs_of(parts).checkins()
    clock.advance(timedelta(minutes=45))
    due = jobs_of(parts).checkins()
    again = jobs_of(parts).checkins()

    assert (early, due, again) == (0, 1, 0)
    [mail] = outgoing(parts, "checkin")
    text = body(mail)
    assert mail["To"].addresses[0].addr_spec == OWNER
    assert "Ann Customer, Ann GmbH" in text
    assert "+4930123456" in text
    assert "CSAT 5/5" in text
    assert "Bob Buyer" in text
    assert "Came back" not in text
    assert 'href="tel:+4930123456"' in body(mail, "html")


def test_an_overdue_ticket_reminds_its_assignee_once(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, clock = owner_parts
    story = Story(parts)
    now = clock.now()
    agent = story.agent("Dana Agent", "dana@example.com")
    ann = story.customer("Ann Customer", "ann@customer.example", at=now)
    urgent = story.ticket(
        ann, now, priority="urgent", assignee=agent, subject="Server down"
    )
    story.ticket(ann, now, priority="low", subject="Not urgent")

    clock.advance(timedelta(hours=3, minutes=59))
    early = jobs_of(parts).reminders()
    clock.advance(timedelta(minutes=2))
    due = jobs_of(parts).reminders()
    clock.advance(timedelta(hours=1))
    again = jobs_of(parts).reminders()

    assert (early, due, again) == (0, 1, 0)
    [mail] = outgoing(parts, "reminder")
    assert mail["To"].addresses[0].addr_spec == "dana@example.com"
    assert f"[#{story.number(urgent)}]" in str(mail["Subject"])
    assert "Server down" in body(mail)


# -- APScheduler in the loop --------------------------------------------------------


def test_every_cron_trigger_carries_the_business_time_zone(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, _ = owner_parts
    scheduler = Scheduler(jobs_of(parts), StoreRunner(1), on_queued=lambda: None)

    triggers = scheduler.triggers()

    assert {str(trigger.timezone) for trigger in triggers.values()} == {"Europe/Berlin"}
    digest = triggers["digest"]
    fire = digest.get_next_fire_time(None, datetime(2026, 3, 28, 12, tzinfo=BERLIN))
    after_change = digest.get_next_fire_time(fire, fire + timedelta(seconds=1))
    assert (fire.hour, after_change.hour) == (8, 8)
    assert after_change.utcoffset() == timedelta(hours=2)


def test_the_scheduler_catches_up_as_soon_as_it_starts_in_the_loop(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, clock = owner_parts
    clock.advance(timedelta(hours=4))  # 11:00: today's digest is overdue
    store = StoreRunner(1)

    async def run() -> int:
        woken = asyncio.Event()
        scheduler = Scheduler(jobs_of(parts), store, on_queued=woken.set)
        scheduler.start()
        try:
            await asyncio.wait_for(woken.wait(), 10)
        finally:
            scheduler.shutdown()
        return len(outgoing(parts, "digest"))

    assert asyncio.run(run()) == 1
    store.shutdown()


@pytest.mark.slow
def test_a_started_daemon_sends_the_missed_digest_once_across_a_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    # An hour ago, in UTC: the digest was due while the daemon was not running.
    at = (datetime.now(UTC) - timedelta(hours=1)).strftime("%H:%M")
    config = owner_config(
        tmp_path,
        smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]},
        outbound={"poll_seconds": 0.2},
        digest={"at": at},
    )
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    outbox = tmp_path / "state" / "outbox" / "new"

    try:
        daemon.start()
        wait_for_files(outbox, 1, daemon, starts=1)
        daemon.stop()
        daemon.start()
        sent = wait_for_files(outbox, 1, daemon, starts=2)
    finally:
        daemon.stop()

    assert len(sent) == 1
    assert "(late)" in sent[0].read_text()
    assert query(config, "select count(*) from schedule_runs where late") == [(1,)]


def wait_for_files(
    folder: Path, count: int, daemon: DaemonProcess, *, starts: int
) -> list[Path]:
    """The files in ``folder`` once there are ``count`` and the daemon's
    scheduler has run, after a pause in which any extra one would appear."""
    deadline = monotonic() + 20
    while monotonic() < deadline:
        found = sorted(folder.glob("*")) if folder.is_dir() else []
        if (
            len(found) >= count
            and daemon.log().count("scheduler: digest every") >= starts
        ):
            sleep(1.5)
            return sorted(folder.glob("*"))
        sleep(0.1)
    raise AssertionError(f"not {count} files in {folder}:\n{daemon.log()}")


def test_a_due_date_set_by_hand_brings_its_own_reminder(
    owner_parts: tuple[Parts, FrozenClock],
) -> None:
    parts, clock = owner_parts
    story = Story(parts)
    now = clock.now()
    ann = story.customer("Ann Customer", "ann@customer.example", at=now)
    # Overdue for weeks by its target: too late to remind, so no reminder ...
    old = story.ticket(ann, now - timedelta(days=40), subject="Old one")
    # ... until an agent sets a new date, which passes an hour from now.
    with parts.engine.begin() as connection:
        connection.execute(
            update(Ticket)
            .where(Ticket.id == old)
            .values(due_at=now + timedelta(hours=1))
        )

    before = jobs_of(parts).reminders()
    clock.advance(timedelta(hours=1, minutes=1))
    after = jobs_of(parts).reminders()

    assert (before, after) == (0, 1)
    [mail] = outgoing(parts, "reminder")
    assert mail["To"].addresses[0].addr_spec == OWNER  # no agents: the owner
