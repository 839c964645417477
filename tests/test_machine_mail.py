"""Machine mail never gets a machine reply: the markers, delivery reports
matched to what we sent, undeliverable addresses, out-of-office ping-pong."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from channels.mime import parse_email
from intake.classify import DeliveryFailure, classify, delivery_failures
from intake.clock import FrozenClock
from intake.daemon import Parts, prepare
from intake.domain import Kind
from intake.runner import StoreRunner
from notifier.outbox import OutboxWorker, clear_undeliverable, make_sender
from store.models import ContactPoint
from tests.agentmail import (
    agent_settings,
    body,
    deliver,
    outbox_rows,
    outgoing,
    parsed,
    reply_to,
    ticket,
)
from tests.conftest import make_mail

OWN = ("support@example.com",)
DOMAINS = ("intake.example.com",)


@pytest.fixture
def parts(tmp_path: Path, clock: FrozenClock) -> Iterator[Parts]:
    built = prepare(agent_settings(tmp_path), clock)
    yield built
    built.engine.dispose()


# -- the markers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("Auto-Submitted: auto-replied", Kind.AUTO_REPLY),
        ("Auto-Submitted: auto-generated", Kind.AUTO_REPLY),
        ("Auto-Submitted: no", Kind.HUMAN),
        ("X-Autoreply: yes", Kind.AUTO_REPLY),
        ("X-Autorespond: on vacation", Kind.AUTO_REPLY),
        ("X-Autoresponder: yes", Kind.AUTO_REPLY),
        ("Precedence: bulk", Kind.BULK),
        ("Precedence: junk", Kind.BULK),
        ("Precedence: list", Kind.BULK),
        ("Precedence: auto_reply", Kind.AUTO_REPLY),
        ("List-Id: <news.shop.example>", Kind.BULK),
        ("Return-Path: <>", Kind.AUTO_REPLY),
        ("X-Intake-Loop: support@example.com", Kind.LOOP),
        ("X-Loop: support@example.com", Kind.LOOP),
        ("X-Loop: helpdesk@elsewhere.example", Kind.HUMAN),
        ("X-Auto-Response-Suppress: All", Kind.HUMAN),
        ("Subject: Automatische Antwort: Ihre Anfrage", Kind.AUTO_REPLY),
        ("Subject: Réponse automatique : absent", Kind.AUTO_REPLY),
        ("Subject: Abwesenheitsnotiz", Kind.AUTO_REPLY),
    ],
)
def test_each_marker_of_machine_mail_is_recognised(
    headers: str, expected: Kind
) -> None:
    has_subject = headers.startswith("Subject:")
    raw = (
        "From: jane@customer.example\n"
        + ("" if has_subject else "Subject: My order\n")
        + f"{headers}\n\nHello\n"
    ).encode()

    kind = classify(parse_email(raw), own_addresses=OWN, own_domains=DOMAINS)

    assert kind is expected


@pytest.mark.parametrize(
    "sender",
    [
        "MAILER-DAEMON@mx.customer.example",
        "postmaster@customer.example",
        "support@example.com",
        "support+12.0123456789ab@example.com",
    ],
)
def test_mail_systems_and_our_own_addresses_are_machines(sender: str) -> None:
    raw = f"From: {sender}\nSubject: hello\n\ntext\n".encode()

    kind = classify(parse_email(raw), own_addresses=OWN, own_domains=DOMAINS)

    assert kind.is_machine


def test_our_own_message_id_coming_back_is_a_loop() -> None:
    raw = b"From: jane@customer.example\nMessage-ID: <1.2@intake.example.com>\n\nx\n"

    kind = classify(parse_email(raw), own_addresses=OWN, own_domains=DOMAINS)

    assert kind is Kind.LOOP


def dsn(
    about: str,
    *,
    recipient: str = "ann@customer.example",
    action: str = "failed",
    status: str = "5.1.1",
) -> bytes:
    """An RFC 3464 report about our message ``about`` (its Message-ID)."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.example>\n"
        "To: support@example.com\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "Message-ID: <dsn-"
        + about.strip("<>").split("@")[0]
        + "@mx.customer.example>\n"
        "Auto-Submitted: auto-replied\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n"
        "\n--b\nContent-Type: text/plain\n\nYour message could not be delivered.\n"
        "--b\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.customer.example\n\n"
        f"Final-Recipient: rfc822; {recipient}\nAction: {action}\n"
        f"Status: {status}\nDiagnostic-Code: smtp; 550 5.1.1 no such user\n"
        "--b\nContent-Type: text/rfc822-headers\n\n"
        f"From: Support <support@example.com>\nTo: {recipient}\n"
        f"Message-ID: {about}\nSubject: Re: Printer on fire [#1]\n"
        "--b--\n"
    ).encode()


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        ("failed", "5.1.1", [DeliveryFailure("ann@customer.example", "5.1.1", True)]),
        ("failed", "4.4.7", [DeliveryFailure("ann@customer.example", "4.4.7", False)]),
        ("delayed", "4.4.1", []),
        ("delivered", "2.0.0", []),
    ],
)
def test_a_delivery_report_says_which_recipients_failed_and_how(
    action: str, status: str, expected: list[DeliveryFailure]
) -> None:
    inbound = parse_email(dsn("<x@intake.example.com>", action=action, status=status))

    assert delivery_failures(inbound) == expected


def test_an_exim_bounce_without_a_report_names_its_failed_recipients() -> None:
    raw = (
        b"From: Mail Delivery System <Mailer-Daemon@mx.example.net>\n"
        b"X-Failed-Recipients: Gone@Customer.example, other@customer.example\n"
        b"Subject: Mail delivery failed\n\nsorry\n"
    )

    failures = delivery_failures(parse_email(raw))

    assert [f.recipient for f in failures] == [
        "gone@customer.example",
        "other@customer.example",
    ]
    assert all(f.permanent for f in failures)


# -- bounces of what we sent -------------------------------------------------------


def ack_id(parts: Parts) -> str:
    return f"<{outgoing(parts, 'ack')[-1].message_id}>"


def test_a_hard_bounce_marks_the_message_failed_and_the_address_undeliverable(
    parts: Parts,
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    ours = ack_id(parts)

    outcome = deliver(parts, dsn(ours))

    assert outcome.status == "machine"
    assert outcome.detail == "bounce"
    assert outcome.ticket_number == 1
    assert outcome.queued_sends == 0
    [ack] = outgoing(parts, "ack")
    assert ack.status == "failed"
    [row] = [r for r in outbox_rows(parts) if r.message_pk == ack.id]
    assert row.status == "failed"
    assert "ann@customer.example 5.1.1" in row.last_error
    with parts.intake.session_factory() as session:
        contact = session.query(ContactPoint).one()
        assert contact.undeliverable_at is not None


def test_after_a_hard_bounce_no_mail_goes_to_the_address(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    deliver(parts, dsn(ack_id(parts)))
    note = parsed(outgoing(parts, "notification")[0])

    second = deliver(parts, make_mail(subject="Still broken", body="Again.\n"))
    agent = deliver(parts, reply_to(note, "We will call you instead."))

    assert second.status == "created"
    assert len(outgoing(parts, "ack")) == 1  # none for the second ticket
    assert outgoing(parts, "reply") == []
    [notice] = outgoing(parts, "notice")
    assert "intake contacts clear ann@customer.example" in body(notice)
    assert agent.status == "agent"


def test_a_cleared_address_gets_mail_again(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    deliver(parts, dsn(ack_id(parts)))

    cleared = clear_undeliverable(parts.intake.session_factory, "Ann@Customer.example")
    deliver(parts, make_mail(subject="New question", body="Hello again.\n"))

    assert cleared == 1
    assert len(outgoing(parts, "ack")) == 2


def test_mail_already_queued_is_held_back_once_its_address_bounces(
    parts: Parts,
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    deliver(parts, make_mail(subject="Second", body="One more.\n"))
    first_ack = f"<{outgoing(parts, 'ack')[0].message_id}>"
    deliver(parts, dsn(first_ack))
    settings = parts.settings
    store = StoreRunner(1)
    worker = OutboxWorker(
        parts.intake.session_factory,
        parts.clock,
        settings.outbound,
        make_sender(settings.outbound, settings.outbox_maildir),
        store,
    )

    try:
        asyncio.run(worker.run_once())
    finally:
        store.shutdown()

    rows = {row.message_pk: row for row in outbox_rows(parts)}
    second = rows[outgoing(parts, "ack")[1].id]
    assert second.status == "failed"
    assert "bounced before" in second.last_error
    assert second.attempts == 0
    notifications = [rows[m.id] for m in outgoing(parts, "notification")]
    assert [row.status for row in notifications] == ["sent", "sent"]


def test_a_delay_report_changes_nothing(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))

    deliver(parts, dsn(ack_id(parts), action="delayed", status="4.4.1"))

    [ack] = outgoing(parts, "ack")
    assert ack.status == "queued"
    with parts.intake.session_factory() as session:
        assert session.query(ContactPoint).one().undeliverable_at is None


def test_a_bounce_about_mail_we_never_sent_touches_nothing(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))

    outcome = deliver(parts, dsn("<unknown@elsewhere.example>"))

    assert outcome.status == "machine"
    assert outcome.ticket_number is None
    with parts.intake.session_factory() as session:
        assert session.query(ContactPoint).one().undeliverable_at is None


# -- out-of-office ping-pong -------------------------------------------------------

OUT_OF_OFFICE = {
    "Auto-Submitted": "auto-replied",
    "X-Autoreply": "yes",
    "Precedence": "bulk",
}


def test_an_out_of_office_answer_to_our_acknowledgement_ends_the_conversation(
    parts: Parts,
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    before = len(outgoing(parts))

    outcome = deliver(
        parts,
        make_mail(
            subject="Out of office: Re: Printer on fire [#1]",
            in_reply_to=ack_id(parts),
            body="I am away until Monday.\n",
            extra=OUT_OF_OFFICE,
        ),
    )

    assert outcome.status == "machine"
    assert outcome.ticket_number == 1
    assert len(outgoing(parts)) == before  # nothing to the customer, nor agents


def test_a_responder_without_markers_still_gets_no_second_acknowledgement(
    parts: Parts,
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))

    outcome = deliver(
        parts,
        make_mail(
            subject="Re: Printer on fire [#1]",
            in_reply_to=ack_id(parts),
            body="Thank you for your mail. I am out of the office.\n",
        ),
    )

    assert outcome.status == "appended"
    assert [
        m.kind for m in outgoing(parts) if "ann@customer.example" in m.recipients
    ] == ["ack"]


def test_an_out_of_office_answer_never_reopens_a_resolved_ticket(
    parts: Parts, clock: FrozenClock
) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    note = parsed(outgoing(parts, "notification")[0])
    deliver(parts, reply_to(note, "#resolve"))
    resolution = f"<{outgoing(parts, 'resolution')[0].message_id}>"
    clock.advance(timedelta(minutes=5))

    outcome = deliver(
        parts,
        make_mail(
            subject="Automatic reply: Resolved",
            in_reply_to=resolution,
            extra=OUT_OF_OFFICE,
        ),
    )

    assert outcome.status == "machine"
    assert ticket(parts, 1).status == "resolved"
    assert ticket(parts, 1).reopen_count == 0


def test_everything_we_send_is_marked_as_ours(parts: Parts) -> None:
    deliver(parts, make_mail(message_id="<ask@customer.example>"))
    note = parsed(outgoing(parts, "notification")[0])
    deliver(parts, reply_to(note, "On it."))
    deliver(parts, reply_to(note, "#frobnicate"))
    for n in range(11):
        deliver(parts, make_mail(subject=f"Flood {n}"))

    sent = outgoing(parts)

    assert {m.kind for m in sent} >= {
        "ack",
        "notification",
        "reply",
        "notice",
        "flood-warning",
    }
    for message in sent:
        mail = parsed(message)
        assert mail["Auto-Submitted"] in ("auto-replied", "auto-generated")
        assert mail["X-Intake-Loop"] == "support@example.com"
        assert mail["Message-ID"] == f"<{message.message_id}>"
        assert message.message_id.endswith("@intake.example.com")
        assert mail.get_content_type() == "text/plain"
