"""Opening the SQLite database and keeping its schema current.

Why these settings (DESIGN principle 2, "a message is accepted only when it is safe"):

- WAL journal: readers (the CLI, the credential verifier, the scheduler) never block the
  queue writer and the writer never blocks them, across processes too.
- `synchronous=FULL`: in WAL mode this fsyncs the log at every commit, so a committed
  transaction survives a power cut. With NORMAL a commit could be lost, which would
  break the promise behind a 250 reply.
- `busy_timeout` 5000 ms: several processes (workers, `submitd user ...`) write the same
  file; a writer waits for the lock instead of failing at once.
- foreign keys on: deleting a user deletes their addresses (ON DELETE CASCADE).
- autocommit mode (`isolation_level=None`): the stdlib's implicit BEGIN is easy to get
  wrong; callers open transactions explicitly with `transaction()`, so every write says
  where it starts and ends.

The database file is created 0600 inside a 0700 directory before SQLite opens it: it
holds password hashes and mail, and SQLite gives its -wal and -shm files the mode of the
main file.

Migrations are a list of SQL statement tuples, applied in order under `BEGIN IMMEDIATE`
(one process migrates, the others wait on the lock and then see the new version). The
version is kept in a `schema_version` table. A database newer than this code is refused
rather than used half-understood.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_MS = 5000
EAGER_RETRY = 0.0002  # seconds between tries of an eager transaction

# Version N is MIGRATIONS[N - 1]. Append; never edit a migration that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            login TEXT NOT NULL UNIQUE COLLATE NOCASE,
            password_hash TEXT NOT NULL,
            relaxed_header_from INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL
        )""",
        """CREATE TABLE user_addresses (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            address TEXT NOT NULL COLLATE NOCASE,
            PRIMARY KEY (user_id, address)
        )""",
        "CREATE INDEX user_addresses_by_address ON user_addresses(address)",
        # Untyped value: the cache secret is a BLOB, the generation an INTEGER.
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value NOT NULL)",
        "INSERT INTO settings (key, value) VALUES ('credentials_generation', 0)",
        """CREATE TABLE queue (
            id TEXT PRIMARY KEY,
            created REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'queued',
            envelope TEXT NOT NULL,
            session TEXT NOT NULL,
            size INTEGER NOT NULL,
            prefix BLOB NOT NULL DEFAULT x'',
            body BLOB NULL,
            body_path TEXT NULL,
            CHECK ((body IS NULL) <> (body_path IS NULL))
        )""",
        "CREATE INDEX queue_by_state ON queue(state, created)",
    ),
    (
        # Rate counters (store/counters.py): one row per user (login in lower case),
        # counter kind and fixed window [window_start, window_end), in seconds since
        # 1970. `generation` is settings.rate_counters_generation at the row's last
        # change, so a process merges only the rows changed since it last looked.
        """CREATE TABLE rate_counters (
            login TEXT NOT NULL,
            kind TEXT NOT NULL,
            window_start INTEGER NOT NULL,
            window_end INTEGER NOT NULL,
            total INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            PRIMARY KEY (login, kind, window_start)
        ) WITHOUT ROWID""",
        "CREATE INDEX rate_counters_by_generation ON rate_counters(generation)",
        "CREATE INDEX rate_counters_by_end ON rate_counters(window_end)",
        "INSERT INTO settings (key, value) VALUES ('rate_counters_generation', 0)",
    ),
    (
        # Delivery (delivery/state.py): the message's schedule and lease, and one row per
        # recipient with its outcome, made on the first attempt.
        "ALTER TABLE queue ADD COLUMN next_attempt REAL NOT NULL DEFAULT 0",
        "ALTER TABLE queue ADD COLUMN lease_owner TEXT",
        "ALTER TABLE queue ADD COLUMN lease_until REAL NOT NULL DEFAULT 0",
        "ALTER TABLE queue ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX queue_due ON queue(state, next_attempt)",
        """CREATE TABLE deliveries (
            queue_id TEXT NOT NULL REFERENCES queue(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            address TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL DEFAULT 0,
            last_reply TEXT,
            enhanced TEXT,
            remote_mta TEXT,
            relayed INTEGER NOT NULL DEFAULT 0,
            updated REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (queue_id, idx)
        )""",
    ),
    (
        # Abuse defences (store/abuse_counters.py, policy/abuse.py): authentication
        # failures per key ("net:<network>" or "acct:<login>") and fixed window
        # [window_start, window_end), in seconds since 1970; and the (network, login)
        # pairs that have authenticated, which never pay the per-account delay.
        # `generation` is settings.abuse_generation at the row's last change.
        """CREATE TABLE abuse_counters (
            key TEXT NOT NULL,
            window_start INTEGER NOT NULL,
            window_end INTEGER NOT NULL,
            total INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            PRIMARY KEY (key, window_start, window_end)
        ) WITHOUT ROWID""",
        "CREATE INDEX abuse_counters_by_generation ON abuse_counters(generation)",
        "CREATE INDEX abuse_counters_by_end ON abuse_counters(window_end)",
        """CREATE TABLE abuse_known_good (
            network TEXT NOT NULL,
            login TEXT NOT NULL,
            last_success INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            PRIMARY KEY (network, login)
        ) WITHOUT ROWID""",
        "CREATE INDEX abuse_known_good_by_generation ON abuse_known_good(generation)",
        "CREATE INDEX abuse_known_good_by_last_success ON abuse_known_good(last_success)",
        "INSERT INTO settings (key, value) VALUES ('abuse_generation', 0)",
    ),
    (
        # Finished messages (delivery/state.py): when the last recipient was settled.
        # The content goes at that moment; the row stays for [queue] keep_finished
        # seconds, found for the purge by this partial index (only finished rows in it).
        "ALTER TABLE queue ADD COLUMN finished REAL",
        "CREATE INDEX queue_finished ON queue(finished) WHERE state = 'done'",
        # Messages finished before this version kept their content: drop it now and
        # start their retention now. Their spool files no longer have a row pointing at
        # them, so start-up removes them (store/queue.py collect_orphans).
        """UPDATE queue SET prefix = x'', body = x'', body_path = NULL,
           finished = (julianday('now') - 2440587.5) * 86400.0
           WHERE state = 'done'""",
    ),
)


class SchemaError(Exception):
    """The database was written by a newer submitd; refuse to guess its meaning."""


def connect(
    path: Path, *, check_same_thread: bool = True, relaxed: bool = False
) -> sqlite3.Connection:
    """An open, migrated connection to the database at `path`, in autocommit mode.

    `check_same_thread=False` is for an owner that guards the connection with a lock or
    hands it to exactly one other thread (the queue's writer thread).
    """
    _create_private_file(path)
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=check_same_thread,
    )
    try:
        _configure(conn)
        migrate(conn)
        if relaxed:
            # Bookkeeping whose loss on a power cut is harmless (a counter a second
            # behind, a delivery recorded twice at worst): commits survive a crash of
            # the process, and the WAL is flushed at checkpoints rather than per commit.
            conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private_file(path: Path) -> None:
    """Make the database file private to its owner without ever opening it ourselves.

    Opening and closing the file outside SQLite would drop every POSIX lock this
    process holds on it (close(2) releases all of a process's locks on the file), so
    another process could take our live WAL for abandoned, checkpoint it and delete it:
    acknowledged messages would then be lost. SQLite creates the file; we only chmod.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        old_umask = os.umask(0o077)
        try:
            sqlite3.connect(path).close()
        finally:
            os.umask(old_umask)
    os.chmod(path, 0o600)


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL journal (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


@contextmanager
def transaction(
    conn: sqlite3.Connection, *, write: bool = True, eager: bool = False
) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception.

    Writers use BEGIN IMMEDIATE: taking the write lock up front means busy_timeout
    applies at the start, instead of a read transaction failing to upgrade later with
    SQLITE_BUSY (which the busy handler cannot resolve). Readers use a deferred BEGIN
    for one consistent snapshot across several SELECTs. `eager`: see `_begin_eagerly`.
    """
    if eager:
        _begin_eagerly(conn)
    else:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")  # a failed COMMIT (disk full, busy) may leave it open
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _begin_eagerly(conn: sqlite3.Connection, timeout: float = BUSY_TIMEOUT_MS / 1000) -> None:
    """BEGIN IMMEDIATE retried every EAGER_RETRY seconds while another connection writes.

    For the writer whose commits clients wait on (the queue). SQLite's own busy handler
    sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries and serves no one first, so a
    background writer that commits often (delivery bookkeeping) made acceptance lose
    the lock several times running: p99 latency went from 9 to 23 ms. Trying every
    0.2 ms, while the other writers keep the coarse handler, lets the waiting commit in
    as soon as the lock is free: a priority SQLite itself does not offer. The
    connection's own busy_timeout must be 0, or each try would wait in the handler.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(EAGER_RETRY)


def schema_version(conn: sqlite3.Connection) -> int:
    """The applied version, 0 for a new database."""
    try:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:
        return 0  # no schema_version table yet
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this database lacks; cheap (one SELECT) when current."""
    if _check_version(schema_version(conn)):
        return
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = schema_version(conn)  # another process may have migrated meanwhile
        if _check_version(current):
            return
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def _check_version(version: int) -> bool:
    """True when nothing is left to apply; SchemaError when the file is from the future."""
    if version > len(MIGRATIONS):
        raise SchemaError(
            f"database schema version {version} is newer than this submitd "
            f"understands ({len(MIGRATIONS)}); upgrade submitd"
        )
    return version == len(MIGRATIONS)
