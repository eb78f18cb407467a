"""A stored message on its way out: read in pieces, dot-stuffed for DATA.

Shared by the SMTP and LMTP clients, which send the same octets the same way.

Reading: a spooled body is read in a worker thread (DESIGN principle 8: the event loop
never waits for the disk), a few pieces per trip, as each trip costs two context switches
(for a 1 MiB message as much CPU as reading it); content held in memory is iterated on
the loop.

Stuffing (RFC 5321 4.5.2): a line that starts with "." gets another one. The stored
content is CRLF-only outside BINARYMIME (the session refuses bare CR and LF; BINARYMIME
goes by BDAT, unstuffed), so a line starts after CRLF, and the last two octets of the
previous piece decide whether a piece's first octets start one. A small piece gets one
`bytes.replace`; a large one is searched with numpy (`submitd.lines`) and, as in nearly
every message, goes out without a copy when no line starts with a dot.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

from submitd.delivery.types import MessageSource
from submitd.lines import LARGE, dots_after_lf

CRLF = b"\r\n"
READ_AHEAD = 4  # stored pieces (1 MiB each) read per trip to a thread


async def pieces(message: MessageSource) -> AsyncIterator[bytes]:
    """The message's non-empty pieces, in order."""
    iterator = message.chunks()
    if message.in_memory:
        for piece in iterator:
            if piece:
                yield piece
        return
    while True:
        batch = await asyncio.to_thread(_take, iterator, READ_AHEAD)
        for piece in batch:
            if piece:
                yield piece
        if len(batch) < READ_AHEAD:
            return


def _take(iterator: Iterator[bytes], count: int) -> list[bytes]:
    return list(itertools.islice(iterator, count))


class DotStuffer:
    """Dot-stuff a message given in pieces, whatever the piece borders."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = CRLF  # the message starts at a line start

    @property
    def ends_with_crlf(self) -> bool:
        return self._tail == CRLF

    def feed(self, piece: bytes) -> bytes:
        if not piece:
            return piece
        if len(piece) >= LARGE:
            return self._feed_large(piece)
        joined = self._tail + piece
        stuffed = joined.replace(b"\r\n.", b"\r\n..")[len(self._tail) :]
        self._tail = joined[-2:]
        return stuffed

    def finish(self) -> bytes:
        """The end of data, with the CRLF that a message not ending in one needs for the
        dot to stand on a line of its own (RFC 5321 4.1.1.4)."""
        return b".\r\n" if self.ends_with_crlf else b"\r\n.\r\n"

    def _feed_large(self, piece: bytes) -> bytes:
        head = self._tail + piece[:2]  # line starts at piece offsets 0 and 1
        dots = [d - 2 for d in dots_after_lf(head) if d >= 2 and head[d - 2 : d] == CRLF]
        dots += [d for d in dots_after_lf(piece) if d >= 2 and piece[d - 2 : d] == CRLF]
        self._tail = (self._tail + piece[-2:])[-2:]
        if not dots:
            return piece
        bounds = zip([0, *dots], [*dots, len(piece)], strict=True)
        return b".".join(piece[start:end] for start, end in bounds)


def dot_stuff(message: bytes) -> bytes:
    """The whole DATA payload of a message in memory: stuffed, with the end of data."""
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.finish()
