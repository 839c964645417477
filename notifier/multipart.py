"""Emails with a plain-text part, an optional HTML alternative, Cc and Bcc.

The digest, the check-in, overdue reminders and resolution notes need more
than ``notifier.compose`` builds: several recipients, a copy to the owner, an
HTML part. They carry the same machine markers as every other mail we send.

Serialised by hand, like ``notifier.compose``: the stdlib's generator takes
about a second for a digest of 10,000 tickets, one call per line.
"""

from __future__ import annotations

import binascii
import io
import secrets
from collections.abc import Sequence
from email.header import Header
from email.utils import format_datetime, formataddr, make_msgid

from intake.accept import OutgoingEmail
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address
from notifier.compose import trailing_headers

QP_SLICE = 1 << 20  # characters of a body encoded at a time


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
    headers += trailing_headers(
        in_reply_to=in_reply_to,
        references=references,
        auto_submitted=auto_submitted,
        from_address=from_address,
        ticket_number=ticket_number,
    )

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
    writes every ``=`` as ``=3D``). They are encoded a slice at a time into
    one buffer: a digest can be tens of megabytes.
    """
    out = io.BytesIO()
    head = [f"{name}: {value}" for name, value in headers]
    head.append("MIME-Version: 1.0")
    if html is None:
        _write_lines(out, [*head, *_part_headers("plain"), ""])
        _write_quoted_printable(out, text)
        return out.getvalue()

    boundary = f"=_{secrets.token_hex(16)}"
    head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    _write_lines(out, [*head, ""])
    for subtype, content in (("plain", text), ("html", html)):
        _write_lines(out, [f"--{boundary}", *_part_headers(subtype), ""])
        _write_quoted_printable(out, content)
    _write_lines(out, [f"--{boundary}--"])

    return out.getvalue()


def _part_headers(subtype: str) -> list[str]:
    return [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
    ]


def _write_lines(out: io.BytesIO, lines: list[str]) -> None:
    out.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))


def _write_quoted_printable(out: io.BytesIO, content: str) -> None:
    """``content`` as UTF-8 quoted-printable lines ending in CRLF.

    Quoted-printable encodes line by line, so slices cut at line ends encode
    the same as the whole. b2a_qp ends lines (soft breaks too) the way its
    input's first line ends, so each slice goes in with CRLF line ends.
    """
    plain = content.replace("\r\n", "\n").replace("\r", "\n")
    start = 0
    while start < len(plain):
        end = plain.find("\n", start + QP_SLICE)
        end = len(plain) if end == -1 else end + 1
        piece = plain[start:end].removesuffix("\n").replace("\n", "\r\n")
        out.write(binascii.b2a_qp(f"{piece}\r\n".encode(), istext=True))
        start = end


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
