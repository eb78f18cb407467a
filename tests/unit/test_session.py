"""The sans-I/O session on its own: bytes in, events out, no sockets."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

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
from submitd.smtp.replies import Reply
from submitd.smtp.session import Session, SessionSettings

PLAIN = base64.b64encode(b"\0alice@example.org\0secret").decode()


@dataclass
class Alice:
    login: str = "alice@example.org"

    def check_mail(self, sender: str, declared_size: int | None) -> Reply | None:
        ok = sender in ("", "alice@example.org")
        return None if ok else R.SENDER_NOT_OWNED

    def check_recipient(self, address: str, accepted: int) -> Reply | None:
        return None


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def codes(events: list[Event]) -> list[str]:
    """'250 2.1.0' style code pairs of every final reply line."""
    out = []
    for line in sent(events).decode().split("\r\n"):
        if len(line) > 3 and line[3] == " ":
            parts = line.split(" ")
            enhanced = parts[1] if len(parts) > 1 and parts[1][:1].isdigit() else ""
            out.append(f"{parts[0]} {enhanced}".strip())
    return out


def content(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, MessageChunk))


SETTINGS = SessionSettings(hostname="mx.example.org", max_message_size=10_000, max_errors=20)


def authed(settings: SessionSettings = SETTINGS) -> Session:
    session = Session(settings, tls=True)
    session.greeting()
    session.receive_data(b"EHLO client.example.org\r\n")
    events = session.receive_data(f"AUTH PLAIN {PLAIN}\r\n".encode())
    assert isinstance(events[-1], Authenticate)
    assert events[-1].login == "alice@example.org" and events[-1].password == "secret"
    assert codes(session.auth_result(Alice())) == ["235 2.7.0"]
    return session


def test_greeting_has_no_enhanced_code() -> None:
    session = Session(SETTINGS, tls=False)
    assert sent(session.greeting()) == b"220 mx.example.org ESMTP submitd\r\n"


def test_ehlo_before_tls_offers_starttls_not_auth() -> None:
    session = Session(SETTINGS, tls=False)
    text = sent(session.receive_data(b"EHLO c.example.org\r\n")).decode()
    assert "250-STARTTLS" in text and "AUTH" not in text
    for ext in (
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SMTPUTF8",
        "SIZE 10000",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
    ):
        assert ext in text
    assert "ETRN" not in text and "ATRN" not in text


def test_ehlo_under_tls_offers_auth_not_starttls() -> None:
    session = Session(SETTINGS, tls=True)
    text = sent(session.receive_data(b"EHLO c.example.org\r\n")).decode()
    assert "AUTH PLAIN LOGIN" in text and "STARTTLS" not in text


def test_auth_in_cleartext_is_refused() -> None:
    session = Session(SETTINGS, tls=False)
    session.receive_data(b"EHLO c.example.org\r\n")
    assert codes(session.receive_data(f"AUTH PLAIN {PLAIN}\r\n".encode())) == ["538 5.7.11"]


@pytest.mark.parametrize("tls, expected", [(True, "530 5.7.0"), (False, "530 5.7.0")])
def test_mail_before_auth(tls: bool, expected: str) -> None:
    session = Session(SETTINGS, tls=tls)
    session.receive_data(b"EHLO c.example.org\r\n")
    assert codes(session.receive_data(b"MAIL FROM:<alice@example.org>\r\n")) == [expected]


def test_starttls_discards_pipelined_commands_and_resets() -> None:
    session = Session(SETTINGS, tls=False)
    session.receive_data(b"EHLO c.example.org\r\n")
    events = session.receive_data(b"STARTTLS\r\nMAIL FROM:<x@evil.example>\r\nRSET\r\n")
    assert codes(events) == ["220 2.0.0"]
    assert isinstance(events[-1], StartTLS)
    assert session.receive_data(b"NOOP\r\n") == []  # nothing read until TLS is up
    assert session.tls_started() == []
    assert session.ehlo_name is None
    assert codes(session.receive_data(b"MAIL FROM:<a@b.example>\r\n")) == ["503 5.5.1"]


def test_auth_plain_without_initial_response_and_cancel() -> None:
    session = Session(SETTINGS, tls=True)
    session.receive_data(b"EHLO c.example.org\r\n")
    assert sent(session.receive_data(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    assert codes(session.receive_data(b"*\r\n")) == ["501 5.0.0"]
    assert sent(session.receive_data(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    assert codes(session.receive_data(b"!!notbase64\r\n")) == ["501 5.5.2"]


def test_auth_login_two_steps() -> None:
    session = Session(SETTINGS, tls=True)
    session.receive_data(b"EHLO c.example.org\r\n")
    assert sent(session.receive_data(b"AUTH LOGIN\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    user = base64.b64encode(b"alice@example.org") + b"\r\n"
    assert sent(session.receive_data(user)) == b"334 UGFzc3dvcmQ6\r\n"
    events = session.receive_data(base64.b64encode(b"pw") + b"\r\n")
    assert events == [Authenticate("alice@example.org", "pw", "LOGIN")]
    assert codes(session.auth_result(None)) == ["535 5.7.8"]


def test_auth_foreign_authzid_refused() -> None:
    session = Session(SETTINGS, tls=True)
    session.receive_data(b"EHLO c.example.org\r\n")
    other = base64.b64encode(b"bob@example.org\0alice@example.org\0pw").decode()
    assert codes(session.receive_data(f"AUTH PLAIN {other}\r\n".encode())) == ["535 5.7.8"]


def test_whole_transaction_in_one_write() -> None:
    session = authed()
    events = session.receive_data(
        b"MAIL FROM:<alice@example.org> BODY=8BITMIME\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2B1@example.net\r\n"
        b"RCPT TO:<bad@@example.net>\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nNOOP\r\n"
    )
    assert codes(events) == ["250 2.1.0", "250 2.1.5", "501 5.1.3", "250 2.1.5", "354"]
    assert content(events) == b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"
    assert isinstance(events[-1], MessageEnd)
    begin = next(e for e in events if isinstance(e, MessageBegin))
    assert [r.address for r in begin.envelope.recipients] == [
        "bob@example.net",
        "carol@example.net",
    ]
    assert begin.envelope.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert begin.envelope.recipients[0].orcpt == "rfc822;bob+1@example.net"
    assert session.receive_data(b"NOOP\r\n") == []  # held while committing
    after = session.message_result(R.reply(250, "2.0.0", "Ok: queued as X"))
    assert codes(after) == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]


def test_sender_not_owned() -> None:
    session = authed()
    assert codes(session.receive_data(b"MAIL FROM:<mallory@example.org>\r\n")) == ["550 5.7.1"]
    assert codes(session.receive_data(b"MAIL FROM:<>\r\n")) == ["250 2.1.0"]


@pytest.mark.parametrize(
    "command, expected",
    [
        (b"MAIL FROM:<bob@sales>\r\n", "554 5.1.2"),
        (b"MAIL FROM:<bob@@x.example>\r\n", "501 5.1.7"),
        (b"MAIL FROM:<alice@example.org> FOO=BAR\r\n", "555 5.5.4"),
        (b"MAIL FROM:<alice@example.org> SIZE=99999999\r\n", "552 5.3.4"),
        (b"MAIL TO:<alice@example.org>\r\n", "501 5.5.4"),
        (b"RCPT TO:<bob@example.net>\r\n", "503 5.5.1"),
        (b"DATA\r\n", "503 5.5.1"),
        (b"ETRN example.org\r\n", "502 5.5.1"),
        (b"ATRN example.org\r\n", "502 5.5.1"),
        (b"FOO\r\n", "500 5.5.1"),
        (b"VRFY bob\r\n", "252 2.5.0"),
        (b"HELP\r\n", "214 2.0.0"),
        (b"NOOP\r\n", "250 2.0.0"),
        (b"RSET\r\n", "250 2.0.0"),
        (b"NOOP\n", "500 5.5.2"),
        (b"NO\rOP\r\n", "500 5.5.2"),
        (b"AUTH PLAIN " + PLAIN.encode() + b"\r\n", "503 5.5.1"),
    ],
)
def test_command_replies(command: bytes, expected: str) -> None:
    session = authed()
    assert codes(session.receive_data(command)) == [expected]


def test_recipient_syntax_and_limit() -> None:
    session = authed(SessionSettings(hostname="h.example", max_recipients=2))
    session.receive_data(b"MAIL FROM:<alice@example.org>\r\n")
    events = session.receive_data(
        b"RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n"
        b"RCPT TO:<d@sales>\r\n"
    )
    assert codes(events) == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"]


def test_long_command_line_is_dropped_whole() -> None:
    session = authed()
    events = session.receive_data(b"NOOP " + b"x" * 600)
    assert events == []
    # The tail of the long line must not be read as a command.
    events = session.receive_data(b"x" * 300 + b"RSET\r\nNOOP\r\n")
    assert codes(events) == ["500 5.5.2", "250 2.0.0"]


def transaction(session: Session) -> None:
    session.receive_data(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<b@x.example>\r\n")


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"a\nb\r\n.\r\n", "554 5.6.0"),  # bare LF
        (b"a\rb\r\n.\r\n", "554 5.6.0"),  # bare CR
        (b"x" * 999 + b"\r\n.\r\n", "554 5.6.0"),  # line too long
        (b"x" * 998 + b"\r\n.\r\n", None),  # exactly at the limit
        (b"." + b"x" * 998 + b"\r\n.\r\n", None),  # stuffed dot not counted
        (b"y" * 900 + b"\r\n" * 6000 + b".\r\n", "552 5.3.4"),
    ],
)
def test_data_checks(body: bytes, expected: str | None) -> None:
    session = authed()
    transaction(session)
    session.receive_data(b"DATA\r\n")
    events = session.receive_data(body)
    if expected is None:
        assert isinstance(events[-1], MessageEnd)
    else:
        assert codes(events) == [expected]
        assert any(isinstance(e, MessageAbort) for e in events)
        # Still in sync: the session answers the next command.
        assert codes(session.receive_data(b"NOOP\r\n")) == ["250 2.0.0"]


def test_smuggling_end_marker_is_only_crlf_dot_crlf() -> None:
    session = authed()
    transaction(session)
    session.receive_data(b"DATA\r\n")
    events = session.receive_data(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<x@y.example>\r\n")
    assert codes(events) == []  # no end of data yet
    events = session.receive_data(b"\r\n.\r\n")
    assert codes(events) == ["554 5.6.0"]


def test_data_split_at_every_offset() -> None:
    message = b"Subject: t\r\n\r\n..a\r\n" + b"z" * 998 + b"\r\n.b\r\n"
    wire = message + b".\r\n"
    expected = b"Subject: t\r\n\r\n.a\r\n" + b"z" * 998 + b"\r\nb\r\n"
    for cut in range(1, len(wire)):
        session = authed()
        transaction(session)
        session.receive_data(b"DATA\r\n")
        events = session.receive_data(wire[:cut]) + session.receive_data(wire[cut:])
        assert content(events) == expected, cut
        assert isinstance(events[-1], MessageEnd)


def test_bdat_chunks_including_zero_and_pipelined() -> None:
    session = authed()
    events = session.receive_data(
        b"MAIL FROM:<alice@example.org> BODY=BINARYMIME\r\nRCPT TO:<b@x.example>\r\n"
        b"BDAT 5\r\nab\ncdBDAT 0\r\nBDAT 3 LAST\r\n\r\x00\n"
    )
    assert codes(events) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    assert content(events) == b"ab\ncd\r\x00\n"
    assert isinstance(events[-1], MessageEnd)


def test_bdat_without_transaction_consumes_chunk() -> None:
    session = authed()
    events = session.receive_data(b"BDAT 6\r\nRSET\r\nNOOP\r\n")
    assert codes(events) == ["503 5.5.1", "250 2.0.0"]


def test_bdat_too_big_fails_transaction() -> None:
    session = authed(SessionSettings(hostname="h.example", max_message_size=10))
    transaction(session)
    events = session.receive_data(b"BDAT 8\r\n12345678BDAT 8 LAST\r\n12345678")
    assert codes(events) == ["250 2.0.0", "552 5.3.4"]
    assert codes(session.receive_data(b"BDAT 1 LAST\r\nx")) == ["503 5.5.1"]


def test_too_many_errors_closes() -> None:
    session = authed(SessionSettings(hostname="h.example", max_errors=3))
    events = session.receive_data(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert codes(events) == ["500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
    assert isinstance(events[-1], Close)
    assert session.closed


def test_timeout_and_quit() -> None:
    session = authed()
    events = session.timeout()
    assert codes(events) == ["421 4.4.2"] and isinstance(events[-1], Close)
    session = authed()
    events = session.receive_data(b"QUIT\r\nNOOP\r\n")
    assert codes(events) == ["221 2.0.0"] and isinstance(events[-1], Close)


def test_every_reply_has_enhanced_code() -> None:
    """Except the greeting, EHLO/HELO and 334/354 (RFC 2034 3)."""
    for reply in vars(R).values():
        if isinstance(reply, Reply) and reply.code not in (354,):
            assert reply.enhanced is not None, reply


def test_third_failed_auth_closes() -> None:
    session = Session(SETTINGS, tls=True)
    session.receive_data(b"EHLO c.example.org\r\n")
    for expected in ("535 5.7.8", "535 5.7.8", "421 4.7.0"):
        events = session.receive_data(f"AUTH PLAIN {PLAIN}\r\n".encode())
        assert isinstance(events[-1], Authenticate)
        events = session.auth_result(None)
        assert codes(events) == [expected]
    assert isinstance(events[-1], Close) and session.closed
    # A temporary failure (454) is not the client's fault and does not count.
    session = Session(SETTINGS, tls=True)
    session.receive_data(b"EHLO c.example.org\r\n")
    for _ in range(4):
        session.receive_data(f"AUTH PLAIN {PLAIN}\r\n".encode())
        assert codes(session.auth_result(None, failure=R.AUTH_TEMPORARY)) == ["454 4.7.0"]
