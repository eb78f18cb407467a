"""Behind a load balancer: Debian's HAProxy in front with send-proxy-v2 and send-proxy."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer, free_port, make_server, split_received
from tests.integration.haproxy_fixture import HAProxy, start_haproxy  # noqa: F401
from tests.integration.rawclient import RawClient, code_of

TRUSTED = 'proxy_protocol_from = ["127.0.0.1/32"]\n'


def through(server: RunningServer, port: int) -> RunningServer:
    """The same server as seen through HAProxy's port."""
    view = RunningServer(root=server.root, user=server.user, password=server.password)
    view.starttls_port = port
    view.tls_port = port
    return view


@pytest.mark.parametrize("mode", ["send-proxy-v2", "send-proxy"])
@pytest.mark.parametrize("implicit_tls", [False, True])
def test_client_address_comes_from_the_proxy_header(
    tmp_path: Path,
    start_haproxy: Callable[..., HAProxy],  # noqa: F811 - the fixture imported above
    mode: str,
    implicit_tls: bool,
) -> None:
    server = make_server(tmp_path, listen_extra=TRUSTED)
    try:
        backend = server.tls_port if implicit_tls else server.starttls_port
        front = free_port()
        start_haproxy(front, "127.0.0.1", backend, mode)
        view = through(server, front)
        client = RawClient(view, implicit_tls=implicit_tls, source="127.0.0.7").ready()
        assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
        client.command("RCPT TO:<bob@example.net>")
        assert client.command("DATA")[0] == 354
        client.send(
            b"From: alice@example.org\r\nDate: Sat, 28 Nov 2026 16:30:28 +0000\r\n"
            b"Message-ID: <p@example.org>\r\n\r\nvia haproxy\r\n.\r\n"
        )
        code, text = client.read_reply()
        assert code == 250, text
        received, _ = split_received(server.queued_message(text.rsplit(" ", 1)[-1]))
        assert b"([127.0.0.7])" in received  # the client, not HAProxy's 127.0.0.1
        assert "client=127.0.0.7" in server.log_text()
        # Open relay through the proxy: no AUTH, no mail.
        anonymous = RawClient(view, implicit_tls=implicit_tls, source="127.0.0.8")
        anonymous.command("EHLO x.example.org")
        if not implicit_tls:
            anonymous.starttls()
            anonymous.command("EHLO x.example.org")
        assert code_of(anonymous.command("MAIL FROM:<alice@example.org>")) == "530 5.7.0"
    finally:
        server.stop()


def test_a_trusted_peer_must_send_the_header(tmp_path: Path) -> None:
    server = make_server(tmp_path, listen_extra=TRUSTED)
    try:
        # Direct from 127.0.0.1 (trusted: a header is required): SMTP is not a header.
        sock = socket.create_connection(("127.0.0.1", server.starttls_port), timeout=5)
        sock.sendall(b"EHLO pretender.example.org\r\n")
        assert sock.recv(100) == b""  # closed without a reply
        sock.close()
        # From an address that is not trusted, a PROXY header is just a bad command.
        other = RawClient(server, source="127.0.0.9")
        assert other.greeting[0] == 220
        assert code_of(other.command("PROXY TCP4 1.2.3.4 5.6.7.8 1 2")) == "500 5.5.1"
    finally:
        server.stop()
