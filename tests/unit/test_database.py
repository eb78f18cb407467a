"""The eager write transaction: in as soon as another writer lets go, never waiting in
SQLite's coarse busy handler, and still bounded."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from submitd.store import database
from submitd.store.database import connect, transaction


@contextmanager
def _locked_by_another_writer(path: Path, seconds: float) -> Iterator[sqlite3.Connection]:
    """Our connection (busy_timeout 0, as the queue's) while another holds the write lock
    for `seconds` from now."""
    held = threading.Event()

    def hold() -> None:
        other = connect(path)
        with transaction(other):
            held.set()
            time.sleep(seconds)
        other.close()

    conn = connect(path)
    conn.execute("PRAGMA busy_timeout = 0")
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        yield conn
    finally:
        holder.join()
        conn.close()


def test_eager_transaction_gets_in_right_after_the_other_writer(tmp_path: Path) -> None:
    with _locked_by_another_writer(tmp_path / "db.sqlite3", 0.1) as conn:
        started = time.monotonic()
        with transaction(conn, eager=True):
            waited = time.monotonic() - started
            conn.execute("CREATE TABLE t (x)")
        # It waited for the other writer (with busy_timeout 0 and no retries it would
        # have failed at once) and got in soon after; the bound is loose for a busy CI.
        assert 0.05 < waited < 0.5
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)


def test_eager_transaction_gives_up_after_its_timeout(tmp_path: Path) -> None:
    with _locked_by_another_writer(tmp_path / "db.sqlite3", 0.5) as conn:
        with pytest.raises(sqlite3.OperationalError):
            database._begin_eagerly(conn, timeout=0.05)
        assert not conn.in_transaction
