"""Group commit: messages that arrive together share one transaction.

A commit costs a disk flush (a few milliseconds with synchronous=FULL);
while one batch is being stored, the messages that arrive queue up and go
into the next one. A lone message waits for nothing.
"""

from __future__ import annotations

import asyncio
from functools import partial

from channels.email import RawEmail, receive_many
from intake.accept import Intake, Outcome
from intake.runner import StoreRunner

MAX_BATCH = 64


class Batcher:
    def __init__(self, intake: Intake, run_in_store: StoreRunner) -> None:
        self.intake = intake
        self.run_in_store = run_in_store
        self._waiting: list[tuple[RawEmail, asyncio.Future[Outcome]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def receive(self, email: RawEmail) -> Outcome:
        """Store ``email``; returns once its transaction has committed.

        Raises what storing raised (StoreUnavailable when the database
        cannot take the write), so the channel can ask for a retry.
        """
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        # Mark an error as seen even when the waiter has gone away.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._waiting.append((email, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())

        # Shielded: a sender that hangs up mid-wait must not cancel the
        # store; the message commits and a retry finds it as a duplicate.
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                await self._store(batch)
        finally:
            self._draining = None

    async def _store(
        self, batch: list[tuple[RawEmail, asyncio.Future[Outcome]]]
    ) -> None:
        emails = [email for email, _ in batch]
        try:
            outcomes = await self.run_in_store(
                partial(receive_many, self.intake, emails)
            )
        except Exception as exc:  # noqa: BLE001 (every waiter learns why; none hangs)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return

        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
