"""Resolving a ticket: the customer's note, the owner's copy, the survey
question, and the answer that comes back by reply."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from channels.email import receive
from intake import tickets
from intake.accept import Outcome
from intake.clock import FrozenClock
from intake.config import load_settings
from intake.daemon import Parts, prepare
from intake.surveys import Answer, parse_answer
from notifier.resolution import notify_resolved
from store.models import ContactPoint, Event, Outbox, Survey, Ticket
from tests.conftest import make_mail, run_cli
from tests.owner import OWNER, Story, body, outgoing, owner_config

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "scale", "expected"),
    [
        ("5", "csat", Answer(5, "")),
        (
            "4 thanks, quick and friendly",
            "csat",
            Answer(4, "thanks, quick and friendly"),
        ),
        ("4 - thanks", "csat", Answer(4, "thanks")),
        ("9/10 would recommend", "nps", Answer(9, "would recommend")),
        ("10!", "nps", Answer(10, "")),
        ("(8) fine", "nps", Answer(8, "fine")),
        ("0", "nps", Answer(0, "")),
        ("\n\n  3\nslow, but solved\n", "csat", Answer(3, "slow, but solved")),
        (
            "2\n\nOn Mon, 2 Mar 2026 at 10:00, Support <support@example.com> wrote:\n"
            "> How satisfied are you, from 1 to 5?\n> 5\n",
            "csat",
            Answer(2, ""),
        ),
        ("7\r\n-- \r\nAnn\r\n", "nps", Answer(7, "")),
        ("0", "csat", None),  # CSAT starts at 1
        ("6", "csat", None),
        ("11", "nps", None),
        ("4.5", "csat", None),
        ("4/10", "csat", None),  # a score out of another scale
        ("five", "csat", None),
        ("Hi, 5", "csat", None),
        ("> 5\n", "csat", None),  # only the quoted question
        ("", "nps", None),
    ],
)
def test_a_survey_answer_is_a_number_in_range_as_the_first_word(
    text: str, scale: str, expected: Answer | None
) -> None:
    assert parse_answer(text, scale) == expected


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[tuple[Parts, Path, Story]]:
    """A store with one email ticket from Ann, CSAT surveys and the owner in Cc."""
    config = owner_config(
        tmp_path,
        resolution={"copy_owner": "cc", "survey": "csat"},
        digest={"timezone": "Europe/Berlin"},
    )
    parts = prepare(load_settings(config, environ={}), FrozenClock(NOW))
    yield parts, config, Story(parts)
    parts.engine.dispose()


def deliver(parts: Parts, raw: bytes) -> Outcome:
    return receive(parts.intake, raw, source="test")


def resolve(parts: Parts, number: int) -> None:
    """What the command line and the agents' #resolve do."""
    with parts.engine.begin() as connection:
        ticket = tickets.by_number(connection, number)
        assert ticket is not None
        now = parts.clock.now()
        tickets.resolve(connection, ticket, now, actor="test")
        notify_resolved(connection, parts.settings, parts.clock, ticket.id, now)


def ticket_row(parts: Parts, number: int) -> Any:
    with parts.engine.connect() as connection:
        return connection.execute(
            select(Ticket.status, Ticket.reopen_count).where(Ticket.number == number)
        ).one()


def surveys(parts: Parts) -> list[tuple[Any, ...]]:
    with parts.engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                select(Survey.scale, Survey.score, Survey.comment).order_by(Survey.id)
            )
        ]


def test_resolving_from_the_command_line_sends_the_note_with_the_owner_in_cc(
    shop: tuple[Parts, Path, Story],
) -> None:
    parts, config, _ = shop
    opened = deliver(parts, make_mail(message_id="<first@customer.example>"))
    deliver(
        parts,
        make_mail(
            subject="Re: Printer on fire",
            message_id="<second@customer.example>",
            in_reply_to="<first@customer.example>",
        ),
    )

    shown = run_cli(config, "tickets", "resolve", str(opened.ticket_number))
    again = run_cli(
        config, "tickets", "resolve", str(opened.ticket_number), check=False
    )

    assert f"ticket {opened.ticket_number} resolved" in shown.stdout
    assert again.returncode == 1
    assert "already resolved" in again.stderr
    [note] = outgoing(parts, "resolution")
    assert note["To"].addresses[0].addr_spec == "ann@customer.example"
    assert note["Cc"].addresses[0].addr_spec == OWNER
    assert note["In-Reply-To"] == "<second@customer.example>"
    assert note["References"] == "<first@customer.example> <second@customer.example>"
    assert f"[#{opened.ticket_number}]" in str(note["Subject"])
    assert note["Auto-Submitted"] == "auto-generated"
    assert "from 1 (not at all) to 5 (very)" in body(note)


@pytest.mark.parametrize(
    ("copy_owner", "header", "recipients"),
    [
        ("bcc", None, ["ann@customer.example", OWNER]),
        ("none", None, ["ann@customer.example"]),
        ("cc", OWNER, ["ann@customer.example", OWNER]),
    ],
)
def test_the_owner_is_copied_as_the_settings_say(
    tmp_path: Path, copy_owner: str, header: str | None, recipients: list[str]
) -> None:
    config = owner_config(tmp_path, resolution={"copy_owner": copy_owner})
    parts = prepare(load_settings(config, environ={}), FrozenClock(NOW))
    number = deliver(parts, make_mail()).ticket_number or 0

    resolve(parts, number)

    [note] = outgoing(parts, "resolution")
    assert (note["Cc"].addresses[0].addr_spec if note["Cc"] else None) == header
    assert OWNER not in str(note["To"])
    with parts.engine.connect() as connection:
        envelope = connection.scalar(
            select(Outbox.recipients).order_by(Outbox.id.desc()).limit(1)
        )
    assert envelope == recipients
    parts.engine.dispose()


def test_the_survey_is_asked_once_per_ticket(shop: tuple[Parts, Path, Story]) -> None:
    parts, _, _ = shop
    number = deliver(parts, make_mail()).ticket_number or 0

    resolve(parts, number)
    reopened = deliver(
        parts, make_mail(subject=f"Re: x [#{number}]", body="It broke again.")
    )
    resolve(parts, number)

    first, second = outgoing(parts, "resolution")
    assert reopened.status == "reopened"
    assert "how satisfied" in body(first)
    assert "satisfied" not in body(second)
    assert surveys(parts) == [("csat", None, "")]


def test_a_numeric_reply_is_recorded_as_the_answer_and_never_reopens(
    shop: tuple[Parts, Path, Story],
) -> None:
    parts, _, _ = shop
    number = deliver(parts, make_mail()).ticket_number or 0
    resolve(parts, number)
    [note] = outgoing(parts, "resolution")

    def reply(text: str) -> Outcome:
        return deliver(
            parts,
            make_mail(
                subject=f"Re: {note['Subject']}",
                in_reply_to=note["Message-ID"],
                body=text,
            ),
        )

    answered = reply(
        "4 thanks, quick and friendly\n\nOn Monday Support wrote:\n> 1 to 5?\n"
    )
    twice = reply("1")

    assert (answered.status, twice.status) == ("appended", "appended")
    assert answered.queued_sends == 0
    assert ticket_row(parts, number) == ("resolved", 0)
    assert surveys(parts) == [("csat", 4, "thanks, quick and friendly")]
    with parts.engine.connect() as connection:
        kinds = connection.scalars(select(Event.kind).order_by(Event.id)).all()
    assert kinds.count("survey-answer") == 1

    words = reply("Actually it is broken again.")

    assert words.status == "reopened"
    assert ticket_row(parts, number) == ("open", 1)


def test_a_number_on_a_ticket_without_a_survey_is_an_ordinary_reply(
    tmp_path: Path,
) -> None:
    config = owner_config(tmp_path, resolution={"survey": "none"})
    parts = prepare(load_settings(config, environ={}), FrozenClock(NOW))
    number = deliver(parts, make_mail()).ticket_number or 0
    resolve(parts, number)

    again = deliver(parts, make_mail(subject=f"Re: x [#{number}]", body="5"))

    assert again.status == "reopened"
    assert surveys(parts) == []
    parts.engine.dispose()


def test_an_answer_after_the_reopen_window_is_still_recorded(
    shop: tuple[Parts, Path, Story],
) -> None:
    parts, _, _ = shop
    number = deliver(parts, make_mail()).ticket_number or 0
    resolve(parts, number)
    assert isinstance(parts.clock, FrozenClock)
    parts.clock.advance(timedelta(days=30))

    late = deliver(parts, make_mail(subject=f"Re: x [#{number}]", body="5 all good"))

    assert (late.status, late.ticket_number) == ("appended", number)
    assert surveys(parts) == [("csat", 5, "all good")]


def test_a_customer_without_a_deliverable_email_gets_no_note(
    shop: tuple[Parts, Path, Story], caplog: pytest.LogCaptureFixture
) -> None:
    parts, _, story = shop
    texter = story.customer("Sam Texter", phone="+14155550100", at=NOW)
    by_sms = story.ticket(texter, NOW, channel="sms")
    bounced = deliver(parts, make_mail(sender="Bo <bo@customer.example>")).ticket_number
    with parts.engine.begin() as connection:
        connection.execute(
            update(ContactPoint)
            .where(ContactPoint.value == "bo@customer.example")
            .values(undeliverable_at=NOW)
        )

    with caplog.at_level(logging.WARNING, logger="notifier.resolution"):
        resolve(parts, story.number(by_sms))
        resolve(parts, bounced or 0)

    assert outgoing(parts, "resolution") == []
    assert caplog.text.count("no deliverable email address") == 2
