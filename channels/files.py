"""File imports: .eml files, folders of them, maildirs and mbox files.

Messages are imported parents first. A folder's order says nothing about a
conversation, and a reply stored before the message it answers would open a
ticket of its own; so the headers are read once, the messages sorted by date,
and every message moved behind the ancestors it names that are in the same
import.
"""

from __future__ import annotations

import mailbox
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path

from channels.email import RawEmail, arrival
from channels.mime import extract_message_ids
from intake.accept import Arrival

HEADER_READ = 64 * 1024
SOURCE_LENGTH = 100  # messages.source
_MBOX_SEPARATOR = re.compile(rb"From [^\s:]+ ")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Item:
    """One message to import: where it is, and what its headers say."""

    label: str
    load: Callable[[], bytes]
    position: int
    message_id: str | None = None
    parents: list[str] = field(default_factory=list)
    date: datetime = _EPOCH


def collect(paths: Iterable[Path]) -> list[Item]:
    """Every message under ``paths``, in import order.

    A folder with ``cur``/``new`` is a maildir; any other folder is walked
    for regular files (hidden ones skipped); a file that starts with
    ``From `` is an mbox; any other file is one message. A file that is not
    mail at all is still imported, and lands in the quarantine with why.
    """
    items: list[Item] = []
    for path in paths:
        for label, load in _sources(Path(path)):
            items.append(_describe(label, load, len(items)))

    return parents_first(items)


def _sources(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    if path.is_dir() and (path / "cur").is_dir() and (path / "new").is_dir():
        yield from _maildir(path)
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    yield from _sources(Path(root) / name)
    elif _is_mbox(path):
        yield from _mbox(path)
    elif path.exists():
        yield str(path), path.read_bytes
    else:
        raise FileNotFoundError(path)


def _is_mbox(path: Path) -> bool:
    """An mbox starts with ``From sender date``; ``From: ...`` is a header,
    and so is RFC 822's obsolete ``From  : ...`` with space before the colon.
    """
    with path.open("rb") as handle:
        return _MBOX_SEPARATOR.match(handle.readline()) is not None


def _maildir(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    box = mailbox.Maildir(path, factory=None, create=False)
    for key in sorted(box.iterkeys()):
        yield f"{path}:{key}", partial(box.get_bytes, key)


def _mbox(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Each message of an mbox, found by its ``From `` line, read on demand.

    Only offsets are kept, so a large archive is never held in memory.
    """
    starts: list[int] = []
    position = 0
    after_blank = True
    with path.open("rb") as handle:
        for line in handle:
            if after_blank and _MBOX_SEPARATOR.match(line):
                starts.append(position)
            after_blank = line in (b"\n", b"\r\n")
            position += len(line)

    ends = [*starts[1:], position]
    for number, (start, end) in enumerate(zip(starts, ends, strict=True)):
        yield f"{path}:{number}", partial(_mbox_entry, path, start, end)


def _mbox_entry(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        entry = handle.read(end - start)

    return entry.partition(b"\n")[2]  # without the "From " separator line


def _describe(label: str, load: Callable[[], bytes], position: int) -> Item:
    item = Item(label, load, position)
    try:
        head = load()[:HEADER_READ].split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        headers = BytesHeaderParser(policy=compat32).parsebytes(head)
        ids = extract_message_ids(str(headers.get("Message-ID", "")))
        item.message_id = ids[0] if ids else None
        item.parents = extract_message_ids(
            f"{headers.get('In-Reply-To', '')} {headers.get('References', '')}"
        )
        item.date = _date(str(headers.get("Date", "")))
    except Exception:  # noqa: BLE001 (ordering is a nicety; parsing decides)
        return item

    return item


def _date(value: str) -> datetime:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return _EPOCH
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)

    return parsed


def parents_first(items: list[Item]) -> list[Item]:
    """Date order, except that no message comes before a parent it names."""
    by_date = sorted(items, key=lambda item: (item.date, item.position))
    by_id = {item.message_id: item for item in by_date if item.message_id}
    ordered: list[Item] = []
    placed: set[int] = set()
    visiting: set[int] = set()

    for item in by_date:
        # Depth-first over named parents, iteratively; ``visiting`` stops
        # the reference cycles that broken clients do produce.
        stack = [(item, False)]
        while stack:
            current, expanded = stack.pop()
            if expanded:
                placed.add(current.position)
                ordered.append(current)
                continue
            if current.position in placed or current.position in visiting:
                continue
            visiting.add(current.position)
            stack.append((current, True))
            for parent_id in reversed(current.parents):
                parent = by_id.get(parent_id)
                if parent is not None and parent.position not in visiting:
                    stack.append((parent, False))

    return ordered


def parsed(
    items: list[Item], *, acknowledge: bool, batch: int, workers: int
) -> Iterator[list[tuple[Item, Arrival]]]:
    """The items parsed, in order, ``batch`` at a time.

    Parsing is pure and CPU-bound, so a pool of processes does it while the
    caller stores the previous batch; a bounded number of batches is in
    flight, so a large mbox is never held in memory whole.
    """
    chunks = [items[start : start + batch] for start in range(0, len(items), batch)]
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield list(
                zip(chunk, _parse_chunk(_emails(chunk, acknowledge)), strict=True)
            )
        return

    with ProcessPoolExecutor(workers) as pool:
        pending: deque[tuple[list[Item], Future[list[Arrival]]]] = deque()
        for chunk in chunks:
            pending.append(
                (chunk, pool.submit(_parse_chunk, _emails(chunk, acknowledge)))
            )
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield list(zip(done, future.result(), strict=True))
        while pending:
            done, future = pending.popleft()
            yield list(zip(done, future.result(), strict=True))


def _emails(chunk: list[Item], acknowledge: bool) -> list[RawEmail]:
    # The file in the source, so a quarantined one can be traced back to it.
    return [
        RawEmail(item.load(), _source(item.label), acknowledge=acknowledge)
        for item in chunk
    ]


def _source(label: str) -> str:
    """``import:PATH``, the path's end kept within the column's 100 chars."""
    room = SOURCE_LENGTH - len("import:")
    return "import:" + (label if len(label) <= room else "…" + label[-(room - 1) :])


def _parse_chunk(emails: list[RawEmail]) -> list[Arrival]:
    return [arrival(email) for email in emails]
