"""Raw email bytes to an outcome: parse, then accept or quarantine.

Shared by every email channel (SMTP, IMAP, file import, quarantine retry).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from channels.mime import content_hash, parse_email
from intake.accept import Intake, Outcome
from intake.errors import StoreUnavailable, Unparseable

log = logging.getLogger(__name__)


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
    """Store ``raw`` one way or another; raises StoreUnavailable only.

    A message that cannot be parsed, or whose processing fails for any
    reason but the store, is quarantined with the reason: it is never
    dropped and never blocks the messages behind it.
    """
    digest = content_hash(raw)
    try:
        inbound = parse_email(
            raw,
            envelope_sender=envelope_sender,
            envelope_recipients=envelope_recipients,
        )
    except Unparseable as exc:
        return intake.quarantine(
            raw, exc.reason, digest=digest, source=source, source_key=source_key
        )

    try:
        return intake.accept(
            inbound,
            digest=digest,
            source=source,
            source_key=source_key,
            acknowledge=acknowledge,
        )
    except StoreUnavailable:
        raise
    except Exception as exc:  # a bug must cost a quarantine entry, not a message
        log.exception("processing failed source=%s key=%s", source, source_key)
        reason = f"processing failed: {type(exc).__name__}: {exc}"
        return intake.quarantine(
            raw, reason, digest=digest, source=source, source_key=source_key
        )
