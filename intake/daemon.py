"""The daemon's composition: which parts start, how they are wired, signals.

Everything else receives what it needs through its constructor; this is the
one module that knows the whole graph.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from sqlalchemy import Engine

from channels.imap import ImapChannel
from channels.smtp import SmtpHandler, start_smtp
from intake.accept import Intake, Outcome
from intake.clock import Clock, SystemClock
from intake.config import Settings, split_host_port
from intake.runner import StoreRunner
from notifier.compose import EmailComposer
from notifier.outbox import OutboxWorker, make_sender
from store.engine import is_sqlite, make_engine, make_session_factory
from store.migrate import upgrade

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """What the CLI and the daemon share: one engine, one Intake."""

    settings: Settings
    clock: Clock
    engine: Engine
    intake: Intake


def prepare(settings: Settings, clock: Clock | None = None) -> Parts:
    """Create the state directory, migrate the database, build ``Intake``."""
    clock = clock or SystemClock()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(
        settings.database_url, busy_timeout_ms=settings.store.busy_timeout_ms
    )
    upgrade(engine)
    session_factory = make_session_factory(engine)
    composer = EmailComposer(settings, clock)
    intake = Intake(session_factory, clock, settings, composer)

    return Parts(settings, clock, engine, intake)


class Daemon:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.stopping = asyncio.Event()
        workers = 1 if is_sqlite(parts.engine) else 4
        self.store = StoreRunner(workers)
        self.outbox = OutboxWorker(
            parts.intake.session_factory,
            parts.clock,
            parts.settings.outbound,
            make_sender(parts.settings.outbound, parts.settings.outbox_maildir),
            self.store,
        )

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        settings = self.parts.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

        outbox_task = asyncio.create_task(self.outbox.run(self.stopping))
        smtp_server = None
        handler = None
        if settings.smtp.enabled:
            handler = SmtpHandler(
                self.parts.intake,
                self.store,
                self.parts.clock,
                domains=settings.smtp.domains,
                hostname=settings.smtp.hostname,
                on_accepted=self._accepted,
            )
            host, port = split_host_port(settings.smtp.listen)
            smtp_server = await start_smtp(
                handler,
                host=host,
                port=port,
                max_message_bytes=settings.smtp.max_message_bytes,
                timeout_seconds=settings.smtp.timeout_seconds,
            )
            log.info("smtp: listening on %s", settings.smtp.listen)
        imap = ImapChannel(
            settings.imap.mailboxes,
            self.parts.intake,
            self.parts.engine,
            self.store,
            on_accepted=self._accepted,
        )
        imap.start()
        log.info("ready: state in %s", settings.state_dir)

        await self.stopping.wait()
        log.info("stopping: no new connections, finishing messages in flight")

        if smtp_server is not None and handler is not None:
            smtp_server.close()
            await handler.idle.wait()
        await imap.stop()
        await outbox_task
        await asyncio.to_thread(self.store.shutdown)
        self.parts.engine.dispose()
        log.info("stopped")

    def _accepted(self, outcome: Outcome) -> None:
        if outcome.queued_sends:
            self.outbox.wake()
