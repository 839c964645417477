"""The outbox worker: one row, one send, retried with backoff, never silent.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite's
``BEGIN IMMEDIATE`` serialises writers anyway) and carry a lease in
``next_attempt_at``, so a daemon that dies mid-send leaves the row to be taken
up again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Protocol

import aiosmtplib
from sqlalchemy import or_, select

from intake.clock import Clock
from intake.config import OutboundSettings, RelaySettings
from intake.runner import StoreRunner
from store.engine import SessionFactory
from store.models import Message, Outbox

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


class Sender(Protocol):
    async def send(self, item: Claimed) -> None: ...


class MaildirSender:
    """Writes each message into a local maildir instead of sending it.

    The file name comes from the outbox row, so a send repeated after a
    crash finds the file already there and writes nothing twice.
    """

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

    def __init__(self, relay: RelaySettings) -> None:
        self.relay = relay

    async def send(self, item: Claimed) -> None:
        relay = self.relay
        try:
            await aiosmtplib.send(
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
        except aiosmtplib.SMTPResponseException as exc:
            raise SendError(
                f"relay answered {exc.code} {exc.message}", permanent=exc.code >= 500
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SendError(f"relay {relay.host}:{relay.port}: {exc}") from exc


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
        for item in claimed:
            error: SendError | None = None
            try:
                await self.sender.send(item)
            except SendError as exc:
                error = exc
            except Exception as exc:  # an unexpected failure must not stop sends
                log.exception("outbox: send %s failed unexpectedly", item.outbox_id)
                error = SendError(f"{type(exc).__name__}: {exc}")
            await self.run_in_store(partial(self._finish, item, error))

        return len(claimed)

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
            claimed = []
            for row in rows:
                row.status = "sending"
                row.claimed_by = self.name
                row.next_attempt_at = now + LEASE
                raw = session.scalar(
                    select(Message.raw).where(Message.id == row.message_pk)
                )
                claimed.append(
                    Claimed(
                        outbox_id=row.id,
                        key=f"{int(row.created_at.timestamp())}.outbox-{row.id}",
                        envelope_from=row.envelope_from,
                        recipients=list(row.recipients),
                        raw=raw or b"",
                        attempts=row.attempts,
                    )
                )

        return claimed

    def _finish(self, item: Claimed, error: SendError | None) -> None:
        now = self.clock.now()
        with self.session_factory.begin() as session:
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
