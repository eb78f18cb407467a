"""A programmable SMTP server for delivery tests: real sockets, our own code, no policy.

Why our own: the tests need to *say* what the next hop offers and answers (no DSN, no
8BITMIME, a SIZE limit, 451 for one recipient) and to see *exactly* what arrived (raw
MAIL/RCPT lines, the message octets after dot-unstuffing, how many connections). Real
servers (Postfix, see postfix_fixture.py) cannot be scripted that way; aiosmtpd hides
the raw lines and offers neither DSN nor CHUNKING.

The server runs its own event loop in a thread, so sync and async tests can both use it
(a test's ``asyncio.run`` never blocks it). Use the ``peer`` fixture by importing
``peer_fixture`` into the test module (it is registered under the name ``peer``).

API::

    with Peer(host="127.0.0.1", extensions=["8BITMIME", "DSN"], ...) as peer:
        peer.port                  # the port it listens on (free port chosen at start)
        peer.rcpt_replies["bad@x.test"] = "550 5.1.1 no such user"   # change any time
        ...deliver to (peer.host, peer.port)...
        peer.transactions          # list[Transaction], one per completed DATA/BDAT LAST
        peer.attempts              # list[Transaction], every MAIL, completed or not
        peer.connections           # connections accepted so far
        peer.max_concurrent        # most connections open at the same time
        peer.commands              # every command line received, all connections
        peer.auth_attempts         # (mechanism, user, password, accepted) tuples

Constructor options (all keyword, all also plain attributes you may change later):

* ``host`` (any 127.0.0.0/8 address), ``port`` (0: a free one);
* ``extensions``: the EHLO keywords to offer besides STARTTLS/AUTH, e.g.
  ``["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 1000", "DSN", "CHUNKING",
  "BINARYMIME", "ENHANCEDSTATUSCODES"]`` (default: :data:`DEFAULT_EXTENSIONS`);
* ``tls``: a :class:`PeerCert` (from :func:`make_cert`) enabling ``starttls=True``
  (offer STARTTLS) or ``implicit_tls=True`` (TLS from the first octet, RFC 8314);
* ``users``: {user: password}; AUTH with ``auth_mechanisms`` (PLAIN and/or LOGIN) is
  offered (after TLS if ``auth_needs_tls``) and checked against it; ``auth_required``
  refuses MAIL before AUTH;
* replies: ``greeting``, ``mail_reply``, ``rcpt_replies`` ({address: reply}, exact
  address match, others get "250 2.1.5 Ok"), ``data_reply`` (to the end of data or
  BDAT LAST), ``data_start_reply`` (instead of 354), ``command_replies`` ({VERB: reply}
  overriding any command, e.g. {"NOOP": "421 4.3.2 bye"}); a reply starting with 421
  closes the connection after it is sent;
* ``data_delay``: seconds to wait before answering the end of data (to make deliveries
  overlap in concurrency tests).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES")


@dataclass(frozen=True)
class PeerCert:
    """A test CA and a server certificate it issued, as PEM files."""

    ca_file: Path  # give this to the client as its trust anchor
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_cert(
    directory: Path, names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> PeerCert:
    """Make a CA and a server certificate for ``names`` and ``ips`` under ``directory``.

    A real CA with a separate leaf (not one self-signed leaf), so that the client checks
    a chain the way it would in production, also under OpenSSL's strict X.509 mode.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"submitd test CA {directory.name}")]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    result = PeerCert(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    result.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    result.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    result.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return result


@dataclass
class Transaction:
    """One mail transaction as the peer saw it."""

    connection: int  # 1 for the first connection the peer accepted
    helo: str  # the EHLO/HELO argument
    tls: bool  # the transaction ran over TLS
    user: str | None  # the AUTH identity, if any
    mail: str  # the raw MAIL line, parameters included, without CRLF
    rcpts: list[str] = field(default_factory=list)  # every raw RCPT line
    accepted: list[str] = field(default_factory=list)  # addresses answered 2xx
    command: str = ""  # "DATA" or "BDAT" once the content was sent
    message: bytes | None = None  # exact content: unstuffed DATA, or BDAT octets
    reply: str = ""  # what the peer answered to the end of data

    @property
    def mail_params(self) -> list[str]:
        return _params(self.mail)

    def rcpt_params(self, index: int) -> list[str]:
        return _params(self.rcpts[index])


def _params(line: str) -> list[str]:
    """The ESMTP parameters after the path of a MAIL or RCPT line."""
    rest = line.split(">", 1)[1] if ">" in line else ""
    return rest.split()


def _address(line: str) -> str:
    """The path of a MAIL or RCPT line, without angle brackets."""
    start, end = line.find("<"), line.find(">")
    return line[start + 1 : end] if 0 <= start < end else ""


class _Closing(Exception):
    """A 421 was sent: the peer ends the connection (RFC 5321 3.8)."""


class Peer:
    """See the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extensions: list[str] | tuple[str, ...] = DEFAULT_EXTENSIONS,
        tls: PeerCert | None = None,
        starttls: bool = False,
        implicit_tls: bool = False,
        users: dict[str, str] | None = None,
        auth_needs_tls: bool = True,
        auth_required: bool = False,
        auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
        greeting: str = "220 peer.test ESMTP test peer",
        mail_reply: str = "250 2.1.0 Ok",
        rcpt_replies: dict[str, str] | None = None,
        data_start_reply: str = "354 End data with <CR><LF>.<CR><LF>",
        data_reply: str = "250 2.0.0 Ok: queued",
        command_replies: dict[str, str] | None = None,
        data_delay: float = 0.0,
    ) -> None:
        if (starttls or implicit_tls) and tls is None:
            raise ValueError("starttls/implicit_tls need tls=make_cert(...)")
        self.host = host
        self.port = port
        self.extensions = list(extensions)
        self.tls = tls
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.users = users
        self.auth_needs_tls = auth_needs_tls
        self.auth_required = auth_required
        self.auth_mechanisms = auth_mechanisms
        self.greeting = greeting
        self.mail_reply = mail_reply
        self.rcpt_replies = dict(rcpt_replies or {})
        self.data_start_reply = data_start_reply
        self.data_reply = data_reply
        self.command_replies = dict(command_replies or {})
        self.data_delay = data_delay

        self.transactions: list[Transaction] = []
        self.attempts: list[Transaction] = []
        self.commands: list[str] = []
        # (command, whether more input was already waiting when it was read): pipelined
        # commands (RFC 2920) arrive before the reply to the one before them.
        self.arrivals: list[tuple[str, bool]] = []
        # Verbs at which the connection is dropped without a reply, once each.
        self.drop_once: set[str] = set()
        self.auth_attempts: list[tuple[str, str, str, bool]] = []
        self.connections = 0
        self.concurrent = 0
        self.max_concurrent = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- life cycle --

    def start(self) -> Peer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="smtp-peer", daemon=True
        )
        self._thread.start()
        ssl_context = self.tls.server_context() if self.implicit_tls and self.tls else None
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, self.host, self.port, ssl=ssl_context, limit=1 << 20),
            self._loop,
        )
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_records(self) -> None:
        self.transactions.clear()
        self.attempts.clear()
        self.commands.clear()
        self.arrivals.clear()
        self.auth_attempts.clear()
        self.connections = 0
        self.max_concurrent = self.concurrent

    # -- one connection --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        self._writers.add(writer)
        session = _Session(self, self.connections, reader, writer, tls=self.implicit_tls)
        try:
            await session.run()
        except (_Closing, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.concurrent -= 1
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


class _Session:
    def __init__(
        self,
        peer: Peer,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        tls: bool,
    ) -> None:
        self.peer = peer
        self.number = number
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.helo = ""
        self.user: str | None = None
        self.current: Transaction | None = None

    async def reply(self, text: str) -> None:
        self.writer.write(text.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        if text.startswith("421"):
            raise _Closing

    async def line(self) -> str:
        raw = await self.reader.readuntil(b"\r\n")
        return raw[:-2].decode("utf-8", "surrogateescape")

    async def run(self) -> None:
        await self.reply(self.peer.greeting)
        if not self.peer.greeting.startswith("220"):
            return
        while True:
            try:
                text = await self.line()
            except asyncio.IncompleteReadError:
                return
            self.peer.commands.append(text)
            # StreamReader keeps what it has read ahead in _buffer (no public API).
            self.peer.arrivals.append((text, bool(self.reader._buffer)))
            verb = text.split(" ", 1)[0].upper()
            if verb in self.peer.drop_once:
                self.peer.drop_once.discard(verb)
                raise _Closing
            override = self.peer.command_replies.get(verb)
            if override is not None:
                await self.reply(override)
                continue
            handler = getattr(self, f"do_{verb.lower()}", None)
            if handler is None:
                await self.reply("502 5.5.2 command not recognized")
                continue
            if await handler(text) is False:
                return

    # -- commands --

    def ehlo_lines(self) -> list[str]:
        lines = ["peer.test", *self.peer.extensions]
        if self.peer.starttls and not self.tls:
            lines.append("STARTTLS")
        if self.peer.users is not None and (self.tls or not self.peer.auth_needs_tls):
            lines.append(" ".join(("AUTH", *self.peer.auth_mechanisms)))
        return lines

    async def do_ehlo(self, text: str) -> None:
        self.helo = text[5:].strip()
        self.current = None
        lines = self.ehlo_lines()
        body = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"
        await self.reply(body)

    async def do_helo(self, text: str) -> None:
        self.helo = text[5:].strip()
        self.current = None
        await self.reply("250 peer.test")

    async def do_starttls(self, text: str) -> None:
        if not self.peer.starttls or self.tls or self.peer.tls is None:
            await self.reply("502 5.5.1 STARTTLS not available")
            return
        await self.reply("220 2.0.0 Ready to start TLS")
        await self.writer.start_tls(self.peer.tls.server_context())
        self.tls = True
        self.helo = ""
        self.current = None

    async def do_auth(self, text: str) -> None:
        words = text.split()
        mechanism = words[1].upper() if len(words) > 1 else ""
        if mechanism not in self.peer.auth_mechanisms:
            await self.reply("504 5.5.4 mechanism not offered")
            return
        if self.peer.users is None or (self.peer.auth_needs_tls and not self.tls):
            await self.reply("503 5.5.1 AUTH not available")
            return
        if mechanism == "PLAIN":
            if len(words) > 2:
                encoded = words[2]
            else:
                await self.reply("334 ")
                encoded = await self.line()
            try:
                _, user, password = base64.b64decode(encoded).decode().split("\0")
            except ValueError:
                await self.reply("501 5.5.2 bad PLAIN response")
                return
        elif mechanism == "LOGIN":
            if len(words) > 2:  # the initial response (RFC 4954 4), as aiosmtplib sends it
                user = base64.b64decode(words[2]).decode()
            else:
                await self.reply("334 " + base64.b64encode(b"Username:").decode())
                user = base64.b64decode(await self.line()).decode()
            await self.reply("334 " + base64.b64encode(b"Password:").decode())
            password = base64.b64decode(await self.line()).decode()
        else:
            await self.reply("504 5.5.4 mechanism not supported")
            return
        ok = self.peer.users.get(user) == password
        self.peer.auth_attempts.append((mechanism, user, password, ok))
        if ok:
            self.user = user
            await self.reply("235 2.7.0 Authentication successful")
        else:
            await self.reply("535 5.7.8 Authentication credentials invalid")

    async def do_mail(self, text: str) -> None:
        if self.peer.auth_required and self.user is None:
            await self.reply("530 5.7.0 Authentication required")
            return
        if self.current is not None:
            await self.reply("503 5.5.1 nested MAIL")
            return
        transaction = Transaction(self.number, self.helo, self.tls, self.user, text)
        self.peer.attempts.append(transaction)
        await self.reply(self.peer.mail_reply)
        if self.peer.mail_reply.startswith("2"):
            self.current = transaction

    async def do_rcpt(self, text: str) -> None:
        if self.current is None:
            await self.reply("503 5.5.1 need MAIL first")
            return
        self.current.rcpts.append(text)
        address = _address(text)
        answer = self.peer.rcpt_replies.get(address, "250 2.1.5 Ok")
        if answer.startswith("2"):
            self.current.accepted.append(address)
        await self.reply(answer)

    async def do_data(self, text: str) -> None:
        if self.current is None or not self.current.accepted:
            await self.reply("503 5.5.1 need RCPT first")
            return
        await self.reply(self.peer.data_start_reply)
        if not self.peer.data_start_reply.startswith("354"):
            return
        lines: list[bytes] = []
        while True:
            raw = await self.reader.readuntil(b"\r\n")
            if raw == b".\r\n":
                break
            lines.append(raw[1:] if raw.startswith(b".") else raw)  # RFC 5321 4.5.2
        await self.finish("DATA", b"".join(lines))

    async def do_bdat(self, text: str) -> None:
        words = text.split()
        size = int(words[1])
        last = len(words) > 2 and words[2].upper() == "LAST"
        chunk = await self.reader.readexactly(size)
        if self.current is None or not self.current.accepted:
            await self.reply("503 5.5.1 need RCPT first")
            return
        self.current.message = (self.current.message or b"") + chunk
        if last:
            await self.finish("BDAT", self.current.message)
        else:
            await self.reply(f"250 2.0.0 {size} octets received")

    async def finish(self, command: str, message: bytes) -> None:
        assert self.current is not None
        transaction, self.current = self.current, None
        transaction.command = command
        transaction.message = message
        transaction.reply = self.peer.data_reply
        if self.peer.data_delay:
            await asyncio.sleep(self.peer.data_delay)
        self.peer.transactions.append(transaction)
        await self.reply(self.peer.data_reply)

    async def do_rset(self, text: str) -> None:
        self.current = None
        await self.reply("250 2.0.0 Ok")

    async def do_noop(self, text: str) -> None:
        await self.reply("250 2.0.0 Ok")

    async def do_quit(self, text: str) -> bool:
        self.writer.write(b"221 2.0.0 Bye\r\n")
        await self.writer.drain()
        return False


@pytest.fixture(name="peer")
def peer_fixture() -> Iterator[Peer]:
    """A plain peer on 127.0.0.1 with :data:`DEFAULT_EXTENSIONS`; configure it in the test."""
    with Peer() as running:
        yield running


def peer_settings(running: Peer, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for HopSettings pointing at ``running`` (tls "none" by default)."""
    settings: dict[str, Any] = {
        "host": running.host,
        "port": running.port,
        "tls": "none",
        "connect_timeout": 5.0,
        "command_timeout": 10.0,
    }
    settings.update(overrides)
    return settings
