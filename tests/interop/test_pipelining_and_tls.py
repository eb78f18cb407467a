"""Raw-socket checks of what SMTP client libraries hide: pipelining (RFC 2920), the
STARTTLS command injection (RFC 3207 5, CVE-2011-0411), and what is refused before TLS
and before AUTH (RFC 4954 4, RFC 6409 4.3).

Plain `socket` and `ssl`, so that the test decides exactly which octets go out in one
write and sees exactly when the replies come back.
"""

from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from interop_support import (
    HOSTNAME,
    SENDER,
    check_queued,
    client_context,
    connect_loopback,
    make_message,
)

if TYPE_CHECKING:
    from conftest import RunningServer

pytestmark = pytest.mark.timeout(60)

# The server answers a command in well under this on loopback; waiting this long for
# octets that must never come is what gives a "nothing more arrived" check its meaning.
QUIET_PERIOD = 0.3

_REPLY_LINE = re.compile(rb"(\d{3})([ -])([^\r\n]*)\r\n")


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text of each line, after "NNN-" or "NNN "

    @property
    def text(self) -> str:
        return self.lines[-1]

    @property
    def status(self) -> str:
        """'250 2.1.0': the code and the enhanced status code, if any."""
        first = self.text.split(" ", 1)[0]
        return f"{self.code} {first}" if re.fullmatch(r"[245]\.\d+\.\d+", first) else str(self.code)


class RawSMTP:
    """An SMTP connection at the level of octets: what was read, and in how many reads."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.context = context
        self.buffer = b""
        self.reads = 0  # recv calls that returned data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)  # one write: on loopback, one segment or one TLS record

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unparsed {self.buffer!r}")
        self.reads += 1
        self.buffer += data

    def _parse_one(self) -> Reply | None:
        """Take one complete reply off the buffer, if it holds one."""
        position = 0
        lines: list[str] = []
        code: int | None = None
        while True:
            match = _REPLY_LINE.match(self.buffer, position)
            if match is None:
                assert b"\n" not in self.buffer[position:], f"malformed: {self.buffer!r}"
                return None
            assert code in (None, int(match[1])), f"mixed codes: {self.buffer!r}"
            code = int(match[1])
            lines.append(match[3].decode("utf-8"))
            position = match.end()
            if match[2] == b" ":
                self.buffer = self.buffer[position:]
                return Reply(code, tuple(lines))

    def reply(self) -> Reply:
        while True:
            parsed = self._parse_one()
            if parsed is not None:
                return parsed
            self._fill()

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str) -> Reply:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def quiet(self, seconds: float = QUIET_PERIOD) -> bool:
        """True if nothing is buffered and no application data arrives in `seconds`."""
        if self.buffer or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return False
        readable, _, _ = select.select([self.sock], [], [], seconds)
        if not readable:
            return True
        if not isinstance(self.sock, ssl.SSLSocket):
            return False
        # Under TLS 1.3 "readable" may be a session ticket, which is no application data.
        self.sock.settimeout(seconds)
        try:
            self.buffer += self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10)
        return False

    def start_tls(self) -> None:
        """The client side of the handshake, on the bare socket after the 220."""
        assert self.buffer == b"", f"plaintext after the 220: {self.buffer!r}"
        self.sock = self.context.wrap_socket(self.sock, server_hostname=HOSTNAME)

    def ehlo(self, name: str = "raw.interop.test") -> Reply:
        reply = self.command(f"EHLO {name}")
        assert reply.code == 250, reply
        assert reply.lines[0] == f"localhost greets {name}", reply
        return reply

    def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        return self.command(f"AUTH PLAIN {token}")

    def close(self) -> None:
        self.sock.close()


Connect = Callable[[str], RawSMTP]


@pytest.fixture
def connect(shared_server: RunningServer) -> Iterator[Connect]:
    """`connect("starttls" | "tls")`: a raw connection, past the 220 greeting."""
    context = client_context(shared_server.cafile)
    opened: list[RawSMTP] = []

    def open_connection(transport: str) -> RawSMTP:
        sock: socket.socket
        if transport == "tls":
            sock = context.wrap_socket(
                connect_loopback(shared_server.tls_port), server_hostname=HOSTNAME
            )
        else:
            sock = connect_loopback(shared_server.starttls_port)
        conn = RawSMTP(sock, context)
        opened.append(conn)
        greeting = conn.reply()
        assert (greeting.code, greeting.lines) == (220, ("localhost ESMTP submitd",))
        return conn

    yield open_connection
    for conn in opened:
        conn.close()


def secure(conn: RawSMTP, transport: str) -> None:
    """On the STARTTLS port: EHLO, STARTTLS and the handshake. Then EHLO under TLS."""
    if transport == "starttls":
        conn.ehlo()
        assert conn.command("STARTTLS").status == "220 2.0.0"
        conn.start_tls()
    extensions = conn.ehlo().lines[1:]
    assert "PIPELINING" in extensions
    assert "AUTH PLAIN LOGIN" in extensions


# ----------------------------------------------------------------------- pipelining


@pytest.mark.parametrize("transport", ["starttls", "tls"])
def test_pipelined_transaction(
    shared_server: RunningServer, connect: Connect, transport: str
) -> None:
    """RFC 2920: MAIL, RCPT, a bad RCPT and DATA in one write after AUTH; then the
    message, its end and QUIT in one write. Every reply comes, in order, and the
    replies to each batch come together, in one read."""
    conn = connect(transport)
    secure(conn, transport)
    assert conn.auth_plain(shared_server.user, shared_server.password).status == "235 2.7.0"

    tag = f"pipelining-{transport}-{uuid.uuid4().hex[:12]}"
    message = make_message(tag, eight_bit=True)
    conn.send(
        f"MAIL FROM:<{SENDER}> BODY=8BITMIME\r\n"
        "RCPT TO:<bob@example.com>\r\n"
        "RCPT TO:<bob@@example.com>\r\n"  # bad syntax: refused, the transaction goes on
        "DATA\r\n".encode()
    )
    reads_before = conn.reads
    mail, rcpt, bad_rcpt, data = conn.replies(4)
    assert conn.reads - reads_before == 1, "the four replies came in more than one read"
    assert mail.status == "250 2.1.0"
    assert rcpt.status == "250 2.1.5"
    assert bad_rcpt.status == "501 5.1.3"
    assert data.code == 354
    assert conn.quiet(), f"more than four replies: {conn.buffer!r}"

    stuffed = message.replace(b"\r\n.", b"\r\n..")  # no line of it starts the message
    conn.send(stuffed + b".\r\nQUIT\r\n")
    reads_before = conn.reads
    queued, bye = conn.replies(2)
    assert conn.reads - reads_before == 1, "the replies to end of data and QUIT came apart"
    assert queued.status == "250 2.0.0"
    assert bye.status == "221 2.0.0"
    with pytest.raises(EOFError):
        conn.reply()  # and the server closes the connection

    stored = check_queued(
        shared_server,
        tag,
        message,
        helo="raw.interop.test",
        body="8BITMIME",
        recipients=("bob@example.com",),
    )
    assert queued.text == f"2.0.0 Ok: queued as {stored.queue_id}"


# ------------------------------------------------------------------ STARTTLS injection


def test_starttls_command_injection(shared_server: RunningServer, connect: Connect) -> None:
    """RFC 3207 5: commands pipelined behind STARTTLS in cleartext are thrown away.

    The injected RSET and MAIL must neither be answered in cleartext nor, worse, after
    the handshake, where the client would take their replies for the replies to its
    own commands (CVE-2011-0411)."""
    conn = connect("starttls")
    conn.ehlo()
    conn.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<x@evil.example>\r\n")
    ready = conn.reply()
    assert ready.status == "220 2.0.0"
    assert conn.quiet(), f"cleartext after the 220: {conn.buffer!r}"
    conn.start_tls()
    assert conn.quiet(), f"unasked-for replies after the handshake: {conn.buffer!r}"

    # The first thing read under TLS is the reply to our own EHLO.
    conn.send(b"EHLO after.interop.test\r\n")
    ehlo = conn.reply()
    assert (ehlo.code, ehlo.lines[0]) == (250, "localhost greets after.interop.test"), ehlo
    assert "AUTH PLAIN LOGIN" in ehlo.lines
    assert "STARTTLS" not in ehlo.lines
    # And the next replies answer the next commands: nothing queued up behind.
    assert conn.command("NOOP").status == "250 2.0.0"
    assert conn.command(f"MAIL FROM:<{SENDER}>").status == "530 5.7.0"  # not authenticated
    assert conn.command("QUIT").status == "221 2.0.0"


# --------------------------------------------------------- before TLS, before AUTH


def test_cleartext_refuses_auth_and_mail(shared_server: RunningServer, connect: Connect) -> None:
    """On the STARTTLS port before STARTTLS: AUTH is neither offered nor accepted, even
    with the right password (538 5.7.11, RFC 4954 4), and MAIL needs TLS (530 5.7.0)."""
    conn = connect("starttls")
    extensions = conn.ehlo().lines[1:]
    assert "STARTTLS" in extensions
    assert not [line for line in extensions if line.upper().startswith("AUTH")]

    assert conn.auth_plain(shared_server.user, shared_server.password).status == "538 5.7.11"
    assert conn.command("AUTH LOGIN").status == "538 5.7.11"  # not a 334 challenge
    assert conn.command("AUTH PLAIN").status == "538 5.7.11"
    assert conn.command(f"MAIL FROM:<{SENDER}>").status == "530 5.7.0"
    assert conn.command("RCPT TO:<bob@example.com>").status == "503 5.5.1"
    assert conn.command("QUIT").status == "221 2.0.0"


@pytest.mark.parametrize("transport", ["starttls", "tls"])
def test_mail_before_auth(shared_server: RunningServer, connect: Connect, transport: str) -> None:
    """Under TLS but not authenticated: MAIL gets 530 5.7.0 (RFC 6409 4.3); after a
    failed AUTH too; after a good one it is accepted."""
    conn = connect(transport)
    secure(conn, transport)
    assert conn.command(f"MAIL FROM:<{SENDER}>").status == "530 5.7.0"
    assert conn.auth_plain(shared_server.user, "not the password").status == "535 5.7.8"
    assert conn.command(f"MAIL FROM:<{SENDER}>").status == "530 5.7.0"
    assert conn.auth_plain(shared_server.user, shared_server.password).status == "235 2.7.0"
    assert conn.command(f"MAIL FROM:<{SENDER}>").status == "250 2.1.0"
    assert conn.command("RSET").status == "250 2.0.0"
    assert conn.command("QUIT").status == "221 2.0.0"
