"""Delivery in a process of its own, beside the listeners' process.

Why a process: accepting and relaying a small message each cost about half a
millisecond of Python, and one Python process uses one core. With delivery beside the
listeners, the backlog that acceptance creates competes with acceptance itself for that
core; in its own process the delivery loop has the machine's second core (bench
scenario b, docs/benchmarks.md). The two processes share only the database, which is
built for several processes already (WAL; delivery works on leases, DESIGN principle 5).

The listener process says "new mail" over a socketpair, at most one byte per turn of
its event loop; the worker also polls the queue (`poll_interval`), so a lost byte only
delays. The configuration goes to the worker pickled on its stdin: it is our own parent,
and `serve --dev` has no file to point it at.

The worker must not outlive the server: a worker left behind by a `kill -9` would keep
leases that the restarted server takes back as its own, and deliver twice. On Linux the
kernel kills it with its parent (PR_SET_PDEATHSIG); everywhere it stops when the socket
reaches EOF. If the worker dies (a signal, an error), the server logs it and starts
another; one that stopped cleanly after a SIGTERM of its own is left stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys

from submitd.config import Config
from submitd.delivery.notify import Notifier
from submitd.delivery.router import Router
from submitd.delivery.scheduler import Scheduler
from submitd.observe.logging import configure_logging
from submitd.runtime import install_event_loop_policy, tune_allocator
from submitd.store.queue import Queue

log = logging.getLogger("submitd.delivery")

RESTART_FIRST = 1.0  # seconds before restarting a worker that died; doubles, capped
RESTART_MAX = 30.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class DeliveryWorker:
    """The listener side: starts the worker, wakes it, restarts it, stops it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._wake_pending = False
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._spawn()
        self._watch = asyncio.get_running_loop().create_task(self._supervise())

    def wake(self) -> None:
        """A message was committed; tell the worker once per loop turn, not per message."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._send_wake)

    def begin_stop(self) -> None:
        """The server is stopping: a worker that exits from now on is not replaced.

        Said at once on SIGTERM, before the listeners' grace period: a service manager
        that signals the whole process group stops the worker at the same moment.
        """
        self._stopping = True

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM: the worker finishes or hands back its attempts, then exits."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(process.wait), grace + 5.0)
            except TimeoutError:
                log.error("delivery worker did not stop in time; killing it")
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._socket is not None:
            self._socket.close()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        command = [
            sys.executable,
            "-m",
            "submitd.delivery.worker",
            str(theirs.fileno()),
            str(os.getpid()),
        ]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(self.config))
        process.stdin.close()
        if self._socket is not None:
            self._socket.close()
        self._process, self._socket = process, ours
        log.info("delivery worker started (pid %d)", process.pid)

    def _send_wake(self) -> None:
        self._wake_pending = False
        if self._socket is not None:
            # Full buffer: the worker has wake-ups enough waiting. Gone: the supervisor
            # sees the exit and restarts it.
            with contextlib.suppress(OSError):
                self._socket.send(b"!")

    async def _supervise(self) -> None:
        delay = RESTART_FIRST
        while not self._stopping:
            process = self._process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if self._stopping:
                return
            if code == 0:  # it was told to stop (SIGTERM sent to it alone): respect that
                log.warning("delivery worker stopped (status 0); restart submitd to deliver")
                return
            log.error("delivery worker exited with status %s; restarting in %.0f s", code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            self._spawn()


# ------------------------------------------------------------------ the worker itself


class Delivery:
    """The delivery loop and what it needs: routes, notifications, the queue for DSNs."""

    def __init__(self, config: Config, queue: Queue) -> None:
        self.router = Router(config.delivery, config.hostname)
        notifier = Notifier.for_site(config, queue)
        self.scheduler = Scheduler(
            config.delivery,
            config.database_path,
            self.router,
            notifier,
            keep_finished=config.queue.keep_finished,
        )
        notifier.wake = self.scheduler.wake  # notices are queued mail: deliver them soon
        self.task = asyncio.get_running_loop().create_task(self.scheduler.run())

    def wake(self) -> None:
        self.scheduler.wake()

    async def stop(self) -> None:
        await self.scheduler.stop()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.router.close()


async def _run(config: Config, wake_socket: socket.socket) -> None:
    queue = Queue(config.database_path, config.spool_dir, config.queue)
    delivery = Delivery(config, queue)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def readable() -> None:
        try:
            data = wake_socket.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the server is gone
            loop.remove_reader(wake_socket.fileno())
            stop.set()
            return
        delivery.wake()

    wake_socket.setblocking(False)
    loop.add_reader(wake_socket.fileno(), readable)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await delivery.stop()
    await queue.close()


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(0)


def main(argv: list[str]) -> None:
    descriptor, parent = int(argv[0]), int(argv[1])
    # Ctrl-C in a terminal reaches the whole process group, and SIGHUP is a reload of
    # the server's settings: both are the server's to act on; it stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent)
    config: Config = pickle.loads(sys.stdin.buffer.read())
    configure_logging(config.log.level, config.log.per_client_lines_per_minute)
    tune_allocator()
    install_event_loop_policy()
    wake_socket = socket.socket(fileno=descriptor)
    asyncio.run(_run(config, wake_socket))


if __name__ == "__main__":
    main(sys.argv[1:])
