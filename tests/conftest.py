"""Shared fixtures: a store in a temporary directory, a frozen clock, mail
builders, and a real daemon started as a child process on a free port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest

from intake.clock import FrozenClock
from intake.config import Settings, load_settings
from intake.daemon import Parts, prepare

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def corpus_files() -> list[Path]:
    """Every file of the real-world corpus; fails under CI when it is missing."""
    if not CORPUS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the corpus is missing at {CORPUS}; CI must provide it")
        pytest.skip("../shared/corpus is not beside this checkout")
    return sorted(path for path in CORPUS.rglob("*") if path.is_file())


def crlf(raw: bytes) -> bytes:
    """Line endings as SMTP carries them; smtplib sends bytes unchanged."""
    return re.sub(rb"\r?\n|\r", b"\r\n", raw)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, **sections: dict[str, Any]) -> Path:
    """A settings file with a state directory under ``directory``."""
    lines = [f'state_dir = "{directory / "state"}"']
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path = directory / "intake.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def make_mail(
    *,
    sender: str = "Ann Customer <ann@customer.example>",
    to: str = "support@example.com",
    subject: str = "Printer on fire",
    body: str = "Hello, my printer is on fire.\n",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
    date: datetime = START,
    extra: dict[str, str] | None = None,
) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = subject
    mail["Date"] = format_datetime(date)
    mail["Message-ID"] = message_id or make_msgid(domain="customer.example")
    if in_reply_to:
        mail["In-Reply-To"] = in_reply_to
    if references:
        mail["References"] = references
    for key, value in (extra or {}).items():
        mail[key] = value
    mail.set_content(body)
    return mail.as_bytes()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = write_config(tmp_path, smtp={"domains": ["example.com"]})
    return load_settings(path, environ={})


@pytest.fixture
def parts(settings: Settings, clock: FrozenClock) -> Iterator[Parts]:
    built = prepare(settings, clock)
    yield built
    built.engine.dispose()


class DaemonProcess:
    """``intake run`` as a child process, the way an operator runs it."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "intake", "--config", str(self.config), "run"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not listen in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args, check=check)


def run_cli(
    config: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "intake", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"intake {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture
def daemon_config(tmp_path: Path) -> tuple[Path, int]:
    port = free_port()
    config = write_config(
        tmp_path,
        smtp={
            "listen": f"127.0.0.1:{port}",
            "domains": ["example.com"],
            "max_message_bytes": 200_000,
        },
        outbound={"poll_seconds": 0.2},
    )
    return config, port


@pytest.fixture
def daemon(tmp_path: Path, daemon_config: tuple[Path, int]) -> Iterator[DaemonProcess]:
    config, port = daemon_config
    process = DaemonProcess(config, port, tmp_path / "daemon.log")
    process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop()
