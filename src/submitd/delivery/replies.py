"""Reading a next hop's replies during a mail transaction, pipelined or not.

aiosmtplib opens the connection and does EHLO, STARTTLS and AUTH; for the transaction
itself the transport is handed to a :class:`ReplyReader` for as long as it lasts, then
given back. Why: aiosmtplib keeps a single reply waiter and drops replies that arrive
while none is pending, so it cannot pipeline (RFC 2920), and its per-command
`wait_for` costs more than the delivery of a small message should. Here every reply is
parsed as it arrives and queued in order, so MAIL, every RCPT and DATA can go out in one
write and their replies are read back one by one (RFC 2920 3.1).

The parser follows RFC 5321 4.2.1: a reply is one or more lines "ddd-text" ending with
a line "ddd text"; the text of the lines is joined with "\\n" (what aiosmtplib's
`SMTPResponse` holds, which the rest of the client reads).
"""

from __future__ import annotations

import asyncio
import collections

from aiosmtplib import SMTPResponse
from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected

MAX_LINE = 8192  # RFC 5321 4.5.3.1.5 allows 512; generous, but bounded
MAX_LINES = 100  # lines in one reply


class ReplyReader(asyncio.Protocol):
    """Protocol for one transaction: queues replies, tracks write flow control."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # lines of the reply being received
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.lost: Exception | None = None  # set when the connection went away
        self.replies_seen = 0

    # -- asyncio.Protocol --

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return  # out of step with the hop: nothing more can be read reliably
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            self._line(bytes(self._buffer[start : end + 1]))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > MAX_LINE:
            self._fail(SMTPResponseException(-1, "reply line too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("the hop closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or SMTPServerDisconnected("connection lost")
        self._fail(self.lost)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- for the transaction --

    async def reply(self, timeout: float) -> SMTPResponse:
        """The next reply, in the order the commands were sent."""
        if not self._replies and self._error is None:
            self._waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._error is not None
        raise self._error

    async def drain(self, timeout: float) -> None:
        """Wait while the transport's buffer is over its high mark."""
        if self._writable is not None:
            async with asyncio.timeout(timeout):
                await self._writable
        if self.lost is not None:
            raise self.lost

    # -- parsing --

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_LINE or not line[:3].isdigit():
            self._fail(SMTPResponseException(-1, f"malformed reply line: {line[:80]!r}"))
            return
        self._lines.append(line)
        if line[3:4] == b"-":
            if len(self._lines) > MAX_LINES:
                self._fail(SMTPResponseException(-1, "reply of too many lines"))
            return
        text = "\n".join(
            part[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape") for part in self._lines
        )
        self._replies.append(SMTPResponse(int(line[:3]), text))
        self.replies_seen += 1
        self._lines = []

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
