"""The threading ladder: which ticket does a message belong to?

First match wins, and nothing fuzzy is ever tried:
1. In-Reply-To / References naming a Message-ID we stored, in or out.
2. The per-ticket reply address ``support+<number>.<mac>@domain``, found in
   To, Cc, Delivered-To or the envelope, whose MAC proves we handed it out.
3. A subject token ``[#1234]``, only from a participant of that ticket; from
   anyone else it starts a new ticket linked to the quoted one.
5. Otherwise a new ticket.
(Step 4, the phone number, belongs to the SMS and call channels.)

Only steps 1 and 2 are proof: a Message-ID of ours or a MAC keyed by our
secret cannot be guessed from the outside. A subject token can.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Collection, Iterable

from sqlalchemy import Connection, bindparam, select

from intake.domain import Inbound
from intake.tickets import REF_COLUMNS, Found, TicketRef, by_number, is_participant
from store.tables import messages, tickets

log = logging.getLogger(__name__)

# Known Message-IDs with their tickets, one query for the whole first rung.
KNOWN_IDS = (
    select(messages.c.message_id, *REF_COLUMNS)
    .select_from(messages.outerjoin(tickets, tickets.c.id == messages.c.ticket_id))
    .where(messages.c.message_id.in_(bindparam("ids", expanding=True)))
    # Oldest first, so that when a sender reused a Message-ID the newest
    # message carrying it decides, the same way every time.
    .order_by(messages.c.id)
)
# Steps that prove the sender was sent something of that ticket's.
PROVEN = frozenset({"headers", "reply-address"})
MAC_CHARS = 12  # hex: 48 bits, against guesses one email at a time


class ReplyAddresses:
    """``support+<number>.<mac>@domain``: a ticket's own reply address.

    The MAC is an HMAC-SHA256 over the ticket number keyed by the reply
    secret, so the address cannot be made up for another ticket. Local
    parts are compared without case, as some mail systems lower-case them.
    """

    def __init__(
        self, secret: str, support_address: str, domains: Collection[str]
    ) -> None:
        self._key = secret.encode("utf-8")
        self.local, _, self.domain = support_address.rpartition("@")
        wanted = {self.domain.lower(), *(d.lower() for d in domains)}
        self._pattern = re.compile(
            re.escape(self.local) + r"\+(\d{1,12})\.([0-9a-f]{" + str(MAC_CHARS) + "})",
            re.IGNORECASE,
        )
        self._domains = frozenset(wanted)

    def for_ticket(self, number: int) -> str:
        return f"{self.local}+{number}.{self._mac(number)}@{self.domain}"

    def number_in(self, addresses: Iterable[str]) -> int | None:
        """The ticket number of the first correctly signed reply address."""
        for address in addresses:
            local, _, domain = address.strip().strip("<>").rpartition("@")
            if domain.lower() not in self._domains:
                continue
            match = self._pattern.fullmatch(local)
            if match is None:
                continue
            number = int(match[1])
            if hmac.compare_digest(self._mac(number), match[2].lower()):
                return number
            log.info("threading: %s has a wrong MAC; not a reply address", address)

        return None

    def _mac(self, number: int) -> str:
        digest = hmac.new(self._key, str(number).encode(), hashlib.sha256)
        return digest.hexdigest()[:MAC_CHARS]


def addressed_to(inbound: Inbound) -> list[str]:
    """Every address the message was delivered to: the envelope first (it
    survives clients that drop headers), then the delivery and To/Cc headers."""
    found = list(inbound.envelope_recipients)
    for name in ("delivered-to", "x-original-to"):
        found += inbound.header_all(name)
    found += [address.email for address in [*inbound.to, *inbound.cc]]

    return found


class Ladder:
    def __init__(
        self, subject_prefix: str, reply_addresses: ReplyAddresses | None = None
    ) -> None:
        self.token = re.compile(r"\[" + re.escape(subject_prefix) + r"(\d{1,12})\]")
        self.reply_addresses = reply_addresses

    def find(self, connection: Connection, inbound: Inbound) -> tuple[Found, bool]:
        """Where ``inbound`` belongs, and whether its own Message-ID was
        seen before (some senders reuse them; the message is still new)."""
        ticket, reused = self.by_headers(connection, inbound)
        if ticket is not None:
            return Found(ticket, "headers"), reused

        ticket = self.by_reply_address(connection, inbound)
        if ticket is not None:
            return Found(ticket, "reply-address"), reused

        quoted = self.by_subject_token(connection, inbound.subject)
        if quoted is None:
            return Found(None, "new"), reused
        sender = inbound.sender.email if inbound.sender else ""
        if sender and is_participant(connection, quoted, sender):
            return Found(quoted, "subject-token"), reused

        # A stranger quoting someone's ticket number must not read or write
        # that ticket; the new ticket points at it for the agents.
        return Found(None, "new", linked=quoted), reused

    def by_headers(
        self, connection: Connection, inbound: Inbound
    ) -> tuple[TicketRef | None, bool]:
        """The ticket of the nearest ancestor we know (RFC 5322 §3.6.4).

        In-Reply-To names the parent; References lists ancestors oldest
        first, so it is read from the end. The same query tells whether the
        message's own Message-ID is known already.
        """
        wanted = [*inbound.in_reply_to, *reversed(inbound.references)]
        own = inbound.message_id
        if not wanted and own is None:
            return None, False

        asked = set(wanted) | ({own} if own else set())
        rows = connection.execute(KNOWN_IDS, {"ids": sorted(asked)}).all()
        reused = any(row[0] == own for row in rows)
        ticket_of = {row[0]: TicketRef(*row[1:]) for row in rows if row[1] is not None}
        for message_id in wanted:
            if message_id in ticket_of:
                return ticket_of[message_id], reused

        return None, reused

    def by_reply_address(
        self, connection: Connection, inbound: Inbound
    ) -> TicketRef | None:
        if self.reply_addresses is None:
            return None
        number = self.reply_addresses.number_in(addressed_to(inbound))
        if number is None:
            return None

        return by_number(connection, number)

    def by_subject_token(
        self, connection: Connection, subject: str
    ) -> TicketRef | None:
        # The last token: a subject that quotes an older ticket's token
        # and then gained its own ends with the newest one.
        found = self.token.findall(subject)
        if not found:
            return None

        return by_number(connection, int(found[-1]))
