"""Logging: secrets masked in one place whatever logs them, JSON lines for
log shippers, the journal's priority prefix."""

from __future__ import annotations

import io
import json
import logging
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.config import load_settings
from intake.logs import LogFormat, settings_secrets, setup_logging
from tests.conftest import DaemonProcess, free_port, make_mail, write_config

# Test secrets, here to prove they never leak.
RELAY_PASSWORD = "correct-horse-battery"  # noqa: S105
IMAP_PASSWORD = "imap-secret-42"  # noqa: S105
DB_PASSWORD = "pg-pass-77"  # noqa: S105


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def settings_with_secrets(tmp_path: Path) -> Path:
    (tmp_path / "imap-password").write_text(IMAP_PASSWORD + "\n")
    path = tmp_path / "intake.toml"
    path.write_text(
        f"""
[store]
url = "postgresql+psycopg://intake:{DB_PASSWORD}@db.example.com/intake"
[outbound.relay]
host = "smtp.example.com"
username = "support@example.com"
password = "{RELAY_PASSWORD}"
[[imap.mailboxes]]
name = "support"
host = "imap.example.com"
username = "support@example.com"
password_file = "{tmp_path / "imap-password"}"
"""
    )
    return path


def capture(
    log_format: LogFormat, tmp_path: Path
) -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    mask = setup_logging("info", log_format, stream=stream, environ={})
    settings = load_settings(settings_with_secrets(tmp_path), environ={})
    mask.hide(settings_secrets(settings))
    return stream, logging.getLogger("channels.somewhere")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_from_the_settings_never_reach_the_log(
    tmp_path: Path, log_format: LogFormat
) -> None:
    stream, log = capture(log_format, tmp_path)

    log.info("relay login with %s", RELAY_PASSWORD)
    log.warning("imap: LOGIN support %s refused", IMAP_PASSWORD)
    log.error("db: could not connect with %r", {"password": DB_PASSWORD})
    try:
        raise RuntimeError(f"auth failed for {RELAY_PASSWORD}")
    except RuntimeError:
        log.exception("send failed")

    written = stream.getvalue()
    for secret in (RELAY_PASSWORD, IMAP_PASSWORD, DB_PASSWORD):
        assert secret not in written
    assert written.count("***") >= 4
    assert "send failed" in written


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    "line",
    [
        "connecting to postgresql+psycopg://intake:hunter22@db/intake",
        "relay said: auth password=hunter22 rejected",
        "X-Twilio-Signature: hunter22",
        "settings: {'auth_token': 'hunter22'}",
    ],
)
def test_values_that_look_like_secrets_are_masked_unregistered(
    tmp_path: Path, line: str
) -> None:
    stream = io.StringIO()
    setup_logging("info", "text", stream=stream, environ={})

    logging.getLogger("anything").info(line)

    assert "hunter22" not in stream.getvalue()
    assert "***" in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_the_message_fields_of_their_own() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream, environ={})

    logging.getLogger("intake.accept").info(
        "accepted channel=email source=smtp key=- ticket=12 outcome=created"
    )

    entry = json.loads(stream.getvalue())
    assert entry["level"] == "info"
    assert entry["logger"] == "intake.accept"
    assert (entry["channel"], entry["ticket"], entry["outcome"]) == (
        "email",
        "12",
        "created",
    )


@pytest.mark.usefixtures("restore_logging")
def test_under_journald_lines_carry_a_priority_prefix(tmp_path: Path) -> None:
    target = (tmp_path / "journal").open("w+")
    found = Path(f"/proc/self/fd/{target.fileno()}").stat()
    environ = {"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}
    setup_logging("info", "text", stream=target, environ=environ)

    logging.getLogger("intake.daemon").warning("careful")
    target.flush()

    assert (tmp_path / "journal").read_text() == "<4>WARNING intake.daemon: careful\n"
    target.close()


@pytest.mark.slow
def test_the_daemon_logs_one_json_object_per_line_with_log_format_json(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path, smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]}
    )
    daemon = DaemonProcess(
        config, port, tmp_path / "daemon.log", options=("--log-format", "json")
    )
    daemon.start()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("ann@customer.example", ["support@example.com"], make_mail())
    daemon.stop()

    entries = [json.loads(line) for line in daemon.log().splitlines() if line]
    accepted = [e for e in entries if e["message"].startswith("accepted ")]
    assert len(accepted) == 1
    assert accepted[0]["source"] == "smtp"
    assert accepted[0]["ticket"] == "1"
    assert accepted[0]["outcome"] == "created"
    assert any(e["message"] == "stopped" for e in entries)
