"""Memory per idle session, and peak memory under many large messages (issue 6, "Memory").

    python bench/idle_sessions.py --sessions 1000
    python bench/idle_sessions.py --sessions 1000 --loops uvloop --large-clients 0

Part 1, for each event loop in --loops (uvloop, then asyncio): a fresh submitd; one
complete session first (STARTTLS, AUTH, one message, QUIT), so that the TLS context,
the password hash check and its cache, the queue writer and the database connections
exist before the baseline; then --sessions sessions are opened (STARTTLS + AUTH PLAIN,
--concurrency at a time) and left idle. The server's RSS (VmRSS) before and after,
divided by the number of sessions, is the cost of one idle authenticated TLS session.
Then the sessions close and the RSS is read again (how much memory goes back).

submitd has no switch for the event loop (runtime.install_event_loop_policy uses uvloop
whenever it can be imported), so the asyncio run starts the server with `python -c`
that replaces that function by a no-op before the CLI runs; which loop is really in use
is confirmed from the server's /proc/PID/maps (uvloop's extension module mapped or not).

Part 2: a fresh submitd (uvloop), --large-clients (50) clients that authenticate and
then each send one --large-mb (50 MB) message at the same moment. The server's RSS is
sampled every 0.1 s; the peak (and the kernel's VmHWM) must stay under --peak-limit-mb
(500). All messages must be acknowledged and read back intact from the queue.

Limits: the default idle timeout (300 s) is far longer than a run. Where the server's
configuration has an [abuse] section, its session caps are raised for the test (global
cap above --sessions, per-address cap and connection rate off); the clients are spread
over 127.0.3.1-127.0.3.200 anyway, at most 5 per address for 1000 sessions, under the
default 20 concurrent sessions per address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import evloop
import loadgen
from proctree import Sampler
from soak import (
    CLIENT_ERRORS,
    PASSWORD,
    USER,
    Ack,
    Mix,
    Submitd,
    Target,
    check_queue,
    config_sections,
    describe,
    fd_count,
    log,
    open_authenticated,
    options,
    proc_status,
    scratch_directory,
    send_message,
    tcp_connections,
)


def extra_config(sessions: int) -> str:
    text = "[limits]\nidle_timeout = 900\n"
    if "abuse" in config_sections():
        text += (
            "[abuse]\n"
            f"max_sessions = {2 * sessions + 200}\n"
            "max_sessions_per_group = 0\n"
            "max_connects_per_minute = 0\n"
        )
    return text


def client_ip(index: int) -> str:
    return f"127.0.3.{1 + index % 200}"


def loop_in_use(pid: int) -> str:
    """'uvloop' if uvloop's extension module is mapped into the process, else 'asyncio'."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "uvloop" if "uvloop/loop" in maps else "asyncio"


def rss_mb(pid: int) -> float:
    return round(proc_status(pid).get("VmRSS", 0) / 1024, 1)


async def settle(seconds: float = 2.0) -> None:
    """Let the server finish closing and freeing before /proc is read."""
    await asyncio.sleep(seconds)


async def warm_up(target: Target) -> Ack:
    """One complete session, so that one-off allocations are in the baseline."""
    opts = options(target)
    mix = Mix(target, [(4096, 1.0)], run_id="warm")
    session = await open_authenticated(target, "127.0.0.1", loadgen.ssl_context(opts))
    try:
        ack = await send_message(session, opts, mix.payloads[4096], "warm-0")
        await loadgen.quit_session(session)
        return ack
    finally:
        session.close()


@dataclass
class IdleResult:
    loop: str
    sessions_asked: int
    sessions_open: int
    errors: dict[str, int]
    open_s: float
    rss_before_mb: float
    rss_open_mb: float
    rss_open_later_mb: float
    per_session_kb: float
    rss_after_close_mb: float
    fds_before: int
    fds_open: int
    established: int


async def idle_sessions(
    server: Submitd, sessions: int, concurrency: int, hold: float
) -> IdleResult:
    target = Target(server.port, str(server.cafile))
    await warm_up(target)
    await settle()
    pid = server.pid
    before, fds_before = rss_mb(pid), fd_count(pid)
    context = loadgen.ssl_context(options(target))
    gate = asyncio.Semaphore(concurrency)
    errors: dict[str, int] = {}

    async def one(index: int) -> loadgen.Session | None:
        async with gate:
            try:
                async with asyncio.timeout(120):
                    return await open_authenticated(target, client_ip(index), context)
            except CLIENT_ERRORS as error:
                text = describe(error)
                errors[text] = errors.get(text, 0) + 1
                return None

    started = time.monotonic()
    opened = [s for s in await asyncio.gather(*(one(i) for i in range(sessions))) if s]
    open_s = time.monotonic() - started
    await settle()
    rss_open, fds_open = rss_mb(pid), fd_count(pid)
    established, _ = tcp_connections(server.port)
    await asyncio.sleep(hold)
    rss_later = rss_mb(pid)
    for session in opened:
        session.writer.write(b"QUIT\r\n")
    await asyncio.sleep(1.0)
    for session in opened:
        session.close()
    for _ in range(60):
        if tcp_connections(server.port) == (0, 0):
            break
        await asyncio.sleep(0.5)
    await settle()
    return IdleResult(
        loop=loop_in_use(pid),
        sessions_asked=sessions,
        sessions_open=len(opened),
        errors=errors,
        open_s=round(open_s, 2),
        rss_before_mb=before,
        rss_open_mb=rss_open,
        rss_open_later_mb=rss_later,
        per_session_kb=round(1024 * (rss_open - before) / max(1, len(opened)), 1),
        rss_after_close_mb=rss_mb(pid),
        fds_before=fds_before,
        fds_open=fds_open,
        established=established,
    )


class RssSampler(Sampler):
    """VmRSS of one process every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.pid = pid
        self.peak_mb = 0.0
        self.samples: list[tuple[float, float]] = []
        self._t0 = time.monotonic()

    def sample(self) -> None:
        value = rss_mb(self.pid)
        self.samples.append((round(time.monotonic() - self._t0, 1), value))
        self.peak_mb = max(self.peak_mb, value)


@dataclass
class LargeResult:
    loop: str
    clients: int
    size_bytes: int
    acknowledged: int
    errors: dict[str, int]
    seconds: float
    mb_per_s: float
    rss_before_mb: float
    peak_rss_mb: float
    vm_hwm_mb: float
    rss_after_mb: float
    queue: str
    intact: bool
    rss_timeline: list[tuple[float, float]] = field(default_factory=list)


async def large_messages(server: Submitd, clients: int, size: int) -> LargeResult:
    target = Target(server.port, str(server.cafile))
    warm = await warm_up(target)
    log(f"building a {size / 1e6:g} MB message body")
    mix = Mix(target, [(size, 1.0)], run_id="large")
    payload = mix.payloads[size]
    opts = options(target, size)
    context = loadgen.ssl_context(opts)
    await settle()
    pid = server.pid
    before = rss_mb(pid)
    errors: dict[str, int] = {}
    acks: list[Ack] = []
    sessions: list[loadgen.Session] = []
    for index in range(clients):  # authenticate first, then send all at the same moment
        sessions.append(await open_authenticated(target, client_ip(index), context))
    go = asyncio.Event()

    async def send(index: int, session: loadgen.Session) -> None:
        await go.wait()
        try:
            async with asyncio.timeout(900):
                acks.append(await send_message(session, opts, payload, f"large-{index}"))
                await loadgen.quit_session(session)
        except CLIENT_ERRORS as error:
            text = describe(error)
            errors[text] = errors.get(text, 0) + 1
        finally:
            session.close()

    with RssSampler(pid) as sampler:
        tasks = [asyncio.create_task(send(i, s)) for i, s in enumerate(sessions)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        go.set()
        await asyncio.gather(*tasks)
        seconds = time.monotonic() - started
        await settle()
    status = proc_status(pid)
    check = check_queue(server.db_path, server.spool_dir, [warm, *acks])
    intact = not check.missing and not check.corrupt and len(acks) == clients
    return LargeResult(
        loop=loop_in_use(pid),
        clients=clients,
        size_bytes=size,
        acknowledged=len(acks),
        errors=errors,
        seconds=round(seconds, 1),
        mb_per_s=round(len(acks) * size / 1e6 / seconds, 1),
        rss_before_mb=before,
        peak_rss_mb=sampler.peak_mb,
        vm_hwm_mb=round(status.get("VmHWM", 0) / 1024, 1),
        rss_after_mb=round(status.get("VmRSS", 0) / 1024, 1),
        queue=check.summary(),
        intact=intact,
        rss_timeline=sampler.samples[:: max(1, len(sampler.samples) // 40)],
    )


@contextlib.contextmanager
def running_server(
    root: Path, name: str, uvloop: bool, sessions: int, keep: bool
) -> Iterator[Submitd]:
    """A fresh submitd in root/name, stopped (and its directory removed) afterwards."""
    server = Submitd(root / name, extra_config(sessions), uvloop=uvloop)
    server.root.mkdir(parents=True)
    try:
        server.prepare({USER: PASSWORD})
        server.start()
        log(f"{name}: submitd pid {server.pid} on 127.0.0.1:{server.port}")
        yield server
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(server.root, ignore_errors=True)


def print_idle(result: IdleResult) -> None:
    print(
        f"idle sessions, server on {result.loop}: {result.sessions_open}/{result.sessions_asked} "
        f"open in {result.open_s} s (errors {result.errors or 'none'})"
    )
    print(
        f"  RSS {result.rss_before_mb} MB before -> {result.rss_open_mb} MB with the sessions "
        f"open ({result.rss_open_later_mb} MB a little later) = {result.per_session_kb} KB "
        f"per session; {result.rss_after_close_mb} MB after they closed"
    )
    print(
        f"  fds {result.fds_before} -> {result.fds_open}; established connections "
        f"{result.established}"
    )


def print_large(result: LargeResult, limit: float) -> None:
    verdict = "OK" if result.peak_rss_mb < limit and result.intact else "VIOLATION"
    print(
        f"large messages, server on {result.loop}: {result.clients} x "
        f"{result.size_bytes / 1e6:g} MB at once: {result.acknowledged} acknowledged in "
        f"{result.seconds} s ({result.mb_per_s} MB/s), errors {result.errors or 'none'}"
    )
    print(
        f"  RSS {result.rss_before_mb} MB before, peak {result.peak_rss_mb} MB sampled "
        f"(VmHWM {result.vm_hwm_mb} MB), {result.rss_after_mb} MB after; limit {limit:g} MB: "
        f"{verdict}"
    )
    print(f"  queue: {result.queue}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="submitd memory per idle session and peak.")
    add = parser.add_argument
    add("--sessions", type=int, default=1000, help="idle authenticated TLS sessions")
    add("--loops", default="uvloop,asyncio", help="server event loops to measure, in order")
    add("--concurrency", type=int, default=100, help="sessions being opened at once")
    add("--hold", type=float, default=5.0, help="seconds to keep the sessions open")
    add("--large-clients", type=int, default=50, help="clients sending a large message (0: skip)")
    add("--large-mb", type=float, default=50.0, help="size of each large message, MB (10^6)")
    add("--peak-limit-mb", type=float, default=500.0, help="allowed peak RSS, large messages")
    add("--json-out", type=Path, help="write the results as JSON")
    add("--keep", action="store_true", help="keep the temporary directories")
    return parser.parse_args(argv)


async def run_all(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"idle": [], "large": None}
    for loop in [name.strip() for name in args.loops.split(",") if name.strip()]:
        if loop not in ("uvloop", "asyncio"):
            raise SystemExit(f"--loops: uvloop or asyncio, not {loop!r}")
        with running_server(root, f"idle-{loop}", loop == "uvloop", args.sessions, args.keep) as s:
            result = await idle_sessions(s, args.sessions, args.concurrency, args.hold)
        print_idle(result)
        results["idle"].append(result)
    if args.large_clients:
        size = int(args.large_mb * 1e6)
        with running_server(root, "large", True, args.large_clients, args.keep) as s:
            large = await large_messages(s, args.large_clients, size)
        print_large(large, args.peak_limit_mb)
        results["large"] = large
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_directory("idle", args.keep) as root:
        results = evloop.run(run_all(args, root))
    failed = [r for r in results["idle"] if r.sessions_open < r.sessions_asked]
    large: LargeResult | None = results["large"]
    if large is not None and (not large.intact or large.peak_rss_mb >= args.peak_limit_mb):
        failed.append(large)
    if args.json_out:
        serial = {
            "idle": [asdict(r) for r in results["idle"]],
            "large": asdict(large) if large else None,
        }
        args.json_out.write_text(json.dumps(serial, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
