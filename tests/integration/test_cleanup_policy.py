"""Issue 3 over real sockets: checks, fix-ups, per-user limits and DKIM, byte for byte."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import dkim
from tests.conftest import RunningServer, make_server, split_received
from tests.integration.rawclient import RawClient, code_of


def send(
    client: RawClient,
    message: bytes,
    *,
    mail: str = "MAIL FROM:<alice@example.org>",
    rcpts: tuple[str, ...] = ("bob@example.net",),
) -> tuple[int, str]:
    assert client.command(mail)[0] == 250
    for rcpt in rcpts:
        assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    return client.read_reply()


def stored(server: RunningServer, reply: tuple[int, str]) -> bytes:
    assert reply[0] == 250, reply
    return split_received(server.queued_message(reply[1].rsplit(" ", 1)[-1]))[1]


@pytest.fixture
def client(shared_server: RunningServer) -> Iterator[RawClient]:
    raw = RawClient(shared_server).ready()
    yield raw
    raw.close()


COMPLETE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
    b"Date: Sat, 28 Nov 2026 16:30:28 +0000\r\nMessage-ID: <m1@example.org>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\tfolded\r\n"
)


def test_complete_message_is_untouched(client: RawClient, shared_server: RunningServer) -> None:
    body = b"body \xc3\xa9 8-bit  \r\n\r\n.dot\r\n"
    message = COMPLETE + b"\r\n" + body
    result = stored(
        shared_server, send(client, message, mail="MAIL FROM:<alice@example.org> BODY=8BITMIME")
    )
    assert result == message


def test_fixups_date_message_id_bcc(client: RawClient, shared_server: RunningServer) -> None:
    header = (
        b"From: alice@example.org\r\nBcc: secret@example.net,\r\n other@example.net\r\n"
        b"Subject: s\r\n"
    )
    reply = send(client, header + b"\r\nbody\r\n")
    result = stored(shared_server, reply)
    queue_id = reply[1].rsplit(" ", 1)[-1]
    top, rest = result.split(b"From: alice@example.org\r\n", 1)
    assert re.fullmatch(
        rb"Date: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
        rb"Message-ID: <" + queue_id.encode() + rb"@localhost>\r\n",
        top,
    ), top
    assert rest == b"Subject: s\r\n\r\nbody\r\n"  # Bcc gone, the rest byte for byte


def test_bad_date_replaced(client: RawClient, shared_server: RunningServer) -> None:
    message = (
        b"From: alice@example.org\r\nDate: yesterday\r\nMessage-ID: <x@y.example>\r\n\r\nb\r\n"
    )
    result = stored(shared_server, send(client, message))
    assert result.startswith(b"Date: ") and b"Date: yesterday" not in result
    assert result.endswith(b"From: alice@example.org\r\nMessage-ID: <x@y.example>\r\n\r\nb\r\n")


def test_sender_added_for_another_owned_address(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    try:
        server.cli("user", "address", "add", server.user, "sales@example.org")
        client = RawClient(server).ready()
        message = COMPLETE.replace(b"Alice <alice@", b"Sales <sales@") + b"\r\nhi\r\n"
        result = stored(server, send(client, message, mail="MAIL FROM:<sales@example.org>"))
        assert result == b"Sender: <alice@example.org>\r\n" + message
    finally:
        server.stop()


@pytest.mark.parametrize(
    "message, expected",
    [
        (b"Subject: no from\r\n\r\nx\r\n", "554 5.6.0"),
        (b"From: alice@example.org\r\nnot a header line\r\n\r\nx\r\n", "554 5.6.0"),
        (b"From: alice@example.org\r\nSubject: no separator\r\n", "554 5.6.0"),
        (b"From: alice@example.org\r\nTo: bob@sales\r\n\r\nx\r\n", "554 5.1.2"),
        (b"From: alice@example.org\r\nTo: bob@@example.net\r\n\r\nx\r\n", "554 5.6.0"),
        (b"From: alice@example.org\r\nTo: b\xc3\xb6b@example.net\r\n\r\nx\r\n", "554 5.6.7"),
        (b"From: alice@example.org\r\nTo: undisclosed-recipients:;\r\n\r\nx\r\n", "250 2.0.0"),
        (b"From: alice@example.org\r\n\r\n8-bit \xc3\xa9 without BODY\r\n", "554 5.6.0"),
        (b"From: mallory@example.org\r\n\r\nx\r\n", "550 5.7.1"),
    ],
)
def test_checks(client: RawClient, message: bytes, expected: str) -> None:
    assert code_of(send(client, message)) == expected
    assert code_of(client.command("NOOP")) == "250 2.0.0"


SITE_RULES = """
[cleanup]
forbidden_fields = ["X-Forbidden"]
strip_fields = ["X-Mailer"]
max_header_fields = 12
received_privacy = true
remove_bcc = false
[policy]
messages_per_hour = 3
[policy.users."alice@example.org"]
recipient_domains = ["example.net"]
"""


def test_site_rules_limits_and_restart(tmp_path: Path) -> None:
    server = make_server(tmp_path, SITE_RULES)
    try:
        client = RawClient(server).ready()
        base = (
            b"From: alice@example.org\r\nMessage-ID: <a@b.example>\r\n"
            b"Date: Sat, 28 Nov 2026 16:30:28 +0000\r\n"
        )
        assert code_of(send(client, base + b"X-Forbidden: 1\r\n\r\nx\r\n")) == "554 5.7.1"
        too_many = base + b"".join(b"X-N: %d\r\n" % n for n in range(12)) + b"\r\nx\r\n"
        assert code_of(send(client, too_many)) == "554 5.6.0"
        client.command("MAIL FROM:<alice@example.org>")
        assert code_of(client.command("RCPT TO:<carol@example.com>")) == "550 5.7.1"
        client.command("RSET")
        message = base + b"X-Mailer: spam 1.0\r\nBcc: kept@example.net\r\n\r\nx\r\n"
        reply = send(client, message)
        full = server.queued_message(reply[1].rsplit(" ", 1)[-1])
        assert b"Received: from client.invalid (withheld)" in full and b"127.0.0.1" not in full
        assert split_received(full)[1] == message.replace(b"X-Mailer: spam 1.0\r\n", b"")
        for _ in range(2):
            assert send(client, base + b"\r\nx\r\n")[0] == 250
        reply = client.command("MAIL FROM:<alice@example.org>")
        assert code_of(reply) == "452 4.7.0" and "per hour" in reply[1]
        server.stop()
        server.start()  # the count survives a restart
        client = RawClient(server).ready()
        assert code_of(client.command("MAIL FROM:<alice@example.org>")) == "452 4.7.0"
    finally:
        if server.process is not None:
            server.stop()


def test_dkim_signatures_verify_and_client_signature_survives(tmp_path: Path) -> None:
    server = RunningServer(root=tmp_path)
    server.write_config()
    records: dict[bytes, bytes] = {}
    keys_toml = ""
    for selector, kind in (("r1", "rsa"), ("e1", "ed25519")):
        out = server.cli("dkim", "keygen", "example.org", "--selector", selector, "--type", kind)
        name, _, txt = out.strip().partition(" IN TXT ")
        records[name.encode()] = "".join(re.findall(r'"([^"]*)"', txt)).encode()
        key = server.data_dir / "dkim" / "example.org" / f"{selector}.key"
        keys_toml += (
            f'[[dkim.keys]]\ndomain = "example.org"\nselector = "{selector}"\nkey = "{key}"\n'
        )
    server.extra_config = keys_toml
    server.write_config()
    server.cli("user", "add", server.user, "--password-stdin", stdin=server.password)
    # The client signs with a key of its own first (as a list manager or app would).
    client_key = tmp_path / "client.key"
    client_out = server.cli(
        "dkim", "keygen", "app.example", "--selector", "c", "--out-dir", str(tmp_path)
    )
    name, _, txt = client_out.strip().partition(" IN TXT ")
    records[name.encode()] = "".join(re.findall(r'"([^"]*)"', txt)).encode()
    client_key = next(tmp_path.rglob("c.key"))
    server.start()
    try:
        message = COMPLETE + b"\r\nsigned body\r\n  with  spaces \r\n"
        client_signature = dkim.sign(message, b"c", b"app.example", client_key.read_bytes())
        client = RawClient(server).ready()
        result = stored(server, send(client, client_signature + message))
        assert result.count(b"DKIM-Signature:") == 3

        def dns(name: bytes, timeout: int = 5) -> bytes:
            return (
                records[name.rstrip(b".") + b"."]
                if name.rstrip(b".") + b"." in records
                else records.get(name, b"")
            )

        verifier = dkim.DKIM(result)
        for index in range(3):
            assert verifier.verify(idx=index, dnsfunc=dns), index
    finally:
        server.stop()


def test_rewriting_header_and_envelope(tmp_path: Path) -> None:
    server = make_server(
        tmp_path, '[cleanup]\nrewrite = [["@host.sales.example.org", "@example.org"]]\n'
    )
    try:
        server.cli("user", "address", "add", server.user, "@host.sales.example.org")
        client = RawClient(server).ready()
        message = COMPLETE.replace(b"alice@example.org", b"alice@host.sales.example.org")
        message = message.replace(
            b"To: bob@example.net", b"To: Carol <carol@host.sales.example.org>"
        )
        reply = send(
            client,
            message + b"\r\nx\r\n",
            mail="MAIL FROM:<alice@host.sales.example.org>",
            rcpts=("carol@host.sales.example.org",),
        )
        result = stored(server, reply)
        assert b"From: Alice <alice@example.org>\r\n" in result
        assert b"To: Carol <carol@example.org>\r\n" in result
        assert b"host.sales" not in result
        listing = server.cli("queue", "list", "--json")
        assert "<alice@example.org>" in listing or "alice@example.org" in listing
        assert "carol@example.org" in listing and "host.sales" not in listing
    finally:
        server.stop()


def test_bad_rewrite_rule_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cleanup]\nrewrite = [["nonsense", "@example.org"]]\n')
    result = subprocess.run(
        [sys.executable, "-m", "submitd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "cleanup.rewrite" in result.stderr


def test_8bit_repair_when_the_site_allows_it(tmp_path: Path) -> None:
    import email
    import email.policy

    server = make_server(tmp_path, "[cleanup]\nrepair_8bit = true\n")
    try:
        client = RawClient(server).ready()
        body = "Grüße, café\r\n.leading dot\r\n".encode()
        result = stored(server, send(client, COMPLETE + b"\r\n" + body))
        assert result.isascii()
        assert result.startswith(b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8")
        assert b"Content-Transfer-Encoding: quoted-printable\r\n" in result
        assert result.endswith(b"\r\n")
        parsed = email.message_from_bytes(result, policy=email.policy.compat32)
        assert parsed.get_payload(decode=True) == body
        # 8-bit in the header cannot be repaired: refused, with the reason.
        reply = send(client, COMPLETE + "X-Note: Grüße\r\n\r\nx\r\n".encode())
        assert code_of(reply) == "554 5.6.0" and "8-bit data in header field X-Note" in reply[1]
    finally:
        server.stop()
