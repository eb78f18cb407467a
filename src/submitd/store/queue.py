"""The durable queue: a message is acknowledged only once it survives a crash.

DESIGN principle 2: the 250 reply after DATA or BDAT LAST (RFC 5321 4.1.1.4, RFC 3030
2) promises that the message is safe, so `Queue.commit` returns only after the
envelope and the body are on disk behind an fsync.

Group commit. An fsync costs milliseconds, so one per message would cap the server at a
few hundred messages a second. One writer thread owns a database connection and drains
the list of pending commits: it takes all of them at once (up to
queue.group_commit_max), makes spilled bodies durable, inserts every row in ONE
transaction whose COMMIT is one fsync of the WAL (`synchronous=FULL`), and then wakes
every waiting coroutine with `loop.call_soon_threadsafe`. While it flushes, new commits
pile up and form the next batch; no timer is involved, so a lone message waits for no
one.

Bodies. A message up to queue.inline_max stays in memory and is stored as a BLOB in the
same transaction, so small messages cost no fsync of their own. A larger one spills to
a temporary file in the spool directory as it arrives; the writer thread fsyncs it,
renames it to its final name, fsyncs the directory once per batch, and only then
inserts the row that points to it. A row therefore never points at a missing or partial
file. A crash between the rename and the COMMIT leaves an orphan file of a message
that was never acknowledged (to be collected, never delivered).

Memory per message is bounded: the inline buffer (at most inline_max), a write buffer
of SPILL_CHUNK once spilled (pieces at least that large go straight to the file), and
the first HEAD_MAX bytes kept for the caller's header parsing.

Failures. A full disk (ENOSPC, EDQUOT, SQLITE_FULL) raises StorageFull, which the
session answers 452 4.3.1 (RFC 3463: mail system full); anything else raises
StorageError, answered 451 4.3.0. The transaction is rolled back and spool files are
deleted, so nothing half-written remains.

Queue ids are 16 characters: 9 of milliseconds since 1970 and 7 random, in Crockford's
base32 alphabet (ASCII order, so ids sort by time; upper case only, so file names stay
distinct on case-insensitive file systems). Within one process the random part counts
up inside a millisecond, as ULIDs do; 35 random bits keep processes apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitd.config import QueueConfig
from submitd.envelope import Envelope, SessionInfo
from submitd.store.database import connect, transaction

HEAD_MAX = 64 * 1024
SPILL_CHUNK = 64 * 1024
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 9  # 45 bits of milliseconds: until the year 3084
_RANDOM_CHARS = 7  # 35 bits
_RANDOM_LIMIT = 32**_RANDOM_CHARS
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFull(Exception):
    """No space left for the message: 452 4.3.1."""


class StorageError(Exception):
    """The message could not be stored for another reason: 451 4.3.0."""


class UnknownMessage(LookupError):
    """No queued message has this id."""


class _IdClock:
    """Monotonic (milliseconds, random) pairs for new_queue_id, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def next(self) -> tuple[int, int]:
        with self._lock:
            millis, counter = self._last
            now = time.time_ns() // 1_000_000
            if now > millis:
                millis, counter = now, secrets.randbelow(_RANDOM_LIMIT // 2)
            elif counter + 1 < _RANDOM_LIMIT:
                counter += 1
            else:
                millis, counter = millis + 1, secrets.randbelow(_RANDOM_LIMIT // 2)
            self._last = (millis, counter)
            return self._last

    def reset(self) -> None:
        """After fork: a child must not count on from its parent's random value."""
        self._lock = threading.Lock()
        self._last = (0, 0)


_id_clock = _IdClock()
os.register_at_fork(after_in_child=_id_clock.reset)


def new_queue_id() -> str:
    """A unique, time-sortable id of 16 characters from [0-9A-Z]."""
    millis, counter = _id_clock.next()
    return _base32(millis, _TIME_CHARS) + _base32(counter, _RANDOM_CHARS)


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def storage_error(error: BaseException) -> StorageFull | StorageError:
    """The queue's exception for an OS or SQLite error."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return StorageFull(f"no space left for the message: {error.strerror}")
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(error, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return StorageFull(f"no space left for the message: {error}")
    return StorageError(f"cannot store the message: {error}")


class SpoolWriter:
    """One message being received. Write, then hand to Queue.commit, or abort."""

    def __init__(self, queue_id: str, spool_dir: Path, inline_max: int) -> None:
        self.queue_id = queue_id
        self._inline_max = inline_max
        self._temp_path = spool_dir / f"{queue_id}.tmp"
        self._final_path = spool_dir / f"{queue_id}.eml"
        self._head = bytearray()
        self._buffer = bytearray()
        self._fd: int | None = None
        self._spilled = False
        self._size = 0
        self._open = True

    @property
    def size(self) -> int:
        return self._size

    @property
    def spilled(self) -> bool:
        """True once the body went past inline_max and lives in a spool file."""
        return self._spilled

    def head(self) -> bytes:
        """The first (up to) HEAD_MAX bytes, for parsing the header section."""
        return bytes(self._head)

    def write(self, data: bytes | memoryview) -> None:
        """Append data; StorageFull or StorageError (after aborting) if the disk refuses."""
        if not self._open:
            raise StorageError("message already committed or aborted")
        view = memoryview(data).cast("B")
        if len(self._head) < HEAD_MAX:
            self._head += view[: HEAD_MAX - len(self._head)]
        try:
            if not self._spilled and self._size + len(view) <= self._inline_max:
                self._buffer += view
            else:
                self._write_spilled(view)
        except OSError as error:
            self.abort()
            raise storage_error(error) from error
        self._size += len(view)

    def content_chunks(self, start: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """What was written so far, from offset `start`, in pieces (before commit).

        For a spilled body this reads the spool file back, so call it from a thread.
        """
        if not self._spilled:
            view = memoryview(self._buffer)
            for offset in range(start, len(view), chunk_size):
                yield bytes(view[offset : offset + chunk_size])
            return
        self._flush()
        with open(self._temp_path, "rb") as handle:
            handle.seek(start)
            while piece := handle.read(chunk_size):
                yield piece

    def abort(self) -> None:
        """Discard the message; a no-op once it was handed to commit."""
        if self._open:
            self._open = False
            self._discard()

    def _write_spilled(self, view: memoryview) -> None:
        if not self._spilled:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(self._temp_path, flags, 0o600)
            self._spilled = True
        if len(self._buffer) + len(view) < SPILL_CHUNK:
            self._buffer += view
            return
        self._flush()
        if len(view) >= SPILL_CHUNK:
            self._write_file(view)  # big pieces unbuffered, without a copy
        else:
            self._buffer += view

    def _flush(self) -> None:
        self._write_file(memoryview(self._buffer))
        self._buffer = bytearray()

    def _write_file(self, view: memoryview) -> None:
        assert self._fd is not None
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _seal(self) -> None:
        """Called by commit on the loop: from now on only the writer thread touches it."""
        if not self._open:
            raise StorageError("message already committed or aborted")
        self._open = False

    def _make_durable(self) -> Path | None:
        """In the writer thread: flush, fsync, close and rename a spilled body."""
        if self._fd is None:
            return None  # inline: the BLOB goes into the batch's transaction
        self._flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self._temp_path, self._final_path)
        return self._final_path

    def _inline_body(self) -> bytearray | None:
        """The whole body when inline (sqlite3 binds a bytearray as a BLOB, no copy)."""
        return None if self._spilled else self._buffer

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in (self._temp_path, self._final_path):
            path.unlink(missing_ok=True)
        self._buffer = bytearray()


@dataclass(slots=True)
class _Pending:
    writer: SpoolWriter
    created: float
    envelope: str
    session: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    prefix: bytes = b""
    body: bytearray | None = None
    body_path: str | None = None


_INSERT = """INSERT INTO queue (id, created, envelope, session, size, prefix, body, body_path)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""


class Queue:
    """Accepts messages durably; one writer thread per Queue does the group commit."""

    def __init__(self, db_path: Path, spool_dir: Path, config: QueueConfig) -> None:
        self._config = config
        spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._spool_dir = spool_dir.resolve()
        self._db_dir = db_path.parent.resolve()
        # Used only by the writer thread after this constructor.
        self._conn = connect(db_path, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 0")  # its transactions retry eagerly
        self._pending: list[_Pending] = []
        self._wakeup = threading.Condition()
        self._closing = False
        self.batches = 0  # transactions committed: far fewer than messages under load
        self.committed = 0  # messages committed
        self._thread = threading.Thread(target=self._run, name="submitd-queue", daemon=True)
        self._thread.start()

    def open_message(self, queue_id: str) -> SpoolWriter:
        return SpoolWriter(queue_id, self._spool_dir, self._config.inline_max)

    async def commit(
        self,
        writer: SpoolWriter,
        envelope: Envelope,
        session: SessionInfo,
        *,
        prefix: bytes = b"",
    ) -> None:
        """Return once the message is durable; StorageFull or StorageError otherwise.

        `prefix` holds the header fields added on top once the content was complete
        (trace, signatures): the stored message is prefix + what the writer holds, so
        a spooled body never has to be rewritten to gain a field.

        If the caller is cancelled while waiting, the commit still completes: the
        message is then queued without its 250 having been sent, the ordinary SMTP
        duplicate risk (RFC 1047), never a loss.
        """
        envelope_json = json.dumps(envelope.to_json())
        session_json = json.dumps(session.to_json())
        writer._seal()
        loop = asyncio.get_running_loop()
        item = _Pending(
            writer, time.time(), envelope_json, session_json, loop, loop.create_future(), prefix
        )
        with self._wakeup:
            if self._closing:
                writer._discard()
                raise StorageError("the queue is closing")
            self._pending.append(item)
            self._wakeup.notify()
        await item.future

    async def close(self) -> None:
        """Commit what is pending, then stop the writer thread and close the database."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            while batch := self._next_batch():
                try:
                    self._commit_batch(batch)
                except Exception as error:  # never let the thread die with waiters
                    _settle_all(batch, storage_error(error))
        finally:
            self._conn.close()

    def _next_batch(self) -> list[_Pending]:
        """Everything pending (up to group_commit_max); [] once closing and drained."""
        with self._wakeup:
            while not self._pending and not self._closing:
                self._wakeup.wait()
            batch = self._pending[: self._config.group_commit_max]
            del self._pending[: len(batch)]
            return batch

    def _commit_batch(self, batch: list[_Pending]) -> None:
        ready = self._make_bodies_durable(batch)
        if not ready:
            return
        try:
            self._insert(ready)
        except (OSError, sqlite3.Error) as error:
            for item in ready:
                item.writer._discard()
            _settle_all(ready, storage_error(error))
            return
        self.batches += 1
        self.committed += len(ready)
        _settle_all(ready, None)

    def _make_bodies_durable(self, batch: list[_Pending]) -> list[_Pending]:
        """fsync and rename spilled bodies, then fsync the spool directory once.
        Returns the items that may be inserted; the others are already answered."""
        ready: list[_Pending] = []
        for item in batch:
            try:
                path = item.writer._make_durable()
            except OSError as error:
                item.writer._discard()
                _settle_all([item], storage_error(error))
                continue
            item.body = item.writer._inline_body()
            item.body_path = None if path is None else self._stored_path(path)
            ready.append(item)
        if any(item.body_path is not None for item in ready):
            ready = self._sync_spool_dir(ready)
        return ready

    def _sync_spool_dir(self, ready: list[_Pending]) -> list[_Pending]:
        try:
            _fsync_directory(self._spool_dir)
        except OSError as error:
            spilled = [item for item in ready if item.body_path is not None]
            for item in spilled:
                item.writer._discard()
            _settle_all(spilled, storage_error(error))
            return [item for item in ready if item.body_path is None]
        return ready

    def _insert(self, items: list[_Pending]) -> None:
        rows = [
            (
                item.writer.queue_id,
                item.created,
                item.envelope,
                item.session,
                len(item.prefix) + item.writer.size,
                item.prefix,
                item.body,
                item.body_path,
            )
            for item in items
        ]
        with transaction(self._conn, eager=True):
            self._conn.executemany(_INSERT, rows)

    def _stored_path(self, path: Path) -> str:
        """Relative to the database's directory when inside it, so a data_dir can move."""
        try:
            return str(path.relative_to(self._db_dir))
        except ValueError:
            return str(path)


def collect_orphans(db_path: Path, spool_dir: Path, *, older_than: float) -> int:
    """Remove spool files no queue row refers to, last changed before `older_than`.

    A crash while a large message is being received leaves its `.tmp` file, and a crash
    between the rename and the row's commit leaves an `.eml`: neither was ever
    acknowledged, so neither is a message. A crash between the commit that finishes a
    message (delivery/state.py drops `body_path` then) and the unlink of its file
    leaves an `.eml` of a message already delivered. The age threshold spares a file
    that another process (a CLI bounce) is writing at this moment. Returns how many
    were removed.
    """
    database_dir = db_path.parent.resolve()
    conn = connect(db_path)
    try:
        rows = conn.execute("SELECT body_path FROM queue WHERE body_path IS NOT NULL")
        referenced = {(database_dir / str(row[0])).resolve() for row in rows}
    finally:
        conn.close()
    removed = 0
    for path in spool_dir.glob("*"):
        if path.suffix not in (".tmp", ".eml") or path.resolve() in referenced:
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < older_than:
                path.unlink()
                removed += 1
    return removed


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle_all(items: list[_Pending], error: Exception | None) -> None:
    for item in items:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            item.loop.call_soon_threadsafe(_settle, item.future, error)


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():  # the waiting session was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# Reading the queue (CLI, tests; the scheduler will add its own queries).


@dataclass(frozen=True, slots=True)
class QueueSummary:
    id: str
    created: float
    state: str
    sender: str
    recipients: tuple[str, ...]
    size: int


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    created: float
    state: str
    envelope: Envelope
    session: SessionInfo
    size: int
    body_path: str | None  # None: the body is inline in the database


def list_queue(conn: sqlite3.Connection) -> list[QueueSummary]:
    rows = conn.execute("SELECT id, created, state, envelope, size FROM queue ORDER BY id")
    return [_summary(*row) for row in rows]


def _summary(queue_id: str, created: float, state: str, envelope: str, size: int) -> QueueSummary:
    data: dict[str, Any] = json.loads(envelope)
    recipients = tuple(str(item["address"]) for item in data.get("recipients", []))
    return QueueSummary(queue_id, created, state, str(data["sender"]), recipients, size)


def get_message(conn: sqlite3.Connection, queue_id: str) -> QueuedMessage | None:
    row = conn.execute(
        "SELECT id, created, state, envelope, session, size, body_path FROM queue WHERE id = ?",
        (queue_id,),
    ).fetchone()
    if row is None:
        return None
    message_id, created, state, envelope, session, size, body_path = row
    return QueuedMessage(
        message_id,
        created,
        state,
        Envelope.from_json(json.loads(envelope)),
        SessionInfo(**json.loads(session)),
        size,
        body_path,
    )


def read_message_bytes(conn: sqlite3.Connection, queue_id: str) -> bytes:
    """The message exactly as received; UnknownMessage if there is no such id."""
    row = conn.execute(
        "SELECT prefix, body, body_path FROM queue WHERE id = ?", (queue_id,)
    ).fetchone()
    if row is None:
        raise UnknownMessage(queue_id)
    prefix, body, body_path = row
    if body is not None:
        return bytes(prefix) + bytes(body)
    return bytes(prefix) + (_database_dir(conn) / str(body_path)).read_bytes()


def _database_dir(conn: sqlite3.Connection) -> Path:
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return Path(file).parent
    raise StorageError("connection has no main database")
