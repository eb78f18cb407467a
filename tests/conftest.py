"""Shared fixtures: a real submitd process on loopback ports, with a real user.

Integration and interop tests talk to it over real sockets and real TLS. The server runs
as `python -m submitd serve --config FILE` in its own process, so a test can kill it
with SIGKILL and start it again on the same data.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from submitd.store.queue import read_message_bytes

USER = "alice@example.org"
PASSWORD = "correct horse battery staple"
HOSTNAME = "localhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"submitd exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"submitd did not listen on {port} within {timeout}s")


@dataclass
class RunningServer:
    """A submitd process and what a test needs to reach it and inspect its queue."""

    root: Path
    extra_config: str = ""
    delivery: bool = False  # True: extra_config brings its own [delivery] section
    abuse: bool = False  # True: the abuse defences at their defaults, or extra_config's
    listen_extra: str = ""  # more lines for the [listen] section
    host: str = "127.0.0.1"
    starttls_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    user: str = USER
    password: str = PASSWORD
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "submitd.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def cafile(self) -> Path:
        return self.data_dir / "tls" / "self-signed.crt"

    @property
    def log_path(self) -> Path:
        return self.root / "submitd.log"

    def write_config(self) -> None:
        self.config_path.write_text(
            f'hostname = "{HOSTNAME}"\n'
            f'data_dir = "{self.data_dir}"\n'
            "[listen]\n"
            f'submission = ["127.0.0.1:{self.starttls_port}"]\n'
            f'submissions = ["127.0.0.1:{self.tls_port}"]\n'
            + self.listen_extra
            + "[auth]\nargon2_memory_kib = 8192\nargon2_time_cost = 1\n"
            + ("" if self.delivery else "[delivery]\nenabled = false\n")
            # Most tests make many connections and failed logins from 127.0.0.1 on
            # purpose; the defences themselves are tested with abuse=True.
            + ("" if self.abuse else "[abuse]\nenabled = false\n")
            + self.extra_config
        )

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "submitd", *args, "--config", str(self.config_path)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"submitd {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "submitd", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
            )
        wait_for_port(self.starttls_port, self.process)
        wait_for_port(self.tls_port, self.process)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=40)
        self.process = None
        return code

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cafile))
        return context

    def queue_ids(self) -> list[str]:
        with sqlite3.connect(self.data_dir / "submitd.sqlite3") as conn:
            return [row[0] for row in conn.execute("SELECT id FROM queue ORDER BY id")]

    def queued_message(self, queue_id: str) -> bytes:
        conn = sqlite3.connect(self.data_dir / "submitd.sqlite3")
        try:
            return read_message_bytes(conn, queue_id)
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_server(
    root: Path,
    extra_config: str = "",
    *,
    delivery: bool = False,
    abuse: bool = False,
    listen_extra: str = "",
) -> RunningServer:
    server = RunningServer(
        root=root,
        extra_config=extra_config,
        delivery=delivery,
        abuse=abuse,
        listen_extra=listen_extra,
    )
    server.write_config()
    server.cli("user", "add", server.user, "--password-stdin", stdin=server.password)
    server.start()
    return server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = make_server(tmp_path)
    try:
        yield running
    finally:
        if running.process is not None:
            running.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for a module of read-mostly tests (each test uses its own messages)."""
    running = make_server(tmp_path_factory.mktemp("submitd"))
    try:
        yield running
    finally:
        if running.process is not None:
            running.stop(signal.SIGKILL)


def split_received(message: bytes) -> tuple[bytes, bytes]:
    """(our Received field, everything after it): the rest must be the client's bytes."""
    assert message.startswith(b"Received: "), message[:80]
    end = 0
    while True:
        end = message.index(b"\r\n", end) + 2
        if message[end : end + 1] not in (b" ", b"\t"):
            return message[:end], message[end:]


os.environ.setdefault("PYTHONUNBUFFERED", "1")
# Servers and CLI runs started by the tests use this checkout's code, whatever copy of
# submitd happens to be installed.
_SOURCE = str(Path(__file__).resolve().parents[1] / "src")
os.environ["PYTHONPATH"] = os.pathsep.join([_SOURCE, *filter(None, [os.environ.get("PYTHONPATH")])])
