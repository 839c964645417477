"""Outbound mail through a real SMTP relay on loopback (aiosmtpd), which
can refuse or be down: retries with backoff, failed rows retried by hand,
and an agent's whole day through the running daemon."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Iterator
from datetime import timedelta
from email.utils import make_msgid
from pathlib import Path

import pytest

from intake.clock import FrozenClock
from intake.config import load_settings
from intake.daemon import Parts, prepare
from intake.runner import StoreRunner
from notifier.outbox import Claimed, OutboxWorker, RelaySender, SendError
from tests.agentmail import (
    BOB,
    OWNER,
    FakeRelay,
    Received,
    agent_config,
    deliver,
    outbox_rows,
    relay_section,
    reply_to,
    started_relay,
)
from tests.conftest import DaemonProcess, crlf, free_port, make_mail, run_cli


@pytest.fixture
def relay() -> Iterator[FakeRelay]:
    yield from started_relay()


def claimed(raw: bytes, recipients: list[str]) -> Claimed:
    return Claimed(1, "key", "support@example.com", recipients, raw, attempts=0)


def relay_parts(
    tmp_path: Path, relay: FakeRelay, clock: FrozenClock, **outbound: object
) -> tuple[Path, Parts]:
    config = agent_config(tmp_path, outbound={**relay_section(relay), **outbound})
    return config, prepare(load_settings(config, environ={}), clock)


def worker(parts: Parts, store: StoreRunner) -> OutboxWorker:
    settings = parts.settings
    assert settings.outbound.relay is not None
    return OutboxWorker(
        parts.intake.session_factory,
        parts.clock,
        settings.outbound,
        RelaySender(settings.outbound.relay),
        store,
    )


def test_the_relay_receives_the_message_as_stored(
    tmp_path: Path, relay: FakeRelay
) -> None:
    config = agent_config(tmp_path, outbound=relay_section(relay))
    settings = load_settings(config, environ={})
    assert settings.outbound.relay is not None
    raw = crlf(make_mail(sender="Support <support@example.com>"))

    asyncio.run(
        RelaySender(settings.outbound.relay).send(claimed(raw, ["a@b.example"]))
    )

    [got] = relay.received
    assert got.envelope_from == "support@example.com"
    assert got.recipients == ["a@b.example"]
    assert got.raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


@pytest.mark.parametrize(
    ("answer", "permanent"),
    [
        ("451 4.3.0 Try again later", False),
        ("421 4.7.0 Too busy", False),
        ("554 5.7.1 Message refused", True),
    ],
)
def test_the_relay_answer_decides_whether_to_try_again(
    tmp_path: Path, relay: FakeRelay, answer: str, permanent: bool
) -> None:
    settings = load_settings(
        agent_config(tmp_path, outbound=relay_section(relay)), environ={}
    )
    assert settings.outbound.relay is not None
    relay.handler.fail = answer

    with pytest.raises(SendError) as failed:
        asyncio.run(
            RelaySender(settings.outbound.relay).send(
                claimed(crlf(make_mail()), ["a@b.example"])
            )
        )

    assert failed.value.permanent is permanent
    assert answer.split(maxsplit=1)[0] in str(failed.value)


def test_a_relay_that_is_not_there_is_a_temporary_failure(tmp_path: Path) -> None:
    closed = FakeRelay()  # never started: the port refuses connections
    settings = load_settings(
        agent_config(tmp_path, outbound=relay_section(closed)), environ={}
    )
    assert settings.outbound.relay is not None

    with pytest.raises(SendError) as failed:
        asyncio.run(
            RelaySender(settings.outbound.relay).send(
                claimed(crlf(make_mail()), ["a@b.example"])
            )
        )

    assert failed.value.permanent is False


def message_ids(received: list[Received]) -> list[str]:
    return [str(item.mail["Message-ID"]).strip("<>") for item in received]


def test_the_relay_down_for_five_minutes_delivers_every_message_once_back(
    tmp_path: Path, relay: FakeRelay, clock: FrozenClock
) -> None:
    relay.down()
    _, parts = relay_parts(tmp_path, relay, clock, retry_base_seconds=30)
    for n in range(5):
        deliver(parts, make_mail(subject=f"Order {n}", sender=f"c{n}@customer.example"))
    queued = {row.id for row in outbox_rows(parts)}
    store = StoreRunner(1)
    sender = worker(parts, store)

    async def passes(minutes: int) -> None:
        for _ in range(minutes * 2):
            await sender.run_once()
            clock.advance(timedelta(seconds=30))

    try:
        asyncio.run(passes(5))
        down = outbox_rows(parts)
        relay.up()
        asyncio.run(passes(10))
        after = outbox_rows(parts)
    finally:
        store.shutdown()
        parts.engine.dispose()

    assert len(queued) == 10  # an acknowledgement and a notification each
    assert {row.status for row in down} == {"pending"}
    assert all(row.attempts >= 3 for row in down)  # it kept trying, less often
    assert all(row.attempts < 10 for row in down)
    assert {row.status for row in after} == {"sent"}
    got = message_ids(relay.received)
    assert sorted(got) == sorted(set(got))  # none twice
    assert len(got) == 10


def test_a_failed_row_is_listed_and_sent_again_by_outbox_retry(
    tmp_path: Path, relay: FakeRelay, clock: FrozenClock
) -> None:
    config, parts = relay_parts(tmp_path, relay, clock)
    deliver(parts, make_mail())
    relay.handler.fail = "550 5.7.1 Relaying denied"
    store = StoreRunner(1)
    try:
        asyncio.run(worker(parts, store).run_once())
    finally:
        store.shutdown()
        parts.engine.dispose()
    relay.handler.fail = None

    listed = json.loads(
        run_cli(config, "outbox", "list", "--status", "failed", "--json").stdout
    )
    retried = run_cli(config, "outbox", "retry", "--all")
    again = run_cli(config, "outbox", "retry", "--all", check=False)

    assert [row["kind"] for row in listed] == ["ack", "notification"]
    assert all("550 5.7.1" in row["last_error"] for row in listed)
    assert retried.stdout.split() == ["1:", "sent", "2:", "sent"]
    assert len(relay.received) == 2
    assert again.returncode == 1


def test_an_undeliverable_address_is_cleared_on_the_command_line(
    tmp_path: Path, relay: FakeRelay, clock: FrozenClock
) -> None:
    config, parts = relay_parts(tmp_path, relay, clock)
    deliver(parts, make_mail())
    with parts.intake.session_factory.begin() as session:
        session.connection().exec_driver_sql(
            "UPDATE contact_points SET undeliverable_at = '2026-03-02 09:00:00'"
        )
    parts.engine.dispose()

    cleared = run_cli(config, "contacts", "clear", "ann@customer.example")
    twice = run_cli(config, "contacts", "clear", "ann@customer.example", check=False)

    assert "mail goes to it again" in cleared.stdout
    assert twice.returncode == 1


# -- an agent's day, through the daemon ----------------------------------------------


ANN = "ann@customer.example"


def arrived(relay: FakeRelay, recipient: str, header: str = "") -> Received:
    """The first mail to ``recipient`` with ``header`` ("Name: part of the
    value") among its headers, once the relay has it."""
    name, _, part = header.partition(": ")

    def matching(got: list[Received]) -> list[Received]:
        return [
            item
            for item in got
            if recipient in item.recipients
            and (not name or part in str(item.mail[name]))
        ]

    return matching(relay.wait_for(lambda got: bool(matching(got))))[0]


def send(port: int, raw: bytes, sender: str, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, [to], crlf(raw))


@pytest.mark.slow
def test_an_agents_day_notification_reply_and_resolve(
    tmp_path: Path, relay: FakeRelay
) -> None:
    port = free_port()
    config = agent_config(
        tmp_path,
        smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]},
        outbound=relay_section(relay),
    )
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    daemon.start()
    try:
        asked = make_msgid(domain="customer.example")
        send(port, make_mail(message_id=asked), ANN, "support@example.com")
        notification = arrived(relay, BOB).mail

        reply = reply_to(notification, "Hi Ann,\n\nA new fuser is on its way.\n\nBob")
        send(port, reply, BOB, notification["Reply-To"].addresses[0].addr_spec)
        answered = arrived(relay, ANN, "From: Bob Agent")

        send(port, reply_to(notification, "#resolve"), BOB, "support@example.com")
        resolved = arrived(relay, ANN, "Subject: Resolved:")
    finally:
        daemon.stop()

    mail = answered.mail
    part = mail.get_body(("plain",))
    assert part is not None
    text = part.get_content()
    assert answered.recipients == [ANN]
    assert mail["In-Reply-To"] == asked
    assert mail["From"].addresses[0].addr_spec == "support@example.com"
    assert "A new fuser is on its way." in text
    assert "wrote:" not in text
    assert "New ticket from" not in text
    assert resolved.recipients == [ANN, OWNER]
    assert len([item for item in relay.received if ANN in item.recipients]) == 3
