"""The receiving end of the benchmark: an SMTP sink that accepts everything.

The servers under test relay every accepted message here, so the sink is how the
harness knows (1) when a server has drained its queue and (2) that each accepted message
arrived exactly once and intact. For each message it appends one line to a records file:

    <X-Bench-Id or -> <sha256 of the body after the first blank line> <size>

The body is hashed, not the whole message, because relays add header fields (Received,
Message-ID...) but must not change the body. Duplicates and losses are then found by
`check` against the load generator's list of accepted ids with their expected hashes.

It runs on the same two cores as the servers, so it is written to be cheap: a plain
asyncio.Protocol (no streams, no per-line coroutine), uvloop when installed, pipelined
commands answered in one write, the DATA terminator searched once per received chunk, no
TLS and no AUTH. The records file is flushed after every message (a write(2), no fsync)
so the harness can follow it while the servers drain.

    python bench/sink.py serve --port 2525 --records /tmp/sink.records
    python bench/sink.py check --records /tmp/sink.records --accepted run.accepted
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, cast

import evloop

MAX_COMMAND_LINE = 4096
BENCH_ID = re.compile(rb"(?im)^X-Bench-Id:[ \t]*(\S+)")
EHLO_REPLY = (
    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-SIZE 1073741824\r\n250 ENHANCEDSTATUSCODES\r\n"
)
REPLIES = {
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"HELO": b"250 sink.bench.test\r\n",
    b"EHLO": EHLO_REPLY,
    b"VRFY": b"252 2.0.0 Send some mail\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}


def digest_message(message: bytes) -> tuple[str, str]:
    """(bench id, sha256 of the body) of one message as received after DATA,
    dot-stuffed, ending with the CRLF before the terminating dot."""
    if message.startswith(b".."):
        message = message[1:]
    message = message.replace(b"\r\n..", b"\r\n.")
    split = message.find(b"\r\n\r\n")
    header, body = (message, b"") if split < 0 else (message[:split], message[split + 4 :])
    found = BENCH_ID.search(header)
    bench_id = found.group(1).decode("ascii", "replace") if found else "-"
    return bench_id, hashlib.sha256(body).hexdigest()


class Recorder:
    """Appends one line per received message to the records file."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        self.count = 0

    def record(self, message: bytes) -> None:
        bench_id, sha = digest_message(message)
        self.handle.write(f"{bench_id} {sha} {len(message)}\n")
        self.handle.flush()
        self.count += 1


class SinkProtocol(asyncio.Protocol):
    """One SMTP session: commands are answered from a table, DATA is recorded."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.buffer = bytearray()
        self.in_data = False
        self.search_from = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(b"220 sink.bench.test ESMTP sink\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[bytes] = []
        closing = False
        while not closing:
            step = self._take_message() if self.in_data else self._take_command()
            if step is None:
                break
            replies.append(step)
            closing = step.startswith((b"221", b"500 5.5.2"))
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))
            if closing:
                self.transport.close()

    def _take_message(self) -> bytes | None:
        """The reply for a complete message in the buffer, or None if incomplete."""
        if self.search_from == 0 and self.buffer.startswith(b".\r\n"):
            end, message = 0, b""
            del self.buffer[:3]
        else:
            end = self.buffer.find(b"\r\n.\r\n", self.search_from)
            if end < 0:
                self.search_from = max(0, len(self.buffer) - 4)
                return None
            message = bytes(self.buffer[: end + 2])
            del self.buffer[: end + 5]
        self.in_data = False
        self.search_from = 0
        self.recorder.record(message)
        return b"250 2.0.0 Ok: queued\r\n"

    def _take_command(self) -> bytes | None:
        """The reply for the next complete command line, or None if there is none."""
        newline = self.buffer.find(b"\n")
        if newline < 0:
            if len(self.buffer) > MAX_COMMAND_LINE:
                return b"500 5.5.2 Line too long\r\n"
            return None
        verb = bytes(self.buffer[:4]).upper()
        del self.buffer[: newline + 1]
        if verb == b"DATA":
            self.in_data = True
        return REPLIES.get(verb, b"502 5.5.1 Command not implemented\r\n")


async def serve(host: str, port: int, records: Path) -> None:
    """Run the sink until SIGTERM or SIGINT; print one ready line for the harness."""
    loop = asyncio.get_running_loop()
    with records.open("a", encoding="ascii") as handle:
        recorder = Recorder(handle)
        server = await loop.create_server(
            lambda: SinkProtocol(recorder), host, port, reuse_address=True, backlog=512
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"sink listening on {host}:{port}", flush=True)
        await stop.wait()
        server.close()
        print(f"sink received {recorder.count} messages", flush=True)


@dataclass
class CheckResult:
    """Exactly-once verdict for one run: ok only if nothing is missing, duplicated,
    corrupted or unexpected."""

    accepted: int = 0
    received: int = 0
    missing: int = 0
    duplicates: int = 0
    corrupt: int = 0
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.accepted == self.received and not (
            self.missing or self.duplicates or self.corrupt or self.unexpected
        )

    def summary(self) -> str:
        if self.ok:
            return f"ok ({self.received})"
        parts = [
            f"{name} {value}"
            for name in ("missing", "duplicates", "corrupt", "unexpected")
            if (value := getattr(self, name))
        ]
        return "FAIL: " + ", ".join(parts)


def read_pairs(path: Path, prefix: str = "") -> list[tuple[str, str]]:
    """(id, sha) pairs of a records or accepted file, keeping ids with `prefix`."""
    pairs = []
    with path.open(encoding="ascii") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 2 and fields[0].startswith(prefix):
                pairs.append((fields[0], fields[1]))
    return pairs


def check(received: list[tuple[str, str]], accepted: list[tuple[str, str]]) -> CheckResult:
    """Compare what the sink got with what the load generator saw accepted."""
    expected = dict(accepted)
    counts = Counter(bench_id for bench_id, _ in received)
    result = CheckResult(accepted=len(expected), received=len(received))
    for bench_id, sha in received:
        if bench_id not in expected:
            result.unexpected += 1
            _example(result, f"unexpected {bench_id}")
        elif expected[bench_id] != sha:
            result.corrupt += 1
            _example(result, f"corrupt {bench_id}")
    result.duplicates = sum(n - 1 for n in counts.values() if n > 1)
    for bench_id in expected:
        if bench_id not in counts:
            result.missing += 1
            _example(result, f"missing {bench_id}")
    return result


def _example(result: CheckResult, text: str, limit: int = 10) -> None:
    if len(result.examples) < limit:
        result.examples.append(text)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="accept mail and record it")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=2525)
    run.add_argument("--records", type=Path, required=True)
    run.add_argument("--no-uvloop", action="store_true", help="use the default event loop")
    verify = commands.add_parser("check", help="exactly-once check of a run")
    verify.add_argument("--records", type=Path, required=True)
    verify.add_argument("--accepted", type=Path, required=True, help="loadgen --accepted-file")
    verify.add_argument("--prefix", default="", help="only ids starting with this (a run id)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "check":
        result = check(read_pairs(args.records, args.prefix), read_pairs(args.accepted))
        print(json.dumps({**asdict(result), "ok": result.ok}, indent=2))
        return 0 if result.ok else 1
    evloop.run(serve(args.host, args.port, args.records), use_uvloop=not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
