"""Operations: ``intake check``, ``intake backup`` and its restore, and
``intake migrate-to`` from one database to a new one."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, func, select, text

from channels.email import receive
from intake.clock import FrozenClock
from intake.config import load_settings
from intake.daemon import Parts, prepare
from store.models import Base
from tests.conftest import (
    START,
    DaemonProcess,
    database_url,
    free_port,
    make_mail,
    run_cli,
    write_config,
)


class Relay:
    """A relay that accepts everything; for ``check`` only greets matter."""

    async def handle_DATA(
        self, server: object, session: object, envelope: object
    ) -> str:
        return "250 OK"


@pytest.fixture
def relay_port() -> Iterator[int]:
    port = free_port()
    controller = Controller(Relay(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port
    controller.stop()


# -- intake check ---------------------------------------------------------------


def test_check_passes_every_line_on_working_settings(
    tmp_path: Path, relay_port: int
) -> None:
    config = write_config(
        tmp_path,
        smtp={"domains": ["example.com"]},
        **{"outbound.relay": {"host": "127.0.0.1", "port": relay_port, "tls": "none"}},
    )

    result = run_cli(config, "check")

    lines = result.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines), result.stdout
    names = {line.split(":")[0].removeprefix("ok").strip() for line in lines}
    assert {"settings", "database", "relay"} <= names
    assert any(name.startswith("resolve") for name in names)


def test_check_names_each_failure_with_its_fix_and_exits_non_zero(
    tmp_path: Path,
) -> None:
    closed = free_port()
    config = write_config(
        tmp_path,
        smtp={"domains": ["example.com"]},
        store={"url": f"postgresql+psycopg://intake@127.0.0.1:{closed}/intake"},
        **{"outbound.relay": {"host": "no-such-relay.invalid", "port": 587}},
    )
    with config.open("a") as settings:
        settings.write(
            '[[imap.mailboxes]]\nname = "support"\nhost = "127.0.0.1"\n'
            f'port = {closed}\ntls = "none"\nusername = "u"\npassword = "p"\n'
        )

    result = run_cli(config, "check", check=False)

    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    joined = "\n".join(failures)
    assert "FAIL resolve no-such-relay.invalid" in joined
    assert "FAIL database" in joined
    assert "FAIL relay" in joined
    assert "FAIL imap support" in joined
    assert all("-> fix:" in line for line in failures)
    assert f"{len(failures)} check(s) failed" in result.stderr


def test_check_stops_at_a_bad_setting_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "intake.toml"
    config.write_text("[http]\nlisten = 'everywhere'\n")

    result = run_cli(config, "check", check=False)

    assert result.returncode != 0
    assert "http.listen" in result.stderr


# -- intake backup ----------------------------------------------------------------


def deliver(parts: Parts, count: int, tag: str) -> None:
    for n in range(count):
        receive(
            parts.intake,
            make_mail(
                sender=f"Customer {n} <c{n}.{tag}@customer.example>",
                subject=f"{tag} {n}",
                message_id=f"<{tag}-{n}@customer.example>",
            ),
            source="test",
        )


@pytest.mark.slow
@pytest.mark.sqlite_only
def test_backup_of_a_running_daemon_restores_every_ticket(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    parts = prepare(load_settings(daemon.config, environ={}), FrozenClock(START))
    deliver(parts, 5, "before")
    parts.engine.dispose()
    copy = tmp_path / "backup.db"

    result = daemon.cli("backup", str(copy))
    deliver_after = prepare(load_settings(daemon.config, environ={}))
    deliver(deliver_after, 2, "after")
    deliver_after.engine.dispose()
    daemon.stop()

    # Restore as the README says: stop, put the copy in place, start.
    database = tmp_path / "state" / "intake.db"
    for leftover in database.parent.glob("intake.db-*"):
        leftover.unlink()
    shutil.copy(copy, database)
    daemon.start()
    listing = json.loads(daemon.cli("tickets", "list", "--json").stdout)

    assert "tickets: 5" in result.stdout
    assert sorted(t["subject"] for t in listing) == [f"before {n}" for n in range(5)]
    with sqlite3.connect(copy) as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert check.execute("PRAGMA journal_mode").fetchone() == ("delete",)


@pytest.mark.sqlite_only
def test_backup_refuses_to_overwrite_a_file(parts: Parts, tmp_path: Path) -> None:
    config = tmp_path / "intake.toml"
    (tmp_path / "existing.db").write_text("keep me")

    result = run_cli(config, "backup", str(tmp_path / "existing.db"), check=False)

    assert result.returncode != 0
    assert "exists" in result.stderr
    assert (tmp_path / "existing.db").read_text() == "keep me"


def test_backup_of_postgresql_points_to_pg_dump(
    tmp_path: Path, postgres_url: str
) -> None:
    config = write_config(tmp_path, store={"url": postgres_url})

    result = run_cli(config, "backup", str(tmp_path / "copy.db"), check=False)

    assert result.returncode != 0
    assert "pg_dump" in result.stderr


# -- intake migrate-to --------------------------------------------------------------


def row_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table.name: int(
                    connection.scalar(select(func.count()).select_from(table)) or 0
                )
                for table in Base.metadata.sorted_tables
            }
    finally:
        engine.dispose()


@pytest.mark.slow
def test_migrate_to_copies_every_row_and_the_new_database_carries_on(
    parts: Parts, tmp_path: Path, postgres_url: str
) -> None:
    deliver(parts, 4, "old")
    receive(parts.intake, b"not mail at all", source="test")  # quarantined
    parts.engine.dispose()
    config = tmp_path / "intake.toml"
    source_url = database_url(config)

    result = run_cli(config, "migrate-to", postgres_url)

    counts = row_counts(source_url)
    assert row_counts(postgres_url) == counts
    assert counts["tickets"] == 4
    assert counts["quarantine"] == 1
    assert "counts match" in result.stdout
    assert "tickets" in result.stdout
    # The new database takes over: numbering and ids continue after the copy.
    (tmp_path / "moved").mkdir()
    moved = write_config(tmp_path / "moved", store={"url": postgres_url})
    after = prepare(load_settings(moved, environ={}), FrozenClock(START))
    outcome = receive(
        after.intake, make_mail(message_id="<new@customer.example>"), source="test"
    )
    after.engine.dispose()
    assert outcome.status == "created"
    assert outcome.ticket_number == 5


@pytest.mark.slow
def test_migrate_to_refuses_a_database_that_holds_data(
    parts: Parts, tmp_path: Path, postgres_url: str
) -> None:
    deliver(parts, 2, "old")
    parts.engine.dispose()
    config = tmp_path / "intake.toml"
    run_cli(config, "migrate-to", postgres_url)

    again = run_cli(config, "migrate-to", postgres_url, check=False)

    assert again.returncode != 0
    assert "already holds" in again.stderr
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.scalar(text("select count(*) from tickets")) == 2
    engine.dispose()
