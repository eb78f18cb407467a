"""The asyncio transport under the sans-I/O session: sockets, TLS, timers, tasks.

One `SubmissionProtocol` per connection. It feeds received octets to the session and
carries out the events it returns, writing all the replies of one batch in one
`write` (RFC 2920). Work that takes time (password checks, the durable commit, the TLS
handshake) runs as a task while the session holds further input.

STARTTLS on asyncio needs care (RFC 3207 5): reading is paused in the same call that
sees the STARTTLS event, so no octet that follows can be read as plaintext; anything
already buffered after the command is dropped by the session; and the first octets
decrypted by the new TLS transport, which may arrive before `start_tls` returns, are
held until the session knows TLS is in place. Nothing is ever written on the old
transport after the 220.

Port 465 (RFC 8314) is plain TCP here, upgraded with `start_tls` and the context of the
moment, for two reasons: a SIGHUP reload of the certificate applies to it too, and a
PROXY protocol header (which comes before the TLS handshake) can be read first.

Abuse defences (issue 6) live here because they are about connections and time, which
the session does not know: per-address connection limits at accept, the AUTH throttle
(a failed login is answered only after a delay; a blocked address gets 421 at the
greeting and 454 at AUTH), timeouts for a whole command line, the TLS handshake, a
minimum DATA rate and the whole session, and a one-second pause per reply once a client
has made too many errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from submitd.config import LimitsConfig
from submitd.envelope import SessionInfo
from submitd.message.draft import Draft
from submitd.policy.abuse import AuthThrottle, ConnectionLimiter
from submitd.smtp import replies as R
from submitd.smtp.events import (
    Authenticate,
    Close,
    Event,
    MessageAbort,
    MessageBegin,
    MessageChunk,
    MessageEnd,
    Send,
    StartTLS,
)
from submitd.smtp.proxy import ProxyError, ProxyHeaderReader
from submitd.smtp.session import Session, SessionSettings
from submitd.submission import AuthenticatedUser, Submission

log = logging.getLogger("submitd.session")

_session_numbers = itertools.count(1)
_PROCESS_TAG = f"{os.getpid():x}"
_BLOCKED_AUTH = R.reply(454, "4.7.0", "Too many failed logins from your network; try later")
_RATE_CHECK_EVERY = 5.0
_TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake, versions 3.x

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class ListenerContext:
    """What every connection of a server shares; replaced parts apply to new sessions."""

    settings: SessionSettings
    ssl_context: ssl.SSLContext
    submission: Submission
    limits: LimitsConfig
    throttle: AuthThrottle | None = None
    connections: ConnectionLimiter | None = None
    proxy_networks: Sequence[Network] = ()
    sessions: set[SubmissionProtocol] = field(default_factory=set)
    fingerprint_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))


class SubmissionProtocol(asyncio.Protocol):
    def __init__(self, context: ListenerContext, *, implicit_tls: bool) -> None:
        self.context = context
        self.limits = context.limits
        self.implicit_tls = implicit_tls
        self.session = Session(context.settings, tls=implicit_tls)
        self.session_id = f"{_PROCESS_TAG}.{next(_session_numbers)}"
        self.transport: asyncio.Transport | None = None
        self.client_ip = "unknown"
        self.client_port = 0
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._started_at = now
        self._last_activity = now
        self._line_started: float | None = None
        self._content_started: float | None = None
        self._content_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._proxy: ProxyHeaderReader | None = None
        self._admitted = False
        self._refusal: R.Reply | None = None
        self._greeted = False
        self._upgrading = False
        self._held: list[bytes] = []  # decrypted input that came before the upgrade ended
        # Port 465: raw octets (the ClientHello) read before start_tls took over the
        # connection; they go to the TLS protocol, never to the session.
        self._raw: list[bytes] | None = None
        self._delayed_until = 0.0  # error pacing: nothing is written before this
        self._errors_seen = 0  # session.errors when the last batch was carried out
        self._first_input = True
        self._timer_when = 0.0
        self._draft: Draft | None = None
        self._principal: AuthenticatedUser | None = None
        self._tls_version: str | None = None
        self._tls_cipher: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ asyncio API

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("unknown", 0)
        self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.context.sessions.add(self)
        self._arm_timer()
        if _trusted(self.client_ip, self.context.proxy_networks):
            self._proxy = ProxyHeaderReader()  # required from a trusted balancer
            return
        self._begin(b"")

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if self._proxy is not None:
            self._read_proxy_header(data)
            return
        if self._raw is not None:
            self._raw.append(data)
            return
        if self._upgrading or not self._greeted:
            self._held.append(data)
            return
        if not self.session.tls and data[:2] == _TLS_HANDSHAKE and self._first_input:
            # A TLS ClientHello on the STARTTLS port (a client set up for 465): it will
            # never send a line, so close now rather than hold a slot until the timeout.
            log.info("session=%s TLS handshake on a plaintext port; closing", self.session_id)
            self._abort()
            return
        self._first_input = False
        if self.session.in_content:
            self._count_content(len(data))
        self._carry_out(self.session.receive_data(data))
        self._track_line()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.context.sessions.discard(self)
        if self._admitted and self.context.connections is not None:
            self.context.connections.release(self.client_ip)
        if self._timer is not None:
            self._timer.cancel()
        if self._draft is not None and not self.session.waiting:
            self._draft.abort()
            self._draft = None
        log.info("session=%s disconnect", self.session_id)

    # ------------------------------------------------------- start of session

    def _read_proxy_header(self, data: bytes) -> None:
        reader = self._proxy
        assert reader is not None
        try:
            if not reader.feed(data):
                return
        except ProxyError as error:
            log.warning(
                "session=%s bad PROXY header from %s: %s", self.session_id, self.client_ip, error
            )
            self._abort()
            return
        self._proxy = None
        if reader.result is not None:
            self.client_ip, self.client_port = reader.result.client_ip, reader.result.client_port
        self._begin(reader.rest)

    def _begin(self, leftover: bytes) -> None:
        """Admit the client (limits), then TLS for port 465, then the greeting."""
        log.info(
            "session=%s connect client=%s port=%d",
            self.session_id,
            self.client_ip,
            self.client_port,
        )
        refusal = self._admission_refusal()
        if refusal is not None:
            log.warning(
                "session=%s refused client=%s: %s", self.session_id, self.client_ip, refusal.text
            )
            self._write(refusal.encode())
            self._close_transport()
            return
        if self.implicit_tls:
            self._upgrading = True
            self._raw = [leftover]
            assert self.transport is not None
            self.transport.pause_reading()
            self._spawn(self._upgrade(b"", greet=True))
            return
        self._greet(leftover)

    def _admission_refusal(self) -> R.Reply | None:
        now = time.time()
        connections = self.context.connections
        if connections is not None:
            text = connections.admit(self.client_ip, now)
            if text is not None:
                return R.reply(421, "4.7.0", text)
            self._admitted = True
        throttle = self.context.throttle
        if throttle is not None and throttle.blocked(self.client_ip, now):
            return R.reply(421, "4.7.0", f"Too many failed logins from {self.client_ip}")
        return None

    def _greet(self, leftover: bytes) -> None:
        if self._refusal is not None:
            self._write(self._refusal.encode())  # 421 4.7.0 instead of the greeting
            self._close_transport()
            return
        self._greeted = True
        self._carry_out(self.session.greeting())
        held, self._held = [leftover, *self._held], []
        for data in held:
            if data:
                self._carry_out(self.session.receive_data(data))
        self._track_line()

    # --------------------------------------------------------------- events

    def _carry_out(self, events: list[Event]) -> None:
        pace = self._pacing(events)
        if pace > 0:
            self._delay(pace, events)
            return
        self._carry_out_now(events)

    def _pacing(self, events: list[Event]) -> float:
        """Seconds to hold this batch: 1 s per new error past the limit (issue 6)."""
        over = self.session.errors - max(self._errors_seen, self.limits.error_delay_after)
        self._errors_seen = self.session.errors
        return float(over) if over > 0 and events else 0.0

    def _delay(self, seconds: float, events: list[Event]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()
        self._delayed_until = self._loop.time() + seconds
        self._loop.call_later(seconds, self._after_delay, events)

    def _after_delay(self, events: list[Event]) -> None:
        self._delayed_until = 0.0
        self._carry_out_now(events)

    def _carry_out_now(self, events: list[Event]) -> None:
        out: list[bytes] = []
        for event in events:
            if isinstance(event, Send):
                out.append(event.data)
            elif isinstance(event, MessageChunk):
                assert self._draft is not None
                self._draft.write(event.data)
            elif isinstance(event, MessageBegin):
                assert self._principal is not None
                self._draft = self.context.submission.begin(event.envelope, self._principal)
            elif isinstance(event, MessageAbort):
                if self._draft is not None:
                    self._draft.abort()
                    self._draft = None
            else:
                self._flush(out)
                self._carry_out_control(event)
        self._flush(out)
        self._hold_input_while_waiting()

    def _carry_out_control(self, event: Event) -> None:
        if isinstance(event, Close):
            self._close_transport()
        elif isinstance(event, StartTLS):
            assert self.transport is not None
            self.transport.pause_reading()  # not one more plaintext octet
            self._upgrading = True
            self._spawn(self._upgrade(b"", greet=False))
        elif isinstance(event, Authenticate):
            self._spawn(self._authenticate(event))
        elif isinstance(event, MessageEnd):
            self._spawn(self._commit())

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self._write(b"".join(out))
        out.clear()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _hold_input_while_waiting(self) -> None:
        """While the session waits for us, stop reading so that input stays bounded."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._upgrading:
            return
        if self.session.waiting or self._delayed_until:
            transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- tasks

    async def _upgrade(self, leftover: bytes, *, greet: bool) -> None:
        """TLS on this connection: STARTTLS, or from the first octet on port 465."""
        transport = self.transport
        assert transport is not None
        if self._raw is not None:
            leftover, self._raw = b"".join(self._raw), None
        if leftover:
            # Octets read with a PROXY header already belong to the TLS handshake: hand
            # them to the TLS protocol once start_tls has installed it (two turns of the
            # loop: after its connection_made, before reading resumes).
            self._loop.call_soon(self._loop.call_soon, _inject, transport, leftover)
        try:
            # asyncio.timeout, not wait_for: start_tls must run in this task, so that the
            # callbacks above run in the order the comment says.
            async with asyncio.timeout(self.limits.tls_handshake_timeout):
                tls_transport = await self._loop.start_tls(
                    transport, self, self.context.ssl_context, server_side=True
                )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            log.info("session=%s TLS handshake failed: %s", self.session_id, error)
            transport.abort()
            return
        if tls_transport is None:
            transport.abort()
            return
        self.transport = tls_transport
        self._upgrading = False
        self._note_tls(tls_transport)
        log.info("session=%s tls %s %s", self.session_id, self._tls_version, self._tls_cipher)
        if greet:
            self._greet(b"")
            return
        self._carry_out(self.session.tls_started())
        held, self._held = self._held, []
        for data in held:
            self._carry_out(self.session.receive_data(data))

    async def _authenticate(self, event: Authenticate) -> None:
        throttle = self.context.throttle
        if throttle is not None and throttle.blocked(self.client_ip, time.time()):
            log.warning(
                "session=%s auth refused: client=%s is blocked", self.session_id, self.client_ip
            )
            self._carry_out(self.session.auth_result(None, failure=_BLOCKED_AUTH))
            return
        try:
            principal = await asyncio.wait_for(
                self.context.submission.authenticate(event.login, event.password),
                self.limits.command_timeout,
            )
        except Exception:
            log.exception("session=%s AUTH check failed", self.session_id)
            self._carry_out(self.session.auth_result(None, failure=R.AUTH_TEMPORARY))
            return
        if principal is None:
            await self._after_failed_login(event)
        else:
            self._principal = principal
            if throttle is not None:
                throttle.record_success(self.client_ip, principal.login, time.time())
            log.info("session=%s auth ok user=%s", self.session_id, principal.login)
        self._carry_out(self.session.auth_result(principal))

    async def _after_failed_login(self, event: Authenticate) -> None:
        """Log it (never the password) and make the guesser wait (issue 6)."""
        # RFC 6409 5.2 / RFC 4954 4: who failed, from where.
        log.warning(
            "session=%s auth failed user=%r client=%s mechanism=%s",
            self.session_id,
            event.login,
            self.client_ip,
            event.mechanism,
        )
        throttle = self.context.throttle
        if throttle is None:
            return
        now = time.time()
        secret = f"{event.login.lower()}\0{event.password}".encode()
        fingerprint = hmac.new(self.context.fingerprint_key, secret, hashlib.sha256).digest()
        throttle.record_failure(self.client_ip, event.login, fingerprint, now)
        delay = throttle.failure_delay(self.client_ip, now)
        delay += throttle.account_delay(self.client_ip, event.login, now)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _commit(self) -> None:
        draft, principal = self._draft, self._principal
        assert draft is not None and principal is not None
        try:
            # RFC 6409 5.3: every command is answered within the command timeout.
            async with asyncio.timeout(self.limits.command_timeout):
                reply = await self.context.submission.finish(draft, principal, self._info())
        except TimeoutError:
            reply = R.LOCAL_ERROR
        self._draft = None
        self._carry_out(self.session.message_result(reply))

    # ---------------------------------------------------------------- timers

    def _track_line(self) -> None:
        if self.session.partial_line:
            if self._line_started is None:
                self._line_started = self._loop.time()
                self._rearm_if_sooner()
        else:
            self._line_started = None
        if not self.session.in_content:
            self._content_started = None
            self._content_bytes = 0

    def _count_content(self, size: int) -> None:
        if self._content_started is None:
            self._content_started = self._loop.time()
            self._rearm_if_sooner()
        self._content_bytes += size

    def _rearm_if_sooner(self) -> None:
        """One timer per session, moved only when a new deadline comes before it."""
        if self._next_deadline() < self._timer_when:
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = self._next_deadline()
        delay = max(self._timer_when - self._loop.time(), 0.05)
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _idle_limit(self) -> float:
        """Idle seconds allowed now; shorter before AUTH when the server is busy."""
        connections = self.context.connections
        if self.session.principal is None and connections is not None and connections.busy:
            return min(self.limits.busy_timeout, self.limits.idle_timeout)
        return self.limits.idle_timeout

    def _next_deadline(self) -> float:
        deadlines = [
            self._started_at + self.limits.session_timeout,
            self._last_activity + self._idle_limit(),
        ]
        if not self._greeted:
            deadlines.append(self._started_at + self.limits.tls_handshake_timeout)
        if self._line_started is not None:
            deadlines.append(self._line_started + self.limits.line_timeout)
        if self._content_started is not None:
            every = min(_RATE_CHECK_EVERY, max(self.limits.data_rate_grace, 0.5))
            deadlines.append(self._loop.time() + every)
        return min(deadlines)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session.closed or self.transport is None or self.transport.is_closing():
            return
        reason = self._expired()
        if reason is None or self.session.waiting:
            self._arm_timer()
            return
        log.info("session=%s timeout: %s", self.session_id, reason)
        if not self._greeted:
            self._abort()  # no SMTP yet (PROXY header or TLS handshake never finished)
            return
        self._carry_out_now(self.session.timeout())

    def _expired(self) -> str | None:
        now = self._loop.time()
        if now - self._started_at >= self.limits.session_timeout:
            return "session too long"
        if not self._greeted and now - self._started_at >= self.limits.tls_handshake_timeout:
            return "no PROXY header or TLS handshake in time"
        if self._line_started is not None and now - self._line_started >= self.limits.line_timeout:
            return "command line too slow"
        if self._content_too_slow(now):
            return "data too slow"
        if now - self._last_activity >= self._idle_limit():
            return "idle"
        return None

    def _content_too_slow(self, now: float) -> bool:
        if self._content_started is None or not self.limits.data_min_rate:
            return False
        elapsed = now - self._content_started
        if elapsed < self.limits.data_rate_grace:
            return False
        return self._content_bytes / elapsed < self.limits.data_min_rate

    def shut_down(self, *, force: bool = False) -> None:
        """Server shutdown: say 421 4.3.2 and close (RFC 5321 3.8), once the session is
        between transactions; `force` does it even in the middle of one."""
        if not self._greeted:
            self._abort()
        elif force or not (self.session.waiting or self.session.in_transaction):
            self._carry_out_now(self.session.shutdown())

    # ---------------------------------------------------------------- helpers

    def _note_tls(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self._tls_cipher = cipher[0] if cipher else None

    def _info(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.session_id,
            client_ip=self.client_ip,
            client_port=self.client_port,
            ehlo_name=self.session.ehlo_name or "",
            tls_version=self._tls_version,
            tls_cipher=self._tls_cipher,
            user=self._principal.login if self._principal else None,
        )


def _trusted(ip: str, networks: Sequence[Network]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _inject(transport: asyncio.Transport, data: bytes) -> None:
    """Give octets already read to the protocol now installed on `transport` (the TLS
    protocol of start_tls, a BufferedProtocol on asyncio and on uvloop)."""
    protocol: Any = transport.get_protocol()
    if not hasattr(protocol, "get_buffer"):
        protocol.data_received(data)
        return
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
