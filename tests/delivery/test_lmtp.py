"""The LMTP route (RFC 2033): against a real Dovecot, and against a scripted LMTP peer.

Dovecot shows that what we send is what a real mailbox server takes, stores and answers
(two users and an unknown one, the Maildir files compared byte for byte, a per-recipient
452 from a full mailbox). The scripted peer covers what Dovecot will not do on request:
a 4xx and a 5xx after DATA in one transaction, no PIPELINING, a connection lost between
per-recipient replies, SMTPUTF8, BINARYMIME, a server that never greets.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from submitd.delivery.content import DotStuffer, dot_stuff
from submitd.delivery.lmtp import LmtpRoute, LmtpSettings
from submitd.delivery.types import Job, Outcome, Status
from submitd.envelope import Envelope, Recipient
from tests.delivery.dovecot_fixture import (  # noqa: F401 (dovecot_fixture: the fixture)
    SMALL_QUOTA,
    Dovecot,
    dovecot_fixture,
    free_port,
)
from tests.delivery.test_smtp_client import Stored

SENDER = "sender@example.net"


def make_job(
    recipients: list[str],
    message: bytes,
    *,
    body: str = "7BIT",
    smtputf8: bool = False,
    sender: str = SENDER,
    piece: int = 8192,
) -> Job:
    rcpts = tuple(Recipient(address) for address in recipients)
    envelope = Envelope(sender=sender, recipients=list(rcpts), body=body, smtputf8=smtputf8)
    return Job("Q1", envelope, rcpts, Stored(message, piece))


def deliver(settings: LmtpSettings, job: Job) -> list[Outcome]:
    async def go() -> list[Outcome]:
        route = LmtpRoute(settings)
        try:
            return await route.deliver(job)
        finally:
            await route.close()

    return asyncio.run(go())


def unstuff(wire: bytes) -> bytes:
    """What a server makes of DATA: the terminator off, one leading dot off each line."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[: -len(b".\r\n")]
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


# A message with everything dot-stuffing must get right: a first line that begins with a
# dot, a line that is only a dot (the terminator, were it not stuffed), two dots, and
# 8-bit text (BODY=8BITMIME).
MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: alice@example.org, bob@example.org\r\n"
    b"Subject: dots\r\n"
    b"Message-ID: <dots.1@example.net>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".starts with a dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x80\x94 8-bit\r\n"
    b". \r\n"
    b"end\r\n"
)


# --- dot-stuffing -------------------------------------------------------------------


def test_dot_stuff_examples() -> None:
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"
    assert dot_stuff(b"a") == b"a\r\n.\r\n"  # the dot needs a line of its own
    assert dot_stuff(b".\r\n") == b"..\r\n.\r\n"  # the first line too
    assert dot_stuff(b"a\r\n.\r\n.b\r\n") == b"a\r\n..\r\n..b\r\n.\r\n"
    assert dot_stuff(b"a.\r\nb.c\r\n") == b"a.\r\nb.c\r\n.\r\n"  # only line starts


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_dot_stuffer_across_piece_boundaries(cut: int) -> None:
    """CR | LF. and CRLF | . split between pieces are stuffed like CRLF. in one piece."""
    data = b"x\r\n.y\r\n.\r\n"
    stuffer = DotStuffer()
    pieces = [data[i : i + cut] for i in range(0, len(data), cut)]
    wire = b"".join(stuffer.feed(piece) for piece in pieces) + stuffer.finish()
    assert wire == dot_stuff(data) == b"x\r\n..y\r\n..\r\n.\r\n"


_lines = st.lists(
    st.sampled_from([b"", b".", b"..", b".a", b"a.", b"a", b"\xc3\xa9.", b" ."]), max_size=12
)


@given(_lines, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=8))
def test_dot_stuffer_any_pieces(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer()
    wire, start, turn = b"", 0, 0
    while start < len(data):
        size = cuts[turn % len(cuts)]
        wire += stuffer.feed(data[start : start + size])
        start, turn = start + size, turn + 1
    wire += stuffer.finish()
    assert wire == dot_stuff(data)
    assert unstuff(wire) == data
    # No line of the payload but the last is a lone dot: the server cannot stop early.
    assert wire.split(b"\r\n").count(b".") == 1


# --- a scripted LMTP peer -----------------------------------------------------------


@dataclass
class Peer:
    """A small LMTP server that answers from a script and records what it was sent.

    `rcpt` and `after_data` map an address to its reply (default: 250); `strict_pipelining`
    holds back the replies to MAIL and RCPT until DATA arrives, which a client that waits
    for each reply (no pipelining) would never get past.
    """

    extensions: list[str] = field(
        default_factory=lambda: ["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"]
    )
    greeting: bytes | None = b"220 peer LMTP ready\r\n"
    mail: bytes = b"250 2.1.0 OK\r\n"
    rcpt: dict[str, bytes] = field(default_factory=dict)
    after_data: dict[str, bytes] = field(default_factory=dict)
    strict_pipelining: bool = False
    hang_up_after_replies: int | None = None  # close after this many per-RCPT replies
    data_without_recipients: bytes = b"503 5.5.1 No valid recipients\r\n"
    commands: list[str] = field(default_factory=list)
    wire: list[bytes] = field(default_factory=list)  # DATA payloads / BDAT chunks as sent
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._session(reader, writer)
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.greeting is None:
            await asyncio.sleep(3600)  # never greets
            return
        writer.write(self.greeting)
        accepted: list[str] = []
        held: list[bytes] = []
        while line := await reader.readline():
            command = line.decode().rstrip("\r\n")
            self.commands.append(command)
            verb = re.split(r"[ :]", command, maxsplit=1)[0].upper()
            address = command[command.find("<") + 1 : command.find(">")]
            reply: bytes
            if verb == "LHLO":
                lines = ["peer.test", *self.extensions]
                reply = "".join(
                    f"250{' ' if i == len(lines) - 1 else '-'}{text}\r\n"
                    for i, text in enumerate(lines)
                ).encode()
            elif verb == "MAIL":
                reply = self.mail
            elif verb == "RCPT":
                reply = self.rcpt.get(address, b"250 2.1.5 OK\r\n")
                if self.mail.startswith(b"2") and reply.startswith(b"2"):
                    accepted.append(address)
                elif not self.mail.startswith(b"2"):
                    reply = b"503 5.5.1 MAIL first\r\n"
            elif verb in ("DATA", "BDAT"):
                writer.write(b"".join(held))
                held.clear()
                if not accepted:
                    writer.write(self.data_without_recipients)
                    if not self.data_without_recipients.startswith(b"354"):
                        continue
                if verb == "DATA":
                    if accepted:
                        writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    payload = b""
                    while not (payload == b".\r\n" or payload.endswith(b"\r\n.\r\n")):
                        payload += await reader.readuntil(b"\r\n")
                else:
                    payload = await reader.readexactly(int(command.split()[1]))
                self.wire.append(payload)
                for count, rcpt in enumerate(accepted):
                    if count == self.hang_up_after_replies:
                        await writer.drain()
                        return
                    default = f"250 2.0.0 <{rcpt}> saved\r\n".encode()
                    writer.write(self.after_data.get(rcpt, default))
                accepted.clear()
                await writer.drain()
                continue
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                reply = b"500 5.5.2 what?\r\n"
            if self.strict_pipelining and verb in ("MAIL", "RCPT"):
                held.append(reply)
            else:
                writer.write(reply)
                await writer.drain()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for Unix sockets: pytest's tmp_path can exceed the 108-byte limit."""
    with tempfile.TemporaryDirectory(prefix="lmtp-") as name:
        yield Path(name)


def run_with_peer(
    peer: Peer, job: Job, *, unix: Path | None = None, timeout: float = 10.0
) -> tuple[list[Outcome], LmtpSettings]:
    """Starts the peer on a Unix socket (when `unix` is given) or a loopback port, and
    delivers the job to it with an LmtpRoute."""

    async def go() -> tuple[list[Outcome], LmtpSettings]:
        server: asyncio.base_events.Server
        if unix is not None:
            server = await asyncio.start_unix_server(peer.handle, path=unix)
            settings = LmtpSettings(socket=unix, timeout=timeout)
        else:
            server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            settings = LmtpSettings(host="127.0.0.1", port=port, timeout=timeout)
        async with server:
            route = LmtpRoute(settings)
            outcomes = await route.deliver(job)
            await route.close()
        return outcomes, settings

    return asyncio.run(go())


def statuses(outcomes: list[Outcome]) -> list[tuple[str, Status, str]]:
    return [(o.recipient.address, o.status, o.enhanced) for o in outcomes]


def test_per_recipient_replies_after_data_mixed(short_dir: Path) -> None:
    """RFC 2033 4.2: one reply per accepted RCPT, in RCPT order; a 250, a 452 and a 550
    after the same DATA, and a recipient refused at RCPT that gets no reply after it."""
    peer = Peer(
        rcpt={"gone@example.org": b"550 5.1.1 <gone@example.org> no such user\r\n"},
        after_data={
            "full@example.org": b"452 4.2.2 <full@example.org> mailbox full\r\n",
            "bad@example.org": b"550 5.6.0 <bad@example.org> content refused\r\n",
        },
    )
    names = ["ok@example.org", "full@example.org", "gone@example.org", "bad@example.org"]
    outcomes, _ = run_with_peer(peer, make_job(names, MESSAGE), unix=short_dir / "s")
    assert statuses(outcomes) == [
        ("ok@example.org", Status.DELIVERED, "2.0.0"),
        ("full@example.org", Status.DEFERRED, "4.2.2"),
        ("gone@example.org", Status.FAILED, "5.1.1"),
        ("bad@example.org", Status.FAILED, "5.6.0"),
    ]
    assert outcomes[0].reply == "250 2.0.0 <ok@example.org> saved"
    assert outcomes[1].reply == "452 4.2.2 <full@example.org> mailbox full"
    assert outcomes[2].reply == "550 5.1.1 <gone@example.org> no such user"
    assert all(o.remote_mta == f"lmtp:{short_dir / 's'}" for o in outcomes)
    assert all(not o.dsn_relayed for o in outcomes)
    assert peer.commands[0] == "LHLO localhost"
    assert peer.commands[1] == f"MAIL FROM:<{SENDER}>"
    assert peer.commands[2:7] == [*(f"RCPT TO:<{n}>" for n in names), "DATA"]
    assert peer.commands[-1] == "QUIT"
    assert peer.wire == [dot_stuff(MESSAGE)]


def test_tcp_connection() -> None:
    peer = Peer()
    outcomes, settings = run_with_peer(
        peer, make_job(["a@example.org"], b"Subject: x\r\n\r\nhi\r\n")
    )
    assert statuses(outcomes) == [("a@example.org", Status.DELIVERED, "2.0.0")]
    assert outcomes[0].remote_mta == f"lmtp:127.0.0.1:{settings.port}"
    assert peer.wire == [b"Subject: x\r\n\r\nhi\r\n.\r\n"]


def test_commands_are_pipelined_when_offered() -> None:
    """The peer holds every MAIL and RCPT reply until DATA: only a pipelining client gets
    through (RFC 2920 3.1)."""
    peer = Peer(strict_pipelining=True, rcpt={"x@example.org": b"550 5.1.1 unknown\r\n"})
    job = make_job(["a@example.org", "x@example.org", "b@example.org"], MESSAGE)
    outcomes, _ = run_with_peer(peer, job, timeout=5.0)
    assert [o.status for o in outcomes] == [Status.DELIVERED, Status.FAILED, Status.DELIVERED]


def test_lockstep_without_pipelining() -> None:
    peer = Peer(extensions=["ENHANCEDSTATUSCODES", "8BITMIME"])
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org", "b@example.org"], MESSAGE))
    assert [o.status for o in outcomes] == [Status.DELIVERED, Status.DELIVERED]
    assert peer.wire == [dot_stuff(MESSAGE)]


@pytest.mark.parametrize("piece", [1, 2, 5, 64])
def test_dot_lines_on_the_wire(piece: int) -> None:
    """However the stored message is cut into pieces, the wire carries the same stuffed
    payload, and the peer gets the message back exactly."""
    peer = Peer()
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], MESSAGE, piece=piece))
    assert outcomes[0].status is Status.DELIVERED
    assert peer.wire == [dot_stuff(MESSAGE)]
    assert unstuff(peer.wire[0]) == MESSAGE


def test_message_without_final_crlf() -> None:
    peer = Peer()
    run_with_peer(peer, make_job(["a@example.org"], b"Subject: x\r\n\r\nno newline"))
    assert peer.wire == [b"Subject: x\r\n\r\nno newline\r\n.\r\n"]


def test_8bitmime_when_offered() -> None:
    peer = Peer()
    run_with_peer(peer, make_job(["a@example.org"], MESSAGE, body="8BITMIME"))
    assert peer.commands[1] == f"MAIL FROM:<{SENDER}> BODY=8BITMIME"
    assert unstuff(peer.wire[0]) == MESSAGE


def test_8bit_without_8bitmime_is_sent_without_the_parameter() -> None:
    peer = Peer(extensions=["PIPELINING", "ENHANCEDSTATUSCODES"])
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], MESSAGE, body="8BITMIME"))
    assert outcomes[0].status is Status.DELIVERED
    assert peer.commands[1] == f"MAIL FROM:<{SENDER}>"


def test_smtputf8_needed_but_not_offered() -> None:
    peer = Peer()
    job = make_job(["jörg@example.org"], MESSAGE, smtputf8=True)
    outcomes, _ = run_with_peer(peer, job)
    assert statuses(outcomes) == [("jörg@example.org", Status.FAILED, "5.6.7")]
    assert "SMTPUTF8" in outcomes[0].reply
    assert not any(c.startswith("MAIL") for c in peer.commands)
    assert peer.commands[-1] == "QUIT"


def test_smtputf8_when_offered() -> None:
    peer = Peer(extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"])
    job = make_job(["jörg@example.org"], MESSAGE, smtputf8=True, body="8BITMIME")
    outcomes, _ = run_with_peer(peer, job)
    assert outcomes[0].status is Status.DELIVERED
    assert peer.commands[1] == f"MAIL FROM:<{SENDER}> BODY=8BITMIME SMTPUTF8"
    assert peer.commands[2] == "RCPT TO:<jörg@example.org>"


def test_binarymime_goes_by_bdat() -> None:
    binary = b"Subject: bin\r\n\r\n\x00\r.\n.\r\n.\r\n"  # bare CR and LF, NUL, dot lines
    peer = Peer(extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING", "BINARYMIME"])
    job = make_job(["a@example.org", "b@example.org"], binary, body="BINARYMIME", piece=3)
    outcomes, _ = run_with_peer(peer, job)
    assert [o.status for o in outcomes] == [Status.DELIVERED, Status.DELIVERED]
    assert peer.commands[1] == f"MAIL FROM:<{SENDER}> BODY=BINARYMIME"
    assert f"BDAT {len(binary)} LAST" in peer.commands
    assert peer.wire == [binary]  # as it is: no stuffing, no terminator


def test_binarymime_without_the_extensions_fails() -> None:
    peer = Peer(extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "CHUNKING"])
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], b"x\r\n", body="BINARYMIME"))
    assert statuses(outcomes) == [("a@example.org", Status.FAILED, "5.6.3")]


def test_size_announced_and_enforced() -> None:
    peer = Peer(extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "SIZE 1000"])
    run_with_peer(peer, make_job(["a@example.org"], MESSAGE))
    assert peer.commands[1] == f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}"
    peer = Peer(extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "SIZE 100"])
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], MESSAGE))
    assert statuses(outcomes) == [("a@example.org", Status.FAILED, "5.3.4")]


@pytest.mark.parametrize(
    ("reply", "status", "enhanced"),
    [
        (b"451 4.3.0 try later\r\n", Status.DEFERRED, "4.3.0"),
        (b"550 5.7.1 sender refused\r\n", Status.FAILED, "5.7.1"),
    ],
)
def test_mail_refused_decides_for_all(reply: bytes, status: Status, enhanced: str) -> None:
    peer = Peer(mail=reply)
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org", "b@example.org"], MESSAGE))
    assert [(o.status, o.enhanced, o.reply) for o in outcomes] == 2 * [
        (status, enhanced, reply.decode().strip())
    ]
    assert peer.wire == []


def test_every_recipient_refused_sends_no_message() -> None:
    peer = Peer(rcpt={"a@example.org": b"550 5.1.1 no\r\n", "b@example.org": b"450 4.2.1 busy\r\n"})
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org", "b@example.org"], MESSAGE))
    assert statuses(outcomes) == [
        ("a@example.org", Status.FAILED, "5.1.1"),
        ("b@example.org", Status.DEFERRED, "4.2.1"),
    ]
    assert peer.wire == []
    assert peer.commands[-1] == "QUIT"


def test_every_recipient_refused_without_pipelining_sends_no_data() -> None:
    peer = Peer(extensions=["ENHANCEDSTATUSCODES"], rcpt={"a@example.org": b"550 5.1.1 no\r\n"})
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], MESSAGE))
    assert statuses(outcomes) == [("a@example.org", Status.FAILED, "5.1.1")]
    assert peer.commands == [
        "LHLO localhost",
        f"MAIL FROM:<{SENDER}>",
        "RCPT TO:<a@example.org>",
        "QUIT",
    ]


def test_354_after_every_recipient_refused_gets_the_bare_terminator() -> None:
    """A server that says 354 to a pipelined DATA with no valid recipient (it should say
    503) gets an empty payload, and no per-recipient reply is waited for."""
    peer = Peer(rcpt={"a@example.org": b"550 5.1.1 no\r\n"}, data_without_recipients=b"354 go\r\n")
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], MESSAGE), timeout=3.0)
    assert statuses(outcomes) == [("a@example.org", Status.FAILED, "5.1.1")]
    assert peer.wire == [b".\r\n"]
    assert peer.commands[-1] == "QUIT"


def test_connection_lost_between_replies_defers_the_rest() -> None:
    peer = Peer(hang_up_after_replies=1)
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org", "b@example.org"], MESSAGE))
    assert statuses(outcomes) == [
        ("a@example.org", Status.DELIVERED, "2.0.0"),
        ("b@example.org", Status.DEFERRED, "4.4.2"),
    ]
    assert "after the message was sent" in outcomes[1].reply


def test_server_that_never_greets_times_out() -> None:
    outcomes, _ = run_with_peer(
        Peer(greeting=None), make_job(["a@example.org"], MESSAGE), timeout=0.3
    )
    assert statuses(outcomes) == [("a@example.org", Status.DEFERRED, "4.4.2")]
    assert "timed out" in outcomes[0].reply


def test_refused_greeting_defers() -> None:
    peer = Peer(greeting=b"554 5.3.2 not now\r\n")
    outcomes, _ = run_with_peer(peer, make_job(["a@example.org"], MESSAGE))
    assert statuses(outcomes) == [("a@example.org", Status.DEFERRED, "4.3.0")]
    assert outcomes[0].reply == "554 5.3.2 not now"


def test_unix_socket_down_defers(short_dir: Path) -> None:
    settings = LmtpSettings(socket=short_dir / "nobody-listens")
    outcomes = deliver(settings, make_job(["a@example.org", "b@example.org"], MESSAGE))
    assert statuses(outcomes) == [
        ("a@example.org", Status.DEFERRED, "4.4.1"),
        ("b@example.org", Status.DEFERRED, "4.4.1"),
    ]
    assert all(o.remote_mta is None for o in outcomes)
    assert outcomes[0].reply.startswith(f"cannot connect to lmtp:{short_dir / 'nobody-listens'}")


def test_tcp_down_defers() -> None:
    settings = LmtpSettings(host="127.0.0.1", port=free_port())
    outcomes = deliver(settings, make_job(["a@example.org"], MESSAGE))
    assert statuses(outcomes) == [("a@example.org", Status.DEFERRED, "4.4.1")]


def test_no_recipients_no_connection() -> None:
    assert deliver(LmtpSettings(socket=Path("/nonexistent")), make_job([], MESSAGE)) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"socket": Path("/s"), "host": "127.0.0.1", "port": 24},
        {"host": "127.0.0.1"},
        {"host": "127.0.0.1", "port": 25},  # RFC 2033 1
        {"socket": Path("/s"), "lhlo_name": "two words"},
    ],
)
def test_settings_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LmtpSettings(**kwargs)  # type: ignore[arg-type]


# --- a real Dovecot ----------------------------------------------------------------


def split_added_headers(stored: bytes) -> tuple[list[bytes], bytes]:
    """The Return-Path and Delivered-To lines Dovecot puts on top, and the rest."""
    added: list[bytes] = []
    rest = stored
    while rest.startswith((b"Return-Path:", b"Delivered-To:")):
        line, rest = rest.split(b"\r\n", 1)
        added.append(line)
    return added, rest


def test_dovecot_two_users_and_an_unknown_one(dovecot: Dovecot) -> None:
    dovecot.clear()
    names = ["alice@example.org", "nosuchuser@example.org", "bob@example.org"]
    settings = LmtpSettings(socket=dovecot.socket, lhlo_name="submitd.test", timeout=30)
    outcomes = deliver(settings, make_job(names, MESSAGE, body="8BITMIME"))
    assert statuses(outcomes) == [
        ("alice@example.org", Status.DELIVERED, "2.0.0"),
        ("nosuchuser@example.org", Status.FAILED, "5.1.1"),
        ("bob@example.org", Status.DELIVERED, "2.0.0"),
    ], dovecot.log_text()
    assert outcomes[1].reply.startswith("550 5.1.1 <nosuchuser@example.org>")
    assert all(o.remote_mta == f"lmtp:{dovecot.socket}" for o in outcomes)
    for user in ("alice", "bob"):
        [stored] = dovecot.delivered(user)
        added, rest = split_added_headers(stored)
        # Dovecot 2.3 writes Delivered-To only when a transaction has one recipient.
        assert added[0] == f"Return-Path: <{SENDER}>".encode()
        assert added[1:] in ([], [f"Delivered-To: {user}@example.org".encode()])
        assert rest == MESSAGE  # dots, 8-bit text and CRLFs exactly as submitted
    assert dovecot.delivered("carol") == []


def test_dovecot_over_tcp_with_small_pieces(dovecot: Dovecot) -> None:
    dovecot.clear()
    settings = LmtpSettings(host=dovecot.host, port=dovecot.port, timeout=30)
    outcomes = deliver(settings, make_job(["bob@example.org"], MESSAGE, piece=3))
    assert statuses(outcomes) == [("bob@example.org", Status.DELIVERED, "2.0.0")]
    assert outcomes[0].remote_mta == f"lmtp:{dovecot.host}:{dovecot.port}"
    [stored] = dovecot.delivered("bob")
    assert split_added_headers(stored)[1] == MESSAGE


def test_dovecot_full_mailbox_defers_after_data(dovecot: Dovecot) -> None:
    """A 4xx for one recipient after DATA, from Dovecot itself: carol's quota is smaller
    than the message (quota_full_tempfail), alice has none."""
    dovecot.clear()
    assert SMALL_QUOTA == "2K"
    big = MESSAGE + b"x" * 70 + b"\r\n" + (b"y" * 76 + b"\r\n") * 60  # ~5 KB
    settings = LmtpSettings(socket=dovecot.socket, timeout=30)
    outcomes = deliver(settings, make_job(["carol@example.org", "alice@example.org"], big))
    assert statuses(outcomes) == [
        ("carol@example.org", Status.DEFERRED, "4.2.2"),
        ("alice@example.org", Status.DELIVERED, "2.0.0"),
    ], dovecot.log_text()
    assert dovecot.delivered("carol") == []
    [stored] = dovecot.delivered("alice")
    assert split_added_headers(stored)[1] == big
