"""The daemon started for real, mail sent with smtplib on loopback."""

from __future__ import annotations

import json
import mailbox
import smtplib
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import (
    DaemonProcess,
    crlf,
    free_port,
    make_mail,
    query,
    write_config,
)

pytestmark = pytest.mark.slow


def send(
    port: int, raw: bytes, to: str = "support@example.com", **kwargs: object
) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("ann@customer.example", [to], crlf(raw), **kwargs)  # type: ignore[arg-type]


def stored_message_ids(config_dir: Path) -> list[str]:
    found = query(
        config_dir / "intake.toml",
        "select message_id from messages where direction = 'in'",
    )
    return [row[0] for row in found]


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_250_comes_after_the_message_is_committed(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    send(daemon.port, make_mail(message_id="<committed@customer.example>"))

    # No waiting: the 250 itself promises the row is on disk.
    assert stored_message_ids(tmp_path) == ["committed@customer.example"]


def test_the_acknowledgement_lands_in_the_local_maildir(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    send(daemon.port, make_mail(subject="Where is my order?"))

    box = mailbox.Maildir(tmp_path / "state" / "outbox", create=False)
    wait_for(lambda: len(box) == 1)
    ack = next(iter(box))
    assert "[#1]" in ack["Subject"]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["To"] == "Ann Customer <ann@customer.example>"


def test_recipient_outside_our_domains_gets_550(daemon: DaemonProcess) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(daemon.port, make_mail(), to="someone@elsewhere.example")

    code, _ = refused.value.recipients["someone@elsewhere.example"]
    assert code == 550


def test_message_above_the_size_limit_gets_552(daemon: DaemonProcess) -> None:
    big = make_mail(body="x" * 300_000 + "\n")

    with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as refused:
        send(daemon.port, big)

    assert refused.value.smtp_code == 552


def test_smtputf8_mail_is_accepted(daemon: DaemonProcess, tmp_path: Path) -> None:
    raw = (
        "From: José Núñez <josé@cliente.example>\r\n"
        "To: support@example.com\r\n"
        "Subject: Pedido não entregue\r\n"
        "Message-ID: <utf8@cliente.example>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Olá, o meu pedido ainda não chegou.\r\n"
    ).encode()

    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.sendmail(
            "josé@cliente.example",
            ["support@example.com"],
            raw,
            mail_options=["SMTPUTF8"],
        )

    listing = json.loads(daemon.cli("tickets", "list", "--json").stdout)
    assert listing[0]["subject"] == "Pedido não entregue"
    assert listing[0]["email"] == "josé@cliente.example"


@pytest.mark.sqlite_only  # holds SQLite's write lock to make the store fail
def test_store_failure_answers_451_and_the_retry_is_accepted_once(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]},
        store={"busy_timeout_ms": 200},
    )
    process = DaemonProcess(config, port, tmp_path / "daemon.log")
    process.start()
    raw = make_mail(message_id="<retry-me@customer.example>")
    try:
        blocker = sqlite3.connect(
            tmp_path / "state" / "intake.db", isolation_level=None
        )
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(port, raw)
        assert refused.value.smtp_code == 451
        blocker.execute("ROLLBACK")
        blocker.close()

        send(port, raw)
        send(port, raw)
    finally:
        process.stop()

    assert stored_message_ids(tmp_path) == ["retry-me@customer.example"]
    assert "store unavailable" in process.log()


def test_sigterm_stops_the_daemon_cleanly(daemon: DaemonProcess) -> None:
    send(daemon.port, make_mail())

    code = daemon.stop()

    assert code == 0
    assert "stopped" in daemon.log()


def test_bytes_that_are_not_mail_are_quarantined_as_on_import(
    daemon: DaemonProcess,
) -> None:
    send(daemon.port, b"Copyright (c) somebody\nPermission is hereby granted\n")

    held = json.loads(daemon.cli("quarantine", "list", "--json").stdout)
    assert len(held) == 1
    assert "not an email message" in held[0]["reason"]
    raw = daemon.cli("quarantine", "show", str(held[0]["id"]), "--raw").stdout
    assert raw.startswith("Received: from ")  # the stored copy keeps our trace
