"""The daemon's composition: which parts start, how they are wired, signals.

Everything else receives what it needs through its constructor; this is the
one module that knows the whole graph.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine

from channels.imap import ImapChannel
from channels.lmtp import DrainingLMTP, LmtpHandler
from channels.smtp import DrainingSMTP, SmtpHandler, start_smtp
from intake.accept import Intake, Outcome
from intake.clock import Clock, SystemClock
from intake.config import Settings, split_host_port
from intake.health import Health, HttpListener, health_routes, make_app
from intake.runner import StoreRunner
from intake.sdnotify import Notifier, keep_alive, listen_sockets, watchdog_interval
from notifier import resolution
from notifier.compose import EmailComposer
from notifier.outbox import OutboxWorker, make_sender
from notifier.scheduler import Jobs, Scheduler
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

    def resolved(connection: Connection, ticket_id: int, now: datetime) -> object:
        # An agent's #resolve sends the same note as `intake tickets resolve`.
        return resolution.notify_resolved(connection, settings, clock, ticket_id, now)

    intake = Intake(session_factory, clock, settings, composer, on_resolved=resolved)

    return Parts(settings, clock, engine, intake)


class Daemon:
    """Starts every part, tells systemd when it is ready, stops them in order.

    On SIGTERM the SMTP listener stops accepting and answers 421 to new
    commands, messages already in DATA are stored to the end, the outbox
    worker finishes its current send and the pollers the message in hand;
    all of it within ``stop_seconds``, kept below the unit's TimeoutStopSec.
    """

    STOP_SECONDS = 25.0

    def __init__(
        self,
        parts: Parts,
        *,
        environ: MutableMapping[str, str] | None = None,
        stop_seconds: float = STOP_SECONDS,
    ) -> None:
        self.parts = parts
        self.environ = os.environ if environ is None else environ
        self.notifier = Notifier.from_environment(self.environ)
        self.stop_seconds = stop_seconds
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
        self.scheduler = Scheduler(
            Jobs(parts.intake.session_factory, parts.clock, parts.settings),
            self.store,
            on_queued=self.outbox.wake,
        )

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        settings = self.parts.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        passed = listen_sockets(self.environ, os.getpid())

        outbox_task = asyncio.create_task(self.outbox.run(self.stopping))
        smtp_server = None
        handler = None
        if settings.smtp.enabled:
            handler, smtp_server = await self._start_smtp(
                passed.pop("smtp", None) or passed.pop("unknown", None)
            )
        http = None
        if settings.http.enabled:
            http = await self._start_http(passed.pop("http", None))
        for name, unused in passed.items():
            log.warning("socket activation: no listener for socket %r", name)
            unused.close()
        imap = ImapChannel(
            settings.imap.mailboxes,
            self.parts.intake,
            self.parts.engine,
            self.store,
            on_accepted=self._accepted,
        )
        imap.start()
        self.scheduler.start()

        # Everything started above is up: listeners bound, database
        # migrated (by prepare), workers and the scheduler running.
        self.notifier.ready(f"ready: state in {settings.state_dir}")
        log.info("ready: state in %s", settings.state_dir)
        watchdog = self._start_watchdog()

        await self.stopping.wait()
        self.scheduler.shutdown()
        self.notifier.stopping("stopping: finishing messages in flight")
        log.info("stopping: no new connections, finishing messages in flight")

        draining: list[Awaitable[Any]] = [outbox_task, imap.stop()]
        if smtp_server is not None and handler is not None:
            smtp_server.close()
            handler.drain()
            draining.append(handler.idle.wait())
        await self._finish(draining)
        if handler is not None:
            handler.close_all()
        if http is not None:
            await http.stop()
        if watchdog is not None:
            await watchdog
        await asyncio.to_thread(self.store.shutdown)
        self.parts.engine.dispose()
        log.info("stopped")

    async def _start_smtp(
        self, sock: socket.socket | None
    ) -> tuple[SmtpHandler, asyncio.Server]:
        settings = self.parts.settings
        lmtp = settings.smtp.mode == "lmtp"
        handler_class = LmtpHandler if lmtp else SmtpHandler
        handler = handler_class(
            self.parts.intake,
            self.store,
            self.parts.clock,
            domains=settings.smtp.domains,
            hostname=settings.smtp.hostname,
            on_accepted=self._accepted,
        )
        host, port = split_host_port(settings.smtp.listen)
        server = await start_smtp(
            handler,
            host=host,
            port=port,
            max_message_bytes=settings.smtp.max_message_bytes,
            timeout_seconds=settings.smtp.timeout_seconds,
            sock=sock,
            protocol=DrainingLMTP if lmtp else DrainingSMTP,
        )
        where = "a socket from systemd" if sock else settings.smtp.listen
        log.info("%s: listening on %s", settings.smtp.mode, where)

        return handler, server

    async def _start_http(self, sock: socket.socket | None) -> HttpListener:
        settings = self.parts.settings
        health = Health(
            self.parts.intake.session_factory,
            self.parts.clock,
            settings.imap.mailboxes,
            started_at=self.parts.clock.now(),
        )
        app = make_app(health_routes(health, self.store))
        if sock is None:
            sock = HttpListener.bind(*split_host_port(settings.http.listen))
        listener = HttpListener(app, sock)
        await listener.start()
        log.info("http: listening on %s:%d", *listener.address)

        return listener

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = watchdog_interval(self.environ, os.getpid())
        if interval is None or not self.notifier.enabled:
            return None
        log.info("watchdog: keep-alive every %.1f s", interval)

        return asyncio.create_task(keep_alive(self.notifier, interval, self.stopping))

    async def _finish(self, draining: list[Awaitable[Any]]) -> None:
        """Wait for every part to drain, up to ``stop_seconds`` in all."""
        tasks = [asyncio.ensure_future(part) for part in draining]
        done, late = await asyncio.wait(tasks, timeout=self.stop_seconds)
        for task in late:
            task.cancel()
        if late:
            log.warning(
                "stopping: %d part(s) did not finish in %.0f s; cut short",
                len(late),
                self.stop_seconds,
            )
            await asyncio.wait(late)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("stopping: %s", task.exception())

    def _accepted(self, outcome: Outcome) -> None:
        if outcome.queued_sends:
            self.outbox.wake()
