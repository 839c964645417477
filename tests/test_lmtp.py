"""LMTP mode: LHLO, and one reply per accepted recipient after the data
(RFC 2033 4.2), checked with smtplib's LMTP client against the daemon."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from channels.lmtp import per_recipient
from tests.conftest import DaemonProcess, crlf, free_port, make_mail, write_config


@pytest.mark.parametrize(
    ("status", "recipients", "replies"),
    [
        (
            "250 2.0.0 Ok: created ticket 7",
            ["<support@example.com>", "sales@example.com"],
            [
                "250 2.0.0 <support@example.com> Ok: created ticket 7",
                "250 2.0.0 <sales@example.com> Ok: created ticket 7",
            ],
        ),
        (
            "451 4.3.0 Temporary storage failure",
            ["a@example.com"],
            ["451 4.3.0 <a@example.com> Temporary storage failure"],
        ),
        ("250 OK", ["a@example.com"], ["250 2.0.0 <a@example.com> OK"]),
        ("250 2.0.0 Ok", [], []),
    ],
)
def test_each_recipient_gets_a_reply_of_its_own(
    status: str, recipients: list[str], replies: list[str]
) -> None:
    assert per_recipient(status, recipients) == replies


def test_a_reply_without_a_code_is_refused() -> None:
    with pytest.raises(ValueError, match="not an SMTP reply"):
        per_recipient("fine", ["a@example.com"])


@pytest.fixture
def lmtp_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    port = free_port()
    config = write_config(
        tmp_path,
        smtp={
            "mode": "lmtp",
            "listen": f"127.0.0.1:{port}",
            "domains": ["example.com"],
        },
    )
    process = DaemonProcess(config, port, tmp_path / "daemon.log")
    process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop()


def lmtp(port: int) -> smtplib.LMTP:
    client = smtplib.LMTP("127.0.0.1", port, timeout=30)
    code, _ = client.ehlo("mta.example.net")  # smtplib sends LHLO for LMTP
    assert code == 250
    return client


@pytest.mark.slow
def test_two_recipients_get_two_replies_after_the_data(
    lmtp_daemon: DaemonProcess,
) -> None:
    client = lmtp(lmtp_daemon.port)
    client.mail("ann@customer.example")
    client.rcpt("support@example.com")
    refused, _ = client.rcpt("someone@elsewhere.example")
    client.rcpt("sales@example.com")

    first = client.data(crlf(make_mail(message_id="<lmtp-two@customer.example>")))
    second = client.getreply()
    client.quit()

    assert refused == 550
    assert first[0] == 250
    assert b"<support@example.com>" in first[1]
    assert second[0] == 250
    assert b"<sales@example.com>" in second[1]
    messages = json.loads(lmtp_daemon.cli("messages", "list", "--json").stdout)
    assert [m["message_id"] for m in messages] == ["lmtp-two@customer.example"]


@pytest.mark.slow
def test_the_next_transaction_reads_cleanly_after_per_recipient_replies(
    lmtp_daemon: DaemonProcess,
) -> None:
    client = lmtp(lmtp_daemon.port)
    for n in range(3):
        client.mail("ann@customer.example")
        client.rcpt("support@example.com")
        client.rcpt("help@example.com")
        raw = make_mail(message_id=f"<lmtp-{n}@customer.example>", subject=f"Q{n}")
        replies = [client.data(crlf(raw)), client.getreply()]
        assert [code for code, _ in replies] == [250, 250]

    assert client.noop()[0] == 250
    client.quit()
    listing = json.loads(lmtp_daemon.cli("tickets", "list", "--json").stdout)
    assert len(listing) == 3


@pytest.mark.slow
def test_ehlo_is_refused_in_lmtp_mode(lmtp_daemon: DaemonProcess) -> None:
    with smtplib.SMTP("127.0.0.1", lmtp_daemon.port, timeout=30) as client:
        code, _ = client.ehlo("mta.example.net")

    assert code == 500


@pytest.mark.slow
def test_lmtp_mail_is_stamped_with_lmtp_in_received(
    lmtp_daemon: DaemonProcess,
) -> None:
    client = lmtp(lmtp_daemon.port)
    client.sendmail(
        "ann@customer.example",
        ["support@example.com"],
        crlf(make_mail(message_id="<stamp@customer.example>")),
    )
    client.quit()

    shown = json.loads(lmtp_daemon.cli("tickets", "show", "1", "--json").stdout)
    assert shown["number"] == 1
    log = lmtp_daemon.log()
    assert "lmtp: listening on" in log
    assert "source=lmtp" in log
