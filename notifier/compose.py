"""Rendering what we send: headers that thread, mark us as a machine, and
never invite a machine to answer."""

from __future__ import annotations

import quopri
from email import policy
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid

from jinja2 import Environment, PackageLoader, StrictUndefined

from intake.accept import OutgoingEmail
from intake.clock import Clock
from intake.config import Settings
from intake.domain import Address, Inbound

LOOP_HEADER = "X-Intake-Loop"

# Fold only at RFC 5322's hard limit: Python 3.11 may fold long References
# into RFC 2047 words, which Outlook then ignores and threading breaks.
SMTP_UNFOLDED = policy.SMTP.clone(max_line_length=998)

_templates = Environment(
    loader=PackageLoader("notifier", "templates"),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # noqa: S701 (plain-text templates; HTML ones escape)
)


def ticket_token(prefix: str, number: int) -> str:
    return f"[{prefix}{number}]"


class EmailComposer:
    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.from_address = settings.support_address

    def acknowledgement(
        self, *, ticket_number: int, subject: str, to: Address, inbound: Inbound
    ) -> OutgoingEmail:
        token = ticket_token(self.settings.tickets.subject_prefix, ticket_number)
        shown = subject.strip() or "(no subject)"
        text = _templates.get_template("acknowledgement.txt").render(
            name=to.name,
            token=token,
            subject=shown,
            signature=self.settings.outbound.from_name,
        )

        return self.build(
            to=to,
            subject=f"Re: {_without_token(shown, token)} {token}",
            text=text,
            parents=inbound,
            auto_submitted="auto-replied",
            ticket_number=ticket_number,
        )

    def build(
        self,
        *,
        to: Address,
        subject: str,
        text: str,
        parents: Inbound | None,
        auto_submitted: str,
        ticket_number: int | None,
    ) -> OutgoingEmail:
        message_id = make_msgid(domain=self.settings.message_id_domain)

        headers: list[HeaderField] = [
            ("From", (self.settings.outbound.from_name, self.from_address)),
            ("To", (to.name, to.email)),
            ("Subject", subject[:250]),
            ("Date", format_datetime(self.clock.now())),
            ("Message-ID", message_id),
        ]
        if parents is not None and parents.message_id:
            parent = f"<{parents.message_id}>"
            chain = [f"<{ref}>" for ref in parents.references[-10:]]
            headers += [
                ("In-Reply-To", parent),
                ("References", " ".join([*chain, parent])),
            ]
        # RFC 3834 §5: we are a machine; Exchange honours the second header.
        headers += [
            ("Auto-Submitted", auto_submitted),
            ("X-Auto-Response-Suppress", "All"),
            (LOOP_HEADER, self.from_address),
        ]
        if ticket_number is not None:
            headers.append(("X-Intake-Ticket", str(ticket_number)))

        # RFC 6532: an address outside ASCII can only travel as raw UTF-8.
        wide = not (to.email.isascii() and self.from_address.isascii())
        raw = _utf8_message(headers, text) if wide else _ascii_message(headers, text)

        return OutgoingEmail(
            raw=raw,
            message_id=message_id.strip("<>"),
            envelope_from=self.from_address,
            recipients=[to.email],
            subject=subject,
            text=text,
        )


HeaderField = tuple[str, "str | tuple[str, str]"]


def _ascii_message(headers: list[HeaderField], text: str) -> bytes:
    """Serialise by hand: the stdlib's generators cost milliseconds a mail.

    Every value is made single-line first (customer text must never inject
    a header), then display names and the subject go out as RFC 2047 words
    when they are not ASCII; the body as UTF-8 quoted-printable.
    """
    lines = []
    for name, value in headers:
        if isinstance(value, tuple):
            display, address = _one_line(value[0]), _one_line(value[1])
            shown = formataddr((display, address), charset="utf-8")
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
        if isinstance(value, tuple):
            # headerregistry.Address refuses a non-ASCII local part, though
            # RFC 6532 allows it; the string form parses under utf8=True.
            display, address = value
            quoted = display.replace("\\", "\\\\").replace('"', '\\"')
            mail[name] = f'"{quoted}" <{address}>' if display else address
        else:
            mail[name] = value
    mail.set_content(text)

    return mail.as_bytes()


def _without_token(subject: str, token: str) -> str:
    return " ".join(subject.replace(token, " ").split()) or "(no subject)"
