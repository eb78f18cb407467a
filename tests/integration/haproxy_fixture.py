"""Run a real HAProxy in front of a backend on loopback, for PROXY protocol tests.

Why a real one: the unit tests build headers by hand, which only proves we read what we
think HAProxy sends. Starting Debian's haproxy (package ``haproxy``, binary
``/usr/sbin/haproxy``) in TCP mode with ``send-proxy`` or ``send-proxy-v2`` checks
against what it really sends, including its health-check connections (v2 LOCAL).

It runs as ``haproxy -f CONF -db``: in the foreground, so it is our child and dies with
the handle; no daemon, no pid file, no system service touched. Everything listens and
connects on 127.0.0.0/8 only; `start` refuses any other backend.

Readiness is checked on HAProxy's stats socket (a UNIX socket in a temporary folder),
not by connecting to the frontend: a probe connection to the frontend would reach the
backend as one more proxied connection and upset tests that count them.

Use in a test module::

    from tests.integration.haproxy_fixture import start_haproxy  # noqa: F401 (fixture)

    def test_client_address_behind_haproxy(start_haproxy, running_server):
        front = free_port()
        start_haproxy(front, "127.0.0.1", running_server.proxy_port, "send-proxy-v2")
        ...  # connect to 127.0.0.1:front, from 127.0.0.2 to see a distinct client

The factory stops every HAProxy it started when the test ends; ``handle.stop()`` stops
one earlier. Outside pytest, `HAProxy.start` does the same and `stop` must be called.

Without the binary the fixture skips, except under CI (``CI`` set in the environment),
where it fails: a CI machine without haproxy is a missing install step, not a reason to
pass quietly.

Self-test (runs HAProxy against a one-connection backend and reads its header with
`ProxyHeaderReader`; run with
``PYTHONPATH=src python -m doctest -v tests/integration/haproxy_fixture.py``):

>>> import socket
>>> from submitd.smtp.proxy import ProxyHeaderReader
>>> def read_header(backend: socket.socket, then: bytes = b"") -> ProxyHeaderReader:
...     # One connection: the header, then octets until `rest` ends with `then`.
...     conn, _ = backend.accept()
...     reader = ProxyHeaderReader()
...     with conn:
...         conn.settimeout(10)
...         while True:
...             data = conn.recv(4096)
...             assert data, "closed before the header"
...             if reader.feed(data) and reader.rest.endswith(then):
...                 return reader
>>> for mode in ("send-proxy-v2", "send-proxy"):
...     backend = socket.create_server(("127.0.0.1", 0))
...     front = _free_port()
...     proxy = HAProxy.start(front, "127.0.0.1", backend.getsockname()[1], mode)
...     client = socket.socket()
...     client.bind(("127.0.0.2", 0))
...     client.connect(("127.0.0.1", front))
...     client.sendall(b"EHLO x\\r\\n")
...     reader = read_header(backend, then=b"\\r\\n")
...     got = reader.result
...     print(mode, got.client_ip, got.client_port == client.getsockname()[1],
...           got.server_ip, got.server_port == front, reader.rest)
...     client.close(); backend.close(); proxy.stop()
send-proxy-v2 127.0.0.2 True 127.0.0.1 True b'EHLO x\\r\\n'
send-proxy 127.0.0.2 True 127.0.0.1 True b'EHLO x\\r\\n'

Health checks with ``check-send-proxy`` arrive as v2 LOCAL, which the reader reports as
no address (use the real peer):

>>> backend = socket.create_server(("127.0.0.1", 0))
>>> proxy = HAProxy.start(_free_port(), "127.0.0.1", backend.getsockname()[1],
...                       "send-proxy-v2", health_check=True)
>>> print(read_header(backend).result)
None
>>> backend.close(); proxy.stop()
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

SendProxy = Literal["send-proxy-v2", "send-proxy"]
#: The Debian package that provides the binary; CI installs it with apt-get.
DEBIAN_PACKAGE = "haproxy"

_CONFIG = """\
global
    maxconn 256
    nbthread 1
    stats socket {stats} mode 600 level user

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend front
    bind {listen}
    default_backend back

backend back
    server submitd {backend} {send_proxy}{check}
"""


def haproxy_binary() -> str | None:
    """Path of the haproxy binary, also where root's PATH lacks /usr/sbin."""
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback(host: str) -> str:
    """The address as HAProxy writes it, refusing anything off 127.0.0.0/8 and ::1."""
    if host == "localhost":
        return "127.0.0.1"
    address = ipaddress.ip_address(host)
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address; tests stay on loopback")
    return f"[{address}]" if address.version == 6 else str(address)


@dataclass
class HAProxy:
    """One running haproxy process; `stop` ends it and removes its files."""

    process: subprocess.Popen[bytes]
    folder: Path
    listen_port: int

    @classmethod
    def start(
        cls,
        listen_port: int,
        backend_host: str,
        backend_port: int,
        send_proxy: SendProxy = "send-proxy-v2",
        *,
        listen_host: str = "127.0.0.1",
        health_check: bool = False,
        timeout: float = 15.0,
    ) -> HAProxy:
        """Start haproxy on listen_host:listen_port, forwarding to the backend.

        `health_check` adds ``check check-send-proxy inter 1s``: HAProxy then connects
        to the backend on its own every second and sends a v2 LOCAL header (or a v1
        line with ``send-proxy``) before closing, as a real deployment would.
        """
        if send_proxy not in ("send-proxy-v2", "send-proxy"):
            raise ValueError(f"send_proxy must be send-proxy-v2 or send-proxy, not {send_proxy}")
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError(f"haproxy not found: apt-get install {DEBIAN_PACKAGE}")
        listen = f"{_loopback(listen_host)}:{int(listen_port)}"
        backend = f"{_loopback(backend_host)}:{int(backend_port)}"
        # A short folder of our own: UNIX socket paths must fit in 108 octets, which
        # pytest's tmp_path does not promise.
        folder = Path(tempfile.mkdtemp(prefix="haproxy-"))
        stats = folder / "stats.sock"
        config = folder / "haproxy.cfg"
        config.write_text(
            _CONFIG.format(
                stats=stats,
                listen=listen,
                backend=backend,
                send_proxy=send_proxy,
                check=" check check-send-proxy inter 1s" if health_check else "",
            )
        )
        with (folder / "haproxy.log").open("wb") as log:
            process = subprocess.Popen(
                [binary, "-f", str(config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        handle = cls(process, folder, int(listen_port))
        try:
            handle._wait_ready(stats, timeout)
        except BaseException:
            handle.stop()
            raise
        return handle

    def _wait_ready(self, stats: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(str(stats))
                sock.sendall(b"show info\n")
                if b"Pid:" in sock.recv(65536):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"haproxy not ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """What haproxy printed (warnings, alerts); for failure messages."""
        try:
            return (self.folder / "haproxy.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop at once (SIGTERM is HAProxy's hard stop); idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


StartHAProxy = Callable[..., HAProxy]


@pytest.fixture
def start_haproxy() -> Iterator[StartHAProxy]:
    """Factory: ``start_haproxy(listen_port, backend_host, backend_port, send_proxy)``.

    Takes the keyword arguments of `HAProxy.start` too, returns the `HAProxy` handle,
    and stops every instance it started when the test ends.
    """
    if haproxy_binary() is None:
        message = f"haproxy is not installed (Debian package {DEBIAN_PACKAGE!r})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    started: list[HAProxy] = []

    def start(
        listen_port: int,
        backend_host: str,
        backend_port: int,
        send_proxy: SendProxy = "send-proxy-v2",
        *,
        listen_host: str = "127.0.0.1",
        health_check: bool = False,
        timeout: float = 15.0,
    ) -> HAProxy:
        handle = HAProxy.start(
            listen_port,
            backend_host,
            backend_port,
            send_proxy,
            listen_host=listen_host,
            health_check=health_check,
            timeout=timeout,
        )
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()
