"""The SMTP listener: aiosmtpd inside the daemon's own event loop.

250 is answered only after the message is committed; a store failure answers
451 so the sender tries again; a recipient outside our domains gets 550 (we
are no open relay); aiosmtpd itself answers 552 above the size limit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import SMTP

from channels.email import receive
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
        self.clock = clock
        self.domains = frozenset(domain.lower() for domain in domains)
        self.hostname = hostname
        self.on_accepted = on_accepted
        self.source = source
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

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
        raw = self._with_received(session, envelope.original_content)
        sender = envelope.mail_from
        recipients = list(envelope.rcpt_tos)

        self.in_flight += 1
        self.idle.clear()
        try:
            outcome = await self.run_in_store(
                lambda: receive(
                    self.intake,
                    raw,
                    source=self.source,
                    envelope_sender=sender,
                    envelope_recipients=recipients,
                )
            )
        except StoreUnavailable as exc:
            log.error("smtp: store unavailable, answered 451: %s", exc)
            return "451 4.3.0 Temporary storage failure, please try again later"
        except Exception:
            log.exception("smtp: message not stored, answered 451")
            return "451 4.3.0 Temporary failure, please try again later"
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

        self.on_accepted(outcome)
        return f"250 2.0.0 Ok: {_describe(outcome)}"

    def _with_received(self, session: Any, content: bytes) -> bytes:
        """Prepend a Received trace field, as every MTA must (RFC 5321 §4.4)."""
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        helo = session.host_name or "unknown"
        stamp = format_datetime(self.clock.now())
        line = (
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self.hostname} (Intake) with ESMTP; {stamp}\r\n"
        )

        return line.encode("ascii", "replace") + content


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
) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return LenientSMTP(
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
