"""The domain's vocabulary: what every channel hands to ``accept()``.

Channels translate the outside world (an SMTP transaction, an IMAP fetch, a file)
into an ``Inbound``; nothing past this point knows which protocol carried it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Channel(enum.StrEnum):
    EMAIL = "email"
    SMS = "sms"
    CALL = "call"


class Kind(enum.StrEnum):
    """What sort of sender wrote a message, decided before threading."""

    HUMAN = "human"
    AUTO_REPLY = "auto-reply"
    BOUNCE = "bounce"
    LOOP = "loop"
    BULK = "bulk"

    @property
    def is_machine(self) -> bool:
        return self is not Kind.HUMAN


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox: a display name and an address, lower-cased domain."""

    name: str
    email: str

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.name else self.email


@dataclass(slots=True)
class Inbound:
    """A message from outside, parsed and decoded, raw bytes kept beside it.

    ``headers`` holds every header decoded to text, names lower-cased, in the
    order they appeared; repeated headers keep every value.
    """

    channel: Channel
    raw: bytes
    sender: Address | None
    subject: str
    text: str
    html: str | None = None
    message_id: str | None = None
    in_reply_to: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    date: datetime | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    # RFC 3464 reports: the Message-IDs and recipients the report is about.
    report_message_ids: list[str] = field(default_factory=list)
    report_is_delivery_status: bool = False
    envelope_sender: str | None = None
    envelope_recipients: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]
