"""Agents: who they are, the reply address that proves a ticket, their
replies stripped of quotes and signatures and relayed to the customer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from email.utils import make_msgid
from pathlib import Path

import pytest

from intake.agents import Agent, Roster
from intake.clock import FrozenClock
from intake.config import load_settings
from intake.daemon import Parts, prepare
from intake.errors import ConfigError
from intake.logs import settings_secrets
from intake.replies import visible_text
from intake.threads import ReplyAddresses
from store.models import Message
from tests.agentmail import (
    BOB,
    CAROL,
    agent_config,
    agent_settings,
    body,
    deliver,
    outgoing,
    parsed,
    reply_to,
    ticket,
)
from tests.conftest import make_mail
from tests.reply_samples import SAMPLES, Sample

ROSTER = Roster(
    [
        Agent(1, "Bob Agent", "bob@example.com"),
        Agent(2, "Carol Agent", "carol@example.com"),
        Agent(3, "Carol Zimmer", "cz@example.com"),
    ]
)


@pytest.fixture
def parts(tmp_path: Path, clock: FrozenClock) -> Iterator[Parts]:
    built = prepare(agent_settings(tmp_path), clock)
    yield built
    built.engine.dispose()


def addresses(parts: Parts) -> ReplyAddresses:
    found = parts.intake.reply_addresses
    assert found is not None
    return found


# -- pure: the roster, the reply address, quote stripping ------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("bob@example.com", 1),
        ("Bob@Example.COM", 1),
        ("cz@example.com", 3),
        ("bob@elsewhere.example", None),
        ("support@example.com", None),
    ],
)
def test_an_agent_is_recognised_by_address_whatever_the_case(
    address: str, expected: int | None
) -> None:
    found = ROSTER.by_email(address)

    assert (found.id if found else None) == expected


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("Bob Agent", [1]),
        ("bob", [1]),
        ("BOB", [1]),
        ("cz", [3]),
        ("carol@example.com", [2]),
        ("carol", [2, 3]),
        ("zimmer", [3]),
        ("agent", [1, 2]),
        ("dave", []),
    ],
)
def test_agents_are_found_by_name_word_or_address(
    wanted: str, expected: list[int]
) -> None:
    found = ROSTER.matching(wanted)

    assert [agent.id for agent in found] == expected


ADDRESSES = ReplyAddresses(
    "a-secret-of-enough-length", "support@example.com", ["example.com", "shop.example"]
)


def test_a_reply_address_names_its_ticket_and_carries_a_mac() -> None:
    address = ADDRESSES.for_ticket(1234)

    assert address.startswith("support+1234.")
    assert address.endswith("@example.com")
    assert ADDRESSES.number_in([address]) == 1234


@pytest.mark.parametrize(
    "address",
    [
        "SUPPORT+1234.{mac}@EXAMPLE.COM",
        "<support+1234.{mac}@example.com>",
        "support+1234.{mac}@shop.example",
    ],
)
def test_a_reply_address_survives_case_brackets_and_our_other_domains(
    address: str,
) -> None:
    mac = ADDRESSES.for_ticket(1234).split(".")[1].split("@")[0]

    number = ADDRESSES.number_in(["someone@else.example", address.format(mac=mac)])

    assert number == 1234


@pytest.mark.parametrize(
    "address",
    [
        "support+1234.000000000000@example.com",  # a made-up MAC
        "support+1235.{mac}@example.com",  # another ticket's number
        "support+1234.{mac}@elsewhere.example",  # not our domain
        "sales+1234.{mac}@example.com",  # not our address
        "support@example.com",
    ],
)
def test_a_reply_address_with_a_wrong_part_names_no_ticket(address: str) -> None:
    mac = ADDRESSES.for_ticket(1234).split(".")[1].split("@")[0]

    number = ADDRESSES.number_in([address.format(mac=mac)])

    assert number is None


def _lines(text: str, either: tuple[str, ...]) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [line for line in lines if line not in either]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_quotes_and_signatures_are_stripped_from_agent_replies(
    sample: Sample,
) -> None:
    kept = visible_text(sample.text)

    assert _lines(kept, sample.either) == _lines(sample.kept, sample.either)


def test_an_answer_written_between_quoted_lines_is_not_lost() -> None:
    text = (
        "On Mon, Mar 2, 2026 at 9:00 AM Support <support@example.com> wrote:\n"
        "> Hello, my printer is on fire.\n\nUnplug it first, please.\n"
    )

    kept = visible_text(text)

    assert "Unplug it first, please." in kept
    assert "wrote:" not in kept


def test_a_reply_of_nothing_but_the_quote_is_empty() -> None:
    text = "On Mon, Mar 2, 2026, Support <support@example.com> wrote:\n> Hello\n"

    assert visible_text(text) == ""


# -- notifications ----------------------------------------------------------------


def test_a_new_ticket_notifies_every_agent_while_unassigned(parts: Parts) -> None:
    outcome = deliver(parts, make_mail(body="Hello, my printer is on fire.\n"))

    assert outcome.queued_sends == 2  # the acknowledgement and the notification
    [notification] = outgoing(parts, "notification")
    mail = parsed(notification)
    assert sorted(notification.recipients) == [BOB, CAROL]
    reply_address = mail["Reply-To"].addresses[0].addr_spec
    assert reply_address == addresses(parts).for_ticket(1)
    assert "Hello, my printer is on fire." in body(notification)
    assert "Ann Customer <ann@customer.example>" in body(notification)
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["X-Intake-Loop"] == "support@example.com"
    assert mail["Message-ID"].endswith("@intake.example.com>")


def test_a_customer_reply_notifies_only_the_assignee(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<first@customer.example>"))
    note = parsed(outgoing(parts, "notification")[0])
    deliver(parts, reply_to(note, "#assign carol"))

    deliver(parts, make_mail(in_reply_to="<first@customer.example>", body="More.\n"))

    latest = outgoing(parts, "notification")[-1]
    assert latest.recipients == [CAROL]
    assert "assigned to Carol Agent" in body(latest)
    assert "More." in body(latest)


def test_imported_old_mail_notifies_nobody(parts: Parts) -> None:
    outcome = deliver(parts, make_mail(), acknowledge=False)

    assert outcome.status == "created"
    assert outgoing(parts) == []


# -- agent replies reach the customer ---------------------------------------------


def test_an_agent_reply_reaches_the_customer_threaded_and_without_the_quote(
    parts: Parts, clock: FrozenClock
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    note = parsed(outgoing(parts, "notification")[0])
    clock.advance(timedelta(minutes=42))

    outcome = deliver(parts, reply_to(note, "A new fuser is on its way.\n\nBob"))

    assert outcome.status == "agent"
    assert outcome.detail == "reply"
    [reply] = outgoing(parts, "reply")
    mail = parsed(reply)
    assert reply.author == "agent"
    assert reply.agent_id is not None
    assert reply.recipients == ["ann@customer.example"]
    assert mail["From"].addresses[0].addr_spec == "support@example.com"
    assert mail["In-Reply-To"] == "<ask@customer.example>"
    assert mail["References"].split()[-1] == "<ask@customer.example>"
    assert mail["Subject"] == "Re: Printer on fire [#1]"
    assert "A new fuser is on its way." in body(reply)
    assert "wrote:" not in body(reply)
    assert "Hello, my printer is on fire." not in body(reply)
    assert mail["Auto-Submitted"] == "auto-generated"
    opened = ticket(parts, 1)
    assert opened.status == "pending"
    assert opened.first_response_at is not None
    assert opened.first_response_at - opened.opened_at == timedelta(minutes=42)


def test_only_the_first_agent_reply_sets_the_first_response(
    parts: Parts, clock: FrozenClock
) -> None:
    deliver(parts, make_mail())
    note = parsed(outgoing(parts, "notification")[0])
    deliver(parts, reply_to(note, "First answer."))
    first = ticket(parts, 1).first_response_at
    clock.advance(timedelta(hours=1))

    deliver(parts, reply_to(note, "Second answer."))

    assert ticket(parts, 1).first_response_at == first
    assert len(outgoing(parts, "reply")) == 2


def test_a_reply_whose_headers_were_dropped_finds_its_ticket_by_the_reply_address(
    parts: Parts,
) -> None:
    deliver(parts, make_mail())
    deliver(parts, make_mail(subject="Other problem", body="Another.\n"))
    note = parsed(outgoing(parts, "notification")[0])

    outcome = deliver(parts, reply_to(note, "On it.", keep_headers=False))

    assert outcome.status == "agent"
    assert outcome.ticket_number == 1


def test_the_reply_address_in_the_envelope_alone_is_enough(parts: Parts) -> None:
    deliver(parts, make_mail())
    note = parsed(outgoing(parts, "notification")[0])
    address = note["Reply-To"].addresses[0].addr_spec
    raw = reply_to(note, "On it.", keep_headers=False, to="support@example.com")

    outcome = deliver(parts, raw, envelope_recipients=[address])

    assert outcome.status == "agent"
    assert outcome.ticket_number == 1


@pytest.mark.parametrize(
    "sample",
    [s for s in SAMPLES if not s.kept.startswith("#")][:10],
    ids=lambda s: s.name,
)
def test_each_mail_client_style_reaches_the_customer_as_the_agent_wrote_it(
    parts: Parts, sample: Sample
) -> None:
    deliver(parts, make_mail())
    note = parsed(outgoing(parts, "notification")[0])
    raw = (
        f"From: Bob Agent <{BOB}>\nTo: {note['Reply-To']}\n"
        f"Subject: Re: {note['Subject']}\nMessage-ID: {make_msgid()}\n"
        f"In-Reply-To: {note['Message-ID']}\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    ).encode() + sample.text.encode("utf-8")

    deliver(parts, raw)

    [reply] = outgoing(parts, "reply")
    sent = body(reply).split("\n-- \n")[0]
    assert _lines(sent, sample.either) == _lines(sample.kept, sample.either)


# -- who may join a ticket ---------------------------------------------------------


def test_a_stranger_writing_to_the_reply_address_with_its_mac_joins_the_ticket(
    parts: Parts,
) -> None:
    deliver(parts, make_mail())
    address = addresses(parts).for_ticket(1)

    outcome = deliver(
        parts, make_mail(sender="Dave <dave@customer.example>", to=address)
    )

    assert outcome.status == "appended"
    assert outcome.ticket_number == 1


def test_a_stranger_with_a_made_up_mac_starts_a_new_ticket(parts: Parts) -> None:
    deliver(parts, make_mail())

    outcome = deliver(
        parts,
        make_mail(
            sender="Mallory <mallory@evil.example>",
            to="support+1.0123456789ab@example.com",
            subject="Re: [#1] send me the details",
        ),
    )

    assert outcome.status == "created"
    assert outcome.ticket_number == 2
    assert ticket(parts, 2).linked_ticket_id == ticket(parts, 1).id


def test_a_forged_agent_address_with_only_a_subject_token_changes_nothing(
    parts: Parts,
) -> None:
    deliver(parts, make_mail())

    outcome = deliver(
        parts,
        make_mail(sender=f"Bob Agent <{BOB}>", subject="[#1] done", body="#resolve\n"),
    )

    assert outcome.status == "agent"
    assert outcome.detail == "no ticket"
    assert ticket(parts, 1).status == "open"
    [notice] = outgoing(parts, "notice")
    assert notice.recipients == [BOB]
    assert "cannot tell which ticket" in body(notice)


def test_an_agent_starting_a_new_conversation_opens_a_ticket(parts: Parts) -> None:
    outcome = deliver(
        parts, make_mail(sender=f"Bob Agent <{BOB}>", subject="Test from Bob")
    )

    assert outcome.status == "created"


def test_the_agents_own_mail_is_kept_apart_from_the_customers(parts: Parts) -> None:
    deliver(parts, make_mail())
    note = parsed(outgoing(parts, "notification")[0])

    outcome = deliver(parts, reply_to(note, "On it."))

    with parts.intake.session_factory() as session:
        stored = session.get_one(Message, outcome.message_pk)
        assert (stored.direction, stored.kind, stored.author) == (
            "in",
            "agent",
            "agent",
        )
        assert stored.text == "On it."


# -- settings -----------------------------------------------------------------------


def test_agents_without_a_reply_secret_stop_start_up(tmp_path: Path) -> None:
    config = agent_config(tmp_path, tickets={"reply_secret": ""})

    with pytest.raises(ConfigError) as refused:
        load_settings(config, environ={})

    assert refused.value.setting == "tickets.reply_secret"


def test_the_reply_secret_is_masked_in_the_log(tmp_path: Path) -> None:
    secret_file = tmp_path / "reply-secret"
    secret_file.write_text("from-a-file-0123456789abcdef\n")
    config = agent_config(
        tmp_path, tickets={"reply_secret": "", "reply_secret_file": str(secret_file)}
    )

    settings = load_settings(config, environ={})

    assert settings.tickets.reply_key == "from-a-file-0123456789abcdef"
    assert "from-a-file-0123456789abcdef" in settings_secrets(settings)


def test_two_agents_with_one_name_stop_start_up(tmp_path: Path) -> None:
    config = agent_config(
        tmp_path, agents=(("Bob", "bob@example.com"), ("bob", "bob2@example.com"))
    )

    with pytest.raises(ConfigError) as refused:
        load_settings(config, environ={})

    assert refused.value.setting == "agents.name"


def test_customer_markup_reaches_agents_as_plain_text_only(parts: Parts) -> None:
    deliver(
        parts,
        make_mail(
            sender='"<b>Ann</b>" <ann@customer.example>',
            body="<script>alert(1)</script> my printer\n",
        ),
    )

    [notification] = outgoing(parts, "notification")
    mail = parsed(notification)
    assert mail.get_content_type() == "text/plain"
    assert mail.get_body(("html",)) is None
    assert "<script>alert(1)</script> my printer" in body(notification)
