"""A writer thread that commits queued operations in batches: the shared machinery of the
rate counters (`store/counters.py`) and the abuse counters (`store/abuse_counters.py`).

The pattern is the queue's group commit applied to bookkeeping: the event loop only
appends operations to a list (`add`, cheap and non-blocking); one thread per store takes
everything pending at once, `batch_delay` after the first of them, applies it in one
transaction with a subclass's `_apply`, and hands the rows other processes changed back
through `_report`. Without new work a
cycle still runs every `sync_interval`, so counts written by other processes arrive.
A failed cycle keeps its operations for a retry a few seconds later; nothing is lost
unless the store is closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger("submitd.store")


Op = TypeVar("Op")
P = TypeVar("P")
R = TypeVar("R")
Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


@dataclass(slots=True)
class Batch(Generic[Op, P]):
    operations: list[Op]
    waiters: list[Waiter]
    prune: P | None
    final: bool


class BatchedWriter(Generic[Op, P, R]):
    """Subclasses set `description` and `error_type`, and implement `_apply` (in the
    writer thread, one transaction) and `_report` (the rows changed, to the owner)."""

    description = "counters"
    error_type: type[Exception] = RuntimeError
    retry_seconds = 5.0  # after a failed cycle, instead of retrying in a tight loop
    # A cycle starts this long after the first operation of a batch: under load one
    # transaction (and one wake-up of the thread) then serves hundreds of messages
    # instead of a handful; measured, a cycle per message cost about a tenth of the
    # CPU of accepting a 1 MiB message. A crash forgets at most this much counting.
    batch_delay = 0.05

    def __init__(self, conn: sqlite3.Connection, *, sync_interval: float, thread_name: str) -> None:
        self._conn = conn  # used only by the writer thread once started
        self._sync_interval = sync_interval
        self._pending: list[Op] = []
        self._waiters: list[Waiter] = []
        self._prune: P | None = None
        self._retry_at = 0.0
        self._pending_since = 0.0  # when the first pending operation arrived
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def add(self, operations: Iterable[Op]) -> None:
        """Queue operations for the next cycle; returns at once (safe on the event loop)."""
        with self._wakeup:
            if self._closing:
                logger.warning("%s closed; operations not saved", self.description)
                return
            if not self._pending:  # the first of a batch; later ones join it unannounced
                self._pending_since = time.monotonic()
                self._wakeup.notify()
            self._pending.extend(operations)

    def _request_prune(self, prune: P) -> None:
        with self._wakeup:
            self._prune = self._merge_prune(self._prune, prune)

    def _merge_prune(self, current: P | None, new: P) -> P:
        """Two prune requests before a cycle: by default the latest wins."""
        return new

    async def sync(self) -> None:
        """Return after a full cycle that started after this call: what was added before
        is committed, and the report has seen every other process's earlier commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._wakeup:
            if self._closing:
                raise self.error_type(f"{self.description} are closed")
            self._waiters.append((loop, future))
            self._retry_at = 0.0
            self._wakeup.notify()
        await future

    async def close(self) -> None:
        """Commit what is pending, then stop the writer thread and close the database."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)

    # --- the writer thread ----------------------------------------------------------

    def _apply(self, operations: list[Op], prune: P | None) -> R:
        raise NotImplementedError

    def _report(self, operations: list[Op], result: R) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                self._cycle(batch)
                if batch.final:
                    return
        finally:
            self._conn.close()

    def _next_batch(self) -> Batch[Op, P]:
        """Wait for operations, a sync request, closing, or the periodic merge."""
        with self._wakeup:
            deadline = time.monotonic() + self._sync_interval
            while not self._closing and not self._waiters:
                now = time.monotonic()
                ready_at = max(self._retry_at, self._pending_since + self.batch_delay)
                if self._pending and now >= ready_at:
                    break
                wait_until = deadline if not self._pending else min(deadline, ready_at)
                if now >= wait_until:
                    break
                self._wakeup.wait(wait_until - now)
            batch = Batch(self._pending, self._waiters, self._prune, self._closing)
            self._pending, self._waiters, self._prune = [], [], None
            return batch

    def _cycle(self, batch: Batch[Op, P]) -> None:
        try:
            result = self._apply(batch.operations, batch.prune)
        except Exception as error:  # never let the thread die with waiters
            self._failed(batch, error)
            return
        try:
            self._report(batch.operations, result)
        except Exception:  # a bug there must not stop the saving of counts
            logger.exception("%s callback failed", self.description)
        settle_all(batch.waiters, None)

    def _failed(self, batch: Batch[Op, P], error: Exception) -> None:
        """Keep the operations for the next cycle (or report them lost when closing)."""
        if batch.final:
            logger.error(
                "%s not saved at close (%d operations lost): %s",
                self.description,
                len(batch.operations),
                error,
            )
        else:
            logger.warning("cannot save %s, will retry: %s", self.description, error)
            with self._wakeup:
                self._pending[:0] = batch.operations
                if batch.prune is not None:
                    self._prune = (
                        batch.prune
                        if self._prune is None
                        else self._merge_prune(batch.prune, self._prune)
                    )
                self._retry_at = time.monotonic() + self.retry_seconds
        settle_all(batch.waiters, self.error_type(f"cannot save {self.description}: {error}"))


def settle_all(waiters: list[Waiter], error: Exception | None) -> None:
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, error)


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
