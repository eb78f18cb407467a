"""Soak test: submitd under mixed good and hostile load for N minutes (issue 6).

    python bench/soak.py --minutes 10

Starts submitd on loopback (configuration in a temporary directory; delivery off, so
every accepted message stays queued; the per-user rate limits lifted) and runs, all at
once until the time is up:

- good clients: STARTTLS, AUTH PLAIN, 1-30 pipelined messages per session (mostly 2-8
  KiB, some 300 KiB ones that spill to spool files), each with a unique X-Bench-Id; every
  250 reply's queue id is recorded with the SHA-256 of the body that was sent;
- bad clients: STARTTLS and AUTH with wrong passwords (or unknown logins), expecting 535,
  454 or 421; they come from many 127.x.y.z addresses in /21 networks of their own, so
  the server's per-network AUTH throttle sees a spread-out guesser and never blocks the
  good clients' network;
- slow clients: a command trickled byte by byte, a connection that never says anything,
  a message sent at 10 KB/s (also recorded and checked), a NOOP trickled after AUTH;
- garbage: random bytes, over-long command lines, bare LF line endings, a TLS
  ClientHello on the plaintext port, random bytes instead of a TLS handshake after
  STARTTLS, a client that aborts in the middle of DATA (inline and spilled sizes), a
  flood of pipelined NOOPs that reads no reply for 5 s, and a run of unknown commands.

Every --sample-every seconds (10) it records the server's RSS (VmRSS), open file
descriptors (/proc/PID/fd) and TCP connections to its port (ESTABLISHED, CLOSE_WAIT).
At the end the clients leave and it checks, exit status 1 on any violation:

- the server is still running;
- file descriptors are back within --fd-slack (10) of the baseline taken before any
  client connected (a leaked socket, spool file or database handle per session would
  leave hundreds behind), and no connection is left ESTABLISHED or in CLOSE_WAIT;
- RSS grew by less than --rss-limit-mb (50) between the end of the warm-up (a quarter
  of the run, at most 60 s) and the highest later sample. Why 50 MB: the legitimate
  steady-state working set is small and reached during the warm-up (a few dozen
  sessions with TLS buffers of tens of KB each, in-flight message buffers capped by
  queue.inline_max = 256 KiB, SQLite page caches of about 2 MB per connection, the
  abuse counters' bounded maps), and allocator noise is a few MB. A leak of 1 KB per
  message at the ~50-100 messages/s this machine sustains is 30-60 MB in 10 minutes, so
  the full run catches a leak of that order; the report also prints growth per
  accepted message and the slope over the run, which show smaller leaks in a long run;
- every acknowledged message is in the queue intact: read back with
  submitd.store.queue.read_message_bytes, the SHA-256 of everything after the first
  blank line (so our Received and DKIM fields and the cleaned header are left out)
  equals that of the body sent, and its X-Bench-Id is the one sent; no bench id is
  stored twice; no queued message lacks an acknowledgement (all our clients wait for
  the reply, and aborted DATA must not be queued); no spool file is left without a
  queue row;
- no good client saw an error, and no wrong password was ever accepted.

crashloop.py and idle_sessions.py import the server handle, the clients, the queue
check and what runs around the load (main_on_submitd, scratch_directory) from here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import evloop
import loadgen
from run import SUBMITD_LISTENER_CONFIG, add_user, free_port
from submitd.store.queue import read_message_bytes
from tlscert import make_self_signed

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
USER = "soak@example.test"
PASSWORD = "soak-password-0123"
TLS_NAME = "soak.example.test"
RCPT = "someone@example.net"
WRITE_SLICE = 256 * 1024  # large bodies are written in slices, with drain() between
QUEUED = re.compile(r"queued as (\S+)")
BENCH_ID = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)

# `python -c` program that runs `submitd` exactly as the CLI does but leaves the default
# asyncio event loop in place: the server has no switch for it (install_event_loop_policy
# in src/submitd/runtime.py uses uvloop whenever it can be imported).
# (`import submitd.cli.serve` would bind the click command of that name, not the module.)
NO_UVLOOP_MAIN = (
    "import importlib\n"
    "serve_module = importlib.import_module('submitd.cli.serve')\n"
    "serve_module.install_event_loop_policy = lambda: None\n"
    "from submitd.cli import main\n"
    "main()\n"
)

BASE_CONFIG = (
    SUBMITD_LISTENER_CONFIG
    + """\
[delivery]
enabled = false
[policy]
messages_per_hour = 0
recipients_per_day = 0
"""
)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def config_sections() -> set[str]:
    """Top-level sections the installed submitd's configuration knows (for [abuse])."""
    from submitd.config import Config

    return set(Config.model_fields)


# --- the server ----------------------------------------------------------------------


@dataclass
class Submitd:
    """One submitd on 127.0.0.1 with a data directory that survives restarts."""

    root: Path
    extra_config: str = ""
    uvloop: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.root / "submitd.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "submitd.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def cafile(self) -> Path:
        return self.root / "cert.pem"

    @property
    def log_path(self) -> Path:
        return self.root / "submitd.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def prepare(self, users: dict[str, str]) -> None:
        """Certificate, configuration file and users (`submitd user add`)."""
        make_self_signed(self.cafile, self.root / "key.pem", TLS_NAME)
        self.config_path.write_text(
            BASE_CONFIG.format(
                hostname=TLS_NAME,
                data_dir=self.data_dir,
                port=self.port,
                cert=self.cafile,
                key=self.root / "key.pem",
            )
            + self.extra_config
        )
        for login, password in users.items():
            failed = add_user([sys.executable, "-m", "submitd"], self.config_path, login, password)
            if failed is not None:
                raise RuntimeError(f"submitd user add failed: {failed.strip()}")

    def command(self) -> list[str]:
        main = ["-m", "submitd"] if self.uvloop else ["-c", NO_UVLOOP_MAIN]
        return [sys.executable, *main, "serve", "--config", str(self.config_path)]

    def start(self, timeout: float = 30.0) -> float:
        """Start and wait until the port accepts; returns the seconds it took."""
        started = time.monotonic()
        with self.log_path.open("ab") as handle:
            self.process = subprocess.Popen(
                self.command(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"submitd exited with {self.process.returncode}: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"submitd did not listen within {timeout} s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, the queue gets no chance to flush anything."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (clean shutdown), SIGKILL if it takes longer than `timeout`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


# --- what /proc says about it ----------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, Threads ... from /proc/PID/status (memory in kB)."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0])
    return values


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def tcp_connections(port: int) -> tuple[int, int]:
    """(ESTABLISHED, CLOSE_WAIT) TCP sockets whose local port is `port`: the server's
    side of its client connections. CLOSE_WAIT means the client has gone and the server
    has not closed its socket."""
    established = close_wait = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            next(handle, None)
            for line in handle:
                fields = line.split(None, 4)
                if int(fields[1].rsplit(":", 1)[1], 16) != port:
                    continue
                if fields[3] == "01":
                    established += 1
                elif fields[3] == "08":
                    close_wait += 1
    return established, close_wait


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started
    rss_mb: float
    fds: int
    established: int
    close_wait: int


def take_sample(server: Submitd, t0: float) -> Sample:
    status = proc_status(server.pid)
    established, close_wait = tcp_connections(server.port)
    return Sample(
        round(time.monotonic() - t0, 1),
        round(status.get("VmRSS", 0) / 1024, 1),
        fd_count(server.pid),
        established,
        close_wait,
    )


# --- the queue check ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """A message the server acknowledged with 250: its queue id and what we sent."""

    queue_id: str
    bench_id: str
    sha256: str


def body_sha256(message: bytes) -> str:
    """SHA-256 of everything after the first blank line: the body as the client sent it
    (the server adds only header fields: Received, DKIM-Signature, cleanup fix-ups)."""
    _, sep, body = message.partition(b"\r\n\r\n")
    return hashlib.sha256(body).hexdigest() if sep else "no header/body separator"


@dataclass
class QueueCheck:
    rows: int = 0
    acknowledged: int = 0
    missing: list[str] = field(default_factory=list)  # acknowledged, not in the queue
    corrupt: list[str] = field(default_factory=list)  # in the queue, body or id differs
    duplicates: list[str] = field(default_factory=list)  # bench ids stored more than once
    unacknowledged: list[str] = field(default_factory=list)  # queued, never acknowledged
    orphan_files: list[str] = field(default_factory=list)  # spool files with no row
    integrity: str = "not checked"

    def lost_or_corrupt(self) -> int:
        return len(self.missing) + len(self.corrupt)

    def summary(self) -> str:
        return (
            f"{self.acknowledged} acknowledged, {self.rows} queued: "
            f"{len(self.missing)} missing, {len(self.corrupt)} corrupt, "
            f"{len(self.duplicates)} duplicated, {len(self.unacknowledged)} queued without "
            f"acknowledgement, {len(self.orphan_files)} orphan spool files, "
            f"integrity {self.integrity}"
        )


def check_queue(
    db_path: Path, spool_dir: Path, acks: list[Ack], *, integrity: bool = False
) -> QueueCheck:
    """Read every queued message back (read_message_bytes) and compare with `acks`."""
    result = QueueCheck(acknowledged=len(acks))
    conn = sqlite3.connect(db_path, timeout=60)
    try:
        if integrity:
            result.integrity = str(conn.execute("PRAGMA quick_check").fetchone()[0])
        ids = [row[0] for row in conn.execute("SELECT id FROM queue")]
        referenced = {
            Path(row[0]).name
            for row in conn.execute("SELECT body_path FROM queue WHERE body_path IS NOT NULL")
        }
        stored: dict[str, tuple[str, str]] = {}
        for queue_id in ids:
            data = read_message_bytes(conn, queue_id)
            header_end = data.find(b"\r\n\r\n")
            found = BENCH_ID.search(data, 0, header_end if header_end >= 0 else len(data))
            bench_id = found.group(1).decode() if found else "(no X-Bench-Id)"
            stored[queue_id] = (bench_id, body_sha256(data))
    finally:
        conn.close()
    result.rows = len(stored)
    for ack in acks:
        got = stored.get(ack.queue_id)
        if got is None:
            result.missing.append(f"{ack.queue_id} {ack.bench_id}")
        elif got != (ack.bench_id, ack.sha256):
            result.corrupt.append(f"{ack.queue_id} {ack.bench_id}: stored as {got[0]}")
    acked_ids = {ack.queue_id for ack in acks}
    result.unacknowledged = [
        f"{qid} {bench}" for qid, (bench, _) in stored.items() if qid not in acked_ids
    ]
    counts = Counter(bench for bench, _ in stored.values())
    result.duplicates = sorted(bench for bench, n in counts.items() if n > 1)
    if spool_dir.is_dir():
        result.orphan_files = sorted(
            p.name for p in spool_dir.iterdir() if p.name not in referenced
        )
    return result


# --- clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    port: int
    cafile: str
    host: str = "127.0.0.1"
    user: str = USER
    password: str = PASSWORD


def options(target: Target, size: int = 4096, run_id: str = "soak") -> loadgen.Options:
    """loadgen's Options for one message size (its Payload and login() take them)."""
    return loadgen.Options(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        mail_from=target.user,
        rcpt=RCPT,
        clients=1,
        per_connection=1,
        size=size,
        duration=0.0,
        warmup=0.0,
        processes=1,
        cafile=target.cafile,
        insecure=False,
        tls_name=TLS_NAME,
        run_id=run_id,
        timeout=60.0,
        pipelining=True,
        uvloop=True,
    )


@dataclass
class Mix:
    """Message sizes to choose from, with weights; a Payload per size, built once."""

    target: Target
    sizes: list[tuple[int, float]]
    run_id: str = "soak"
    payloads: dict[int, loadgen.Payload] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for size, _ in self.sizes:
            self.payloads[size] = loadgen.Payload(options(self.target, size, self.run_id))

    def pick(self, rng: random.Random) -> loadgen.Payload:
        sizes = [size for size, _ in self.sizes]
        weights = [weight for _, weight in self.sizes]
        return self.payloads[rng.choices(sizes, weights)[0]]


# Good clients' source addresses: 50 in 127.0.0.0/26 (the bad ones are in other /21s).
GOOD_IPS = [f"127.0.0.{n}" for n in range(10, 60)]
CLIENT_ERRORS = (OSError, loadgen.ReplyError, TimeoutError, asyncio.IncompleteReadError)


async def connect(target: Target, local_ip: str | None) -> loadgen.Session:
    reader, writer = await asyncio.open_connection(
        target.host, target.port, local_addr=(local_ip, 0) if local_ip else None
    )
    return loadgen.Session(reader, writer)


async def open_authenticated(
    target: Target, local_ip: str | None, context: ssl.SSLContext
) -> loadgen.Session:
    """Connect, STARTTLS, AUTH PLAIN (loadgen's login); closes the socket on failure."""
    session = await connect(target, local_ip)
    try:
        await loadgen.login(session, options(target), context)
    except BaseException:
        session.close()
        raise
    return session


async def send_message(
    session: loadgen.Session,
    opts: loadgen.Options,
    payload: loadgen.Payload,
    bench_id: str,
    *,
    slice_size: int = WRITE_SLICE,
    pause: float = 0.0,
) -> Ack:
    """One transaction (envelope pipelined); the Ack carries the queue id from the 250.
    The body goes out in slices with drain() (and `pause` seconds) between them."""
    chunks, sha = payload.message(bench_id)
    try:
        await loadgen.send_envelope(session, opts, sum(map(len, chunks)))
    except loadgen.ReplyError:
        session.writer.write(b"RSET\r\n")
        await session.expect("RSET", 250)
        raise
    for chunk in chunks:
        view = memoryview(chunk)
        for offset in range(0, len(view), slice_size):
            session.writer.write(view[offset : offset + slice_size])
            await session.writer.drain()
            if pause:
                await asyncio.sleep(pause)
    text = await session.expect("end of data", 250)
    found = QUEUED.search(text)
    if found is None:
        raise loadgen.ReplyError(f"end of data: no queue id in {loadgen.first_line(text)!r}")
    return Ack(found.group(1), bench_id, sha)


def describe(error: BaseException) -> str:
    if isinstance(error, loadgen.ReplyError):
        return str(error)[:100]
    return f"{type(error).__name__} {error}"[:100]


@dataclass
class Tally:
    """Outcomes by kind, acknowledged messages, and violations seen by clients."""

    outcomes: Counter[str] = field(default_factory=Counter)
    acks: list[Ack] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.outcomes[text] += 1


async def good_client(
    target: Target,
    name: str,
    local_ips: list[str],
    mix: Mix,
    running: Callable[[], bool],
    tally: Tally,
    *,
    per_session: tuple[int, int] = (1, 30),
    seed: int = 0,
    timeout: float = 120.0,
) -> None:
    """Sessions of 1-30 messages while running(); every 250 becomes an Ack. Each
    session comes from one of `local_ips`, chosen at random: the server limits new
    connections per address and minute (300 by default; refused attempts count too),
    which one busy client from one address would exceed."""
    rng = random.Random(seed)
    opts = options(target)
    context = loadgen.ssl_context(opts)
    sequence = 0
    while running():
        try:
            async with asyncio.timeout(timeout):
                session = await open_authenticated(target, rng.choice(local_ips), context)
        except CLIENT_ERRORS as error:
            tally.note(f"good: session setup failed: {describe(error)}")
            await asyncio.sleep(1.0)
            continue
        tally.note("good: sessions")
        try:
            for _ in range(rng.randint(*per_session)):
                if not running():
                    break
                bench_id = f"{name}-{sequence}"
                sequence += 1
                async with asyncio.timeout(timeout):
                    ack = await send_message(session, opts, mix.pick(rng), bench_id)
                tally.acks.append(ack)
            async with asyncio.timeout(timeout):
                await loadgen.quit_session(session)
        except CLIENT_ERRORS as error:
            tally.note(f"good: {describe(error)}")
            session.close()


async def read_until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, bool]:
    """Whatever arrives within `limit` seconds; True if the server closed meanwhile."""
    received = bytearray()
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(limit):
            while piece := await reader.read(65536):
                received += piece
            return bytes(received), True
    return bytes(received), False


def codes(data: bytes) -> list[int]:
    """The reply codes in `data` (last lines of replies only)."""
    return [
        int(line[:3]) for line in data.split(b"\r\n") if line[:3].isdigit() and line[3:4] != b"-"
    ]


async def bad_client(
    target: Target,
    local_ips: list[str],
    running: Callable[[], bool],
    tally: Tally,
    *,
    seed: int = 0,
) -> None:
    """Sessions that try 1-4 wrong passwords (or unknown logins) each; any 235 is a
    violation. The server may delay each failure by seconds and refuse blocked networks
    with 421 at the greeting or 454 at AUTH."""
    rng = random.Random(seed)
    context = loadgen.ssl_context(options(target))
    while running():
        ip = rng.choice(local_ips)
        session: loadgen.Session | None = None
        try:
            async with asyncio.timeout(120):
                session = await connect(target, ip)
                code, _ = await session.reply()
                if code != 220:
                    tally.note(f"bad: greeting {code}")
                    session.close()
                    await asyncio.sleep(rng.uniform(0.5, 2))
                    continue
                await session.ehlo()
                session.writer.write(b"STARTTLS\r\n")
                await session.expect("STARTTLS", 220)
                await session.writer.start_tls(context, server_hostname=TLS_NAME)
                await session.ehlo()
                await _wrong_passwords(session, target, rng, tally)
        except CLIENT_ERRORS as error:
            tally.note(f"bad: {describe(error)}")
        finally:
            if session is not None:
                session.close()


async def _wrong_passwords(
    session: loadgen.Session, target: Target, rng: random.Random, tally: Tally
) -> None:
    for _ in range(rng.randint(1, 4)):
        login = target.user if rng.random() < 0.7 else f"nobody{rng.randrange(1000)}@example.test"
        password = f"wrong-{rng.randrange(10**9)}"
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        session.writer.write(f"AUTH PLAIN {token}\r\n".encode())
        code, text = await session.reply()
        tally.note(f"bad: AUTH {code}")
        if code == 235:
            tally.violations.append(f"wrong password accepted for {login}: {text.strip()}")
        elif code not in (535, 454, 421):
            tally.note(f"bad: unexpected AUTH reply {loadgen.first_line(text)}")
        if code == 421:
            return
    session.writer.write(b"QUIT\r\n")
    await session.expect("QUIT", 221)


# Slow clients ------------------------------------------------------------------------------


async def slow_trickle_ehlo(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    """EHLO one byte every 0.3 s, idle 10-40 s, NOOP, QUIT."""
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        for byte in b"EHLO slow.example.test\r\n":
            session.writer.write(bytes([byte]))
            await asyncio.sleep(0.3)
        await session.expect("EHLO", 250)
        await asyncio.sleep(rng.uniform(10, 40))
        session.writer.write(b"NOOP\r\n")
        await session.expect("NOOP", 250)
        await loadgen.quit_session(session)
        tally.note("slow: trickled EHLO, idle, NOOP: ok")
    finally:
        session.close()


async def slow_silent(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    """Connect, say nothing for 15-40 s, leave (reading what came)."""
    session = await connect(target, ip)
    try:
        await asyncio.sleep(rng.uniform(15, 40))
        data, closed = await read_until_closed(session.reader, 0.5)
        tally.note(f"slow: silent, replies {codes(data)}, closed by server: {closed}")
    finally:
        session.close()


async def slow_data(
    target: Target, ip: str, rng: random.Random, tally: Tally, mix: Mix, name: str
) -> None:
    """AUTH, then a 16 KiB message in 512-byte slices every 50 ms (~10 KB/s): recorded
    and checked like a good client's."""
    context = loadgen.ssl_context(options(target))
    session = await open_authenticated(target, ip, context)
    try:
        payload = mix.payloads[16 * 1024]
        ack = await send_message(
            session, options(target), payload, name, slice_size=512, pause=0.05
        )
        tally.acks.append(ack)
        await loadgen.quit_session(session)
        tally.note("slow: slow DATA: ok")
    finally:
        session.close()


async def slow_noop_after_auth(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    """AUTH, then NOOP one byte per second, idle 5-20 s, QUIT."""
    context = loadgen.ssl_context(options(target))
    session = await open_authenticated(target, ip, context)
    try:
        for byte in b"NOOP\r\n":
            session.writer.write(bytes([byte]))
            await asyncio.sleep(1.0)
        await session.expect("NOOP", 250)
        await asyncio.sleep(rng.uniform(5, 20))
        await loadgen.quit_session(session)
        tally.note("slow: trickled NOOP after AUTH: ok")
    finally:
        session.close()


# Garbage ------------------------------------------------------------------------------------


async def garbage_random(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        session.writer.write(rng.randbytes(rng.randint(1, 64 * 1024)))
        _, closed = await read_until_closed(session.reader, 15)
        tally.note(f"garbage: random bytes: closed by server {closed}")
    finally:
        session.close()


async def garbage_long_line(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        length = rng.choice([600, 3000, 20_000, 200_000])
        session.writer.write(b"EHLO " + b"a" * length + b"\r\nQUIT\r\n")
        data, closed = await read_until_closed(session.reader, 15)
        tally.note(f"garbage: {length}-octet line: replies {codes(data)[:3]}, closed {closed}")
    finally:
        session.close()


async def garbage_bare_lf(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        session.writer.write(b"EHLO bare.example.test\nNOOP\nMAIL FROM:<a@b>\nQUIT\n")
        data, closed = await read_until_closed(session.reader, 15)
        tally.note(f"garbage: bare LF: replies {codes(data)[:4]}, closed {closed}")
    finally:
        session.close()


async def garbage_tls_hello(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    """A TLS ClientHello (record header + random) on the plaintext port, before the
    greeting: what a client configured for port 465 sends to port 587."""
    session = await connect(target, ip)
    try:
        body = rng.randbytes(rng.randint(200, 600))
        session.writer.write(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body)
        _, closed = await read_until_closed(session.reader, 15)
        tally.note(f"garbage: TLS hello in plaintext: closed by server {closed}")
    finally:
        session.close()


async def garbage_after_starttls(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    """STARTTLS, then random bytes (sometimes a plausible record header) instead of a
    handshake."""
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        await session.ehlo()
        session.writer.write(b"STARTTLS\r\n")
        await session.expect("STARTTLS", 220)
        junk = rng.randbytes(rng.randint(1, 4096))
        if rng.random() < 0.5:
            junk = b"\x16\x03\x03\x00\x40" + junk
        session.writer.write(junk)
        _, closed = await read_until_closed(session.reader, 35)
        tally.note(f"garbage: junk after STARTTLS: closed by server {closed}")
    finally:
        session.close()


async def garbage_abort_data(
    target: Target, ip: str, rng: random.Random, tally: Tally, mix: Mix, name: str
) -> None:
    """AUTH, MAIL/RCPT/DATA, part of a body (inline or spilled size), then a reset
    connection: nothing may be queued, no spool file may remain."""
    opts = options(target)
    session = await open_authenticated(target, ip, loadgen.ssl_context(opts))
    try:
        size = rng.choice([8 * 1024, 100 * 1024, 600 * 1024])
        payload = mix.payloads[700 * 1024]
        chunks, _ = payload.message(name)
        await loadgen.send_envelope(session, opts, size)
        session.writer.write(b"".join(chunks)[:size])
        await session.writer.drain()
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        tally.note(f"garbage: aborted DATA after {size // 1024} KiB")
    finally:
        session.close()  # transport.abort(): RST, no QUIT


async def garbage_noop_flood(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    """100,000 pipelined NOOPs without reading for 5 s: the server must stop reading
    when its replies back up, not buffer 2 MB of them."""
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        count = 100_000
        session.writer.write(b"NOOP\r\n" * count)
        await asyncio.sleep(5)
        replies = 0
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(60):
                while replies < count:
                    line = await session.reader.readline()
                    if not line:
                        break
                    replies += 1
        tally.note("garbage: NOOP flood: " + ("all answered" if replies >= count else "cut short"))
    finally:
        session.close()


async def garbage_bad_commands(target: Target, ip: str, rng: random.Random, tally: Tally) -> None:
    session = await connect(target, ip)
    try:
        await session.expect("greeting", 220)
        session.writer.write(b"XYZZY plugh\r\n" * 40)
        data, closed = await read_until_closed(session.reader, 60)
        last = codes(data)[-1:] if data else []
        tally.note(f"garbage: 40 unknown commands: last reply {last}, closed {closed}")
    finally:
        session.close()


Action = Callable[[Target, str, random.Random, Tally], Awaitable[None]]


async def loop_actions(
    target: Target,
    ip: str,
    actions: list[Action],
    running: Callable[[], bool],
    tally: Tally,
    kind: str,
    *,
    seed: int,
    pause: tuple[float, float] = (0.2, 1.0),
) -> None:
    """Run randomly chosen actions one after another while running()."""
    rng = random.Random(seed)
    while running():
        action = rng.choice(actions)
        try:
            async with asyncio.timeout(180):
                await action(target, ip, rng, tally)
        except CLIENT_ERRORS as error:
            tally.note(f"{kind}: {getattr(action, '__name__', '?')}: {describe(error)}")
        await asyncio.sleep(rng.uniform(*pause))


def bad_addresses(count: int) -> list[str]:
    """127.x.y.z addresses in `count` different /21 networks from 127.64.0.0 on: none
    shares a /21 (or /26) with the good clients' 127.0.0.0/21."""
    base = ipaddress.IPv4Address("127.64.0.0")
    return [str(base + 2048 * n + 1 + (n % 200)) for n in range(count)]


# --- what soak.py, crashloop.py and idle_sessions.py run around their load -------------------


@contextlib.contextmanager
def scratch_directory(name: str, keep: bool) -> Iterator[Path]:
    """A new temporary directory `submitd-NAME-*`, removed at the end unless `keep`. A
    SIGTERM ends the program through the callers' `finally`, so servers still stop."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server
    root = Path(tempfile.mkdtemp(prefix=f"submitd-{name}-"))
    try:
        yield root
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


class Verdict(Protocol):
    """A run's result: a dataclass whose `violations` are empty when all went well."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    violations: list[str]


VerdictT = TypeVar("VerdictT", bound=Verdict)


def add_driver_options(parser: argparse.ArgumentParser, json_what: str) -> None:
    """--json-out and --keep, the options main_on_submitd reads."""
    parser.add_argument("--json-out", type=Path, help=f"write the result {json_what} as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")


def main_on_submitd(
    args: argparse.Namespace,
    name: str,
    server_in: Callable[[Path], Submitd],
    load: Callable[[argparse.Namespace, Submitd], Coroutine[Any, Any, VerdictT]],
    report: Callable[[VerdictT], None],
) -> int:
    """soak's and crashloop's main(): a submitd (`server_in` the scratch directory) with
    the one user, `load` on the bench's event loop (it starts the server), the server
    stopped; then `report`, the result as JSON with --json-out, and the exit status
    (1 if there was any violation)."""
    with scratch_directory(name, args.keep) as root:
        server = server_in(root)
        try:
            server.prepare({USER: PASSWORD})
            result = evloop.run(load(args, server))
        finally:
            server.stop()
    report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(asdict(result), indent=2))
    return 1 if result.violations else 0


def print_outcomes(heading: str, outcomes: dict[str, int], violations: list[str], ok: str) -> None:
    """The end of a report: client outcomes by count, then the violations, or `ok`."""
    print(heading)
    for text, count in outcomes.items():
        print(f"    {count:7d}  {text}")
    if violations:
        print("VIOLATIONS:")
        for text in violations:
            print(f"  - {text}")
    else:
        print(ok)


# --- the soak --------------------------------------------------------------------------------


@dataclass
class SoakResult:
    minutes: float
    accepted: int
    messages_per_s: float
    baseline_fds: int
    final_fds: int
    warmup_s: float
    warm_rss_mb: float
    peak_rss_after_warmup_mb: float
    rss_growth_mb: float
    final_rss_mb: float
    rss_slope_mb_per_min: float | None
    peak_connections: int
    after_clients_left: dict[str, int]
    queue: dict[str, Any]
    outcomes: dict[str, int]
    samples: list[dict[str, Any]]
    violations: list[str]


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (y per unit of x); None with fewer than three points."""
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def abuse_config_for_soak() -> str:
    """Nothing: the soak runs against submitd's default abuse limits on purpose (the
    clients are spread over addresses so that the defaults never refuse good ones)."""
    return ""


async def soak(args: argparse.Namespace, server: Submitd) -> SoakResult:
    server.start()
    log(f"submitd pid {server.pid} on 127.0.0.1:{server.port}, data in {server.root}")
    target = Target(server.port, str(server.cafile))
    duration = args.minutes * 60
    warmup = min(60.0, duration / 4)
    mix = Mix(
        target,
        [(2048, 0.45), (8192, 0.45), (300 * 1024, 0.1), (16 * 1024, 0), (700 * 1024, 0)],
    )
    tally = Tally()
    samples: list[Sample] = []
    await asyncio.sleep(1.0)
    baseline_fds = fd_count(server.pid)
    t0 = time.monotonic()
    end = t0 + duration

    def running() -> bool:
        return time.monotonic() < end and server.alive()

    async def sampler() -> None:
        while True:
            sample = take_sample(server, t0)
            samples.append(sample)
            log(
                f"  t={sample.t:6.1f}s rss={sample.rss_mb:6.1f} MB fds={sample.fds:4d} "
                f"conns={sample.established:3d} close_wait={sample.close_wait} "
                f"acked={len(tally.acks)}"
            )
            if not server.alive():
                return
            await asyncio.sleep(args.sample_every)

    def slow_data_action(t: Target, ip: str, rng: random.Random, tl: Tally) -> Awaitable[None]:
        return slow_data(t, ip, rng, tl, mix, f"slow-{rng.randrange(10**12)}")

    def abort_action(t: Target, ip: str, rng: random.Random, tl: Tally) -> Awaitable[None]:
        return garbage_abort_data(t, ip, rng, tl, mix, f"abort-{rng.randrange(10**12)}")

    slow_actions: list[Action] = [
        slow_trickle_ehlo,
        slow_silent,
        slow_data_action,
        slow_noop_after_auth,
    ]
    garbage_actions: list[Action] = [
        garbage_random,
        garbage_long_line,
        garbage_bare_lf,
        garbage_tls_hello,
        garbage_after_starttls,
        abort_action,
        garbage_noop_flood,
        garbage_bad_commands,
    ]
    tasks = [
        good_client(target, f"g{i}", GOOD_IPS, mix, running, tally, seed=i)
        for i in range(args.good)
    ]
    bad_ips = bad_addresses(64)
    tasks += [bad_client(target, bad_ips, running, tally, seed=100 + i) for i in range(args.bad)]
    tasks += [
        loop_actions(target, f"127.0.1.{1 + i}", slow_actions, running, tally, "slow", seed=200 + i)
        for i in range(args.slow)
    ]
    tasks += [
        loop_actions(
            target, f"127.0.2.{1 + i}", garbage_actions, running, tally, "garbage", seed=300 + i
        )
        for i in range(args.garbage)
    ]
    sampling = asyncio.create_task(sampler())
    log(f"load: {args.good} good, {args.bad} bad, {args.slow} slow, {args.garbage} garbage")
    await asyncio.gather(*tasks)
    load_seconds = time.monotonic() - t0
    log("clients finished; waiting for the server to close every connection")
    left = (-1, -1)
    for _ in range(120):
        left = tcp_connections(server.port)
        if left == (0, 0):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(3.0)
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    final = take_sample(server, t0) if server.alive() else Sample(0, 0, -1, -1, -1)
    samples.append(final)
    check = check_queue(server.db_path, server.spool_dir, tally.acks, integrity=True)
    return judge(args, server, samples, final, baseline_fds, warmup, load_seconds, tally, check)


def judge(
    args: argparse.Namespace,
    server: Submitd,
    samples: list[Sample],
    final: Sample,
    baseline_fds: int,
    warmup: float,
    load_seconds: float,
    tally: Tally,
    check: QueueCheck,
) -> SoakResult:
    violations = list(tally.violations)
    if not server.alive():
        violations.append(f"the server died: {server.tail()}")
    warm = next((s for s in samples if s.t >= warmup), samples[0])
    later = [s for s in samples if s.t >= warm.t]
    peak = max(s.rss_mb for s in later)
    growth = peak - warm.rss_mb
    if growth >= args.rss_limit_mb:
        violations.append(f"RSS grew {growth:.1f} MB after warm-up (limit {args.rss_limit_mb} MB)")
    if abs(final.fds - baseline_fds) > args.fd_slack:
        violations.append(
            f"fd count {final.fds} after clients left, baseline {baseline_fds} "
            f"(allowed ±{args.fd_slack})"
        )
    if final.established or final.close_wait:
        violations.append(
            f"connections left after clients left: {final.established} established, "
            f"{final.close_wait} CLOSE_WAIT"
        )
    for name, items in (
        ("missing", check.missing),
        ("corrupt", check.corrupt),
        ("duplicated", check.duplicates),
        ("queued without acknowledgement", check.unacknowledged),
        ("orphan spool files", check.orphan_files),
    ):
        if items:
            violations.append(f"{len(items)} {name}: {', '.join(items[:5])}")
    if check.integrity != "ok":
        violations.append(f"database quick_check: {check.integrity}")
    good_errors = {k: v for k, v in tally.outcomes.items() if k.startswith("good: ") and v}
    good_errors.pop("good: sessions", None)
    if good_errors:
        violations.append(f"good clients saw errors: {good_errors}")
    if not tally.acks:
        violations.append("no message was accepted")
    steady = [(s.t / 60, s.rss_mb) for s in later[:-1]]
    return SoakResult(
        minutes=args.minutes,
        accepted=len(tally.acks),
        messages_per_s=round(len(tally.acks) / load_seconds, 1),
        baseline_fds=baseline_fds,
        final_fds=final.fds,
        warmup_s=warmup,
        warm_rss_mb=warm.rss_mb,
        peak_rss_after_warmup_mb=peak,
        rss_growth_mb=round(growth, 1),
        final_rss_mb=final.rss_mb,
        rss_slope_mb_per_min=None if (k := slope(steady)) is None else round(k, 2),
        peak_connections=max(s.established for s in samples),
        after_clients_left={"established": final.established, "close_wait": final.close_wait},
        queue={**asdict(check), "summary": check.summary()},
        outcomes=dict(sorted(tally.outcomes.items())),
        samples=[asdict(s) for s in samples],
        violations=violations,
    )


def print_report(result: SoakResult) -> None:
    print(f"soak: {result.minutes:g} min of mixed load")
    print(f"  accepted {result.accepted} messages ({result.messages_per_s} msg/s)")
    print(
        f"  RSS: {result.warm_rss_mb} MB at end of warm-up ({result.warmup_s:g} s), "
        f"peak after it {result.peak_rss_after_warmup_mb} MB (growth {result.rss_growth_mb} "
        f"MB; {1024 * result.rss_growth_mb / max(1, result.accepted):.2f} KB per message), "
        f"after clients left {result.final_rss_mb} MB, slope "
        f"{result.rss_slope_mb_per_min} MB/min"
    )
    print(
        f"  fds: baseline {result.baseline_fds}, after clients left {result.final_fds}; "
        f"peak connections {result.peak_connections}; after clients left "
        f"{result.after_clients_left}"
    )
    print(f"  queue: {result.queue['summary']}")
    print_outcomes("  client outcomes:", result.outcomes, result.violations, "OK: no violation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak submitd under mixed load.")
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="length of the load")
    add("--good", type=int, default=8, help="good clients (concurrent sessions)")
    add("--bad", type=int, default=4, help="clients with wrong passwords")
    add("--slow", type=int, default=4, help="slow clients")
    add("--garbage", type=int, default=4, help="clients sending garbage")
    add("--sample-every", type=float, default=10.0, help="seconds between samples")
    add("--rss-limit-mb", type=float, default=50.0, help="allowed RSS growth after warm-up")
    add("--fd-slack", type=int, default=10, help="allowed fd difference from the baseline")
    add("--no-uvloop", action="store_true", help="run the server on the asyncio loop")
    add_driver_options(parser, "(with every sample)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return main_on_submitd(
        args,
        "soak",
        lambda root: Submitd(root, abuse_config_for_soak(), uvloop=not args.no_uvloop),
        soak,
        print_report,
    )


if __name__ == "__main__":
    sys.exit(main())
