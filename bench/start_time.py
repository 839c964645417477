"""Start time: from the process start to READY, as systemd sees it.

``intake run`` gets a fake ``$NOTIFY_SOCKET``; the clock stops at its
READY=1 (sd_notify(3)), which it sends once its listeners are bound, the
database migrated and the workers running. The first time the SMTP port
accepts is shown beside it. Two cases: a first start on an empty state
directory (creates and migrates the database) and a restart on an existing
one; the median of several runs each. Goal: <= 1.5 s.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from _common import (
    HAS_SDNOTIFY,
    REPO,
    NotifySocket,
    accepts,
    conditions,
    free_port,
    intake_command,
    parser,
    print_table,
    workdir,
    write_config,
)

POLL = 0.002  # seconds between looks at the port and the notify socket


def one_start(folder: Path) -> tuple[float, float | None, float]:
    """Seconds to the port accepting, to READY=1 (None without sd_notify),
    and from SIGTERM to the exit."""
    port = free_port()
    config = write_config(folder, port=port)
    notify = NotifySocket(folder / "notify.sock")
    listening = ready = None
    started = time.perf_counter()
    with (folder / "daemon.log").open("ab") as log:
        process = subprocess.Popen(
            intake_command(config, "run"),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={"NOTIFY_SOCKET": str(notify.path), "PATH": "/usr/bin:/bin"},
        )
    try:
        while ready is None or listening is None:
            if process.poll() is not None:
                raise RuntimeError((folder / "daemon.log").read_text()[-3000:])
            if listening is None and accepts(port):
                listening = time.perf_counter() - started
            if ready is None and notify.poll("READY=1", POLL):
                ready = time.perf_counter() - started
            if not HAS_SDNOTIFY and listening is not None:
                break
            if time.perf_counter() - started > 60:
                raise RuntimeError("not ready after 60 s")
    finally:
        stopping = time.perf_counter()
        process.terminate()
        process.wait(60)
        stopped = time.perf_counter() - stopping
        notify.close()

    return listening, ready, stopped


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--runs", type=int, default=5)
    args = options.parse_args()
    runs = 1 if args.small else args.runs

    results: dict[str, list[tuple[float, float | None, float]]] = {
        "first start (empty state)": [],
        "restart (existing state)": [],
    }
    with workdir("start", args.keep) as work:
        for number in range(runs):
            folder = work / f"run{number}"
            folder.mkdir()
            results["first start (empty state)"].append(one_start(folder))
            results["restart (existing state)"].append(one_start(folder))

    rows = []
    for name, timings in results.items():
        port = [listening for listening, _, _ in timings]
        ready = [ready for _, ready, _ in timings if ready is not None]
        stop = [stopped for _, _, stopped in timings]
        rows.append(
            (
                name,
                len(timings),
                f"{statistics.median(port):.2f} s",
                f"{statistics.median(ready):.2f} s" if ready else "-",
                f"{max(ready):.2f} s" if ready else "-",
                f"{statistics.median(stop):.2f} s",
            )
        )
    print_table(
        "process start to ready, medians (READY=1 over a fake NOTIFY_SOCKET)",
        ("case", "runs", "port accepts", "READY=1", "READY=1 max", "SIGTERM to exit"),
        rows,
    )
    print("goal: <= 1.5 s to READY")
    conditions()


if __name__ == "__main__":
    main()
