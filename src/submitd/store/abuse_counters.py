"""Authentication-failure counters and known-good logins in the database (issue 6).

The throttle in policy/abuse.py answers on the event loop from memory; this module
makes its state survive a restart and shares it between server processes, with the
design of store/counters.py (read its module doc first): one writer thread per store
owns a connection; operations queued since the last cycle are applied in ONE
`BEGIN IMMEDIATE` transaction, and the rows changed since the previous cycle (by any
process) are read back and handed to the `on_sync` callback. A cycle starts as soon as
work arrives, otherwise every `sync_interval` seconds.

Why a second store rather than CounterStore on `rate_counters`: those rows are loaded
and merged by every RateLimiter, so attack traffic (thousands of addresses) would grow
the per-user limiter's memory and merge work; and the throttle needs two things the
per-user counters do not, a reset (a successful login clears its address's failures,
as Dovecot's auth penalty does) and the known-good (network, login) pairs.

Operations, in the order they were queued:

- `CounterAdd`: `total = total + n` for one key and fixed window, an atomic UPSERT, so
  increments from several processes add up.
- `CounterReset`: every window of one key set to 0. Within a batch, a reset drops the
  same key's earlier increments and keeps the later ones, so the result is what
  applying the operations one by one would give.
- `KnownGood`: remember that `login` authenticated from `network` at a time; the
  latest time wins.

Change tracking is store/counters.py's: `settings.abuse_generation` is bumped by each
write transaction and stamped on the rows it writes (resets included, so the other
processes see the zeros), and a reader asks only for `generation > last seen`.

Bounded disk: `prune` deletes windows that no longer count (a window counts while it is
the current or the previous one of its length), known-good pairs not used for
`known_good_ttl`, and beyond that the oldest rows over a row cap, so an attack from very
many addresses cannot grow the file without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from submitd.store.batching import BatchedWriter
from submitd.store.database import connect, transaction

logger = logging.getLogger("submitd.store.abuse_counters")

_GENERATION_KEY = "abuse_generation"
_RETRY_SECONDS = 1.0  # after a failed cycle, instead of retrying in a tight loop

_BUMP = "UPDATE settings SET value = value + 1 WHERE key = ? RETURNING value"
_ADD = """
    INSERT INTO abuse_counters (key, window_start, window_end, total, generation)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (key, window_start, window_end)
    DO UPDATE SET total = total + excluded.total, generation = excluded.generation
"""
_RESET = "UPDATE abuse_counters SET total = 0, generation = ? WHERE key = ?"
_KNOWN = """
    INSERT INTO abuse_known_good (network, login, last_success, generation)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (network, login) DO UPDATE SET
        last_success = max(last_success, excluded.last_success),
        generation = excluded.generation
"""
_CHANGED_COUNTERS = """
    SELECT key, window_start, window_end, total, generation
    FROM abuse_counters WHERE generation > ?
"""
_CHANGED_KNOWN = """
    SELECT network, login, last_success, generation
    FROM abuse_known_good WHERE generation > ? ORDER BY last_success
"""
# A window still counts while it is the current or the previous one of its length,
# i.e. until end + (end - start).
_PRUNE_COUNTERS = "DELETE FROM abuse_counters WHERE 2 * window_end - window_start <= ?"
_PRUNE_KNOWN = "DELETE FROM abuse_known_good WHERE last_success <= ?"
_CAP_COUNTERS = """
    DELETE FROM abuse_counters WHERE (key, window_start, window_end) IN (
        SELECT key, window_start, window_end FROM abuse_counters
        ORDER BY window_end LIMIT max(0, (SELECT count(*) FROM abuse_counters) - ?)
    )
"""
_CAP_KNOWN = """
    DELETE FROM abuse_known_good WHERE (network, login) IN (
        SELECT network, login FROM abuse_known_good
        ORDER BY last_success LIMIT max(0, (SELECT count(*) FROM abuse_known_good) - ?)
    )
"""


@dataclass(frozen=True, slots=True)
class CounterAdd:
    """Add `amount` to `key`'s counter in the window [start, end). `tag` is the
    caller's, returned untouched in the callback (policy/abuse.py's reset epoch)."""

    key: str
    start: int
    end: int
    amount: int
    tag: int = 0


@dataclass(frozen=True, slots=True)
class CounterReset:
    """Set every window of `key` to 0; `tag` as in CounterAdd."""

    key: str
    tag: int = 0


@dataclass(frozen=True, slots=True)
class KnownGood:
    """`login` authenticated successfully from `network` at `last_success`."""

    network: str
    login: str
    last_success: int


Operation = CounterAdd | CounterReset | KnownGood


@dataclass(frozen=True, slots=True)
class CounterRow:
    """A counter's total in the database, over every process, as of one cycle."""

    key: str
    start: int
    end: int
    total: int


@dataclass(frozen=True, slots=True)
class Prune:
    """What the next cycle deletes; see the module doc."""

    now: int  # windows that stopped counting by then
    known_before: int  # known-good pairs last used at or before
    max_counter_rows: int
    max_known_rows: int


# Called in the writer thread after each cycle (and once, from the constructor, with
# everything stored): the operations that cycle committed (already included in the
# rows) and the rows changed since the previous cycle.
SyncCallback = Callable[[Sequence[Operation], Sequence[CounterRow], Sequence[KnownGood]], None]


class AbuseStoreError(Exception):
    """The counters could not be saved; they stay pending and are retried."""


_Rows = tuple[list[CounterRow], list[KnownGood]]


class AbuseStore(BatchedWriter[Operation, Prune, _Rows]):
    """Persists the throttle's operations in batches and reports merged rows."""

    description = "abuse counters"
    error_type = AbuseStoreError
    retry_seconds = _RETRY_SECONDS

    def __init__(self, db_path: Path, on_sync: SyncCallback, *, sync_interval: float = 1.0) -> None:
        self._on_sync = on_sync
        conn = connect(db_path, check_same_thread=False, relaxed=True)
        super().__init__(conn, sync_interval=sync_interval, thread_name="submitd-abuse")
        try:
            self._generation = 0
            with transaction(self._conn, write=False):
                counters, known = self._read_changes()
            on_sync((), counters, known)
        except BaseException:
            conn.close()
            raise
        self._start()

    def prune(self, prune: Prune) -> None:
        """Ask the next cycle to delete what no longer counts (the latest request wins)."""
        self._request_prune(prune)

    def _report(self, operations: list[Operation], result: _Rows) -> None:
        counters, known = result
        self._on_sync(operations, counters, known)

    def _apply(
        self, operations: list[Operation], prune: Prune | None
    ) -> tuple[list[CounterRow], list[KnownGood]]:
        if not operations and prune is None:
            with transaction(self._conn, write=False):  # one snapshot of both tables
                return self._read_changes()
        resets, adds, known = _batched(operations)
        with transaction(self._conn):
            generation = int(self._conn.execute(_BUMP, (_GENERATION_KEY,)).fetchone()[0])
            self._conn.executemany(_RESET, [(generation, key) for key in resets])
            self._conn.executemany(
                _ADD,
                [
                    (key, start, end, amount, generation)
                    for key, windows in adds.items()
                    for (start, end), amount in windows.items()
                ],
            )
            self._conn.executemany(
                _KNOWN,
                [(network, login, when, generation) for (network, login), when in known.items()],
            )
            if prune is not None:
                self._conn.execute(_PRUNE_COUNTERS, (prune.now,))
                self._conn.execute(_PRUNE_KNOWN, (prune.known_before,))
                self._conn.execute(_CAP_COUNTERS, (prune.max_counter_rows,))
                self._conn.execute(_CAP_KNOWN, (prune.max_known_rows,))
            return self._read_changes()

    def _read_changes(self) -> tuple[list[CounterRow], list[KnownGood]]:
        """Rows changed since the last read; call inside a transaction (one snapshot)."""
        counters = self._conn.execute(_CHANGED_COUNTERS, (self._generation,)).fetchall()
        known = self._conn.execute(_CHANGED_KNOWN, (self._generation,)).fetchall()
        seen = [int(row[-1]) for row in (*counters, *known)]
        if seen:
            self._generation = max(self._generation, *seen)
        return (
            [CounterRow(*row[:4]) for row in counters],
            [KnownGood(*row[:3]) for row in known],
        )


def _batched(
    operations: Sequence[Operation],
) -> tuple[list[str], dict[str, dict[tuple[int, int], int]], dict[tuple[str, str], int]]:
    """One statement per key and window however many operations the batch holds.

    Resets are applied before the additions; a reset therefore drops the additions to
    its key queued before it, and keeps those queued after it.
    """
    resets: dict[str, None] = {}
    adds: dict[str, dict[tuple[int, int], int]] = {}
    known: dict[tuple[str, str], int] = {}
    for op in operations:
        if isinstance(op, CounterAdd):
            windows = adds.setdefault(op.key, {})
            windows[(op.start, op.end)] = windows.get((op.start, op.end), 0) + op.amount
        elif isinstance(op, CounterReset):
            resets[op.key] = None
            adds.pop(op.key, None)
        else:
            pair = (op.network, op.login)
            known[pair] = max(op.last_success, known.get(pair, op.last_success))
    return list(resets), adds, known
