"""What the person who runs Intake needs besides the daemon.

``check`` tries every part the settings name and says what to fix,
``backup`` copies a live SQLite store, ``migrate_to`` copies every row into a
new database (SQLite to PostgreSQL, usually) and proves it by counts.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
from sqlalchemy import (
    Engine,
    MetaData,
    Table,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from channels.imap import Cursors, MailboxError, Position, check_mailbox
from intake.clock import Clock, SystemClock
from intake.config import ImapMailbox, RelaySettings, Settings, split_host_port
from intake.errors import IntakeError
from store.engine import make_engine, make_session_factory
from store.migrate import is_current, upgrade

CHUNK = 1000
# Rows a fresh migration writes; any other row means the target is in use.
SEEDED = frozenset({"counters"})
NOT_COPIED = frozenset({"alembic_version"})


class OpsError(IntakeError):
    """An operation refused or failed; ``subject`` is what it was about."""

    def __init__(self, subject: str, problem: str) -> None:
        self.subject = subject
        self.problem = problem
        super().__init__(f"{subject}: {problem}")


# -- intake check -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``intake check``: what was tried, and what to fix."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        fix = f" -> fix: {self.fix}" if self.fix and not self.ok else ""
        return f"{mark} {self.name}: {self.detail}{fix}"


def masked(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


def run_checks(settings: Settings, clock: Clock | None = None) -> Iterator[Check]:
    """Every check the settings call for, in the order a person fixes them."""
    clock = clock or SystemClock()
    yield from check_hostnames(settings)
    if settings.store.url == "":
        yield check_state_dir(settings.state_dir)
    database = check_database(settings.database_url)
    yield database
    yield check_relay(settings.outbound.relay, settings.outbox_maildir)

    cursors: Cursors = NoCursors()
    engine = make_engine(settings.database_url) if database.ok else None
    if engine is not None:
        cursors = Cursors(make_session_factory(engine), clock)
    for mailbox in settings.imap.mailboxes:
        yield check_imap(mailbox, cursors)
    if engine is not None:
        engine.dispose()

    # Checked only once an SMS channel adds a [twilio] section.
    twilio: Any = getattr(settings, "twilio", None)
    account_sid: Any = getattr(twilio, "account_sid", None)
    if account_sid:
        yield check_twilio(account_sid, twilio.auth_token)


def hostnames(settings: Settings) -> list[tuple[str, str]]:
    """(setting, hostname) pairs for every host the settings name."""
    found: list[tuple[str, str]] = []
    if settings.smtp.enabled:
        found.append(("smtp.listen", split_host_port(settings.smtp.listen)[0]))
    if settings.http.enabled:
        found.append(("http.listen", split_host_port(settings.http.listen)[0]))
    if settings.store.url:
        try:
            host = make_url(settings.store.url).host
        except ArgumentError:
            host = None
        if host:
            found.append(("store.url", host))
    if settings.outbound.relay is not None:
        found.append(("outbound.relay.host", settings.outbound.relay.host))
    for mailbox in settings.imap.mailboxes:
        found.append((f"imap.mailboxes[{mailbox.name}].host", mailbox.host))

    return found


def check_hostnames(settings: Settings) -> Iterator[Check]:
    for setting, host in hostnames(settings):
        try:
            addresses = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            yield Check(
                f"resolve {host}",
                False,
                f"{setting} names a host that does not resolve ({exc})",
                f"correct {setting}, or the DNS or /etc/hosts entry for {host}",
            )
            continue
        first = sorted({str(entry[4][0]) for entry in addresses})
        yield Check(f"resolve {host}", True, f"{setting} -> {', '.join(first)}")


def check_state_dir(state_dir: Path) -> Check:
    """SQLite needs a directory it can write: the database, its WAL, the
    maildir of outgoing mail."""
    directory = state_dir.resolve()
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if directory.exists():
            with (directory / ".intake-check").open("w") as handle:
                handle.write("ok")
            (directory / ".intake-check").unlink()
        elif not probe.is_dir() or not _writable(probe):
            raise PermissionError(f"cannot create it under {probe}")
        else:
            return Check("state directory", True, f"{directory} can be created")
    except OSError as exc:
        return Check(
            "state directory",
            False,
            f"{directory} is not writable ({exc})",
            "set state_dir to a directory the daemon's user owns "
            "(systemd: StateDirectory=intake gives /var/lib/intake)",
        )

    return Check("state directory", True, f"{directory} is writable")


def _writable(path: Path) -> bool:
    try:
        probe = path / ".intake-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError:
        return False
    return True


def check_database(url: str) -> Check:
    unusable = (
        'give [store] url as "postgresql+psycopg://USER@HOST/DB" '
        '(pip install "intake[postgres]"), or leave it empty for SQLite'
    )
    try:
        parsed = make_url(url)
        engine = create_engine(url, pool_pre_ping=False)
    except (ArgumentError, ImportError) as exc:
        return Check(
            "database", False, f"{masked(url)} is not usable ({exc})", unusable
        )
    sqlite_file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if sqlite_file and not Path(sqlite_file).exists():
        engine.dispose()
        return Check(
            "database",
            True,
            f"none yet at {sqlite_file}; intake init or run creates it",
        )

    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        current = is_current(engine)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return Check(
            "database",
            False,
            f"{masked(url)}: {reason}",
            "check [store] url (host, port, user, database name) and the "
            "password (store.password_file), and that the server runs",
        )
    finally:
        engine.dispose()

    schema = "schema current" if current else "migrations pending (run intake init)"
    return Check("database", True, f"{masked(url)} answers; {schema}")


def check_relay(relay: RelaySettings | None, maildir: Path) -> Check:
    if relay is None:
        return Check("relay", True, f"none set; outgoing mail goes to {maildir}")
    try:
        asyncio.run(_try_relay(relay))
    except aiosmtplib.SMTPAuthenticationError as exc:
        return Check(
            "relay",
            False,
            f"{relay.host}:{relay.port} refused the login ({exc.code} {exc.message})",
            "check [outbound.relay] username and password (or password_file)",
        )
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        return Check(
            "relay",
            False,
            f"{relay.host}:{relay.port} with tls={relay.tls}: {exc}",
            "check [outbound.relay] host, port and tls (587: starttls, "
            "465: implicit) and that this machine may connect to it",
        )

    login = f", logged in as {relay.username}" if relay.username else ""
    return Check("relay", True, f"{relay.host}:{relay.port} answers{login}")


async def _try_relay(relay: RelaySettings) -> None:
    """Connect, greet, TLS and log in as the outbox would; send nothing."""
    client = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        use_tls=relay.tls == "implicit",
        start_tls=relay.tls == "starttls",
        timeout=relay.timeout_seconds,
        tls_context=ssl.create_default_context(),
    )
    async with client:
        if relay.username:
            await client.login(relay.username, relay.password.get_secret_value())


class NoCursors(Cursors):
    """Cursors when the database cannot be read: every mailbox looks new."""

    def __init__(self) -> None:
        pass

    def load(self, mailbox: str) -> Position | None:
        return None


def check_imap(mailbox: ImapMailbox, cursors: Cursors) -> Check:
    name = f"imap {mailbox.name}"
    try:
        report = check_mailbox(mailbox, cursors)
    except MailboxError as exc:
        return Check(name, False, exc.problem, exc.fix)

    return Check(
        name,
        True,
        f"{mailbox.username}@{mailbox.host}:{mailbox.effective_port} logged in; "
        f"{report.folder} holds {report.messages}, {report.waiting} waiting",
    )


def check_twilio(account_sid: str, auth_token: Any) -> Check:
    """A read-only call: fetch the account the credentials belong to."""
    # Imported here: twilio's client takes a while to import, and most
    # installations have no Twilio account configured.
    from twilio.base.exceptions import TwilioException  # noqa: PLC0415
    from twilio.rest import Client  # noqa: PLC0415

    token = getattr(auth_token, "get_secret_value", lambda: auth_token)()
    try:
        account = Client(account_sid, token).api.v2010.accounts(account_sid).fetch()
    except (TwilioException, OSError) as exc:
        return Check(
            "twilio",
            False,
            f"account {account_sid}: {exc}",
            "check [twilio] account_sid and auth_token in the Twilio console",
        )

    return Check("twilio", True, f"account {account_sid} is {account.status}")


# -- intake backup ------------------------------------------------------------


def sqlite_path(url: str) -> Path:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        raise OpsError(
            "backup",
            "only a SQLite store is backed up this way; for PostgreSQL use "
            "pg_dump (see the README)",
        )
    return Path(parsed.database)


def backup(url: str, target: Path) -> dict[str, int]:
    """Copy the live SQLite database to ``target`` with SQLite's online
    backup API: a consistent copy while the daemon keeps writing."""
    source = sqlite_path(url)
    if not source.exists():
        raise OpsError("backup", f"no database at {source}; nothing to back up")
    if target.exists():
        raise OpsError("backup", f"{target} exists; give a new file name")

    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    with (
        sqlite3.connect(f"file:{source}?mode=ro", uri=True) as live,
        sqlite3.connect(partial) as copy,
    ):
        live.backup(copy)
        if copy.execute("PRAGMA integrity_check").fetchone() != ("ok",):
            raise OpsError("backup", f"the copy in {partial} failed its check")
        # A backup is one self-contained file, not a WAL pair.
        copy.execute("PRAGMA journal_mode=DELETE")
        counts = _sqlite_counts(copy)
    live.close()
    copy.close()
    partial.rename(target)

    return counts


def _sqlite_counts(connection: sqlite3.Connection) -> dict[str, int]:
    names = [
        row[0]
        for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    return {
        name: int(connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0])  # noqa: S608 (names from sqlite_master)
        for name in names
        if name not in NOT_COPIED
    }


# -- intake migrate-to --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copied:
    table: str
    source: int
    target: int


def migrate_to(
    source_url: str,
    target_url: str,
    progress: Callable[[str, int], None] = lambda table, rows: None,
) -> list[Copied]:
    """Copy every row of ``source_url`` into ``target_url``, migrated first.

    The target must hold no data of its own. The copy runs in one
    transaction on the target, reading one snapshot of the source, so it
    either lands whole or not at all; the counts are then compared table by
    table and a mismatch raises.
    """
    if _same_database(source_url, target_url):
        raise OpsError("migrate-to", "the target is the database in use")

    target = make_engine(target_url)
    source = create_engine(source_url)
    try:
        upgrade(target)
        source_tables = _reflect(source)
        target_tables = _reflect(target)
        missing = sorted(set(source_tables) - set(target_tables))
        if missing:
            raise OpsError(
                "migrate-to",
                f"the target lacks tables {missing}; is the source newer than "
                "this version of Intake?",
            )
        _copy(source, target, source_tables, target_tables, progress)
        result = _compare(source, target, source_tables)
    finally:
        source.dispose()
        target.dispose()

    wrong = [row for row in result if row.source != row.target]
    if wrong:
        details = ", ".join(f"{r.table} {r.source}->{r.target}" for r in wrong)
        raise OpsError("migrate-to", f"counts differ after the copy: {details}")

    return result


def _same_database(first: str, second: str) -> bool:
    a, b = make_url(first), make_url(second)
    if a.get_backend_name() == "sqlite" == b.get_backend_name():
        return Path(a.database or "").resolve() == Path(b.database or "").resolve()

    return (a.host, a.port, a.database) == (b.host, b.port, b.database)


def _reflect(engine: Engine) -> dict[str, Table]:
    metadata = MetaData()
    metadata.reflect(engine)

    return {
        table.name: table
        for table in metadata.sorted_tables
        if table.name not in NOT_COPIED
    }


def _copy(
    source: Engine,
    target: Engine,
    source_tables: dict[str, Table],
    target_tables: dict[str, Table],
    progress: Callable[[str, int], None],
) -> None:
    with target.begin() as writing:
        for name, table in target_tables.items():
            if name in SEEDED:
                continue
            found = writing.scalar(select(func.count()).select_from(table))
            if found:
                raise OpsError(
                    "migrate-to",
                    f"the target already holds {found} rows in {name}; "
                    "give an empty database",
                )
        # Rows the migrations seeded are replaced by the source's.
        for name in SEEDED & set(target_tables):
            writing.execute(target_tables[name].delete())

        with source.connect() as reading:
            if source.dialect.name == "postgresql":
                reading.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            for name, table in source_tables.items():
                into = target_tables[name]
                columns = [c.name for c in table.columns if c.name in into.columns]
                query = select(*(table.c[c] for c in columns)).order_by(
                    *table.primary_key.columns
                )
                rows = reading.execution_options(yield_per=CHUNK).execute(query)
                copied = 0
                for chunk in rows.partitions(CHUNK):
                    writing.execute(
                        into.insert(),
                        [dict(zip(columns, row, strict=True)) for row in chunk],
                    )
                    copied += len(chunk)
                progress(name, copied)

        if target.dialect.name == "postgresql":
            _advance_sequences(writing, target_tables)


def _advance_sequences(connection: Any, tables: dict[str, Table]) -> None:
    """Explicit ids leave PostgreSQL's sequences behind; move each past the
    highest id copied, or the next insert would collide."""
    for name, table in tables.items():
        for column in table.primary_key.columns:
            sequence = connection.scalar(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": name, "column": column.name},
            )
            if sequence is None:
                continue
            highest = connection.scalar(select(func.max(column)))
            connection.execute(
                text("SELECT setval(:sequence, :next, false)"),
                {"sequence": sequence, "next": int(highest or 0) + 1},
            )


def _compare(source: Engine, target: Engine, tables: dict[str, Table]) -> list[Copied]:
    found = []
    with source.connect() as before, target.connect() as after:
        for name, table in tables.items():
            query = select(func.count()).select_from(table)
            found.append(
                Copied(
                    name, int(before.scalar(query) or 0), int(after.scalar(query) or 0)
                )
            )

    return found
