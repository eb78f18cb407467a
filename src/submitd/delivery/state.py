"""Delivery state in the database: leases, per-recipient outcomes, retry times.

The acceptance path writes only the `queue` row; the per-recipient rows of `deliveries`
are made on the first attempt (from the stored envelope), so accepting a message costs
nothing extra. Every function here runs in a worker thread on a connection of its own
and does one short transaction, so the CLI and several nodes can act on the same queue.

Leases (DESIGN principle 5): a node takes a due message by writing its owner name and a
lease expiry in one UPDATE; a node that dies strands nothing, its leases simply expire.
A restarted node frees the leases it held before (same owner prefix) at once.
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


def release_own_leases(conn: sqlite3.Connection, owner_prefix: str) -> int:
    """After a restart: messages we held when we died are due again at once."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE queue SET lease_owner = NULL, lease_until = 0 WHERE lease_owner LIKE ?",
            (owner_prefix + "%",),
        )
    return cursor.rowcount


def lease_due(
    conn: sqlite3.Connection, owner: str, now: float, limit: int, lease_seconds: float
) -> list[str]:
    """Take up to `limit` due messages for `owner`; ids in due order."""
    with transaction(conn):
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
        row = conn.execute(
            "SELECT envelope, created, size, delay_notified FROM queue WHERE id = ?",
            (queue_id,),
        ).fetchone()
        if row is None:
            return None  # deleted meanwhile
        envelope = Envelope.from_json(json.loads(row[0]))
        _ensure_rows(conn, queue_id, envelope)
        pending = conn.execute(
            """SELECT idx, attempts FROM deliveries
               WHERE queue_id = ? AND state = 'pending' ORDER BY idx""",
            (queue_id,),
        ).fetchall()
    return LeasedMessage(
        queue_id,
        envelope,
        float(row[1]),
        int(row[2]),
        bool(row[3]),
        tuple(PendingRecipient(i, envelope.recipients[i], a) for i, a in pending),
    )


def load_with_source(
    conn: sqlite3.Connection, queue_id: str, database_dir: Path
) -> tuple[LeasedMessage, StoredMessage] | None:
    """`load` and `stored_message` in one trip to the worker thread."""
    message = load(conn, queue_id)
    if message is None:
        return None
    return message, stored_message(conn, queue_id, database_dir)


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
) -> Recorded:
    """Store each recipient's outcome; `retry_at` gives the next attempt of deferred ones
    (already past the queue lifetime: the scheduler turned those into failures)."""
    failed: list[tuple[PendingRecipient, Outcome]] = []
    delivered: list[tuple[PendingRecipient, Outcome]] = []
    deferred: list[tuple[PendingRecipient, Outcome]] = []
    with transaction(conn):
        for pending, outcome in results:
            state = {Status.DELIVERED: "delivered", Status.FAILED: "failed"}.get(
                outcome.status, "pending"
            )
            conn.execute(
                """UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt = ?,
                   last_reply = ?, enhanced = ?, remote_mta = ?, relayed = ?, updated = ?
                   WHERE queue_id = ? AND idx = ? AND state = 'pending'""",
                (
                    state,
                    retry_at.get(pending.index, 0.0),
                    outcome.reply,
                    outcome.enhanced,
                    outcome.remote_mta,
                    int(outcome.dsn_relayed),
                    now,
                    queue_id,
                    pending.index,
                ),
            )
            target = {"delivered": delivered, "failed": failed}.get(state, deferred)
            target.append((pending, outcome))
        done = _settle_message(conn, queue_id)
    return Recorded(tuple(failed), tuple(delivered), tuple(deferred), done)


def _settle_message(conn: sqlite3.Connection, queue_id: str) -> bool:
    """Set the message's next attempt from its recipients; 'done' when none is pending."""
    row = conn.execute(
        """SELECT min(next_attempt), count(*) FROM deliveries
           WHERE queue_id = ? AND state = 'pending'""",
        (queue_id,),
    ).fetchone()
    if row[1] == 0:
        conn.execute(
            "UPDATE queue SET state = 'done', lease_owner = NULL, lease_until = 0 WHERE id = ?",
            (queue_id,),
        )
        return True
    conn.execute(
        "UPDATE queue SET next_attempt = ?, lease_owner = NULL, lease_until = 0 WHERE id = ?",
        (row[0], queue_id),
    )
    return False


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
