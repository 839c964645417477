"""Two daemons on one PostgreSQL database, mail arriving at both: every
ticket number once, every outbox row sent once, one digest per period."""

from __future__ import annotations

import base64
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text

from channels.email import receive
from intake.daemon import Parts
from store import queries
from tests.conftest import DaemonProcess, crlf, free_port, make_mail, write_config


def queries_ticket(parts: Parts, number: int) -> dict[str, Any]:
    with parts.intake.session_factory() as session:
        found = queries.ticket(session, number)
    assert found is not None
    return found


SENDERS_PER_DAEMON = 3
PER_SENDER = 25


class RecordingRelay:
    """The relay both daemons send through; it keeps each Message-ID."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.original_content)
        with self.lock:
            self.received[str(message["Message-ID"]).strip("<>")] += 1
        return "250 2.0.0 queued"


@pytest.fixture
def relay() -> Iterator[tuple[RecordingRelay, int]]:
    handler = RecordingRelay()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


@pytest.fixture
def two_daemons(
    tmp_path: Path, postgres_url: str, relay: tuple[RecordingRelay, int]
) -> Iterator[list[DaemonProcess]]:
    _, relay_port = relay
    daemons = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        port = free_port()
        config = write_config(
            directory,
            store={"url": postgres_url},
            smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]},
            outbound={"poll_seconds": 0.2},
            # Today's digest is due when they start: each daemon's scheduler
            # tries to send it, and the database lets one of them.
            digest={"at": "00:00", "every": "day", "timezone": "UTC"},
            **{
                "outbound.relay": {
                    "host": "127.0.0.1",
                    "port": relay_port,
                    "tls": "none",
                }
            },
        )
        daemons.append(
            DaemonProcess(
                config,
                port,
                directory / "daemon.log",
                env={"INTAKE_OWNER_EMAIL": '"owner@example.com"'},
            )
        )

    # Started together on an empty database: both migrate, one waits.
    starters = [threading.Thread(target=daemon.start) for daemon in daemons]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join(60)
    yield daemons
    for daemon in daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()


def send_batch(port: int, sender: int, failures: list[str]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for n in range(PER_SENDER):
                raw = make_mail(
                    sender=f"C {sender} <c{port}.{sender}.{n}@customer.example>",
                    subject=f"Question {n}",
                    message_id=f"<pg-{port}-{sender}-{n}@customer.example>",
                )
                client.sendmail(
                    "c@customer.example", ["support@example.com"], crlf(raw)
                )
    except (smtplib.SMTPException, OSError) as exc:
        failures.append(repr(exc))


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_two_daemons_share_one_database_without_doubling_anything(
    two_daemons: list[DaemonProcess],
    postgres_url: str,
    relay: tuple[RecordingRelay, int],
) -> None:
    recorder, _ = relay
    failures: list[str] = []
    threads = [
        threading.Thread(target=send_batch, args=(daemon.port, sender, failures))
        for daemon in two_daemons
        for sender in range(SENDERS_PER_DAEMON)
    ]
    expected = len(threads) * PER_SENDER

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        waiting = rows(
            postgres_url, "select count(*) from outbox where status <> 'sent'"
        )[0][0]
        if waiting == 0:
            break
        time.sleep(0.2)
    for daemon in two_daemons:
        assert daemon.stop() == 0

    assert failures == []
    numbers = [row[0] for row in rows(postgres_url, "select number from tickets")]
    assert sorted(numbers) == list(range(1, expected + 1))
    sent = rows(
        postgres_url,
        "select m.message_id, o.status, o.claimed_by from outbox o "
        "join messages m on m.id = o.message_pk",
    )
    kinds = Counter(
        row[0]
        for row in rows(
            postgres_url,
            "select m.kind from outbox o join messages m on m.id = o.message_pk",
        )
    )
    assert kinds["digest"] == 1
    assert len(sent) == expected + 1  # an acknowledgement per ticket, one digest
    assert {status for _, status, _ in sent} == {"sent"}
    assert recorder.received == Counter({message_id: 1 for message_id, _, _ in sent})
    # Both outbox workers took part, each row claimed by one of them.
    assert len({claimed_by for _, _, claimed_by in sent}) == 2


def test_a_nul_character_in_a_body_is_stored_on_either_backend(parts: Parts) -> None:
    # PostgreSQL's text type refuses NUL; base64 can carry one all the same.
    raw = (
        b"From: Ann <ann@customer.example>\r\nTo: support@example.com\r\n"
        b"Subject: odd\r\nMessage-ID: <nul@customer.example>\r\n"
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"before\x00after")
        + b"\r\n"
    )

    outcome = receive(parts.intake, raw, source="test")

    assert outcome.status == "created"
    shown = queries_ticket(parts, outcome.ticket_number or 0)
    assert "before\ufffdafter" in shown["messages"][0]["text"]
