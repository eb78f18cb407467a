"""Real DNS for the DKIM tests: keys made by `submitd dkim keygen`, their printed records
served by dnsmasq on loopback, and OpenDKIM run in namespaces of its own.

Nothing is sent off the machine: dnsmasq runs with --no-resolv (it forwards nothing) and
listens on 127.0.0.1 only; dkimpy's lookups go through a dnspython resolver that knows
only that server; OpenDKIM runs in a network namespace whose only interface is its own
loopback (see netns_verify.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from submitd.cli.dkim import dkim as dkim_cli
from submitd.message import dkim
from tests.delivery.dns_fixture import running_dnsmasq, txt

DOMAIN = "example.org"
NETNS_HELPER = Path(__file__).with_name("netns_verify.py")
_ZONE_LINE = re.compile(r'(?P<name>\S+)\. IN TXT (?P<strings>(?:"[^"]*" ?)+)')


@dataclass(frozen=True)
class PublishedKey:
    key: dkim.SigningKey
    name: str  # <selector>._domainkey.<domain>, as printed by the CLI
    strings: tuple[str, ...]  # the TXT character-strings, as printed by the CLI
    path: Path  # where the CLI wrote the private key


def _keygen(config: Path, selector: str, key_type: str) -> PublishedKey:
    """`submitd dkim keygen` through click, and the key it wrote at the default path."""
    result = CliRunner().invoke(
        dkim_cli,
        ["keygen", DOMAIN, "--selector", selector, "--type", key_type, "--config", str(config)],
    )
    assert result.exit_code == 0, result.output
    match = _ZONE_LINE.fullmatch(result.stdout.strip())
    assert match, result.stdout
    data_dir = config.parent / "data"
    path = data_dir / "dkim" / DOMAIN / f"{selector}.key"
    key = dkim.load_signing_key(path, DOMAIN, selector)
    strings = tuple(re.findall(r'"([^"]*)"', match.group("strings")))
    return PublishedKey(key, match.group("name"), strings, path)


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PublishedKey]:
    """RSA and Ed25519 keys, made by the CLI under a configured data_dir."""
    root = tmp_path_factory.mktemp("dkim-keys")
    config = root / "submitd.toml"
    config.write_text(f'hostname = "submit.example.org"\ndata_dir = "{root / "data"}"\n')
    return {
        "rsa": _keygen(config, "rsa2048", "rsa"),
        "ed25519": _keygen(config, "ed2024", "ed25519"),
        "client": _keygen(config, "client", "rsa"),  # stands for a client's own signer
    }


def dnsmasq_conf(keys: dict[str, PublishedKey]) -> str:
    """txt-record lines in dnsmasq's configuration-file syntax, the strings the CLI
    printed published exactly as they are (one quoted item per character-string)."""
    return "".join(txt(key.name, *key.strings) + "\n" for key in keys.values())


@dataclass
class DnsServer:
    port: int

    def txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's dnsfunc: the TXT record's strings joined, asked of our server only."""
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        if isinstance(name, bytes):
            name = name.decode("ascii")
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout:
            raise AssertionError(f"our dnsmasq on port {self.port} did not answer") from None
        return b"".join(b"".join(rdata.strings) for rdata in answer)


@pytest.fixture(scope="session")
def dns_server(
    published: dict[str, PublishedKey], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DnsServer]:
    """dnsmasq on 127.0.0.1:<free port> (the delivery tests' fixture), serving the
    records the CLI printed."""
    pytest.importorskip("dns.resolver", reason="dnspython not installed")
    records = [txt(key.name, *key.strings) for key in published.values()]
    with running_dnsmasq(records, tmp_path_factory.mktemp("dnsmasq")) as dnsmasq:
        yield DnsServer(dnsmasq.port)


@dataclass
class OpenDkim:
    """opendkim-testmsg, run in private namespaces against the same records."""

    conf: str
    probe_name: str
    root: Path

    def verify(self, messages: dict[str, bytes]) -> dict[str, tuple[int, str]]:
        """{name: (exit status, stderr)} for each message; 0 means it verified."""
        workdir = Path(self.root) / f"batch{len(list(self.root.iterdir()))}"
        workdir.mkdir()
        (workdir / "dnsmasq.conf").write_text(self.conf)
        (workdir / "probe-name").write_text(self.probe_name)
        for name, message in messages.items():
            (workdir / f"{name}.eml").write_bytes(message)
        done = subprocess.run(
            ["unshare", "--net", "--mount", "--", sys.executable, str(NETNS_HELPER), str(workdir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        raw = json.loads(done.stdout)
        return {name.removesuffix(".eml"): (code, err) for name, (code, err) in raw.items()}


@pytest.fixture(scope="session")
def opendkim(
    published: dict[str, PublishedKey], tmp_path_factory: pytest.TempPathFactory
) -> OpenDkim:
    if shutil.which("opendkim-testmsg") is None:
        pytest.skip("opendkim-testmsg not installed (Debian package opendkim-tools)")
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq not installed (Debian package dnsmasq-base)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed (Debian package util-linux)")
    pytest.importorskip("dns.resolver", reason="dnspython not installed")
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create network/mount namespaces here: {probe.stderr.strip()}")
    return OpenDkim(
        dnsmasq_conf(published),
        next(iter(published.values())).name,
        tmp_path_factory.mktemp("opendkim"),
    )
