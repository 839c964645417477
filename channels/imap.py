"""The IMAP channel: one poller per configured mailbox, each in its own thread.

imapclient blocks and is not thread-safe, so every mailbox gets a thread and
an IMAPClient of its own; the messages go to the store through the daemon's
store runner, like SMTP's. The cursor is the folder's UIDVALIDITY plus the
last imported UID, kept in the database: never the ``\\Seen`` flag, which a
person reading the mailbox in another program sets too.

For each message: fetch with ``BODY.PEEK[]`` (which leaves ``\\Seen`` alone),
commit through ``receive()``, and only then flag it ``\\Seen`` or move it. A
crash in between fetches the message again; its source key makes that a
no-op. A changed UIDVALIDITY voids every stored UID (RFC 3501 2.3.1.1): the
folder is read again from the start and the content hash drops duplicates.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import logging
import random
import shlex
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol, TypeVar

from imapclient import DELETED, SEEN, IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from channels.email import RawEmail, receive_many
from intake.accept import Intake, Outcome
from intake.clock import Clock
from intake.config import ImapMailbox
from intake.errors import IntakeError, StoreUnavailable
from intake.runner import StoreRunner
from store.engine import SessionFactory, is_sqlite
from store.models import MailboxCursor, MailboxTally

log = logging.getLogger(__name__)

# imapclient logs every protocol line at debug level, message bodies and the
# XOAUTH2 exchange included; Intake's debug log must hold neither.
logging.getLogger("imapclient.imaplib").setLevel(logging.INFO)

T = TypeVar("T")

FETCH_BODY = "BODY.PEEK[]"  # PEEK: fetching must not set \Seen (RFC 3501 6.4.5)
BODY = b"BODY[]"
# Messages per transaction: one disk flush for a group; a crash or a store
# failure leaves at most one group to fetch again, unflagged.
COMMIT_EVERY = 25
SIZE = b"RFC822.SIZE"
BATCH_COUNT = 50
BATCH_BYTES = 16 * 1024 * 1024
SIZES_AT_ONCE = 500
# RFC 2177 lets a server drop an IDLE after 29 minutes; renew well inside.
IDLE_RENEW_SECONDS = 600.0


class MailboxError(IntakeError):
    """A mailbox cannot be read; ``fix`` tells a person what to change."""

    def __init__(self, mailbox: str, problem: str, fix: str) -> None:
        self.mailbox = mailbox
        self.problem = problem
        self.fix = fix
        super().__init__(f"mailbox {mailbox}: {problem}: {fix}")


class StoreCall(Protocol):
    """Runs store work where the store wants it; returns its result."""

    def __call__(self, work: Callable[[], T]) -> T: ...


def run_here(work: Callable[[], T]) -> T:
    """A ``StoreCall`` for the CLI and tests: the work runs in this thread."""
    return work()


# -- pure parts: cursor arithmetic, batching, backoff ----------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Where reading a folder stands; UIDs mean nothing without UIDVALIDITY."""

    folder: str
    uidvalidity: int
    last_uid: int  # every UID up to this one is committed
    seen_uid: int  # every UID up to this one is counted in a tally
    backlog_uid: int  # UIDs up to this one are old mail: no acknowledgement


def resume(
    stored: Position | None,
    *,
    folder: str,
    uidvalidity: int,
    uidnext: int,
    import_existing: bool,
) -> tuple[Position, str]:
    """The position to read from after SELECT, and why, for the log."""
    newest = uidnext - 1
    if stored is None:
        start = 0 if import_existing else newest
        return Position(folder, uidvalidity, start, start, newest), "first start"

    if stored.folder != folder or stored.uidvalidity != uidvalidity:
        # Every stored UID is void; read all again. What is in the folder
        # now was there before, so it gets no acknowledgement.
        return Position(folder, uidvalidity, 0, 0, newest), "UIDVALIDITY changed"

    return stored, "resumed"


def pending(found: Iterable[int], last_uid: int) -> list[int]:
    """UIDs above the cursor, ascending.

    ``UID n:*`` always matches the highest UID in the folder, even when it
    is below n (RFC 3501 6.4.8), so the filter here is not optional.
    """
    return sorted(uid for uid in set(found) if uid > last_uid)


def plan_batches(
    uids: Sequence[int],
    sizes: Mapping[int, int],
    *,
    max_count: int = BATCH_COUNT,
    max_bytes: int = BATCH_BYTES,
) -> list[list[int]]:
    """Split ascending UIDs into fetches of bounded count and bytes.

    A message larger than ``max_bytes`` is fetched alone. A UID without a
    size (expunged meanwhile) stays in; the fetch will simply not return it.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    weight = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        full = len(current) >= max_count or weight + size > max_bytes
        if current and full:
            batches.append(current)
            current, weight = [], 0
        current.append(uid)
        weight += size
    if current:
        batches.append(current)

    return batches


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter, capped (at the poll interval, so mail
    that arrives after a server comes back waits no longer than a poll)."""

    base: float
    cap: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt - 1, 30))
        return ceiling * (0.5 + rng.random() / 2)


def lock_key(mailbox: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, stable per name."""
    digest = hashlib.sha256(f"intake.imap:{mailbox}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def header_message_id(raw: bytes) -> str | None:
    """The Message-ID for log lines; the parser proper runs in ``receive``."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    try:
        value = parser.parsebytes(raw).get("Message-ID")
    except Exception:  # noqa: BLE001 (only a log line depends on it)
        return None
    return str(value).strip() if value else None


# -- the store: cursors and tallies ----------------------------------------


class Cursors:
    """Reads and moves mailbox cursors; one short transaction per call."""

    def __init__(self, session_factory: SessionFactory, clock: Clock) -> None:
        self.session_factory = session_factory
        self.clock = clock

    def load(self, mailbox: str) -> Position | None:
        with self._transaction() as session:
            row = self._row(session, mailbox)
            if row is None:
                return None
            return Position(
                row.folder,
                row.uidvalidity,
                row.last_uid,
                row.seen_uid,
                row.backlog_uid,
            )

    def save(self, mailbox: str, position: Position) -> None:
        """Store a position from ``resume`` (new, reset or unchanged)."""
        with self._transaction() as session:
            row = self._row(session, mailbox)
            if row is None:
                row = MailboxCursor(mailbox=mailbox, last_error="")
                session.add(row)
            row.folder = position.folder
            row.uidvalidity = position.uidvalidity
            row.last_uid = position.last_uid
            row.seen_uid = position.seen_uid
            row.backlog_uid = position.backlog_uid

    def checked(
        self, mailbox: str, position: Position, uids: Sequence[int]
    ) -> Position:
        """Count the UIDs found above the cursor into today's tally."""
        new = [uid for uid in uids if uid > position.seen_uid]
        seen_uid = max([position.seen_uid, *new])
        now = self.clock.now()
        with self._transaction() as session:
            row = self._row(session, mailbox)
            assert row is not None, "save() runs before checked()"
            row.seen_uid = seen_uid
            row.last_poll_at = now
            tally = self._tally(session, mailbox, now)
            tally.on_server += len(new)
            tally.waiting = len(uids)
            tally.checked_at = now

        return replace(position, seen_uid=seen_uid)

    def advanced(
        self, mailbox: str, position: Position, last_uid: int, imported: int
    ) -> Position:
        """Move the cursor past committed messages and count them."""
        now = self.clock.now()
        with self._transaction() as session:
            row = self._row(session, mailbox)
            assert row is not None, "save() runs before advanced()"
            row.last_uid = last_uid
            row.last_ok_at = now
            row.last_error = ""
            tally = self._tally(session, mailbox, now)
            tally.imported += imported
            tally.waiting = max(0, tally.waiting - imported)
            tally.checked_at = now

        return replace(position, last_uid=last_uid)

    def failed(self, mailbox: str, error: str) -> None:
        with self._transaction() as session:
            row = self._row(session, mailbox)
            if row is not None:
                row.last_error = error[:2000]

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        try:
            with self.session_factory.begin() as session:
                yield session
        except DBAPIError as exc:
            raise StoreUnavailable(str(exc.orig or exc)) from exc

    def _row(self, session: Session, mailbox: str) -> MailboxCursor | None:
        return session.scalar(
            select(MailboxCursor).where(MailboxCursor.mailbox == mailbox)
        )

    def _tally(self, session: Session, mailbox: str, now: datetime) -> MailboxTally:
        day = now.date().isoformat()
        tally = session.scalar(
            select(MailboxTally).where(
                MailboxTally.mailbox == mailbox, MailboxTally.day == day
            )
        )
        if tally is None:
            tally = MailboxTally(
                mailbox=mailbox,
                day=day,
                on_server=0,
                imported=0,
                waiting=0,
                checked_at=now,
            )
            session.add(tally)

        return tally


# -- one daemon per mailbox on PostgreSQL ----------------------------------


class MailboxLock(Protocol):
    def acquire(self) -> bool: ...
    def check(self) -> None: ...
    def release(self) -> None: ...


class NoLock:
    """SQLite: one daemon per database file, so nothing to coordinate."""

    def acquire(self) -> bool:
        return True

    def check(self) -> None:
        return None

    def release(self) -> None:
        return None


class AdvisoryLock:
    """A PostgreSQL session lock, held on its own connection while polling.

    If that connection dies the lock is gone, so ``check`` runs before every
    pass and a failure ends the IMAP session too.
    """

    def __init__(self, engine: Engine, mailbox: str) -> None:
        self.engine = engine
        self.key = lock_key(mailbox)
        self._connection: Connection | None = None

    def acquire(self) -> bool:
        connection = self.engine.connect()
        try:
            taken = connection.scalar(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
            )
            connection.commit()
        except SQLAlchemyError:
            connection.invalidate()
            connection.close()
            raise
        if not taken:
            connection.close()
            return False
        self._connection = connection

        return True

    def check(self) -> None:
        assert self._connection is not None
        self._connection.execute(text("SELECT 1"))
        self._connection.commit()

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}
            )
            connection.commit()
        except SQLAlchemyError:
            # A connection back in the pool must not keep the lock.
            connection.invalidate()
        connection.close()


def lock_for(engine: Engine, mailbox: str) -> MailboxLock:
    return NoLock() if is_sqlite(engine) else AdvisoryLock(engine, mailbox)


# -- connecting ------------------------------------------------------------


def connect(mailbox: ImapMailbox) -> IMAPClient:
    """Connected and logged in; errors come out as MailboxError."""
    host, port = mailbox.host, mailbox.effective_port
    timeout = SocketTimeout(mailbox.timeout_seconds, mailbox.timeout_seconds)
    try:
        client = IMAPClient(
            host,
            port,
            ssl=mailbox.tls == "implicit",
            ssl_context=ssl.create_default_context(),
            timeout=timeout,
        )
        if mailbox.tls == "starttls":
            client.starttls(ssl.create_default_context())
    except (OSError, IMAPClientError) as exc:
        raise translate(mailbox, exc) from exc

    try:
        _login(client, mailbox)
    except BaseException:
        close(client)
        raise

    return client


def _login(client: IMAPClient, mailbox: ImapMailbox) -> None:
    try:
        if mailbox.oauth2_token_command is not None:
            client.oauth2_login(mailbox.username, _oauth2_token(mailbox))
        else:
            client.login(mailbox.username, _password(mailbox))
    except LoginError as exc:
        what = (
            "the token command"
            if mailbox.oauth2_token_command
            else ("username and password")
        )
        raise MailboxError(
            mailbox.name, "login refused", f"check {what} ({exc})"
        ) from exc
    except (OSError, IMAPClientError) as exc:
        raise translate(mailbox, exc) from exc


def _password(mailbox: ImapMailbox) -> str:
    if mailbox.password is not None:
        return mailbox.password.get_secret_value()

    assert mailbox.password_file is not None
    try:
        return mailbox.password_file.read_text().rstrip("\r\n")
    except OSError as exc:
        raise MailboxError(
            mailbox.name,
            f"cannot read password_file {mailbox.password_file}",
            f"check the path and its permissions ({exc.strerror})",
        ) from exc


def _oauth2_token(mailbox: ImapMailbox) -> str:
    """Run the configured command; its standard output is the access token."""
    assert mailbox.oauth2_token_command is not None
    command = shlex.split(mailbox.oauth2_token_command)
    try:
        done = subprocess.run(  # noqa: S603 (the operator's own command, no shell)
            command,
            capture_output=True,
            text=True,
            timeout=mailbox.timeout_seconds,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MailboxError(
            mailbox.name, "oauth2_token_command did not run", f"check it ({exc})"
        ) from exc

    token = done.stdout.strip()
    if done.returncode != 0 or not token:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MailboxError(
            mailbox.name,
            f"oauth2_token_command failed (exit {done.returncode}: {said})",
            "check the command and the credentials it uses",
        )

    return token


def translate(mailbox: ImapMailbox, exc: BaseException) -> MailboxError:
    """A library or network error as a MailboxError that says what to fix."""
    where = f"{mailbox.host}:{mailbox.effective_port}"
    if isinstance(exc, MailboxError):
        return exc
    if isinstance(exc, socket.gaierror):
        return MailboxError(
            mailbox.name, f"host {mailbox.host!r} not found", "check host"
        )
    if isinstance(exc, ConnectionRefusedError):
        return MailboxError(
            mailbox.name, f"connection refused by {where}", "check host, port and tls"
        )
    if isinstance(exc, ssl.SSLError):
        return MailboxError(
            mailbox.name,
            f"TLS failed with {where} ({exc})",
            'check tls ("implicit" for port 993, "starttls" for 143) and the '
            "server's certificate",
        )
    if isinstance(exc, TimeoutError):
        return MailboxError(
            mailbox.name,
            f"no answer from {where}",
            "check host, port, tls and firewalls",
        )
    if isinstance(exc, OSError):
        return MailboxError(
            mailbox.name, f"network error with {where} ({exc})", "check the network"
        )

    if isinstance(exc, IMAPClientAbortError):
        return MailboxError(
            mailbox.name,
            f"connection to {where} lost ({exc})",
            "the server went away; see its log if this lasts",
        )

    return MailboxError(mailbox.name, f"server error ({exc})", "see the server's log")


def close(client: IMAPClient) -> None:
    """Log out, or at least drop the connection; never raises."""
    try:
        client.logout()
    except Exception:  # noqa: BLE001 (a dead connection cannot log out)
        with suppress(Exception):
            client.shutdown()


@dataclass(frozen=True, slots=True)
class Folder:
    uidvalidity: int
    uidnext: int
    exists: int


def open_folder(
    client: IMAPClient, mailbox: ImapMailbox, *, readonly: bool = False
) -> Folder:
    """SELECT (or EXAMINE) the folder; what the server says about it."""
    try:
        info = client.select_folder(mailbox.folder, readonly=readonly)
    except IMAPClientError as exc:
        if not client.folder_exists(mailbox.folder):
            raise MailboxError(
                mailbox.name,
                f"folder {mailbox.folder!r} does not exist",
                "check folder",
            ) from exc
        raise

    uidvalidity = int(info[b"UIDVALIDITY"])
    uidnext = info.get(b"UIDNEXT")
    if uidnext is None:  # optional in RFC 3501; derive it
        uidnext = max(client.search("ALL"), default=0) + 1

    return Folder(uidvalidity, int(uidnext), int(info.get(b"EXISTS", 0)))


def check_move_to(client: IMAPClient, mailbox: ImapMailbox) -> None:
    if mailbox.after == "move" and not client.folder_exists(mailbox.move_to):
        raise MailboxError(
            mailbox.name,
            f"move_to folder {mailbox.move_to!r} does not exist",
            "create it or change move_to",
        )


# -- the poller --------------------------------------------------------------


class Outage:
    """One warning when a mailbox stops working, one info line when it works
    again; the attempts in between are logged at debug level only."""

    def __init__(self, mailbox: str, clock: Clock) -> None:
        self.mailbox = mailbox
        self.clock = clock
        self.since: datetime | None = None
        self.attempts = 0

    def failed(self, problem: str, *, trace: bool = False) -> bool:
        """Note a failed attempt; True when it starts an outage."""
        self.attempts += 1
        if self.since is not None:
            log.debug("imap: mailbox=%s still failing: %s", self.mailbox, problem)
            return False

        self.since = self.clock.now()
        log.warning(
            "imap: mailbox=%s not working: %s (retrying with backoff; "
            "logged again when it works)",
            self.mailbox,
            problem,
            exc_info=trace,
        )
        return True

    def recovered(self) -> None:
        if self.since is None:
            return
        lasted = self.clock.now() - self.since
        log.info(
            "imap: mailbox=%s working again after %ds and %d failed attempts",
            self.mailbox,
            lasted.total_seconds(),
            self.attempts,
        )
        self.since = None
        self.attempts = 0


def _ignore(outcome: Outcome) -> None:
    return None


class MailboxPoller:
    """Reads one folder into the store until stopped: one thread, one client.

    ``run_in_store`` runs every store call (the daemon sends them to its
    store runner); ``on_accepted`` must be safe to call from this thread.
    """

    def __init__(
        self,
        mailbox: ImapMailbox,
        intake: Intake,
        *,
        cursors: Cursors,
        run_in_store: StoreCall,
        lock: MailboxLock,
        on_accepted: Callable[[Outcome], None] = _ignore,
        rng: random.Random | None = None,
        commit_every: int = COMMIT_EVERY,
    ) -> None:
        self.mailbox = mailbox
        self.commit_every = commit_every
        self.name = mailbox.name
        self.intake = intake
        self.cursors = cursors
        self.run_in_store = run_in_store
        self.lock = lock
        self.on_accepted = on_accepted
        self.source = f"imap:{mailbox.name}"
        self.stopping = threading.Event()
        self.backoff = Backoff(min(1.0, mailbox.poll_seconds), mailbox.poll_seconds)
        self._rng = rng or random.Random()
        self._outage = Outage(mailbox.name, intake.clock)
        self._guard = threading.Lock()
        self._client: IMAPClient | None = None
        self._idling = False
        self._standing_by = False

    # -- control --------------------------------------------------------

    def run(self) -> None:
        """The thread's body: poll until stopped, reconnecting after errors."""
        while not self.stopping.is_set():
            try:
                self._serve(once=False)
            except Exception as exc:  # noqa: BLE001 (the thread outlives any error)
                if self.stopping.is_set():
                    break
                self._failed(exc)
                delay = self.backoff.delay(self._outage.attempts, self._rng)
                self.stopping.wait(delay)
        log.info("imap: mailbox=%s stopped", self.name)

    def poll_once(self) -> bool:
        """Import what is waiting, then disconnect; errors propagate.

        False when another daemon holds the mailbox.
        """
        return self._serve(once=True)

    def stop(self) -> None:
        """Ask the thread to finish; interrupts an IDLE, never a batch."""
        with self._guard:
            self.stopping.set()
            if self._idling and self._client is not None:
                with suppress(OSError):
                    self._client.socket().shutdown(socket.SHUT_RDWR)

    @property
    def idling(self) -> bool:
        """True while the thread waits in IDLE for the server's news."""
        return self._idling

    # -- one connection -------------------------------------------------

    def _serve(self, *, once: bool) -> bool:
        if not self.lock.acquire():
            self._stand_by()
            if not once:
                self.stopping.wait(self.mailbox.poll_seconds)
            return False

        self._standing_by = False
        try:
            with self._connected() as client:
                position = self._open(client)
                while not self.stopping.is_set():
                    self.lock.check()
                    position = self._sync(client, position)
                    self._outage.recovered()
                    if once:
                        break
                    self._wait(client)
        finally:
            self.lock.release()

        return True

    @contextmanager
    def _connected(self) -> Iterator[IMAPClient]:
        client = connect(self.mailbox)
        with self._guard:
            self._client = client
        try:
            yield client
        finally:
            with self._guard:
                self._client = None
            close(client)

    def _open(self, client: IMAPClient) -> Position:
        """SELECT the folder and find where to read from."""
        folder = open_folder(client, self.mailbox)
        check_move_to(client, self.mailbox)
        stored = self.run_in_store(lambda: self.cursors.load(self.name))
        position, why = resume(
            stored,
            folder=self.mailbox.folder,
            uidvalidity=folder.uidvalidity,
            uidnext=folder.uidnext,
            import_existing=self.mailbox.import_existing,
        )
        if position == stored:
            return position

        self.run_in_store(lambda: self.cursors.save(self.name, position))
        report = log.warning if stored is not None else log.info
        report(
            "imap: mailbox=%s folder=%s %s: reading from uid %d "
            "(uidvalidity %d, %d messages in the folder)",
            self.name,
            self.mailbox.folder,
            why,
            position.last_uid + 1,
            folder.uidvalidity,
            folder.exists,
        )

        return position

    # -- one pass -------------------------------------------------------

    def _sync(self, client: IMAPClient, position: Position) -> Position:
        """Import everything above the cursor, in bounded batches."""
        found = client.search(["UID", f"{position.last_uid + 1}:*"])
        uids = pending(found, position.last_uid)
        counted = position
        position = self.run_in_store(
            lambda: self.cursors.checked(self.name, counted, uids)
        )

        for start in range(0, len(uids), SIZES_AT_ONCE):
            chunk = uids[start : start + SIZES_AT_ONCE]
            sizes = {
                uid: int(data.get(SIZE, 0))
                for uid, data in client.fetch(chunk, ["RFC822.SIZE"]).items()
            }
            for batch in plan_batches(chunk, sizes):
                if self.stopping.is_set():
                    return position
                position = self._import(client, position, batch)

        return position

    def _import(
        self, client: IMAPClient, position: Position, batch: list[int]
    ) -> Position:
        """Commit each message, then file the committed ones, then advance.

        A message that fails to process is quarantined by ``receive`` and
        the batch goes on; a store that fails stops it, leaving the rest
        unflagged and above the cursor for the next pass.
        """
        fetched = client.fetch(batch, [FETCH_BODY])
        present = []
        for uid in batch:
            raw = fetched.get(uid, {}).get(BODY)
            if raw is not None:
                present.append((uid, raw))
                continue
            log.warning(
                "imap: mailbox=%s uid=%d message_id=- gone before it "
                "was fetched (expunged elsewhere?); skipped",
                self.name,
                uid,
            )

        committed: list[int] = []
        passed = position.last_uid
        try:
            for start in range(0, len(present), self.commit_every):
                if self.stopping.is_set():
                    break
                group = present[start : start + self.commit_every]
                self._receive(group, position)
                committed += [uid for uid, _ in group]
                passed = group[-1][0]
            else:
                passed = batch[-1]  # every UID of the batch is stored or gone
        finally:
            position = self._settle(client, position, committed, passed)

        return position

    def _settle(
        self, client: IMAPClient, position: Position, committed: list[int], passed: int
    ) -> Position:
        if passed <= position.last_uid:
            return position

        self._file(client, committed)
        before = position
        position = self.run_in_store(
            lambda: self.cursors.advanced(self.name, before, passed, len(committed))
        )
        done = "marked \\Seen" if self.mailbox.after == "seen" else "moved"
        log.info(
            "imap: mailbox=%s committed %d messages, uids %d-%d, then %s",
            self.name,
            len(committed),
            before.last_uid + 1,
            passed,
            done,
        )

        return position

    def _receive(self, group: list[tuple[int, bytes]], position: Position) -> None:
        """Store ``group`` in one transaction: one disk flush for them all."""
        emails = [
            RawEmail(
                raw,
                self.source,
                f"{position.uidvalidity}:{uid}",
                acknowledge=uid > position.backlog_uid,
            )
            for uid, raw in group
        ]
        outcomes = self.run_in_store(lambda: receive_many(self.intake, emails))

        for (uid, raw), outcome in zip(group, outcomes, strict=True):
            # accept() logs the summary line (and a warning for the
            # quarantine); this one adds the UID and Message-ID that a
            # person searches for.
            held = outcome.status == "quarantined"
            if held or log.isEnabledFor(logging.DEBUG):
                log.log(
                    logging.INFO if held else logging.DEBUG,
                    "imap: mailbox=%s uid=%d message_id=%s outcome=%s%s",
                    self.name,
                    uid,
                    header_message_id(raw) or "-",
                    outcome.status,
                    f" reason={outcome.detail}" if outcome.detail else "",
                )
            if outcome.queued_sends:
                self.on_accepted(outcome)

    def _file(self, client: IMAPClient, uids: list[int]) -> None:
        """Acknowledge committed messages at the source: \\Seen, or moved."""
        if not uids:
            return
        if self.mailbox.after == "seen":
            client.add_flags(uids, [SEEN], silent=True)
            return
        if client.has_capability("MOVE"):
            client.move(uids, self.mailbox.move_to)
            return

        client.copy(uids, self.mailbox.move_to)
        if client.has_capability("UIDPLUS"):
            client.add_flags(uids, [DELETED], silent=True)
            client.uid_expunge(uids)
        else:
            # A plain EXPUNGE would also remove other clients' \Deleted mail,
            # so ours stays marked for the server or a person to expunge.
            client.add_flags(uids, [SEEN, DELETED], silent=True)

    # -- between passes -------------------------------------------------

    def _wait(self, client: IMAPClient) -> None:
        """IDLE until the server has news or a poll interval passes.

        Every interval ends the IDLE, so a dead connection shows up as an
        error within one interval, and a pass runs even if a notification
        was lost.
        """
        timeout = min(self.mailbox.poll_seconds, IDLE_RENEW_SECONDS)
        if not client.has_capability("IDLE"):
            self.stopping.wait(timeout)
            return

        with self._guard:
            if self.stopping.is_set():
                return
            self._idling = True
        try:
            client.idle()
            responses = client.idle_check(timeout=timeout)
        finally:
            with self._guard:
                self._idling = False
        client.idle_done()
        log.debug("imap: mailbox=%s idle ended: %r", self.name, responses)

    def _stand_by(self) -> None:
        if not self._standing_by:
            log.info(
                "imap: mailbox=%s is polled by another daemon; standing by",
                self.name,
            )
        self._standing_by = True

    def _failed(self, exc: Exception) -> None:
        store_errors = (StoreUnavailable, SQLAlchemyError)
        unexpected = False
        if isinstance(exc, (MailboxError, OSError, IMAPClientError)):
            error = translate(self.mailbox, exc)
            problem = f"{error.problem}: {error.fix}"
        elif isinstance(exc, store_errors):
            problem = f"store unavailable ({exc}); the messages wait on the server"
        else:
            problem = f"unexpected {type(exc).__name__}: {exc}"
            unexpected = True

        if self._outage.failed(problem, trace=unexpected):
            with suppress(Exception):
                self.run_in_store(lambda: self.cursors.failed(self.name, problem))


# -- the daemon's view -------------------------------------------------------


class ImapChannel:
    """Every configured mailbox's poller, each on a thread of its own."""

    STOP_SECONDS = 30.0

    def __init__(
        self,
        mailboxes: Sequence[ImapMailbox],
        intake: Intake,
        engine: Engine,
        store: StoreRunner,
        on_accepted: Callable[[Outcome], None] = _ignore,
    ) -> None:
        self.mailboxes = list(mailboxes)
        self.intake = intake
        self.engine = engine
        self.store = store
        self.on_accepted = on_accepted
        self.pollers: list[MailboxPoller] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the pollers; call from the daemon's event loop."""
        loop = asyncio.get_running_loop()
        store = self.store

        def in_store(work: Callable[[], T]) -> T:
            return asyncio.run_coroutine_threadsafe(store(work), loop).result()

        cursors = Cursors(self.intake.session_factory, self.intake.clock)
        for mailbox in self.mailboxes:
            poller = MailboxPoller(
                mailbox,
                self.intake,
                cursors=cursors,
                run_in_store=in_store,
                lock=lock_for(self.engine, mailbox.name),
                on_accepted=self.on_accepted,
            )
            thread = threading.Thread(
                target=poller.run, name=f"imap-{mailbox.name}", daemon=True
            )
            thread.start()
            self.pollers.append(poller)
            self.threads.append(thread)
            log.info(
                "imap: mailbox=%s polling %s on %s:%d",
                mailbox.name,
                mailbox.folder,
                mailbox.host,
                mailbox.effective_port,
            )

    async def stop(self) -> None:
        """Let each poller finish the message in hand, then wait for it."""
        for poller in self.pollers:
            poller.stop()
        for thread in self.threads:
            await asyncio.to_thread(thread.join, self.STOP_SECONDS)
            if thread.is_alive():
                log.warning("imap: %s did not stop in time", thread.name)


# -- intake mailboxes check ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """What ``intake mailboxes check`` prints for one mailbox."""

    mailbox: str
    folder: str
    uidvalidity: int
    messages: int
    waiting: int  # UIDs above the cursor: the next pass imports them
    last_uid: int | None  # None: never imported from this folder
    idle: bool
    note: str


def check_mailbox(mailbox: ImapMailbox, cursors: Cursors) -> Report:
    """Log in, look at the folder without changing it; MailboxError if not."""
    stored = cursors.load(mailbox.name)
    client = connect(mailbox)
    try:
        folder = open_folder(client, mailbox, readonly=True)
        check_move_to(client, mailbox)
        position, why = resume(
            stored,
            folder=mailbox.folder,
            uidvalidity=folder.uidvalidity,
            uidnext=folder.uidnext,
            import_existing=mailbox.import_existing,
        )
        found = client.search(["UID", f"{position.last_uid + 1}:*"])
        idle = client.has_capability("IDLE")
    except (OSError, IMAPClientError) as exc:
        raise translate(mailbox, exc) from exc
    finally:
        close(client)

    return Report(
        mailbox=mailbox.name,
        folder=mailbox.folder,
        uidvalidity=folder.uidvalidity,
        messages=folder.exists,
        waiting=len(pending(found, position.last_uid)),
        last_uid=stored.last_uid if stored is not None else None,
        idle=idle,
        note=_note(why, mailbox),
    )


def _note(why: str, mailbox: ImapMailbox) -> str:
    if why == "first start" and mailbox.import_existing:
        return "first start: every message in the folder will be imported"
    if why == "first start":
        return "first start: import_existing = false, new mail only"
    if why == "UIDVALIDITY changed":
        return "UIDVALIDITY changed: the folder will be read again, duplicates skipped"
    return ""
