"""Messages signed by a running submitd verify over real DNS, with dkimpy and OpenDKIM."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_server
from tests.dkim.conftest import DnsServer, OpenDkim, PublishedKey
from tests.dkim.test_dkim_dns import one_signature_each
from tests.integration.rawclient import RawClient

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: signed by submitd\r\n"
    b"Date: Sat, 28 Nov 2026 16:30:28 +0000\r\nMessage-ID: <srv@example.org>\r\n\r\n"
    b"Hello  there \r\n\r\n\r\n"
)


def submit_through_server(tmp_path: Path, published: dict[str, PublishedKey]) -> bytes:
    keys = "".join(
        f'[[dkim.keys]]\ndomain = "example.org"\nselector = "{p.key.selector}"\nkey = "{p.path}"\n'
        for name, p in published.items()
        if name in ("rsa", "ed25519")
    )
    server = make_server(tmp_path, keys)
    try:
        client = RawClient(server).ready()
        client.command("MAIL FROM:<alice@example.org>")
        client.command("RCPT TO:<bob@example.net>")
        assert client.command("DATA")[0] == 354
        client.send(MESSAGE + b".\r\n")
        code, text = client.read_reply()
        assert code == 250, text
        return server.queued_message(text.rsplit(" ", 1)[-1])
    finally:
        server.stop()


def test_server_signatures_verify(
    tmp_path: Path,
    published: dict[str, PublishedKey],
    dns_server: DnsServer,
    opendkim: OpenDkim,
) -> None:
    import dkim

    stored = submit_through_server(tmp_path, published)
    assert stored.count(b"DKIM-Signature:") == 2
    verifier = dkim.DKIM(stored)
    assert [verifier.verify(idx=i, dnsfunc=dns_server.txt) for i in range(2)] == [True, True]
    # OpenDKIM's tool passes if any signature verifies: give it one signature at a time.
    results = opendkim.verify(one_signature_each("server", stored))
    assert {name: code for name, (code, _) in results.items()} == {
        "server-sig0": 0,
        "server-sig1": 0,
    }, results
    tampered = one_signature_each("tampered", stored.replace(b"Hello", b"Jello"))
    assert all(code != 0 for code, _ in opendkim.verify(tampered).values())
