"""What an agent wrote in a reply, without the quoted conversation or a
signature.

The work is done by mail-parser-reply, chosen by measuring four libraries on
the replies in ``tests/reply_samples.py`` (Gmail, Outlook, Apple Mail,
Thunderbird and Yahoo shapes, in English, German and French): it kept the
right text in 19 of 20, as talon did, but it is maintained, pure Python and
brings no dependencies (talon needs scikit-learn and was last released in
2017); email-reply-parser managed 14, quotequail 13.

Two rules of our own cover what it misses: a block of ``>`` lines at the end,
under an attribution line, is cut in any language ("Le ... a écrit :"); and
a reply that would come out empty keeps the agent's own unquoted lines, so
an answer written between quoted lines is never lost.
"""

from __future__ import annotations

import logging
import re

from mailparser_reply.parser import (  # type: ignore[import-untyped]  # no stubs
    EmailMessage,
)

log = logging.getLogger(__name__)

# Languages whose attribution and header lines the library knows; English
# is always among them. Each one costs about 0.1 ms a reply.
LANGUAGES = ("en", "de", "fr", "es", "it", "nl")
# Past this a reply is not a reply but a pasted document; it is still sent,
# only not searched for quotes beyond this point.
MAX_CHARS = 200_000

_ATTRIBUTION_END = re.compile(r"[:：]\s*$")


def visible_text(text: str) -> str:
    """The agent's own words from the text part of their reply."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")[:MAX_CHARS]

    body = _library(text)
    body = _without_trailing_quote(body)
    if not body.strip():
        body = _own_lines(text)

    return body.strip()


def _library(text: str) -> str:
    try:
        message = EmailMessage(
            text=text, languages=list(LANGUAGES), keep_hyphen_lists=True
        ).read()
    except Exception:  # a library bug must not lose the reply
        log.exception("replies: mail-parser-reply failed; using our own rules")
        return text
    if not message.replies:
        return text

    return str(message.replies[0].body)


def _without_trailing_quote(text: str) -> str:
    """Cut a final block of quoted lines and the attribution line above it."""
    lines = text.rstrip().split("\n")
    end = len(lines)
    while end and (lines[end - 1].startswith(">") or not lines[end - 1].strip()):
        end -= 1
    if end == len(lines):
        return text

    above = end
    while above and not lines[above - 1].strip():
        above -= 1
    if above and _ATTRIBUTION_END.search(lines[above - 1]):
        end = above - 1

    return "\n".join(lines[:end])


def _own_lines(text: str) -> str:
    """Every line that is not quoted and does not introduce a quote."""
    lines = text.split("\n")
    kept = []
    for index, line in enumerate(lines):
        if line.startswith(">"):
            continue
        following = next((n for n in lines[index + 1 :] if n.strip()), "")
        if following.startswith(">") and _ATTRIBUTION_END.search(line):
            continue
        kept.append(line)

    return "\n".join(kept)
