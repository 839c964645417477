"""SMTP latency: DATA to 250 at a fixed offered rate, Intake on SQLite.

Open loop: message i is due i/rate seconds after the start whatever the
daemon does, so a slow answer does not slow the offered load down. Each
message goes out on an idle one of the persistent connections; ``DATA->250``
is the goal's figure, ``due->250`` adds the wait for a free connection (what
a queue behind a slow daemon costs). Goal: p99 DATA->250 <= 50 ms at 100/s.
"""

from __future__ import annotations

import time

from _common import (
    client_command,
    conditions,
    corpus,
    daemon,
    parser,
    percentile,
    print_table,
    run_client,
    workdir,
)


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--rate", type=float, default=100.0, help="messages/s")
    options.add_argument("--seconds", type=float, default=30.0)
    options.add_argument("--connections", type=int, default=16)
    args = options.parse_args()
    seconds = 1.0 if args.small else args.seconds
    connections = 4 if args.small else args.connections
    count = round(args.rate * seconds)
    mix = corpus(count)

    with workdir("smtp-latency", args.keep) as work, daemon(work) as intake:
        result = run_client(
            client_command(
                mix,
                [intake.port],
                count=count,
                connections=connections,
                rate=args.rate,
            )
        )
        time.sleep(0.5)

    rows = []
    for name, key in (("DATA->250", "data_ms"), ("due->250", "due_ms")):
        values = result[key]
        rows.append(
            (
                name,
                len(values),
                f"{percentile(values, 0.50):.1f} ms",
                f"{percentile(values, 0.90):.1f} ms",
                f"{percentile(values, 0.99):.1f} ms",
                f"{max(values):.1f} ms",
            )
        )
    offered = f"{args.rate:g}/s offered for {seconds:g} s"
    achieved = result["sent"] / result["seconds"]
    print_table(
        f"SMTP latency, Intake on SQLite, {offered} on {connections} connections "
        f"(achieved {achieved:.1f}/s; answers {result['codes']})",
        ("latency", "messages", "p50", "p90", "p99", "max"),
        rows,
    )
    print("goal: p99 DATA->250 <= 50 ms")
    conditions()


if __name__ == "__main__":
    main()
