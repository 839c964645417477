"""Emails with a plain-text part, an optional HTML alternative, Cc and Bcc.

The digest, the check-in, overdue reminders and resolution notes need more
than ``notifier.compose`` builds: several recipients, a copy to the owner, an
HTML part. They carry the same machine markers as every other mail we send.

Serialised by hand, like ``notifier.compose``: the stdlib's generator takes
about a second for a digest of 10,000 tickets, one call per line.
"""

from __future__ import annotations

import binascii
import secrets
from collections.abc import Sequence
from email.header import Header
from email.utils import format_datetime, formataddr, make_msgid

from intake.accept import OutgoingEmail
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address
from notifier.compose import LOOP_HEADER


def compose_email(
    settings: Settings,
    clock: Clock,
    *,
    to: Sequence[Address],
    subject: str,
    text: str,
    html: str | None = None,
    cc: Sequence[Address] = (),
    bcc: Sequence[str] = (),
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    auto_submitted: str = "auto-generated",
    ticket_number: int | None = None,
) -> OutgoingEmail:
    """A rendered email; Bcc recipients get it without a header naming them."""
    from_address = settings.support_address
    message_id = make_msgid(domain=settings.message_id_domain)
    everyone = [address.email for address in [*to, *cc]]
    # RFC 6532: an address outside ASCII can only travel as raw UTF-8.
    wide = not all(address.isascii() for address in [from_address, *everyone])

    headers = [
        (
            "From",
            _mailboxes([Address(settings.outbound.from_name, from_address)], wide),
        ),
        ("To", _mailboxes(to, wide)),
    ]
    if cc:
        headers.append(("Cc", _mailboxes(cc, wide)))
    headers += [
        ("Subject", _text(subject[:250], wide)),
        ("Date", format_datetime(clock.now())),
        ("Message-ID", message_id),
    ]
    if in_reply_to:
        chain = [ref for ref in references[-10:] if ref != in_reply_to]
        headers += [
            ("In-Reply-To", f"<{in_reply_to}>"),
            ("References", " ".join(f"<{ref}>" for ref in [*chain, in_reply_to])),
        ]
    # RFC 3834 §5: we are a machine; Exchange honours the second header.
    headers += [
        ("Auto-Submitted", auto_submitted),
        ("X-Auto-Response-Suppress", "All"),
        (LOOP_HEADER, from_address),
    ]
    if ticket_number is not None:
        headers.append(("X-Intake-Ticket", str(ticket_number)))

    return OutgoingEmail(
        raw=_serialise(headers, text, html),
        message_id=message_id.strip("<>"),
        envelope_from=from_address,
        recipients=list(dict.fromkeys([*everyone, *bcc])),
        subject=subject,
        text=text,
    )


def _serialise(headers: list[tuple[str, str]], text: str, html: str | None) -> bytes:
    """The message: headers, then one text part or a multipart/alternative.

    Bodies are UTF-8 quoted-printable, so no line is too long for SMTP and a
    boundary starting with ``=_`` can never occur in them (quoted-printable
    writes every ``=`` as ``=3D``).
    """
    head = [f"{name}: {value}" for name, value in headers]
    head.append("MIME-Version: 1.0")
    if html is None:
        head += _part_headers("plain")
        return _lines(head) + b"\r\n" + _quoted_printable(text)

    boundary = f"=_{secrets.token_hex(16)}"
    head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    parts = [
        _lines([f"--{boundary}", *_part_headers(subtype)])
        + b"\r\n"
        + _quoted_printable(content)
        + b"\r\n"
        for subtype, content in (("plain", text), ("html", html))
    ]

    return b"".join([_lines(head), b"\r\n", *parts, f"--{boundary}--\r\n".encode()])


def _part_headers(subtype: str) -> list[str]:
    return [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
    ]


def _lines(lines: list[str]) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8")


def _quoted_printable(content: str) -> bytes:
    plain = content.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    encoded = binascii.b2a_qp(plain, istext=True)

    return encoded.replace(b"\n", b"\r\n")


def _text(value: str, wide: bool) -> str:
    """A header's text on one line: raw UTF-8 when the message is (RFC 6532),
    else RFC 2047 encoded words when it is not ASCII."""
    shown = _one_line(value)
    if wide or shown.isascii():
        return shown
    return Header(shown, "utf-8", maxlinelen=78).encode(linesep="\r\n")


def _mailboxes(addresses: Sequence[Address], wide: bool) -> str:
    """``Name <address>`` pairs, one per folded line past the first."""
    shown = []
    for address in addresses:
        name = _one_line(address.name)
        if not wide:
            shown.append(formataddr((name, address.email), charset="utf-8"))
            continue
        # formataddr refuses a non-ASCII local part, though RFC 6532 allows it.
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        shown.append(f'"{quoted}" <{address.email}>' if name else address.email)

    return ",\r\n ".join(shown)


def _one_line(value: str) -> str:
    """Customer text must never start a header of its own."""
    return " ".join(value.split())
