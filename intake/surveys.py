"""Survey answers: a reply whose first word is a number on the survey's scale.

When a ticket is resolved the customer may be asked one question: CSAT ("how
satisfied, 1 to 5") or NPS ("how likely to recommend us, 0 to 10"). The
answer comes back as an ordinary reply, by email or SMS. ``parse_answer`` is
pure and decides from the text alone; ``take_answer`` is the thin adapter that
``accept()`` calls for a customer's message on a resolved ticket.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select, update

from intake import tickets
from store.models import Survey

log = logging.getLogger(__name__)

SCALES: dict[str, range] = {"csat": range(1, 6), "nps": range(0, 11)}
COMMENT_LIMIT = 2000

# "7", "7.", "7!", "(7)", "7/10": the number, then an optional "/<top>".
_SCORE = re.compile(r"\(?(\d{1,2})(?:/(\d{1,2}))?\)?[.,;:!]*")
# Where the customer's own words end and the quoted conversation begins.
_QUOTE_STARTS = (
    re.compile(r"^>"),
    re.compile(r"^On .{0,200}wrote:\s*$"),
    re.compile(r"^Am .{0,200}schrieb .{0,200}:\s*$"),
    re.compile(r"^-{2,}\s*Original Message\s*-{2,}", re.IGNORECASE),
    re.compile(r"^From: "),
    re.compile(r"^-- $"),
    re.compile(r"^_{10,}$"),  # Outlook's rule above the quoted message
)


@dataclass(frozen=True, slots=True)
class Answer:
    score: int
    comment: str


def parse_answer(text: str, scale: str) -> Answer | None:
    """The answer in ``text`` when its first word is a score on ``scale``.

    Anything after the first word, up to the quoted conversation, is the
    comment. ``None`` when the first word is anything else: a word, a number
    out of range, a decimal, or a score out of another scale ("4/10" is not
    a CSAT answer).
    """
    scores = SCALES[scale]
    words = _own_words(text).split(maxsplit=1)
    if not words:
        return None

    match = _SCORE.fullmatch(words[0])
    if match is None:
        return None
    score = int(match[1])
    if score not in scores:
        return None
    if match[2] is not None and int(match[2]) != scores[-1]:
        return None

    comment = words[1].strip(" \t\r\n-–—:,") if len(words) > 1 else ""

    return Answer(score, comment[:COMMENT_LIMIT])


def _own_words(text: str) -> str:
    """``text`` up to the first line that starts the quoted conversation."""
    kept = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if any(pattern.match(line) for pattern in _QUOTE_STARTS):
            break
        kept.append(line)

    return "\n".join(kept).strip()


def take_answer(
    connection: Connection, ticket_id: int, text: str, now: datetime
) -> bool:
    """Record ``text`` as the answer to the ticket's survey, if it is one.

    Call it only for a customer's message on a resolved ticket. True when
    the message is a survey answer: the caller then stores it on the ticket
    and leaves the ticket resolved. Only the first answer counts; a second
    one is kept as a message and changes nothing.
    """
    survey = connection.execute(
        select(Survey.id, Survey.scale, Survey.answered_at).where(
            Survey.ticket_id == ticket_id
        )
    ).first()
    if survey is None:
        return False
    answer = parse_answer(text, survey.scale)
    if answer is None:
        return False

    if survey.answered_at is not None:
        log.info("survey: ticket_id=%s answered before; first answer kept", ticket_id)
        return True

    connection.execute(
        update(Survey)
        .where(Survey.id == survey.id, Survey.answered_at.is_(None))
        .values(score=answer.score, comment=answer.comment, answered_at=now)
    )
    tickets.record(
        connection,
        ticket_id,
        "survey-answer",
        now,
        scale=survey.scale,
        score=answer.score,
    )
    log.info("survey: ticket_id=%s %s answer %d", ticket_id, survey.scale, answer.score)

    return True
