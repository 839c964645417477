"""The health endpoint: 200 when all is well, 503 naming what is wrong."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from channels.email import receive
from intake.clock import FrozenClock
from intake.config import ImapMailbox, load_settings
from intake.daemon import Parts, prepare
from intake.health import Health, HttpListener, Report, health_routes, make_app
from intake.runner import StoreRunner
from store.engine import make_engine, make_session_factory
from store.models import Outbox
from tests.conftest import START, free_port, make_mail, write_config


def mailbox(name: str = "support") -> ImapMailbox:
    return ImapMailbox(
        name=name,
        host="127.0.0.1",
        username="support",
        password="secret",  # noqa: S106 (never used to log in here)
        poll_seconds=60,
    )


def health_of(parts: Parts, clock: FrozenClock, *mailboxes: ImapMailbox) -> Health:
    return Health(
        parts.intake.session_factory, clock, mailboxes, started_at=clock.now()
    )


def test_a_quiet_store_is_healthy(parts: Parts, clock: FrozenClock) -> None:
    report = health_of(parts, clock).check()

    assert report.problems == []
    assert report.database == {"ok": True}
    assert report.outbox["backlog"] == 0


def test_an_acknowledgement_never_tried_for_20_minutes_is_a_problem(
    parts: Parts, clock: FrozenClock
) -> None:
    receive(parts.intake, make_mail(), source="test")  # queues an acknowledgement
    health = health_of(parts, clock)

    fresh = health.check()
    clock.advance(timedelta(minutes=20))
    stale = health.check()

    assert fresh.problems == []
    assert fresh.outbox["backlog"] == 1
    assert len(stale.problems) == 1
    assert "outbox worker" in stale.problems[0]


def test_a_send_failing_for_20_minutes_names_the_last_error(
    parts: Parts, clock: FrozenClock
) -> None:
    receive(parts.intake, make_mail(), source="test")
    with parts.intake.session_factory.begin() as session:
        session.execute(
            update(Outbox).values(
                attempts=3,
                last_error="relay 127.0.0.1:587: connection refused",
                next_attempt_at=START + timedelta(hours=1),
            )
        )
    clock.advance(timedelta(minutes=20))

    report = health_of(parts, clock).check()

    assert report.outbox["ok"] is False
    assert "connection refused" in report.problems[0]


def test_a_mailbox_never_polled_since_start_is_a_problem_after_three_intervals(
    parts: Parts, clock: FrozenClock
) -> None:
    health = health_of(parts, clock, mailbox())

    early = health.check()
    clock.advance(timedelta(minutes=5))
    late = health.check()

    assert early.problems == []
    assert early.mailboxes[0]["last_poll_at"] is None
    assert late.problems == [
        "mailbox support: no successful poll since 2026-03-02T09:00:00+00:00"
    ]


def test_an_unreachable_database_is_a_problem(clock: FrozenClock) -> None:
    closed = free_port()
    engine = make_engine(f"postgresql+psycopg://intake@127.0.0.1:{closed}/intake")
    health = Health(make_session_factory(engine), clock, [], started_at=clock.now())

    report = health.check()
    engine.dispose()

    assert report.database["ok"] is False
    assert report.problems[0].startswith("database:")


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (loopback)
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.parametrize(("minutes", "status"), [(0, 200), (20, 503)])
def test_the_endpoint_answers_200_or_503_with_the_report(
    tmp_path: Path, minutes: int, status: int
) -> None:
    config = write_config(tmp_path, smtp={"domains": ["example.com"]})
    clock = FrozenClock(START)
    parts = prepare(load_settings(config, environ={}), clock)
    receive(parts.intake, make_mail(), source="test")
    clock.advance(timedelta(minutes=minutes))
    health = health_of(parts, clock)
    store = StoreRunner(1)

    async def scenario() -> tuple[int, dict[str, Any]]:
        listener = HttpListener(
            make_app(health_routes(health, store)),
            HttpListener.bind("127.0.0.1", 0),
        )
        await listener.start()
        host, port = listener.address
        try:
            return await asyncio.to_thread(get, f"http://{host}:{port}/health")
        finally:
            await listener.stop()

    answered, body = asyncio.run(scenario())
    store.shutdown()
    parts.engine.dispose()

    assert answered == status
    assert body["status"] == ("ok" if status == 200 else "failing")
    assert body["outbox"]["backlog"] == 1


def test_a_report_says_failing_when_it_has_problems() -> None:
    assert Report(problems=["database: down"]).as_json()["status"] == "failing"
