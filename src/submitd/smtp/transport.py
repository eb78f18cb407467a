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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import cast

from submitd.envelope import SessionInfo
from submitd.message.draft import Draft
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
from submitd.smtp.session import Session, SessionSettings
from submitd.submission import AuthenticatedUser, Submission

log = logging.getLogger("submitd.session")

_session_numbers = itertools.count(1)
_PROCESS_TAG = f"{os.getpid():x}"


@dataclass(slots=True)
class ListenerContext:
    """What every connection of a server shares."""

    settings: SessionSettings
    ssl_context: ssl.SSLContext
    submission: Submission
    idle_timeout: float
    command_timeout: float
    tls_handshake_timeout: float = 30.0
    sessions: set[SubmissionProtocol] = field(default_factory=set)


class SubmissionProtocol(asyncio.Protocol):
    def __init__(self, context: ListenerContext, *, implicit_tls: bool) -> None:
        self.context = context
        self.implicit_tls = implicit_tls
        self.session = Session(context.settings, tls=implicit_tls)
        self.session_id = f"{_PROCESS_TAG}.{next(_session_numbers)}"
        self.transport: asyncio.Transport | None = None
        self.client_ip = "unknown"
        self.client_port = 0
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._upgrading = False
        self._held: list[bytes] = []  # decrypted input that came before the upgrade ended
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
        if self.implicit_tls:
            self._note_tls(transport)
        self.context.sessions.add(self)
        log.info(
            "session=%s connect client=%s port=%d tls=%s",
            self.session_id,
            self.client_ip,
            self.client_port,
            self._tls_version or "no",
        )
        self._arm_timer(self.context.idle_timeout)
        self._carry_out(self.session.greeting())

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if self._upgrading:
            self._held.append(data)
            return
        self._carry_out(self.session.receive_data(data))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.context.sessions.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._draft is not None and not self.session.waiting:
            self._draft.abort()
            self._draft = None
        log.info("session=%s disconnect", self.session_id)

    # --------------------------------------------------------------- events

    def _carry_out(self, events: list[Event]) -> None:
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
            assert self.transport is not None
            self.transport.close()
        elif isinstance(event, StartTLS):
            assert self.transport is not None
            self.transport.pause_reading()  # not one more plaintext octet
            self._upgrading = True
            self._spawn(self._upgrade())
        elif isinstance(event, Authenticate):
            self._spawn(self._authenticate(event))
        elif isinstance(event, MessageEnd):
            self._spawn(self._commit())

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))
        out.clear()

    def _hold_input_while_waiting(self) -> None:
        """While the session waits for us, stop reading so that input stays bounded."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._upgrading:
            return
        if self.session.waiting:
            transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _spawn(self, coroutine: Coroutine[None, None, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- tasks

    async def _upgrade(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            tls_transport = await asyncio.wait_for(
                self._loop.start_tls(transport, self, self.context.ssl_context, server_side=True),
                self.context.tls_handshake_timeout,
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
        log.info("session=%s starttls %s %s", self.session_id, self._tls_version, self._tls_cipher)
        self._carry_out(self.session.tls_started())
        held, self._held = self._held, []
        for data in held:
            self._carry_out(self.session.receive_data(data))

    async def _authenticate(self, event: Authenticate) -> None:
        try:
            principal = await asyncio.wait_for(
                self.context.submission.authenticate(event.login, event.password),
                self.context.command_timeout,
            )
        except Exception:
            log.exception("session=%s AUTH check failed", self.session_id)
            self._carry_out(self.session.auth_result(None, failure=R.AUTH_TEMPORARY))
            return
        if principal is None:
            # RFC 6409 5.2 / RFC 4954 4: log who failed from where, never the password.
            log.warning(
                "session=%s auth failed user=%r client=%s mechanism=%s",
                self.session_id,
                event.login,
                self.client_ip,
                event.mechanism,
            )
        else:
            self._principal = principal
            log.info("session=%s auth ok user=%s", self.session_id, principal.login)
        self._carry_out(self.session.auth_result(principal))

    async def _commit(self) -> None:
        draft, principal = self._draft, self._principal
        assert draft is not None and principal is not None
        try:
            # RFC 6409 5.3: every command is answered within the command timeout.
            reply = await asyncio.wait_for(
                self.context.submission.finish(draft, principal, self._info()),
                self.context.command_timeout,
            )
        except TimeoutError:
            reply = R.LOCAL_ERROR
        self._draft = None
        self._carry_out(self.session.message_result(reply))

    # ---------------------------------------------------------------- timers

    def _arm_timer(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        """One timer per session, re-armed lazily: cheaper than one per data_received."""
        if self.session.closed:
            return
        idle = self._loop.time() - self._last_activity
        remaining = self.context.idle_timeout - idle
        if remaining > 0 or self.session.waiting:
            self._arm_timer(max(remaining, 1.0))
            return
        log.info("session=%s idle timeout", self.session_id)
        self._carry_out(self.session.timeout())

    def shut_down(self, *, force: bool = False) -> None:
        """Server shutdown: say 421 4.3.2 and close (RFC 5321 3.8), once the session is
        between transactions; `force` does it even in the middle of one."""
        if force or not (self.session.waiting or self.session.in_transaction):
            self._carry_out(self.session.shutdown())

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
