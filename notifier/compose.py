"""Rendering what we send: headers that thread, mark us as a machine, and
never invite a machine to answer.

Every message carries ``Auto-Submitted`` (RFC 3834), our loop header, a
Message-ID from our own domain and a plain-text body; none has an HTML part,
so no customer text is ever interpreted as markup.
"""

from __future__ import annotations

import quopri
import re
import textwrap
from collections.abc import Sequence
from email import policy
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid

from jinja2 import Environment, PackageLoader, StrictUndefined

from intake.accept import OutgoingEmail, TicketView
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address, Inbound

LOOP_HEADER = "X-Intake-Loop"
# A notification shows this much of the customer's message.
NOTIFICATION_CHARS = 20_000

# Fold only at RFC 5322's hard limit: Python 3.11 may fold long References
# into RFC 2047 words, which Outlook then ignores and threading breaks.
SMTP_UNFOLDED = policy.SMTP.clone(max_line_length=998)

_templates = Environment(
    loader=PackageLoader("notifier", "templates"),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,  # noqa: S701 (plain-text templates; HTML ones escape)
)


def ticket_token(prefix: str, number: int) -> str:
    return f"[{prefix}{number}]"


class EmailComposer:
    """The mails the message path sends; see ``intake.accept.Composer``."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.from_address = settings.support_address

    def token(self, number: int) -> str:
        return ticket_token(self.settings.tickets.subject_prefix, number)

    def acknowledgement(
        self, *, ticket_number: int, subject: str, to: Address, inbound: Inbound
    ) -> OutgoingEmail:
        token = self.token(ticket_number)
        shown = subject.strip() or "(no subject)"
        text = _templates.get_template("acknowledgement.txt").render(
            name=to.name,
            token=token,
            subject=shown,
            signature=self.settings.outbound.from_name,
        )

        return self.build(
            to=[to],
            subject=f"Re: {_without_token(shown, token)} {token}",
            text=text,
            in_reply_to=inbound.message_id,
            references=inbound.references,
            auto_submitted="auto-replied",
            ticket_number=ticket_number,
        )

    def notification(
        self,
        *,
        to: Sequence[Address],
        ticket: TicketView,
        inbound: Inbound,
        reply_to: str,
    ) -> OutgoingEmail:
        """A new ticket or a customer's reply, for the agents; replying to it
        reaches the customer through ``reply_to``."""
        token = self.token(ticket.number)
        subject = _without_token(ticket.subject.strip() or "(no subject)", token)
        who = ticket.customer.name or ticket.customer.email
        headline = {
            "created": f"New ticket from {who}.",
            "reopened": f"{who} wrote on a resolved ticket; it is open again.",
        }.get(ticket.event, f"{who} replied.")
        body = inbound.text.strip() or "(no text; see the attachments in Intake)"
        text = _templates.get_template("notification.txt").render(
            headline=headline,
            token=token,
            number=ticket.number,
            subject=subject,
            status=ticket.status,
            priority=ticket.priority,
            assigned=(
                f"assigned to {ticket.assignee}"
                if ticket.assignee
                else "not assigned (every agent gets this)"
            ),
            customer=str(ticket.customer),
            customer_name=who,
            text=body[:NOTIFICATION_CHARS],
            cut=max(0, len(body) - NOTIFICATION_CHARS),
        )
        prefix = "New ticket" if ticket.event == "created" else "Re:"

        return self.build(
            to=to,
            subject=f"{prefix} {subject} {token}",
            text=text,
            auto_submitted="auto-generated",
            ticket_number=ticket.number,
            reply_to=(f"{self.settings.outbound.from_name} {token}", reply_to),
        )

    def agent_reply(
        self,
        *,
        ticket_number: int,
        subject: str,
        text: str,
        agent_name: str,
        to: Address,
        in_reply_to: str | None,
        references: Sequence[str],
    ) -> OutgoingEmail:
        """An agent's words, relayed to the customer from the support address
        and threaded on the customer's last message (RFC 5322 §3.6.4)."""
        token = self.token(ticket_number)
        shown = _without_token(subject.strip() or "(no subject)", token)
        signature = self.settings.outbound.from_name
        body = _templates.get_template("agent_reply.txt").render(
            text=text, agent=agent_name, signature=signature
        )

        return self.build(
            to=[to],
            subject=f"Re: {shown} {token}",
            text=body,
            in_reply_to=in_reply_to,
            references=references,
            # Sent by a person but relayed by a machine: responders keep quiet.
            auto_submitted="auto-generated",
            ticket_number=ticket_number,
            from_name=f"{agent_name} ({signature})" if agent_name else signature,
        )

    def notice(
        self,
        *,
        to: Address,
        explanation: str,
        problems: Sequence[str],
        inbound: Inbound,
        ticket_number: int | None,
    ) -> OutgoingEmail:
        """Tells the sender what was not understood or not done, and why."""
        subject = inbound.subject.strip() or "(no subject)"
        if ticket_number is not None:
            subject = f"{_without_token(subject, self.token(ticket_number))} "
            subject += self.token(ticket_number)
        text = _templates.get_template("notice.txt").render(
            name=to.name,
            explanation=_wrap(explanation),
            problems=problems,
            signature=f"Intake, for {self.settings.outbound.from_name}",
        )

        return self.build(
            to=[to],
            subject=f"Not done: {_without_re(subject)}",
            text=text,
            in_reply_to=inbound.message_id,
            references=inbound.references,
            auto_submitted="auto-replied",
            ticket_number=ticket_number,
        )

    def flood_warning(
        self,
        *,
        to: Address,
        what: str,
        limit: int,
        window_minutes: int,
        inbound: Inbound,
    ) -> OutgoingEmail:
        text = _templates.get_template("flood.txt").render(
            what=what,
            limit=limit,
            window=window_minutes,
            sender=str(inbound.sender) if inbound.sender else "(no sender)",
            subject=inbound.subject or "(no subject)",
        )

        return self.build(
            to=[to],
            subject=f"Intake: holding back mail from {what}",
            text=text,
            auto_submitted="auto-generated",
            ticket_number=None,
        )

    def build(
        self,
        *,
        to: Sequence[Address],
        subject: str,
        text: str,
        auto_submitted: str,
        ticket_number: int | None,
        in_reply_to: str | None = None,
        references: Sequence[str] = (),
        from_name: str | None = None,
        reply_to: tuple[str, str] | None = None,
    ) -> OutgoingEmail:
        """One message, its Message-ID made here so it is stored before any
        send and replies to it thread."""
        message_id = make_msgid(domain=self.settings.message_id_domain)
        sender = (
            from_name if from_name is not None else self.settings.outbound.from_name
        )

        headers: list[HeaderField] = [
            ("From", [(sender, self.from_address)]),
            ("To", [(address.name, address.email) for address in to]),
            ("Subject", subject[:250]),
            ("Date", format_datetime(self.clock.now())),
            ("Message-ID", message_id),
        ]
        if reply_to is not None:
            headers.append(("Reply-To", [reply_to]))
        headers += trailing_headers(
            in_reply_to=in_reply_to,
            references=references,
            auto_submitted=auto_submitted,
            from_address=self.from_address,
            ticket_number=ticket_number,
        )

        # RFC 6532: an address outside ASCII can only travel as raw UTF-8.
        emails = [self.from_address, *(address.email for address in to)]
        wide = not all(email.isascii() for email in emails)
        raw = _utf8_message(headers, text) if wide else _ascii_message(headers, text)

        return OutgoingEmail(
            raw=raw,
            message_id=message_id.strip("<>"),
            envelope_from=self.from_address,
            recipients=list(dict.fromkeys(address.email for address in to)),
            subject=subject,
            text=text,
        )


# A header: a text value, or a list of (display name, address) mailboxes.
HeaderField = tuple[str, "str | list[tuple[str, str]]"]


def trailing_headers(
    *,
    in_reply_to: str | None,
    references: Sequence[str],
    auto_submitted: str,
    from_address: str,
    ticket_number: int | None,
) -> list[tuple[str, str]]:
    """Threading and machine headers, the same on everything we send."""
    headers = []
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

    return headers


def _ascii_message(headers: list[HeaderField], text: str) -> bytes:
    """Serialise by hand: the stdlib's generators cost milliseconds a mail.

    Every value is made single-line first (customer text must never inject
    a header), then display names and the subject go out as RFC 2047 words
    when they are not ASCII; the body as UTF-8 quoted-printable.
    """
    lines = []
    for name, value in headers:
        if isinstance(value, list):
            shown = ", ".join(
                formataddr((_one_line(display), _one_line(address)), charset="utf-8")
                for display, address in value
            )
        else:
            text_value = _one_line(value)
            shown = text_value if text_value.isascii() else _encoded_word(text_value)
        lines.append(f"{name}: {shown}")
    lines += [
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: quoted-printable",
    ]
    body = quopri.encodestring(_newlines(text).encode("utf-8"))

    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head + body.replace(b"\n", b"\r\n")


def _one_line(value: str) -> str:
    return " ".join(value.splitlines())


def _encoded_word(value: str) -> str:
    return Header(value, "utf-8", maxlinelen=78).encode(linesep="\r\n")


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _utf8_message(headers: list[HeaderField], text: str) -> bytes:
    """The modern API, for addresses outside ASCII (RFC 6532)."""
    mail = EmailMessage(policy=SMTP_UNFOLDED.clone(utf8=True))
    for name, value in headers:
        if isinstance(value, list):
            # headerregistry.Address refuses a non-ASCII local part, though
            # RFC 6532 allows it; the string form parses under utf8=True.
            shown = []
            for display, address in value:
                quoted = _one_line(display).replace("\\", "\\\\").replace('"', '\\"')
                shown.append(f'"{quoted}" <{address}>' if display else address)
            mail[name] = ", ".join(shown)
        else:
            mail[name] = _one_line(value)
    mail.set_content(text)

    return mail.as_bytes()


def _without_token(subject: str, token: str) -> str:
    """``subject`` without any ticket token of ours, ``token`` says which.

    Every token goes, not only this ticket's: a stranger who quoted another
    ticket's token gets a new ticket, and its mail must carry only its own
    token, or their reply would be read against the old one.
    """
    prefix = token[1:-1].rstrip("0123456789")
    tokens = re.compile(r"\[" + re.escape(prefix) + r"\d+\]")
    return " ".join(tokens.sub(" ", subject).split()) or "(no subject)"


def _without_re(subject: str) -> str:
    while subject[:3].lower() in ("re:", "aw:", "sv:"):
        subject = subject[3:].lstrip()
    return subject


def _wrap(text: str) -> str:
    """Paragraphs filled to 76 columns; indented ones (commands) kept whole."""
    return "\n\n".join(
        part
        if part.startswith(" ")
        else textwrap.fill(part, width=76, break_long_words=False)
        for part in text.split("\n\n")
    )
