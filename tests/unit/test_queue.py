"""The durable queue with group commit, on real files (and a real full disk if root)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from submitd.config import QueueConfig
from submitd.envelope import Envelope, Recipient, SessionInfo
from submitd.store.database import connect
from submitd.store.queue import (
    HEAD_MAX,
    Queue,
    StorageError,
    StorageFull,
    get_message,
    list_queue,
    new_queue_id,
    read_message_bytes,
)

T = TypeVar("T")
SESSION = SessionInfo("s1", "192.0.2.1", 50000, "client.example", "TLSv1.3", "X", "a@example.org")


def _envelope(sender: str = "a@example.org") -> Envelope:
    return Envelope(
        sender=sender,
        recipients=[Recipient("b@example.net", ("SUCCESS", "FAILURE"), "rfc822;b@example.net")],
        body="8BITMIME",
        size=1234,
        envid="env-1",
    )


def _body(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _pieces(data: bytes, seed: int = 1) -> Iterator[bytes]:
    """Uneven pieces, as the DATA reader would hand them over."""
    rng = random.Random(seed)
    position = 0
    while position < len(data):
        step = rng.choice([1, 77, 1000, 70_000, 200_000])
        yield data[position : position + step]
        position += step


async def _store(queue: Queue, body: bytes, sender: str = "a@example.org") -> str:
    writer = queue.open_message(new_queue_id())
    for piece in _pieces(body):
        writer.write(memoryview(piece))
    await queue.commit(writer, _envelope(sender), SESSION)
    return writer.queue_id


def _run_with_queue(
    tmp_path: Path, config: QueueConfig, work: Callable[[Queue], Awaitable[T]]
) -> T:
    async def main() -> T:
        queue = Queue(tmp_path / "submitd.sqlite3", tmp_path / "spool", config)
        try:
            return await work(queue)
        finally:
            await queue.close()

    return asyncio.run(main())


def test_queue_ids_are_unique_short_and_sorted() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 16 and i.isalnum() and i.isascii() for i in ids)


@pytest.mark.parametrize(
    ("size", "inline"),
    [(0, True), (100, True), (4096, True), (4097, False), (300_000, False)],
)
def test_committed_message_reads_back_byte_for_byte(
    tmp_path: Path, size: int, inline: bool
) -> None:
    body = _body(size)

    async def work(queue: Queue) -> str:
        return await _store(queue, body)

    queue_id = _run_with_queue(tmp_path, QueueConfig(inline_max=4096), work)
    conn = connect(tmp_path / "submitd.sqlite3")
    assert read_message_bytes(conn, queue_id) == body
    message = get_message(conn, queue_id)
    assert message is not None
    assert message.envelope == _envelope()
    assert message.session == SESSION
    assert message.size == size and message.state == "queued"
    assert (message.body_path is None) is inline
    if not inline:
        assert message.body_path is not None
        assert not Path(message.body_path).is_absolute()
        path = tmp_path / message.body_path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list((tmp_path / "spool").glob("*.tmp"))


def test_head_keeps_the_first_64_kib(tmp_path: Path) -> None:
    body = _body(200_000)

    async def work(queue: Queue) -> bytes:
        writer = queue.open_message(new_queue_id())
        for piece in _pieces(body):
            writer.write(piece)
        head = writer.head()
        writer.abort()
        return head

    assert _run_with_queue(tmp_path, QueueConfig(inline_max=1024), work) == body[:HEAD_MAX]


def test_abort_leaves_no_file_and_no_row(tmp_path: Path) -> None:
    async def work(queue: Queue) -> None:
        writer = queue.open_message(new_queue_id())
        writer.write(_body(10_000))
        assert list((tmp_path / "spool").iterdir())
        writer.abort()
        with pytest.raises(StorageError):
            await queue.commit(writer, _envelope(), SESSION)

    _run_with_queue(tmp_path, QueueConfig(inline_max=100), work)
    assert not list((tmp_path / "spool").iterdir())
    assert list_queue(connect(tmp_path / "submitd.sqlite3")) == []


def test_concurrent_commits_share_transactions(tmp_path: Path) -> None:
    bodies = [_body(i * 37 % 9000, seed=i) for i in range(200)]

    async def work(queue: Queue) -> tuple[list[str], int]:
        ids = await asyncio.gather(*(_store(queue, body) for body in bodies))
        return list(ids), queue.batches

    ids, batches = _run_with_queue(tmp_path, QueueConfig(inline_max=4096), work)
    assert batches <= 20, f"{batches} transactions for 200 messages"
    conn = connect(tmp_path / "submitd.sqlite3")
    assert len(list_queue(conn)) == 200
    for queue_id, body in zip(ids, bodies, strict=True):
        assert read_message_bytes(conn, queue_id) == body


def test_group_commit_max_caps_a_batch(tmp_path: Path) -> None:
    async def work(queue: Queue) -> int:
        await asyncio.gather(*(_store(queue, b"x") for _ in range(50)))
        return queue.batches

    assert _run_with_queue(tmp_path, QueueConfig(group_commit_max=5), work) >= 10


def test_close_finishes_pending_commits_then_refuses(tmp_path: Path) -> None:
    async def main() -> None:
        queue = Queue(tmp_path / "submitd.sqlite3", tmp_path / "spool", QueueConfig())
        tasks = [asyncio.create_task(_store(queue, b"pending")) for _ in range(20)]
        await asyncio.sleep(0)  # let them enqueue
        await queue.close()
        await asyncio.gather(*tasks)
        writer = queue.open_message(new_queue_id())
        with pytest.raises(StorageError):
            await queue.commit(writer, _envelope(), SESSION)

    asyncio.run(main())
    assert len(list_queue(connect(tmp_path / "submitd.sqlite3"))) == 20


def test_list_queue_summarises(tmp_path: Path) -> None:
    async def work(queue: Queue) -> str:
        return await _store(queue, b"Subject: x\r\n\r\nhi\r\n", sender="")

    queue_id = _run_with_queue(tmp_path, QueueConfig(), work)
    [entry] = list_queue(connect(tmp_path / "submitd.sqlite3"))
    assert (entry.id, entry.sender, entry.recipients, entry.size) == (
        queue_id,
        "",
        ("b@example.net",),
        18,
    )


# A real full disk: a 4 MiB tmpfs, which needs root (CAP_SYS_ADMIN) to mount.


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path: Path) -> None:
    """Write until the file system says ENOSPC."""
    with path.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)


def test_full_disk_gives_storage_full_and_leaves_nothing(small_disk: Path) -> None:
    async def main() -> None:
        queue = Queue(small_disk / "submitd.sqlite3", small_disk / "spool", QueueConfig())
        await _store(queue, b"before")
        _fill(small_disk / "filler")
        with pytest.raises(StorageFull):
            await _store(queue, _body(200_000))  # inline: SQLITE_FULL at commit
        with pytest.raises(StorageFull):
            await _store(queue, _body(1_000_000))  # spilled: ENOSPC on the spool file
        (small_disk / "filler").unlink()
        await _store(queue, b"after")
        await queue.close()

    asyncio.run(main())
    conn = connect(small_disk / "submitd.sqlite3")
    bodies = [read_message_bytes(conn, entry.id) for entry in list_queue(conn)]
    conn.close()
    assert bodies == [b"before", b"after"]
    assert not list((small_disk / "spool").iterdir())


def test_storage_error_for_other_failures(tmp_path: Path) -> None:
    """A database locked by another process past busy_timeout is a 451, not a 452."""

    async def main() -> None:
        queue = Queue(tmp_path / "submitd.sqlite3", tmp_path / "spool", QueueConfig())
        blocker = sqlite3.connect(tmp_path / "submitd.sqlite3", timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # holds the write lock past busy_timeout
        try:
            with pytest.raises(StorageError):
                await _store(queue, b"x")
        finally:
            blocker.rollback()
            blocker.close()
        await _store(queue, b"y")
        await queue.close()

    asyncio.run(main())
    conn = connect(tmp_path / "submitd.sqlite3")
    assert [read_message_bytes(conn, e.id) for e in list_queue(conn)] == [b"y"]


def test_orphaned_spool_files_are_collected(tmp_path: Path) -> None:
    import asyncio
    import os
    import time as clock

    from submitd.config import QueueConfig
    from submitd.envelope import Envelope, Recipient, SessionInfo
    from submitd.store.queue import Queue, collect_orphans, new_queue_id

    db, spool = tmp_path / "q.sqlite3", tmp_path / "spool"
    queue = Queue(db, spool, QueueConfig(inline_max=10))

    async def keep_one() -> str:
        writer = queue.open_message(new_queue_id())
        writer.write(b"x" * 100)  # spooled: larger than inline_max
        await queue.commit(
            writer, Envelope("a@b.example", [Recipient("c@d.example")]), SessionInfo("s", "::1", 1)
        )
        await queue.close()
        return writer.queue_id

    kept = asyncio.run(keep_one())
    for name in ("lost.tmp", "lost.eml", "fresh.tmp"):
        (spool / name).write_bytes(b"never acknowledged")
    old = clock.time() - 3600
    for name in ("lost.tmp", "lost.eml"):
        os.utime(spool / name, (old, old))
    assert collect_orphans(db, spool, older_than=clock.time() - 60) == 2
    assert sorted(p.name for p in spool.iterdir()) == sorted([f"{kept}.eml", "fresh.tmp"])
