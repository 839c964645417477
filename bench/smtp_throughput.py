"""SMTP intake throughput: Intake against a bare aiosmtpd server, same client.

N persistent connections on loopback send the corpus mix (new mail, replies,
HTML, attachments; CRLF) to (a) aiosmtpd with a handler that answers 250 at
once, in a process of its own, and (b) ``intake run`` on SQLite with durable
commits. Prints msgs/s for both and (b)/(a); then checks that Intake stored
every message once and threaded every reply (against the corpus manifest).
Goal: (b)/(a) >= 0.5.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from _common import (
    BENCH,
    Corpus,
    client_command,
    conditions,
    corpus,
    daemon,
    free_port,
    load_row,
    parser,
    print_table,
    rate,
    run_client,
    verify,
    wait_port,
    workdir,
)


def bare(mix: Corpus, count: int, connections: int) -> dict[str, Any]:
    port = free_port()
    command = [sys.executable, str(BENCH / "_bare_smtpd.py"), str(port)]
    server = subprocess.Popen(command)
    try:
        wait_port(port, 30, server)
        return run_client(
            client_command(mix, [port], count=count, connections=connections)
        )
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--messages", type=int, default=3000)
    options.add_argument("--connections", type=int, default=16)
    args = options.parse_args()
    count = 40 if args.small else args.messages
    connections = 4 if args.small else args.connections
    mix = corpus(count)

    baseline = bare(mix, count, connections)
    with workdir("smtp-throughput", args.keep) as work:
        with daemon(work) as intake:
            measured = run_client(
                client_command(mix, [intake.port], count=count, connections=connections)
            )
            time.sleep(0.5)  # let the outbox worker settle before stopping
        ratio = rate(measured) / rate(baseline)
        print_table(
            f"SMTP throughput, {count:,} messages over {connections} persistent "
            "connections, one client process",
            ("target", "messages", "wall", "msgs/s", "answers"),
            [
                load_row("(a) bare aiosmtpd", baseline),
                load_row("(b) intake run, SQLite", measured),
                ("(b)/(a)", "", "", f"x{ratio:.2f}", "goal >= 0.5"),
            ],
        )
        verify(intake.config, mix.manifest)
    conditions()


if __name__ == "__main__":
    main()
