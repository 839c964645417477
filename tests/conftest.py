"""Shared fixtures: a store in a temporary directory, a frozen clock, mail
builders, and a real daemon started as a child process on a free port.

With ``TEST_STORE_URL`` set to a PostgreSQL server URL (any database
on it; ``postgres`` will do), every test gets a fresh database of its own on
that server instead of a SQLite file, created before and dropped after it;
tests about SQLite itself are marked ``sqlite_only`` and skipped.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from intake.clock import FrozenClock
from intake.config import Settings, load_settings
from intake.daemon import Parts, prepare
from store.engine import make_engine
from store.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
# Not INTAKE_...: the settings would take that for an override of their own.
STORE_URL_ENV = "TEST_STORE_URL"
POSTGRES_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# The PostgreSQL run's databases, while a test runs; set by the autouse
# fixture below, asked by write_config for the test's database.
_backend: PostgresBackend | None = None


def postgres_server() -> str | None:
    """The PostgreSQL server the suite may use: the matrix's, or the local
    one. None when there is none; under CI a missing server fails."""
    url = os.environ.get(STORE_URL_ENV) or POSTGRES_DEFAULT
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            return url
    except OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {url} is not reachable under CI: {exc}")
        return None
    finally:
        engine.dispose()


class FreshDatabase:
    """A new database on a PostgreSQL server, empty or a copy of a template,
    dropped afterwards even when daemons still hold connections to it."""

    def __init__(self, server_url: str, template: str | None = None) -> None:
        self.admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
        self.name = f"intake_test_{uuid.uuid4().hex[:12]}"
        self.template = template
        self.url = (
            make_url(server_url)
            .set(database=self.name)
            .render_as_string(hide_password=False)
        )

    def create(self) -> str:
        copy = f' TEMPLATE "{self.template}"' if self.template else ""
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"{copy}'))
        return self.url

    def drop(self) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{self.name}" WITH (FORCE)'))
        self.admin.dispose()

    def __enter__(self) -> str:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.drop()


class PostgresBackend:
    """The suite's PostgreSQL run, made affordable: the migrations run once
    into a template database; each settings directory a test writes gets a
    copy of it (as each gets its own SQLite file), made on first use and
    dropped in the background once the test is over. Tests that never touch
    a store pay nothing."""

    def __init__(self, server_url: str) -> None:
        self.server = server_url
        self.template = FreshDatabase(server_url)
        engine = make_engine(self.template.create())
        upgrade(engine)
        engine.dispose()
        self.dropper = ThreadPoolExecutor(1, thread_name_prefix="drop-database")
        self.current: dict[Path, FreshDatabase] = {}

    def database(self, directory: Path) -> str:
        if directory not in self.current:
            fresh = FreshDatabase(self.server, template=self.template.name)
            fresh.create()
            self.current[directory] = fresh
        return self.current[directory].url

    def test_over(self) -> None:
        for database in self.current.values():
            self.dropper.submit(database.drop)
        self.current = {}

    def close(self) -> None:
        self.dropper.shutdown(wait=True)
        self.template.drop()


def on_postgres() -> bool:
    return bool(os.environ.get(STORE_URL_ENV))


@pytest.fixture(scope="session")
def postgres_backend() -> Iterator[PostgresBackend | None]:
    if not on_postgres():
        yield None
        return
    server = postgres_server()
    if server is None:
        pytest.fail(f"{STORE_URL_ENV} is set but PostgreSQL does not answer")
    backend = PostgresBackend(server)
    yield backend
    backend.close()


@pytest.fixture(autouse=True)
def store_backend(
    request: pytest.FixtureRequest, postgres_backend: PostgresBackend | None
) -> Iterator[str]:
    """SQLite, or a fresh PostgreSQL database for this test (see above)."""
    global _backend  # noqa: PLW0603 (one test at a time uses it)
    if postgres_backend is None:
        yield "sqlite"
        return
    if request.node.get_closest_marker("sqlite_only"):
        pytest.skip("about SQLite itself; the SQLite run covers it")
    _backend = postgres_backend
    try:
        yield "postgresql"
    finally:
        _backend = None
        postgres_backend.test_over()
        # psycopg warns about a connection left open only when it is
        # collected; collecting here blames the test that left it.
        gc.collect()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database whatever the suite's backend, for tests
    that are about PostgreSQL (several daemons, migrate-to)."""
    server = postgres_server()
    if server is None:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    with FreshDatabase(server) as url:
        yield url


def database_url(config: Path) -> str:
    """The database a settings file points at, on either backend."""
    return load_settings(config, environ={}).database_url


def query(config: Path, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows from the test's database through SQLAlchemy, on either backend."""
    return read_rows(database_url(config), sql, **params)


def read_rows(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows from ``url``; a SQLite file is opened read-only, so the reader
    neither creates it nor takes a write lock."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        url = f"sqlite:///file:{parsed.database}?mode=ro&uri=true"
    engine = create_engine(url, poolclass=NullPool)  # closed on release
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


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
    """A settings file with a state directory under ``directory``, the
    HTTP listener on a free port, and the test's PostgreSQL database when
    the suite runs on PostgreSQL."""
    sections = {name: dict(values) for name, values in sections.items()}
    sections.setdefault("http", {}).setdefault("listen", f"127.0.0.1:{free_port()}")
    if _backend is not None and "url" not in sections.get("store", {}):
        sections.setdefault("store", {})["url"] = _backend.database(directory)
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

    def __init__(
        self,
        config: Path,
        port: int,
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.port = port
        self.log_path = log
        self.env = dict(env or {})
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "intake",
                "--config",
                str(self.config),
                *self.options,
                "run",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **self.env},
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
