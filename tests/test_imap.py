"""The IMAP channel against a real Dovecot: nothing lost, nothing twice,
flags only after commit, and a daemon that survives SIGKILL and outages."""

from __future__ import annotations

import logging
import random
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import SEEN
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from channels.email import receive
from channels.imap import (
    AdvisoryLock,
    Backoff,
    Cursors,
    MailboxError,
    MailboxPoller,
    NoLock,
    Position,
    check_mailbox,
    lock_key,
    pending,
    plan_batches,
    resume,
    run_here,
)
from intake.clock import FrozenClock
from intake.config import ImapMailbox, load_settings
from intake.daemon import Parts, prepare
from intake.errors import ConfigError, StoreUnavailable
from store import queries
from store.metrics import mailbox_reconciliation
from store.models import Quarantine
from tests.conftest import (
    START,
    DaemonProcess,
    corpus_files,
    crlf,
    free_port,
    make_mail,
    read_rows,
    run_cli,
    write_config,
)
from tests.dovecot import Dovecot, running_dovecot

# -- helpers -----------------------------------------------------------------

WRONG_PASSWORD = "not the password"  # noqa: S105 (wrong on purpose)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot() as server:
        yield server


def mailbox_for(server: Dovecot, **changes: Any) -> ImapMailbox:
    values: dict[str, Any] = {
        "name": "support",
        "host": server.host,
        "port": server.port,
        "tls": "none",
        "username": server.user,
        "password": server.password,
        "poll_seconds": 1.0,
        "timeout_seconds": 10.0,
    }
    values.update(changes)
    return ImapMailbox.model_validate(values)


def poller_for(parts: Parts, mailbox: ImapMailbox, **options: Any) -> MailboxPoller:
    return MailboxPoller(
        mailbox,
        parts.intake,
        cursors=Cursors(parts.intake.session_factory, parts.clock),
        run_in_store=run_here,
        lock=options.pop("lock", NoLock()),
        **options,
    )


def customer_mails(count: int, tag: str = "m") -> list[tuple[str, bytes]]:
    """Distinct customers, each with one message: (Message-ID, bytes)."""
    mails = []
    for n in range(count):
        message_id = f"{tag}-{n}-{uuid.uuid4().hex[:6]}@customer.example"
        raw = make_mail(
            sender=f"Customer {n} <c{n}.{tag}@customer.example>",
            subject=f"Question {tag} {n}",
            message_id=f"<{message_id}>",
        )
        mails.append((message_id, raw))
    return mails


def database(parts_or_config: Parts | Path) -> str:
    """The test's database URL: SQLite, or PostgreSQL in the matrix run."""
    if isinstance(parts_or_config, Parts):
        return parts_or_config.settings.database_url
    return load_settings(parts_or_config, environ={}).database_url


def stored_ids(db: str) -> Counter[str]:
    """Inbound messages by Message-ID, read without taking a write lock."""
    try:
        rows = read_rows(db, "select message_id from messages where direction = 'in'")
    except DBAPIError:
        return Counter()  # the daemon has not created it yet
    return Counter((row[0] or "").strip("<>") for row in rows)


def count_rows(db: str, table: str) -> int:
    return int(read_rows(db, f"select count(*) from {table}")[0][0])  # noqa: S608 (test tables)


def ids_by_uid(server: Dovecot, folder: str) -> dict[int, str]:
    with server.client() as client:
        client.select_folder(folder, readonly=True)
        found = client.fetch(client.search("ALL"), ["ENVELOPE"])
    return {
        uid: data[b"ENVELOPE"].message_id.decode().strip("<>")
        for uid, data in found.items()
    }


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds}s: {what}")


def all_seen(server: Dovecot, folder: str) -> bool:
    return all(SEEN in flags for flags in server.flags(folder).values())


# -- pure parts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "last_uid", "expected"),
    [
        ([], 0, []),
        ([3, 1, 2], 0, [1, 2, 3]),
        ([7], 9, []),  # "UID 10:*" still answers the highest UID, 7
        ([9, 10, 12, 12], 9, [10, 12]),
    ],
)
def test_pending_keeps_only_uids_above_the_cursor(
    found: list[int], last_uid: int, expected: list[int]
) -> None:
    assert pending(found, last_uid) == expected


def test_batches_are_bounded_by_count_and_bytes() -> None:
    uids = list(range(1, 8))
    sizes = {1: 10, 2: 10, 3: 500, 4: 10, 5: 10, 6: 10, 7: 10}

    batches = plan_batches(uids, sizes, max_count=3, max_bytes=100)

    assert batches == [[1, 2], [3], [4, 5, 6], [7]]


def test_a_message_larger_than_a_batch_is_fetched_alone() -> None:
    assert plan_batches([1, 2], {1: 10_000, 2: 1}, max_bytes=100) == [[1], [2]]


def test_first_start_imports_everything_or_starts_at_the_next_message() -> None:
    everything, why = resume(
        None, folder="INBOX", uidvalidity=7, uidnext=41, import_existing=True
    )
    new_only, _ = resume(
        None, folder="INBOX", uidvalidity=7, uidnext=41, import_existing=False
    )

    assert why == "first start"
    assert everything == Position("INBOX", 7, 0, 0, 40)
    assert new_only == Position("INBOX", 7, 40, 40, 40)


def test_changed_uidvalidity_reads_the_folder_from_the_start() -> None:
    stored = Position("INBOX", 7, 30, 30, 10)

    same, why_same = resume(
        stored, folder="INBOX", uidvalidity=7, uidnext=41, import_existing=True
    )
    reset, why_reset = resume(
        stored, folder="INBOX", uidvalidity=8, uidnext=5, import_existing=False
    )

    assert (same, why_same) == (stored, "resumed")
    assert why_reset == "UIDVALIDITY changed"
    assert reset == Position("INBOX", 8, 0, 0, 4)


def test_backoff_grows_to_the_poll_interval_with_jitter() -> None:
    policy = Backoff(base=1.0, cap=60.0)
    rng = random.Random(1)

    delays = [policy.delay(attempt, rng) for attempt in range(1, 12)]

    assert 0.5 <= delays[0] <= 1.0
    assert all(30.0 <= delay <= 60.0 for delay in delays[7:])
    assert len(set(delays[7:])) > 1


def test_lock_key_is_a_stable_signed_64_bit_number_per_mailbox() -> None:
    assert lock_key("support") == lock_key("support")
    assert lock_key("support") != lock_key("sales")
    assert -(2**63) <= lock_key("support") < 2**63


# -- configuration ---------------------------------------------------------------


def write_imap_config(
    directory: Path, mailbox: dict[str, Any], **sections: Any
) -> Path:
    path = write_config(directory, **sections)
    lines = ["[[imap.mailboxes]]"]
    for key, value in mailbox.items():
        shown = repr(value) if not isinstance(value, bool) else str(value).lower()
        if isinstance(value, str):
            shown = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {shown}")
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


REMOTE = {"name": "shop", "host": "mail.example.com", "username": "u"}


def test_clear_text_to_a_remote_host_is_refused_naming_the_setting(
    tmp_path: Path,
) -> None:
    path = write_imap_config(tmp_path, {**REMOTE, "tls": "none", "password": "pw"})

    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})

    assert refused.value.setting == "imap.mailboxes.0.tls"
    assert "loopback" in str(refused.value)
    assert "shop" in str(refused.value)


def test_clear_text_to_loopback_is_allowed(tmp_path: Path) -> None:
    mailbox = {**REMOTE, "host": "127.0.0.1", "tls": "none", "password": "pw"}

    settings = load_settings(write_imap_config(tmp_path, mailbox), environ={})

    assert settings.imap.mailboxes[0].effective_port == 143


def test_move_without_move_to_is_refused(tmp_path: Path) -> None:
    path = write_imap_config(tmp_path, {**REMOTE, "password": "pw", "after": "move"})

    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})

    assert refused.value.setting == "imap.mailboxes.0.move_to"


def test_a_mailbox_needs_exactly_one_way_to_log_in(tmp_path: Path) -> None:
    path = write_imap_config(tmp_path, {**REMOTE})

    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})

    assert "exactly one of password, password_file" in str(refused.value)


def test_repeated_mailbox_names_are_refused_without_showing_passwords(
    tmp_path: Path,
) -> None:
    path = write_imap_config(tmp_path, {**REMOTE, "password": "hunter2"})
    text = path.read_text()
    mailbox_table = text[text.index("[[imap.mailboxes]]") :]
    path.write_text(text + mailbox_table)

    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})

    assert refused.value.setting == "imap.mailboxes"
    assert "hunter2" not in str(refused.value)


# -- the poller against Dovecot ----------------------------------------------------


def test_appended_messages_become_tickets_flagged_only_after_commit(
    parts: Parts, dovecot: Dovecot
) -> None:
    mails = customer_mails(200)
    dovecot.append("INBOX", [raw for _, raw in mails])
    by_uid = ids_by_uid(dovecot, "INBOX")
    db = database(parts)
    early: list[str] = []
    done = threading.Event()

    def watch() -> None:
        # Flags first, the database second: a flag seen before its message
        # is committed would show up here as missing.
        with dovecot.client() as client:
            client.select_folder("INBOX", readonly=True)
            while not done.is_set():
                flags = client.get_flags(list(by_uid))
                seen = {by_uid[uid] for uid, got in flags.items() if SEEN in got}
                early.extend(seen - set(stored_ids(db)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        poller_for(parts, mailbox_for(dovecot)).poll_once()
    finally:
        done.set()
        watcher.join()

    assert early == []
    assert all_seen(dovecot, "INBOX")
    assert set(stored_ids(db)) == {message_id for message_id, _ in mails}
    assert count_rows(db, "tickets") == 200


def test_message_marked_seen_by_someone_else_is_still_imported(
    parts: Parts, dovecot: Dovecot
) -> None:
    mails = customer_mails(3)
    dovecot.append("INBOX", [raw for _, raw in mails])
    with dovecot.client() as client:
        client.select_folder("INBOX")
        client.add_flags([2], [SEEN])

    poller_for(parts, mailbox_for(dovecot)).poll_once()

    assert set(stored_ids(database(parts))) == {message_id for message_id, _ in mails}


def test_second_pass_imports_only_new_mail(parts: Parts, dovecot: Dovecot) -> None:
    first, second = customer_mails(3, "a"), customer_mails(2, "b")
    poller = poller_for(parts, mailbox_for(dovecot))
    dovecot.append("INBOX", [raw for _, raw in first])
    poller.poll_once()

    dovecot.append("INBOX", [raw for _, raw in second])
    poller.poll_once()

    stored = stored_ids(database(parts))
    assert set(stored) == {message_id for message_id, _ in first + second}
    assert max(stored.values()) == 1


def test_import_existing_false_starts_at_the_next_new_message(
    parts: Parts, dovecot: Dovecot
) -> None:
    old, new = customer_mails(4, "old"), customer_mails(1, "new")
    dovecot.append("INBOX", [raw for _, raw in old])
    poller = poller_for(parts, mailbox_for(dovecot, import_existing=False))
    poller.poll_once()

    dovecot.append("INBOX", [raw for _, raw in new])
    poller.poll_once()

    assert set(stored_ids(database(parts))) == {new[0][0]}


def test_changed_uidvalidity_imports_no_duplicates(
    parts: Parts, dovecot: Dovecot
) -> None:
    mails, extra = customer_mails(5), customer_mails(1, "late")
    mailbox = mailbox_for(dovecot, folder="Support")
    cursors = Cursors(parts.intake.session_factory, parts.clock)
    poller = poller_for(parts, mailbox)
    dovecot.append("Support", [raw for _, raw in mails])
    poller.poll_once()
    before = cursors.load("support")

    with dovecot.client() as client:
        client.delete_folder("Support")
        client.create_folder("Support")
    dovecot.append("Support", [raw for _, raw in mails + extra])
    poller.poll_once()

    after = cursors.load("support")
    stored = stored_ids(database(parts))
    assert before is not None
    assert after is not None
    assert after.uidvalidity != before.uidvalidity
    assert set(stored) == {message_id for message_id, _ in mails + extra}
    assert max(stored.values()) == 1
    assert all_seen(dovecot, "Support")


def test_a_message_that_cannot_be_parsed_is_quarantined_and_the_batch_goes_on(
    parts: Parts, dovecot: Dovecot
) -> None:
    good = customer_mails(2)
    garbage = b"this is not an email at all\r\n\r\njust words\r\n"
    dovecot.append("INBOX", [good[0][1], garbage, good[1][1]])

    poller_for(parts, mailbox_for(dovecot)).poll_once()

    db = database(parts)
    assert set(stored_ids(db)) == {message_id for message_id, _ in good}
    assert count_rows(db, "quarantine") == 1
    assert all_seen(dovecot, "INBOX")


@pytest.mark.sqlite_only  # holds SQLite's write lock to make the store fail
def test_store_failure_stops_the_batch_and_leaves_the_rest_unflagged(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    config = write_config(
        tmp_path, smtp={"domains": ["example.com"]}, store={"busy_timeout_ms": 100}
    )
    parts = prepare(load_settings(config, environ={}), FrozenClock(START))
    db = database(parts)
    db_file = parts.settings.state_dir / "intake.db"
    blocker = sqlite3.connect(db_file, isolation_level=None)
    accepted: list[object] = []

    def block_after_two(outcome: object) -> None:
        accepted.append(outcome)
        if len(accepted) == 2:
            blocker.execute("BEGIN EXCLUSIVE")

    mailbox = mailbox_for(dovecot, import_existing=False)
    # One message per transaction, so the store can fail between two.
    poller = poller_for(parts, mailbox, on_accepted=block_after_two, commit_every=1)
    poller.poll_once()  # an empty folder: the cursor starts here
    mails = customer_mails(5)
    dovecot.append("INBOX", [raw for _, raw in mails])

    with pytest.raises(StoreUnavailable):
        poller.poll_once()
    flags = dovecot.flags("INBOX")
    blocker.execute("ROLLBACK")
    poller.poll_once()

    assert [SEEN in flags[uid] for uid in sorted(flags)] == [True] * 2 + [False] * 3
    stored = stored_ids(db)
    assert set(stored) == {message_id for message_id, _ in mails}
    assert max(stored.values()) == 1
    assert all_seen(dovecot, "INBOX")
    parts.engine.dispose()


def test_after_move_files_committed_messages_into_move_to(
    parts: Parts, dovecot: Dovecot
) -> None:
    mails = customer_mails(3)
    dovecot.append("INBOX", [raw for _, raw in mails])
    with dovecot.client() as client:
        client.create_folder("Done")

    poller_for(parts, mailbox_for(dovecot, after="move", move_to="Done")).poll_once()

    assert dovecot.flags("INBOX") == {}
    assert len(dovecot.flags("Done")) == 3
    assert set(stored_ids(database(parts))) == {message_id for message_id, _ in mails}


def test_without_move_a_move_is_copy_delete_and_uid_expunge(parts: Parts) -> None:
    # Dovecot answers CAPABILITY with exactly this list: no MOVE, no IDLE.
    with running_dovecot("imap_capability = IMAP4rev1 UIDPLUS\n") as server:
        mails = customer_mails(3)
        server.append("INBOX", [raw for _, raw in mails])
        server.append("Done", [])

        poller_for(parts, mailbox_for(server, after="move", move_to="Done")).poll_once()

        assert server.flags("INBOX") == {}
        assert len(server.flags("Done")) == 3


def test_a_missing_move_to_folder_is_reported_with_the_fix(
    parts: Parts, dovecot: Dovecot
) -> None:
    mailbox = mailbox_for(dovecot, after="move", move_to="Nowhere")

    with pytest.raises(MailboxError) as refused:
        poller_for(parts, mailbox).poll_once()

    assert "move_to folder 'Nowhere' does not exist" in str(refused.value)


def test_password_file_and_oauth2_token_command_log_in(
    parts: Parts, dovecot: Dovecot, tmp_path: Path
) -> None:
    secret = tmp_path / "imap-password"
    secret.write_text(dovecot.password + "\n")
    command = f"{sys.executable} -c \"print('{dovecot.password}')\""
    by_file = mailbox_for(dovecot, password=None, password_file=str(secret))
    by_token = mailbox_for(dovecot, password=None, oauth2_token_command=command)
    cursors = Cursors(parts.intake.session_factory, parts.clock)

    reports = [check_mailbox(mailbox, cursors) for mailbox in (by_file, by_token)]

    assert [report.folder for report in reports] == ["INBOX", "INBOX"]


def test_a_failing_token_command_says_what_to_fix(
    parts: Parts, dovecot: Dovecot
) -> None:
    command = f"{sys.executable} -c \"import sys; sys.exit('token expired')\""
    mailbox = mailbox_for(dovecot, password=None, oauth2_token_command=command)
    cursors = Cursors(parts.intake.session_factory, parts.clock)

    with pytest.raises(MailboxError) as refused:
        check_mailbox(mailbox, cursors)

    assert "oauth2_token_command failed (exit 1: token expired)" in str(refused.value)


def test_secrets_never_reach_the_log(
    parts: Parts, dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    command = f"{sys.executable} -c \"print('{dovecot.password}')\""
    dovecot.append("INBOX", [raw for _, raw in customer_mails(1)])

    poller_for(parts, mailbox_for(dovecot)).poll_once()
    poller_for(
        parts, mailbox_for(dovecot, password=None, oauth2_token_command=command)
    ).poll_once()

    assert "imap:" in caplog.text
    assert dovecot.password not in caplog.text


def test_wrong_password_is_reported_as_login_refused(
    parts: Parts, dovecot: Dovecot
) -> None:
    cursors = Cursors(parts.intake.session_factory, parts.clock)

    with pytest.raises(MailboxError) as refused:
        check_mailbox(mailbox_for(dovecot, password=WRONG_PASSWORD), cursors)

    assert str(refused.value).startswith(
        "mailbox support: login refused: check username and password"
    )


def test_refused_connection_names_host_port_and_tls(parts: Parts) -> None:
    port = free_port()
    mailbox = ImapMailbox(
        name="support",
        host="127.0.0.1",
        port=port,
        tls="none",
        username="u",
        password=WRONG_PASSWORD,
        timeout_seconds=5,
    )
    cursors = Cursors(parts.intake.session_factory, parts.clock)

    with pytest.raises(MailboxError) as refused:
        check_mailbox(mailbox, cursors)

    assert str(refused.value) == (
        f"mailbox support: connection refused by 127.0.0.1:{port}: "
        "check host, port and tls"
    )


def test_reconciliation_counts_mail_on_the_server_and_mail_imported(
    parts: Parts, dovecot: Dovecot
) -> None:
    dovecot.append("INBOX", [raw for _, raw in customer_mails(7)])

    poller_for(parts, mailbox_for(dovecot)).poll_once()

    with parts.engine.connect() as connection:
        rows = mailbox_reconciliation(connection, START.date())
    assert [
        (r["mailbox"], r["arrived"], r["imported"], r["waiting"]) for r in rows
    ] == [("support", 7, 7, 0)]


def test_stop_ends_an_idle_without_waiting_for_the_poll_interval(
    parts: Parts, dovecot: Dovecot
) -> None:
    poller = poller_for(parts, mailbox_for(dovecot, poll_seconds=600))
    thread = threading.Thread(target=poller.run)
    thread.start()
    wait_for(lambda: poller.idling, 10, "the poller to IDLE")

    poller.stop()
    thread.join(10)

    assert not thread.is_alive()


def test_without_idle_the_poller_polls_every_interval(parts: Parts) -> None:
    mails = customer_mails(2)
    with running_dovecot("imap_capability = IMAP4rev1 UIDPLUS MOVE\n") as server:
        poller = poller_for(parts, mailbox_for(server, poll_seconds=0.2))
        thread = threading.Thread(target=poller.run)
        thread.start()
        try:
            server.append("INBOX", [mails[0][1]])
            wait_for(lambda: len(stored_ids(database(parts))) == 1, 10, "one")
            server.append("INBOX", [mails[1][1]])
            wait_for(lambda: len(stored_ids(database(parts))) == 2, 10, "two")
        finally:
            poller.stop()
            thread.join(10)

        assert not poller.idling
        assert all_seen(server, "INBOX")


@pytest.mark.corpus
def test_corpus_through_imap_ends_as_it_does_over_smtp(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    # A server cannot hold an empty message, so those files stay out.
    files = [crlf(path.read_bytes()) for path in corpus_files()]
    files = [raw for raw in files if raw.strip()]
    over_smtp = store_in(tmp_path / "smtp")
    over_imap = store_in(tmp_path / "imap")
    for raw in files:
        receive(
            over_smtp.intake,
            raw,
            source="smtp",
            envelope_sender="corpus@customer.example",
            envelope_recipients=["support@example.com"],
        )
    dovecot.append("Corpus", files)

    poller_for(over_imap, mailbox_for(dovecot, folder="Corpus")).poll_once()

    smtp, imap = stats_of(over_smtp), stats_of(over_imap)
    # Only SMTP has an envelope sender to fall back on when From is missing.
    no_sender = [
        reason
        for reason in held_reasons(over_imap)
        if reason.startswith("no sender address")
    ]
    assert imap["quarantined"] == smtp["quarantined"] + len(no_sender)
    assert imap["received"] == smtp["received"] - len(no_sender)
    assert imap["machine"] == smtp["machine"]
    assert imap["duplicates"] == smtp["duplicates"]
    assert all_seen(dovecot, "Corpus")
    over_smtp.engine.dispose()
    over_imap.engine.dispose()


def store_in(directory: Path) -> Parts:
    directory.mkdir()
    config = write_config(directory, smtp={"domains": ["example.com"]})
    return prepare(load_settings(config, environ={}), FrozenClock(START))


def stats_of(parts: Parts) -> dict[str, int]:
    with parts.intake.session_factory() as session:
        return queries.stats(session)


def held_reasons(parts: Parts) -> list[str]:
    with parts.intake.session_factory() as session:
        return list(session.scalars(select(Quarantine.reason)))


# -- several daemons on one PostgreSQL ---------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    admin = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        isolation_level="AUTOCOMMIT",
    )
    try:
        connection = admin.connect()
    except OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = f"intake_imap_{uuid.uuid4().hex[:8]}"
    connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    connection.close()
    admin.dispose()


def test_a_mailbox_is_polled_by_one_daemon_at_a_time_on_postgresql(
    tmp_path: Path, dovecot: Dovecot, postgres_url: str
) -> None:
    config = write_config(
        tmp_path, smtp={"domains": ["example.com"]}, store={"url": postgres_url}
    )
    first = prepare(load_settings(config, environ={}), FrozenClock(START))
    second = prepare(load_settings(config, environ={}), FrozenClock(START))
    mailbox = mailbox_for(dovecot)
    dovecot.append("INBOX", [raw for _, raw in customer_mails(3)])
    held = AdvisoryLock(first.engine, "support")
    other = poller_for(second, mailbox, lock=AdvisoryLock(second.engine, "support"))

    assert held.acquire()
    turned_away = other.poll_once()
    held.release()
    served = other.poll_once()

    assert (turned_away, served) == (False, True)
    with second.engine.connect() as connection:
        stored = connection.scalar(text("select count(*) from messages"))
    assert stored == 3
    first.engine.dispose()
    second.engine.dispose()


# -- the daemon ---------------------------------------------------------------------


Daemons = Callable[..., DaemonProcess]


@pytest.fixture
def daemons(tmp_path: Path, dovecot: Dovecot) -> Iterator[Daemons]:
    """Builds daemons (not started) reading ``dovecot``; stops them after."""
    made: list[DaemonProcess] = []

    def build(**changes: Any) -> DaemonProcess:
        port = free_port()
        mailbox = {
            "name": "support",
            "host": dovecot.host,
            "port": dovecot.port,
            "tls": "none",
            "username": dovecot.user,
            "password": dovecot.password,
            "poll_seconds": 1.0,
            "timeout_seconds": 10.0,
            **changes,
        }
        config = write_imap_config(
            tmp_path,
            mailbox,
            smtp={"listen": f"127.0.0.1:{port}", "domains": ["example.com"]},
            outbound={"poll_seconds": 0.2},
        )
        made.append(DaemonProcess(config, port, tmp_path / "daemon.log"))
        return made[-1]

    yield build
    for daemon in made:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)


@pytest.mark.slow
def test_daemon_killed_mid_batch_stores_every_message_once_after_restart(
    dovecot: Dovecot, daemons: Daemons
) -> None:
    mails = customer_mails(500)
    dovecot.append("INBOX", [raw for _, raw in mails])
    daemon = daemons()
    db = database(daemon.config)

    daemon.start()
    wait_for(lambda: sum(stored_ids(db).values()) >= 75, 60, "75 messages stored")
    daemon.stop(signal.SIGKILL)
    at_kill = sum(stored_ids(db).values())
    daemon.start()
    wait_for(lambda: len(stored_ids(db)) == 500, 120, "all 500 stored")
    wait_for(lambda: all_seen(dovecot, "INBOX"), 30, "all 500 flagged")
    daemon.stop()

    assert at_kill < 500, "the daemon finished before the kill"
    stored = stored_ids(db)
    assert set(stored) == {message_id for message_id, _ in mails}
    assert max(stored.values()) == 1


@pytest.mark.slow
def test_daemon_imports_mail_that_arrives_after_dovecot_restarts(
    dovecot: Dovecot, daemons: Daemons
) -> None:
    before, after = customer_mails(1, "before"), customer_mails(1, "after")
    daemon = daemons()
    db = database(daemon.config)
    daemon.start()
    dovecot.append("INBOX", [before[0][1]])
    wait_for(lambda: len(stored_ids(db)) == 1, 20, "the first message stored")

    dovecot.stop()
    wait_for(lambda: "not working" in daemon.log(), 20, "the outage noticed")
    time.sleep(3)  # several reconnect attempts fail while the server is down
    dovecot.start()
    dovecot.append("INBOX", [after[0][1]])
    wait_for(lambda: len(stored_ids(db)) == 2, 15, "the message after the restart")
    daemon.stop()

    log = daemon.log()
    assert log.count("not working") == 1
    assert log.count("working again") == 1


@pytest.mark.slow
def test_daemon_imports_a_message_appended_while_idling(
    dovecot: Dovecot, daemons: Daemons
) -> None:
    first, second = customer_mails(1, "first"), customer_mails(1, "second")
    # Polling alone would take a minute; only IDLE brings it in sooner.
    daemon = daemons(poll_seconds=60.0)
    db = database(daemon.config)
    dovecot.append("INBOX", [first[0][1]])
    daemon.start()
    wait_for(lambda: len(stored_ids(db)) == 1, 20, "the first message stored")

    dovecot.append("INBOX", [second[0][1]])
    wait_for(lambda: len(stored_ids(db)) == 2, 5, "the message sent while idling")
    code = daemon.stop()

    assert code == 0


# -- intake mailboxes check ----------------------------------------------------------


def test_mailboxes_check_prints_the_figures_and_exits_zero(
    dovecot: Dovecot, daemons: Daemons
) -> None:
    dovecot.append("INBOX", [raw for _, raw in customer_mails(4)])
    daemon = daemons()

    result = run_cli(daemon.config, "mailboxes", "check")

    assert "mailbox support: logged in" in result.stdout
    assert "folder: INBOX (4 messages)" in result.stdout
    assert "waiting (above the cursor): 4" in result.stdout
    assert "last imported UID: -" in result.stdout
    assert "UIDVALIDITY: " in result.stdout


def test_mailboxes_check_after_an_import_shows_the_cursor(
    dovecot: Dovecot, daemons: Daemons
) -> None:
    dovecot.append("INBOX", [raw for _, raw in customer_mails(4)])
    daemon = daemons()
    parts = prepare(load_settings(daemon.config, environ={}))
    poller_for(parts, parts.settings.imap.mailboxes[0]).poll_once()
    parts.engine.dispose()
    dovecot.append("INBOX", [raw for _, raw in customer_mails(1, "new")])

    result = run_cli(daemon.config, "mailboxes", "check")

    assert "waiting (above the cursor): 1" in result.stdout
    assert "last imported UID: 4" in result.stdout


def test_mailboxes_check_with_a_wrong_password_exits_non_zero_with_the_fix(
    daemons: Daemons,
) -> None:
    daemon = daemons(password=WRONG_PASSWORD)

    result = run_cli(daemon.config, "mailboxes", "check", check=False)

    assert result.returncode != 0
    assert "mailbox support: login refused: check username and password" in (
        " ".join(result.stderr.split())
    )
