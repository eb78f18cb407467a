"""The delivery loop: lease due messages, deliver per route, record, retry, notify.

Acceptance never waits for it (DESIGN principle 6): the submission only wakes it up.
Each attempt works on a lease, so a crash mid-attempt loses nothing: the message is
due again when the lease ends, or at once when this node restarts.

Where a duplicate is possible: between the next hop's final 250 and our record of it
(one short transaction, milliseconds). A crash in that window makes the message due
again and it is delivered twice; no design without the next hop's co-operation can
close it (RFC 1047). Outcomes are recorded right after the reply, before anything else
(notifications come after), to keep the window as small as it can be.

Finished messages: the record that settles the last recipient drops the content (see
delivery/state.py); the spool file of a large one is unlinked here, after the notices,
because a failure notice returns the original read from that file. Once a minute the
rows finished longer than `[queue] keep_finished` ago are purged, in small batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from submitd.config import DeliveryConfig
from submitd.delivery import state
from submitd.delivery.notify import Notifier
from submitd.delivery.router import Router
from submitd.delivery.state import LeasedMessage, PendingRecipient
from submitd.delivery.types import Job, Outcome, Status
from submitd.store.database import connect

log = logging.getLogger("submitd.delivery")

LEASE_SECONDS = 3600.0  # longer than any single attempt may take
PURGE_INTERVAL = 60.0  # seconds between purges of finished messages
PURGE_BATCH = 1000  # rows per purge transaction: a few milliseconds of write lock
T = TypeVar("T")


def backoff(config: DeliveryConfig, attempts: int, rng: random.Random) -> float:
    """Seconds until the next try after `attempts` failed ones: doubling, capped, ±10 %."""
    delay = min(config.retry_first * 2.0 ** max(attempts - 1, 0), config.retry_max)
    return float(delay * rng.uniform(0.9, 1.1))


class Scheduler:
    def __init__(
        self,
        config: DeliveryConfig,
        database: Path,
        router: Router,
        notifier: Notifier,
        *,
        keep_finished: float,
    ) -> None:
        self.config = config
        self.database = database
        self.keep_finished = keep_finished
        self.router = router
        self.notifier = notifier
        self.owner_prefix = f"{socket.gethostname()}:{database.resolve()}:"
        self.owner = f"{self.owner_prefix}{os.getpid()}"
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()  # ends the purge loop's pause
        self._purger: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._to_record: list[tuple[state.Attempt, asyncio.Future[state.Recorded]]] = []
        self._recording = False

    def wake(self) -> None:
        """A message was committed: look for due work now, not at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        # Delivery state is relaxed (no fsync per change): after a power cut the worst
        # case is a delivery made again, never a message lost (acceptance stays FULL).
        self._conn = await asyncio.to_thread(
            connect, self.database, check_same_thread=False, relaxed=True
        )
        freed = await self._db(state.release_own_leases, self.owner_prefix)
        if freed:
            log.info("took back %d messages leased before a restart", freed)
        self._purger = asyncio.get_running_loop().create_task(self._purge_loop())
        while not self._stopping:
            await self._start_due()
            await self._sleep()

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._stopped.set()
        if self._purger is not None:
            await asyncio.wait({self._purger})  # ends after one batch at most, not mid-query
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace)
        for task in list(self._running):
            task.cancel()
        if self._conn is not None:
            await self._db(state.release_own_leases, self.owner_prefix)
            self._conn.close()

    async def _start_due(self) -> None:
        free = self.config.concurrency - len(self._running)
        if free <= 0:
            return
        loaded = await self._db(
            state.lease_and_load,
            self.owner,
            time.time(),
            free,
            LEASE_SECONDS,
            self.database.parent,
        )
        for message, source in loaded:
            task = asyncio.get_running_loop().create_task(self._attempt(message, source))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery attempt failed", exc_info=task.exception())
        self._wakeup.set()

    async def _sleep(self) -> None:
        self._wakeup.clear()
        timeout = self.config.poll_interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _attempt(self, message: LeasedMessage, source: state.StoredMessage) -> None:
        queue_id = message.queue_id
        if not message.pending:
            await self._release(await self._record(queue_id, [], time.time(), {}))
            return
        tasks = [
            self._deliver_group(name, message, group, source)
            for (name, _domain), group in self.router.group(message.pending).items()
        ]
        results = [pair for group in await asyncio.gather(*tasks) for pair in group]
        now = time.time()
        results, retry_at = self._retry_policy(message, results, now)
        recorded = await self._record(queue_id, results, now, retry_at)
        for pending, outcome in results:
            log.info(
                "queue=%s to=<%s> status=%s attempts=%d relay=%s reply=%s",
                queue_id,
                pending.recipient.address,
                outcome.status.value,
                pending.attempts + 1,
                outcome.remote_mta or "-",
                outcome.reply,
            )
        # Notices come after the record: they must never widen the duplicate window.
        try:
            if await self.notifier.after_attempt(message, recorded, source, now):
                await self._db(state.mark_delay_notified, queue_id)
        finally:
            # Only now: `source` reads a spooled body lazily, and a failure notice
            # returns the original (RET=FULL) from that very file.
            await self._release(recorded)

    async def _record(
        self,
        queue_id: str,
        results: list[tuple[PendingRecipient, Outcome]],
        now: float,
        retry_at: dict[int, float],
    ) -> state.Recorded:
        """Record an attempt; attempts that end while a batch is being written go
        together in the next one (one thread trip and one commit for many)."""
        done: asyncio.Future[state.Recorded] = asyncio.get_running_loop().create_future()
        self._to_record.append((state.Attempt(queue_id, results, now, retry_at), done))
        if not self._recording:
            self._recording = True
            asyncio.get_running_loop().create_task(self._write_records())
        return await done

    async def _write_records(self) -> None:
        try:
            while self._to_record:
                batch, self._to_record = self._to_record, []
                attempts = [attempt for attempt, _ in batch]
                try:
                    recorded = await self._db(state.record_many, attempts, self.keep_finished)
                except Exception as error:  # each attempt reports it (and is retried)
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(error)
                    continue
                for (_, done), outcome in zip(batch, recorded, strict=True):
                    if not done.done():
                        done.set_result(outcome)
        finally:
            self._recording = False

    async def _release(self, recorded: state.Recorded) -> None:
        """Unlink a finished message's spool file (its row no longer points at it)."""
        if recorded.released_file is None:
            return
        path = self.database.parent / recorded.released_file
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as error:  # left as an orphan: start-up collects it
            log.warning("cannot remove the spool file %s: %s", path, error.strerror)

    async def _purge_loop(self) -> None:
        """Once a minute: delete messages finished more than keep_finished ago.

        In batches, each its own short transaction on our connection (through `_db`, so
        attempts interleave between batches), so neither acceptance nor the recording
        of outcomes waits long for the write lock even with a large backlog.
        """
        while not self._stopping:
            try:
                before = time.time() - self.keep_finished
                removed = 0
                while not self._stopping:
                    count = await self._db(state.purge_finished, before, PURGE_BATCH)
                    removed += count
                    if count < PURGE_BATCH:
                        break
                if removed:
                    log.info("purged %d finished messages", removed)
            except Exception:  # the loop must outlive a failure (a full disk, a busy lock)
                log.exception("purging finished messages failed; trying again later")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), PURGE_INTERVAL)

    async def _deliver_group(
        self,
        route_name: str,
        message: LeasedMessage,
        group: list[PendingRecipient],
        source: state.StoredMessage,
    ) -> list[tuple[PendingRecipient, Outcome]]:
        job = Job(message.queue_id, message.envelope, tuple(p.recipient for p in group), source)
        try:
            outcomes = await self.router.routes[route_name].deliver(job)
        except Exception as error:  # a route bug must not lose the attempt's bookkeeping
            log.exception("queue=%s route %s failed", message.queue_id, route_name)
            outcomes = [
                Outcome(p.recipient, Status.DEFERRED, f"local error: {error}", "4.3.0")
                for p in group
            ]
        if self.config.routes[route_name].type == "lmtp":
            outcomes = [dataclasses.replace(o, final=True) for o in outcomes]
        return list(zip(group, outcomes, strict=True))

    def _retry_policy(
        self,
        message: LeasedMessage,
        results: list[tuple[PendingRecipient, Outcome]],
        now: float,
    ) -> tuple[list[tuple[PendingRecipient, Outcome]], dict[int, float]]:
        """Deferred recipients get a next attempt, or fail once the queue lifetime is over."""
        expired = now - message.created >= self.config.lifetime
        retry_at: dict[int, float] = {}
        final: list[tuple[PendingRecipient, Outcome]] = []
        for pending, outcome in results:
            if outcome.status is Status.DEFERRED and expired:
                # RFC 3463 4.4.7: delivery time expired; reported with Action: failed.
                reply = f"delivery time expired; last reply: {outcome.reply}"
                outcome = Outcome(
                    outcome.recipient, Status.FAILED, reply, "4.4.7", outcome.remote_mta
                )
            elif outcome.status is Status.DEFERRED:
                retry_at[pending.index] = now + backoff(
                    self.config, pending.attempts + 1, self._rng
                )
            final.append((pending, outcome))
        return final, retry_at

    async def _db(self, function: Callable[..., T], *args: object) -> T:
        """Run a state function in a thread, one at a time on our connection."""
        assert self._conn is not None
        conn = self._conn
        async with self._lock:
            return await asyncio.to_thread(function, conn, *args)
