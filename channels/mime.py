"""Raw RFC 5322 bytes to an ``Inbound``: pure, tolerant, never crashing.

Header blocks are split, MIME entities cut at their boundary lines and
parameters read (RFC 2045, RFC 2046, RFC 2231) by the small parser below,
working on bytes. A whole ``parse_email`` costs about what the standard
library's compat32 parse alone costs, a tenth of ``policy.default``; it
keeps every part's bytes exact and cannot raise on an odd header the way
``policy.default`` does lazily. Headers and bodies are decoded with one
charset fallback chain: the declared charset, then UTF-8, then
windows-1252. Problems found on the way become short sentences in
``Inbound.defects``; only input that cannot be mail at all raises
``Unparseable``.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import hashlib
import html
import mimetypes
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

import html2text

from intake.domain import Address, Attachment, Channel, Inbound
from intake.errors import Unparseable

__all__ = [
    "DeliveryStatus",
    "content_hash",
    "extract_message_ids",
    "parse_delivery_status",
    "parse_email",
]

# Outlook's .msg files are OLE2 compound documents, recognisable by this magic.
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

# A header field: printable ASCII name, colon, value. RFC 5322 §4.5
# (obsolete syntax) allows white space between the name and the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:(.*)", re.DOTALL)

# Headers one of which any real message carries; a file with none of them
# (a YAML file, a "Note: ..." text) is not mail.
_USABLE_HEADERS = frozenset(
    {
        "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date",
        "message-id", "in-reply-to", "references", "received", "return-path",
        "delivered-to", "mime-version", "content-type",
        "content-transfer-encoding",
    }
)  # fmt: skip
_USABLE_PREFIXES = ("x-", "resent-", "list-", "arc-", "dkim-")

# Added on the way, so the same message reaches us with different values.
_TRANSIT_HEADERS = frozenset(
    {
        b"received", b"x-received", b"return-path", b"delivered-to",
        b"x-original-to", b"authentication-results", b"received-spf",
        b"x-envelope-from", b"x-envelope-to", b"x-gmail-received",
        b"status", b"x-status", b"x-uid", b"x-keywords",
    }
)  # fmt: skip
_TRANSIT_PREFIXES = (
    b"arc-",
    b"x-spam-",
    b"x-virus-",
    b"x-mozilla-status",
    b"x-ms-exchange-organization-",
)

# Labels that name a superset or the encoding senders really meant; the
# WHATWG Encoding Standard maps them the same way.
_CHARSET_ALIASES = {
    "ks-c-5601-1987": "cp949",
    "ks-c-5601": "cp949",
    "euc-kr": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "iso-8859-9": "cp1254",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "iso-8859-8-i": "iso8859-8",
    "big5": "big5hkscs",
    "unicode-1-1-utf-7": "utf-7",
}
# Labels that say "no idea": decode as if no charset were declared.
_CHARSET_UNKNOWN = frozenset(
    {"", "unknown", "x-unknown", "unknown-8bit", "x-user-defined", "default"}
)

# RFC 2047 §2: =?charset?encoding?encoded-text?=
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?(.*?)\?=")
_ADDR_SPEC = re.compile(r"[^\s<>,;:\"()\[\]]+@[^\s<>,;:\"()\[\]]+")
_SIMPLE_MAILBOX = re.compile(
    r'\s*(?:(?:"(?P<quoted>[^"\\]*)"|(?P<plain>[^"<>,;:@()\\\[\]]*?))'
    r"\s*<(?P<angle>[^\s<>,;:\"()\[\]@]+@[^\s<>,;:\"()\[\]@]+)>"
    r'|(?P<bare>[^\s<>,;:"()\[\]@]+@[^\s<>,;:"()\[\]@]+))\s*'
)
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_HTML_META_CHARSET = re.compile(rb"<meta[^>]+charset=[\"']?([\w.:-]+)", re.I)
_FILENAME_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')
_CONTROL_TO_SPACE = str.maketrans("\t\r\n", "   ")

_IDENTITY_ENCODINGS = frozenset(
    {"", "7bit", "8bit", "binary", "7-bit", "8-bit", "7bits", "8bits"}
)
_UUENCODINGS = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
_DELIVERY_REPORTS = frozenset({"delivery-status", "global-delivery-status"})
_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_EMBEDDED_MESSAGES = frozenset({"message/rfc822", "message/global"})
# Where a report returns the original (message/rfc822-headers is not
# registered, but some MTAs send it).
_ORIGINAL_TYPES = _EMBEDDED_MESSAGES | {
    "text/rfc822-headers",
    "message/global-headers",
    "message/rfc822-headers",
}
_EXTENSIONS = {
    "text/plain": ".txt",
    "text/calendar": ".ics",
    "text/rfc822-headers": ".txt",
    "message/rfc822-headers": ".txt",
    "message/global-headers": ".txt",
    "message/delivery-status": ".txt",
    "message/global-delivery-status": ".txt",
    "message/disposition-notification": ".txt",
}
# Only the built-in table, so names do not depend on the host's mime.types.
_MIME_TYPES = mimetypes.MimeTypes()
# Deeper nesting or more parts than this is an attack, not a customer's
# mail; what is not read stays in the raw message.
_MAX_DEPTH = 40
_MAX_PARTS = 1000


class DeliveryStatus(NamedTuple):
    """One per-recipient block of an RFC 3464 delivery report."""

    recipient: str
    action: str
    status: str


class _Field(NamedTuple):
    key: str  # the name lower-cased
    name: str  # the name as written, for defect messages
    value: bytes  # unfolded, undecoded


class _Entity(NamedTuple):
    """One MIME entity (RFC 2045 §2.4): header fields and encoded body."""

    fields: list[_Field]
    body: bytes
    ctype: str  # lower-cased type/subtype
    params: dict[str, str]  # Content-Type parameters, names lower-cased
    disposition: str | None  # lower-cased, None when absent
    disposition_params: dict[str, str]
    problems: list[str]


@dataclass
class _Body:
    # Inline text parts, joined with newlines: the first, or all of a mixed.
    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    report_ids: list[str] = field(default_factory=list)
    is_delivery_report: bool = False


# --- public API ---------------------------------------------------------


def parse_email(
    raw: bytes,
    *,
    envelope_sender: str | None = None,
    envelope_recipients: Sequence[str] = (),
) -> Inbound:
    """Parse one message; raise ``Unparseable`` only for input that is not mail."""
    try:
        start = _start_of_message(raw)
        fields, body_start, problems = _split_headers(raw, start, lenient=True)
        _require_usable_headers(fields)
        inbound = _build(raw, fields, body_start, envelope_sender)
    except Unparseable:
        raise
    except Exception as exc:  # a bug here must quarantine the message, not crash
        raise Unparseable(f"parser failure: {type(exc).__name__}: {exc}") from exc

    inbound.defects[:0] = problems
    inbound.envelope_recipients = list(envelope_recipients)

    return inbound


def extract_message_ids(value: str) -> list[str]:
    """Every Message-ID in a header value, without angle brackets, in order.

    Tolerant on purpose (RFC 5322 §3.6.4 is often ignored): ids may be
    separated by spaces, commas or newlines, miss their brackets, or be
    Exchange's ``<[id@host]>``; text between ids that holds no ``@`` is junk.
    """
    found: list[str] = []
    for match in _ID_TOKEN.finditer(value):
        bracketed, bare = match.groups()
        if bracketed is not None:
            candidate = "".join(bracketed.split())
        elif "@" in bare:
            candidate = bare.strip("\"'")
        else:
            continue
        if candidate and candidate not in found:
            found.append(candidate)

    return found


_ID_TOKEN = re.compile(r"<([^<>]*)>|([^\s<>,;()]+)")


def parse_delivery_status(inbound: Inbound) -> list[DeliveryStatus]:
    """The per-recipient blocks of the report parts of a delivery report.

    RFC 3464 §2.3: each block after the per-message one names a
    Final-Recipient, an Action and a Status.
    """
    found: list[DeliveryStatus] = []
    for attachment in inbound.attachments:
        if attachment.content_type not in _STATUS_TYPES:
            continue
        for block in _STATUS_BLOCK_END.split(attachment.content):
            status = _recipient_status(block)
            if status is not None:
                found.append(status)

    return found


_STATUS_BLOCK_END = re.compile(rb"\r?\n[ \t]*\r?\n")


def content_hash(raw: bytes) -> str:
    """SHA-256 of a message with the headers added in transit left out.

    The same message delivered twice through different paths hashes the same:
    line endings, folding, trailing white space and transit headers
    (Received, Delivered-To, spam verdicts, ...) do not count.
    """
    data = raw.replace(b"\r\n", b"\n")
    first_line = data.split(b"\n", 1)[0]
    if first_line.startswith(b"From ") and not _FIELD.match(first_line):
        data = data[len(first_line) + 1 :]  # an mbox separator, not a header
    head, _, body = data.partition(b"\n\n")

    kept = [line for line in _unfold(head) if not _is_transit(line)]
    digest = hashlib.sha256(b"\n".join(kept))
    digest.update(b"\n\n")
    digest.update(body.rstrip())

    return digest.hexdigest()


# --- is it mail at all? ---------------------------------------------------


def _start_of_message(raw: bytes) -> int:
    """Offset of the first header line; raise if the input cannot be mail."""
    if not raw or raw.isspace():
        raise Unparseable("empty input: there is no message to parse")
    if raw.startswith(_OLE2_MAGIC):
        raise Unparseable(
            "this is an Outlook .msg file (OLE2 compound document), not RFC 822 "
            "mail; export it from Outlook as .eml and import that file"
        )

    start = 3 if raw.startswith(codecs.BOM_UTF8) else 0
    while raw.startswith((b"\r", b"\n"), start):
        start += 1
    first_line = raw[start : start + 200].split(b"\n", 1)[0].rstrip(b"\r")
    is_mbox_separator = first_line.startswith(b"From ")
    if not is_mbox_separator and not _FIELD.match(first_line):
        raise Unparseable(
            "not an email message: the first line is not a header field: "
            f"{_shown(first_line)!r}"
        )

    return start


def _require_usable_headers(fields: list[_Field]) -> None:
    for item in fields:
        if item.key in _USABLE_HEADERS or item.key.startswith(_USABLE_PREFIXES):
            return
    names = ", ".join(sorted({item.name for item in fields})[:5]) or "none"
    raise Unparseable(
        "not an email message: no usable header (no From, To, Subject, Date, "
        f"Message-ID, Received or MIME header; found: {names})"
    )


# --- the header block -----------------------------------------------------


def _split_headers(
    data: bytes, start: int = 0, *, lenient: bool = False
) -> tuple[list[_Field], int, list[str]]:
    """Header fields, unfolded, the offset where the body starts, and problems.

    The block ends at the first blank line; a line that is neither a field
    nor a continuation also ends it, as in Python's own parser. When
    ``lenient``, such a stray line is skipped instead if only header fields,
    a well-known one among them, follow it up to a blank line. A leading
    mbox ``From `` line is skipped.
    """
    if data.startswith((b"\n", b"\r\n"), start):
        return [], data.index(b"\n", start) + 1, []
    blank = _BLANK_LINE.search(data, start)
    lines = data[start : blank.start() if blank else len(data)].split(b"\n")

    fields: list[_Field] = []
    problems: list[str] = []
    name, parts = b"", list[bytes]()
    for index, ended_line in enumerate(lines):
        line = ended_line.removesuffix(b"\r")
        if not line:
            continue  # the line break that ends the data
        if line[:1] in (b" ", b"\t") and name:
            parts.append(line)
        elif match := _FIELD.match(line):
            _add_field(fields, name, parts)
            name, parts = match[1], [match[2]]
        elif index == 0 and line.startswith(b"From "):
            pass  # an mbox separator
        elif lenient and blank and _only_headers(lines[index + 1 :]):
            problems.append(f"malformed header line skipped: {_shown(line)!r}")
        else:
            _add_field(fields, name, parts)
            problems.append("header block ended without a blank line")
            return fields, start + sum(len(x) + 1 for x in lines[:index]), problems

    _add_field(fields, name, parts)
    return fields, blank.end() if blank else len(data), problems


_BLANK_LINE = re.compile(rb"\n\r?\n")


def _add_field(fields: list[_Field], name: bytes, parts: list[bytes]) -> None:
    if name:
        text = name.decode("ascii")
        fields.append(_Field(text.lower(), text, b"".join(parts).strip(b" \t")))


def _only_headers(lines: list[bytes]) -> bool:
    """Whether ``lines`` are all header fields, a well-known one among them."""
    seen_known = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            continue
        match = _FIELD.match(line)
        if match is None:
            return False
        seen_known |= match[1].decode("ascii").lower() in _USABLE_HEADERS

    return seen_known


def _shown(line: bytes) -> str:
    return line[:60].decode("utf-8", "replace")


def _header_text(value: str | bytes, name: str, defects: list[str]) -> str:
    """A header value decoded: 8-bit bytes, then RFC 2047 encoded words."""
    plain = _bytes_to_text(value) if isinstance(value, bytes) else value
    text = _decode_words(plain, name, defects)
    if "\t" in text or "\n" in text or "\r" in text:
        text = text.translate(_CONTROL_TO_SPACE)
    return text.strip()


def _bytes_to_text(data: bytes) -> str:
    """Undeclared bytes (raw 8-bit headers, too): UTF-8, else windows-1252."""
    if data.isascii():
        return _without_nul(data.decode("ascii"))
    try:
        return _without_nul(data.decode("utf-8"))
    except UnicodeDecodeError:
        return _without_nul(data.decode("cp1252", errors="replace"))


def _without_nul(text: str) -> str:
    """NUL has no place in mail text (RFC 5322 2.3), and PostgreSQL's text
    type cannot store it; it becomes U+FFFD, the raw bytes keep the original."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _decode_words(text: str, name: str, defects: list[str]) -> str:
    """Decode RFC 2047 encoded words; a broken one keeps its raw text.

    Adjacent words in one charset are joined before decoding, because
    senders split multi-byte characters across words; white space between
    adjacent encoded words is dropped (RFC 2047 §6.2).
    """
    if "=?" not in text:
        return text
    pieces: list[str] = []
    run: list[tuple[str, list[bytes]]] = []
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        if gap and not (run and gap.isspace()):
            pieces.append(_decode_run(run, name, defects))
            pieces.append(gap)
        pos = match.end()
        charset = match[1].split("*", 1)[0].lower()  # RFC 2231 §5 language
        payload = _word_bytes(match[2], match[3])
        if payload is None:
            defects.append(f"{name}: broken encoded word")
            pieces.append(_decode_run(run, name, defects))
            pieces.append(match[0])
        elif run and run[-1][0] == charset:
            run[-1][1].append(payload)
        else:
            run.append((charset, [payload]))

    pieces.append(_decode_run(run, name, defects))
    pieces.append(text[pos:])
    return "".join(pieces)


def _decode_run(
    run: list[tuple[str, list[bytes]]], name: str, defects: list[str]
) -> str:
    problems: list[str] = []
    text = "".join(
        _decode_text(b"".join(chunks), charset, problems) for charset, chunks in run
    )
    defects.extend(f"{name}: {problem}" for problem in problems)
    run.clear()
    return text


def _word_bytes(encoding: str, text: str) -> bytes | None:
    data = text.encode("utf-8")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    core = _NOT_BASE64.sub(b"", data)
    if len(core) % 4 == 1:
        return None
    return binascii.a2b_base64(core + b"=" * (-len(core) % 4))


# --- charsets -------------------------------------------------------------


def _decode_text(data: bytes, charset: str | None, defects: list[str]) -> str:
    """Bytes to text: declared charset, then UTF-8, then windows-1252."""
    codec = _codec(charset) if charset else ""
    if codec is None:
        defects.append(f"unknown charset {charset!r}")
    elif codec:
        try:
            return _without_nul(data.decode(codec))
        except UnicodeError:
            defects.append(f"text is not valid {charset}")

    return _bytes_to_text(data)


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """A Python codec for a MIME charset label; "" for "unknown", None if bad."""
    label = charset.strip().strip("\"'").lower().replace("_", "-")
    if label in _CHARSET_UNKNOWN:
        return ""
    for candidate in (label, label.removeprefix("3d")):  # QP-mangled "=3D"
        name = _CHARSET_ALIASES.get(candidate, candidate)
        if _is_text_codec(name):
            return name

    return None


def _is_text_codec(name: str) -> bool:
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return False
    try:
        b"a".decode(name)  # bytes-to-bytes codecs (base64, zlib) fail here
    except UnicodeDecodeError:
        pass  # a real charset that cannot decode a lone "a" (UTF-16)
    except (LookupError, ValueError):
        return False
    return info.name not in _NOT_CHARSETS


# Text codecs that are no charset a sender could mean.
_NOT_CHARSETS = frozenset(
    {"idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined"}
)


# --- addresses and dates --------------------------------------------------


def _addresses(values: list[str], name: str, defects: list[str]) -> list[Address]:
    """Mailboxes from address headers; an unreadable one is skipped."""
    found: list[Address] = []
    for value in values:
        mailboxes = _mailboxes(value, name, defects)
        if not mailboxes and "=?" in value:
            # Some senders encode the whole header, address included.
            mailboxes = _mailboxes(_decode_words(value, name, []), name, [])
        if not mailboxes and value.strip() and not value.rstrip().endswith(";"):
            defects.append(f"{name}: no readable address in {value[:60]!r}")
        found.extend(mailboxes)

    return found


def _mailboxes(value: str, name: str, defects: list[str]) -> list[Address]:
    simple = _simple_mailboxes(value, name, defects)
    if simple is not None:
        return simple

    try:
        pairs = getaddresses([value])
    except Exception as exc:  # noqa: BLE001 - a library parser on hostile input
        pairs = [("", f"unreadable ({type(exc).__name__})")]

    found: list[Address] = []
    for display, address in pairs:
        email = address.strip()
        if not email:
            continue
        if not _plausible_address(email):
            return _salvaged_mailboxes(value, name, defects)
        found.append(Address(_header_text(display, name, defects), email.lower()))

    return found


def _simple_mailboxes(
    value: str, name: str, defects: list[str]
) -> list[Address] | None:
    """``Name <a@b>``, ``a@b`` and plain lists of them, read without the
    general (and slow) address parser; None for anything else."""
    pieces = value.split(",") if '"' not in value else [value]
    found: list[Address] = []
    for piece in pieces:
        simple = _SIMPLE_MAILBOX.fullmatch(piece)
        if simple is None:
            return None
        display = simple["quoted"] or simple["plain"] or ""
        email = simple["angle"] or simple["bare"]
        found.append(Address(_header_text(display, name, defects), email.lower()))

    return found


def _plausible_address(email: str) -> bool:
    if any(char.isspace() or char in "<>" for char in email):
        return False
    local, at, domain = email.rpartition("@")
    return bool(local and domain) or not at


def _salvaged_mailboxes(value: str, name: str, defects: list[str]) -> list[Address]:
    """Addresses picked out of a header the address parser cannot read.

    ``Big Bug bb@bug.com`` and ``a@example.com b@example.com`` are common.
    """
    emails = list(dict.fromkeys(_ADDR_SPEC.findall(value)))
    if not emails:
        return []
    defects.append(f"{name}: malformed address list {value[:60]!r}")
    if len(emails) > 1:
        return [Address("", email.lower()) for email in emails]
    display = value.replace(emails[0], "").strip(" \t\"'<>")
    return [Address(_header_text(display, name, defects), emails[0].lower())]


def _envelope_address(envelope_sender: str | None) -> Address | None:
    email = (envelope_sender or "").strip().strip("<>").strip()
    return Address("", email.lower()) if email else None


def _date(value: str | None, defects: list[str]) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:
            # RFC 5322 §3.3: "-0000" is UTC with the local zone unknown.
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        defects.append(f"Date: unreadable {value[:60]!r}")
        return None


# --- the whole message ----------------------------------------------------


def _build(
    raw: bytes, fields: list[_Field], body_start: int, envelope: str | None
) -> Inbound:
    defects: list[str] = []
    headers = [
        (item.key, _header_text(item.value, item.name, defects)) for item in fields
    ]

    def values(key: str) -> list[str]:
        # Address headers are split before their encoded words are decoded.
        return [_bytes_to_text(item.value) for item in fields if item.key == key]

    def ids(key: str) -> list[str]:
        found = [extract_message_ids(v) for k, v in headers if k == key]
        return [one for chunk in found for one in chunk]

    sender = (
        next(iter(_addresses(values("from"), "From", defects)), None)
        or next(iter(_addresses(values("sender"), "Sender", defects)), None)
        or _envelope_address(envelope)
    )
    body = _read_body(fields, raw, body_start)
    defects.extend(body.defects)

    return Inbound(
        channel=Channel.EMAIL,
        raw=raw,
        sender=sender,
        subject=next((v for k, v in headers if k == "subject"), ""),
        text=_best_text(body, defects),
        html="\n".join(body.htmls) if body.htmls else None,
        message_id=next(iter(ids("message-id")), None),
        in_reply_to=ids("in-reply-to"),
        references=ids("references"),
        to=_addresses(values("to"), "To", defects),
        cc=_addresses(values("cc"), "Cc", defects),
        reply_to=_addresses(values("reply-to"), "Reply-To", defects),
        date=_date(next((v for k, v in headers if k == "date"), None), defects),
        headers=headers,
        attachments=body.attachments,
        defects=list(dict.fromkeys(defects)),
        report_message_ids=list(dict.fromkeys(body.report_ids)),
        report_is_delivery_status=body.is_delivery_report,
        envelope_sender=envelope,
    )


def _best_text(body: _Body, defects: list[str]) -> str:
    """The plain text, or text made from the HTML when that is all there is."""
    text = "\n".join(body.texts)
    if text and not text.isspace():
        return text
    if body.htmls:
        return _html_to_text("\n".join(body.htmls), defects)
    return text


def _html_to_text(markup: str, defects: list[str]) -> str:
    converter = html2text.HTML2Text()
    converter.body_width = 0  # no wrapping: agents' clients wrap for them
    converter.ignore_images = True
    converter.inline_links = True
    converter.unicode_snob = True  # keep "é", not "e"
    try:
        return str(converter.handle(markup)).strip()
    except Exception as exc:  # noqa: BLE001 - html2text on hostile HTML; fall back
        defects.append(f"html: not convertible to text ({type(exc).__name__})")
        return html.unescape(re.sub(r"<[^>]*>", " ", markup)).strip()


def _read_body(fields: list[_Field], raw: bytes, body_start: int) -> _Body:
    root = _entity_of(fields, raw[body_start:], [], "text/plain")
    try:
        return _BodyReader().read(root)
    except Exception as exc:  # noqa: BLE001 - keep the body as text, never lose it
        text = _bytes_to_text(root.body)
        problem = f"MIME structure unreadable ({type(exc).__name__}); kept as text"
        return _Body(texts=[_newlines(text)], defects=[problem])


def _newlines(text: str) -> str:
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- MIME entities --------------------------------------------------------


def _entity(data: bytes, default_type: str) -> _Entity:
    fields, body_start, problems = _split_headers(data)
    return _entity_of(fields, data[body_start:], problems, default_type)


def _entity_of(
    fields: list[_Field], body: bytes, problems: list[str], default_type: str
) -> _Entity:
    ctype, params = default_type, dict[str, str]()
    value = _field_value(fields, "content-type")
    if value is not None:
        declared, params = _parameters(value)
        if _is_media_type(declared):
            ctype = declared
        else:
            # RFC 2045 §5.2: an unreadable Content-Type means text/plain.
            problems.append(f"unreadable Content-Type {_shown(value)!r}")

    disposition, disposition_params = None, dict[str, str]()
    value = _field_value(fields, "content-disposition")
    if value is not None:
        found, disposition_params = _parameters(value)
        disposition = found or None

    return _Entity(
        fields, body, ctype, params, disposition, disposition_params, problems
    )


def _field_value(fields: list[_Field], key: str) -> bytes | None:
    for item in fields:
        if item.key == key:
            return item.value
    return None


def _is_media_type(value: str) -> bool:
    major, slash, minor = value.partition("/")
    return bool(slash and major and minor) and " " not in value


def _parameters(value: bytes) -> tuple[str, dict[str, str]]:
    """``type/subtype; name=value; ...`` to the lower-cased first item and a
    dict of parameters, quotes removed and RFC 2231 sections joined."""
    head, _, rest = _bytes_to_text(value).partition(";")
    plain: dict[str, str] = {}
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for match in _PARAMETER.finditer(rest):
        name, text = match[1].lower(), (match[2] or "").strip()
        if text.startswith('"'):
            text = _QUOTED_PAIR.sub(r"\1", text[1:].removesuffix('"'))
        section = _SECTION_NAME.fullmatch(name) if "*" in name else None
        if section is None:
            plain.setdefault(name, text)
            continue
        # RFC 2231 §3-4: name*N is section N; a trailing "*" marks it encoded.
        number, star = section[2], section[3]
        encoded = number is None or star is not None
        part = (int(number or 0), encoded, text)
        sections.setdefault(section[1], []).append(part)

    # RFC 2231 parameters win over plain ones of the same name.
    joined = {name: _join_sections(parts) for name, parts in sections.items()}
    if "(" in head:
        head = _COMMENT.sub("", head)  # RFC 2045 §5.1 allows comments
    return head.strip().lower(), plain | joined


_PARAMETER = re.compile(r'([^\s=;"]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"?|[^;"]*))?')
_QUOTED_PAIR = re.compile(r"\\(.)")
_COMMENT = re.compile(r"\([^()]*\)")
_SECTION_NAME = re.compile(r"(.+?)\*(?:(\d{1,3})(\*)?)?")


def _join_sections(parts: list[tuple[int, bool, str]]) -> str:
    """RFC 2231 §4: charset'language'%-encoded octets, continued in sections."""
    parts.sort(key=lambda part: part[0])
    charset: str | None = None
    chunks: list[bytes] = []
    for index, (_, encoded, text) in enumerate(parts):
        if not encoded:
            chunks.append(text.encode("utf-8"))
        elif index == 0 and text.count("'") >= 2:
            charset, _, encoded_text = text.split("'", 2)
            chunks.append(unquote_to_bytes(encoded_text))
        else:
            chunks.append(unquote_to_bytes(text))

    return _decode_text(b"".join(chunks), charset, [])


def _split_multipart(body: bytes, boundary: bytes) -> tuple[list[bytes], bool, bool]:
    """The parts between RFC 2046 §5.1.1 boundary lines.

    Returns the parts, whether an opening boundary was found and whether the
    closing one was; when it is missing the last part runs to the end.
    """
    marker = b"--" + boundary
    parts: list[bytes] = []
    start: int | None = None
    pos = 0
    while (found := body.find(marker, pos)) >= 0:
        pos = found + len(marker)
        line_end = body.find(b"\n", pos)
        line_end = len(body) if line_end < 0 else line_end
        rest = body[pos:line_end].rstrip(b" \t\r")
        if (found and body[found - 1] != 0x0A) or rest not in (b"", b"--"):
            continue  # inside a line, or a longer boundary with this prefix
        if start is not None:
            parts.append(_without_line_end(body[start:found]))
        if rest == b"--":
            return parts, True, True
        start = pos = line_end + 1

    if start is not None and body[start:].strip():
        parts.append(body[start:])
    return parts, start is not None, False


def _without_line_end(data: bytes) -> bytes:
    # The line break before a boundary belongs to the boundary (RFC 2046).
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


# --- the MIME tree --------------------------------------------------------


class _BodyReader:
    """Walks a MIME tree once, sorting parts into body and attachments.

    Parts are numbered depth first, the message itself being 0; a part that
    cannot be read is kept as an attachment with its raw bytes.
    """

    def __init__(self) -> None:
        self.body = _Body()
        self._count = 0

    def read(self, root: _Entity) -> _Body:
        self._visit(root, parent="", in_report=False, depth=0)
        return self.body

    def _visit(self, part: _Entity, parent: str, in_report: bool, depth: int) -> None:
        number = self._count
        self._count += 1
        label = _label(number)
        self.body.defects.extend(f"{label}: {problem}" for problem in part.problems)

        try:
            if part.ctype.startswith("multipart/"):
                self._visit_multipart(part, number, in_report, depth)
            else:
                self._visit_leaf(part, part.ctype, parent, number, in_report)
        except Exception as exc:  # noqa: BLE001 - one bad part must not lose the rest
            self.body.defects.append(f"{label}: unreadable ({type(exc).__name__})")
            self._attach(part, number, part.ctype, part.body, None)

    def _visit_multipart(
        self, part: _Entity, number: int, in_report: bool, depth: int
    ) -> None:
        label = _label(number)
        boundary = part.params.get("boundary", "").encode("utf-8")
        found = _split_multipart(part.body, boundary) if boundary else None
        if found is None or not found[1]:
            # No boundary, or it never appears: read the body as text.
            self.body.defects.append(f"{label}: multipart without parts")
            self._visit_leaf(part, "text/plain", "", number, in_report)
            return
        children, _, closed = found
        if not closed:
            self.body.defects.append(f"{label}: closing boundary missing")
        if depth >= _MAX_DEPTH:
            self.body.defects.append(f"{label}: nested too deep; kept whole")
            self._attach(part, number, part.ctype, part.body, None)
            return

        subtype = part.ctype.partition("/")[2]
        # RFC 6522: a report whose report-type says it is about delivery.
        in_report = subtype == "report" and (
            part.params.get("report-type", "").lower() in _DELIVERY_REPORTS
        )
        self.body.is_delivery_report |= in_report
        # RFC 2046 §5.1.5: in a digest, parts are messages unless they say not.
        default_type = "message/rfc822" if subtype == "digest" else "text/plain"
        for data in children:
            if self._count >= _MAX_PARTS:
                self.body.defects.append(f"more than {_MAX_PARTS} parts; rest unread")
                return
            child = _entity(data, default_type)
            self._visit(child, subtype, in_report, depth + 1)

    def _visit_leaf(
        self, part: _Entity, ctype: str, parent: str, number: int, in_report: bool
    ) -> None:
        label = _label(number)
        data = self._payload(part, label)
        name = self._filename(part, number)
        self.body.is_delivery_report |= ctype in _STATUS_TYPES
        if in_report and ctype in _ORIGINAL_TYPES:
            # RFC 3464 §2: the returned original; its id is what we sent.
            for item in _split_headers(data)[0]:
                if item.key == "message-id":
                    ids = extract_message_ids(_bytes_to_text(item.value))
                    self.body.report_ids.extend(ids)

        is_body = part.disposition != "attachment" and name is None
        if is_body and ctype in ("text/plain", "text/html"):
            text = self._text(part, data, ctype, label)
            if self._take_body(ctype, text, parent):
                return
        if name is None and ctype in _EMBEDDED_MESSAGES:
            name = _subject_filename(data)
        self._attach(part, number, ctype, data, name)

    def _take_body(self, ctype: str, text: str, parent: str) -> bool:
        """Keep ``text`` as the body if it is the first of its kind.

        Later inline text parts of a multipart/mixed are what a mail client
        shows one after the other, so they are appended.
        """
        kept = self.body.texts if ctype == "text/plain" else self.body.htmls
        if kept and parent != "mixed":
            return False
        kept.append(text)
        return True

    def _text(self, part: _Entity, data: bytes, ctype: str, label: str) -> str:
        charset = part.params.get("charset")
        if charset is None and ctype == "text/html":
            found = _HTML_META_CHARSET.search(data[:4096])
            charset = found[1].decode("ascii") if found else None
        problems: list[str] = []
        text = _decode_text(data, charset, problems)
        self.body.defects.extend(f"{label}: {problem}" for problem in problems)
        return _newlines(text)

    def _payload(self, part: _Entity, label: str) -> bytes:
        """The part's content with its transfer encoding undone."""
        value = _field_value(part.fields, "content-transfer-encoding") or b""
        encoding = _transfer_encoding(value)
        if encoding in _IDENTITY_ENCODINGS or not part.body.strip():
            return part.body
        if encoding == "quoted-printable":
            return binascii.a2b_qp(part.body)
        if encoding == "base64":
            decoded = _unbase64(part.body)
        elif encoding in _UUENCODINGS:
            decoded = _ununcode(part.body)
        else:
            self.body.defects.append(f"{label}: unknown transfer encoding {encoding!r}")
            return part.body
        if decoded is None:
            self.body.defects.append(f"{label}: undecodable {encoding}")
            return part.body

        return decoded

    def _filename(self, part: _Entity, number: int) -> str | None:
        value = part.disposition_params.get("filename") or part.params.get("name")
        if not value:
            return None
        # Also decodes the non-standard encoded word inside a quoted name.
        label = f"part {number} filename"
        decoded = _header_text(value, label, self.body.defects)
        # Old clients send a full path; only its last step is the name.
        decoded = decoded.replace("\\", "/").rsplit("/", 1)[-1]
        return _FILENAME_UNSAFE.sub("_", decoded).strip() or None

    def _attach(
        self,
        part: _Entity,
        number: int,
        ctype: str,
        content: bytes,
        name: str | None,
    ) -> None:
        content_id = _content_id(part)
        inline = part.disposition == "inline" or (
            part.disposition is None and content_id is not None
        )
        filename = name or f"part-{number}{_extension(ctype)}"
        attachment = Attachment(filename, ctype, content, content_id, inline)
        self.body.attachments.append(attachment)


def _label(number: int) -> str:
    return f"part {number}" if number else "message"


def _transfer_encoding(value: bytes) -> str:
    name = _bytes_to_text(value).split(";", 1)[0].strip().lower()
    return "quoted-printable" if name.startswith("quoted") else name


def _unbase64(data: bytes) -> bytes | None:
    try:
        return binascii.a2b_base64(data)  # skips line breaks and stray bytes
    except binascii.Error:
        pass
    core = _NOT_BASE64.sub(b"", data)
    if len(core) % 4 == 1:
        return None
    return binascii.a2b_base64(core + b"=" * (-len(core) % 4))


def _ununcode(data: bytes) -> bytes | None:
    lines = data.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(b"begin ")]
    if not starts:
        return None
    out: list[bytes] = []
    for line in lines[starts[0] + 1 :]:
        if line.strip() == b"end":
            break
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            # Some encoders pad lines with junk; the length byte says how
            # much of the line is data.
            size = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out.append(binascii.a2b_uu(line[:size]))
            except binascii.Error:
                return None

    return b"".join(out)


def _content_id(part: _Entity) -> str | None:
    value = _field_value(part.fields, "content-id")
    if value is None:
        return None
    return _bytes_to_text(value).strip().strip("<>").strip() or None


def _subject_filename(message: bytes) -> str:
    value = _field_value(_split_headers(message)[0], "subject") or b""
    subject = _header_text(value, "Subject", [])
    safe = _FILENAME_UNSAFE.sub("_", subject).strip(" ._")[:100]
    return f"{safe}.eml" if safe else "message.eml"


@functools.lru_cache(maxsize=128)
def _extension(ctype: str) -> str:
    known = _EXTENSIONS.get(ctype) or _MIME_TYPES.guess_extension(ctype, strict=False)
    return known or ".bin"


# --- delivery reports and hashing ----------------------------------------


def _recipient_status(block: bytes) -> DeliveryStatus | None:
    fields = {item.key: item.value for item in _split_headers(block)[0]}
    recipient = fields.get("final-recipient") or fields.get("original-recipient")
    if recipient is None or "action" not in fields:
        return None
    # RFC 3464 §2.3.2: "rfc822; user@example.com" names the address type.
    address = _bytes_to_text(recipient).partition(";")[2] or _bytes_to_text(recipient)
    status = _bytes_to_text(fields.get("status", b"")).split()
    return DeliveryStatus(
        recipient=address.strip().strip("<>").lower(),
        action=_bytes_to_text(fields["action"]).strip().lower(),
        status=status[0] if status else "",
    )


def _unfold(head: bytes) -> list[bytes]:
    lines: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += line
        else:
            lines.append(line)
    return lines


def _is_transit(line: bytes) -> bool:
    name = line.split(b":", 1)[0].strip().lower()
    return name in _TRANSIT_HEADERS or name.startswith(_TRANSIT_PREFIXES)
