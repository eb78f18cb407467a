"""Every reply the core promises, over a real socket and real TLS."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, make_server, split_received
from tests.integration.rawclient import RawClient, code_of

# Date and Message-ID present: nothing for the cleanup stage to add.
COMPLETE = b"Date: Sat, 28 Nov 2026 16:30:28 +0000\r\nMessage-ID: <t@example.org>\r\n"


@pytest.fixture
def client(shared_server: RunningServer) -> Iterator[RawClient]:
    raw = RawClient(shared_server).ready()
    yield raw
    raw.close()


def test_greeting_and_extensions(shared_server: RunningServer) -> None:
    raw = RawClient(shared_server)
    assert raw.greeting[0] == 220 and "ESMTP" in raw.greeting[1]
    code, text = raw.command("EHLO client.example.org")
    assert code == 250
    advertised = text.split("\n")[1:]
    assert "STARTTLS" in advertised and not any(a.startswith("AUTH") for a in advertised)
    for extension in (
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SMTPUTF8",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
        "SIZE 52428800",
    ):
        assert extension in advertised
    assert not {"ETRN", "ATRN"} & set(advertised)  # RFC 6409 table 1
    raw.starttls()
    advertised = raw.command("EHLO client.example.org")[1].split("\n")[1:]
    assert "AUTH PLAIN LOGIN" in advertised and "STARTTLS" not in advertised
    raw.close()


def test_cleartext_refusals(shared_server: RunningServer) -> None:
    raw = RawClient(shared_server)
    raw.command("EHLO client.example.org")
    assert code_of(raw.login()) == "538 5.7.11"
    assert code_of(raw.command("MAIL FROM:<alice@example.org>")) == "530 5.7.0"
    raw.close()


def test_implicit_tls_offers_auth(shared_server: RunningServer) -> None:
    raw = RawClient(shared_server, implicit_tls=True)
    advertised = raw.command("EHLO client.example.org")[1].split("\n")[1:]
    assert "AUTH PLAIN LOGIN" in advertised and "STARTTLS" not in advertised
    assert code_of(raw.command("MAIL FROM:<alice@example.org>")) == "530 5.7.0"
    assert raw.login()[0] == 235
    raw.close()


@pytest.mark.parametrize(
    "command, expected",
    [
        ("AUTH PLAIN " + base64.b64encode(b"\0alice@example.org\0wrong").decode(), "535 5.7.8"),
        ("AUTH PLAIN " + base64.b64encode(b"\0nobody@example.org\0x").decode(), "535 5.7.8"),
        ("AUTH PLAIN !!!", "501 5.5.2"),
        ("AUTH CRAM-MD5", "504 5.5.4"),
        ("MAIL FROM:<alice@example.org>", "530 5.7.0"),
    ],
)
def test_auth_failures(shared_server: RunningServer, command: str, expected: str) -> None:
    raw = RawClient(shared_server, implicit_tls=True)
    raw.command("EHLO client.example.org")
    assert code_of(raw.command(command)) == expected
    raw.close()


def test_auth_cancel(shared_server: RunningServer) -> None:
    raw = RawClient(shared_server, implicit_tls=True)
    raw.command("EHLO client.example.org")
    assert raw.command("AUTH LOGIN")[0] == 334
    assert code_of(raw.command("*")) == "501 5.0.0"
    raw.close()


def test_failed_auth_logged_without_password(shared_server: RunningServer) -> None:
    raw = RawClient(shared_server, implicit_tls=True)
    raw.command("EHLO client.example.org")
    secret = "Sup3rSecretGuess"
    token = base64.b64encode(f"\0alice@example.org\0{secret}".encode()).decode()
    assert code_of(raw.command("AUTH PLAIN " + token)) == "535 5.7.8"
    raw.close()
    time.sleep(0.2)
    log = shared_server.log_text()
    assert "auth failed user='alice@example.org' client=127.0.0.1" in log
    assert secret not in log and token not in log


@pytest.mark.parametrize(
    "commands, expected",
    [
        (["MAIL FROM:<mallory@example.org>"], "550 5.7.1"),
        (["MAIL FROM:<alice@sales>"], "554 5.1.2"),
        (["MAIL FROM:<alice@@example.org>"], "501 5.1.7"),
        (["MAIL FROM:<alice@example.org> FROB=1"], "555 5.5.4"),
        (["MAIL FROM:<alice@example.org> SIZE=60000000"], "552 5.3.4"),
        (["MAIL FROM:<>", "RCPT TO:<bob@sales>"], "554 5.1.2"),
        (["MAIL FROM:<>", "RCPT TO:<bob@@x.example>"], "501 5.1.3"),
        (["MAIL FROM:<>", "RCPT TO:<bob@x.example> NOTIFY=BOGUS"], "555 5.5.4"),
        (["RCPT TO:<bob@x.example>"], "503 5.5.1"),
        (["MAIL FROM:<>", "DATA"], "554 5.5.1"),
        (["ETRN example.org"], "502 5.5.1"),
        (["ATRN example.org"], "502 5.5.1"),
        (["NOSUCH"], "500 5.5.1"),
        (["NOOP " + "x" * 2100], "500 5.5.2"),  # over the 2048-octet default
        (["VRFY bob"], "252 2.5.0"),
        (["HELP"], "214 2.0.0"),
        (["NOOP"], "250 2.0.0"),
        (["RSET"], "250 2.0.0"),
        (["QUIT"], "221 2.0.0"),
    ],
)
def test_command_replies(client: RawClient, commands: list[str], expected: str) -> None:
    for command in commands[:-1]:
        assert client.command(command)[0] == 250
    assert code_of(client.command(commands[-1])) == expected


def test_null_sender_accepted(client: RawClient) -> None:
    assert code_of(client.command("MAIL FROM:<>")) == "250 2.1.0"


def test_bare_lf_in_command(client: RawClient) -> None:
    client.send(b"NOOP\n")
    assert code_of(client.read_reply()) == "500 5.5.2"
    assert code_of(client.command("NOOP")) == "250 2.0.0"


def send_data(client: RawClient, body: bytes) -> tuple[int, str]:
    assert client.command("MAIL FROM:<alice@example.org> BODY=8BITMIME")[0] == 250
    assert client.command("RCPT TO:<bob@example.net>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(body)
    return client.read_reply()


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"From: alice@example.org\r\n\r\nbare\nLF\r\n.\r\n", "554 5.6.0"),
        (b"From: alice@example.org\r\n\r\nbare\rCR\r\n.\r\n", "554 5.6.0"),
        (b"From: alice@example.org\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n", "554 5.6.0"),
        (b"From: mallory@example.org\r\n\r\nhi\r\n.\r\n", "550 5.7.1"),
        (b"From: Alice <alice@example.org>\r\n\r\nhi\r\n.\r\n", "250 2.0.0"),
    ],
)
def test_data_replies(client: RawClient, body: bytes, expected: str) -> None:
    assert code_of(send_data(client, body)) == expected
    assert code_of(client.command("NOOP")) == "250 2.0.0"  # still in sync


def test_smuggled_end_of_data_is_not_an_end(
    client: RawClient, shared_server: RunningServer
) -> None:
    body = b"From: alice@example.org\r\n\r\nhi\n.\nMAIL FROM:<alice@example.org>\r\n.\r\n"
    assert code_of(send_data(client, body)) == "554 5.6.0"
    assert code_of(client.command("NOOP")) == "250 2.0.0"


def test_message_is_queued_byte_for_byte(client: RawClient, shared_server: RunningServer) -> None:
    message = (
        b"From: Alice <alice@example.org>\r\nSubject: exact \xc3\xa9\r\n" + COMPLETE + b"\r\n"
        b"..leading dot\r\ntrailing space \r\n\tindent\r\n\r\n\r\nend"
    )
    code, text = send_data(client, message + b"\r\n.\r\n")
    assert code == 250
    queue_id = text.rsplit(" ", 1)[-1]
    stored = shared_server.queued_message(queue_id)
    received, rest = split_received(stored)
    assert rest == message.replace(b"\r\n..", b"\r\n.") + b"\r\n"
    assert b"by localhost (submitd) with ESMTPSA id " + queue_id.encode() in received
    assert b"from client.example.org ([127.0.0.1])" in received
    assert b"TLSv1.3" in received


def test_bdat_binarymime(client: RawClient, shared_server: RunningServer) -> None:
    message = b"From: alice@example.org\r\n" + COMPLETE + b"\r\nbinary\x00\xff\nbare"
    client.send(
        b"MAIL FROM:<alice@example.org> BODY=BINARYMIME\r\nRCPT TO:<bob@example.net>\r\n"
        b"BDAT 10\r\n" + message[:10] + b"BDAT 0\r\n"
        b"BDAT " + str(len(message) - 10).encode() + b" LAST\r\n" + message[10:]
    )
    replies = [client.read_reply() for _ in range(5)]
    assert [code_of(r) for r in replies[:4]] == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    assert code_of(replies[4]) == "250 2.0.0" and "queued as" in replies[4][1]
    stored = shared_server.queued_message(replies[4][1].rsplit(" ", 1)[-1])
    assert split_received(stored)[1] == message


def test_recipient_limit_and_size_limit(tmp_path: Path) -> None:
    server = make_server(tmp_path, "[limits]\nrecipients = 2\nmessage_size = 2048\n")
    try:
        client = RawClient(server).ready()
        client.command("MAIL FROM:<alice@example.org>")
        assert client.command("RCPT TO:<a@x.example>")[0] == 250
        assert client.command("RCPT TO:<b@x.example>")[0] == 250
        assert code_of(client.command("RCPT TO:<c@x.example>")) == "452 4.5.3"
        assert client.command("DATA")[0] == 354
        client.send(b"From: alice@example.org\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100 + b".\r\n")
        assert code_of(client.read_reply()) == "552 5.3.4"
        assert code_of(client.command("NOOP")) == "250 2.0.0"
        assert server.queue_ids() == []
    finally:
        server.stop()


def test_too_many_bad_commands_and_idle_timeout(tmp_path: Path) -> None:
    server = make_server(tmp_path, "[limits]\nbad_commands = 3\nidle_timeout = 1\n")
    try:
        client = RawClient(server)
        for _ in range(2):
            assert code_of(client.command("BOGUS")) == "500 5.5.1"
        client.send(b"BOGUS\r\n")
        assert code_of(client.read_reply()) == "500 5.5.1"
        assert code_of(client.read_reply()) == "421 4.7.0"
        assert client.sock.recv(10) == b""
        idle = RawClient(server)
        started = time.monotonic()
        assert code_of(idle.read_reply()) == "421 4.4.2"
        assert time.monotonic() - started < 5
    finally:
        server.stop()
