"""A cheap SMTP submission load generator on raw asyncio streams.

Why our own and not aiosmtplib or smtp-source: the client shares two cores with the
server it measures, so every microsecond it spends is taken from the server; a
general-purpose client library spends several times more per command. Postfix's
smtp-source speaks neither STARTTLS nor AUTH, which submission requires.

Each client does what a mail client does on port 587: connect, greeting, EHLO,
STARTTLS, EHLO, AUTH PLAIN with an initial response, then per message MAIL FROM, RCPT
TO, DATA (pipelined in one write when the server offers PIPELINING, RFC 2920), the body
and the final dot; after --messages-per-connection messages it says QUIT and starts
again. Every reply code is checked: anything but 2xx/3xx is counted as an error and
reported with its text.

Every message is unique: a header `X-Bench-Id: <run>-<proc>-<client>-<n>` and a last
body line with the same id. The body is a fixed filler followed by that line, so the
SHA-256 of the body is one `copy()` of a pre-computed hash plus a few bytes: the expected
hash of every accepted message is written (with --accepted-file) at almost no cost, and
the sink can check exactly-once, intact delivery.

Reported: accepted messages per second inside the measuring window (after the warm-up),
latency from MAIL to the final 250 (p50/p90/p99), session set-up time (connect to 235),
errors, and the generator's own CPU time (user+sys of itself and of its forked
workers, by getrusage), so a run where the client was the bottleneck shows as such.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import ssl
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evloop

LINE_CHARS = string.ascii_letters + string.digits + " "
SMALL_BODY = 64 * 1024  # up to this size a message is sent with one write


@dataclass(frozen=True)
class Options:
    """Everything a worker process needs, fixed for the run."""

    host: str
    port: int
    user: str
    password: str
    mail_from: str
    rcpt: str
    clients: int
    per_connection: int
    size: int
    duration: float
    warmup: float
    processes: int
    cafile: str | None
    insecure: bool
    tls_name: str | None
    run_id: str
    timeout: float
    pipelining: bool
    uvloop: bool


@dataclass(frozen=True)
class Timeline:
    """Monotonic instants shared by all workers (CLOCK_MONOTONIC is system-wide)."""

    start: float
    measure: float
    end: float


class Payload:
    """Builds each message from a fixed filler; knows each body's SHA-256 cheaply."""

    def __init__(self, opts: Options) -> None:
        date = email.utils.formatdate(localtime=True)
        self.head = (
            f"From: <{opts.mail_from}>\r\nTo: <{opts.rcpt}>\r\n"
            f"Subject: submitd benchmark\r\nDate: {date}\r\n"
            "Message-ID: <{id}@loadgen.bench.test>\r\nX-Bench-Id: {id}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        sample_id = f"{opts.run_id}-0-0-0"
        overhead = len(self.head.replace("{id}", sample_id)) + len(self.tail(sample_id))
        self.filler = make_filler(max(0, opts.size - overhead))
        self.filler_hash = hashlib.sha256(self.filler)
        self.small = opts.size <= SMALL_BODY

    @staticmethod
    def tail(bench_id: str) -> bytes:
        """The body's last line: it makes every body (and so its hash) unique."""
        return f"bench-id: {bench_id}\r\n".encode()

    def message(self, bench_id: str) -> tuple[list[bytes], str]:
        """(byte chunks to write after 354, ending with the dot; body SHA-256 hex)."""
        tail = self.tail(bench_id)
        digest = self.filler_hash.copy()
        digest.update(tail)
        head = self.head.replace("{id}", bench_id).encode()
        if self.small:
            return [head + self.filler + tail + b".\r\n"], digest.hexdigest()
        return [head, self.filler, tail + b".\r\n"], digest.hexdigest()


def make_filler(size: int) -> bytes:
    """About `size` bytes (whole lines, rounded down) of 78-character text lines; no line
    starts with a dot, so nothing is dot-stuffed and the sink sees exactly these bytes."""
    rng = random.Random(size)
    lines = max(1, size // 80)
    return b"".join(
        ("".join(rng.choices(LINE_CHARS, k=77)) + "x\r\n").encode() for _ in range(lines)
    )


@dataclass
class Stats:
    """What one worker process observed; merged across processes by the parent."""

    accepted: list[str] = field(default_factory=list)  # "id sha256" lines
    in_window: int = 0
    latencies: list[float] = field(default_factory=list)  # MAIL -> final 250, in window
    setups: list[float] = field(default_factory=list)  # connect -> 235, in window
    errors: Counter[str] = field(default_factory=Counter)
    connections: int = 0

    def merge(self, other: Stats) -> None:
        self.accepted += other.accepted
        self.in_window += other.in_window
        self.latencies += other.latencies
        self.setups += other.setups
        self.errors.update(other.errors)
        self.connections += other.connections


class ReplyError(Exception):
    """A reply with an unexpected code; the session cannot go on as planned."""


class Session:
    """One SMTP connection: reads replies and keeps note of the current stage so that
    an exception can be reported with the command it interrupted."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.stage = "greeting"
        self.extensions: set[str] = set()
        self.last_code = 0

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply as (code, text)."""
        lines = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError("connection closed by server")
            lines.append(line)
            if line[3:4] != b"-":
                break
        try:
            code = int(line[:3])
        except ValueError:
            raise ReplyError(f"{self.stage}: garbled reply {line[:60]!r}") from None
        return code, b"".join(lines).decode("utf-8", "replace")

    async def expect(self, stage: str, wanted: int) -> str:
        """Read a reply that must have code `wanted`; ReplyError otherwise."""
        self.stage = stage
        code, text = await self.reply()
        self.last_code = code
        if code != wanted:
            raise ReplyError(f"{stage}: {code} {first_line(text)}")
        return text

    async def ehlo(self) -> None:
        self.writer.write(b"EHLO loadgen.bench.test\r\n")
        text = await self.expect("EHLO", 250)
        self.extensions = {line[4:].split(" ")[0].strip().upper() for line in text.splitlines()}

    def close(self) -> None:
        self.writer.transport.abort()


def first_line(text: str) -> str:
    return text.splitlines()[0][4:84] if text else ""


def ssl_context(opts: Options) -> ssl.SSLContext:
    """Verifying context (with --cafile for a self-signed server) or, with
    --insecure, one that accepts any certificate."""
    context = ssl.create_default_context(cafile=opts.cafile)
    if opts.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def open_session(opts: Options, context: ssl.SSLContext) -> Session:
    """Connect and get as far as a successful AUTH. A failure closes the connection
    (a leaked one would hold a server process until its timeout) and names its stage."""
    reader, writer = await asyncio.open_connection(opts.host, opts.port)
    session = Session(reader, writer)
    try:
        await login(session, opts, context)
    except (OSError, asyncio.IncompleteReadError) as err:
        session.close()
        raise ReplyError(f"{session.stage}: {type(err).__name__} {err}") from err
    except BaseException:
        session.close()
        raise
    return session


async def login(session: Session, opts: Options, context: ssl.SSLContext) -> None:
    """Greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN with an initial response."""
    writer = session.writer
    await session.expect("greeting", 220)
    await session.ehlo()
    session.stage = "STARTTLS"
    writer.write(b"STARTTLS\r\n")
    await session.expect("STARTTLS", 220)
    await writer.start_tls(context, server_hostname=opts.tls_name or opts.host)
    await session.ehlo()
    token = base64.b64encode(f"\0{opts.user}\0{opts.password}".encode()).decode()
    writer.write(f"AUTH PLAIN {token}\r\n".encode())
    await session.expect("AUTH", 235)


async def send_envelope(session: Session, opts: Options, size: int) -> None:
    """MAIL, RCPT, DATA: one write when pipelining, else one round trip each."""
    size_param = f" SIZE={size}" if "SIZE" in session.extensions else ""
    commands = [
        ("MAIL", f"MAIL FROM:<{opts.mail_from}>{size_param}\r\n".encode(), 250),
        ("RCPT", f"RCPT TO:<{opts.rcpt}>\r\n".encode(), 250),
        ("DATA", b"DATA\r\n", 354),
    ]
    if opts.pipelining and "PIPELINING" in session.extensions:
        session.writer.write(b"".join(line for _, line, _ in commands))
        failure = None
        for stage, _, wanted in commands:  # read every reply even after a failure
            try:
                await session.expect(stage, wanted)
            except ReplyError as error:
                failure = failure or error
        if failure and session.last_code == 354:  # DATA went through: end it empty
            session.writer.write(b".\r\n")
            await session.reply()
        if failure:
            raise failure
        return
    for stage, line, wanted in commands:
        session.writer.write(line)
        await session.expect(stage, wanted)


async def send_message(
    session: Session, opts: Options, payload: Payload, bench_id: str
) -> tuple[str, float]:
    """One transaction; returns (body sha256, seconds from MAIL to the final 250)."""
    chunks, sha = payload.message(bench_id)
    started = time.monotonic()
    try:
        await send_envelope(session, opts, sum(map(len, chunks)))
    except ReplyError:
        session.writer.write(b"RSET\r\n")
        await session.expect("RSET", 250)
        raise
    for chunk in chunks:
        session.writer.write(chunk)
        await session.writer.drain()
    await session.expect("end of data", 250)
    return sha, time.monotonic() - started


async def quit_session(session: Session) -> None:
    session.writer.write(b"QUIT\r\n")
    await session.expect("QUIT", 221)
    session.close()


class Client:
    """One simulated mail client: sessions of up to M messages until the end."""

    def __init__(
        self, opts: Options, payload: Payload, timeline: Timeline, stats: Stats, name: str
    ) -> None:
        self.opts = opts
        self.payload = payload
        self.timeline = timeline
        self.stats = stats
        self.name = name
        self.sequence = 0
        self.context = ssl_context(opts)

    def in_window(self, instant: float) -> bool:
        return self.timeline.measure <= instant < self.timeline.end

    async def run(self) -> None:
        while time.monotonic() < self.timeline.end:
            try:
                async with asyncio.timeout(self.opts.timeout):
                    session = await self._open()
            except (OSError, ReplyError, TimeoutError, asyncio.IncompleteReadError) as err:
                self._error("connect", err)
                await asyncio.sleep(0.2)  # no hot loop against a server that is down
                continue
            await self._transactions(session)

    async def _open(self) -> Session:
        started = time.monotonic()
        session = await open_session(self.opts, self.context)
        self.stats.connections += 1
        if self.in_window(started):
            self.stats.setups.append(time.monotonic() - started)
        return session

    async def _transactions(self, session: Session) -> None:
        try:
            for _ in range(self.opts.per_connection):
                if time.monotonic() >= self.timeline.end:
                    break
                await self._one(session)
            async with asyncio.timeout(self.opts.timeout):
                await quit_session(session)
        except (OSError, ReplyError, TimeoutError, asyncio.IncompleteReadError) as err:
            self._error(session.stage, err)
            session.close()

    async def _one(self, session: Session) -> None:
        bench_id = f"{self.name}-{self.sequence}"
        self.sequence += 1
        try:
            async with asyncio.timeout(self.opts.timeout):
                sha, latency = await send_message(session, self.opts, self.payload, bench_id)
        except ReplyError as err:
            self._error(session.stage, err)
            return
        self.stats.accepted.append(f"{bench_id} {sha}")
        if self.in_window(time.monotonic()):
            self.stats.in_window += 1
            self.stats.latencies.append(latency)

    def _error(self, stage: str, err: BaseException) -> None:
        text = str(err) if isinstance(err, ReplyError) else f"{stage}: {type(err).__name__} {err}"
        self.stats.errors[text[:120]] += 1


async def run_worker(opts: Options, timeline: Timeline, proc: int, clients: int) -> Stats:
    """All clients of one process, started together at the shared start instant."""
    payload = Payload(opts)
    stats = Stats()
    await asyncio.sleep(max(0.0, timeline.start - time.monotonic()))
    names = [f"{opts.run_id}-{proc}-{i}" for i in range(clients)]
    await asyncio.gather(*(Client(opts, payload, timeline, stats, n).run() for n in names))
    return stats


def worker_main(
    opts: Options,
    timeline: Timeline,
    proc: int,
    clients: int,
    conn: multiprocessing.connection.Connection,
) -> None:
    """Entry point of a forked worker: run, then send the Stats back."""
    conn.send(evloop.run(run_worker(opts, timeline, proc, clients), opts.uvloop))
    conn.close()


def clients_per_process(clients: int, processes: int) -> list[int]:
    """Spread the clients over the processes as evenly as possible."""
    return [clients // processes + (i < clients % processes) for i in range(processes)]


def run_processes(opts: Options, timeline: Timeline) -> Stats:
    """Fork workers (or run in-process for one) and merge what they saw."""
    shares = [n for n in clients_per_process(opts.clients, opts.processes) if n]
    if len(shares) == 1:
        return evloop.run(run_worker(opts, timeline, 0, shares[0]), opts.uvloop)
    context = multiprocessing.get_context("fork")
    workers = []
    for proc, share in enumerate(shares):
        parent_end, child_end = context.Pipe(duplex=False)
        process = context.Process(target=worker_main, args=(opts, timeline, proc, share, child_end))
        process.start()
        workers.append((process, parent_end))
    total = Stats()
    for process, parent_end in workers:
        total.merge(parent_end.recv())
        process.join()
    return total


def cpu_seconds() -> float:
    """user+sys of this process and of its reaped children (the forked workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[rank]


def latency_summary(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds."""
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        value = percentile(ordered, fraction)
        result[name] = None if value is None else round(value * 1000, 2)
    return result


def run(opts: Options) -> dict[str, Any]:
    """Run the whole load and return the report (also what --json prints)."""
    cpu_before = cpu_seconds()
    wall_before = time.monotonic()
    start = wall_before + 0.3  # time for the workers to fork and build their payload
    timeline = Timeline(start, start + opts.warmup, start + opts.warmup + opts.duration)
    stats = run_processes(opts, timeline)
    wall = time.monotonic() - wall_before
    cpu = cpu_seconds() - cpu_before
    accepted = len(stats.accepted)
    return {
        "run_id": opts.run_id,
        "server": f"{opts.host}:{opts.port}",
        "clients": opts.clients,
        "processes": opts.processes,
        "messages_per_connection": opts.per_connection,
        "size": opts.size,
        "warmup_s": opts.warmup,
        "duration_s": opts.duration,
        "accepted_total": accepted,
        "accepted_in_window": stats.in_window,
        "msgs_per_s": round(stats.in_window / opts.duration, 2),
        "latency_ms": latency_summary(stats.latencies),
        "session_setup_ms": latency_summary(stats.setups),
        "connections": stats.connections,
        "errors_total": sum(stats.errors.values()),
        "errors": dict(stats.errors.most_common(20)),
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_ms_per_msg": round(1000 * cpu / accepted, 3) if accepted else None,
        "loadgen_cpu_utilization": round(cpu / wall, 3),
        "wall_s": round(wall, 3),
        "_accepted": stats.accepted,
    }


def print_human(report: dict[str, Any]) -> None:
    lat, setup = report["latency_ms"], report["session_setup_ms"]
    print(f"run {report['run_id']} against {report['server']}")
    print(
        f"  accepted {report['accepted_in_window']} in {report['duration_s']} s "
        f"= {report['msgs_per_s']} msg/s (total incl. warm-up {report['accepted_total']})"
    )
    print(f"  MAIL->250 ms  p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}")
    print(f"  setup ms      p50 {setup['p50']}  p99 {setup['p99']}")
    print(
        f"  loadgen CPU {report['loadgen_cpu_s']} s "
        f"({report['loadgen_cpu_utilization']:.0%} of one core, "
        f"{report['loadgen_cpu_ms_per_msg']} ms/msg)"
    )
    print(f"  errors {report['errors_total']}")
    for text, count in report["errors"].items():
        print(f"    {count:6d}  {text}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SMTP submission load generator.")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=587)
    add("--user", default="bench@example.test")
    add("--password", default="bench-password")
    add("--mail-from", help="envelope sender (default: --user)")
    add("--rcpt", default="sink@example.net", help="envelope recipient")
    add("--clients", type=int, default=8, help="concurrent connections in total")
    add("--messages-per-connection", type=int, default=1, metavar="M")
    add("--size", type=int, default=4096, help="message size in bytes")
    add("--duration", type=float, default=20.0, help="measured seconds")
    add("--warmup", type=float, default=2.0, help="seconds before measuring")
    add("--processes", type=int, default=1, help="worker processes (clients split)")
    add("--cafile", help="CA/self-signed certificate to verify the server with")
    add("--insecure", action="store_true", help="do not verify the certificate")
    add("--tls-name", help="name to verify in the certificate (default: --host)")
    add("--run-id", help="id prefix of this run (default: random)")
    add("--timeout", type=float, default=60.0, help="seconds per transaction")
    add("--no-pipelining", action="store_true", help="one round trip per command")
    add("--no-uvloop", action="store_true", help="use the default event loop")
    add("--accepted-file", type=Path, help="write 'id sha256' of each accepted message")
    add("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        host=args.host,
        port=args.port,
        user=args.user,
        password=args.password,
        mail_from=args.mail_from or args.user,
        rcpt=args.rcpt,
        clients=max(1, args.clients),
        per_connection=max(1, args.messages_per_connection),
        size=args.size,
        duration=args.duration,
        warmup=args.warmup,
        processes=max(1, min(args.processes, args.clients)),
        cafile=args.cafile,
        insecure=args.insecure,
        tls_name=args.tls_name,
        run_id=args.run_id or os.urandom(4).hex(),
        timeout=args.timeout,
        pipelining=not args.no_pipelining,
        uvloop=not args.no_uvloop,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(options_from(args))
    accepted = report.pop("_accepted")
    if args.accepted_file:
        args.accepted_file.write_text("".join(line + "\n" for line in accepted))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_human(report)
    return 0 if report["accepted_total"] else 1


if __name__ == "__main__":
    sys.exit(main())
