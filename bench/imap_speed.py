"""IMAP import speed: corpus messages in a local Dovecot folder, read by the
daemon's IMAP poller.

The messages are appended first (not timed); then ``intake run`` starts with
the folder configured, and the clock runs from the process start until the
last message is committed (counted in the SQLite file, read-only, five
times a second). Then the manifest check: every message once, every reply threaded.
Goal: >= 500 messages/s, every reply threaded.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _common import (
    conditions,
    corpus,
    crlf,
    daemon,
    parser,
    print_table,
    skip,
    verify,
    workdir,
)

if TYPE_CHECKING:
    from tests.dovecot import Dovecot

APPEND_AT_ONCE = 200


def stored(database: Path) -> int:
    if not database.exists():
        return 0
    uri = f"file:{database}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=5) as connection:
        try:
            query = "select count(*) from messages where direction = 'in'"
            return int(connection.execute(query).fetchone()[0])
        except sqlite3.OperationalError:  # not migrated yet
            return 0


def mailbox_table(server: Dovecot) -> str:
    """The folder as an operator configures it (clear text: loopback only)."""
    return (
        "[[imap.mailboxes]]\n"
        'name = "support"\n'
        f'host = "{server.host}"\n'
        f"port = {server.port}\n"
        'tls = "none"\n'
        f'username = "{server.user}"\n'
        f'password = "{server.password}"\n'
        "poll_seconds = 1.0\n"
    )


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--messages", type=int, default=10_000)
    options.add_argument("--timeout", type=float, default=600.0)
    args = options.parse_args()
    count = 40 if args.small else args.messages

    # Imported here: a checkout without them skips, with the reason.
    try:
        from channels.imap import ImapChannel  # noqa: F401, PLC0415
        from tests.dovecot import dovecot_binary, running_dovecot  # noqa: PLC0415
    except ImportError as exc:
        skip(f"the IMAP channel or the Dovecot helper is not available ({exc})")
    try:
        dovecot_binary()
    except BaseException as exc:  # noqa: BLE001 (it calls pytest.skip or .fail)
        skip(f"Dovecot cannot run here ({exc})")

    mix = corpus(count)
    with running_dovecot() as server, workdir("imap", args.keep) as work:
        appended = time.perf_counter()
        with server.client() as client:
            raws = [crlf(path.read_bytes()) for path in mix.files()]
            for start in range(0, len(raws), APPEND_AT_ONCE):
                client.multiappend("INBOX", raws[start : start + APPEND_AT_ONCE])
        appended = time.perf_counter() - appended

        database = work / "state" / "intake.db"
        started = time.perf_counter()
        with daemon(work, extra=mailbox_table(server)) as intake:
            ready = time.perf_counter() - started  # READY=1 from the daemon
            deadline = time.monotonic() + args.timeout
            while stored(database) < count and time.monotonic() < deadline:
                intake.check()
                time.sleep(0.2)
            seconds = time.perf_counter() - started
            done = stored(database)

        print_table(
            f"IMAP import by the daemon of {count:,} corpus messages "
            f"from a local Dovecot (appending them took {appended:.1f} s)",
            ("measure", "messages", "seconds", "msgs/s"),
            [
                (
                    "process start to last commit",
                    done,
                    f"{seconds:.2f} s",
                    done / seconds,
                ),
                (
                    "daemon ready to last commit",
                    done,
                    f"{seconds - ready:.2f} s",
                    done / (seconds - ready),
                ),
            ],
        )
        print("goal: >= 500 messages/s, every reply threaded")
        if done < count:
            print(f"FAILED: only {done} of {count} stored in {args.timeout:g} s")
        verify(intake.config, mix.manifest)
    conditions()


if __name__ == "__main__":
    main()
