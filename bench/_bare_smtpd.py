"""The baseline: Intake's own aiosmtpd SMTP class, a handler that answers 250.

Runs in a process and an event loop of its own, with the options the daemon
gives aiosmtpd (``channels.smtp.start_smtp``), until SIGTERM.
``python bench/_bare_smtpd.py PORT``
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's
from channels.smtp import LenientSMTP


class Accept:
    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        return "250 OK"


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    handler = Accept()

    def factory() -> SMTP:
        return LenientSMTP(
            handler,
            hostname="localhost",
            data_size_limit=25 * 1024 * 1024,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=300,
        )

    server = await loop.create_server(factory, host="127.0.0.1", port=port)
    await stopping.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
