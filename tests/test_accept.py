"""accept() end to end on a real SQLite store: threading, reopening, machine
mail, duplicates and the quarantine."""

from __future__ import annotations

from datetime import timedelta
from email import message_from_bytes, policy

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import undefer

from channels.email import receive
from intake import tickets
from intake.accept import Outcome
from intake.clock import FrozenClock
from intake.daemon import Parts
from store.models import Message, Outbox, Quarantine, Ticket
from tests.conftest import make_mail


def deliver(parts: Parts, raw: bytes, **kwargs: object) -> Outcome:
    return receive(parts.intake, raw, source="test", **kwargs)  # type: ignore[arg-type]


def ack_of(parts: Parts, number: int) -> Message:
    with parts.intake.session_factory() as session:
        return session.scalars(
            select(Message)
            .options(undefer(Message.raw))
            .join(Ticket, Ticket.id == Message.ticket_id)
            .where(Ticket.number == number, Message.kind == "ack")
        ).one()


def count(parts: Parts, model: type) -> int:
    with parts.intake.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_new_mail_opens_a_ticket_and_queues_an_acknowledgement(parts: Parts) -> None:
    outcome = deliver(parts, make_mail(subject="Printer on fire"))

    assert outcome.status == "created"
    assert outcome.queued_sends == 1
    ack = ack_of(parts, outcome.ticket_number or 0)
    sent = message_from_bytes(ack.raw, policy=policy.default)
    assert f"[#{outcome.ticket_number}]" in str(sent["Subject"])
    assert sent["Auto-Submitted"] == "auto-replied"
    assert sent["X-Intake-Loop"] == "support@example.com"
    assert sent["Message-ID"] == f"<{ack.message_id}>"
    assert sent["To"].addresses[0].addr_spec == "ann@customer.example"
    assert count(parts, Outbox) == 1


def test_reply_whose_references_were_dropped_threads_by_in_reply_to(
    parts: Parts,
) -> None:
    first = deliver(parts, make_mail())
    ack = ack_of(parts, first.ticket_number or 0)

    reply = deliver(
        parts,
        make_mail(subject="Re: anything", in_reply_to=f"<{ack.message_id}>"),
    )

    assert reply.status == "appended"
    assert reply.ticket_number == first.ticket_number


def test_reply_with_only_references_threads_to_the_nearest_known_ancestor(
    parts: Parts,
) -> None:
    first = deliver(parts, make_mail(message_id="<root@customer.example>"))

    reply = deliver(
        parts,
        make_mail(
            subject="totally different subject",
            references="<unknown@elsewhere.example> <root@customer.example>",
        ),
    )

    assert reply.status == "appended"
    assert reply.ticket_number == first.ticket_number


def test_subject_token_from_a_participant_threads(parts: Parts) -> None:
    first = deliver(parts, make_mail())

    reply = deliver(parts, make_mail(subject=f"Re: [#{first.ticket_number}] news"))

    assert reply.status == "appended"
    assert reply.ticket_number == first.ticket_number


def test_stranger_quoting_a_ticket_token_gets_a_new_linked_ticket(
    parts: Parts,
) -> None:
    first = deliver(parts, make_mail())

    stranger = deliver(
        parts,
        make_mail(
            sender="Mallory <mallory@evil.example>",
            subject=f"Re: [#{first.ticket_number}] give me the details",
        ),
    )

    assert stranger.status == "created"
    assert stranger.ticket_number != first.ticket_number
    with parts.intake.session_factory() as session:
        new = session.scalars(
            select(Ticket).where(Ticket.number == stranger.ticket_number)
        ).one()
        assert new.linked_ticket is not None
        assert new.linked_ticket.number == first.ticket_number


def test_no_fuzzy_subject_matching_ever(parts: Parts) -> None:
    first = deliver(parts, make_mail(subject="Printer on fire"))

    again = deliver(parts, make_mail(subject="Re: Printer on fire"))

    assert again.status == "created"
    assert again.ticket_number != first.ticket_number


def resolve(parts: Parts, number: int) -> None:
    with parts.intake.session_factory.begin() as session:
        connection = session.connection()
        ticket = tickets.by_number(connection, number)
        assert ticket is not None
        tickets.resolve(connection, ticket, parts.clock.now(), actor="test")


def test_reply_to_resolved_ticket_within_the_window_reopens_it(
    parts: Parts, clock: FrozenClock
) -> None:
    first = deliver(parts, make_mail(message_id="<t1@customer.example>"))
    resolve(parts, first.ticket_number or 0)
    clock.advance(timedelta(days=6))

    reply = deliver(parts, make_mail(in_reply_to="<t1@customer.example>"))

    assert reply.status == "reopened"
    assert reply.ticket_number == first.ticket_number
    with parts.intake.session_factory() as session:
        ticket = session.scalars(
            select(Ticket).where(Ticket.number == first.ticket_number)
        ).one()
        assert ticket.status == "open"
        assert ticket.reopen_count == 1


def test_reply_after_the_reopen_window_starts_a_linked_ticket(
    parts: Parts, clock: FrozenClock
) -> None:
    first = deliver(parts, make_mail(message_id="<t2@customer.example>"))
    resolve(parts, first.ticket_number or 0)
    clock.advance(timedelta(days=8))

    reply = deliver(parts, make_mail(in_reply_to="<t2@customer.example>"))

    assert reply.status == "created"
    assert reply.ticket_number != first.ticket_number


AUTO_REPLY = {"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"}


def test_auto_reply_is_recorded_on_its_ticket_and_never_answered(
    parts: Parts,
) -> None:
    first = deliver(parts, make_mail(message_id="<t3@customer.example>"))
    resolve(parts, first.ticket_number or 0)

    auto = deliver(
        parts,
        make_mail(
            subject="Out of office",
            in_reply_to="<t3@customer.example>",
            extra=AUTO_REPLY,
        ),
    )

    assert auto.status == "machine"
    assert auto.ticket_number == first.ticket_number
    assert auto.queued_sends == 0
    with parts.intake.session_factory() as session:
        ticket = session.scalars(
            select(Ticket).where(Ticket.number == first.ticket_number)
        ).one()
        assert ticket.status == "resolved"


@pytest.mark.parametrize(
    "extra",
    [
        {"Auto-Submitted": "auto-generated"},
        {"Precedence": "bulk"},
        {"List-Id": "<news.shop.example>"},
        {"Return-Path": "<>"},
    ],
)
def test_machine_mail_never_creates_a_ticket(
    parts: Parts, extra: dict[str, str]
) -> None:
    outcome = deliver(parts, make_mail(extra=extra))

    assert outcome.status == "machine"
    assert outcome.ticket_number is None
    assert count(parts, Ticket) == 0
    assert count(parts, Outbox) == 0


def test_mail_that_looks_like_our_own_is_a_loop_and_makes_no_ticket(
    parts: Parts,
) -> None:
    outcome = deliver(parts, make_mail(sender="support@example.com"))

    assert outcome.status == "machine"
    assert outcome.detail == "loop"
    assert count(parts, Ticket) == 0


def test_the_same_message_twice_is_stored_once(parts: Parts) -> None:
    raw = make_mail()

    first = deliver(parts, raw)
    second = deliver(parts, raw)

    assert first.status == "created"
    assert second.status == "duplicate"
    assert second.ticket_number == first.ticket_number
    assert count(parts, Message) == 2  # the message and its acknowledgement


def test_the_same_message_through_another_relay_is_a_duplicate(parts: Parts) -> None:
    raw = make_mail()
    relayed = b"Received: from mx2.example by mx1.example; today\r\n" + raw.replace(
        b"\n", b"\r\n"
    )

    deliver(parts, raw)
    again = deliver(parts, relayed)

    assert again.status == "duplicate"


def test_reused_message_id_with_new_content_is_kept_and_flagged(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<same@customer.example>", body="one\n"))

    second = deliver(
        parts, make_mail(message_id="<same@customer.example>", body="two\n")
    )

    # Stored, not thrown away as a duplicate; it names no parent, so it is
    # a new conversation.
    assert second.status == "created"
    with parts.intake.session_factory() as session:
        stored = session.get(Message, second.message_pk)
        assert stored is not None
        assert "reused-message-id" in stored.flags


def test_a_source_key_seen_before_is_a_duplicate(parts: Parts) -> None:
    deliver(parts, make_mail(body="one\n"), source_key="box:1:7")

    again = deliver(parts, make_mail(body="other bytes\n"), source_key="box:1:7")

    assert again.status == "duplicate"


def test_mail_with_no_sender_is_quarantined_with_the_reason(parts: Parts) -> None:
    raw = b"To: support@example.com\r\nSubject: who am I\r\n\r\nno From here\r\n"

    outcome = deliver(parts, raw)

    assert outcome.status == "quarantined"
    assert "no sender" in outcome.detail
    with parts.intake.session_factory() as session:
        held = session.get(Quarantine, outcome.quarantine_id)
        assert held is not None
        assert held.raw == raw


def test_an_outlook_msg_file_is_quarantined_as_such(parts: Parts) -> None:
    raw = bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 100

    outcome = deliver(parts, raw)

    assert outcome.status == "quarantined"
    assert ".msg" in outcome.detail


def test_acknowledgement_is_skipped_when_the_sender_asks_for_none(
    parts: Parts,
) -> None:
    outcome = deliver(parts, make_mail(extra={"X-Auto-Response-Suppress": "All"}))

    assert outcome.status == "created"
    assert outcome.queued_sends == 0


def test_import_without_acknowledge_queues_nothing(parts: Parts) -> None:
    outcome = deliver(parts, make_mail(), acknowledge=False)

    assert outcome.status == "created"
    assert count(parts, Outbox) == 0


def test_a_strangers_new_ticket_mails_only_its_own_token(parts: Parts) -> None:
    first = deliver(parts, make_mail())
    stranger = deliver(
        parts,
        make_mail(
            sender="Mallory <mallory@evil.example>",
            subject=f"Re: [#{first.ticket_number}] give me the details",
        ),
    )
    ack = message_from_bytes(
        ack_of(parts, stranger.ticket_number or 0).raw, policy=policy.default
    )

    again = deliver(
        parts,
        make_mail(sender="Mallory <mallory@evil.example>", subject=str(ack["Subject"])),
    )

    assert f"[#{first.ticket_number}]" not in str(ack["Subject"])
    assert f"[#{stranger.ticket_number}]" in str(ack["Subject"])
    assert again.status == "appended"
    assert again.ticket_number == stranger.ticket_number
