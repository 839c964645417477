"""Builders for the agent, machine-mail, flood and relay tests: settings with
agents and an owner, agents' replies to notifications, a look at what sits
in the outbox, and a real SMTP relay on loopback that can be made to fail."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select
from sqlalchemy.orm import undefer

from channels.email import receive
from intake.accept import Outcome
from intake.config import Settings, load_settings
from intake.daemon import Parts
from store.models import Message, Outbox, Ticket
from tests.conftest import free_port, write_config

SECRET = "test-reply-secret-0123456789abcdef"  # noqa: S105 (a test value)
OWNER = "owner@example.com"
AGENTS = (
    ("Bob Agent", "bob@example.com"),
    ("Carol Agent", "carol@example.com"),
)
BOB = "bob@example.com"
CAROL = "carol@example.com"


def agent_config(
    directory: Path,
    *,
    agents: tuple[tuple[str, str], ...] = AGENTS,
    owner: str = OWNER,
    **sections: dict[str, Any],
) -> Path:
    """``write_config`` with ``[[agents]]``, ``owner_email`` and a reply
    secret."""
    sections = {name: dict(values) for name, values in sections.items()}
    sections.setdefault("smtp", {"domains": ["example.com"]})
    sections.setdefault("tickets", {}).setdefault("reply_secret", SECRET)
    relay = sections.get("outbound", {}).pop("relay", None)
    path = write_config(directory, **sections)
    lines = path.read_text().splitlines()
    if owner:
        lines.insert(1, f'owner_email = "{owner}"')
    if relay is not None:
        lines.append("[outbound.relay]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in relay.items()]
    for name, email in agents:
        lines += ["[[agents]]", f'name = "{name}"', f'email = "{email}"']
    path.write_text("\n".join(lines) + "\n")

    return path


def _toml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def agent_settings(directory: Path, *, owner: str = OWNER, **sections: Any) -> Settings:
    return load_settings(agent_config(directory, owner=owner, **sections), environ={})


def deliver(parts: Parts, raw: bytes, **kwargs: Any) -> Outcome:
    return receive(parts.intake, raw, source="test", **kwargs)


def outgoing(parts: Parts, kind: str | None = None) -> list[Message]:
    """Outbound messages, oldest first, with their raw bytes loaded."""
    with parts.intake.session_factory() as session:
        query = (
            select(Message)
            .options(undefer(Message.raw))
            .where(Message.direction == "out")
            .order_by(Message.id)
        )
        if kind is not None:
            query = query.where(Message.kind == kind)
        found = list(session.scalars(query))
        session.expunge_all()
        return found


def parsed(message: Message) -> EmailMessage:
    mail = message_from_bytes(message.raw, policy=policy.default)
    assert isinstance(mail, EmailMessage)
    return mail


def body(message: Message) -> str:
    part = parsed(message).get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def ticket(parts: Parts, number: int) -> Ticket:
    with parts.intake.session_factory() as session:
        found = session.scalars(select(Ticket).where(Ticket.number == number)).one()
        session.expunge(found)
        return found


def outbox_rows(parts: Parts) -> list[Outbox]:
    with parts.intake.session_factory() as session:
        found = list(session.scalars(select(Outbox).order_by(Outbox.id)))
        session.expunge_all()
        return found


def reply_to(
    notification: EmailMessage,
    text: str,
    *,
    sender: str = f"Bob Agent <{BOB}>",
    keep_headers: bool = True,
    to: str | None = None,
) -> bytes:
    """An agent's Gmail-style reply to a notification: their text on top,
    the notification quoted under "On ... wrote:". Without ``keep_headers``
    the reply names no parent, as some phone clients send it."""
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to or str(notification["Reply-To"])
    mail["Subject"] = f"Re: {notification['Subject']}"
    mail["Message-ID"] = make_msgid(domain="agent.example")
    if keep_headers:
        mail["In-Reply-To"] = notification["Message-ID"]
        mail["References"] = notification["Message-ID"]
    original = notification.get_body(("plain",))
    assert original is not None
    quoted = "\n".join(f"> {line}" for line in str(original.get_content()).splitlines())
    mail.set_content(
        f"{text}\n\nOn Mon, Mar 2, 2026 at 9:00 AM Support "
        f"<{notification['Reply-To'].addresses[0].addr_spec}> wrote:\n\n{quoted}\n"
    )
    return mail.as_bytes()


# -- a relay on loopback ---------------------------------------------------------


@dataclass
class Received:
    envelope_from: str
    recipients: list[str]
    raw: bytes

    @property
    def mail(self) -> EmailMessage:
        parsed = message_from_bytes(self.raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class RelayHandler:
    """Takes mail like a relay; ``fail`` makes it answer with that reply to
    every DATA instead, e.g. "451 4.3.0 try later" or "550 5.1.1 no such
    user"."""

    received: list[Received] = field(default_factory=list)
    fail: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        if self.fail is not None:
            return self.fail
        content = envelope.original_content or b""
        with self.lock:
            self.received.append(
                Received(
                    str(envelope.mail_from), list(envelope.rcpt_tos), bytes(content)
                )
            )
        return "250 2.0.0 queued"


class FakeRelay:
    """aiosmtpd's threaded Controller on a free loopback port; ``down()``
    stops it so connections are refused, ``up()`` starts it again on the
    same port."""

    def __init__(self) -> None:
        self.handler = RelayHandler()
        self.port = free_port()
        self._controller: Controller | None = None

    def up(self) -> None:
        self._controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10
        )
        self._controller.start()

    def down(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0
    ) -> list[Received]:
        """The mail received once ``predicate`` holds; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received
            if predicate(found):
                return found
            time.sleep(0.05)
        raise AssertionError(f"relay: condition not met; got {len(self.received)}")


def relay_section(relay: FakeRelay) -> dict[str, Any]:
    return {
        "relay": {"host": "127.0.0.1", "port": relay.port, "tls": "none"},
        "poll_seconds": 0.2,
        "retry_base_seconds": 1,
    }


def started_relay() -> Iterator[FakeRelay]:
    relay = FakeRelay()
    relay.up()
    try:
        yield relay
    finally:
        relay.down()
