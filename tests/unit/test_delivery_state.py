"""Finished messages in delivery/state.py: content dropped at once, rows kept, then purged.

Real database and spool files (the queue's own writer stores the messages); the clock
is passed in, so a day of retention takes no time.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from submitd.config import ConfigError, QueueConfig, config_from_mapping
from submitd.delivery import state
from submitd.delivery.types import Outcome, Status
from submitd.envelope import Envelope, Recipient, SessionInfo
from submitd.store import database
from submitd.store.database import connect
from submitd.store.queue import Queue, collect_orphans, new_queue_id, read_message_bytes

DAY = 86400.0
INLINE_MAX = 1024
SMALL = b"Subject: small\r\n\r\n" + b"x" * 100 + b"\r\n"
LARGE = b"Subject: large\r\n\r\n" + (b"y" * 998 + b"\r\n") * 10  # spooled: > INLINE_MAX


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "submitd.sqlite3"


@pytest.fixture
def conn(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(db_path)
    yield connection
    connection.close()


def _spool(db_path: Path) -> Path:
    return db_path.parent / "spool"


def _store(db_path: Path, *bodies: bytes, recipients: int = 1) -> list[str]:
    """Queue each body for `recipients` recipients through the real queue writer."""

    async def main() -> list[str]:
        queue = Queue(db_path, _spool(db_path), QueueConfig(inline_max=INLINE_MAX))
        ids = []
        try:
            for body in bodies:
                writer = queue.open_message(new_queue_id())
                writer.write(body)
                rcpts = [Recipient(f"r{n}@example.net") for n in range(recipients)]
                envelope = Envelope("a@example.org", rcpts)
                await queue.commit(writer, envelope, SessionInfo("s1", "192.0.2.1", 4000))
                ids.append(writer.queue_id)
        finally:
            await queue.close()
        return ids

    return asyncio.run(main())


def _settle(
    conn: sqlite3.Connection,
    queue_id: str,
    now: float,
    keep_finished: float = DAY,
    status: Status = Status.DELIVERED,
    only: int | None = None,
) -> state.Recorded:
    """One attempt that settles every pending recipient (or only the one at `only`)."""
    message = state.load(conn, queue_id)
    assert message is not None
    results = [
        (pending, Outcome(pending.recipient, status, "250 2.0.0 Ok", "2.0.0"))
        for pending in message.pending
        if only is None or pending.index == only
    ]
    return state.record(conn, queue_id, results, now, {}, keep_finished)


def _row(conn: sqlite3.Connection, queue_id: str) -> tuple[object, ...] | None:
    row = conn.execute(
        "SELECT state, prefix, body, body_path, finished FROM queue WHERE id = ?", (queue_id,)
    ).fetchone()
    return None if row is None else tuple(row)


def _deliveries(conn: sqlite3.Connection, queue_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT state FROM deliveries WHERE queue_id = ? ORDER BY idx", (queue_id,)
    ).fetchall()
    return [row[0] for row in rows]


def test_finished_inline_message_loses_its_content_and_keeps_its_outcomes(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    [queue_id] = _store(db_path, SMALL)
    recorded = _settle(conn, queue_id, now=1000.0)
    assert recorded.done and recorded.released_file is None
    assert _row(conn, queue_id) == ("done", b"", b"", None, 1000.0)
    assert _deliveries(conn, queue_id) == ["delivered"]
    assert state.finished_at(conn, queue_id) == 1000.0
    assert read_message_bytes(conn, queue_id) == b""  # readers see no content, no error


def test_finished_spooled_message_hands_its_file_to_the_caller(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    [queue_id] = _store(db_path, LARGE)
    [path] = [p for p in _spool(db_path).iterdir() if p.suffix == ".eml"]
    source = state.stored_message(conn, queue_id, db_path.parent)
    recorded = _settle(conn, queue_id, now=1000.0)
    assert recorded.done
    assert recorded.released_file is not None
    assert (db_path.parent / recorded.released_file).resolve() == path.resolve()
    assert _row(conn, queue_id) == ("done", b"", b"", None, 1000.0)
    # The file is the caller's to unlink, after the notices: a source loaded before the
    # record (as the scheduler's) still reads the whole message.
    assert path.exists()
    assert b"".join(source.chunks()) == LARGE


def test_a_message_with_a_recipient_pending_keeps_everything(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    [queue_id] = _store(db_path, LARGE, recipients=2)
    before = _row(conn, queue_id)
    recorded = _settle(conn, queue_id, now=1000.0, only=0)
    assert not recorded.done and recorded.released_file is None
    assert _row(conn, queue_id) == before
    assert before is not None and before[0] == "queued" and before[3] is not None
    assert _deliveries(conn, queue_id) == ["delivered", "pending"]
    assert state.finished_at(conn, queue_id) is None
    recorded = _settle(conn, queue_id, now=2000.0, status=Status.FAILED)
    assert recorded.done and recorded.released_file == before[3]
    assert _row(conn, queue_id) == ("done", b"", b"", None, 2000.0)
    assert _deliveries(conn, queue_id) == ["delivered", "failed"]


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["inline", "spooled"])
def test_keep_finished_zero_deletes_the_message_at_once(
    db_path: Path, conn: sqlite3.Connection, body: bytes
) -> None:
    [queue_id] = _store(db_path, body, recipients=2)
    recorded = _settle(conn, queue_id, now=1000.0, keep_finished=0)
    assert recorded.done
    assert (recorded.released_file is not None) == (body is LARGE)
    assert _row(conn, queue_id) is None
    assert _deliveries(conn, queue_id) == []


def test_settling_a_finished_message_again_keeps_its_time(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    [queue_id] = _store(db_path, SMALL)
    _settle(conn, queue_id, now=1000.0)
    again = state.record(conn, queue_id, [], 5000.0, {}, DAY)
    assert again.done and again.released_file is None
    assert state.finished_at(conn, queue_id) == 1000.0


def test_purge_removes_only_rows_finished_before_the_cutoff_in_batches(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    old = _store(db_path, SMALL, SMALL, SMALL, LARGE)
    recent, pending = _store(db_path, SMALL, SMALL)
    now = 10 * DAY
    for n, queue_id in enumerate(old):
        _settle(conn, queue_id, now=now - DAY - 10 - n)  # a day and seconds ago
    _settle(conn, recent, now=now - DAY + 10)  # not yet a day
    assert state.purge_finished(conn, now - DAY, 3) == 3  # a full batch: call again
    assert state.purge_finished(conn, now - DAY, 3) == 1
    assert state.purge_finished(conn, now - DAY, 3) == 0
    left = [row[0] for row in conn.execute("SELECT id FROM queue ORDER BY id")]
    assert left == sorted([recent, pending])
    assert conn.execute(
        "SELECT count(*) FROM deliveries WHERE queue_id IN (?, ?, ?, ?)", old
    ).fetchone() == (0,)
    assert _deliveries(conn, recent) == ["delivered"]
    # A day later the recent one goes too; a queued message never does.
    assert state.purge_finished(conn, now + 20, 1000) == 1
    assert [row[0] for row in conn.execute("SELECT id FROM queue")] == [pending]


def test_purge_finds_its_rows_through_the_partial_index(conn: sqlite3.Connection) -> None:
    """A range search of queue_finished, not a walk of every finished row and a sort."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    state.purge_finished(conn, 0.0, 10)
    conn.set_trace_callback(None)
    [select] = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plans = [str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + select)]
    assert plans == ["SEARCH queue USING INDEX queue_finished (finished<?)"], plans


def test_retry_hold_and_release_leave_a_finished_message_alone(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    [queue_id] = _store(db_path, SMALL)
    _settle(conn, queue_id, now=1000.0)
    assert state.retry_now(conn, queue_id) == 0
    assert state.retry_now(conn, None) == 0
    assert not state.set_state(conn, queue_id, "held")
    assert not state.set_state(conn, queue_id, "queued")
    assert _row(conn, queue_id) == ("done", b"", b"", None, 1000.0)
    leased = state.lease_and_load(conn, "test:1", time.time() + DAY, 10, 60.0, db_path.parent)
    assert leased == []


def test_an_unlink_lost_to_a_crash_leaves_an_orphan_that_start_up_collects(
    db_path: Path, conn: sqlite3.Connection
) -> None:
    [queue_id] = _store(db_path, LARGE)
    recorded = _settle(conn, queue_id, now=time.time())
    assert recorded.released_file is not None
    orphan = db_path.parent / recorded.released_file  # the process died before unlinking
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert collect_orphans(db_path, _spool(db_path), older_than=time.time() - 60) == 1
    assert not orphan.exists()
    assert _row(conn, queue_id) is not None  # the outcomes stay


def test_migration_empties_messages_finished_before_it(db_path: Path) -> None:
    """A database of the version before: its done messages kept their content."""
    previous = len(database.MIGRATIONS) - 1
    db_path.parent.mkdir(mode=0o700)
    old = sqlite3.connect(db_path, isolation_level=None)
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in range(1, previous + 1):
        for statement in database.MIGRATIONS[version - 1]:
            old.execute(statement)
        old.execute("INSERT INTO schema_version VALUES (?)", (version,))
    spool = _spool(db_path)
    spool.mkdir(mode=0o700)
    (spool / "DONE.eml").write_bytes(LARGE)
    rows = [
        ("DONE", "done", None, "spool/DONE.eml"),
        ("DONEINLINE", "done", SMALL, None),
        ("QUEUED", "queued", SMALL, None),
    ]
    for queue_id, queue_state, body, body_path in rows:
        old.execute(
            """INSERT INTO queue (id, created, state, envelope, session, size, prefix,
               body, body_path) VALUES (?, 1.0, ?, '{}', '{}', 1, x'0d0a', ?, ?)""",
            (queue_id, queue_state, body, body_path),
        )
    old.close()

    conn = connect(db_path)
    try:
        now = time.time()
        stored = {
            row[0]: tuple(row[1:])
            for row in conn.execute("SELECT id, prefix, body, body_path, finished FROM queue")
        }
        for queue_id in ("DONE", "DONEINLINE"):
            prefix, body, body_path, finished = stored[queue_id]
            assert (prefix, body, body_path) == (b"", b"", None)
            assert isinstance(finished, float) and abs(finished - now) < 60
        assert stored["QUEUED"] == (b"\r\n", SMALL, None, None)
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(queue)")}
        assert "queue_finished" in indexes
    finally:
        conn.close()
    old_time = time.time() - 3600
    os.utime(spool / "DONE.eml", (old_time, old_time))
    assert collect_orphans(db_path, spool, older_than=time.time() - 60) == 1


def test_keep_finished_is_validated() -> None:
    assert config_from_mapping({}).queue.keep_finished == DAY
    assert config_from_mapping({"queue": {"keep_finished": 0}}).queue.keep_finished == 0
    assert config_from_mapping({"queue": {"keep_finished": 3.5}}).queue.keep_finished == 3.5
    for bad in (-1, "a day"):
        with pytest.raises(ConfigError, match=r"queue\.keep_finished"):
            config_from_mapping({"queue": {"keep_finished": bad}})
