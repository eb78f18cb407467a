"""Fuzz target: the whole SMTP session (line reader, commands, AUTH, DATA, BDAT).

Input layout (see README.md): byte 0 is a flag set, bytes 1-2 seed the cut points, the
rest is what the client sends. The transport is played minimally: ``Authenticate`` is
answered with a principal that allows everything (or a failure when the password is
``bad``), ``MessageEnd`` with ``250 2.0.0 ok``, ``StartTLS`` with ``tls_started()``.

Invariants: no exception; every ``Send`` is one or more well-formed reply lines with one
3-digit code; nothing at all after ``Close``; an event that waits for the transport
(``Authenticate``, ``MessageEnd``, ``StartTLS``) is the last of its batch; message
events are bracketed (Begin, Chunk*, then End or Abort); the enhanced code's class is the
reply's first digit. With SUBMITD_FUZZ_STRICT=1 also: reply lines at most 512 octets and
reply text of RFC 5321 textstring characters only.
"""

from __future__ import annotations

import base64
import re
import sys

import atheris

with atheris.instrument_imports(include=["submitd"]):
    from _common import STRICT, check, seed_of, splits

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
    from submitd.smtp.replies import Reply
    from submitd.smtp.session import Session, SessionSettings

HEADER = 3  # flags, then two bytes of split seed

# Flag bits of byte 0.
TLS = 0x01  # the connection starts under TLS (implicit TLS, port 465)
NO_TLS_AVAILABLE = 0x02  # STARTTLS is not offered
SMALL_LIMITS = 0x04  # tiny limits, to reach the limit paths with short inputs
PRELUDE_LOGIN = 0x08  # prepend EHLO and a successful AUTH PLAIN (forces TLS)
PRELUDE_ENVELOPE = 0x10  # also prepend MAIL FROM and RCPT TO
SHUTDOWN = 0x20  # end with shutdown() rather than timeout()

OK_COMMIT = Reply(250, "2.0.0", "ok")
PLAIN = base64.b64encode(b"\0alice@example.org\0secret")
LOGIN_PRELUDE = b"EHLO client.example.org\r\nAUTH PLAIN " + PLAIN + b"\r\n"
ENVELOPE_PRELUDE = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"

_LINE = re.compile(rb"([0-9]{3})([ -])([^\r\n]*)\r\n")
_ENHANCED = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |\Z)")
_TEXTSTRING = re.compile(rb"[\t\x20-\x7e]*")


class FakePrincipal:
    """An authenticated user that may do anything."""

    def __init__(self, login: str) -> None:
        self._login = login

    @property
    def login(self) -> str:
        return self._login

    def check_mail(self, sender: str, declared_size: int | None) -> Reply | None:
        return None

    def check_recipient(self, address: str, accepted: int) -> Reply | None:
        return None


def check_send(data: bytes) -> None:
    """One reply: lines "xyz-text" then one "xyz text", CRLF each, one code throughout."""
    check(bool(data), "empty Send")
    pos = 0
    codes: set[bytes] = set()
    last = False
    while pos < len(data):
        check(not last, f"bytes after the last line of a reply: {data!r}")
        match = _LINE.match(data, pos)
        check(match is not None, f"malformed reply line at {pos}: {data!r}")
        assert match is not None
        code, sep, text = match.group(1), match.group(2), match.group(3)
        check(code[:1] in b"2345", f"reply code {code!r} out of range: {data!r}")
        codes.add(code)
        last = sep == b" "
        enhanced = _ENHANCED.match(text)
        if enhanced is not None:
            check(enhanced.group(1) == code[:1], f"enhanced code class mismatch: {data!r}")
        if STRICT:
            line_length = match.end() - match.start()
            check(line_length <= 512, f"reply line of {line_length} octets (RFC 5321 4.5.3.1.5)")
            check(_TEXTSTRING.fullmatch(text) is not None, f"reply text not textstring: {text!r}")
        pos = match.end()
    check(last, f"reply does not end with a 'xyz ' line: {data!r}")
    check(len(codes) == 1, f"several codes in one reply: {data!r}")


class Transport:
    """Carries out the session's events and checks them."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.closed = False
        self.message_open = False

    def handle(self, events: list[Event]) -> None:
        """Check one batch and answer what needs answering (answers are batches too)."""
        pending: list[list[Event]] = [events]
        while pending:
            batch = pending.pop(0)
            for index, event in enumerate(batch):
                check(not self.closed, f"event after Close: {event!r}")
                waits = isinstance(event, Authenticate | MessageEnd | StartTLS)
                if waits:
                    check(index == len(batch) - 1, f"{event!r} is not last in its batch")
                answer = self.one(event)
                if answer is not None:
                    pending.append(answer)

    def one(self, event: Event) -> list[Event] | None:
        session = self.session
        if isinstance(event, Send):
            check_send(event.data)
        elif isinstance(event, Close):
            check(not self.message_open, "Close while a message is open")
            self.closed = True
        elif isinstance(event, MessageBegin):
            check(not self.message_open, "MessageBegin inside a message")
            check(bool(event.envelope.recipients), "MessageBegin without recipients")
            self.message_open = True
        elif isinstance(event, MessageChunk):
            check(self.message_open, "MessageChunk outside a message")
            check(bool(event.data), "empty MessageChunk")
        elif isinstance(event, MessageAbort):
            check(self.message_open, "MessageAbort outside a message")
            self.message_open = False
        elif isinstance(event, MessageEnd):
            check(self.message_open, "MessageEnd outside a message")
            check(session.envelope is not None, "MessageEnd without an envelope")
            self.message_open = False
            return session.message_result(OK_COMMIT)
        elif isinstance(event, Authenticate):
            check(bool(event.login) and bool(event.password), f"empty credentials {event!r}")
            check(event.mechanism in ("PLAIN", "LOGIN"), f"mechanism {event.mechanism!r}")
            if event.password == "bad":
                return session.auth_result(None)
            return session.auth_result(FakePrincipal(event.login))
        elif isinstance(event, StartTLS):
            return session.tls_started()
        else:
            check(False, f"unknown event {event!r}")
        return None


def test_one_input(data: bytes) -> None:
    if len(data) < HEADER:
        return
    flags = data[0]
    stream = data[HEADER:]
    tls = bool(flags & TLS)
    if flags & PRELUDE_LOGIN:
        tls = True
        prelude = LOGIN_PRELUDE + (ENVELOPE_PRELUDE if flags & PRELUDE_ENVELOPE else b"")
        stream = prelude + stream
    if flags & SMALL_LIMITS:
        settings = SessionSettings(
            hostname="mx.example.org",
            max_line=64,
            max_recipients=2,
            max_message_size=200,
            max_errors=4,
            tls_available=not flags & NO_TLS_AVAILABLE,
        )
    else:
        settings = SessionSettings(
            hostname="mx.example.org", tls_available=not flags & NO_TLS_AVAILABLE
        )
    session = Session(settings, tls=tls)
    transport = Transport(session)
    transport.handle(session.greeting())
    for piece in splits(stream, seed_of(data[1:HEADER])):
        transport.handle(session.receive_data(piece))
        check(not session.waiting, "session still waiting after the transport answered")
    was_closed = transport.closed
    check(session.closed == was_closed, "closed property disagrees with the events")
    end = session.shutdown() if flags & SHUTDOWN else session.timeout()
    if was_closed:
        check(end == [], f"events after Close: {end!r}")
    else:
        transport.handle(end)
        check(transport.closed and isinstance(end[-1], Close), "timeout did not close")
    check(not transport.message_open, "a message is left open at the end")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
