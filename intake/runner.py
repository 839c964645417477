"""Store work off the event loop, on a pool sized for the database.

SQLite takes one writer at a time, so one thread serves it best: writes queue
in the pool instead of spinning on the busy timeout. PostgreSQL gets a few.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class StoreRunner:
    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="store")

    async def __call__(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work)

    def shutdown(self) -> None:
        """Wait for work already started, then stop the threads."""
        self._executor.shutdown(wait=True)
