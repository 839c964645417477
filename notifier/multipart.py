"""Emails with a plain-text part, an optional HTML alternative, Cc and Bcc.

The digest, the check-in, overdue reminders and resolution notes need more
than one recipient or an HTML part; they carry the same machine markers as
every other mail we send (``notifier.compose``).
"""

from __future__ import annotations

from collections.abc import Sequence
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from intake.accept import OutgoingEmail
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address
from notifier.compose import LOOP_HEADER, SMTP_UNFOLDED


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

    mail = EmailMessage(policy=SMTP_UNFOLDED.clone(utf8=wide))
    mail["From"] = HeaderAddress(settings.outbound.from_name, addr_spec=from_address)
    mail["To"] = _addresses(to, wide)
    if cc:
        mail["Cc"] = _addresses(cc, wide)
    mail["Subject"] = " ".join(subject.split())[:250]
    mail["Date"] = format_datetime(clock.now())
    mail["Message-ID"] = message_id
    if in_reply_to:
        mail["In-Reply-To"] = f"<{in_reply_to}>"
        chain = [*references[-10:], in_reply_to]
        mail["References"] = " ".join(f"<{ref}>" for ref in chain)
    # RFC 3834 §5: we are a machine; Exchange honours the second header.
    mail["Auto-Submitted"] = auto_submitted
    mail["X-Auto-Response-Suppress"] = "All"
    mail[LOOP_HEADER] = from_address
    if ticket_number is not None:
        mail["X-Intake-Ticket"] = str(ticket_number)
    mail.set_content(text)
    if html is not None:
        mail.add_alternative(html, subtype="html")

    recipients = list(dict.fromkeys([*everyone, *bcc]))
    return OutgoingEmail(
        raw=mail.as_bytes(),
        message_id=message_id.strip("<>"),
        envelope_from=from_address,
        recipients=recipients,
        subject=subject,
        text=text,
    )


def _addresses(addresses: Sequence[Address], wide: bool) -> str:
    if not wide:
        return ", ".join(
            str(HeaderAddress(_one_line(a.name), addr_spec=a.email)) for a in addresses
        )
    # headerregistry.Address refuses a non-ASCII local part, though RFC 6532
    # allows it; the string form parses under utf8=True.
    shown = []
    for address in addresses:
        name = _one_line(address.name).replace("\\", "\\\\").replace('"', '\\"')
        shown.append(f'"{name}" <{address.email}>' if name else address.email)

    return ", ".join(shown)


def _one_line(value: str) -> str:
    """Customer text must never start a header of its own."""
    return " ".join(value.split())
