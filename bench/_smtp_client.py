"""The SMTP load client: persistent connections, one asyncio loop, one process.

Closed loop by default: each connection sends its next message as soon as the
last one was answered, and a reply waits until the message it answers has
been answered (a customer replies to mail that arrived; without this a reply
could overtake its parent on another connection and rightly open a ticket).
With ``--rate`` the load is open loop: message i is due at i/rate seconds,
whatever the server does, and waits for a free connection if none is idle.

Prints one JSON line: counts, wall time, and per message the time from the
DATA command to the 250 (``data_ms``) and from when it was due (``due_ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass
from email.utils import parseaddr
from itertools import cycle
from pathlib import Path

import aiosmtplib


@dataclass(frozen=True)
class Mail:
    message_id: str
    parent: str | None  # the message of the same thread sent before this one
    sender: str
    raw: bytes


def load(corpus: Path, manifest: Path, count: int) -> list[Mail]:
    """The first ``count`` messages, CRLF line endings, read before timing."""
    entries = json.loads(manifest.read_text())[:count]
    last_of_thread: dict[str, str] = {}
    mails = []
    for entry in entries:
        raw = re.sub(rb"\r?\n|\r", b"\r\n", (corpus / entry["file"]).read_bytes())
        sender = _sender(raw)
        parent = last_of_thread.get(entry["root"]) if entry["kind"] != "new" else None
        last_of_thread[entry["root"]] = entry["message_id"]
        mails.append(Mail(entry["message_id"], parent, sender, raw))

    return mails


def _sender(raw: bytes) -> str:
    match = re.search(rb"^From: (.*)$", raw, re.MULTILINE)
    value = match[1].decode("ascii", "replace") if match else ""

    return parseaddr(value)[1] or "unknown@example.com"


class Load:
    def __init__(self, mails: list[Mail], rcpt: str, ordered: bool) -> None:
        self.mails = mails
        self.rcpt = rcpt
        self.ordered = ordered
        self.answered = {mail.message_id: asyncio.Event() for mail in mails}
        self.codes: dict[str, int] = {}
        self.data_ms: list[float] = []
        self.due_ms: list[float] = []

    async def send(self, client: aiosmtplib.SMTP, mail: Mail, due: float) -> None:
        if self.ordered and mail.parent in self.answered:
            await self.answered[mail.parent].wait()
        try:
            await client.mail(mail.sender, options=["BODY=8BITMIME"])
            await client.rcpt(self.rcpt)
            started = time.perf_counter()
            response = await client.data(mail.raw)
            ended = time.perf_counter()
            code = response.code
            self.data_ms.append((ended - started) * 1000)
            self.due_ms.append((ended - due) * 1000)
        except aiosmtplib.SMTPResponseException as exc:
            code = exc.code
            await client.rset()
        self.codes[str(code)] = self.codes.get(str(code), 0) + 1
        self.answered[mail.message_id].set()


async def connect(targets: list[tuple[str, int]], count: int) -> list[aiosmtplib.SMTP]:
    clients = []
    for _, (host, port) in zip(range(count), cycle(targets), strict=False):
        client = aiosmtplib.SMTP(hostname=host, port=port, timeout=120)
        await client.connect()
        await client.ehlo()
        clients.append(client)

    return clients


async def closed_loop(load: Load, clients: list[aiosmtplib.SMTP]) -> None:
    pending = iter(load.mails)

    async def worker(client: aiosmtplib.SMTP) -> None:
        for mail in pending:  # one shared iterator: the next message in line
            await load.send(client, mail, time.perf_counter())

    await asyncio.gather(*(worker(client) for client in clients))


async def open_loop(load: Load, clients: list[aiosmtplib.SMTP], rate: float) -> None:
    queue: asyncio.Queue[tuple[Mail, float] | None] = asyncio.Queue()

    async def worker(client: aiosmtplib.SMTP) -> None:
        while (item := await queue.get()) is not None:
            await load.send(client, *item)

    workers = [asyncio.create_task(worker(client)) for client in clients]
    start = time.perf_counter()
    for number, mail in enumerate(load.mails):
        due = start + number / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        queue.put_nowait((mail, due))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)


async def main() -> None:
    options = argparse.ArgumentParser(description=__doc__)
    options.add_argument("--corpus", type=Path, required=True)
    options.add_argument("--manifest", type=Path, required=True)
    options.add_argument("--count", type=int, required=True)
    options.add_argument("--connections", type=int, default=16)
    options.add_argument("--target", action="append", required=True)
    options.add_argument("--rcpt", required=True)
    options.add_argument("--rate", type=float, default=0.0)
    args = options.parse_args()

    targets = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in args.target]
    mails = load(args.corpus, args.manifest, args.count)
    load_ = Load(mails, args.rcpt, ordered=not args.rate)
    clients = await connect(targets, args.connections)

    started = time.perf_counter()
    if args.rate:
        await open_loop(load_, clients, args.rate)
    else:
        await closed_loop(load_, clients)
    elapsed = time.perf_counter() - started

    for client in clients:
        await client.quit()
    print(
        json.dumps(
            {
                "sent": len(mails),
                "bytes": sum(len(mail.raw) for mail in mails),
                "codes": load_.codes,
                "seconds": elapsed,
                "data_ms": load_.data_ms,
                "due_ms": load_.due_ms,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
