"""Where the time goes: py-spy samples of ``intake import`` and of the daemon
under SMTP load, summed into areas and functions.

1. ``intake import`` of a folder of corpus messages, sampled from start to
   end, its parsing processes included (``py-spy record --subprocesses``).
2. ``intake run`` sampled while the load client sends the same messages over
   16 persistent connections.

Samples of idle threads are left out (py-spy's default), so the shares are
of the time some thread was running. Two tables each: self time by area
(the innermost frame decides; a sample inside an import statement or a
migration counts as start-up) and inclusive time of the functions that
matter. py-spy is not a dependency of Intake:
``.venv/bin/pip install py-spy``; without it this script says so and exits.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _common import (
    REPO,
    client_command,
    conditions,
    corpus,
    daemon,
    free_port,
    intake_command,
    parser,
    print_table,
    run_client,
    skip,
    workdir,
    write_config,
)

RATE = 200  # samples per second
FRAME = re.compile(r"(?P<function>.*) \((?P<file>[^()]*)\)$")

# The innermost frame's file (or file and function) names the area.
AREAS = [
    ("sqlalchemy/engine/default.py:do_commit", "SQLite commit (disk flush)"),
    ("sqlalchemy/engine/default.py:do_execute", "SQLite statements (C)"),
    ("sqlalchemy/engine/default.py:do_executemany", "SQLite statements (C)"),
    ("sqlalchemy/orm/", "SQLAlchemy ORM (Python)"),
    ("sqlalchemy/sql/", "SQLAlchemy Core: SQL building, compiling"),
    ("sqlalchemy/engine/", "SQLAlchemy engine: execute, rows"),
    ("sqlalchemy/", "SQLAlchemy, other"),
    ("email/", "stdlib email: parse, headers, generate"),
    ("channels/mime.py", "channels/mime.py"),
    ("channels/", "channels/ (other)"),
    ("intake/", "intake/ (domain)"),
    ("notifier/", "notifier/"),
    ("store/", "store/"),
    ("aiosmtpd/", "aiosmtpd (SMTP protocol)"),
    ("asyncio/", "asyncio event loop"),
    ("logging/", "logging"),
    ("rich/", "rich (progress bar, tables)"),
    ("concurrent/", "process pool: hand-over"),
    ("multiprocessing/", "process pool: hand-over"),
    ("charset_normalizer/", "charset_normalizer"),
    ("html2text/", "html2text"),
    ("jinja2/", "jinja2"),
    ("json/", "json"),
    ("hashlib", "hashlib"),
    ("re/", "re (regular expressions)"),
    ("threading.py", "threads: hand-over"),
    ("selectors.py", "asyncio event loop"),
    ("socket.py", "sockets"),
]

# Inclusive time is shown for these (file part, function) and for our code.
LANDMARKS = {
    ("sqlalchemy/orm/session.py", "flush"),
    ("sqlalchemy/orm/session.py", "scalar"),
    ("sqlalchemy/orm/session.py", "commit"),
    ("sqlalchemy/orm/session.py", "execute"),
    ("sqlalchemy/orm/session.py", "_autoflush"),
    ("sqlalchemy/engine/base.py", "execute"),
    ("sqlalchemy/engine/default.py", "do_commit"),
    ("sqlalchemy/sql/compiler.py", "__init__"),
    ("email/parser.py", "parsebytes"),
    ("email/feedparser.py", "feed"),
    ("email/generator.py", "flatten"),
    ("logging/__init__.py", "_log"),
    ("aiosmtpd/smtp.py", "_handle_client"),
}
OURS = ("intake/", "channels/", "notifier/", "store/")
STARTUP = ("<frozen importlib._bootstrap>", "alembic/", "store/migrate.py")


# Innermost frames where a thread waits (a lock, a queue, epoll): py-spy
# cannot always tell these from running code, so they are counted apart.
WAITING = {
    ("concurrent/futures/thread.py", "_worker"),
    ("concurrent/futures/_base.py", "result"),
    ("concurrent/futures/_base.py", "wait"),
    ("concurrent/futures/process.py", "wait_result_broken_or_wakeup"),
    ("selectors.py", "select"),
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
    ("queue.py", "get"),
    ("multiprocessing/connection.py", "_recv"),
    ("multiprocessing/connection.py", "_recv_bytes"),
    ("multiprocessing/connection.py", "recv"),
    ("multiprocessing/connection.py", "wait"),
    ("multiprocessing/connection.py", "_poll"),
    ("multiprocessing/queues.py", "get"),
}
SKIP_INCLUSIVE = {"<module>", "main", "run", "<lambda>", "<listcomp>", "<genexpr>"}


def frames(line: str) -> tuple[str, list[tuple[str, str]], int]:
    """py-spy's raw line: the process (with --subprocesses), the frames
    outermost first as (file, function without its class), the count."""
    stack, _, count = line.rpartition(" ")
    process = ""
    parsed = []
    for frame in stack.split(";"):
        match = FRAME.match(frame)
        if match:
            function = match["function"].rpartition(".")[2]
            parsed.append((match["file"], function))
        elif frame.startswith("process "):
            process = frame.split(":")[0]

    return process, parsed, int(count)


def area(stack: list[tuple[str, str]]) -> str:
    if any(file.startswith(STARTUP) for file, _ in stack):
        return "start-up: imports, migrations"
    file, function = stack[-1]
    for prefix, name in AREAS:
        where, _, wanted = prefix.partition(":")
        if file.startswith(where) and wanted in ("", function):
            return name

    return f"other: {file.split('/')[0]}"


def summarise(title: str, samples: Path, top: int = 14) -> None:
    """Print the two tables for one recording."""
    by_area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    waiting = startup = 0
    for line in samples.read_text().splitlines():
        process, stack, count = frames(line)
        if not stack or stack[-1] in WAITING:
            waiting += count
            continue
        where = area(stack)
        if where.startswith("start-up"):
            startup += count
            continue
        by_area[where] += count
        processes[process] += count
        seen = set()
        for file, function in stack:
            name = f"{function} ({file})"
            ours = file.startswith(OURS) and function not in SKIP_INCLUSIVE
            if name not in seen and (ours or (file, function) in LANDMARKS):
                inclusive[name] += count
                seen.add(name)
    total = sum(by_area.values())
    if not total:
        print(f"\n{title}: no samples")
        return

    first = min(processes, key=lambda name: int(name.split()[-1]) if name else 0)
    others = total - processes[first] if len(processes) > 1 else 0
    print(
        f"\n{title}: {total:,} samples of work at {RATE}/s "
        f"({100 * others / total:.0f}% of them in parsing processes); "
        f"left out: {startup:,} of start-up, {waiting:,} of threads waiting"
    )
    print_table(
        "self time by area (the innermost frame)",
        ("area", "share"),
        [(name, f"{100 * n / total:.1f}%") for name, n in by_area.most_common(top)],
    )
    print_table(
        "inclusive time: our functions and library landmarks",
        ("function (file)", "share"),
        [
            (name, f"{100 * n / total:.1f}%")
            for name, n in inclusive.most_common(top + 6)
        ],
    )


def profile_import(py_spy: str, folder: Path, mail: Path, out: Path) -> None:
    folder.mkdir()
    config = write_config(folder, port=free_port())
    subprocess.run(
        [
            py_spy,
            "record",
            "--rate",
            str(RATE),
            "--nolineno",
            "--format",
            "raw",
            "--subprocesses",
            "--output",
            str(out),
            "--",
            *intake_command(config, "import", str(mail)),
        ],
        capture_output=True,
        cwd=REPO,
        check=True,
    )


def profile_smtp(py_spy: str, folder: Path, count: int, out: Path) -> None:
    mix = corpus(count)
    with daemon(folder) as intake:
        recorder = subprocess.Popen(
            [
                py_spy,
                "record",
                "--rate",
                str(RATE),
                "--nolineno",
                "--format",
                "raw",
                "--pid",
                str(intake.pid),
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches before the load starts
        try:
            run_client(client_command(mix, [intake.port], count=count, connections=16))
        finally:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on ^C
            recorder.wait(60)


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--messages", type=int, default=2000)
    args = options.parse_args()
    count = 40 if args.small else args.messages
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    py_spy = py_spy or shutil.which("py-spy")
    if py_spy is None:
        skip("py-spy is not installed (.venv/bin/pip install py-spy)")

    mix = corpus(count)
    with workdir("profile", args.keep) as work:
        profile_import(py_spy, work / "import", mix.folder, work / "import.txt")
        summarise(f"intake import, {count:,} messages", work / "import.txt")
        profile_smtp(py_spy, work / "smtp", count, work / "smtp.txt")
        summarise(f"intake run, {count:,} messages over SMTP", work / "smtp.txt")
    conditions()


if __name__ == "__main__":
    main()
