"""The outbox worker: one row, one send, retried with backoff, never silent.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite's
``BEGIN IMMEDIATE`` serialises writers anyway) and carry a lease in
``next_attempt_at``, so a daemon that dies mid-send leaves the row to be taken
up again when the lease runs out.

A failed attempt waits exponentially longer (``retry_base_seconds`` doubled
each time, at most six hours); after ``max_attempts``, or at once on a
permanent refusal, the row is failed and shown by ``intake outbox list``
until ``intake outbox retry`` puts it back in line. An address that bounced
for good gets nothing until a person clears it (``intake contacts clear``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Protocol

import aiosmtplib
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from intake.clock import Clock
from intake.config import OutboundSettings, RelaySettings
from intake.runner import StoreRunner
from store.engine import SessionFactory
from store.models import ContactPoint, Message, Outbox

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)
BATCH = 20


class SendError(Exception):
    """A send failed; ``permanent`` when trying again cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Claimed:
    outbox_id: int
    key: str
    envelope_from: str
    recipients: list[str]
    raw: bytes
    attempts: int
    message_id: str = ""


class Sender(Protocol):
    # True when sending the same row twice delivers it once; the worker may
    # then record a whole batch of sends in one transaction.
    idempotent: bool

    async def send(self, item: Claimed) -> None: ...


class MaildirSender:
    """Writes each message into a local maildir instead of sending it.

    The file name comes from the outbox row, so a send repeated after a
    crash finds the file already there and writes nothing twice.
    """

    idempotent = True

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    async def send(self, item: Claimed) -> None:
        await asyncio.to_thread(self._write, item)

    def _write(self, item: Claimed) -> None:
        name = f"{item.key}.{socket.gethostname()}"
        final = self.root / "new" / name
        if final.exists() or any((self.root / "cur").glob(f"{name}*")):
            return

        temporary = self.root / "tmp" / name
        with temporary.open("wb") as handle:
            handle.write(item.raw)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(final)


class RelaySender:
    """Sends through the configured SMTP relay with aiosmtplib."""

    idempotent = False  # a relay that took a message cannot be asked

    def __init__(self, relay: RelaySettings) -> None:
        self.relay = relay

    async def send(self, item: Claimed) -> None:
        relay = self.relay
        try:
            refused, _ = await aiosmtplib.send(
                item.raw,
                sender=item.envelope_from,
                recipients=item.recipients,
                hostname=relay.host,
                port=relay.port,
                use_tls=relay.tls == "implicit",
                start_tls=relay.tls == "starttls",
                username=relay.username or None,
                password=relay.password.get_secret_value() or None,
                timeout=relay.timeout_seconds,
                tls_context=ssl.create_default_context(),
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refusal.code for refusal in exc.recipients]
            shown = "; ".join(
                f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients
            )
            raise SendError(
                f"relay refused every recipient: {shown}",
                permanent=all(code >= 500 for code in codes),
            ) from exc
        except (
            aiosmtplib.SMTPAuthenticationError,
            aiosmtplib.SMTPSenderRefused,
            aiosmtplib.SMTPConnectResponseError,
        ) as exc:
            # Our settings or the relay's state, not this message: the next
            # attempt may well work once a person fixes it.
            raise SendError(f"relay answered {exc.code} {exc.message}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise SendError(
                f"relay answered {exc.code} {exc.message}", permanent=exc.code >= 500
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SendError(f"relay {relay.host}:{relay.port}: {exc}") from exc

        for recipient, response in refused.items():
            log.warning(
                "outbox=%s: relay refused %s: %s %s",
                item.outbox_id,
                recipient,
                response.code,
                response.message,
            )


def make_sender(settings: OutboundSettings, maildir: Path) -> Sender:
    if settings.relay is None:
        return MaildirSender(maildir)
    return RelaySender(settings.relay)


class OutboxWorker:
    def __init__(
        self,
        session_factory: SessionFactory,
        clock: Clock,
        settings: OutboundSettings,
        sender: Sender,
        run_in_store: StoreRunner,
        *,
        worker_name: str = "",
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.settings = settings
        self.sender = sender
        self.run_in_store = run_in_store
        self.name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Ask for a pass soon; safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self, stopping: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        while not stopping.is_set():
            try:
                sent = await self.run_once()
            except Exception:
                log.exception("outbox: pass failed; trying again shortly")
                sent = 0
            if sent:
                continue
            self._wakeup.clear()
            waiters = {
                asyncio.ensure_future(self._wakeup.wait()),
                asyncio.ensure_future(stopping.wait()),
            }
            _, pending = await asyncio.wait(
                waiters,
                timeout=self.settings.poll_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in pending:
                waiter.cancel()

    async def run_once(self) -> int:
        """Claim due rows and send each; the number of rows handled."""
        claimed = await self.run_in_store(self._claim)
        done: list[tuple[Claimed, SendError | None]] = []
        for item in claimed:
            done.append((item, await self._send(item)))
            # A send that cannot be repeated safely is recorded at once, so
            # a crash resends at most that one; a repeatable one waits for
            # the batch, which saves a disk flush a message.
            if not self.sender.idempotent:
                await self.run_in_store(partial(self._finish, done))
                done = []
        if done:
            await self.run_in_store(partial(self._finish, done))

        return len(claimed)

    async def _send(self, item: Claimed) -> SendError | None:
        try:
            await self.sender.send(item)
        except SendError as exc:
            return exc
        except Exception as exc:  # an unexpected failure must not stop sends
            log.exception("outbox: send %s failed unexpectedly", item.outbox_id)
            return SendError(f"{type(exc).__name__}: {exc}")

        return None

    def _claim(self) -> list[Claimed]:
        now = self.clock.now()
        with self.session_factory.begin() as session:
            rows = session.scalars(
                select(Outbox)
                .where(
                    or_(Outbox.status == "pending", Outbox.status == "sending"),
                    Outbox.next_attempt_at <= now,
                )
                .order_by(Outbox.id)
                .limit(BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            blocked = _undeliverable(
                session, [r for row in rows for r in row.recipients]
            )
            # One query for every body, before any row changes, so that no
            # autoflush writes rows one at a time.
            bodies = {
                pk: (raw, message_id)
                for pk, raw, message_id in session.execute(
                    select(Message.id, Message.raw, Message.message_id).where(
                        Message.id.in_([row.message_pk for row in rows])
                    )
                )
            }
            claimed = []
            for row in rows:
                recipients = [r for r in row.recipients if r.lower() not in blocked]
                if not recipients:
                    self._hold_back(session, row, blocked)
                    continue
                row.status = "sending"
                row.claimed_by = self.name
                row.next_attempt_at = now + LEASE
                raw, message_id = bodies.get(row.message_pk, (b"", None))
                claimed.append(
                    Claimed(
                        outbox_id=row.id,
                        key=f"{int(row.created_at.timestamp())}.outbox-{row.id}",
                        envelope_from=row.envelope_from,
                        recipients=recipients,
                        raw=raw or b"",
                        attempts=row.attempts,
                        message_id=message_id or "",
                    )
                )

        return claimed

    def _hold_back(self, session: Session, row: Outbox, blocked: set[str]) -> None:
        """Every recipient bounced for good before: nothing is sent."""
        names = ", ".join(sorted(r for r in row.recipients if r.lower() in blocked))
        row.status = "failed"
        row.last_error = (
            f"not sent: {names} bounced before; clear with `intake contacts clear`"
        )
        session.get_one(Message, row.message_pk).status = "failed"
        log.warning("outbox=%s not sent: %s marked undeliverable", row.id, names)

    def _finish(self, done: list[tuple[Claimed, SendError | None]]) -> None:
        """Record how each send went, all in one transaction.

        Successes, the common case, are two statements for the whole batch;
        each failure is looked at on its own.
        """
        now = self.clock.now()
        sent = [item for item, error in done if error is None]
        with self.session_factory.begin() as session:
            if sent:
                self._record_sent(session, sent, now)
            for item, error in done:
                if error is not None:
                    self._record(session, item, error, now)

    def _record_sent(
        self, session: Session, sent: list[Claimed], now: datetime
    ) -> None:
        ids = [item.outbox_id for item in sent]
        quick = {"synchronize_session": False}
        session.execute(
            update(Outbox)
            .where(Outbox.id.in_(ids))
            .values(
                status="sent",
                sent_at=now,
                last_error="",
                attempts=Outbox.attempts + 1,
            )
            .execution_options(**quick)
        )
        session.execute(
            update(Message)
            .where(Message.id.in_(select(Outbox.message_pk).where(Outbox.id.in_(ids))))
            .values(status="sent")
            .execution_options(**quick)
        )
        for item in sent:
            log.info(
                "sent outbox=%s message_id=%s to=%s",
                item.outbox_id,
                item.message_id,
                ",".join(item.recipients),
            )

    def _record(
        self,
        session: Session,
        item: Claimed,
        error: SendError | None,
        now: datetime,
    ) -> None:
        row = session.get_one(Outbox, item.outbox_id)
        message = session.get_one(Message, row.message_pk)
        row.attempts += 1
        if error is None:
            row.status = message.status = "sent"
            row.sent_at = now
            row.last_error = ""
            log.info(
                "sent outbox=%s message_id=%s to=%s",
                row.id,
                message.message_id,
                ",".join(row.recipients),
            )
            return

        row.last_error = str(error)
        if error.permanent or row.attempts >= self.settings.max_attempts:
            row.status = message.status = "failed"
            log.error(
                "outbox=%s failed for good after %d attempts: %s",
                row.id,
                row.attempts,
                error,
            )
            return

        row.status = "pending"
        row.next_attempt_at = now + self.backoff(row.attempts)
        log.warning(
            "outbox=%s attempt %d failed, next at %s: %s",
            row.id,
            row.attempts,
            row.next_attempt_at.isoformat(timespec="seconds"),
            error,
        )

    def backoff(self, attempts: int) -> timedelta:
        """Exponential from the base, capped at six hours, with 10% jitter."""
        seconds = min(self.settings.retry_base_seconds * 2 ** (attempts - 1), 6 * 3600)
        return timedelta(seconds=seconds * random.uniform(0.9, 1.1))


def _undeliverable(session: Session, addresses: list[str]) -> set[str]:
    """Those of ``addresses`` that bounced for good, lower-cased."""
    if not addresses:
        return set()
    found = session.scalars(
        select(ContactPoint.value).where(
            ContactPoint.kind == "email",
            ContactPoint.value.in_(sorted(set(addresses))),
            ContactPoint.undeliverable_at.is_not(None),
        )
    )
    return {value.lower() for value in found}


def retry(
    session_factory: SessionFactory, clock: Clock, outbox_ids: list[int] | None
) -> list[int]:
    """Put failed rows back in line, ``outbox_ids`` or every failed one;
    the ids queued again. Their attempts start over."""
    now = clock.now()
    with session_factory.begin() as session:
        query = select(Outbox).where(Outbox.status == "failed").order_by(Outbox.id)
        if outbox_ids is not None:
            query = query.where(Outbox.id.in_(outbox_ids))
        rows = session.scalars(query).all()
        for row in rows:
            row.status = "pending"
            row.attempts = 0
            row.next_attempt_at = now
            row.claimed_by = ""
            session.get_one(Message, row.message_pk).status = "queued"
            log.info("outbox=%s queued again by hand (was: %s)", row.id, row.last_error)

        return [row.id for row in rows]


def clear_undeliverable(session_factory: SessionFactory, address: str) -> int:
    """Let mail go to ``address`` again after a person checked it; the
    number of contact points cleared (0 when it was not marked)."""
    with session_factory.begin() as session:
        found = session.scalars(
            select(ContactPoint).where(
                ContactPoint.kind == "email",
                func.lower(ContactPoint.value) == address.strip().lower(),
                ContactPoint.undeliverable_at.is_not(None),
            )
        ).all()
        for contact in found:
            contact.undeliverable_at = None
            log.info("contacts: %s may receive mail again", contact.value)

        return len(found)


async def send_due(
    session_factory: SessionFactory,
    clock: Clock,
    settings: OutboundSettings,
    maildir: Path,
    outbox_ids: list[int],
) -> dict[int, tuple[str, str]]:
    """Send every row that is due now, from this process; the status and
    last error of each of ``outbox_ids`` afterwards.

    For ``intake outbox retry`` without waiting for the daemon: a row is
    claimed by one process only, so a running daemon and this never send
    the same row twice.
    """
    store = StoreRunner(1)
    worker = OutboxWorker(
        session_factory, clock, settings, make_sender(settings, maildir), store
    )

    def outcome() -> dict[int, tuple[str, str]]:
        with session_factory() as session:
            rows = session.scalars(select(Outbox).where(Outbox.id.in_(outbox_ids)))
            return {row.id: (row.status, row.last_error) for row in rows}

    try:
        while await worker.run_once():
            pass
        return await store(outcome)
    finally:
        store.shutdown()
