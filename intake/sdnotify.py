"""The service manager's side channel: readiness, watchdog, passed sockets.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` naming a
datagram socket; each datagram is newline-separated ``KEY=VALUE`` lines
(sd_notify(3)). A socket unit hands over listening sockets as file
descriptors from 3 up, announced by ``$LISTEN_FDS`` and ``$LISTEN_PID``
(sd_listen_fds(3)). Outside systemd every variable is absent and all of this
does nothing, so ``intake run`` behaves the same in a terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, address: str | None) -> None:
        # A leading "@" names a socket in the abstract namespace.
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; False when there is no manager or it failed.

        A lost notification must never stop the daemon, so errors are
        logged, not raised.
        """
        if self.address is None:
            return False

        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False

        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))


def _status(text: str) -> list[str]:
    return [f"STATUS={text}"] if text else []


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between keep-alives: half of ``$WATCHDOG_USEC``, or None.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is for; a
    child that inherited the environment must not answer for its parent.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None

    return int(usec) / 1_000_000 / 2


async def keep_alive(
    notifier: Notifier, interval: float, stopping: asyncio.Event
) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds from the event loop.

    It runs as a task on the daemon's own loop on purpose: a loop blocked by
    some handler stops the keep-alives, and systemd restarts the service.
    """
    while not stopping.is_set():
        notifier.watchdog()
        try:
            await asyncio.wait_for(stopping.wait(), interval)
        except TimeoutError:
            continue


def listen_sockets(
    environ: MutableMapping[str, str], pid: int
) -> dict[str, socket.socket]:
    """Sockets passed by a socket unit, by ``FileDescriptorName=``.

    Unnamed sockets are called "unknown", as systemd does. The variables
    are removed afterwards so that no child process takes them for its own.
    """
    count = environ.get("LISTEN_FDS", "")
    owner = environ.get("LISTEN_PID", "")
    names = environ.get("LISTEN_FDNAMES", "")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not count.isdigit() or owner != str(pid):
        return {}

    labels = names.split(":") if names else []
    found: dict[str, socket.socket] = {}
    for index in range(int(count)):
        label = labels[index] if index < len(labels) else "unknown"
        sock = socket.socket(fileno=LISTEN_FDS_START + index)
        os.set_inheritable(sock.fileno(), False)
        if label in found:
            log.warning("socket activation: a second socket named %r, ignored", label)
            sock.close()
            continue
        found[label] = sock

    return found
