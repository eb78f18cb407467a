"""Issue 6 over real sockets: throttling, limits, slow clients, shutdown, reload."""

from __future__ import annotations

import base64
import contextlib
import os
import select
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import RunningServer, make_server
from tests.integration.rawclient import RawClient, code_of

BAD = "AUTH PLAIN " + base64.b64encode(b"\0alice@example.org\0wrong").decode()


def test_failed_auth_is_delayed_and_the_third_closes(tmp_path: Path) -> None:
    server = make_server(tmp_path, abuse=True)
    try:
        client = RawClient(server, implicit_tls=True, source="127.0.0.2")
        client.command("EHLO client.example.org")
        started = time.monotonic()
        assert code_of(client.command(BAD)) == "535 5.7.8"
        assert time.monotonic() - started >= 1.9  # 2 s for the first failure
        assert code_of(client.command(BAD)) == "535 5.7.8"  # after 4 s more
        assert code_of(client.command(BAD)) == "421 4.7.0"
        assert client.sock.recv(10) == b""
    finally:
        server.stop()


def test_failure_window_blocks_the_network(tmp_path: Path) -> None:
    server = make_server(tmp_path, "[abuse]\nfail_per_minute = [10, 3, 90]\n", abuse=True)
    try:
        waiting = RawClient(
            server, implicit_tls=True, source="127.0.0.9"
        )  # opened before the block
        waiting.command("EHLO client.example.org")

        def fail(source: str) -> None:
            client = RawClient(server, implicit_tls=True, source=source)
            client.command("EHLO client.example.org")
            assert code_of(client.command(BAD)) == "535 5.7.8"

        threads = [threading.Thread(target=fail, args=(f"127.0.0.{n}",)) for n in (2, 3, 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The /26 saw 3 failures in a minute: new connections are refused at the greeting
        late = RawClient(server, source="127.0.0.5")
        assert late.greeting[0] == 421 and late.greeting[1].startswith("4.7.0")
        # ... and AUTH in a session already open gets 454 without a password check.
        good = (
            "AUTH PLAIN "
            + base64.b64encode(f"\0{server.user}\0{server.password}".encode()).decode()
        )
        assert code_of(waiting.command(good)) == "454 4.7.0"
        # Another network is not affected.
        assert RawClient(server, implicit_tls=True, source="127.0.1.200").greeting[0] == 220
    finally:
        server.stop()


def test_connection_limits(tmp_path: Path) -> None:
    server = make_server(tmp_path, "[abuse]\nmax_sessions_per_group = 2\n", abuse=True)
    try:
        first = RawClient(server, source="127.0.0.2")
        second = RawClient(server, source="127.0.0.2")
        third = RawClient(server, source="127.0.0.2")
        assert first.greeting[0] == second.greeting[0] == 220
        assert (
            third.greeting[0] == 421 and "Too many connections from 127.0.0.2" in third.greeting[1]
        )
        first.command("QUIT")
        time.sleep(0.2)
        assert RawClient(server, source="127.0.0.2").greeting[0] == 220
    finally:
        server.stop()


SLOW = """[limits]
line_timeout = 1.0
data_min_rate = 1000
data_rate_grace = 1.0
error_delay_after = 2
bad_commands = 6
"""


@pytest.fixture
def slow_server(tmp_path: Path) -> RunningServer:
    server = make_server(tmp_path, SLOW)
    yield server  # type: ignore[misc]
    server.stop()


def test_a_command_line_must_arrive_whole_in_time(slow_server: RunningServer) -> None:
    client = RawClient(slow_server)
    started = time.monotonic()
    for byte in b"NOOP":  # one byte every 0.4 s: active, but the line never ends
        client.send(bytes([byte]))
        time.sleep(0.4)
    assert code_of(client.read_reply()) == "421 4.4.2"
    assert time.monotonic() - started < 3


def test_data_below_the_minimum_rate(slow_server: RunningServer) -> None:
    client = RawClient(slow_server).ready()
    client.command("MAIL FROM:<alice@example.org>")
    client.command("RCPT TO:<bob@example.net>")
    assert client.command("DATA")[0] == 354
    reply = None
    for _ in range(60):  # 10 octets every 0.2 s: 50 octets/s, below the 1000 required
        readable, _, _ = select.select([client.sock], [], [], 0.2)
        if readable:
            reply = client.read_reply()
            break
        client.send(b"x" * 10)
    assert reply is not None and code_of(reply) == "421 4.4.2"
    assert slow_server.queue_ids() == []


def test_errors_past_the_limit_are_paced(slow_server: RunningServer) -> None:
    client = RawClient(slow_server)
    for _ in range(2):
        assert code_of(client.command("BOGUS")) == "500 5.5.1"
    started = time.monotonic()
    assert code_of(client.command("BOGUS")) == "500 5.5.1"
    assert time.monotonic() - started >= 0.9


def test_auth_line_limit(slow_server: RunningServer) -> None:
    client = RawClient(slow_server, implicit_tls=True)
    client.command("EHLO client.example.org")
    assert client.command("AUTH PLAIN")[0] == 334
    assert code_of(client.command("A" * 13000)) == "500 5.5.6"
    assert code_of(client.command("NOOP")) == "250 2.0.0"  # the tail was not a command


def test_sigterm_lets_an_open_transaction_finish(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    try:
        idle = RawClient(server).ready()
        busy = RawClient(server).ready()
        busy.command("MAIL FROM:<alice@example.org>")
        busy.command("RCPT TO:<bob@example.net>")
        assert busy.command("DATA")[0] == 354
        busy.send(b"From: alice@example.org\r\nSubject: shutdown\r\n\r\nfirst half\r\n")
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGTERM)
        assert code_of(idle.read_reply()) == "421 4.3.2"
        with pytest.raises(OSError):
            RawClient(server)  # no longer listening
        busy.send(b"second half\r\n.\r\n")
        code, _ = busy.read_reply()
        assert code == 250
        assert code_of(busy.read_reply()) == "421 4.3.2"
        assert server.stop() == 0
    finally:
        if server.process is not None:
            server.stop(signal.SIGKILL)


def _served_certificate(server: RunningServer, trusted: Path) -> bytes:
    context = ssl.create_default_context(cadata=trusted.read_text())
    sock = socket.create_connection((server.host, server.tls_port), timeout=5)
    with context.wrap_socket(sock, server_hostname="localhost") as tls_sock:
        return tls_sock.getpeercert(binary_form=True) or b""


def test_sighup_reloads_the_certificate_and_keeps_a_bad_config_out(tmp_path: Path) -> None:
    from submitd.tls import write_self_signed

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed("localhost", cert, key)
    server = make_server(tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    try:
        before = _served_certificate(server, cert)
        write_self_signed("localhost", cert, key)  # a new certificate at the same paths
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGHUP)
        time.sleep(0.5)
        after = _served_certificate(server, cert)  # verifies against the new one
        assert after != before
        # A broken file is refused; the server keeps running as it was.
        broken = server.config_path.read_text() + "\n[queue]\nnonsense = 1\n"
        server.config_path.write_text(broken)
        os.kill(server.process.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert "reload failed" in server.log_text()
        assert server.process.poll() is None
        assert _served_certificate(server, cert) == after
    finally:
        server.stop()


def test_tls_hello_on_the_starttls_port_is_closed_at_once(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    try:
        sock = socket.create_connection((server.host, server.starttls_port), timeout=5)
        assert sock.recv(100).startswith(b"220 ")
        context = ssl.create_default_context()
        tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        started = time.monotonic()
        sock.sendall(outgoing.read())  # a real ClientHello
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 2
    finally:
        server.stop()
