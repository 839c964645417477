"""Two daemons on one PostgreSQL database against one, under SMTP load.

Each case gets a fresh database on the local server (127.0.0.1:5432, trust
authentication; created from the ``test`` database and dropped after). The
same client sends the same corpus mix over the same number of persistent
connections: all to the one daemon, or split evenly between the two. Then
the two-daemon case is checked against the manifest (every message once,
every reply threaded). Goal: two daemons >= 1.6x one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from _common import (
    client_command,
    conditions,
    corpus,
    daemon,
    load_row,
    parser,
    print_table,
    rate,
    run_client,
    skip,
    verify,
    workdir,
)
from sqlalchemy import create_engine, text

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
ADMIN_DATABASE = "test"


@contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """A new database for one case, dropped afterwards; yields its URL."""
    admin = create_engine(f"{SERVER}/{ADMIN_DATABASE}", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SERVER}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def reachable() -> str | None:
    """None when the server answers, else why not."""
    try:
        engine = create_engine(f"{SERVER}/{ADMIN_DATABASE}")
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 (any failure means: cannot measure)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

    return None


def case(
    stack: ExitStack,
    work: Path,
    name: str,
    *,
    daemons: int,
    count: int,
    connections: int,
) -> tuple[dict[str, Any], Path]:
    """Start ``daemons`` daemons on a fresh database, load them, stop them.

    The database lives as long as ``stack``, for the check afterwards.
    """
    mix = corpus(count)
    url = stack.enter_context(fresh_database(f"intake_bench_{name}_{os.getpid()}"))
    with ExitStack() as running_stack:
        running = [
            running_stack.enter_context(daemon(work / f"{name}-{n}", store_url=url))
            for n in range(daemons)
        ]
        result = run_client(
            client_command(
                mix,
                [each.port for each in running],
                count=count,
                connections=connections,
            )
        )
        time.sleep(0.5)

    return result, running[0].config


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--messages", type=int, default=3000)
    options.add_argument("--connections", type=int, default=16)
    args = options.parse_args()
    count = 40 if args.small else args.messages
    connections = 4 if args.small else args.connections

    why = reachable()
    if why is not None:
        skip(f"PostgreSQL at 127.0.0.1:5432 (database {ADMIN_DATABASE}): {why}")

    with workdir("two-daemons", args.keep) as work, ExitStack() as databases:
        one, _ = case(
            databases, work, "one", daemons=1, count=count, connections=connections
        )
        two, config = case(
            databases, work, "two", daemons=2, count=count, connections=connections
        )
        print_table(
            f"PostgreSQL, {count:,} messages over {connections} persistent "
            "connections, split evenly between the daemons",
            ("daemons", "messages", "wall", "msgs/s", "answers"),
            [
                load_row("one", one),
                load_row("two", two),
                ("two / one", "", "", f"x{rate(two) / rate(one):.2f}", "goal >= 1.6"),
            ],
        )
        verify(config, corpus(count).manifest)
    conditions()


if __name__ == "__main__":
    main()
