"""Raw email bytes to outcomes: parse, then accept or quarantine.

Shared by every email channel (SMTP, IMAP, file import, quarantine retry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from channels.mime import content_hash, parse_email
from intake.accept import Arrival, Intake, Outcome
from intake.errors import Unparseable


@dataclass(frozen=True, slots=True)
class RawEmail:
    """Raw bytes as a channel received them, with where they came from."""

    raw: bytes
    source: str
    source_key: str | None = None
    envelope_sender: str | None = None
    envelope_recipients: Sequence[str] = field(default_factory=tuple)
    acknowledge: bool = True
    # Trace fields we add (SMTP's Received): stored in front of the raw
    # bytes, but not parsed, so the same bytes give the same outcome
    # whichever channel carried them.
    trace: bytes = b""


def arrival(email: RawEmail) -> Arrival:
    """Parse ``email``; what cannot be parsed is marked for the quarantine.

    Pure: no store access, so it runs outside the transaction.
    """
    raw = email.trace + email.raw
    digest = content_hash(email.raw)  # as sent: an mbox "From " line leads
    try:
        inbound = parse_email(
            email.raw,
            envelope_sender=email.envelope_sender,
            envelope_recipients=email.envelope_recipients,
        )
    except Unparseable as exc:
        reason = exc.reason
        return Arrival(raw, digest, email.source, email.source_key, None, reason)
    inbound.raw = raw

    return Arrival(
        raw,
        digest,
        email.source,
        email.source_key,
        inbound,
        acknowledge=email.acknowledge,
    )


def receive_many(intake: Intake, emails: Sequence[RawEmail]) -> list[Outcome]:
    """Store every message, in one transaction; raises StoreUnavailable only.

    A message that cannot be parsed, or whose processing fails for any
    reason but the store, is quarantined with the reason: it is never
    dropped and never blocks the messages beside it.
    """
    return intake.accept_batch([arrival(email) for email in emails])


def receive(
    intake: Intake,
    raw: bytes,
    *,
    source: str,
    source_key: str | None = None,
    envelope_sender: str | None = None,
    envelope_recipients: Sequence[str] = (),
    acknowledge: bool = True,
) -> Outcome:
    """One message; see ``receive_many``."""
    email = RawEmail(
        raw, source, source_key, envelope_sender, envelope_recipients, acknowledge
    )
    return receive_many(intake, [email])[0]
