"""Issue 6, "Open relay": nothing is accepted for relay without a valid AUTH.

Every state a client can reach without authenticating on *this* connection is walked on
both ports where it applies. In each, one "probe" is written in a single write, as a
blind or hostile client would: MAIL FROM (a sender alice owns, one she does not, or
<>), RCPT TO an outside recipient, DATA followed by a whole message and its final dot,
a BDAT LAST chunk, and QUIT. The probe is refused at MAIL, RCPT and DATA/BDAT find no
transaction (503), the message lines are read as (unknown) commands, and the queue is
the same after the test as before it.

The same probe after a successful AUTH does queue a message (`test_probe_relays_once_
authenticated`), so "the queue did not change" is not a vacuous check.

Reply codes for MAIL:
- 530 5.7.0: RFC 6409 4.3, authentication required (in cleartext the text says to use
  STARTTLS first; the code is the same).
- 503 5.5.1 before any EHLO/HELO (also right after STARTTLS, which forgets the EHLO,
  RFC 3207 4.2): RFC 5321 4.1.4 makes the greeting come first, and the session checks
  the order of commands before authentication. 503 is a permanent refusal too, so
  nothing is relayed either way.
- 501 5.5.2 when the MAIL line is swallowed as the response to an AUTH challenge
  (RFC 4954 4: the line after a 334 is the response, whatever it looks like); the next
  MAIL then gets 530 5.7.0.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

from tests.conftest import RunningServer
from tests.integration.rawclient import RawClient, code_of

Port = Literal["starttls", "tls"]
PORTS: tuple[Port, ...] = ("starttls", "tls")

SENDERS = {
    "owned": "alice@example.org",
    "unowned": "mallory@evil.example",
    "null": "",
}
RECIPIENT = "bob@example.net"

AUTH_REQUIRED = "530 5.7.0"
NO_HELLO = "503 5.5.1"
NO_TRANSACTION = "503 5.5.1"
UNKNOWN_COMMAND = "500 5.5.1"
BAD_BASE64 = "501 5.5.2"
AUTH_FAILED = "535 5.7.8"
BYE = "221 2.0.0"


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def plain(login: str, password: str, authzid: str = "") -> str:
    return "AUTH PLAIN " + b64(f"{authzid}\0{login}\0{password}")


def message_lines(sender: str) -> list[bytes]:
    return [
        f"From: <{sender or SENDERS['owned']}>".encode(),
        f"To: <{RECIPIENT}>".encode(),
        b"Subject: open relay probe",
        b"",
        b"This message must never be queued without AUTH.",
        b".",
    ]


BDAT_CHUNK = b"Hello world!"


def probe(sender: str) -> bytes:
    """MAIL, RCPT, DATA + message, BDAT LAST + chunk, QUIT: all in one write."""
    lines = [
        f"MAIL FROM:<{sender}>".encode(),
        f"RCPT TO:<{RECIPIENT}>".encode(),
        b"DATA",
        *message_lines(sender),
    ]
    bdat = b"BDAT %d LAST\r\n" % len(BDAT_CHUNK) + BDAT_CHUNK
    return b"".join(line + b"\r\n" for line in lines) + bdat + b"QUIT\r\n"


def refused_probe_replies(mail: str) -> list[str]:
    """What the probe gets when MAIL is refused with `mail`."""
    body = [UNKNOWN_COMMAND] * len(message_lines(""))  # no DATA: lines are commands
    return [mail, NO_TRANSACTION, NO_TRANSACTION, *body, NO_TRANSACTION, BYE]


def read_until_closed(client: RawClient) -> list[str]:
    """Every reply up to QUIT's 221 or the end of the connection."""
    replies: list[str] = []
    while True:
        try:
            reply = client.read_reply()
        except (ConnectionError, TimeoutError):
            return replies
        replies.append(code_of(reply))
        if reply[0] == 221:
            return replies


@dataclass
class Ctx:
    server: RunningServer
    port: Port
    sender: str
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def connect(self, port: Port | None = None) -> RawClient:
        client = RawClient(self.server, implicit_tls=(port or self.port) == "tls")
        self.stack.callback(client.close)
        assert client.greeting[0] == 220
        return client


@dataclass(frozen=True)
class Expect:
    """The MAIL reply, and commands pipelined in front of the probe with their replies."""

    mail: str = AUTH_REQUIRED
    prefix: tuple[str, ...] = ()
    prefix_replies: tuple[str, ...] = ()


Setup = Callable[[Ctx], tuple[RawClient, Expect]]


def expect(client: RawClient, line: str, code: str) -> tuple[int, str]:
    reply = client.command(line)
    assert code_of(reply) == code, (line, reply)
    return reply


def ehlo(client: RawClient) -> str:
    code, text = client.command("EHLO client.example.org")
    assert code == 250, text
    return text


def secured(ctx: Ctx) -> RawClient:
    """A connection under TLS with no EHLO since: STARTTLS done, or implicit TLS."""
    client = ctx.connect()
    if ctx.port == "starttls":
        ehlo(client)
        client.starttls()
    return client


def secured_ehlo(ctx: Ctx) -> RawClient:
    client = secured(ctx)
    advertised = ehlo(client).split("\n")
    assert "AUTH PLAIN LOGIN" in advertised  # offered: not authenticated
    return client


# ----------------------------------------------------------------- cleartext states


def cleartext_before_ehlo(ctx: Ctx) -> tuple[RawClient, Expect]:
    return ctx.connect(), Expect(mail=NO_HELLO)


def cleartext_after_ehlo(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = ctx.connect()
    ehlo(client)
    return client, Expect()


def cleartext_after_helo(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = ctx.connect()
    expect(client, "HELO client.example.org", "250")
    return client, Expect()


def cleartext_after_refused_auth(ctx: Ctx) -> tuple[RawClient, Expect]:
    """Even the right password is refused in cleartext, and does not count as AUTH."""
    client = ctx.connect()
    ehlo(client)
    expect(client, plain(ctx.server.user, ctx.server.password), "538 5.7.11")
    return client, Expect()


def cleartext_after_rset(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = ctx.connect()
    ehlo(client)
    expect(client, "RSET", "250 2.0.0")
    return client, Expect()


def cleartext_pipelined_auth(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = ctx.connect()
    ehlo(client)
    auth = plain(ctx.server.user, ctx.server.password)
    return client, Expect(prefix=(auth,), prefix_replies=("538 5.7.11",))


# ---------------------------------------------------- under TLS (after STARTTLS or not)


def tls_before_ehlo(ctx: Ctx) -> tuple[RawClient, Expect]:
    """After STARTTLS the EHLO is forgotten (RFC 3207 4.2); on implicit TLS, none yet."""
    return secured(ctx), Expect(mail=NO_HELLO)


def tls_after_ehlo(ctx: Ctx) -> tuple[RawClient, Expect]:
    return secured_ehlo(ctx), Expect()


def tls_after_helo(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured(ctx)
    expect(client, "HELO client.example.org", "250")
    expect(client, plain(ctx.server.user, ctx.server.password), "503 5.5.1")  # needs EHLO
    return client, Expect()


def auth_wrong_password(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, plain(ctx.server.user, "wrong password"), AUTH_FAILED)
    return client, Expect()


def auth_unknown_user(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, plain("nobody@example.org", ctx.server.password), AUTH_FAILED)
    return client, Expect()


def auth_foreign_authzid(ctx: Ctx) -> tuple[RawClient, Expect]:
    """The right password, but asking to act as someone else (RFC 4616 authzid)."""
    client = secured_ehlo(ctx)
    line = plain(ctx.server.user, ctx.server.password, authzid="bob@example.org")
    expect(client, line, AUTH_FAILED)
    return client, Expect()


def auth_plain_cancelled(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, "AUTH PLAIN", "334")
    expect(client, "*", "501 5.0.0")
    return client, Expect()


def auth_login_cancelled(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, "AUTH LOGIN", "334")
    expect(client, b64(ctx.server.user), "334")
    expect(client, "*", "501 5.0.0")
    return client, Expect()


def auth_bad_base64(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, "AUTH PLAIN !!not*base64!!", BAD_BASE64)
    return client, Expect()


def auth_login_abandoned_at_username(ctx: Ctx) -> tuple[RawClient, Expect]:
    """MAIL sent where the user name was due: it is a (bad) response, never a command."""
    client = secured_ehlo(ctx)
    expect(client, "AUTH LOGIN", "334")
    expect(client, f"MAIL FROM:<{ctx.sender}>", BAD_BASE64)
    return client, Expect()


def auth_login_abandoned_at_password(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, "AUTH LOGIN", "334")
    expect(client, b64(ctx.server.user), "334")
    expect(client, f"MAIL FROM:<{ctx.sender}>", BAD_BASE64)
    return client, Expect()


def auth_login_abandoned_by_probe(ctx: Ctx) -> tuple[RawClient, Expect]:
    """The probe's own MAIL answers the Password: challenge; RCPT etc. find no AUTH."""
    client = secured_ehlo(ctx)
    expect(client, "AUTH LOGIN", "334")
    expect(client, b64(ctx.server.user), "334")
    return client, Expect(mail=BAD_BASE64)


def after_failed_auth_and_rset(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    expect(client, plain(ctx.server.user, "wrong password"), AUTH_FAILED)
    expect(client, "RSET", "250 2.0.0")
    return client, Expect()


def other_connection_authenticated(ctx: Ctx) -> tuple[RawClient, Expect]:
    """Another connection is authenticated, and stays open, while this one probes."""
    other = ctx.connect().ready()
    client = secured_ehlo(ctx)
    expect(other, "NOOP", "250 2.0.0")
    return client, Expect()


def after_auth_on_previous_connection(ctx: Ctx) -> tuple[RawClient, Expect]:
    """A connection authenticated and left; a new one starts with nothing."""
    other = ctx.connect().ready()
    expect(other, "QUIT", BYE)
    other.close()
    return secured_ehlo(ctx), Expect()


def pipelined_bad_auth(ctx: Ctx) -> tuple[RawClient, Expect]:
    """AUTH with a wrong password in the same write as the transaction: the MAIL
    waits for the (asynchronous) password check and is refused after the 535."""
    client = secured_ehlo(ctx)
    auth = plain(ctx.server.user, "wrong password")
    return client, Expect(prefix=(auth,), prefix_replies=(AUTH_FAILED,))


def pipelined_unknown_user(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    auth = plain("nobody@example.org", ctx.server.password)
    return client, Expect(prefix=(auth,), prefix_replies=(AUTH_FAILED,))


def pipelined_bad_base64(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = secured_ehlo(ctx)
    return client, Expect(prefix=("AUTH PLAIN !!not*base64!!",), prefix_replies=(BAD_BASE64,))


# -------------------------------------------------------------------- one port only


def starttls_injection(ctx: Ctx) -> tuple[RawClient, Expect]:
    """Plaintext after STARTTLS, in its write (RFC 3207 5, CVE-2011-0411): an EHLO, a
    valid AUTH and a MAIL. None of it may run, before or after the handshake."""
    client = ctx.connect()
    ehlo(client)
    injected = [
        "STARTTLS",
        "EHLO injected.example",
        plain(ctx.server.user, ctx.server.password),
        f"MAIL FROM:<{ctx.sender}>",
    ]
    client.send("".join(line + "\r\n" for line in injected).encode())
    # Read the 220 octet by octet, so that no buffered reader can swallow a plaintext
    # reply to the injected commands: such a reply would break the handshake instead.
    client.file.close()
    line = b""
    while not line.endswith(b"\n"):
        octet = client.sock.recv(1)
        assert octet, "connection closed before the 220"
        line += octet
    assert line.startswith(b"220 "), line
    client.sock = client.server.client_context().wrap_socket(
        client.sock, server_hostname="localhost"
    )
    client.file = client.sock.makefile("rb")
    # The first reply under TLS answers our EHLO (not an injected command), and AUTH is
    # still offered: the injected AUTH did not run.
    advertised = ehlo(client).split("\n")
    assert advertised[0] == "localhost greets client.example.org", advertised
    assert "AUTH PLAIN LOGIN" in advertised
    return client, Expect()


def implicit_tls_refused_starttls(ctx: Ctx) -> tuple[RawClient, Expect]:
    client = ctx.connect()
    ehlo(client)
    expect(client, "STARTTLS", "503 5.5.1")  # TLS already active
    return client, Expect()


STATES: list[tuple[Setup, tuple[Port, ...]]] = [
    (cleartext_before_ehlo, ("starttls",)),
    (cleartext_after_ehlo, ("starttls",)),
    (cleartext_after_helo, ("starttls",)),
    (cleartext_after_refused_auth, ("starttls",)),
    (cleartext_after_rset, ("starttls",)),
    (cleartext_pipelined_auth, ("starttls",)),
    (tls_before_ehlo, PORTS),
    (tls_after_ehlo, PORTS),
    (tls_after_helo, PORTS),
    (auth_wrong_password, PORTS),
    (auth_unknown_user, PORTS),
    (auth_foreign_authzid, PORTS),
    (auth_plain_cancelled, PORTS),
    (auth_login_cancelled, PORTS),
    (auth_bad_base64, PORTS),
    (auth_login_abandoned_at_username, PORTS),
    (auth_login_abandoned_at_password, PORTS),
    (auth_login_abandoned_by_probe, PORTS),
    (after_failed_auth_and_rset, PORTS),
    (other_connection_authenticated, PORTS),
    (after_auth_on_previous_connection, PORTS),
    (pipelined_bad_auth, PORTS),
    (pipelined_unknown_user, PORTS),
    (pipelined_bad_base64, PORTS),
    (starttls_injection, ("starttls",)),
    (implicit_tls_refused_starttls, ("tls",)),
]

CASES = [
    pytest.param(setup, port, sender, id=f"{setup.__name__}-{port}-{kind}")
    for setup, ports in STATES
    for port in ports
    for kind, sender in SENDERS.items()
]


@pytest.fixture
def ctx_stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.mark.parametrize(("setup", "port", "sender"), CASES)
def test_no_relay_without_auth(
    shared_server: RunningServer,
    ctx_stack: contextlib.ExitStack,
    setup: Setup,
    port: Port,
    sender: str,
) -> None:
    before = shared_server.queue_ids()
    assert before == []  # nothing in this module ever queues on the shared server
    ctx = Ctx(shared_server, port, sender, ctx_stack)
    client, expected = setup(ctx)
    prefix = b"".join(line.encode() + b"\r\n" for line in expected.prefix)
    client.send(prefix + probe(sender))
    replies = read_until_closed(client)
    assert replies == [*expected.prefix_replies, *refused_probe_replies(expected.mail)]
    ctx_stack.close()  # every connection of the test is gone before the queue is read
    assert shared_server.queue_ids() == before


def test_probe_relays_once_authenticated(server: RunningServer) -> None:
    """Control: after a real AUTH the very same probe queues its message (then BDAT
    finds no transaction), so an unchanged queue above means a refusal."""
    queued = 0
    for port in PORTS:
        for kind in ("owned", "null"):
            client = RawClient(server, implicit_tls=port == "tls").ready()
            client.send(probe(SENDERS[kind]))
            replies = read_until_closed(client)
            client.close()
            assert replies[:3] == ["250 2.1.0", "250 2.1.5", "354"], (port, kind, replies)
            assert replies[3].startswith("250"), (port, kind, replies)
            assert replies[4:] == [NO_TRANSACTION, BYE], (port, kind, replies)
            queued += 1
            assert len(server.queue_ids()) == queued
