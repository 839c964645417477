"""SIGKILL while mail arrives: every message that got 250 is stored exactly
once after a restart, and the senders' retries create nothing twice."""

from __future__ import annotations

import signal
import smtplib
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, crlf, database_url, make_mail, query

pytestmark = pytest.mark.slow

CONNECTIONS = 10
PER_CONNECTION = 30
KILL_AFTER = 120


def sender_thread(
    port: int,
    mails: list[tuple[str, bytes]],
    accepted: list[str],
    lock: threading.Lock,
    enough: threading.Event,
) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for message_id, raw in mails:
                client.sendmail("c@customer.example", ["support@example.com"], raw)
                with lock:
                    accepted.append(message_id)
                    if len(accepted) >= KILL_AFTER:
                        enough.set()
    except (smtplib.SMTPException, OSError):
        return  # the daemon died under us; the retry below resends


def stored_counts(config: Path) -> Counter[str]:
    rows = query(config, "select message_id from messages where direction = 'in'")
    if database_url(config).startswith("sqlite"):
        db = config.parent / "state" / "intake.db"
        with sqlite3.connect(db) as connection:
            assert connection.execute("pragma integrity_check").fetchone() == ("ok",)
    return Counter(row[0] for row in rows)


def test_sigkill_mid_stream_loses_and_doubles_nothing(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    mails = [
        [
            (
                f"crash-{c}-{n}@customer.example",
                crlf(
                    make_mail(
                        sender=f"Customer {c} <c{c}@customer.example>",
                        subject=f"Problem {c}/{n}",
                        message_id=f"<crash-{c}-{n}@customer.example>",
                    )
                ),
            )
            for n in range(PER_CONNECTION)
        ]
        for c in range(CONNECTIONS)
    ]
    accepted: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    threads = [
        threading.Thread(
            target=sender_thread, args=(daemon.port, batch, accepted, lock, enough)
        )
        for batch in mails
    ]

    for thread in threads:
        thread.start()
    assert enough.wait(120), "the daemon accepted too little before the kill"
    daemon.stop(signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    with lock:
        acknowledged = list(accepted)

    counts = stored_counts(daemon.config)
    assert all(counts[message_id] == 1 for message_id in acknowledged)
    assert all(count == 1 for count in counts.values())

    # Senders retry what got no 250 (and some that did): after the restart
    # every message is there exactly once.
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        for batch in mails:
            for _, raw in batch:
                client.sendmail("c@customer.example", ["support@example.com"], raw)
    daemon.stop()

    counts = stored_counts(daemon.config)
    assert len(counts) == CONNECTIONS * PER_CONNECTION
    assert set(counts.values()) == {1}
    assert len(acknowledged) < CONNECTIONS * PER_CONNECTION
