"""A message on its way in: the header held back for cleanup, the body streamed through.

The header section is the only part submitd may change (DESIGN principle 4), and fix-ups
must be decided before the first octet of it reaches the spool. So the draft keeps the
octets up to the blank line in memory (bounded by `max_header_size`), hands them to a
`clean` function once complete, writes the cleaned header, and from then on passes the
body to the spool writer untouched, looking at it only to notice 8-bit data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from submitd.envelope import Envelope
from submitd.message.headers import addresses, field_values
from submitd.smtp import replies as R
from submitd.smtp.replies import Reply
from submitd.store.queue import SpoolWriter, StorageError, StorageFull

HeaderCleaner = Callable[[bytes], bytes]  # raises Rejection with the reply to give

_NO_SEPARATOR = R.reply(
    554, "5.6.0", "Message has no empty line between header and body (RFC 5322 2.1)"
)
_HEADER_TOO_BIG = R.reply(554, "5.6.0", "Message header section is too large")


class Rejection(Exception):
    """The content is refused with this reply; raised by a HeaderCleaner."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


@dataclass(slots=True)
class Draft:
    envelope: Envelope
    writer: SpoolWriter
    clean: HeaderCleaner
    max_header_size: int
    rejection: Reply | None = None
    header: bytes | None = None  # the cleaned header section, once written
    eight_bit: bool = False  # octets above 127 seen (in the header or body)
    _pending: bytearray = field(default_factory=bytearray)
    _authors: list[str] | None = None

    @property
    def queue_id(self) -> str:
        return self.writer.queue_id

    @property
    def body_offset(self) -> int:
        """Where the body starts in what the writer holds (after the blank line)."""
        assert self.header is not None
        return len(self.header) + 2

    def write(self, data: bytes) -> None:
        if self.rejection is not None:
            return
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        try:
            if self.header is not None:
                self.writer.write(data)
                return
            self._pending += data
            self._try_header()
        except StorageFull:
            self._reject(R.NO_SPACE)  # 452 4.3.1: try again later; nothing acknowledged
        except StorageError:
            self._reject(R.LOCAL_ERROR)

    def finish(self) -> Reply | None:
        """The rejection owed at the end of the data, if any."""
        if self.rejection is None and self.header is None:
            self.rejection = _NO_SEPARATOR  # RFC 5322 2.1 via issue: reject, don't guess
        return self.rejection

    def authors(self) -> list[str]:
        """The From: addresses of the cleaned header, read once: the rights check and
        the choice of DKIM keys both need them."""
        if self._authors is None:
            assert self.header is not None
            self._authors = addresses(field_values(self.header, "From"))
        return self._authors

    def body_chunks(self) -> Iterator[bytes]:
        """The body as stored (call from a thread: a spooled body is read from disk)."""
        return self.writer.content_chunks(self.body_offset)

    def abort(self) -> None:
        self.writer.abort()

    def replace_content(
        self, open_writer: Callable[[str], SpoolWriter], header: bytes, body: bytes
    ) -> None:
        """Start over with repaired content (RFC 6409 8.4), under the same queue id."""
        queue_id = self.queue_id
        self.writer.abort()
        self.writer = open_writer(queue_id)
        self.writer.write(header)
        self.writer.write(b"\r\n")
        self.writer.write(body)
        self.header = header
        self._authors = None
        self.eight_bit = not (header + body).isascii()

    def _try_header(self) -> None:
        pending = self._pending
        if pending[:2] == b"\r\n":
            end = 0  # an empty header section; the cleaner reports the missing From
        else:
            found = pending.find(b"\r\n\r\n")
            if found < 0:
                if len(pending) > self.max_header_size:
                    self._reject(_HEADER_TOO_BIG)
                return
            end = found + 2
        if end > self.max_header_size:
            self._reject(_HEADER_TOO_BIG)
            return
        try:
            cleaned = self.clean(bytes(pending[:end]))
        except Rejection as rejection:
            self._reject(rejection.reply)
            return
        self.header = cleaned
        self.writer.write(cleaned)
        self.writer.write(bytes(pending[end:]))
        self._pending = bytearray()

    def _reject(self, reply: Reply) -> None:
        self.rejection = reply
        self._pending = bytearray()
        self.writer.abort()
