"""Flood limits: past them mail is stored, makes no ticket and no mail, and
the owner is warned once per flood."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import ColumnElement, event, func, select

from intake.clock import FrozenClock
from intake.daemon import Parts, prepare
from store.models import Message, Ticket
from tests.agentmail import (
    OWNER,
    agent_settings,
    body,
    deliver,
    outgoing,
    parsed,
    reply_to,
)
from tests.conftest import make_mail


@pytest.fixture
def parts(tmp_path: Path, clock: FrozenClock) -> Iterator[Parts]:
    built = prepare(agent_settings(tmp_path), clock)
    yield built
    built.engine.dispose()


def count(parts: Parts, model: type, *where: ColumnElement[bool]) -> int:
    with parts.intake.session_factory() as session:
        query = select(func.count()).select_from(model).where(*where)
        return int(session.scalar(query) or 0)


def flooded(parts: Parts) -> int:
    with parts.intake.session_factory() as session:
        rows = session.scalars(select(Message.flags).where(Message.direction == "in"))
        return sum("flood" in flags for flags in rows)


def test_fifty_mails_in_a_minute_from_one_sender_hold_at_the_limit(
    parts: Parts, clock: FrozenClock
) -> None:
    statuses = []
    for n in range(50):
        outcome = deliver(parts, make_mail(subject=f"Problem {n}", body=f"{n}\n"))
        statuses.append(outcome.status)
        clock.advance(timedelta(seconds=1.2))

    assert statuses[:10] == ["created"] * 10
    assert statuses[10:] == ["flooded"] * 40
    assert count(parts, Ticket) == 10
    assert count(parts, Message, Message.direction == "in") == 50  # all stored
    assert flooded(parts) == 40
    assert len(outgoing(parts, "ack")) == 10
    assert len(outgoing(parts, "notification")) == 10
    [warning] = outgoing(parts, "flood-warning")
    assert warning.recipients == [OWNER]
    assert "ann@customer.example" in body(warning)
    assert parsed(warning)["Auto-Submitted"] == "auto-generated"


def test_a_sender_who_stops_for_a_window_gets_through_and_a_new_flood_warns_again(
    parts: Parts, clock: FrozenClock
) -> None:
    for n in range(12):
        deliver(parts, make_mail(subject=f"First wave {n}"))
    clock.advance(timedelta(minutes=11))

    calm = deliver(parts, make_mail(subject="After a pause"))
    for n in range(12):
        deliver(parts, make_mail(subject=f"Second wave {n}"))

    assert calm.status == "created"
    assert len(outgoing(parts, "flood-warning")) == 2


def test_a_busy_ticket_past_its_limit_is_held_back_whoever_writes(
    parts: Parts,
) -> None:
    deliver(parts, make_mail(message_id="<root@customer.example>"))

    statuses = [
        deliver(
            parts,
            make_mail(
                sender=f"Colleague {n} <c{n}@customer.example>",
                in_reply_to="<root@customer.example>",
                body=f"me too {n}\n",
            ),
        ).status
        for n in range(12)
    ]

    assert statuses == ["appended"] * 9 + ["flooded"] * 3
    assert len(outgoing(parts, "notification")) == 10
    [warning] = outgoing(parts, "flood-warning")
    assert "ticket [#1]" in parsed(warning)["Subject"]


def test_imported_old_mail_is_not_limited(parts: Parts) -> None:
    statuses = {
        deliver(parts, make_mail(subject=f"Old {n}"), acknowledge=False).status
        for n in range(15)
    }

    assert statuses == {"created"}


def test_agents_are_not_limited(parts: Parts) -> None:
    deliver(parts, make_mail())
    note = parsed(outgoing(parts, "notification")[0])

    details = {
        deliver(parts, reply_to(note, f"Update number {n}.")).status for n in range(15)
    }

    assert details == {"agent"}
    assert len(outgoing(parts, "reply")) == 15


def test_without_an_owner_a_flood_is_only_logged(
    tmp_path: Path, clock: FrozenClock, caplog: pytest.LogCaptureFixture
) -> None:
    parts = prepare(agent_settings(tmp_path, owner=""), clock)
    try:
        outcomes = [deliver(parts, make_mail(subject=f"{n}")) for n in range(11)]
    finally:
        parts.engine.dispose()

    assert outcomes[-1].status == "flooded"
    assert outcomes[-1].queued_sends == 0
    assert "flood: sender ann@customer.example" in caplog.text


def test_the_flood_check_is_one_query_per_message(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<root@customer.example>"))
    seen: list[str] = []
    event.listen(
        parts.engine,
        "before_cursor_execute",
        lambda *args: seen.append(str(args[2])),
    )

    deliver(parts, make_mail(in_reply_to="<root@customer.example>"))

    counting = [sql for sql in seen if "count(*)" in sql.lower()]
    assert len(counting) == 1
    assert len(seen) <= 10  # BEGIN and the whole reply, notification included
