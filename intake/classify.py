"""Who wrote a message: a person, or a machine we must never answer.

Pure functions of an ``Inbound``. ``classify`` decides the kind before
threading; machine mail is recorded on its ticket but never acknowledged and
never reopens anything. The first rule that matches wins, most specific
first: our own mail coming back, bounces, auto-replies, then bulk mail.

The rules are the union of the standard markers (RFC 3834 Auto-Submitted,
RFC 3464 delivery reports, RFC 2919/2369 list headers, the null
reverse-path) and the common non-standard ones (X-Autoreply, X-Autorespond,
Precedence, mailer-daemon and postmaster senders, our own loop header and
Message-ID domain). ``X-Auto-Response-Suppress`` is not among them: it asks
us not to answer (``wants_no_reply``), it does not make a message machine
mail.

``delivery_failures`` reads what a delivery report says about each
recipient, so the message path can mark the message it is about as failed.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from email.parser import BytesHeaderParser

from intake.domain import Inbound, Kind

__all__ = ["DeliveryFailure", "classify", "delivery_failures", "wants_no_reply"]

# RFC 3464 / RFC 6522: multipart/report about delivery.
_DELIVERY_REPORT = re.compile(
    r"^\s*multipart/report\s*;.*report-type\s*=\s*\"?(global-)?delivery-status",
    re.IGNORECASE | re.DOTALL,
)
# RFC 8098: a read receipt is sent by software, not typed by a person.
_READ_RECEIPT = re.compile(
    r"^\s*multipart/report\s*;.*report-type\s*=\s*\"?disposition-notification",
    re.IGNORECASE | re.DOTALL,
)
# Last resort: the prefixes out-of-office responders put on the subject
# (English, German, French, Spanish, Dutch).
_AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto[- ]?re(ply|sponse)"
    r"|automatische antwort|abwesenheitsnotiz|r[ée]ponse automatique"
    r"|respuesta autom[áa]tica|automatisch antwoord)\b",
    re.IGNORECASE,
)
_BOUNCE_SENDERS = frozenset({"mailer-daemon", "postmaster"})
_NO_REPLY_SENDERS = frozenset({"noreply", "donotreply"})
_TRUE_VALUES = frozenset({"yes", "true", "1", "on"})
_SUPPRESS_REPLY = frozenset({"all", "autoreply", "oof", "dr"})


def classify(
    inbound: Inbound,
    *,
    own_addresses: Collection[str],
    own_domains: Collection[str],
    loop_header: str = "X-Intake-Loop",
) -> Kind:
    """The kind of sender behind ``inbound``; ``Kind.HUMAN`` unless proven."""
    if _is_loop(inbound, own_addresses, own_domains, loop_header):
        return Kind.LOOP
    if _is_bounce(inbound):
        return Kind.BOUNCE
    if _is_auto_reply(inbound):
        return Kind.AUTO_REPLY
    if _is_bulk(inbound):
        return Kind.BULK

    return Kind.HUMAN


def wants_no_reply(inbound: Inbound) -> bool:
    """Whether the sender asks not to be answered automatically.

    ``X-Auto-Response-Suppress`` (Microsoft) is a request about our replies;
    it does not make the message itself machine mail.
    """
    values = inbound.header_all("x-auto-response-suppress")
    tokens = {token.lower() for value in values for token in _tokens(value)}
    return not tokens.isdisjoint(_SUPPRESS_REPLY)


# --- the rules ------------------------------------------------------------


def _is_loop(
    inbound: Inbound,
    own_addresses: Collection[str],
    own_domains: Collection[str],
    loop_header: str,
) -> bool:
    """Our own mail coming back: our loop header, our address, our ids."""
    if inbound.header(loop_header) is not None:
        return True
    own = {address.lower() for address in own_addresses}
    if _own_address(_sender_email(inbound), own):
        return True
    # X-Loop (procmail, many helpdesks) naming one of our addresses.
    for value in inbound.header_all("x-loop"):
        if any(
            _own_address(token.strip("<>").lower(), own) for token in _tokens(value)
        ):
            return True

    # RFC 5322 §3.6.4: the right-hand side of our Message-IDs is our domain.
    id_domain = (inbound.message_id or "").rpartition("@")[2].strip("[]").lower()
    return bool(id_domain) and id_domain in {d.lower() for d in own_domains}


def _is_bounce(inbound: Inbound) -> bool:
    """A delivery report (RFC 3464), or mail from a mail system."""
    if inbound.report_is_delivery_status:
        return True
    content_type = inbound.header("content-type") or ""
    if _DELIVERY_REPORT.match(content_type):
        return True
    # Exim names the failed addresses here instead of sending a report.
    if inbound.header("x-failed-recipients") is not None:
        return True
    return_path = (inbound.header("return-path") or "").strip().strip("<>")
    if _local_part(return_path) in _BOUNCE_SENDERS:
        return True

    return _local_part(_sender_email(inbound)) in _BOUNCE_SENDERS


def _is_auto_reply(inbound: Inbound) -> bool:
    """RFC 3834 responders, the common non-standard markers, read receipts."""
    # RFC 3834 §5: any value but "no" marks automatic mail; parameters after
    # ";" do not change that.
    auto_submitted = inbound.header("auto-submitted")
    if auto_submitted is not None and _first_word(auto_submitted) != "no":
        return True
    if _has_auto_reply_marker(inbound):
        return True
    if _READ_RECEIPT.match(inbound.header("content-type") or ""):
        return True
    # RFC 5321 §4.5.5: automatic mail goes out with a null reverse-path,
    # and RFC 3834 §2 forbids answering one.
    if _is_null_path(inbound.header("return-path")):
        return True
    if _is_null_path(inbound.envelope_sender):
        return True

    return bool(_AUTO_REPLY_SUBJECT.match(inbound.subject))


def _has_auto_reply_marker(inbound: Inbound) -> bool:
    """Headers that Gmail, Exchange, qmail and friends put on auto-replies."""
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder"):
        value = inbound.header(name)
        if value is not None and _first_word(value) not in {"no", "false", "0"}:
            return True
    if inbound.header("x-autoreply-from") is not None:
        return True
    if inbound.header("x-mail-autoreply") is not None:
        return True
    if _first_word(inbound.header("x-autogenerated") or "") == "reply":
        return True
    machine = _first_word(inbound.header("x-fc-machinegenerated") or "")
    if machine in _TRUE_VALUES:
        return True
    if "auto_reply" in _precedences(inbound):
        return True

    # qmail's autoresponder delivers to this pseudo-address.
    delivered_to = inbound.header_all("delivered-to")
    return any(value.strip().lower() == "autoresponder" for value in delivered_to)


def _is_bulk(inbound: Inbound) -> bool:
    """Mailing lists (RFC 2919, RFC 2369), bulk senders, no-reply senders."""
    for name in ("list-id", "list-unsubscribe", "feedback-id"):
        if inbound.header(name) is not None:
            return True
    # RFC 2076 discourages Precedence, but bulk senders still set it.
    if not _precedences(inbound).isdisjoint({"bulk", "junk", "list"}):
        return True

    local = _local_part(_sender_email(inbound))
    squeezed = local.replace("-", "").replace("_", "").replace(".", "")
    return squeezed in _NO_REPLY_SENDERS or local.endswith("-request")


# --- delivery reports -----------------------------------------------------


_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_BLOCK_END = re.compile(rb"\r?\n[ \t]*\r?\n")
_STATUS_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """A recipient a delivery report says could not be reached.

    ``permanent`` for a 5.x.x status (RFC 3463): trying again cannot help,
    so nothing more may be sent to the address until a person clears it.
    """

    recipient: str
    status: str
    permanent: bool


def delivery_failures(inbound: Inbound) -> list[DeliveryFailure]:
    """The failed recipients a bounce names, from its RFC 3464 report, or
    from Exim's X-Failed-Recipients when it sent no report."""
    found: list[DeliveryFailure] = []
    for attachment in inbound.attachments:
        if attachment.content_type in _STATUS_TYPES:
            found += _failed_blocks(attachment.content)
    if found:
        return found

    # Exim lists the addresses that failed for good, with no report.
    failed = ",".join(inbound.header_all("x-failed-recipients"))
    return [
        DeliveryFailure(address.strip().strip("<>").lower(), "5.0.0", True)
        for address in failed.split(",")
        if "@" in address
    ]


def _failed_blocks(content: bytes) -> list[DeliveryFailure]:
    """RFC 3464 §2.3: each block after the per-message one is a recipient,
    with Final-Recipient, Action and Status; only "failed" ones count."""
    found = []
    parser = BytesHeaderParser()
    for block in _BLOCK_END.split(content.strip()):
        fields = parser.parsebytes(block.strip() + b"\n")
        action = str(fields.get("action", "")).strip().lower()
        recipient = str(
            fields.get("final-recipient") or fields.get("original-recipient") or ""
        )
        if action != "failed" or not recipient:
            continue
        # "rfc822; user@example.com": the address type, then the address.
        address = recipient.partition(";")[2] or recipient
        code = _STATUS_CODE.search(str(fields.get("status", "")))
        status = code[0] if code else "5.0.0"
        found.append(
            DeliveryFailure(
                address.strip().strip("<>").lower(), status, status.startswith("5")
            )
        )

    return found


# --- small readers --------------------------------------------------------


def _sender_email(inbound: Inbound) -> str:
    return inbound.sender.email.lower() if inbound.sender else ""


def _own_address(email: str, own: set[str]) -> bool:
    """One of ``own``, or a "+" variant of one (our per-ticket addresses)."""
    if not email:
        return False
    if email in own:
        return True
    local, at, domain = email.rpartition("@")
    base = local.partition("+")[0]
    return bool(at) and "+" in local and f"{base}@{domain}" in own


def _local_part(email: str) -> str:
    """The part before the last ``@``; all of it when there is none."""
    local, at, _ = email.lower().rpartition("@")
    return local if at else email.lower()


def _precedences(inbound: Inbound) -> set[str]:
    values = inbound.header_all("precedence") + inbound.header_all("x-precedence")
    return {_first_word(value) for value in values}


def _first_word(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _is_null_path(value: str | None) -> bool:
    return value is not None and value.strip() in ("", "<>")


def _tokens(value: str) -> list[str]:
    return [token for token in re.split(r"[\s,;]+", value) if token]
