"""LMTP mode: the listener behind Postfix or another MTA (RFC 2033).

LMTP differs from SMTP where it matters to a sender: the greeting is LHLO,
and after the final dot the server answers once per accepted recipient, in
the order of the RCPT commands (RFC 2033 4.2), so the MTA knows which
deliveries to retry. aiosmtpd's ``LMTP`` class handles LHLO but answers only
once after DATA; here the DATA reply is built per recipient. aiosmtpd writes
the handler's reply followed by CRLF exactly as given, so a reply of N lines
joined by CRLF reaches the client as N replies.

Intake stores a message once whatever the number of our addresses it was
sent to (one message, one ticket), so every recipient gets the outcome of
that one transaction: 250 when it committed, 451 when it did not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from channels.smtp import DrainingSMTP, SmtpHandler

REPLY = re.compile(r"^(?P<code>[2-5]\d\d)(?: (?P<enhanced>[2-5]\.\d{1,3}\.\d{1,3}))?")


class DrainingLMTP(DrainingSMTP, LMTP):
    """LHLO instead of HELO/EHLO, with the same 421 on shutdown."""

    async def smtp_LHLO(self, arg: str) -> None:
        await self._guarded(super().smtp_LHLO, arg)


class LmtpHandler(SmtpHandler):
    """The SMTP handler with one DATA reply per recipient."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("source", "lmtp")
        super().__init__(*args, **kwargs)
        self.protocol = "LMTP"  # the Received field's "with" (RFC 3848)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        status = await super().handle_DATA(server, session, envelope)

        return "\r\n".join(per_recipient(status, envelope.rcpt_tos))


def per_recipient(status: str, recipients: Sequence[str]) -> list[str]:
    """One reply line per recipient, each naming its recipient.

    ``status`` is a single SMTP reply such as ``250 2.0.0 Ok: created ticket
    5``; the code and enhanced code are kept, the text gains the recipient.
    """
    found = REPLY.match(status)
    if found is None:
        raise ValueError(f"not an SMTP reply: {status!r}")
    code = found["code"]
    enhanced = found["enhanced"] or f"{code[0]}.0.0"
    text = status[found.end() :].strip()

    return [
        f"{code} {enhanced} <{recipient.strip('<>')}> {text}".rstrip()
        for recipient in recipients
    ]
