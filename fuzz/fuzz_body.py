"""Fuzz target: DATA framing (`DataReader`), the line checks (`LineChecker`) and BDAT.

Input layout: byte 0 is a flag set, bytes 1-2 seed the cut points, the rest is content.
Flag bits 0-1 pick the mode:

* 0, 1: DATA. The content is fed to a `DataReader` in pieces. Whatever the cuts, the
  verdict, the end-of-data position and the rest after it are those of a simple reference
  reader (line by line, RFC 5321 4.5.2), and when the verdict is "sound" the content
  returned is the reference dot-unstuffing of the input up to the end marker.
* 2: LineChecker alone (bit 2: binary). The verdict for any cuts is the reference one.
* 3: BDAT through a `Session`: the content is cut into chunks (sizes from the seed), sent
  as ``BDAT n`` ... ``BDAT n LAST``, also in arbitrary pieces; the MessageChunk octets are
  exactly the chunks, and the final reply is the reference verdict's.

Bit 3 selects a small size limit (100 octets) to reach the size paths.
"""

from __future__ import annotations

import base64
import random
import sys

import atheris

with atheris.instrument_imports(include=["submitd"]):
    from _common import check, seed_of, splits

    from submitd.smtp.body import MAX_LINE, BodyProblem, DataReader, LineChecker
    from submitd.smtp.events import Event, MessageAbort, MessageChunk, MessageEnd, Send
    from submitd.smtp.replies import Reply
    from submitd.smtp.session import Session, SessionSettings

HEADER = 3
MODE = 0x03
BINARY = 0x04
SMALL = 0x08
BIG_LIMIT = 1 << 20
SMALL_LIMIT = 100


# --- References ---------------------------------------------------------------------------


def reference_verdict(
    content: bytes, max_size: int, binary: bool, *, final: bool = True
) -> BodyProblem | None:
    """Too big > bare CR or LF > line over 998 octets, judged on the whole content.

    Not ``final``: a CR at the very end may still be followed by its LF.
    """
    if len(content) > max_size:
        return BodyProblem.TOO_BIG
    if binary:
        return None
    lines = content.split(b"\r\n")
    if not final and lines[-1].endswith(b"\r"):
        lines[-1] = lines[-1][:-1]
    if any(b"\r" in line or b"\n" in line for line in lines):
        return BodyProblem.BARE_LINE_ENDING
    if any(len(line) > MAX_LINE for line in lines):
        return BodyProblem.LINE_TOO_LONG
    return None


def reference_data(data: bytes) -> tuple[bytes, bytes | None]:
    """(unstuffed content, rest after the end marker or None if there is none).

    Lines end at each LF. The end marker is a line ".\\r\\n" that starts the data or
    follows a CRLF (RFC 5321 4.1.1.4); a leading dot of a line that starts the data or
    follows a CRLF is removed (4.5.2; after a bare LF the dot is content, and the message
    is refused anyway). Without an end marker, the content is that of the complete lines.
    """
    out: list[bytes] = []
    pos = 0
    while True:
        lf = data.find(b"\n", pos)
        if lf < 0:
            return b"".join(out), None
        line = data[pos : lf + 1]
        if line == b".\r\n" and (pos == 0 or data[pos - 2 : pos] == b"\r\n"):
            return b"".join(out), data[lf + 1 :]
        at_line_start = pos == 0 or data[pos - 2 : pos] == b"\r\n"
        out.append(line[1:] if line[:1] == b"." and at_line_start else line)
        pos = lf + 1


# --- Modes ----------------------------------------------------------------------------------


def fuzz_data(stream: bytes, seed: int, max_size: int) -> None:
    reader = DataReader(max_size)
    content: list[bytes] = []
    rest: bytes | None = None
    fed = 0
    for piece in splits(stream, seed):
        got, rest = reader.feed(piece)
        fed += len(piece)
        content.append(got)
        if rest is not None:
            rest += stream[fed:]  # what the session would read as commands
            break
    expected, expected_rest = reference_data(stream)
    check(rest == expected_rest, f"rest {rest!r} != reference {expected_rest!r}")
    check(reader.done == (rest is not None), "done disagrees with rest")
    if rest is None:
        # Not finished: the verdict so far must not be worse than the reference's.
        if reader.checker.problem is None:
            check(b"".join(content) == expected, "partial content differs from the reference")
        return
    verdict = reader.checker.finish()
    reference = reference_verdict(expected, max_size, binary=False)
    check(verdict == reference, f"verdict {verdict} != reference {reference}")
    if verdict is None:
        check(b"".join(content) == expected, "content differs from the reference unstuffing")


def fuzz_checker(stream: bytes, seed: int, max_size: int, binary: bool) -> None:
    checker = LineChecker(max_size, binary=binary)
    for piece in splits(stream, seed):
        checker.feed(piece)
    check(checker.size == len(stream), "size is not the octets fed")
    verdict = checker.finish()
    expected = reference_verdict(stream, max_size, binary)
    check(verdict == expected, f"verdict {verdict} != reference {expected}")


_PROBLEM_CODES = {
    None: b"250 2.0.0 ok\r\n",
    BodyProblem.TOO_BIG: b"552 5.3.4",
    BodyProblem.BARE_LINE_ENDING: b"554 5.6.0",
    BodyProblem.LINE_TOO_LONG: b"554 5.6.0",
}


def fuzz_bdat(stream: bytes, seed: int, max_size: int, binary: bool) -> None:
    rng = random.Random(seed)
    chunks: list[bytes] = []
    pos = 0
    while pos < len(stream):
        size = rng.choice((0, 1, 2, 5, 17, 100, 1000, len(stream)))
        chunks.append(stream[pos : pos + size])
        pos += size
    wire = b"".join(b"BDAT %d\r\n" % len(chunk) + chunk for chunk in chunks)
    wire += b"BDAT 0 LAST\r\n"
    session = Session(
        SessionSettings(hostname="mx.example.org", max_message_size=max_size), tls=True
    )
    plain = base64.b64encode(b"\0alice@example.org\0pw")
    body = b" BODY=BINARYMIME" if binary else b""
    events: list[Event] = []
    events += session.receive_data(b"EHLO c.example\r\nAUTH PLAIN " + plain + b"\r\n")
    events += session.auth_result(_Principal())
    events += session.receive_data(
        b"MAIL FROM:<alice@example.org>" + body + b"\r\nRCPT TO:<bob@example.net>\r\n"
    )
    for piece in splits(wire, seed ^ 0x5A5A):
        events += session.receive_data(piece)
    if events and isinstance(events[-1], MessageEnd):
        events += session.message_result(Reply(250, "2.0.0", "ok"))
    # The session judges chunk by chunk: the first chunk after which the content so far
    # is bad fails the transaction with that verdict; else the verdict at LAST.
    expected = reference_verdict(stream, max_size, binary)
    for count in range(1, len(chunks) + 1):
        so_far = reference_verdict(b"".join(chunks[:count]), max_size, binary, final=False)
        if so_far is not None:
            expected = so_far
            break
    sent = [event.data for event in events if isinstance(event, Send)]
    check(bool(sent), "no reply at all")
    if expected is None:
        content = b"".join(event.data for event in events if isinstance(event, MessageChunk))
        check(content == stream, "BDAT content differs from the chunks sent")
        check(not any(isinstance(event, MessageAbort) for event in events), "sound but aborted")
        check(sent[-1] == _PROBLEM_CODES[None], f"final reply {sent[-1]!r} for sound content")
    else:
        check(any(isinstance(event, MessageAbort) for event in events), "bad but not aborted")
        check(
            any(reply.startswith(_PROBLEM_CODES[expected]) for reply in sent),
            f"no {_PROBLEM_CODES[expected]!r} reply for {expected}: {sent[-3:]!r}",
        )


class _Principal:
    login = "alice@example.org"

    def check_mail(self, sender: str, declared_size: int | None) -> Reply | None:
        return None

    def check_recipient(self, address: str, accepted: int) -> Reply | None:
        return None


def test_one_input(data: bytes) -> None:
    if len(data) < HEADER:
        return
    flags = data[0]
    seed = seed_of(data[1:HEADER])
    stream = data[HEADER:]
    max_size = SMALL_LIMIT if flags & SMALL else BIG_LIMIT
    mode = flags & MODE
    if mode in (0, 1):
        fuzz_data(stream, seed, max_size)
    elif mode == 2:
        fuzz_checker(stream, seed, max_size, binary=bool(flags & BINARY))
    else:
        fuzz_bdat(stream, seed, max_size, binary=bool(flags & BINARY))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
