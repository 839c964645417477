"""Digest: build and render the owner's digest for N open tickets.

For each N, one child process fills a fresh SQLite store with N open tickets
(``tests.owner.Story.many``: a customer, an email and every other one a
phone, a first message, an agent reply for every third), and a second, fresh
child process times what the scheduler does for the digest: the queries
(``build_digest``), the text and HTML parts (``render``) and the MIME email
(``digest_email``, which renders again; the scheduler runs the queries
and ``digest_email``, so those two make the total). The second child's peak RSS
(ru_maxrss) is the digest's alone, interpreter and imports included.
Goals: <= 1 s for 10,000 tickets, <= 10 s for 100,000, peak RSS <= 300 MB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import REPO, conditions, parser, print_table, workdir

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
GOAL_SECONDS = {10_000: 1.0, 100_000: 10.0}


def fill(folder: Path, count: int) -> None:
    """Child process: a store with ``count`` open tickets."""
    from intake.clock import FrozenClock  # noqa: PLC0415 (the child's work)
    from intake.config import load_settings  # noqa: PLC0415
    from intake.daemon import prepare  # noqa: PLC0415
    from tests.owner import Story, owner_config  # noqa: PLC0415

    config = owner_config(folder, digest={"timezone": "Europe/Berlin"})
    parts = prepare(load_settings(config, environ={}), FrozenClock(NOW))
    Story(parts).many(count, NOW)
    parts.engine.dispose()


def measure(folder: Path) -> None:
    """Child process: time the digest on the filled store; print JSON."""
    from intake.clock import FrozenClock  # noqa: PLC0415 (the child's work)
    from intake.config import load_settings  # noqa: PLC0415
    from intake.daemon import prepare  # noqa: PLC0415
    from notifier.digest import build_digest, digest_email, render  # noqa: PLC0415

    settings = load_settings(folder / "intake.toml", environ={})
    clock = FrozenClock(NOW)
    parts = prepare(settings, clock)
    ready = _peak_mb()

    started = time.perf_counter()
    with parts.engine.connect() as connection:
        digest = build_digest(connection, settings, NOW, since=NOW.replace(day=1))
    built = time.perf_counter()
    text, html = render(digest)
    rendered = time.perf_counter()
    mail = digest_email(settings, clock, digest)
    composed = time.perf_counter()
    parts.engine.dispose()

    print(
        json.dumps(
            {
                "open": digest.open,
                "query": built - started,
                "render": rendered - built,
                "email": composed - rendered,
                "text_mb": len(text.encode()) / 1e6,
                "html_mb": len(html.encode()) / 1e6,
                "mail_mb": len(mail.raw) / 1e6,
                "peak_mb": _peak_mb(),
                "before_mb": ready,
            }
        )
    )


def _peak_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def child(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")

    return done.stdout


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--fill":
        fill(Path(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        measure(Path(sys.argv[2]))
        return

    options = parser(__doc__ or "")
    options.add_argument("counts", nargs="*", type=int, default=[10_000, 100_000])
    args = options.parse_args()
    counts = [200] if args.small else args.counts

    rows = []
    with workdir("digest", args.keep) as work:
        for count in counts:
            folder = work / f"tickets-{count}"
            folder.mkdir()
            filling = time.perf_counter()
            child("--fill", str(folder), str(count))
            filling = time.perf_counter() - filling
            found = json.loads(child("--measure", str(folder)).splitlines()[-1])
            total = found["query"] + found["email"]  # what the scheduler runs
            goal = GOAL_SECONDS.get(count)
            rows.append(
                (
                    f"{found['open']:,}",
                    f"{found['query']:.2f} s",
                    f"{found['render']:.2f} s",
                    f"{found['email']:.2f} s",
                    f"{total:.2f} s",
                    f"<= {goal:g} s" if goal else "-",
                    f"{found['html_mb']:.1f} / {found['text_mb']:.1f} MB",
                    f"{found['peak_mb']:.0f} MB",
                    f"{filling:.0f} s",
                )
            )
    print_table(
        "digest for N open tickets (total = query + email, as the scheduler "
        "runs it; email renders both parts again)",
        (
            "open tickets",
            "query",
            "render",
            "email",
            "total",
            "goal",
            "HTML / text",
            "peak RSS",
            "fill (untimed)",
        ),
        rows,
    )
    print("goal: peak RSS <= 300 MB (the measuring process, imports included)")
    conditions()


if __name__ == "__main__":
    main()
