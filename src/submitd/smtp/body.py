"""Message content framing for DATA and BDAT, scanned with bytes methods.

The body is never walked line by line in Python: a 50 MiB message would cost seconds of
CPU. A small piece is checked with `count`, `find`, `replace` and one anchored regular
expression, all of which run in C; a large one (most of a big message arrives in 256 KiB
reads) with the vectorised scans of `submitd.lines`, ten times cheaper per octet. Lines
are tracked across piece boundaries, so a CRLF or an over-long line split between two
TCP reads is judged correctly.

What is refused, and why:
- a bare CR or a bare LF (RFC 5321 2.3.8): the root of SMTP smuggling, where another
  server reads the end of data where we did not;
- a line over 998 octets plus CRLF, not counting a stuffed dot (RFC 5321 4.5.3.1.6);
- more octets than the size limit (RFC 1870); the rest is read and dropped, never kept.
"""

from __future__ import annotations

import re
from enum import Enum

from submitd.lines import LARGE, crlf_mismatch, dots_after_lf, has_run_without_lf

MAX_LINE = 998  # octets before CRLF, RFC 5321 4.5.3.1.6

# An LF followed by more than MAX_LINE octets and its CR before the next LF: a line too
# long. The literal LF lets the engine jump from line to line with a fast search (ten
# times faster than a "(?m)^" anchor, which tests every position); bare CRs are refused
# on their own, so counting the CR here is exact for every message that can pass.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % (MAX_LINE + 2))

DATA_END = b"\r\n.\r\n"


class BodyProblem(Enum):
    BARE_LINE_ENDING = "bare CR or LF"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "message too big"


class LineChecker:
    """Checks CRLF discipline and line length over a stream of pieces.

    `binary` turns the line checks off: BODY=BINARYMIME content is arbitrary octets
    (RFC 3030 3). The size limit applies always.

    Every check keeps running after a first problem (they are a few C-speed scans), and
    the verdict is chosen by priority, too big > bare line ending > line too long, so
    the reply never depends on how the client's octets were split into TCP reads.
    """

    def __init__(self, max_size: int, *, binary: bool = False) -> None:
        self.max_size = max_size
        self.binary = binary
        self.size = 0
        self._bare = False
        self._long = False
        self._line_length = 0  # octets of the current, unfinished line
        self._pending_cr = False  # the previous piece ended with CR

    @property
    def problem(self) -> BodyProblem | None:
        if self.size > self.max_size:
            return BodyProblem.TOO_BIG
        if self._bare:
            return BodyProblem.BARE_LINE_ENDING
        if self._long:
            return BodyProblem.LINE_TOO_LONG
        return None

    def feed(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.binary or not piece or self.size > self.max_size:
            return  # once too big, nothing else can change the verdict
        if self._has_bare_line_ending(piece):
            self._bare = True
        if self._has_long_line(piece):
            self._long = True

    def finish(self) -> BodyProblem | None:
        """The verdict at the end of the content; a trailing lone CR is bare."""
        if self._pending_cr and not self.binary:
            self._bare = True
        return self.problem

    def _has_bare_line_ending(self, piece: bytes) -> bool:
        if len(piece) >= LARGE:
            starts_with_lf = piece[:1] == b"\n"
            # A CR that ended the previous piece needs this LF, and an LF here needs it.
            bare = self._pending_cr != starts_with_lf or crlf_mismatch(piece)
            self._pending_cr = piece[-1:] == b"\r"
            return bare
        joined = 1 if self._pending_cr and piece[:1] == b"\n" else 0
        lone_before = self._pending_cr and not joined
        crlf = piece.count(b"\r\n") + joined
        self._pending_cr = piece[-1:] == b"\r"
        lone_cr = piece.count(b"\r") - (crlf - joined) - (1 if self._pending_cr else 0)
        lone_lf = piece.count(b"\n") - crlf
        return lone_before or lone_cr > 0 or lone_lf > 0

    def _has_long_line(self, piece: bytes) -> bool:
        first_lf = piece.find(b"\n")
        if first_lf < 0:
            self._line_length += len(piece) - (1 if self._pending_cr else 0)
            return self._line_length > MAX_LINE
        # The line that began in earlier pieces ends here (its CR is at first_lf - 1).
        too_long = self._line_length + max(first_lf - 1, 0) > MAX_LINE
        self._line_length = len(piece) - piece.rfind(b"\n") - 1 - (1 if self._pending_cr else 0)
        if too_long or self._line_length > MAX_LINE:
            return True
        if len(piece) >= LARGE:
            return has_run_without_lf(piece, first_lf, MAX_LINE + 2)
        return _LONG_LINE.search(piece, first_lf) is not None


class DataReader:
    """Frames DATA content: finds the end marker, removes dot-stuffing (RFC 5321 4.5.2).

    `feed` returns the unstuffed content found in a piece and, once the end marker has
    been seen, the octets that follow it (pipelined commands, RFC 2920). Only complete
    lines are consumed; a partial line waits for the next piece, bounded by the line
    limit so that a client cannot make us buffer an endless line.
    """

    def __init__(self, max_size: int) -> None:
        self.checker = LineChecker(max_size)
        self._tail = b""  # an unfinished line
        self._at_line_start = True
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """(content, rest): rest is None until the end of data has been found."""
        buffer = self._tail + data if self._tail else data
        last_lf = buffer.rfind(b"\n")
        if last_lf < 0:
            self._keep_tail(buffer)
            return b"", None
        lines, self._tail = buffer[: last_lf + 1], buffer[last_lf + 1 :]
        # Large: the line starts with a dot, found once, serve both the end marker and
        # unstuffing; small: bytes methods find them (None).
        dots = dots_after_lf(lines) if len(lines) >= LARGE else None
        end = self._find_end(lines, dots)
        if end is not None:
            content, rest = lines[:end], lines[end + 3 :] + self._tail
            self._tail = b""
            self.done = True
            return self._unstuff(content, dots), rest
        content = self._unstuff(lines, dots)
        # Only a CRLF starts a line that may end the data: after a bare LF a ".\r\n"
        # is content, whichever read it arrives in (RFC 5321 4.1.1.4, smuggling).
        self._at_line_start = lines.endswith(b"\r\n")
        self._keep_tail(self._tail)
        return content, None

    def _find_end(self, lines: bytes, dots: list[int] | None) -> int | None:
        """Offset of the terminating ".\r\n" line within `lines`, if it is there."""
        if self._at_line_start and lines.startswith(b".\r\n"):
            return 0
        if dots is None:
            found = lines.find(DATA_END)
            return None if found < 0 else found + 2
        for dot in dots:
            if dot >= 2 and lines[dot - 2 : dot + 3] == DATA_END:
                return dot
        return None

    def _unstuff(self, lines: bytes, dots: list[int] | None) -> bytes:
        if not lines:
            return b""
        starts_with_dot = self._at_line_start and lines[:1] == b"."
        # Only after CRLF: a dot after a bare LF is content (the message is refused
        # anyway), so the verdict cannot depend on where a read ended.
        if dots is None:
            content = lines.replace(b"\r\n.", b"\r\n")
            if starts_with_dot:
                content = content[1:]
        else:
            stuffed = [0] if starts_with_dot else []
            stuffed += [d for d in dots if 2 <= d < len(lines) and lines[d - 2 : d] == b"\r\n"]
            content = _without(lines, stuffed)
        self.checker.feed(content)
        return content

    def _keep_tail(self, tail: bytes) -> None:
        """Keep a partial line, unless it is already too long to be valid."""
        if len(tail) <= MAX_LINE + 2:
            self._tail = tail
            return
        # Over-long: count it as content (for the size limit and the line verdict) and
        # keep only a trailing CR, which may begin the CRLF of the end marker.
        keep = 1 if tail.endswith(b"\r") else 0
        self.checker.feed(tail[: len(tail) - keep])
        self._tail = tail[len(tail) - keep :]
        self._at_line_start = False


def _without(data: bytes, offsets: list[int]) -> bytes:
    """`data` less the octet at each offset (ascending); no copy when there is none."""
    if not offsets:
        return data
    bounds = zip([-1, *offsets], [*offsets, len(data)], strict=True)
    kept = [data[start + 1 : end] for start, end in bounds]
    return b"".join(kept)
