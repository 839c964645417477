"""Import speed: ``intake import`` of a folder of corpus messages.

Times the whole command on a fresh state directory (start-up and migration
included, as a person would see it), then checks against the corpus manifest
that every message was stored once and every reply landed on its thread's
ticket. Goal: >= 600 messages/s, every reply threaded.
"""

from __future__ import annotations

import subprocess
import sys
import time

from _common import (
    REPO,
    conditions,
    corpus,
    free_port,
    parser,
    print_table,
    verify,
    workdir,
    write_config,
)


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--messages", type=int, default=10_000)
    args = options.parse_args()
    count = 40 if args.small else args.messages
    mix = corpus(count)

    with workdir("import", args.keep) as work:
        config = write_config(work, port=free_port())
        command = [sys.executable, "-m", "intake", "--config", str(config)]
        started = time.perf_counter()
        with (work / "import.log").open("wb") as log:
            subprocess.run(
                [*command, "import", str(mix.folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                check=True,
            )
        seconds = time.perf_counter() - started

        # The same start-up alone, to show what the import itself took.
        started = time.perf_counter()
        subprocess.run([*command, "init"], capture_output=True, cwd=REPO, check=True)
        start_up = time.perf_counter() - started

        print_table(
            f"intake import of a folder of {count:,} corpus messages",
            ("measure", "seconds", "msgs/s"),
            [
                ("whole command", f"{seconds:.2f} s", count / seconds),
                (
                    "without start-up",
                    f"{seconds - start_up:.2f} s",
                    count / (seconds - start_up),
                ),
                ("start-up (intake init)", f"{start_up:.2f} s", "-"),
            ],
        )
        print("goal: >= 600 messages/s, every reply threaded")
        verify(config, mix.manifest)
    conditions()


if __name__ == "__main__":
    main()
