"""Agents and their commands: who is an agent, and what a reply asks for.

Pure: the roster is built from the settings and kept in memory, so telling
an agent from a customer costs a dictionary lookup; ``read_commands`` is a
function of the reply's text, the roster and the time. Applying the
commands to a ticket is the message path's business (``intake.accept``).

Commands stand one per line at the top of a reply, before its text::

    #assign carol
    #priority high
    Carol will call you this afternoon.

``#note`` ends the commands: everything after it stays internal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo

__all__ = [
    "LEVELS",
    "Agent",
    "Command",
    "Commands",
    "Roster",
    "looks_like_commands",
    "parse_due",
    "read_commands",
]

LEVELS = ("low", "normal", "high", "urgent")
NAMES = ("resolve", "reopen", "assign", "note", "due", "priority")
# What "#due 2026-03-05" means: the end of that working day, local time.
END_OF_DAY = time(17, 0)
# A line that tries to be a command: "#" and a word starting with a letter,
# so "#1234 is my order" is text.
_COMMAND = re.compile(r"^#([A-Za-z][\w-]*)(?:[ \t]+(.*?))?\s*$")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_SPAN = re.compile(r"(\d{1,3})\s*(h|hours?|d|days?|w|weeks?)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Agent:
    """A configured agent, with the id of their row in the store."""

    id: int
    name: str
    email: str


class Roster:
    """The configured agents, looked up by address or by name."""

    def __init__(self, agents: Iterable[Agent]) -> None:
        self.agents = tuple(agents)
        self._by_email = {agent.email.casefold(): agent for agent in self.agents}
        self._by_id = {agent.id: agent for agent in self.agents}

    def __bool__(self) -> bool:
        return bool(self.agents)

    def by_email(self, address: str) -> Agent | None:
        return self._by_email.get(address.casefold())

    def by_id(self, agent_id: int | None) -> Agent | None:
        return self._by_id.get(agent_id) if agent_id is not None else None

    def matching(self, wanted: str) -> list[Agent]:
        """Agents ``wanted`` names: the whole name, one word of it, the
        address or its local part, case ignored. An exact name or address
        wins over a partial match."""
        key = wanted.strip().casefold()
        exact = [
            agent
            for agent in self.agents
            if key in (agent.name.casefold(), agent.email.casefold())
        ]
        if exact:
            return exact

        return [
            agent
            for agent in self.agents
            if key in agent.name.casefold().split()
            or key == agent.email.casefold().partition("@")[0]
        ]


@dataclass(frozen=True, slots=True)
class Command:
    """One understood command; ``value`` is its checked argument."""

    name: str
    value: str | int | datetime | None = None
    line: str = ""


@dataclass(frozen=True, slots=True)
class Commands:
    """What the top of a reply asks for, and the reply's remaining text.

    ``problems`` says, one sentence each, what was not understood; when it
    is not empty nothing may be applied. ``note`` is the internal text after
    ``#note`` (None without one); ``text`` is what goes to the customer.
    """

    commands: list[Command] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    text: str = ""
    note: str | None = None

    def named(self, name: str) -> Command | None:
        return next((c for c in self.commands if c.name == name), None)


def looks_like_commands(text: str) -> bool:
    """Whether the first line with words is a known ``#command``.

    Cheap enough for every customer message: only mail that passes it is
    read closely, so a customer writing "#resolve" is told that only agents'
    commands count.
    """
    for line in text.lstrip().splitlines()[:1]:
        match = _COMMAND.match(line.strip())
        return match is not None and match[1].lower() in NAMES
    return False


def read_commands(
    text: str,
    roster: Roster,
    *,
    sender: Agent | None,
    now: datetime,
    zone: tzinfo,
) -> Commands:
    """The commands at the top of ``text`` (quotes already stripped)."""
    lines = text.strip("\n").splitlines()
    found: list[Command] = []
    problems: list[str] = []
    note: str | None = None

    text_starts = len(lines)
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            continue
        match = _COMMAND.match(stripped)
        if match is None:
            text_starts = index
            break
        name, argument = match[1].lower(), (match[2] or "").strip()
        if name == "note":
            note = "\n".join([argument, *lines[index + 1 :]]).strip()
            break
        understood = _one(
            name, argument, stripped, roster=roster, sender=sender, now=now, zone=zone
        )
        if isinstance(understood, str):
            problems.append(understood)
        else:
            found.append(understood)

    problems += _clashes(found)
    if note == "":
        problems.append("#note: there is no text after it to keep as the note")
    reply = "\n".join(lines[text_starts:]).strip()

    return Commands(found, problems, reply, note)


def _one(
    name: str,
    argument: str,
    line: str,
    *,
    roster: Roster,
    sender: Agent | None,
    now: datetime,
    zone: tzinfo,
) -> Command | str:
    """The command on ``line``, or a sentence saying what is wrong with it."""
    if name not in NAMES:
        known = ", ".join(f"#{known}" for known in NAMES)
        return f"{line}: not a command; the commands are {known}"

    if name in ("resolve", "reopen"):
        if argument:
            return f"{line}: #{name} takes nothing after it"
        return Command(name, None, line)

    if not argument:
        return f"{line}: #{name} needs a value, such as {_EXAMPLES[name]}"

    if name == "assign":
        return _assignee(argument, line, roster, sender)
    if name == "priority":
        level = argument.lower()
        if level not in LEVELS:
            return f"{line}: the priority must be one of {', '.join(LEVELS)}"
        return Command(name, level, line)

    due = parse_due(argument, now, zone)
    if due is None:
        return (
            f"{line}: not a date; write 2026-03-05, 2026-03-05 14:00, today, "
            "tomorrow, a weekday, or a span such as 3d or 8h"
        )
    if due <= now:
        return f"{line}: that is in the past"
    return Command(name, due, line)


_EXAMPLES = {
    "assign": "#assign carol",
    "priority": "#priority high",
    "due": "#due 2026-03-05",
}


def _assignee(
    argument: str, line: str, roster: Roster, sender: Agent | None
) -> Command | str:
    wanted = argument.casefold()
    if wanted in ("nobody", "none"):
        return Command("assign", None, line)
    if wanted == "me":
        if sender is None:
            return f"{line}: only an agent can take a ticket"
        return Command("assign", sender.id, line)

    matches = roster.matching(argument)
    if not matches:
        names = ", ".join(agent.name for agent in roster.agents) or "none configured"
        return f"{line}: no agent is called {argument!r} (agents: {names})"
    if len(matches) > 1:
        names = " or ".join(f"{a.name} <{a.email}>" for a in matches)
        return f"{line}: {argument!r} could be {names}; write the whole name"

    return Command("assign", matches[0].id, line)


def _clashes(found: Sequence[Command]) -> list[str]:
    """Commands that contradict each other are ambiguous, never guessed."""
    problems = []
    names = [command.name for command in found]
    if "resolve" in names and "reopen" in names:
        problems.append("#resolve and #reopen together: which one did you mean?")
    for name in sorted(set(names)):
        lines = [c.line for c in found if c.name == name]
        if len(lines) > 1 and len({c.value for c in found if c.name == name}) > 1:
            problems.append(f"{' and '.join(lines)}: which one did you mean?")

    return problems


def parse_due(value: str, now: datetime, zone: tzinfo) -> datetime | None:
    """A due date from an agent's words, aware and in UTC; None if unreadable.

    A day without a time means the end of that working day (17:00) in the
    business's time zone.
    """
    text = " ".join(value.lower().split())
    local_now = now.astimezone(zone)

    span = _SPAN.fullmatch(text)
    if span is not None:
        amount, unit = int(span[1]), span[2][0]
        hours = {"h": 1, "d": 24, "w": 24 * 7}[unit]
        return now + timedelta(hours=amount * hours)

    day = _day(text, local_now.date())
    if day is not None:
        return _at(day, END_OF_DAY, zone)

    try:
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC)


def _day(text: str, today: date) -> date | None:
    if text == "today":
        return today
    if text == "tomorrow":
        return today + timedelta(days=1)
    weekdays = (*_WEEKDAYS, "sunday")
    if text in weekdays:
        ahead = (weekdays.index(text) - today.weekday()) % 7 or 7
        return today + timedelta(days=ahead)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            return None
    return None


def _at(day: date, clock: time, zone: tzinfo) -> datetime:
    return datetime.combine(day, clock, zone).astimezone(UTC)
