"""Agent commands at the top of a reply: read from a table of texts, then
applied to tickets through the message path."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from intake.agents import Agent, Roster, looks_like_commands, read_commands
from intake.clock import FrozenClock
from intake.daemon import Parts, prepare
from store.models import Event, Message, Outbox, Ticket
from tests.agentmail import (
    BOB,
    CAROL,
    agent_settings,
    body,
    deliver,
    outgoing,
    parsed,
    reply_to,
    ticket,
)
from tests.conftest import make_mail

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday, 10:00 in Berlin
BOB_AGENT = Agent(1, "Bob Agent", "bob@example.com")
ROSTER = Roster([BOB_AGENT, Agent(2, "Carol Agent", "carol@example.com")])


def read(text: str) -> tuple[list[tuple[str, object]], list[str], str, str | None]:
    found = read_commands(text, ROSTER, sender=BOB_AGENT, now=NOW, zone=BERLIN)
    commands: list[tuple[str, object]] = [
        (command.name, command.value) for command in found.commands
    ]
    return commands, found.problems, found.text, found.note


def berlin(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


@pytest.mark.parametrize(
    ("text", "commands", "reply", "note"),
    [
        ("#resolve", [("resolve", None)], "", None),
        ("#resolve\n", [("resolve", None)], "", None),
        ("\n\n  #Resolve  \n", [("resolve", None)], "", None),
        (
            "#reopen\nWe are on it again.",
            [("reopen", None)],
            "We are on it again.",
            None,
        ),
        (
            "#assign carol\n#priority high\nCarol will call you today.",
            [("assign", 2), ("priority", "high")],
            "Carol will call you today.",
            None,
        ),
        ("#assign Carol Agent", [("assign", 2)], "", None),
        ("#assign carol@example.com", [("assign", 2)], "", None),
        ("#assign me", [("assign", 1)], "", None),
        ("#assign nobody", [("assign", None)], "", None),
        ("#priority URGENT", [("priority", "urgent")], "", None),
        ("#note\nCalled Ann; it works now.", [], "", "Called Ann; it works now."),
        ("#note Called Ann.\nShe is happy.", [], "", "Called Ann.\nShe is happy."),
        ("#resolve\n#note Done by phone.", [("resolve", None)], "", "Done by phone."),
        ("#note keep this\n#resolve", [], "", "keep this\n#resolve"),
        ("#due 2026-03-05", [("due", berlin(5, 17))], "", None),
        ("#due 2026-03-05 14:30", [("due", berlin(5, 14, 30))], "", None),
        ("#due tomorrow", [("due", berlin(3, 17))], "", None),
        ("#due friday", [("due", berlin(6, 17))], "", None),
        ("#due monday", [("due", berlin(9, 17))], "", None),
        ("#due 3d", [("due", NOW + timedelta(days=3))], "", None),
        ("#due 8h", [("due", NOW + timedelta(hours=8))], "", None),
        ("Thanks!\n#resolve", [], "Thanks!\n#resolve", None),
        ("#1234 is the order number", [], "#1234 is the order number", None),
        ("No commands at all.", [], "No commands at all.", None),
        ("#priority high\n#priority high\nok", [("priority", "high")] * 2, "ok", None),
    ],
)
def test_commands_are_read_from_the_top_of_a_reply(
    text: str, commands: list[tuple[str, object]], reply: str, note: str | None
) -> None:
    found, problems, rest, internal = read(text)

    assert problems == []
    assert found == commands
    assert rest == reply
    assert internal == note


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("#frobnicate", "#frobnicate: not a command"),
        ("#solved", "#solved: not a command"),
        ("#assign agent", "'agent' could be Bob Agent <bob@example.com> or Carol"),
        ("#assign dave", "no agent is called 'dave'"),
        ("#assign", "#assign needs a value"),
        ("#priority hgh", "the priority must be one of low, normal, high, urgent"),
        ("#due someday", "#due someday: not a date"),
        ("#due 2026-02-30", "not a date"),
        ("#due 2026-03-01", "that is in the past"),
        ("#resolve now", "#resolve takes nothing after it"),
        ("#resolve\n#reopen", "#resolve and #reopen together"),
        ("#priority high\n#priority low", "#priority high and #priority low"),
        ("#note", "no text after it"),
        ("#resolve\n#frobnicate\nThanks", "#frobnicate: not a command"),
    ],
)
def test_what_is_not_understood_is_named_not_guessed(text: str, problem: str) -> None:
    _, problems, _, _ = read(text)

    assert any(problem in found for found in problems), problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#resolve", True),
        ("\n  #assign bob\nthanks", True),
        ("#NOTE hello", True),
        ("#1234 is my order", False),
        ("#hashtag", False),
        ("Hello\n#resolve", False),
        ("", False),
    ],
)
def test_a_customer_message_that_starts_with_a_command_is_noticed(
    text: str, expected: bool
) -> None:
    assert looks_like_commands(text) is expected


# -- applied through the message path ----------------------------------------------


@pytest.fixture
def parts(tmp_path: Path, clock: FrozenClock) -> Iterator[Parts]:
    built = prepare(
        agent_settings(tmp_path, digest={"timezone": "Europe/Berlin"}), clock
    )
    yield built
    built.engine.dispose()


def opened(parts: Parts) -> EmailMessage:
    """A customer's new ticket; the agents' notification of it."""
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    return parsed(outgoing(parts, "notification")[-1])


def commands_on(parts: Parts, number: int) -> list[tuple[str, str, object]]:
    with parts.intake.session_factory() as session:
        rows = session.scalars(
            select(Event)
            .join(Ticket, Ticket.id == Event.ticket_id)
            .where(Event.kind == "command", Ticket.number == number)
            .order_by(Event.id)
        )
        return [(e.actor, e.detail["command"], e.detail.get("value")) for e in rows]


def to_customer(parts: Parts) -> list[Message]:
    return [m for m in outgoing(parts) if "ann@customer.example" in m.recipients]


def test_resolve_resolves_and_sends_the_customer_the_resolution_note(
    parts: Parts,
) -> None:
    note = opened(parts)

    outcome = deliver(parts, reply_to(note, "#resolve"))

    assert outcome.status == "agent"
    assert outcome.queued_sends == 1
    assert ticket(parts, 1).status == "resolved"
    [resolution] = outgoing(parts, "resolution")
    assert resolution.recipients[0] == "ann@customer.example"
    assert parsed(resolution)["In-Reply-To"] == "<ask@customer.example>"
    assert outgoing(parts, "reply") == []
    assert commands_on(parts, 1) == [(BOB, "resolve", None)]


def test_a_reply_and_resolve_reach_the_customer_in_that_order(parts: Parts) -> None:
    note = opened(parts)

    deliver(parts, reply_to(note, "#resolve\nFixed: the fuser was loose."))

    kinds = [m.kind for m in to_customer(parts)]
    assert kinds == ["ack", "reply", "resolution"]
    assert ticket(parts, 1).first_response_at is not None


def test_a_command_only_reply_sends_nothing_to_the_customer(parts: Parts) -> None:
    note = opened(parts)

    outcome = deliver(parts, reply_to(note, "#assign carol\n#priority high"))

    assert outcome.queued_sends == 0
    assert [m.kind for m in to_customer(parts)] == ["ack"]
    changed = ticket(parts, 1)
    assert changed.priority == "high"
    assert changed.assignee_id is not None
    assert changed.first_response_at is None
    assert [c[1] for c in commands_on(parts, 1)] == ["assign", "priority"]


def test_note_stays_internal(parts: Parts) -> None:
    note = opened(parts)

    deliver(parts, reply_to(note, "#note\nCalled Ann; the fuser was loose."))

    [internal] = outgoing(parts, "note")
    assert internal.text == "Called Ann; the fuser was loose."
    assert internal.author == "agent"
    assert [m.kind for m in to_customer(parts)] == ["ack"]
    with parts.intake.session_factory() as session:
        assert (
            session.scalar(select(Outbox.id).where(Outbox.message_pk == internal.id))
            is None
        )
    assert commands_on(parts, 1) == [(BOB, "note", None)]


def test_due_and_priority_set_the_ticket(parts: Parts) -> None:
    note = opened(parts)

    deliver(parts, reply_to(note, "#due 2026-03-05\n#priority low"))

    changed = ticket(parts, 1)
    assert changed.due_at == berlin(5, 17)
    assert changed.priority == "low"


def test_reopen_reopens_a_resolved_ticket(parts: Parts, clock: FrozenClock) -> None:
    note = opened(parts)
    deliver(parts, reply_to(note, "#resolve"))
    clock.advance(timedelta(days=1))

    deliver(parts, reply_to(note, "#reopen\nSorry, one more thing to check."))

    changed = ticket(parts, 1)
    assert changed.status == "pending"  # reopened, then answered
    assert changed.reopen_count == 1
    assert [m.kind for m in to_customer(parts)] == ["ack", "resolution", "reply"]


def test_an_unknown_command_is_answered_and_changes_nothing(parts: Parts) -> None:
    note = opened(parts)

    outcome = deliver(parts, reply_to(note, "#solved\nAll done, Ann!"))

    assert outcome.detail == "rejected"
    assert ticket(parts, 1).status == "open"
    assert [m.kind for m in to_customer(parts)] == ["ack"]
    [notice] = outgoing(parts, "notice")
    assert notice.recipients == [BOB]
    assert "#solved: not a command" in body(notice)
    assert "nothing was changed on ticket [#1]" in body(notice)
    assert commands_on(parts, 1) == []


def test_an_ambiguous_assignment_is_answered_and_changes_nothing(
    parts: Parts,
) -> None:
    note = opened(parts)

    deliver(parts, reply_to(note, "#assign agent\n#resolve"))

    assert ticket(parts, 1).status == "open"
    assert ticket(parts, 1).assignee_id is None
    [notice] = outgoing(parts, "notice")
    assert "could be Bob Agent" in body(notice)


def test_resolving_a_resolved_ticket_is_answered(parts: Parts) -> None:
    note = opened(parts)
    deliver(parts, reply_to(note, "#resolve"))

    deliver(parts, reply_to(note, "#resolve"))

    [notice] = outgoing(parts, "notice")
    assert "is resolved already" in body(notice)
    assert len(outgoing(parts, "resolution")) == 1


def test_an_empty_reply_sends_nothing_and_says_so(parts: Parts) -> None:
    note = opened(parts)

    outcome = deliver(parts, reply_to(note, ""))

    assert outcome.detail == "empty"
    assert [m.kind for m in to_customer(parts)] == ["ack"]
    [notice] = outgoing(parts, "notice")
    assert "had no text" in body(notice)


def test_commands_from_a_customer_change_nothing_and_are_answered(
    parts: Parts,
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))

    outcome = deliver(
        parts,
        make_mail(
            in_reply_to="<ask@customer.example>",
            body="#resolve\n#assign bob\nPlease close this.\n",
        ),
    )

    assert outcome.status == "appended"
    assert ticket(parts, 1).status == "open"
    assert ticket(parts, 1).assignee_id is None
    [notice] = outgoing(parts, "notice")
    assert notice.recipients == ["ann@customer.example"]
    text = body(notice)
    assert "only from agents' addresses" in text
    assert "- #resolve" in text
    assert "- #assign bob" in text
    assert commands_on(parts, 1) == []


def test_touches_count_replies_and_commands(parts: Parts) -> None:
    note = opened(parts)

    deliver(parts, reply_to(note, "#priority high\nLooking into it."))
    deliver(parts, reply_to(note, "#note checked the logs", sender=f"Carol <{CAROL}>"))
    deliver(parts, reply_to(note, "#resolve"))

    replies = outgoing(parts, "reply")
    assert len(replies) == 1
    assert [(actor, name) for actor, name, _ in commands_on(parts, 1)] == [
        (BOB, "priority"),
        (CAROL, "note"),
        (BOB, "resolve"),
    ]
