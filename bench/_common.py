"""What the benchmark scripts share: the corpus, daemons, the threading check.

Not a figure of its own (the leading underscore keeps the smoke test from
running it). Every helper here talks to Intake the way an operator would:
``intake`` commands as child processes, mail over loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # scripts run as ``python bench/NAME.py``
    sys.path.insert(0, str(REPO))

from tests.conftest import DaemonProcess, free_port, run_cli  # noqa: E402

MAKE_CORPUS = REPO.parent / "shared" / "tools" / "make_corpus.py"
CORPUS_CACHE = Path(tempfile.gettempdir()) / "intake-bench-corpus"
SUPPORT = "support@helpdesk.example.com"  # the To of every corpus message
DOMAIN = "helpdesk.example.com"
SKIPPED = "skipped:"  # the first word of a script that cannot run here

__all__ = [
    "BENCH",
    "DOMAIN",
    "REPO",
    "SKIPPED",
    "SUPPORT",
    "Corpus",
    "DaemonProcess",
    "Threading",
    "check_threading",
    "conditions",
    "corpus",
    "crlf",
    "daemon",
    "free_port",
    "intake_json",
    "memory",
    "parser",
    "percentile",
    "print_table",
    "run_cli",
    "skip",
    "wait_port",
    "workdir",
    "write_config",
]


# -- command line and output ---------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The options every script takes; ``--small`` is the smoke test's load."""
    found = argparse.ArgumentParser(description=description)
    found.add_argument("--small", action="store_true", help="a tiny load")
    found.add_argument(
        "--keep", action="store_true", help="keep the work folder (logs, database)"
    )
    return found


def skip(reason: str) -> None:
    """Say why the figure cannot be measured here, and exit 0."""
    print(f"{SKIPPED} {reason}")
    sys.exit(0)


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A small fixed-width table; columns of numbers right-aligned."""
    body = [[_cell(cell) for cell in row] for row in rows]
    cells = [[str(cell) for cell in header], *body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [
        all(_NUMERIC.fullmatch(row[i]) for row in body if row[i])
        for i in range(len(header))
    ]

    print(f"\n{title}")
    for number, row in enumerate(cells):
        line = (
            text.rjust(width) if flush_right else text.ljust(width)
            for text, width, flush_right in zip(row, widths, right, strict=True)
        )
        print("  ".join(line).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))


_NUMERIC = re.compile(r"[-+]?[\d,.]+( ?[a-zA-Z%/]+)?|x[\d.]+|-")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def conditions() -> None:
    """The load on the machine when the figures were taken: others share it."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\n(load average at the end: {load}; {os.cpu_count()} CPUs)")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; ``fraction`` from 0 to 1."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))

    return ordered[rank - 1]


@contextmanager
def workdir(name: str, keep: bool) -> Iterator[Path]:
    """A fresh folder for one run; removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=f"intake-bench-{name}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"(work folder kept: {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- the corpus ----------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    folder: Path
    manifest: list[dict[str, Any]]

    def files(self) -> list[Path]:
        return [self.folder / entry["file"] for entry in self.manifest]


def corpus(count: int, seed: int = 42) -> Corpus:
    """``count`` messages from make_corpus.py, generated once and cached."""
    if not MAKE_CORPUS.is_file():
        print(f"error: {MAKE_CORPUS} is missing; the corpus comes from there")
        sys.exit(2)

    final = CORPUS_CACHE / f"corpus-{count}-seed{seed}"
    manifest = final.with_name(final.name + ".manifest.json")
    if not manifest.is_file():
        CORPUS_CACHE.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix="building-", dir=CORPUS_CACHE))
        subprocess.run(
            [
                sys.executable,
                str(MAKE_CORPUS),
                str(count),
                str(building / "corpus"),
                "--seed",
                str(seed),
                "--manifest",
                str(building / "manifest.json"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # Two runs may build the same corpus at once; the first rename wins.
        try:
            (building / "corpus").rename(final)
            (building / "manifest.json").rename(manifest)
        except OSError:
            pass
        shutil.rmtree(building, ignore_errors=True)

    return Corpus(final, json.loads(manifest.read_text()))


def crlf(raw: bytes) -> bytes:
    """Line endings as SMTP carries them."""
    return re.sub(rb"\r?\n|\r", b"\r\n", raw)


# -- the daemon ----------------------------------------------------------------


def write_config(
    directory: Path,
    *,
    port: int,
    store_url: str = "",
    extra: str = "",
    max_message_bytes: int | None = None,
) -> Path:
    """Settings as an operator writes them; SMTP on ``port``, our domain."""
    lines = [
        f'state_dir = "{directory / "state"}"',
        "[store]",
        f'url = "{store_url}"',
        "[smtp]",
        f'listen = "127.0.0.1:{port}"',
        f'domains = ["{DOMAIN}"]',
    ]
    if max_message_bytes is not None:
        lines.append(f"max_message_bytes = {max_message_bytes}")
    path = directory / "intake.toml"
    path.write_text("\n".join(lines) + "\n" + extra)

    return path


@contextmanager
def daemon(directory: Path, **config: Any) -> Iterator[DaemonProcess]:
    """``intake run`` on a free port, stopped with SIGTERM afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path = write_config(directory, port=port, **config)
    process = DaemonProcess(path, port, directory / "daemon.log")
    process.start(timeout=60)
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            process.stop(timeout=60)


def intake_json(config: Path, *args: str) -> Any:
    """An ``intake`` command's ``--json`` output, parsed."""
    return json.loads(run_cli(config, *args, "--json").stdout)


def wait_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB (10^6 bytes)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024 / 1e6

    return found


# -- did every message land once, on the right ticket? ---------------------------


@dataclass(frozen=True)
class Threading:
    sent: int
    stored_once: int
    missing: int
    doubled: int
    replies: int
    replies_threaded: int
    refs_only: int
    refs_only_threaded: int
    merged_threads: int  # distinct threads that share a ticket

    @property
    def misthreaded(self) -> int:
        return self.replies - self.replies_threaded

    @property
    def ok(self) -> bool:
        return (
            self.missing == 0
            and self.doubled == 0
            and self.misthreaded == 0
            and self.merged_threads == 0
        )

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("messages stored once", f"{self.stored_once:,} of {self.sent:,}"),
            ("missing / stored twice", f"{self.missing} / {self.doubled}"),
            (
                "replies on their thread's ticket",
                f"{self.replies_threaded:,} of {self.replies:,}",
            ),
            (
                "  of which References-only",
                f"{self.refs_only_threaded:,} of {self.refs_only:,}",
            ),
            ("misthreaded replies", str(self.misthreaded)),
            ("threads merged into another's ticket", str(self.merged_threads)),
            ("verdict", "every message once, every reply threaded" if self.ok
             else "FAILED"),
        ]


def _bare(message_id: str | None) -> str:
    return (message_id or "").strip().strip("<>")


def check_threading(
    manifest: Sequence[dict[str, Any]], stored: Sequence[dict[str, Any]]
) -> Threading:
    """Compare the manifest's threads with the ticket each message landed on.

    ``stored`` is ``intake messages list --json``. A reply is threaded when
    it is on the ticket of its thread's first message; two threads on one
    ticket count as merged.
    """
    tickets_of: dict[str, list[int | None]] = defaultdict(list)
    for row in stored:
        tickets_of[_bare(row["message_id"])].append(row["ticket"])

    def ticket(message_id: str) -> int | None:
        found = tickets_of.get(_bare(message_id))
        return found[0] if found else None

    sent = [_bare(entry["message_id"]) for entry in manifest]
    stored_counts = [len(tickets_of.get(message_id, [])) for message_id in sent]
    replies = [entry for entry in manifest if entry["kind"] != "new"]
    threaded = [
        entry
        for entry in replies
        if ticket(entry["message_id"]) is not None
        and ticket(entry["message_id"]) == ticket(entry["root"])
    ]
    roots_on: dict[int | None, set[str]] = defaultdict(set)
    for entry in manifest:
        roots_on[ticket(entry["message_id"])].add(entry["root"])

    return Threading(
        sent=len(sent),
        stored_once=sum(count == 1 for count in stored_counts),
        missing=sum(count == 0 for count in stored_counts),
        doubled=sum(count > 1 for count in stored_counts),
        replies=len(replies),
        replies_threaded=len(threaded),
        refs_only=sum(entry["kind"] == "reply-refs-only" for entry in replies),
        refs_only_threaded=sum(
            entry["kind"] == "reply-refs-only" for entry in threaded
        ),
        merged_threads=sum(
            len(roots) - 1 for number, roots in roots_on.items() if number is not None
        ),
    )


def verify(config: Path, manifest: Sequence[dict[str, Any]]) -> Threading:
    """Print ``intake stats`` and the threading check; return the check."""
    stats = intake_json(config, "stats")
    stored = intake_json(config, "messages", "list")
    result = check_threading(manifest, stored)
    rows = [(key, str(value)) for key, value in stats.items()]
    print_table("intake stats --json", ("what", "count"), rows)
    print_table("threading against the manifest", ("check", "result"), result.rows())

    return result


def client_command(
    corpus_: Corpus,
    targets: Sequence[int],
    *,
    count: int,
    connections: int,
    rate: float = 0.0,
) -> list[str]:
    """The SMTP load client, a process of its own (bench/_smtp_client.py)."""
    command = [
        sys.executable,
        str(BENCH / "_smtp_client.py"),
        "--corpus",
        str(corpus_.folder),
        "--manifest",
        str(corpus_.folder.with_name(corpus_.folder.name + ".manifest.json")),
        "--count",
        str(count),
        "--connections",
        str(connections),
        "--rcpt",
        SUPPORT,
    ]
    for port in targets:
        command += ["--target", f"127.0.0.1:{port}"]
    if rate:
        command += ["--rate", str(rate)]

    return command


def run_client(command: list[str]) -> dict[str, Any]:
    """Run the load client; its last stdout line is a JSON summary."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed:\n{done.stdout}\n{done.stderr}")

    return json.loads(done.stdout.strip().splitlines()[-1])
