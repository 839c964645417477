"""The SMTP listener: aiosmtpd inside the daemon's own event loop.

250 is answered only after the message is committed; a store failure answers
451 so the sender tries again; a recipient outside our domains gets 550 (we
are no open relay); aiosmtpd itself answers 552 above the size limit. Once
the daemon stops, every new command gets 421 and the connection closes,
while a message whose DATA has begun is received and stored to the end.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import SMTP

from channels.batch import Batcher
from channels.email import RawEmail
from intake.accept import Intake, Outcome
from intake.clock import Clock
from intake.errors import StoreUnavailable
from intake.runner import StoreRunner

log = logging.getLogger(__name__)


class LenientSMTP(SMTP):
    """aiosmtpd's SMTP with room for the over-long lines real mail has.

    RFC 5321 caps a line at 998 octets, and aiosmtpd answers 500 for the
    whole message beyond that, after the final dot; a customer should not
    get a bounce because their mail program ignores the cap.
    """

    line_length_limit = 256 * 1024


SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"


class DrainingSMTP(LenientSMTP):
    """Answers 421 to any command once the handler drains (RFC 5321 3.8).

    Each command runs through ``_guarded``, so the handler knows which
    connections are between commands (safe to close now) and which are in
    the middle of one, such as a DATA being received and stored.
    """

    busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.event_handler.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.event_handler.connections.discard(self)
        super().connection_lost(error)

    async def _guarded(self, command: Callable[[str], Any], arg: str) -> None:
        if self.event_handler.stopping:
            await self.push(SHUTTING_DOWN)
            if self.transport is not None:
                self.transport.close()
            return

        self.busy = True
        try:
            await command(arg)
        finally:
            self.busy = False

    async def smtp_HELO(self, arg: str) -> None:
        await self._guarded(super().smtp_HELO, arg)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._guarded(super().smtp_EHLO, arg)

    async def smtp_MAIL(self, arg: str) -> None:
        await self._guarded(super().smtp_MAIL, arg)

    async def smtp_RCPT(self, arg: str) -> None:
        await self._guarded(super().smtp_RCPT, arg)

    async def smtp_RSET(self, arg: str) -> None:
        await self._guarded(super().smtp_RSET, arg)

    async def smtp_NOOP(self, arg: str) -> None:
        await self._guarded(super().smtp_NOOP, arg)

    async def smtp_VRFY(self, arg: str) -> None:
        await self._guarded(super().smtp_VRFY, arg)

    async def smtp_HELP(self, arg: str) -> None:
        await self._guarded(super().smtp_HELP, arg)

    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler

        async def receive_and_store(arg: str) -> None:
            handler.entered()
            try:
                await super(DrainingSMTP, self).smtp_DATA(arg)
            finally:
                handler.left()

        await self._guarded(receive_and_store, arg)


class SmtpHandler:
    """aiosmtpd handler hooks; one instance serves every connection."""

    def __init__(
        self,
        intake: Intake,
        run_in_store: StoreRunner,
        clock: Clock,
        *,
        domains: Collection[str],
        hostname: str,
        on_accepted: Callable[[Outcome], None] = lambda outcome: None,
        source: str = "smtp",
    ) -> None:
        self.intake = intake
        self.run_in_store = run_in_store
        self.batcher = Batcher(intake, run_in_store)
        self.clock = clock
        self.domains = frozenset(domain.lower() for domain in domains)
        self.hostname = hostname
        self.on_accepted = on_accepted
        self.source = source
        self.protocol = "ESMTP"  # for the Received field (RFC 3848)
        self.connections: set[DrainingSMTP] = set()
        self.stopping = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def entered(self) -> None:
        """A DATA began: its message is in flight until ``left``."""
        self.in_flight += 1
        self.idle.clear()

    def left(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def drain(self) -> None:
        """Stop taking commands; close connections that wait between them.

        RFC 5321 3.8 lets a server that must shut down answer 421 at any
        time and close; a connection in the middle of a command (a DATA
        being received or stored) finishes it first and gets the 421 on its
        next command.
        """
        self.stopping = True
        for connection in list(self.connections):
            if not connection.busy:
                _say_goodbye(connection)

    def close_all(self) -> None:
        """Close every remaining connection, busy or not."""
        self.stopping = True
        for connection in list(self.connections):
            _say_goodbye(connection)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Any,
        envelope: Any,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        domain = address.rpartition("@")[2].strip("<> ").lower()
        if domain not in self.domains:
            log.info("smtp: refused relay to %s from %s", address, session.peer)
            return "550 5.7.1 Relaying denied: we take mail for our own domains only"

        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        sender = envelope.mail_from
        recipients = list(envelope.rcpt_tos)

        email = RawEmail(
            envelope.original_content,
            self.source,
            None,
            sender,
            recipients,
            trace=self._received(session),
        )
        try:
            outcome = await self.batcher.receive(email)
        except StoreUnavailable as exc:
            log.error("smtp: store unavailable, answered 451: %s", exc)
            return "451 4.3.0 Temporary storage failure, please try again later"
        except Exception:
            log.exception("smtp: message not stored, answered 451")
            return "451 4.3.0 Temporary failure, please try again later"

        self.on_accepted(outcome)
        return f"250 2.0.0 Ok: {_describe(outcome)}"

    def _received(self, session: Any) -> bytes:
        """A Received trace field for the stored copy (RFC 5321 §4.4)."""
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        helo = session.host_name or "unknown"
        stamp = format_datetime(self.clock.now())
        line = (
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self.hostname} (Intake) with {self.protocol}; {stamp}\r\n"
        )

        return line.encode("ascii", "replace")


def _say_goodbye(connection: DrainingSMTP) -> None:
    transport = connection.transport
    if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
        return
    transport.write(SHUTTING_DOWN.encode() + b"\r\n")
    transport.close()


def _describe(outcome: Outcome) -> str:
    if outcome.ticket_number is not None:
        return f"{outcome.status} ticket {outcome.ticket_number}"
    return outcome.status


async def start_smtp(
    handler: SmtpHandler,
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    timeout_seconds: int,
    sock: socket.socket | None = None,
    protocol: type[DrainingSMTP] = DrainingSMTP,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return protocol(
            handler,
            hostname=handler.hostname,  # never getfqdn() per connection
            data_size_limit=max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=timeout_seconds,
        )

    if sock is not None:
        return await loop.create_server(factory, sock=sock)
    return await loop.create_server(factory, host=host, port=port)
