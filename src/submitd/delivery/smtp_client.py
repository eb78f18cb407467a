"""Hand one message to one next hop over SMTP (RFC 5321), reusing connections.

:class:`HopPool` is what a route calls: ``send(hop, address, job)`` opens (or reuses) a
connection to the hop, runs one mail transaction and answers one :class:`Outcome` per
recipient. It never raises for a delivery problem: a hop that cannot be reached, a TLS
or AUTH failure, a dropped connection are DEFERRED outcomes (DESIGN principle 6).

aiosmtplib does the connection, TLS, EHLO and AUTH. The mail transaction itself runs on
our own protocol object (:mod:`submitd.delivery.replies`), swapped onto the transport for
its duration, because aiosmtplib (5.x) can neither pipeline (it keeps one reply waiter
and drops replies that arrive while none is pending) nor stream a message:

* MAIL, every RCPT and DATA go out in one write to a hop that offers PIPELINING
  (RFC 2920 3.1), one at a time otherwise; the replies are read back in order;
* the message is **streamed** after 354, chunk by chunk from ``job.message.chunks()``,
  dot-stuffed on the way (RFC 5321 4.5.2, :mod:`submitd.delivery.content`);
  ``SMTP.data()`` takes the whole message as one ``bytes`` and also rewrites bare CR and
  LF to CRLF, while a stored message must go out byte for byte (DESIGN principle 4) and
  may be 50 MB;
* BDAT (RFC 3030), used only for BODY=BINARYMIME, which DATA cannot carry.

Status codes of our own diagnoses (RFC 3463), chosen so that a route sees "could not
reach this host" as ``4.4.*`` (and may try the next MX, RFC 5321 5.1):

* connection refused / timed out, or a greeting other than 220: ``4.4.1`` (no answer
  from host; "busy or otherwise unable to take a call" covers a 421/554 banner);
* connection lost or a reply timeout later on: ``4.4.2`` (bad connection);
* STARTTLS required but not offered: ``4.7.4`` (security features not supported);
* TLS handshake or certificate verification failed, STARTTLS refused: ``4.7.5``
  (cryptographic failure). Postfix's SMTP client uses the same two codes;
* credentials configured but the hop offers no AUTH: ``4.7.0``; credentials that would
  go over a connection without TLS (and ``tls`` is not "none"): ``4.7.10`` (encryption
  needed, RFC 5248 registry); AUTH rejected: the hop's own detail with class 4
  (``535 5.7.8`` gives ``4.7.8``). All are DEFERRED, never FAILED: they are a site
  misconfiguration (ours or the hop's) and must not bounce the sender's mail;
* SMTPUTF8 needed but not offered: FAILED ``5.6.7`` (RFC 6531 3.2 / RFC 6533: the hop
  cannot take the message and there is no downgrade);
* 8BITMIME or BINARYMIME content to a hop without the extension is converted to 7 bit
  with :func:`repair_8bit` (RFC 6152 3, RFC 3030 3); when that is impossible: FAILED
  ``5.6.3`` (conversion required but not supported). A DKIM signature over the body is
  broken by the conversion; RFC 6376 5.3 leaves that to the signer;
* message larger than the hop's SIZE: FAILED ``5.3.4`` (message too big for system,
  RFC 1870 6), without sending it.

Timeouts: ``connect_timeout`` covers TCP, the implicit TLS handshake, the greeting and
STARTTLS; ``command_timeout`` every other reply, except the reply to the end of the data,
for which at least 10 minutes are allowed (RFC 5321 4.5.3.2.6).

TLS modes: "starttls" (required, certificate checked when ``verify``), "implicit"
(RFC 8314, checked when ``verify``), "opportunistic" (RFC 3207 / RFC 7435: encrypt if
offered, never authenticate the certificate, and fall back to a new cleartext
connection when the handshake fails, as an MTA must to reach servers with broken TLS),
"none".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast

from aiosmtplib import SMTP, SMTPResponse
from aiosmtplib.errors import (
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from submitd.delivery.content import DotStuffer, pieces
from submitd.delivery.replies import ReplyReader
from submitd.delivery.types import Job, MessageSource, Outcome, Status
from submitd.envelope import Recipient
from submitd.message.repair import RepairImpossible, repair_8bit

__all__ = ["HopPool", "HopSettings"]

TlsMode = Literal["starttls", "opportunistic", "implicit", "none"]
CRLF = b"\r\n"
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


@dataclass(frozen=True, slots=True)
class HopSettings:
    """How to reach one next hop. The password never appears in a repr (DESIGN 3)."""

    host: str
    port: int
    tls: str  # "starttls" (required), "opportunistic", "implicit", "none"
    verify: bool = True  # check the certificate and the name `tls_name or host`
    ca_file: Path | None = None
    tls_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    helo_name: str = "localhost"
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2 suggests 5 minutes and more


class _HopFailure(Exception):
    """The hop cannot take mail now: every recipient gets this (DEFERRED unless said)."""

    def __init__(self, enhanced: str, reply: str, status: Status = Status.DEFERRED) -> None:
        super().__init__(reply)
        self.enhanced = enhanced
        self.reply = reply
        self.status = status


# --- replies ------------------------------------------------------------------------


def _status_of(code: int) -> Status:
    if 200 <= code < 300:
        return Status.DELIVERED
    if 500 <= code < 600:
        return Status.FAILED
    return Status.DEFERRED  # 4xx, and anything unexpected: do not lose the mail


def _parse_reply(response: SMTPResponse) -> tuple[str, str]:
    """``(enhanced, "code enhanced text")`` from a reply, one line however long it was.

    The enhanced code is taken from the first line (RFC 2034 3) when its class matches the
    reply's; otherwise it is the class's undefined code, "X.0.0" (RFC 3463 3.1). A reply
    that is neither 2xx, 4xx nor 5xx is treated as a protocol problem, "4.5.0".
    """
    code = response.code
    lines = response.message.split("\n")
    first = _ENHANCED.match(lines[0])
    klass = str(code)[0]
    if klass not in "245":
        enhanced = "4.5.0"
    elif first is not None and first.group(1) == klass:
        enhanced = f"{first.group(1)}.{int(first.group(2))}.{int(first.group(3))}"
    else:
        enhanced = f"{klass}.0.0"
    text = " ".join(_ENHANCED.sub("", line, count=1).strip() for line in lines).strip()
    return enhanced, f"{code} {enhanced} {text}".rstrip()


def _as_deferred(enhanced: str) -> str:
    """The same subject and detail in class 4: a DEFERRED outcome carries a 4.x.x code."""
    return "4" + enhanced[1:]


# --- xtext (RFC 3461 4) and utf-8-addr-xtext (RFC 6533 3) ---------------------------


def xtext(value: str) -> str:
    """Encode for ENVID and ORCPT: "!" to "~" except "+" and "=" as is, others "+HH"."""
    return "".join(
        chr(octet) if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D) else f"+{octet:02X}"
        for octet in value.encode("utf-8")
    )


def utf8_addr_xtext(value: str) -> str:
    r"""RFC 6533 3 utf-8-addr-xtext: printable ASCII but "+", "=", "\" as is, else \x{HEX}."""
    return "".join(
        char if 0x21 <= ord(char) <= 0x7E and char not in "+=\\" else f"\\x{{{ord(char):02X}}}"
        for char in value
    )


def _orcpt(recipient: Recipient) -> str:
    """The ORCPT parameter value: the client's own, or "rfc822;address" (RFC 3461 4.2).

    RFC 3461 5.2.1 lets a relaying MTA add ORCPT when the client gave none, so that the
    final DSN names the address the sender used. A non-ASCII address cannot be an
    rfc822 address: it is sent as the "utf-8" type of RFC 6533.
    """
    addr_type, address = "rfc822", recipient.address
    if recipient.orcpt is not None and ";" in recipient.orcpt:
        addr_type, _, address = recipient.orcpt.partition(";")
    if addr_type.lower() == "utf-8" or not address.isascii():
        return "utf-8;" + utf8_addr_xtext(address)
    return f"{addr_type};{xtext(address)}"


# --- message content ----------------------------------------------------------------


@dataclass(slots=True)
class _Content:
    """What goes after DATA or BDAT: the stored message, or a converted whole one."""

    size: int
    source: MessageSource | None = None
    whole: bytes | None = None


def _split_message(message: bytes) -> tuple[bytes, bytes]:
    """``(header, body)`` for repair_8bit: split at the first empty line (RFC 5322 2.1)."""
    if message.startswith(CRLF):
        return b"", message[2:]
    end = message.find(CRLF + CRLF)
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 4 :]


def _has_bare_line_ending(data: bytes) -> bool:
    return data.count(b"\r") != data.count(CRLF) or data.count(b"\n") != data.count(CRLF)


def _convert_to_7bit(job: Job) -> bytes:
    """The whole message, transfer-encoded to 7 bit (runs in a thread: CPU and disk).

    Conversion needs the whole message in memory (repair_8bit works on bytes); it only
    happens for a hop that lacks 8BITMIME/BINARYMIME, which is rare today.
    """
    header, body = _split_message(b"".join(job.message.chunks()))
    header, body = repair_8bit(header, body)
    converted = header + CRLF + body
    if _has_bare_line_ending(converted):
        # BINARYMIME content keeps bare CR/LF in parts repair_8bit leaves alone.
        raise RepairImpossible("bare CR or LF outside any part that could be encoded")
    return converted


# --- the pool -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """Which connections are interchangeable: same hop, same address, same identity.

    The password itself is not kept (a key may be logged): a keyed digest of the
    credentials (HMAC with a random key of the pool, so it cannot be brute-forced from a
    log) keeps connections authenticated as different users apart.
    """

    hop: HopSettings  # with username and password removed
    address: str | None
    identity: str


def _key(hop: HopSettings, address: str | None, salt: bytes) -> _Key:
    identity = ""
    if hop.username is not None:
        secret = f"{hop.username}\0{hop.password or ''}".encode()
        identity = hmac.new(salt, secret, hashlib.sha256).hexdigest()
    return _Key(replace(hop, username=None, password=None), address, identity)


@dataclass(eq=False, slots=True)
class _Connection:
    smtp: SMTP
    key: _Key
    extensions: dict[str, str]
    needs_reset: bool = False
    idle_since: float = 0.0
    unchecked: bool = False  # reused without NOOP for the transaction now running
    expiry: asyncio.TimerHandle | None = None

    def offers(self, extension: str) -> bool:
        return extension.lower() in self.extensions


# An idle connection is checked with NOOP before reuse only after this many seconds: a
# NOOP per message would cost a round trip each, and a connection that died unseen in
# the meantime is caught anyway (HopPool.send retries on a checked one).
NOOP_AFTER_IDLE = 2.0


class HopPool:
    """Connections to next hops, reused for several messages.

    Connections are keyed by the hop's settings (minus the secret, see :class:`_Key`)
    and the address connected to. At most ``per_destination`` transactions run at once
    per key and ``total`` connections are open overall (an idle connection of another
    hop is closed to make room). An idle connection is closed after ``idle_seconds`` and
    is checked with NOOP before it is reused; a connection that saw any error is closed.
    """

    def __init__(
        self, per_destination: int = 4, total: int = 20, idle_seconds: float = 30.0
    ) -> None:
        self.per_destination = per_destination
        self.total = total
        self.idle_seconds = idle_seconds
        self._limits: dict[_Key, asyncio.Semaphore] = {}
        self._busy = asyncio.Semaphore(total)
        self._idle: dict[_Key, list[_Connection]] = {}
        self._open = 0  # connections open or being opened, idle or busy
        self._closing: set[asyncio.Task[None]] = set()
        self._tls_contexts: dict[tuple[bool, Path | None], ssl.SSLContext] = {}
        self._closed = False
        self._salt = os.urandom(16)

    async def send(self, hop: HopSettings, address: str | None, job: Job) -> list[Outcome]:
        """One outcome per recipient of ``job``, in order; ``address`` None means hop.host."""
        if not job.recipients:
            return []
        remote = _remote_name(hop, address)
        key = _key(hop, address, self._salt)
        limit = self._limits.setdefault(key, asyncio.Semaphore(self.per_destination))
        async with limit, self._busy:
            for check in (False, True):
                try:
                    conn = await self._acquire(hop, address, key, check=check)
                except _HopFailure as failure:
                    return [
                        Outcome(r, failure.status, failure.reply, failure.enhanced, remote)
                        for r in job.recipients
                    ]
                transaction = _Transaction(conn, hop, job, remote)
                reusable = False
                try:
                    outcomes = await transaction.run()
                    reusable = transaction.reusable
                finally:
                    await self._release(conn, reusable)
                if not (conn.unchecked and not transaction.answered):
                    break
                # A connection reused without NOOP died unseen before answering
                # anything, so nothing was accepted: once more, on a checked one.
            return outcomes

    async def close(self) -> None:
        """Close every idle connection (QUIT); busy ones are closed when they finish."""
        self._closed = True
        for conns in list(self._idle.values()):
            for conn in list(conns):
                self._discard(conn)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- connections --

    async def _acquire(
        self, hop: HopSettings, address: str | None, key: _Key, *, check: bool
    ) -> _Connection:
        idle = self._idle.get(key, [])
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if conn.expiry is not None:
                conn.expiry.cancel()
            conn.unchecked = not check and time.monotonic() - conn.idle_since < NOOP_AFTER_IDLE
            if conn.unchecked:
                if conn.smtp.is_connected:
                    return conn
                self._discard(conn, polite=False)
                continue
            try:
                usable = await _still_usable(conn, hop)
            except BaseException:  # cancelled while checking: do not leak it
                self._discard(conn, polite=False)
                raise
            if usable:
                return conn
            self._discard(conn, polite=False)
        if self._open >= self.total:
            self._evict_one()
        self._open += 1
        try:
            return await _open_connection(hop, address, key, self._tls_context(hop))
        except BaseException:
            self._open -= 1
            raise

    async def _release(self, conn: _Connection, reusable: bool) -> None:
        if self._closed:
            self._open -= 1
            if reusable:
                await _quit(conn.smtp)
            conn.smtp.close()
            return
        if reusable and conn.needs_reset:
            reusable = await _reset(conn, conn.key.hop)
        if not reusable or not conn.smtp.is_connected:
            self._discard(conn, polite=reusable)
            return
        conn.idle_since = time.monotonic()
        conn.expiry = asyncio.get_running_loop().call_later(self.idle_seconds, self._expire, conn)
        self._idle.setdefault(conn.key, []).append(conn)

    def _expire(self, conn: _Connection) -> None:
        conns = self._idle.get(conn.key, [])
        if conn in conns:
            conns.remove(conn)
            self._discard(conn)

    def _evict_one(self) -> None:
        """Close the idle connection unused for longest, to stay within ``total``."""
        candidates = [c for conns in self._idle.values() for c in conns]
        if not candidates:
            return
        oldest = min(candidates, key=lambda c: c.idle_since)
        self._idle[oldest.key].remove(oldest)
        if oldest.expiry is not None:
            oldest.expiry.cancel()
        self._discard(oldest)

    def _discard(self, conn: _Connection, polite: bool = True) -> None:
        """Forget ``conn`` now; say QUIT (RFC 5321 4.1.1.10) in the background if it is sane."""
        self._open -= 1
        if conn.expiry is not None:
            conn.expiry.cancel()
        if not polite or not conn.smtp.is_connected:
            conn.smtp.close()
            return
        task = asyncio.get_running_loop().create_task(_quit(conn.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _tls_context(self, hop: HopSettings) -> ssl.SSLContext:
        """A cached context: loading the system CA bundle costs tens of milliseconds."""
        verify = hop.verify and hop.tls != "opportunistic"
        cache_key = (verify, hop.ca_file if verify else None)
        context = self._tls_contexts.get(cache_key)
        if context is None:
            context = _make_tls_context(verify, hop.ca_file)
            self._tls_contexts[cache_key] = context
        return context


def _remote_name(hop: HopSettings, address: str | None) -> str:
    """The host name for remote_mta (RFC 3464 2.3.5), "[address]" when there is none."""
    try:
        ipaddress.ip_address(hop.host)
    except ValueError:
        return hop.host
    return f"[{address or hop.host}]"


def _make_tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    if verify:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    else:
        # Opportunistic TLS (RFC 7435): encryption without authentication.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
    return context


async def _open_socket(host: str, port: int, timeout: float) -> socket.socket:
    """TCP to ``host`` (an address, or a name to resolve), every address in turn.

    The socket is opened here, not by aiosmtplib, because aiosmtplib checks an implicit
    TLS certificate against the host it connects to, and we connect to an address but
    must check the hop's name.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
            else:
                return sock
        raise error


async def _open_connection(
    hop: HopSettings,
    address: str | None,
    key: _Key,
    context: ssl.SSLContext,
    *,
    starttls: bool = True,
) -> _Connection:
    """Connect, greet, EHLO, STARTTLS, EHLO again, AUTH; or raise :class:`_HopFailure`."""
    target = address or hop.host
    where = f"{target}:{hop.port}"
    server_name = hop.tls_name or hop.host
    implicit = hop.tls == "implicit"
    try:
        sock = await _open_socket(target, hop.port, hop.connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise _HopFailure("4.4.1", f"connect to {where}: {exc or 'timed out'}") from exc
    smtp = SMTP(
        hostname=server_name,  # only used as the TLS server name: we pass the socket
        sock=sock,
        use_tls=implicit,
        start_tls=False,
        tls_context=context if implicit else None,
        local_hostname=hop.helo_name,
        timeout=hop.command_timeout,
    )
    try:
        try:
            await smtp.connect(timeout=hop.connect_timeout)
        except SMTPConnectResponseError as exc:
            _, reply = _parse_reply(SMTPResponse(exc.code, exc.message))
            raise _HopFailure("4.4.1", f"{where} greeted us with: {reply}") from exc
        except (SMTPException, OSError) as exc:
            if implicit and isinstance(exc.__cause__, ssl.SSLError | ssl.CertificateError):
                raise _HopFailure("4.7.5", f"TLS with {where} failed: {exc.__cause__}") from exc
            raise _HopFailure("4.4.1", f"connect to {where}: {exc}") from exc
        await _hello(smtp, hop, where)
        if hop.tls in ("starttls", "opportunistic") and starttls:
            if not smtp.supports_extension("starttls"):
                if hop.tls == "starttls":
                    raise _HopFailure("4.7.4", f"{where} does not offer STARTTLS (required)")
            else:
                try:
                    await _starttls(smtp, hop, server_name, context, where)
                except _HopFailure:
                    if hop.tls != "opportunistic":
                        raise
                    smtp.close()
                    return await _open_connection(hop, address, key, context, starttls=False)
                await _hello(smtp, hop, where)
        if hop.username is not None:
            await _authenticate(smtp, hop, where)
    except BaseException:
        smtp.close()
        sock.close()
        raise
    return _Connection(smtp, key, dict(smtp.esmtp_extensions))


async def _hello(smtp: SMTP, hop: HopSettings, where: str) -> None:
    """EHLO, and HELO if EHLO is refused (RFC 5321 4.1.1.1: a client MUST do so)."""
    try:
        try:
            await smtp.ehlo(hostname=hop.helo_name)
        except SMTPHeloError as exc:
            if exc.code == 421 or not smtp.is_connected:
                raise
            await smtp.helo(hostname=hop.helo_name)
    except SMTPResponseException as exc:
        enhanced, reply = _parse_reply(SMTPResponse(exc.code, exc.message))
        raise _HopFailure(_as_deferred(enhanced), f"{where} refused EHLO/HELO: {reply}") from exc
    except (SMTPException, OSError) as exc:
        raise _HopFailure("4.4.2", f"{where} during EHLO: {exc}") from exc


async def _starttls(
    smtp: SMTP, hop: HopSettings, server_name: str, context: ssl.SSLContext, where: str
) -> None:
    """RFC 3207: STARTTLS, then check the certificate (when the context verifies)."""
    try:
        await smtp.starttls(
            server_hostname=server_name, tls_context=context, timeout=hop.connect_timeout
        )
    except SMTPResponseException as exc:
        _, reply = _parse_reply(SMTPResponse(exc.code, exc.message))
        raise _HopFailure("4.7.5", f"{where} refused STARTTLS: {reply}") from exc
    except (SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
        raise _HopFailure("4.7.5", f"TLS with {where} failed: {exc}") from exc


async def _authenticate(smtp: SMTP, hop: HopSettings, where: str) -> None:
    """RFC 4954 AUTH, once, with the best mechanism offered; never a password in clear.

    One attempt only (aiosmtplib's ``login`` would try every mechanism in turn): each
    failed attempt counts against us at hops that lock accounts after failures. PLAIN
    (RFC 4616) is preferred over TLS, then LOGIN; CRAM-MD5 last, as it is obsolete.
    """
    encrypted = smtp.get_transport_info("sslcontext") is not None
    if not encrypted and hop.tls != "none":
        raise _HopFailure("4.7.10", f"not sending credentials to {where} without TLS")
    offered = smtp.server_auth_methods if smtp.supports_extension("auth") else []
    methods = {"plain": smtp.auth_plain, "login": smtp.auth_login, "cram-md5": smtp.auth_crammd5}
    chosen = next((name for name in methods if name in offered), None)
    if chosen is None:
        raise _HopFailure("4.7.0", f"{where} offers no AUTH mechanism we can use")
    try:
        await methods[chosen](hop.username or "", hop.password or "")
    except SMTPAuthenticationError as exc:
        enhanced, reply = _parse_reply(SMTPResponse(exc.code, exc.message))
        enhanced = _as_deferred(enhanced)
        if enhanced == "4.0.0":
            enhanced = "4.7.0"
        raise _HopFailure(
            enhanced, f"authentication to {where} ({chosen.upper()}) failed: {reply}"
        ) from exc
    except (SMTPException, OSError) as exc:
        raise _HopFailure("4.4.2", f"{where} during AUTH: {exc}") from exc


async def _still_usable(conn: _Connection, hop: HopSettings) -> bool:
    """NOOP before reuse (RFC 5321 4.1.1.9): an idle hop may have dropped us."""
    if not conn.smtp.is_connected:
        return False
    try:
        response = await conn.smtp.noop(timeout=min(hop.connect_timeout, hop.command_timeout))
    except (SMTPException, OSError):
        return False
    return response.code == 250


async def _reset(conn: _Connection, hop: HopSettings) -> bool:
    """RSET after a transaction that did not reach the end of data (RFC 5321 4.1.1.5)."""
    try:
        response = await conn.smtp.rset(timeout=hop.command_timeout)
    except (SMTPException, OSError):
        return False
    conn.needs_reset = False
    return response.code == 250


async def _quit(smtp: SMTP) -> None:
    with contextlib.suppress(SMTPException, OSError, TimeoutError):
        await smtp.quit(timeout=10.0)
    smtp.close()


# --- one transaction ----------------------------------------------------------------


class _Transaction:
    """MAIL, RCPT for each recipient, DATA or BDAT: one message on one connection."""

    def __init__(self, conn: _Connection, hop: HopSettings, job: Job, remote: str) -> None:
        self.conn = conn
        self.smtp = conn.smtp
        self.hop = hop
        self.job = job
        self.remote = remote
        self.outcomes: list[Outcome | None] = [None] * len(job.recipients)
        self.reusable = True
        self.reader: ReplyReader | None = None

    async def run(self) -> list[Outcome]:
        try:
            with _take_over(self.smtp) as self.reader:
                await self._run()
        except (SMTPException, OSError, TimeoutError) as exc:
            # The connection broke or desynchronised: whatever is undecided waits. After
            # the end of data this may deliver twice, which RFC 5321 6.1 accepts over loss.
            self.reusable = False
            self._decide_rest(
                Status.DEFERRED, f"connection to {self.remote} failed: {exc}", "4.4.2"
            )
        except _HopFailure as failure:
            self._decide_rest(failure.status, failure.reply, failure.enhanced)
        if not self.smtp.is_connected:
            self.reusable = False
        return [outcome for outcome in self.outcomes if outcome is not None]

    @property
    def answered(self) -> bool:
        """Whether the hop answered anything in this transaction (see HopPool.send)."""
        return self.reader is not None and self.reader.replies_seen > 0

    def _decide(self, index: int, status: Status, reply: str, enhanced: str) -> None:
        recipient = self.job.recipients[index]
        relayed = (
            status is Status.DELIVERED
            and not self.conn.offers("dsn")
            and "SUCCESS" in (n.upper() for n in recipient.notify or ())
        )
        self.outcomes[index] = Outcome(recipient, status, reply, enhanced, self.remote, relayed)

    def _decide_rest(self, status: Status, reply: str, enhanced: str) -> None:
        for index, outcome in enumerate(self.outcomes):
            if outcome is None:
                self._decide(index, status, reply, enhanced)

    def _decide_by_reply(self, indexes: Sequence[int], response: SMTPResponse) -> None:
        enhanced, reply = _parse_reply(response)
        for index in indexes:
            self._decide(index, _status_of(response.code), reply, enhanced)

    async def _run(self) -> None:
        envelope = self.job.envelope
        if envelope.smtputf8 and not self.conn.offers("smtputf8"):
            raise _HopFailure(
                "5.6.7",
                f"{self.remote} does not support SMTPUTF8, which this message needs (RFC 6531)",
                Status.FAILED,
            )
        content, mail_params, use_bdat = await self._prepare_content()
        mail = self._mail_command(mail_params)
        recipients = self._rcpt_commands()
        if not recipients:
            return  # every recipient was decided without asking the hop
        # Open from MAIL until the hop answers the end of the data, whatever it answers
        # then (RFC 5321 4.1.1.4); a refused DATA or BDAT chunk leaves it open: RSET.
        self.conn.needs_reset = True
        accepted, data_reply = await self._envelope(mail, recipients, with_data=not use_bdat)
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920 3.1: DATA was accepted though no recipient was; end it empty.
                await self._command(b".\r\n", self._final_timeout)
            return
        if use_bdat:
            response = await self._bdat(content)
        elif data_reply is None or data_reply.code != 354:
            response = data_reply or SMTPResponse(-1, "no reply to DATA")
        else:
            response = await self._data(content)
        self._decide_by_reply(accepted, response)

    async def _envelope(
        self, mail: bytes, recipients: list[tuple[int, bytes]], *, with_data: bool
    ) -> tuple[list[int], SMTPResponse | None]:
        """MAIL, RCPT for each recipient and (unless BDAT follows) DATA.

        To a hop offering PIPELINING (RFC 2920 3.1) they go out in one write, DATA last
        in the group, and the replies are read back in order; otherwise one at a time.
        Returns the indexes of the accepted recipients and the reply to DATA.
        """
        data = [b"DATA\r\n"] if with_data else []
        pipelining = self.conn.offers("pipelining")
        if pipelining:
            self._write(b"".join([mail, *(line for _, line in recipients), *data]))
        else:
            self._write(mail)
        reply = await self._reply()
        if reply.code != 250:
            if pipelining:  # the group's other replies are refusals; keep in step
                await self._skip_replies(len(recipients) + len(data))
            enhanced, text = _parse_reply(reply)
            raise _HopFailure(enhanced, text, _status_of(reply.code))
        accepted: list[int] = []
        for index, line in recipients:
            if not pipelining:
                self._write(line)
            reply = await self._reply()
            if reply.code in (250, 251):
                accepted.append(index)
                continue
            self._decide_by_reply([index], reply)
            if reply.code == 421:  # the hop is closing (RFC 5321 3.8): the rest waits
                self.reusable = False
                enhanced, text = _parse_reply(reply)
                raise _HopFailure(_as_deferred(enhanced), text)
        if not data:
            return accepted, None
        if not pipelining:
            if not accepted:
                return accepted, None
            self._write(data[0])
        return accepted, await self._reply()

    async def _skip_replies(self, count: int) -> None:
        for _ in range(count):
            reply = await self._reply()
            if reply.code == 354:  # a DATA accepted after all: end it empty
                await self._command(b".\r\n", self._final_timeout)

    def _write(self, data: bytes) -> None:
        transport = cast(asyncio.WriteTransport | None, self.smtp.transport)
        if transport is None or transport.is_closing():
            raise SMTPServerDisconnected("connection lost")
        transport.write(data)

    async def _reply(self, timeout: float | None = None) -> SMTPResponse:
        assert self.reader is not None
        return await self.reader.reply(self.hop.command_timeout if timeout is None else timeout)

    async def _command(self, line: bytes, timeout: float | None = None) -> SMTPResponse:
        self._write(line)
        return await self._reply(timeout)

    async def _prepare_content(self) -> tuple[_Content, list[str], bool]:
        """Pick DATA or BDAT, convert to 7 bit if the hop needs it, check SIZE.

        Returns the content, the MAIL parameters and whether to use BDAT.
        """
        envelope = self.job.envelope
        body = envelope.body.upper()
        params: list[str] = []
        use_bdat = False
        content = _Content(self.job.message.size, source=self.job.message)
        convert = False
        if body == "BINARYMIME":
            if self.conn.offers("binarymime") and self.conn.offers("chunking"):
                params.append("BODY=BINARYMIME")
                use_bdat = True
            else:
                convert = True
        elif body == "8BITMIME":
            if self.conn.offers("8bitmime"):
                params.append("BODY=8BITMIME")
            else:
                convert = True
        if convert:
            try:
                whole = await asyncio.to_thread(_convert_to_7bit, self.job)
            except RepairImpossible as exc:
                raise _HopFailure(
                    "5.6.3",
                    f"{self.remote} does not support {body} and the message cannot be"
                    f" converted to 7 bit: {exc.reason}",
                    Status.FAILED,
                ) from exc
            content = _Content(len(whole), whole=whole)
        if self.conn.offers("size"):
            limit_text = self.conn.extensions.get("size", "").strip()
            limit = int(limit_text) if limit_text.isdigit() else 0
            if limit and content.size > limit:
                raise _HopFailure(
                    "5.3.4",
                    f"message of {content.size} octets exceeds the limit of {self.remote},"
                    f" {limit} octets (RFC 1870)",
                    Status.FAILED,
                )
            params.append(f"SIZE={content.size}")
        if envelope.smtputf8:
            params.append("SMTPUTF8")
        if self.conn.offers("dsn"):
            if envelope.ret:
                params.append(f"RET={envelope.ret.upper()}")
            if envelope.envid:
                params.append(f"ENVID={xtext(envelope.envid)}")
        return content, params, use_bdat

    def _path(self, address: str) -> bytes:
        """``<address>`` for MAIL/RCPT, UTF-8 only in an SMTPUTF8 transaction (RFC 6531 3.3)."""
        encoding = "utf-8" if self.job.envelope.smtputf8 else "ascii"
        return b"<" + address.encode(encoding) + b">"

    def _mail_command(self, params: list[str]) -> bytes:
        try:
            path = self._path(self.job.envelope.sender)
        except UnicodeEncodeError as exc:
            raise _HopFailure("5.6.7", "non-ASCII sender without SMTPUTF8", Status.FAILED) from exc
        return b" ".join([b"MAIL FROM:" + path, *(p.encode("ascii") for p in params)]) + CRLF

    def _rcpt_commands(self) -> list[tuple[int, bytes]]:
        """(index, RCPT line) for each recipient the hop can be asked about."""
        commands: list[tuple[int, bytes]] = []
        dsn = self.conn.offers("dsn")
        for index, recipient in enumerate(self.job.recipients):
            try:
                path = self._path(recipient.address)
            except UnicodeEncodeError:
                self._decide(index, Status.FAILED, "non-ASCII recipient without SMTPUTF8", "5.6.7")
                continue
            params: list[bytes] = []
            if dsn:
                if recipient.notify:
                    params.append(b"NOTIFY=" + ",".join(recipient.notify).upper().encode("ascii"))
                params.append(b"ORCPT=" + _orcpt(recipient).encode("ascii"))
            commands.append((index, b" ".join([b"RCPT TO:" + path, *params]) + CRLF))
        return commands

    async def _data(self, content: _Content) -> SMTPResponse:
        """The dot-stuffed message streamed in pieces after 354, then "." (RFC 5321
        4.1.1.4)."""
        stuffer = DotStuffer()
        async for piece in _pieces(content):
            self._write(stuffer.feed(piece))
            await self._drain()
        self._write(stuffer.finish())
        response = await self._reply(self._final_timeout)
        self.conn.needs_reset = False
        return response

    async def _bdat(self, content: _Content) -> SMTPResponse:
        """BDAT chunks, the last one marked LAST (RFC 3030 2); no stuffing, exact octets."""
        pieces = _pieces(content)
        current = await anext(pieces, None)
        while True:
            following = await anext(pieces, None)
            data = current or b""
            last = following is None
            await self._drain()
            self._write(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode("ascii"))
            self._write(data)
            response = await self._reply(self._final_timeout if last else None)
            if last:
                self.conn.needs_reset = False
                return response
            if response.code != 250:
                return response  # RFC 3030 2: send no more chunks; RSET follows
            current = following

    @property
    def _final_timeout(self) -> float:
        """RFC 5321 4.5.3.2.6: wait at least 10 minutes for the reply to the end of data.

        Giving up sooner is how duplicates are made: the hop may be delivering while we
        defer and send again later.
        """
        return max(self.hop.command_timeout, 600.0)

    async def _drain(self) -> None:
        """Wait while the socket's buffer is full, so a large message is never all queued."""
        assert self.reader is not None
        await self.reader.drain(self.hop.command_timeout)


@contextlib.contextmanager
def _take_over(smtp: SMTP) -> Iterator[ReplyReader]:
    """Give the connection's transport to a ReplyReader for one transaction, then back.

    Between transactions aiosmtplib's protocol has no command outstanding, so nothing
    can be lost in the swap. A connection that died meanwhile is reported to it, so
    that ``is_connected`` tells the pool the truth.
    """
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise SMTPServerDisconnected("connection lost")
    reader = ReplyReader()
    transport.set_protocol(reader)
    try:
        yield reader
    finally:
        if reader.lost is not None:
            protocol.connection_lost(reader.lost)
        else:
            transport.set_protocol(protocol)


async def _pieces(content: _Content) -> AsyncIterator[bytes]:
    """The content's non-empty pieces (a stored message is read by content.pieces)."""
    if content.whole is not None:
        if content.whole:
            yield content.whole
        return
    assert content.source is not None
    async for piece in pieces(content.source):
        yield piece
