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

A cycle starts 50 ms after the first increment of a batch (`batch_delay`; as in the
queue's group commit, while one transaction runs new increments form the next batch)
and otherwise every
`sync_interval` seconds, so a process sees the others' counts within that interval.

Change tracking. `settings.rate_counters_generation` is bumped by each write
transaction and stamped on the rows it touches. Write transactions are serialised by
SQLite's lock, so generations are committed in increasing order: a reader that has seen
everything up to generation g misses nothing by asking for `generation > g` next time,
and reads only the rows that changed (cheap with thousands of idle users).

Durability: the connection is relaxed (`synchronous=NORMAL`, store/database.py): a
committed cycle survives a crash of the process, and a power cut may lose the last
second. What a process crash can forget is only what was added but not yet committed:
the increments of the current batch, at most 50 ms' worth.

Rows are kept per (login, kind, window_start) with the window's end; the store does
not interpret windows, it only deletes rows whose window has ended when asked.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from submitd.store.batching import BatchedWriter
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


class CounterStore(BatchedWriter[Increment, int, list[CounterRow]]):
    """Persists increments in batches and reports merged totals; see the module doc."""

    description = "rate counters"
    error_type = CounterError
    retry_seconds = _RETRY_SECONDS

    def __init__(self, db_path: Path, on_sync: SyncCallback, *, sync_interval: float = 1.0) -> None:
        self._on_sync = on_sync
        conn = connect(db_path, check_same_thread=False, relaxed=True)
        try:
            self._generation, rows = _load(conn)
            on_sync((), rows)
        except BaseException:
            conn.close()
            raise
        super().__init__(conn, sync_interval=sync_interval, thread_name="submitd-counters")
        self._start()

    def prune(self, before: int) -> None:
        """Ask the next cycle to delete rows whose window ended at or before `before`."""
        self._request_prune(before)

    def _merge_prune(self, current: int | None, new: int) -> int:
        return new if current is None else max(current, new)

    def _report(self, operations: list[Increment], result: list[CounterRow]) -> None:
        self._on_sync(operations, result)

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
