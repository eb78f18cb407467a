"""A real DNS server for delivery tests: dnsmasq on 127.0.0.1:<free port>.

Use it from a test module by importing the fixture (pytest picks up fixtures imported
into a module) or by starting a server of your own:

    from tests.delivery.dns_fixture import delivery_dns, host, mx  # noqa: F401

    def test_something(delivery_dns):
        delivery_dns.add(mx("a.test", "mx1.a.test", 10), host("mx1.a.test", "127.0.0.2"))
        resolver = MxResolver([delivery_dns.nameserver])

    with running_dnsmasq(loopback_mx("b.test", 2)[0], tmp_path) as server: ...

Nothing leaves the machine: dnsmasq runs with --no-resolv (it forwards nothing) and
listens on 127.0.0.1 only. It answers only from its configuration: names under a "local"
zone (by default the RFC 2606 names: .test, .example, example.com/net/org, .invalid) that
it has no record for get NXDOMAIN, names it has some records for get NODATA for other
types, and any other name gets REFUSED (which a resolver sees as a server failure; tests
can use that for "temporary").

Records are lines of dnsmasq's configuration-file syntax; build them with `mx`, `null_mx`,
`host`, `txt`, `cname` and `rr`. dnsmasq cannot take new MX records while running (SIGHUP
rereads hosts files, not the configuration), so `Dnsmasq.add` rewrites the file and restarts
the server on the same port: a resolver pointed at it keeps working.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.resolver
import pytest

RFC2606_ZONES = ("test", "example", "example.com", "example.net", "example.org", "invalid")
_READY_NAME = "ready.submitd-fixture.invalid"  # answered by every instance; see _wait_ready


# --- records, in dnsmasq's configuration-file syntax -------------------------------------


def mx(domain: str, exchange: str, preference: int) -> str:
    return f"mx-host={domain},{exchange},{preference}"


def null_mx(domain: str) -> str:
    """RFC 7505 null MX (`0 .`): dnsmasq 2.90 takes "." as the exchange and sends the
    root name (checked with dnspython: the answer reads `0 .`). `rr(domain, 15, "000000")`
    publishes the same RDATA byte for byte, for a dnsmasq that would not."""
    return f"mx-host={domain},.,0"


def host(name: str, *addresses: str) -> str:
    """A and/or AAAA records (and PTR) for `name`; e.g. host("mx1.a.test", "127.0.0.2", "::1")."""
    if not addresses:
        raise ValueError("host() needs at least one address")
    return f"host-record={name},{','.join(addresses)}"


def txt(name: str, *strings: str) -> str:
    """In a configuration file dnsmasq reads each "..." as one character-string."""
    return f"txt-record={name}," + ",".join(f'"{s}"' for s in strings)


def cname(alias: str, target: str) -> str:
    """dnsmasq serves a CNAME only to a target it has records for itself."""
    return f"cname={alias},{target}"


def rr(name: str, rrtype: int, rdata_hex: str) -> str:
    """Any record type, RDATA given in hex (dnsmasq's --dns-rr)."""
    return f"dns-rr={name},{rrtype},{rdata_hex}"


def loopback_mx(
    domain: str, count: int, first: int = 2, preference_step: int = 10
) -> tuple[list[str], list[str]]:
    """MX records for `domain` naming mx1..mxN.<domain> at 127.0.0.<first>, <first+1>, ...

    Preferences are 10, 20, ... (all 10 with preference_step=0). Returns the records
    and the addresses in preference order, for a test that runs SMTP sinks on them.
    """
    records: list[str] = []
    addresses: list[str] = []
    for index in range(count):
        address = f"127.0.0.{first + index}"
        exchange = f"mx{index + 1}.{domain}"
        preference = 10 + preference_step * index
        records.append(mx(domain, exchange, preference))
        records.append(host(exchange, address))
        addresses.append(address)
    return records, addresses


# --- the server ---------------------------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


@dataclass
class Dnsmasq:
    """A running dnsmasq: its port, and a way to add records to it."""

    port: int
    directory: Path
    local_zones: tuple[str, ...] = RFC2606_ZONES
    records: list[str] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        """ "127.0.0.1:<port>", as `MxResolver(nameservers=[...])` takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.directory / "dnsmasq.conf"

    @property
    def log(self) -> Path:
        return self.directory / "dnsmasq.log"

    def resolver(self, timeout: float = 5.0) -> dns.resolver.Resolver:
        """A synchronous dnspython resolver that asks this server and nothing else."""
        resolver = dns.resolver.Resolver(configure=False)  # never read /etc/resolv.conf
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = timeout
        return resolver

    def add(self, *records: str) -> None:
        """Serve `records` too (ones already served are not repeated); restarts dnsmasq
        on the same port when there is anything new."""
        new = [record for record in records if record not in self.records]
        if not new:
            return
        self.records.extend(new)
        self.stop()
        self.start()

    def start(self) -> None:
        self._write_conf()
        error = ""
        for _attempt in range(5):  # the port may linger a moment after a restart
            with self.log.open("ab") as log:
                self._process = subprocess.Popen(
                    [
                        "dnsmasq",
                        f"--conf-file={self.conf}",
                        "--keep-in-foreground",
                        "--no-resolv",  # never forward a query off the machine
                        "--no-hosts",  # not /etc/hosts either: only our records
                        "--listen-address=127.0.0.1",
                        "--bind-interfaces",
                        f"--port={self.port}",
                        "--pid-file=",
                        "--log-facility=-",
                        "--log-queries",
                    ],
                    stdout=log,
                    stderr=log,
                )
            if self._wait_ready():
                return
            error = self.log.read_text(errors="replace")[-2000:]
            self.stop()
            time.sleep(0.2)
        raise RuntimeError(f"dnsmasq did not start on port {self.port}: {error}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _write_conf(self) -> None:
        lines = [f"local=/{zone}/" for zone in self.local_zones]
        lines.append(txt(_READY_NAME, "ok"))
        lines.extend(self.records)
        self.conf.write_text("".join(f"{line}\n" for line in lines))

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        resolver = self.resolver(timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                resolver.resolve(_READY_NAME, "TXT", search=False)
            except (dns.exception.Timeout, dns.resolver.NoNameservers):
                time.sleep(0.05)
                continue
            return True
        return False


@contextmanager
def running_dnsmasq(
    records: Iterable[str],
    directory: Path,
    local_zones: Sequence[str] = RFC2606_ZONES,
) -> Iterator[Dnsmasq]:
    """dnsmasq on 127.0.0.1:<free port> serving `records`, stopped on exit.

    Skips the test if dnsmasq is missing. `directory` holds the conf file and
    dnsmasq's log (each query is logged: read `server.log` when a test surprises you).
    """
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq not installed (Debian package dnsmasq-base)")
    directory.mkdir(parents=True, exist_ok=True)
    last_error: RuntimeError | None = None
    for _attempt in range(5):  # another process may take the free port before dnsmasq
        server = Dnsmasq(free_port(), directory, tuple(local_zones), list(records))
        try:
            server.start()
        except RuntimeError as error:
            last_error = error
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    raise RuntimeError(f"could not start dnsmasq: {last_error}")


@contextmanager
def silent_udp_port() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that is bound but never answers: a DNS server that is
    down without saying so (no ICMP port-unreachable, so the client must time out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def delivery_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """One dnsmasq for the whole session; test modules `add()` the records they need.

    Give each module its own domains (e.g. under "<module>.test") so records added by
    one module never change the answers another expects.
    """
    with running_dnsmasq((), tmp_path_factory.mktemp("delivery-dns")) as server:
        yield server
