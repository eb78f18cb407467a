"""Rate counters in the database: the source of truth shared by every server process.

The policy layer (policy/limits.py) counts in memory so that its checks at MAIL and RCPT
never wait for the disk (DESIGN principle 8). This module makes those counts durable
and shared. One writer thread per `CounterStore` owns a connection and runs cycles:

1. Increments added since the last cycle are summed per counter and applied in ONE
   `BEGIN IMMEDIATE` transaction, as `INSERT ... ON CONFLICT DO UPDATE SET total =
   total + n`. The addition happens inside SQLite under its write lock, so increments
   from several processes never overwrite each other.
2. In the same transaction (or, with nothing to write, in one SELECT) it reads every
   row changed since its previous cycle and hands the totals, which include the other
   processes' counts, to the `on_sync` callback.

A cycle starts as soon as increments arrive (no timer, as in the queue's group commit:
while one transaction runs, new increments form the next batch) and otherwise every
`sync_interval` seconds, so a process sees the others' counts within that interval.

Change tracking. `settings.rate_counters_generation` is bumped by each write
transaction and stamped on the rows it touches. Write transactions are serialised by
SQLite's lock, so generations are committed in increasing order: a reader that has seen
everything up to generation g misses nothing by asking for `generation > g` next time,
and reads only the rows that changed (cheap with thousands of idle users).

Durability: the connection uses `synchronous=FULL` (store/database.py), so a committed
cycle survives a crash. What a crash can forget is only what was added but not yet
committed: the increments of the current batch, a few milliseconds' worth.

Rows are kept per (login, kind, window_start) with the window's end; the store does
not interpret windows, it only deletes rows whose window has ended when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from submitd.store.database import connect, transaction

logger = logging.getLogger("submitd.store.counters")

_GENERATION_KEY = "rate_counters_generation"
_RETRY_SECONDS = 1.0  # after a failed cycle, instead of retrying in a tight loop

_BUMP = "UPDATE settings SET value = value + 1 WHERE key = ? RETURNING value"
_UPSERT = """
    INSERT INTO rate_counters (login, kind, window_start, window_end, total, generation)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (login, kind, window_start)
    DO UPDATE SET total = total + excluded.total, generation = excluded.generation
"""
_CHANGED = """
    SELECT login, kind, window_start, window_end, total, generation
    FROM rate_counters WHERE generation > ?
"""


@dataclass(frozen=True, slots=True)
class Increment:
    """Add `amount` to one counter of one user in the window [start, end)."""

    login: str
    kind: str
    start: int
    end: int
    amount: int


@dataclass(frozen=True, slots=True)
class CounterRow:
    """A counter's total in the database, over every process, as of one cycle."""

    login: str
    kind: str
    start: int
    end: int
    total: int


# Called in the writer thread after each cycle: the increments that cycle committed
# (already included in the totals) and the rows that changed since the previous cycle.
SyncCallback = Callable[[Sequence[Increment], Sequence[CounterRow]], None]


class CounterError(Exception):
    """The counters could not be saved; they stay pending and are retried."""


@dataclass(slots=True)
class _Work:
    increments: list[Increment]
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]
    prune_before: int | None
    final: bool


class CounterStore:
    """Persists increments in batches and reports merged totals; see the module doc."""

    def __init__(self, db_path: Path, on_sync: SyncCallback, *, sync_interval: float = 1.0) -> None:
        self._on_sync = on_sync
        self._sync_interval = sync_interval
        # Used only by the writer thread once the constructor has returned.
        self._conn = connect(db_path, check_same_thread=False, relaxed=True)
        try:
            self._generation, rows = _load(self._conn)
            on_sync((), rows)
        except BaseException:
            self._conn.close()
            raise
        self._pending: list[Increment] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._prune_before: int | None = None
        self._retry_at = 0.0
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="submitd-counters", daemon=True)
        self._thread.start()

    def add(self, increments: Iterable[Increment]) -> None:
        """Queue increments for the next cycle; returns at once (safe on the event loop)."""
        with self._wakeup:
            if self._closing:
                logger.warning("rate counters closed; increments not saved")
                return
            self._pending.extend(increments)
            self._wakeup.notify()

    def prune(self, before: int) -> None:
        """Ask the next cycle to delete rows whose window ended at or before `before`."""
        with self._wakeup:
            self._prune_before = max(before, self._prune_before or before)

    async def sync(self) -> None:
        """Return after a full cycle that started after this call: what was added before
        is committed, and the callback has seen every other process's earlier commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._wakeup:
            if self._closing:
                raise CounterError("rate counters are closed")
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

    def _run(self) -> None:
        try:
            while True:
                work = self._next_work()
                self._cycle(work)
                if work.final:
                    return
        finally:
            self._conn.close()

    def _next_work(self) -> _Work:
        """Wait for increments, a sync request, closing, or the periodic merge."""
        with self._wakeup:
            deadline = time.monotonic() + self._sync_interval
            while not self._closing and not self._waiters:
                now = time.monotonic()
                if self._pending and now >= self._retry_at:
                    break
                wait_until = deadline if not self._pending else min(deadline, self._retry_at)
                if now >= wait_until:
                    break
                self._wakeup.wait(wait_until - now)
            work = _Work(self._pending, self._waiters, self._prune_before, self._closing)
            self._pending, self._waiters, self._prune_before = [], [], None
            return work

    def _cycle(self, work: _Work) -> None:
        try:
            rows = self._apply(work.increments, work.prune_before)
        except Exception as error:  # never let the thread die with waiters (as the queue)
            self._failed(work, error)
            return
        try:
            self._on_sync(work.increments, rows)
        except Exception:  # a bug there must not stop the saving of counts
            logger.exception("rate counter callback failed")
        _settle_all(work.waiters, None)

    def _apply(self, increments: list[Increment], prune_before: int | None) -> list[CounterRow]:
        if not increments and prune_before is None:
            return self._read_changes()  # one statement: a consistent snapshot
        with transaction(self._conn):
            generation = int(self._conn.execute(_BUMP, (_GENERATION_KEY,)).fetchone()[0])
            rows = [(*key, amount, generation) for key, amount in _summed(increments).items()]
            self._conn.executemany(_UPSERT, rows)
            if prune_before is not None:
                self._conn.execute(
                    "DELETE FROM rate_counters WHERE window_end <= ?", (prune_before,)
                )
            return self._read_changes()

    def _read_changes(self) -> list[CounterRow]:
        rows = self._conn.execute(_CHANGED, (self._generation,)).fetchall()
        if rows:
            self._generation = max(int(row[5]) for row in rows)
        return [CounterRow(*row[:5]) for row in rows]

    def _failed(self, work: _Work, error: Exception) -> None:
        """Keep the increments for the next cycle (or report them lost when closing)."""
        if work.final:
            logger.error(
                "rate counters not saved at close (%d increments lost): %s",
                len(work.increments),
                error,
            )
        else:
            logger.warning("cannot save rate counters, will retry: %s", error)
            with self._wakeup:
                self._pending[:0] = work.increments
                if work.prune_before is not None:
                    self._prune_before = max(work.prune_before, self._prune_before or 0)
                self._retry_at = time.monotonic() + _RETRY_SECONDS
        _settle_all(work.waiters, CounterError(f"cannot save rate counters: {error}"))


def _load(conn: sqlite3.Connection) -> tuple[int, list[CounterRow]]:
    """Every row and the generation they are current to, from one snapshot."""
    with transaction(conn, write=False):
        row = conn.execute("SELECT value FROM settings WHERE key = ?", (_GENERATION_KEY,))
        generation = int(row.fetchone()[0])
        rows = conn.execute(
            "SELECT login, kind, window_start, window_end, total FROM rate_counters"
        ).fetchall()
    return generation, [CounterRow(*item) for item in rows]


def _summed(increments: list[Increment]) -> dict[tuple[str, str, int, int], int]:
    """One UPSERT per counter however many messages the batch holds."""
    sums: dict[tuple[str, str, int, int], int] = {}
    for item in increments:
        key = (item.login, item.kind, item.start, item.end)
        sums[key] = sums.get(key, 0) + item.amount
    return sums


def _settle_all(
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]],
    error: Exception | None,
) -> None:
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
