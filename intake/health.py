"""The HTTP listener and its health endpoint.

The listener is an ASGI application (Starlette) served by uvicorn inside the
daemon's own event loop, on a socket the daemon binds (or systemd passes).
ASGI rather than a hand-written server because Twilio's webhooks will be
served by the same listener: they need form parsing, routing and request
validation that an ASGI framework already does well, and each channel adds
its routes to one application.

``GET /health`` answers 200 when the database answers, the outbox is not
falling behind and every mailbox was polled recently; 503 otherwise, with
the same JSON body saying which part is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import uvicorn
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from intake.clock import Clock
from intake.config import ImapMailbox
from store.engine import SessionFactory
from store.models import MailboxCursor, Outbox

log = logging.getLogger(__name__)

T = TypeVar("T")
StoreCall = Callable[[Callable[[], T]], Any]  # StoreRunner: awaitable result

ANSWER_SECONDS = 5.0


@dataclass
class Report:
    """What ``/health`` says; ``problems`` empty means healthy."""

    database: dict[str, Any] = field(default_factory=dict)
    outbox: dict[str, Any] = field(default_factory=dict)
    mailboxes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "failing" if self.problems else "ok",
            "problems": self.problems,
            "database": self.database,
            "outbox": self.outbox,
            "mailboxes": self.mailboxes,
        }


class Health:
    """Looks at the store; every figure comes from the shared database, so
    each of several daemons reports the same outbox and mailboxes."""

    def __init__(
        self,
        session_factory: SessionFactory,
        clock: Clock,
        mailboxes: Sequence[ImapMailbox],
        *,
        started_at: datetime,
        outbox_late: timedelta = timedelta(minutes=15),
    ) -> None:
        self.session_factory = session_factory
        self.clock = clock
        self.mailboxes = list(mailboxes)
        self.started_at = started_at
        self.outbox_late = outbox_late

    def check(self) -> Report:
        """Run every check in one read; blocking, so call it off the loop."""
        report = Report()
        now = self.clock.now()
        try:
            with self.session_factory() as session:
                session.execute(text("SELECT 1"))
                report.database = {"ok": True}
                report.outbox = self._outbox(session, now, report.problems)
                report.mailboxes = self._mailboxes(session, now, report.problems)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            report.database = {"ok": False, "error": reason}
            report.problems.append(f"database: {reason}")

        return report

    def _outbox(
        self, session: Any, now: datetime, problems: list[str]
    ) -> dict[str, Any]:
        """Behind when a due send was never tried for a while (the worker is
        stuck) or a send keeps failing for a while (the relay is down)."""
        waiting = (Outbox.status == "pending") | (Outbox.status == "sending")
        counts = dict(
            session.execute(
                select(Outbox.status, func.count()).group_by(Outbox.status)
            ).all()
        )
        untried = session.scalar(
            select(func.min(Outbox.next_attempt_at)).where(
                waiting, Outbox.attempts == 0
            )
        )
        retried = session.execute(
            select(Outbox.created_at, Outbox.attempts, Outbox.last_error)
            .where(waiting, Outbox.attempts > 0)
            .order_by(Outbox.created_at)
            .limit(1)
        ).first()

        late = _seconds_since(untried, now)
        failing = _seconds_since(retried.created_at if retried else None, now)
        limit = self.outbox_late.total_seconds()
        if late > limit:
            problems.append(
                f"outbox: a due send has waited {int(late)} s without a try; "
                "is the outbox worker running?"
            )
        if retried is not None and failing > limit:
            problems.append(
                f"outbox: a send has failed for {int(failing)} s "
                f"({retried.attempts} attempts, last: {retried.last_error}); "
                "is the relay reachable?"
            )

        return {
            "ok": late <= limit and failing <= limit,
            "backlog": int(counts.get("pending", 0)) + int(counts.get("sending", 0)),
            "failed": int(counts.get("failed", 0)),
            "sent": int(counts.get("sent", 0)),
            "oldest_untried_seconds": int(late),
            "oldest_retried_seconds": int(failing),
        }

    def _mailboxes(
        self, session: Any, now: datetime, problems: list[str]
    ) -> list[dict[str, Any]]:
        cursors = {
            row.mailbox: row for row in session.scalars(select(MailboxCursor)).all()
        }
        found = []
        for mailbox in self.mailboxes:
            cursor = cursors.get(mailbox.name)
            # Every pass records a poll, and passes come at least every
            # poll_seconds; three missed passes and a minute of slack.
            allowed = timedelta(seconds=3 * mailbox.poll_seconds + 60)
            last_poll = cursor.last_poll_at if cursor else None
            since = last_poll or self.started_at
            ok = now - since <= allowed
            if not ok:
                error = cursor.last_error if cursor and cursor.last_error else ""
                problems.append(
                    f"mailbox {mailbox.name}: no successful poll since "
                    f"{since.isoformat(timespec='seconds')}"
                    + (f" ({error})" if error else "")
                )
            found.append(
                {
                    "name": mailbox.name,
                    "ok": ok,
                    "last_poll_at": _iso(last_poll),
                    "last_import_at": _iso(cursor.last_ok_at if cursor else None),
                    "last_error": cursor.last_error if cursor else "",
                }
            )

        return found


def _seconds_since(moment: datetime | None, now: datetime) -> float:
    return 0.0 if moment is None else max(0.0, (now - moment).total_seconds())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def health_routes(health: Health, run_in_store: StoreCall[Report]) -> list[BaseRoute]:
    """``/health``, answered from the store runner so that a busy SQLite
    writer queues the read instead of failing it."""

    async def endpoint(request: Request) -> JSONResponse:
        try:
            report = await asyncio.wait_for(run_in_store(health.check), ANSWER_SECONDS)
        except TimeoutError:
            report = Report(
                database={"ok": False, "error": "no answer in time"},
                problems=[f"database: no answer in {ANSWER_SECONDS:.0f} s"],
            )
        status = 503 if report.problems else 200

        return JSONResponse(report.as_json(), status_code=status)

    return [Route("/health", endpoint, methods=["GET", "HEAD"])]


def make_app(routes: Sequence[BaseRoute]) -> Starlette:
    return Starlette(routes=list(routes))


class _InLoopServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """Serves an ASGI app on a bound socket inside the running loop."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        config = uvicorn.Config(
            app,
            log_config=None,  # our logging setup, not uvicorn's
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self.server = _InLoopServer(config)
        self.sock = sock
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def bind(host: str, port: int) -> socket.socket:
        """Bind now, so that a port in use stops start-up with an OSError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
        sock.setblocking(False)
        return sock

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Return once the listener accepts connections."""
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # re-raise why it could not start
                raise RuntimeError("the HTTP listener stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await self._task
