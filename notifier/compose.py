"""Rendering what we send: headers that thread, mark us as a machine, and
never invite a machine to answer."""

from __future__ import annotations

from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

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

        # RFC 6532: an address outside ASCII can only travel as raw UTF-8.
        wide = not (to.email.isascii() and self.from_address.isascii())
        mail = EmailMessage(
            policy=SMTP_UNFOLDED.clone(utf8=True) if wide else SMTP_UNFOLDED
        )
        mail["From"] = HeaderAddress(
            self.settings.outbound.from_name, addr_spec=self.from_address
        )
        if wide:
            # headerregistry.Address refuses a non-ASCII local part, though
            # RFC 6532 allows it; the string form parses under utf8=True.
            name = to.name.replace("\\", "\\\\").replace('"', '\\"')
            mail["To"] = f'"{name}" <{to.email}>' if name else to.email
        else:
            mail["To"] = HeaderAddress(to.name, addr_spec=to.email)
        mail["Subject"] = subject[:250]
        mail["Date"] = format_datetime(self.clock.now())
        mail["Message-ID"] = message_id
        if parents is not None and parents.message_id:
            parent = f"<{parents.message_id}>"
            mail["In-Reply-To"] = parent
            chain = [f"<{ref}>" for ref in parents.references[-10:]]
            mail["References"] = " ".join([*chain, parent])
        # RFC 3834 §5: we are a machine; Exchange honours the second header.
        mail["Auto-Submitted"] = auto_submitted
        mail["X-Auto-Response-Suppress"] = "All"
        mail[LOOP_HEADER] = self.from_address
        if ticket_number is not None:
            mail["X-Intake-Ticket"] = str(ticket_number)
        mail.set_content(text)

        return OutgoingEmail(
            raw=mail.as_bytes(),
            message_id=message_id.strip("<>"),
            envelope_from=self.from_address,
            recipients=[to.email],
            subject=subject,
            text=text,
        )


def _without_token(subject: str, token: str) -> str:
    return " ".join(subject.replace(token, " ").split()) or "(no subject)"
