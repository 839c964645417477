"""Memory: the daemon's RSS idle, after one 25 MB message, with 500 idle
SMTP connections open. VmRSS and VmHWM come from /proc/PID/status.

The connections come first (each said EHLO, then nothing), then the
message, so that neither hides in room the other freed. Goals: idle <= 80 MB;
500 idle connections <= +50 MB (VmRSS with them open, over idle); growth for
one message <= 4x its size (the peak, VmHWM, over the VmRSS just before).
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
from email.message import EmailMessage

from _common import (
    SUPPORT,
    conditions,
    daemon,
    memory,
    parser,
    print_table,
    workdir,
)

MB = 1_000_000
SETTLE = 2.0  # seconds for the daemon to reach a steady state


def big_message(size: int) -> bytes:
    """A customer's mail of about ``size`` bytes, mostly one attachment."""
    mail = EmailMessage()
    mail["From"] = "Big Sender <big@customer.example>"
    mail["To"] = SUPPORT
    mail["Subject"] = "The full log you asked for"
    mail["Message-ID"] = "<big-message@customer.example>"
    mail.set_content("Hello,\n\nthe log is attached.\n\nRegards,\nBig Sender\n")
    # Base64 takes 4 bytes per 3, in lines of 76 plus CRLF.
    payload = int((size - 1000) * 3 / 4 * 76 / 78)
    mail.add_attachment(
        os.urandom(payload),
        maintype="application",
        subtype="octet-stream",
        filename="full.log.gz",
    )

    return mail.as_bytes().replace(b"\n", b"\r\n")


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that said EHLO and then nothing."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.recv(1024)  # the greeting
        sock.sendall(b"EHLO idle.client.example\r\n")
        answer = b""
        while not answer.endswith(b"\r\n") or b"250 " not in answer:
            answer += sock.recv(4096)
        opened.append(sock)

    return opened


def main() -> None:
    options = parser(__doc__ or "")
    options.add_argument("--message-mb", type=float, default=25.0)
    options.add_argument("--connections", type=int, default=500)
    args = options.parse_args()
    size = int((1.0 if args.small else args.message_mb) * MB)
    count = 20 if args.small else args.connections
    raw = big_message(size)

    with workdir("memory", args.keep) as work, daemon(work) as intake:
        pid = intake.pid
        time.sleep(SETTLE)
        idle = memory(pid)

        # Connections first: after the big message the heap has free room
        # that would hide what they cost.
        opened = idle_connections(intake.port, count)
        time.sleep(SETTLE)
        with_connections = memory(pid)
        for sock in opened:
            sock.close()
        time.sleep(SETTLE)
        before = memory(pid)

        with smtplib.SMTP("127.0.0.1", intake.port, timeout=300) as client:
            client.sendmail("big@customer.example", [SUPPORT], raw)
        time.sleep(SETTLE)
        after_message = memory(pid)

    growth = after_message["VmHWM"] - before["VmRSS"]
    added = with_connections["VmRSS"] - idle["VmRSS"]
    print_table(
        f"daemon memory (MB = 10^6 bytes), pid {pid}",
        ("state", "VmRSS", "VmHWM", "measure", "goal"),
        [
            (
                "idle",
                idle["VmRSS"],
                idle["VmHWM"],
                f"{idle['VmRSS']:.1f} MB",
                "<= 80 MB",
            ),
            (
                f"{len(opened)} idle SMTP connections",
                with_connections["VmRSS"],
                with_connections["VmHWM"],
                f"+{added:.1f} MB",
                "<= +50 MB",
            ),
            (
                f"after one {len(raw) / MB:.1f} MB message",
                after_message["VmRSS"],
                after_message["VmHWM"],
                f"peak +{growth:.1f} MB = x{growth / (len(raw) / MB):.2f}",
                "<= x4",
            ),
        ],
    )
    conditions()


if __name__ == "__main__":
    main()
