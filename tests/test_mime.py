"""channels.mime: raw bytes to an Inbound, tolerant of real-world mail."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from channels.mime import (
    DeliveryStatus,
    content_hash,
    extract_message_ids,
    parse_delivery_status,
    parse_email,
)
from intake.domain import Address, Channel, Inbound
from intake.errors import Unparseable

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"

PLAIN = b"""\
From: Jane Doe <Jane@Example.ORG>
To: support@example.com
Subject: Order 1234
Date: Tue, 2 Jan 2024 10:59:58 +0100
Message-ID: <abc.123@mail.example.org>

Where is my order?
"""


def _parse_or_reason(raw: bytes) -> Inbound | Unparseable:
    try:
        return parse_email(raw)
    except Unparseable as exc:
        return exc


def _corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(path for path in CORPUS.rglob("*") if path.is_file())


# --- the basics -----------------------------------------------------------


def test_plain_message_becomes_an_inbound() -> None:
    inbound = parse_email(PLAIN)

    assert inbound.channel is Channel.EMAIL
    assert inbound.raw == PLAIN
    assert inbound.sender == Address("Jane Doe", "jane@example.org")
    assert inbound.to == [Address("", "support@example.com")]
    assert inbound.subject == "Order 1234"
    assert inbound.text == "Where is my order?\n"
    assert inbound.html is None
    assert inbound.message_id == "abc.123@mail.example.org"
    assert inbound.date == datetime(2024, 1, 2, 9, 59, 58, tzinfo=UTC)
    assert inbound.defects == []


def test_crlf_line_endings_become_lf_in_the_text() -> None:
    raw = b"From: a@example.org\r\nSubject: x\r\n\r\nline one\r\nline two\r\n"

    inbound = parse_email(raw)

    assert inbound.text == "line one\nline two\n"


def test_headers_keep_their_order_and_repeats() -> None:
    raw = (
        b"Received: from a\nReceived: from b\nX-Tag: one\n"
        b"From: a@example.org\nX-TAG: two\n\nbody\n"
    )

    inbound = parse_email(raw)

    assert inbound.headers == [
        ("received", "from a"),
        ("received", "from b"),
        ("x-tag", "one"),
        ("from", "a@example.org"),
        ("x-tag", "two"),
    ]
    assert inbound.header_all("X-Tag") == ["one", "two"]


def test_envelope_is_kept_beside_the_message() -> None:
    inbound = parse_email(
        PLAIN,
        envelope_sender="bounce@example.org",
        envelope_recipients=("support@example.com",),
    )

    assert inbound.envelope_sender == "bounce@example.org"
    assert inbound.envelope_recipients == ["support@example.com"]


def test_mbox_from_line_before_the_headers_is_skipped() -> None:
    raw = b"From jane@example.org Tue May 10 11:28:07 2005\n" + PLAIN

    inbound = parse_email(raw)

    assert inbound.sender == Address("Jane Doe", "jane@example.org")
    assert inbound.headers[0][0] == "from"


def test_stray_line_inside_the_headers_is_skipped() -> None:
    raw = (
        b"Received: by x\nquite Delivered-To: x\n"
        b"From: a@example.org\nSubject: hi\n\nbody\n"
    )

    inbound = parse_email(raw)

    assert inbound.subject == "hi"
    assert inbound.text == "body\n"
    assert inbound.defects == ["malformed header line skipped: 'quite Delivered-To: x'"]


# --- Message-IDs ----------------------------------------------------------


def test_bracketed_exchange_message_id_is_kept() -> None:
    raw = b"From: a@example.org\nMessage-ID: <[b378c1@microsoft.com]>\n\nhi\n"

    inbound = parse_email(raw)

    assert inbound.message_id == "[b378c1@microsoft.com]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@b>", ["a@b"]),
        ("<a@b> <c@d>", ["a@b", "c@d"]),
        ("<a@b>,<c@d>, <e@f>", ["a@b", "c@d", "e@f"]),
        ("<a@b>\r\n\t<c@d>\n <e@f>", ["a@b", "c@d", "e@f"]),
        ("a@b", ["a@b"]),
        ("a@b c@d", ["a@b", "c@d"]),
        ("<[b378c1@microsoft.com]>", ["[b378c1@microsoft.com]"]),
        ("Your message of Monday <a@b> (sent) junk <c@d>", ["a@b", "c@d"]),
        ("<a@b> <a@b>", ["a@b"]),
        ("  < a@b >  ", ["a@b"]),
        ("<a@b", ["a@b"]),
        ("", []),
        ("no ids here", []),
    ],
)
def test_message_ids_are_extracted_tolerantly(value: str, expected: list[str]) -> None:
    assert extract_message_ids(value) == expected


def test_several_ids_on_one_line_fill_references_and_in_reply_to() -> None:
    raw = (
        b"From: a@example.org\n"
        b"In-Reply-To: parent@example.com\n"
        b"References: <first@example.com> <second@example.com>,<parent@example.com>\n"
        b"\nhi\n"
    )

    inbound = parse_email(raw)

    assert inbound.in_reply_to == ["parent@example.com"]
    assert inbound.references == [
        "first@example.com",
        "second@example.com",
        "parent@example.com",
    ]
    assert inbound.message_id is None


# --- header decoding ------------------------------------------------------


def test_broken_encoded_word_in_from_keeps_its_raw_text() -> None:
    raw = b"From: =?UTF-8?B?a?= <x@example.org>\nSubject: hi\n\nbody\n"

    inbound = parse_email(raw)

    assert inbound.sender == Address("=?UTF-8?B?a?=", "x@example.org")
    assert "From: broken encoded word" in inbound.defects


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln"),
        (b"=?iso-8859-1?B?R3L832U=?=", "Grüße"),
        (b"=?UTF-8?B?4oKs?= =?UTF-8?B?IDEw?=", "€ 10"),  # space between words dropped
        (b"=?UTF-8?B?4o==?= =?UTF-8?B?gqw=?=", "€"),  # a character split across words
        (b"Re: =?utf-8?q?caf=C3=A9?= again", "Re: café again"),
        (b"=?NONE?B?VEVTVA=?=", "TEST"),  # unknown charset: UTF-8, then 1252
        (b"=?utf-8?q?line=0Abreak?=", "line break"),  # no newline in a header
        (b"plain\n\tfolded", "plain folded"),
    ],
)
def test_encoded_words_in_subject_are_decoded(header: bytes, expected: str) -> None:
    raw = b"From: a@example.org\nSubject: " + header + b"\n\nbody\n"

    inbound = parse_email(raw)

    assert inbound.subject == expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (b"Gr\xc3\xbc\xc3\x9fe", "Grüße"),  # raw UTF-8 (RFC 6532)
        (b"Gr\xfc\xdfe", "Grüße"),  # raw Latin-1
        (b"\x93quoted\x94", "“quoted”"),  # raw windows-1252
    ],
)
def test_raw_8bit_subject_is_decoded(subject: bytes, expected: str) -> None:
    raw = b"From: a@example.org\nSubject: " + subject + b"\n\nbody\n"

    inbound = parse_email(raw)

    assert inbound.subject == expected


# --- addresses and dates --------------------------------------------------


def test_addresses_are_decoded_and_lower_cased() -> None:
    raw = (
        b"From: =?UTF-8?Q?J=C3=A4ne_Doe?= <Jane@Example.ORG>\n"
        b'To: "Doe, John" <John@X.example>, Bob <BOB@y.example>\n'
        b"Cc: carol@z.example (Carol)\n"
        b'Reply-To: "=?utf-8?B?w4lsaXNl?=" <elise@w.example>\n'
        b"\nbody\n"
    )

    inbound = parse_email(raw)

    assert inbound.sender == Address("Jäne Doe", "jane@example.org")
    assert inbound.to == [
        Address("Doe, John", "john@x.example"),
        Address("Bob", "bob@y.example"),
    ]
    assert inbound.cc == [Address("Carol", "carol@z.example")]
    assert inbound.reply_to == [Address("Élise", "elise@w.example")]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Big Bug bb@bug.example", [Address("Big Bug", "bb@bug.example")]),
        (
            b"a@x.example b@x.example",
            [Address("", "a@x.example"), Address("", "b@x.example")],
        ),
        (b"undisclosed-recipients:;", []),
    ],
)
def test_malformed_address_lists_are_salvaged(
    header: bytes, expected: list[Address]
) -> None:
    raw = b"From: a@example.org\nTo: " + header + b"\n\nbody\n"

    inbound = parse_email(raw)

    assert inbound.to == expected


def test_unreadable_address_is_skipped_with_a_defect() -> None:
    raw = b'From: a@example.org\nTo: "nobody" <>\n\nbody\n'

    inbound = parse_email(raw)

    assert inbound.to == []
    assert inbound.defects == ["To: no readable address in '\"nobody\" <>'"]


@pytest.mark.parametrize(
    ("headers", "envelope", "expected"),
    [
        (b"Sender: Bot <Bot@example.org>\n", None, Address("Bot", "bot@example.org")),
        (b"", "<Env@Example.org>", Address("", "env@example.org")),
        (b"", "<>", None),
        (b"", "", None),
        (b"", None, None),
    ],
)
def test_sender_falls_back_to_sender_header_then_envelope(
    headers: bytes, envelope: str | None, expected: Address | None
) -> None:
    raw = b"Subject: no From\n" + headers + b"\nbody\n"

    inbound = parse_email(raw, envelope_sender=envelope)

    assert inbound.sender == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            b"Date: Tue, 2 Jan 2024 10:00:00 -0500\n",
            datetime(2024, 1, 2, 15, tzinfo=UTC),
        ),
        (b"Date: 2 Jan 2024 10:00:00 -0000\n", datetime(2024, 1, 2, 10, tzinfo=UTC)),
        (b"Date: Pn, 29 paX 2007 21:13:00 +0100\n", None),
        (b"", None),
    ],
)
def test_date_is_aware_utc_or_none(header: bytes, expected: datetime | None) -> None:
    raw = b"From: a@example.org\n" + header + b"\nbody\n"

    inbound = parse_email(raw)

    assert inbound.date == expected
    assert (expected is None and header != b"") == bool(inbound.defects)


# --- bodies ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"Gr\xc3\xbc\xc3\x9fe\n", "Grüße\n"),  # UTF-8 bytes, no charset
        (b"Gr\xfc\xdfe\n", "Grüße\n"),  # Latin-1 bytes, no charset
    ],
)
def test_body_without_charset_is_decoded(body: bytes, expected: str) -> None:
    raw = b"From: a@example.org\nContent-Transfer-Encoding: 8bit\n\n" + body

    inbound = parse_email(raw)

    assert inbound.text == expected


@pytest.mark.parametrize(
    ("charset", "body", "expected"),
    [
        (b"ks_c_5601-1987", b"\xbd\xba\xc6\xbc\xc7\xd8", "스티해"),
        (b'"Shift_JIS"', b"\x82\xa0\x82\xa2", "あい"),
        (b"iso-8859-1", b"caf\xe9", "café"),
        (b"utf-8", b"caf\xe9", "café"),  # wrong label: UTF-8 fails, 1252 reads it
        (b"x-no-such-charset", b"caf\xc3\xa9", "café"),
    ],
)
def test_declared_charset_is_used_with_a_fallback(
    charset: bytes, body: bytes, expected: str
) -> None:
    raw = b"From: a@example.org\nContent-Type: text/plain; charset=" + charset
    raw += b"\n\n" + body

    inbound = parse_email(raw)

    assert inbound.text == expected


def test_quoted_printable_and_base64_bodies_are_decoded() -> None:
    raw = b"""\
From: a@example.org
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

caf=C3=A9 and a soft=
 break
--b
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

PHA+Y2Fmw6k8L3A+
--b--
"""

    inbound = parse_email(raw)

    assert inbound.text == "café and a soft break"
    assert inbound.html == "<p>café</p>"


def test_empty_text_part_beside_html_takes_its_text_from_the_html() -> None:
    raw = b"""\
From: a@example.org
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8

  \r
--alt
Content-Type: text/html; charset=utf-8

<html><body><p>Hello <b>there</b></p></body></html>
--alt--
"""

    inbound = parse_email(raw)

    assert inbound.text == "Hello **there**"
    assert inbound.html == "<html><body><p>Hello <b>there</b></p></body></html>"


def test_html_only_mail_gets_unwrapped_text_with_inline_links() -> None:
    words = " ".join(["word"] * 40)
    raw = (
        b"From: a@example.org\nContent-Type: text/html\n\n"
        b"<p>" + words.encode() + b"</p>"
        b'<p>See <a href="https://example.com/x">the page</a>'
        b'<img src="cid:logo" alt="logo"></p>'
    )

    inbound = parse_email(raw)

    assert inbound.text == f"{words}\n\nSee [the page](https://example.com/x)"
    assert inbound.html is not None


def test_html_without_charset_uses_its_meta_tag() -> None:
    raw = (
        b"From: a@example.org\nContent-Type: text/html\n\n"
        b'<html><head><meta charset="iso-8859-1"></head><body>caf\xe9</body></html>'
    )

    inbound = parse_email(raw)

    assert inbound.text == "café"


def test_inline_text_parts_of_a_mixed_multipart_are_joined() -> None:
    raw = b"""\
From: a@example.org
Content-Type: multipart/mixed; boundary=m

--m
Content-Type: text/plain

first
--m
Content-Type: image/png
Content-Disposition: inline

PNG
--m
Content-Type: text/plain

second
--m--
"""

    inbound = parse_email(raw)

    assert inbound.text == "first\nsecond"
    assert [a.filename for a in inbound.attachments] == ["part-2.png"]


def test_multipart_whose_closing_boundary_is_missing_still_yields_its_parts() -> None:
    raw = b"""\
From: a@example.org
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain

the text
--outer
Content-Type: application/pdf; name="a.pdf"
Content-Transfer-Encoding: base64

JVBERi0=
"""

    inbound = parse_email(raw)

    assert inbound.text == "the text"
    assert [(a.filename, a.content) for a in inbound.attachments] == [
        ("a.pdf", b"%PDF-")
    ]
    assert "message: closing boundary missing" in inbound.defects


def test_multipart_whose_boundary_never_appears_is_read_as_text() -> None:
    raw = b"From: a@example.org\nContent-Type: multipart/mixed; boundary=zz\n\nhello\n"

    inbound = parse_email(raw)

    assert inbound.text == "hello\n"
    assert inbound.defects == ["message: multipart without parts"]


def test_nested_multiparts_give_body_html_and_every_attachment() -> None:
    raw = b"""\
From: a@example.org
Content-Type: multipart/mixed; boundary="mixed"

preamble is ignored
--mixed
Content-Type: multipart/alternative; boundary="mixed-alt"

--mixed-alt
Content-Type: text/plain; charset=us-ascii

plain body
--mixed-alt
Content-Type: multipart/related; boundary="mixed-alt-rel"

--mixed-alt-rel
Content-Type: text/html; charset=us-ascii

<p>html body <img src="cid:logo@x"></p>
--mixed-alt-rel
Content-Type: image/png
Content-ID: <logo@x>
Content-Transfer-Encoding: base64

iVBORw==
--mixed-alt-rel--
--mixed-alt--
--mixed
Content-Type: application/pdf
Content-Disposition: attachment; filename="invoice.pdf"

%PDF-
--mixed--
epilogue is ignored
"""

    inbound = parse_email(raw)

    assert inbound.text == "plain body"
    assert inbound.html == '<p>html body <img src="cid:logo@x"></p>'
    assert [
        (a.filename, a.content_type, a.content_id, a.inline)
        for a in inbound.attachments
    ] == [
        ("part-5.png", "image/png", "logo@x", True),
        ("invoice.pdf", "application/pdf", None, False),
    ]
    assert inbound.attachments[0].content == b"\x89PNG"
    assert inbound.defects == []


# --- attachments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        (b'attachment; filename="report.pdf"', "report.pdf"),
        (b"attachment; filename==?UTF-8?B?w6TDtsO8LnBkZg==?=", "äöü.pdf"),
        (b'attachment; filename="=?UTF-8?B?w6TDtsO8LnBkZg==?="', "äöü.pdf"),
        (b"attachment; filename*=UTF-8''%E2%82%AC%20rates.pdf", "€ rates.pdf"),
        (
            b"attachment; filename*0*=UTF-8''%E2%82%AC; filename*1=\" rates.pdf\"",
            "€ rates.pdf",
        ),
        (b"attachment; filename*=iso-8859-1'fr'caf%E9.pdf", "café.pdf"),
        (b'attachment; filename="caf\xc3\xa9.pdf"', "café.pdf"),
        (b'attachment; filename="C:\\\\Users\\\\me\\\\scan.pdf"', "scan.pdf"),
        (b"attachment", "part-2.pdf"),
    ],
)
def test_attachment_filenames_are_decoded(disposition: bytes, expected: str) -> None:
    raw = (
        b"From: a@example.org\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nsee attached\n"
        b"--b\nContent-Type: application/pdf\nContent-Disposition: "
        + disposition
        + b"\n\n%PDF-\n--b--\n"
    )

    inbound = parse_email(raw)

    assert [a.filename for a in inbound.attachments] == [expected]
    assert inbound.text == "see attached"


def test_name_on_the_content_type_is_used_when_the_disposition_has_none() -> None:
    raw = (
        b"From: a@example.org\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nhi\n"
        b'--b\nContent-Type: image/jpeg; name="=?iso-8859-1?Q?f=F6to.jpg?="\n\nJPG\n'
        b"--b--\n"
    )

    inbound = parse_email(raw)

    assert [a.filename for a in inbound.attachments] == ["föto.jpg"]


def test_undecodable_base64_part_keeps_its_raw_bytes() -> None:
    raw = (
        b"From: a@example.org\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nhi\n"
        b"--b\nContent-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n\nQUJDR\n--b--\n"
    )

    inbound = parse_email(raw)

    assert [(a.filename, a.content) for a in inbound.attachments] == [
        ("part-2.bin", b"QUJDR")
    ]
    assert inbound.defects == ["part 2: undecodable base64"]


def test_attached_message_is_named_after_its_subject() -> None:
    inner = b"From: b@example.org\nSubject: Re: the plan\n\ninner body\n"
    raw = (
        b"From: a@example.org\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nforwarding\n"
        b"--b\nContent-Type: message/rfc822\n\n" + inner + b"--b\n"
        b"Content-Type: message/rfc822\n\nFrom: c@example.org\n\nno subject\n"
        b"--b--\n"
    )

    inbound = parse_email(raw)

    assert [(a.filename, a.content_type) for a in inbound.attachments] == [
        ("Re_ the plan.eml", "message/rfc822"),
        ("message.eml", "message/rfc822"),
    ]
    assert inbound.attachments[0].content == inner.removesuffix(b"\n")
    assert inbound.text == "forwarding"


# --- delivery reports -----------------------------------------------------

DSN = b"""\
Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: support@example.com
Subject: Undelivered Mail Returned to Sender
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="rep"

--rep
Content-Type: text/plain

Your message could not be delivered.
--rep
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; Gone@Example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 user unknown

Final-Recipient: rfc822; later@example.org
Action: delayed
Status: 4.4.1 (timeout)
--rep
Content-Type: ORIGINAL

From: support@example.com
Message-ID: <ticket-42.1@intake.example.com>
Subject: Your ticket

body
--rep--
"""


@pytest.mark.parametrize("original", [b"message/rfc822", b"text/rfc822-headers"])
def test_delivery_report_yields_the_original_message_id(original: bytes) -> None:
    inbound = parse_email(DSN.replace(b"ORIGINAL", original))

    assert inbound.report_is_delivery_status is True
    assert inbound.report_message_ids == ["ticket-42.1@intake.example.com"]
    assert inbound.text == "Your message could not be delivered."


def test_delivery_report_recipients_are_read() -> None:
    inbound = parse_email(DSN.replace(b"ORIGINAL", b"message/rfc822"))

    statuses = parse_delivery_status(inbound)

    assert statuses == [
        DeliveryStatus("gone@example.org", "failed", "5.1.1"),
        DeliveryStatus("later@example.org", "delayed", "4.4.1"),
    ]


def test_plain_message_is_no_delivery_report() -> None:
    inbound = parse_email(PLAIN)

    assert inbound.report_is_delivery_status is False
    assert inbound.report_message_ids == []
    assert parse_delivery_status(inbound) == []


# --- input that is not mail -----------------------------------------------


def test_outlook_msg_file_is_unparseable_with_a_clear_reason() -> None:
    raw = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504

    with pytest.raises(Unparseable) as raised:
        parse_email(raw)

    assert "Outlook .msg" in raised.value.reason
    assert "not RFC 822 mail" in raised.value.reason
    assert ".eml" in raised.value.reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty input"),
        (b"\r\n \n", "empty input"),
        (
            b"MIT License\n\nCopyright (c) 2024 Someone\n\nPermission is hereby...\n",
            "first line is not a header field: 'MIT License'",
        ),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "first line is not a header field"),
        (b"name: intake\nversion: 1\n", "no usable header"),
    ],
)
def test_input_that_is_not_mail_is_unparseable(raw: bytes, reason: str) -> None:
    with pytest.raises(Unparseable) as raised:
        parse_email(raw)

    assert reason in raised.value.reason


@pytest.mark.parametrize(
    "raw",
    [
        b"Content-Type: text/plain; name*\n\nhi\n",
        b"From: (c):\nTo: (c):\nMessage-ID: <[]>\n\nhi\n",
        b"From: =?UTF-8?Q?=0AMy_self?= <me@example.org>\n\nhi\n",
        b"Subject: =?utf-8?b?=?= =?x?q??=\n\nhi\n",
        b"Content-Type: text/plain; charset=idna\n\n\xff\xfe\n",
        b"Content-Type: multipart/mixed; boundary=\xff\n\n--\xff\n\nx\n",
        b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n@@\n",
        b"Subject: x\n" + b"Content-Type: multipart/mixed; boundary=a\n\n--a\n" * 60,
    ],
)
def test_hostile_input_parses_without_raising(raw: bytes) -> None:
    inbound = parse_email(raw)

    assert isinstance(inbound, Inbound)


# --- content hash ---------------------------------------------------------


def test_content_hash_ignores_line_endings_and_transit_headers() -> None:
    via_smtp = PLAIN.replace(b"\n", b"\r\n")
    via_imap = (
        b"Return-Path: <jane@example.org>\n"
        b"Delivered-To: support@example.com\n"
        b"Received: from mx.example.org\n\tby imap.example.com; Tue, 2 Jan 2024\n"
        b"X-Spam-Status: No\n"
        b"ARC-Seal: i=1; cv=none\n" + PLAIN + b"\n\n"
    )
    from_mbox = b"From jane@example.org Tue Jan  2 10:00:00 2024\n" + PLAIN

    assert content_hash(via_smtp) == content_hash(PLAIN)
    assert content_hash(via_imap) == content_hash(PLAIN)
    assert content_hash(from_mbox) == content_hash(PLAIN)


def test_content_hash_differs_when_the_body_or_a_sender_header_differs() -> None:
    other_body = PLAIN.replace(b"my order", b"my refund")
    other_signature = b"DKIM-Signature: v=1; d=example.org\n" + PLAIN

    assert content_hash(other_body) != content_hash(PLAIN)
    assert content_hash(other_signature) != content_hash(PLAIN)


@pytest.mark.parametrize("raw", [b"", b"\x00\xff" * 100, b"no headers at all"])
def test_content_hash_takes_any_bytes(raw: bytes) -> None:
    digest = content_hash(raw)

    assert len(digest) == 64
    assert int(digest, 16) >= 0


# --- the real-world corpus ------------------------------------------------


@pytest.mark.corpus
def test_corpus_folder_is_present() -> None:
    if CORPUS.is_dir():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the corpus is missing at {CORPUS}; CI must provide it")
    pytest.skip(f"no corpus at {CORPUS}")


@pytest.mark.corpus
@pytest.mark.parametrize(
    "path", _corpus_files(), ids=lambda path: str(path.relative_to(CORPUS))
)
def test_corpus_file_parses_or_is_unparseable_with_a_reason(path: Path) -> None:
    raw = path.read_bytes()

    outcome = _parse_or_reason(raw)

    if isinstance(outcome, Unparseable):
        assert outcome.reason.strip()
        assert path.suffix != ".eml", outcome.reason
    else:
        assert isinstance(outcome, Inbound)
    assert len(content_hash(raw)) == 64
