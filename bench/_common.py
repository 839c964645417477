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
import select
import shutil
import signal
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
if str(REPO) not in sys.path:  # for tests.dovecot; ``python bench/NAME.py``
    sys.path.insert(0, str(REPO))

MAKE_CORPUS = REPO.parent / "shared" / "tools" / "make_corpus.py"
CORPUS_CACHE = Path(tempfile.gettempdir()) / "intake-bench-corpus"
SUPPORT = "support@helpdesk.example.com"  # the To of every corpus message
DOMAIN = "helpdesk.example.com"
SKIPPED = "skipped:"  # the first word of a script that cannot run here


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


def print_table(
    title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    directory: Path,
    *,
    port: int,
    store_url: str = "",
    extra: str = "",
) -> Path:
    """Settings as an operator writes them: SMTP on ``port`` for our domain,
    the HTTP health listener on a free port of its own."""
    lines = [
        f'state_dir = "{directory / "state"}"',
        "[store]",
        f'url = "{store_url}"',
        "[smtp]",
        f'listen = "127.0.0.1:{port}"',
        f'domains = ["{DOMAIN}"]',
        "[http]",
        f'listen = "127.0.0.1:{free_port()}"',
    ]
    path = directory / "intake.toml"
    path.write_text("\n".join(lines) + "\n" + extra)

    return path


def intake_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "intake", "--config", str(config), *args]


class Daemon:
    """``intake run`` as a child process, ready when it says READY=1.

    The readiness comes over a fake ``$NOTIFY_SOCKET``, as systemd gets it
    (sd_notify(3)); a daemon without intake/sdnotify.py is taken as ready
    when its SMTP port accepts.
    """

    def __init__(self, config: Path, port: int, folder: Path) -> None:
        self.config = config
        self.port = port
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.notify = NotifySocket(folder / "notify.sock")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until ready; the seconds that took."""
        started = time.perf_counter()
        with (self.folder / "daemon.log").open("ab") as log:
            self.process = subprocess.Popen(
                intake_command(self.config, "run"),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path)},
            )
        if HAS_SDNOTIFY:
            self.notify.wait("READY=1", timeout, self.process)
        else:
            wait_port(self.port, timeout, self.process)

        return time.perf_counter() - started

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Raise with the log's end when the daemon has died."""
        if not self.alive():
            raise RuntimeError(f"the daemon exited:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout)
        self.notify.close()

    def log(self) -> str:
        return (self.folder / "daemon.log").read_text(errors="replace")


HAS_SDNOTIFY = (REPO / "intake" / "sdnotify.py").is_file()


class NotifySocket:
    """A datagram socket where a daemon sends its sd_notify(3) states."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait(
        self, state: str, timeout: float, process: subprocess.Popen[bytes]
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"exited with {process.returncode} before {state}")
            if self.poll(state, 0.01):
                return
        raise RuntimeError(f"no {state} after {timeout}s")

    def poll(self, state: str, seconds: float) -> bool:
        """True when a datagram holding ``state`` arrives within ``seconds``."""
        ready, _, _ = select.select([self.sock], [], [], seconds)
        if not ready:
            return False

        return state in self.sock.recv(4096).decode(errors="replace").splitlines()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@contextmanager
def daemon(directory: Path, **config: Any) -> Iterator[Daemon]:
    """``intake run`` on a free port, stopped with SIGTERM afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = Daemon(write_config(directory, port=port, **config), port, directory)
    try:
        process.start()
        yield process
    except Exception:
        if process.process is not None:
            print(f"daemon log, the end:\n{process.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        process.stop()


def run_cli(config: Path, *args: str) -> str:
    """An ``intake`` command's standard output; raises if it fails."""
    done = subprocess.run(
        intake_command(config, *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"intake {' '.join(args)}: {done.stdout}{done.stderr}")

    return done.stdout


def intake_json(config: Path, *args: str) -> Any:
    """An ``intake`` command's ``--json`` output, parsed."""
    return json.loads(run_cli(config, *args, "--json"))


def wait_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening")
        if accepts(port):
            return
        time.sleep(0.01)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


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
            (
                "verdict",
                "every message once, every reply threaded" if self.ok else "FAILED",
            ),
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


def load_row(name: str, result: dict[str, Any]) -> tuple[Any, ...]:
    """One table row from the load client's summary."""
    sent = int(result["sent"])
    seconds = float(result["seconds"])
    codes = result["codes"]
    answers = ", ".join(f"{code}: {codes[code]}" for code in sorted(codes))

    return (name, sent, f"{seconds:.2f} s", sent / seconds, answers)


def rate(result: dict[str, Any]) -> float:
    return float(result["sent"]) / float(result["seconds"])
