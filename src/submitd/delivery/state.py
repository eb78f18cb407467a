"""Delivery state in the database: leases, per-recipient outcomes, retry times.

The acceptance path writes only the `queue` row; the per-recipient rows of `deliveries`
are made on the first attempt (from the stored envelope), so accepting a message costs
nothing extra. Every function here runs in a worker thread on a connection of its own
and does one short transaction, so the CLI and several nodes can act on the same queue.

Leases (DESIGN principle 5): a node takes a due message by writing its owner name and a
lease expiry in one UPDATE; a node that dies strands nothing, its leases simply expire.
A restarted node frees the leases it held before (same owner prefix) at once.

Finished messages. A message whose every recipient is settled leaves the server the way
it leaves Postfix: in the transaction that records its last outcome its content is
dropped (prefix and body emptied, `body_path` cleared) and the time noted in `finished`.
The row and its `deliveries` keep the outcomes for `[queue] keep_finished` seconds, so
`submitd queue list --all` can still answer "what happened to my mail"; then
`purge_finished` deletes them. A spooled body's file is unlinked by the caller once that
transaction has committed and nothing reads the file any more (the failure notice is
built from it after the record): a crash in between leaves an orphan file, which
start-up collects (store/queue.py `collect_orphans`), never a row pointing at nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from submitd.delivery.types import Outcome, Status
from submitd.envelope import Envelope, Recipient
from submitd.store.database import transaction

CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class PendingRecipient:
    index: int
    recipient: Recipient
    attempts: int


@dataclass(frozen=True, slots=True)
class LeasedMessage:
    queue_id: str
    envelope: Envelope
    created: float
    size: int
    delay_notified: bool
    pending: tuple[PendingRecipient, ...]


@dataclass(frozen=True, slots=True)
class Recorded:
    """What changed with one attempt, for notifications."""

    failed: tuple[tuple[PendingRecipient, Outcome], ...]
    delivered: tuple[tuple[PendingRecipient, Outcome], ...]
    deferred: tuple[tuple[PendingRecipient, Outcome], ...]
    done: bool  # no recipient is pending any more
    # The finished message's spool file (its former `body_path`), to unlink once the
    # notices are built; None when there is none (inline body, or not finished).
    released_file: str | None = None


def release_own_leases(conn: sqlite3.Connection, owner_prefix: str) -> int:
    """After a restart: messages we held when we died are due again at once."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE queue SET lease_owner = NULL, lease_until = 0 WHERE lease_owner LIKE ?",
            (owner_prefix + "%",),
        )
    return cursor.rowcount


def _lease(
    conn: sqlite3.Connection, owner: str, now: float, limit: int, lease_seconds: float
) -> list[str]:
    rows = conn.execute(
        """SELECT id FROM queue
           WHERE state = 'queued' AND next_attempt <= ? AND lease_until <= ?
           ORDER BY next_attempt LIMIT ?""",
        (now, now, limit),
    ).fetchall()
    ids = [row[0] for row in rows]
    conn.executemany(
        "UPDATE queue SET lease_owner = ?, lease_until = ? WHERE id = ?",
        [(owner, now + lease_seconds, queue_id) for queue_id in ids],
    )
    return ids


def load(conn: sqlite3.Connection, queue_id: str) -> LeasedMessage | None:
    """The message's envelope and its pending recipients (rows made on first use)."""
    with transaction(conn):
        return _load(conn, queue_id)


def _load(conn: sqlite3.Connection, queue_id: str) -> LeasedMessage | None:
    head = _head(conn, queue_id)
    return None if head is None else _with_pending(conn, head)


@dataclass(frozen=True, slots=True)
class _Head:
    queue_id: str
    envelope: Envelope
    created: float
    size: int
    delay_notified: bool


def _head(conn: sqlite3.Connection, queue_id: str) -> _Head | None:
    """The queue row's envelope and times; makes the recipients' rows (a write)."""
    row = conn.execute(
        "SELECT envelope, created, size, delay_notified FROM queue WHERE id = ?",
        (queue_id,),
    ).fetchone()
    if row is None:
        return None  # deleted meanwhile
    envelope = Envelope.from_json(json.loads(row[0]))
    _ensure_rows(conn, queue_id, envelope)
    return _Head(queue_id, envelope, float(row[1]), int(row[2]), bool(row[3]))


def _with_pending(conn: sqlite3.Connection, head: _Head) -> LeasedMessage:
    pending = conn.execute(
        """SELECT idx, attempts FROM deliveries
           WHERE queue_id = ? AND state = 'pending' ORDER BY idx""",
        (head.queue_id,),
    ).fetchall()
    recipients = head.envelope.recipients
    return LeasedMessage(
        head.queue_id,
        head.envelope,
        head.created,
        head.size,
        head.delay_notified,
        tuple(PendingRecipient(i, recipients[i], a) for i, a in pending),
    )


def lease_and_load(
    conn: sqlite3.Connection,
    owner: str,
    now: float,
    limit: int,
    lease_seconds: float,
    database_dir: Path,
) -> list[tuple[LeasedMessage, StoredMessage]]:
    """Take up to `limit` due messages for `owner` (in due order) and load each with its
    content: one trip to the worker thread and one commit for a whole batch.

    The write lock is held only for the lease and the recipients' rows; the contents
    are read after the commit, in a read transaction (WAL: it blocks nobody). Acceptance
    waits for that same lock to commit the messages mail clients are waiting on, and
    SQLite's busy handler sleeps in steps of milliseconds: a long hold here was a p99
    spike there.
    """
    with transaction(conn):
        ids = _lease(conn, owner, now, limit, lease_seconds)
        heads = [head for queue_id in ids if (head := _head(conn, queue_id)) is not None]
    if not heads:
        return []
    with transaction(conn, write=False):
        return [
            (_with_pending(conn, head), stored_message(conn, head.queue_id, database_dir))
            for head in heads
        ]


def _ensure_rows(conn: sqlite3.Connection, queue_id: str, envelope: Envelope) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO deliveries (queue_id, idx, address) VALUES (?, ?, ?)",
        [(queue_id, i, r.address) for i, r in enumerate(envelope.recipients)],
    )


def record(
    conn: sqlite3.Connection,
    queue_id: str,
    results: list[tuple[PendingRecipient, Outcome]],
    now: float,
    retry_at: dict[int, float],
    keep_finished: float,
) -> Recorded:
    """Store each recipient's outcome; `retry_at` gives the next attempt of deferred ones
    (already past the queue lifetime: the scheduler turned those into failures).

    When none is left pending the message is finished (see the module docstring): kept
    without its content for `keep_finished` seconds, or deleted at once when that is 0.
    """
    with transaction(conn):
        return _record(conn, Attempt(queue_id, results, now, retry_at), keep_finished)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt's outcomes, to record."""

    queue_id: str
    results: list[tuple[PendingRecipient, Outcome]]
    now: float
    retry_at: dict[int, float]


def record_many(
    conn: sqlite3.Connection, attempts: list[Attempt], keep_finished: float
) -> list[Recorded]:
    """`record` for several attempts in one transaction (the scheduler batches the
    attempts that end while a previous batch is being written, like group commit)."""
    with transaction(conn):
        return [_record(conn, attempt, keep_finished) for attempt in attempts]


def _record(conn: sqlite3.Connection, attempt: Attempt, keep_finished: float) -> Recorded:
    failed: list[tuple[PendingRecipient, Outcome]] = []
    delivered: list[tuple[PendingRecipient, Outcome]] = []
    deferred: list[tuple[PendingRecipient, Outcome]] = []
    for pending, outcome in attempt.results:
        state = {Status.DELIVERED: "delivered", Status.FAILED: "failed"}.get(
            outcome.status, "pending"
        )
        conn.execute(
            """UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt = ?,
               last_reply = ?, enhanced = ?, remote_mta = ?, relayed = ?, updated = ?
               WHERE queue_id = ? AND idx = ? AND state = 'pending'""",
            (
                state,
                attempt.retry_at.get(pending.index, 0.0),
                outcome.reply,
                outcome.enhanced,
                outcome.remote_mta,
                int(outcome.dsn_relayed),
                attempt.now,
                attempt.queue_id,
                pending.index,
            ),
        )
        target = {"delivered": delivered, "failed": failed}.get(state, deferred)
        target.append((pending, outcome))
    done, released = _settle_message(conn, attempt.queue_id, attempt.now, keep_finished)
    return Recorded(tuple(failed), tuple(delivered), tuple(deferred), done, released)


def _settle_message(
    conn: sqlite3.Connection, queue_id: str, now: float, keep_finished: float
) -> tuple[bool, str | None]:
    """Set the message's next attempt from its recipients; finish it when none is pending.

    Returns (finished, the spool file it no longer needs). Emptied, not NULL: the
    table's CHECK wants exactly one of body and body_path, and x'' costs nothing.
    """
    row = conn.execute(
        """SELECT min(next_attempt), count(*) FROM deliveries
           WHERE queue_id = ? AND state = 'pending'""",
        (queue_id,),
    ).fetchone()
    if row[1] != 0:
        conn.execute(
            "UPDATE queue SET next_attempt = ?, lease_owner = NULL, lease_until = 0 WHERE id = ?",
            (row[0], queue_id),
        )
        return False, None
    message = conn.execute(
        "SELECT state, body_path FROM queue WHERE id = ?", (queue_id,)
    ).fetchone()
    if message is None:
        return True, None  # deleted meanwhile (`queue delete`): nothing left to settle
    if message[0] == "done":
        return True, None  # finished before (an attempt on an expired lease): keep `finished`
    if keep_finished <= 0:
        conn.execute("DELETE FROM deliveries WHERE queue_id = ?", (queue_id,))
        conn.execute("DELETE FROM queue WHERE id = ?", (queue_id,))
    else:
        conn.execute(
            """UPDATE queue SET state = 'done', lease_owner = NULL, lease_until = 0,
               prefix = x'', body = x'', body_path = NULL, finished = ? WHERE id = ?""",
            (now, queue_id),
        )
    return True, None if message[1] is None else str(message[1])


def purge_finished(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Delete up to `limit` messages finished before `before`, with their deliveries rows.

    Returns how many; the caller repeats while that equals `limit`. One bounded
    transaction per call, so the write lock is never held for long: acceptance (the
    queue writer) and the recording of outcomes wait at most for one batch. Finished
    rows hold no content (see `_settle_message`), so there is no file to remove.

    INDEXED BY: without statistics the planner picks queue_due (state, next_attempt)
    and would walk every finished row, then sort them, for each batch.
    """
    with transaction(conn):
        ids = [
            (row[0],)
            for row in conn.execute(
                """SELECT id FROM queue INDEXED BY queue_finished
                   WHERE state = 'done' AND finished < ? ORDER BY finished LIMIT ?""",
                (before, limit),
            )
        ]
        conn.executemany("DELETE FROM deliveries WHERE queue_id = ?", ids)
        conn.executemany("DELETE FROM queue WHERE id = ?", ids)
    return len(ids)


def finished_at(conn: sqlite3.Connection, queue_id: str) -> float | None:
    """When the message finished (every recipient settled), or None if it has not."""
    row = conn.execute("SELECT finished FROM queue WHERE id = ?", (queue_id,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def mark_delay_notified(conn: sqlite3.Connection, queue_id: str) -> None:
    with transaction(conn):
        conn.execute("UPDATE queue SET delay_notified = 1 WHERE id = ?", (queue_id,))


def release(conn: sqlite3.Connection, queue_id: str, owner: str) -> None:
    """Give a lease back without recording anything (shutdown mid-attempt)."""
    with transaction(conn):
        conn.execute(
            "UPDATE queue SET lease_owner = NULL, lease_until = 0 WHERE id = ? AND lease_owner = ?",
            (queue_id, owner),
        )


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A queued message's bytes, read in pieces: `prefix` then the body."""

    prefix: bytes
    body: bytes | None
    body_file: Path | None
    size: int

    @property
    def in_memory(self) -> bool:
        return self.body is not None

    def chunks(self) -> Iterator[bytes]:
        yield self.prefix
        if self.body is not None:
            for offset in range(0, len(self.body), CHUNK):
                yield self.body[offset : offset + CHUNK]
            return
        assert self.body_file is not None
        with self.body_file.open("rb") as handle:
            while piece := handle.read(CHUNK):
                yield piece


def stored_message(conn: sqlite3.Connection, queue_id: str, database_dir: Path) -> StoredMessage:
    row = conn.execute(
        "SELECT prefix, body, body_path, size FROM queue WHERE id = ?", (queue_id,)
    ).fetchone()
    if row is None:
        raise LookupError(queue_id)
    prefix, body, body_path, size = row
    path = None if body_path is None else database_dir / str(body_path)
    return StoredMessage(bytes(prefix), None if body is None else bytes(body), path, int(size))


# ----------------------------------------------------------------- management (CLI)


def set_state(conn: sqlite3.Connection, queue_id: str, state: str) -> bool:
    """hold / release: 'held' messages are never leased."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE queue SET state = ? WHERE id = ? AND state IN ('queued', 'held')",
            (state, queue_id),
        )
    return cursor.rowcount == 1


def retry_now(conn: sqlite3.Connection, queue_id: str | None) -> int:
    """Schedule the pending recipients of one message (or of all) for now."""
    only = "" if queue_id is None else " AND queue_id = ?"
    args: tuple[str, ...] = () if queue_id is None else (queue_id,)
    with transaction(conn):
        conn.execute("UPDATE deliveries SET next_attempt = 0 WHERE state = 'pending'" + only, args)
        cursor = conn.execute(
            "UPDATE queue SET next_attempt = 0 WHERE state = 'queued'"
            + ("" if queue_id is None else " AND id = ?"),
            args,
        )
    return cursor.rowcount


def delete(conn: sqlite3.Connection, queue_id: str, database_dir: Path) -> bool:
    with transaction(conn):
        row = conn.execute("SELECT body_path FROM queue WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            return False
        conn.execute("DELETE FROM deliveries WHERE queue_id = ?", (queue_id,))
        conn.execute("DELETE FROM queue WHERE id = ?", (queue_id,))
    if row[0] is not None:
        (database_dir / str(row[0])).unlink(missing_ok=True)
    return True


@dataclass(frozen=True, slots=True)
class RecipientState:
    address: str
    state: str
    attempts: int
    next_attempt: float
    last_reply: str | None
    enhanced: str | None


def recipient_states(conn: sqlite3.Connection, queue_id: str) -> list[RecipientState]:
    rows = conn.execute(
        """SELECT address, state, attempts, next_attempt, last_reply, enhanced
           FROM deliveries WHERE queue_id = ? ORDER BY idx""",
        (queue_id,),
    ).fetchall()
    return [RecipientState(a, s, int(n), float(t), r, e) for a, s, n, t, r, e in rows]
