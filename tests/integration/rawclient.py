"""A deliberately plain SMTP client for tests: lines out, parsed replies in.

smtplib hides what a test must see (exact codes, pipelined batches, malformed input),
so protocol tests speak through this instead.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl

from tests.conftest import RunningServer


class RawClient:
    def __init__(
        self, server: RunningServer, *, implicit_tls: bool = False, source: str | None = None
    ) -> None:
        self.server = server
        port = server.tls_port if implicit_tls else server.starttls_port
        bind = None if source is None else (source, 0)
        sock = socket.create_connection((server.host, port), timeout=15, source_address=bind)
        if implicit_tls:
            sock = server.client_context().wrap_socket(sock, server_hostname="localhost")
        self.sock: socket.socket = sock
        self.file = sock.makefile("rb")
        self.greeting = self.read_reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> tuple[int, str]:
        """(code, text of the last line including the enhanced code)."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(item[4:] for item in lines)

    def command(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.read_reply()

    def starttls(self) -> None:
        assert self.command("STARTTLS")[0] == 220
        self.file.close()
        self.sock = self.server.client_context().wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def login(self, user: str | None = None, password: str | None = None) -> tuple[int, str]:
        token = f"\0{user or self.server.user}\0{password or self.server.password}"
        return self.command("AUTH PLAIN " + base64.b64encode(token.encode()).decode())

    def ready(self) -> RawClient:
        """EHLO, STARTTLS, EHLO, AUTH: a client that may now send mail."""
        assert self.command("EHLO client.example.org")[0] == 250
        if not isinstance(self.sock, ssl.SSLSocket):
            self.starttls()
            assert self.command("EHLO client.example.org")[0] == 250
        code, text = self.login()
        assert code == 235, text
        return self

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def code_of(reply: tuple[int, str]) -> str:
    """'550 5.7.1' from a reply."""
    code, text = reply
    first = text.split("\n")[-1].split(" ")[0]
    return f"{code} {first}" if first[:1].isdigit() and "." in first else str(code)
