"""A private Postfix instance as the benchmark's reference submission server.

Everything lives under one temporary directory (configuration, queue, data, log, SASL
database, certificate) and is started with `postfix -c DIR start`, so the system's
/etc/postfix and any system mail setup are never read for configuration nor changed.
The instance is set up the way a careful administrator runs port 587: STARTTLS required
(`smtpd_tls_security_level=encrypt`), AUTH only after TLS, Cyrus SASL from a sasldb
file (no saslauthd daemon needed), relay only for authenticated clients, everything
relayed to the benchmark's sink, and Postfix's normal fsync'd queue, so the comparison
with submitd is one of equal durability.

The directory layout, the sasldb, start and stop, and the gotchas of running Postfix
like this, are in postfix_instance.py, shared with the delivery tests' smarthost.

Used as a module by run.py; `python bench/postfix_peer.py --port 2587 --sink-port 2525`
starts one by hand and prints how to reach it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from postfix_instance import (
    PACKAGES,
    PostfixError,
    PostfixInstance,
    main_cf_paths,
    main_cf_sasl,
    make_directories,
    services,
    write_sasl,
)
from postfix_instance import start as start_instance
from proctree import cpu_seconds, tree_pids
from tlscert import make_self_signed

HOSTNAME = "postfix.bench.test"
DEFAULT_USER = "bench@example.test"


@dataclass
class PostfixPeer(PostfixInstance):
    """One private instance: where it lives and how to reach it."""

    port: int
    sink_port: int
    user: str
    password: str

    def pids(self) -> list[int]:
        """Master and all its live children, for CPU and memory accounting."""
        pid = self.master_pid()
        return tree_pids(pid) if pid else []

    def cpu_seconds(self) -> float:
        """CPU used so far by the whole instance, exited children included."""
        return cpu_seconds(self.pids())


def ensure_installed() -> None:
    """Install the Debian packages without any question and without a system setup:
    "No configuration" leaves /etc/postfix without main.cf and starts no daemon."""
    if shutil.which("postfix") and shutil.which("saslpasswd2"):
        return
    selection = "postfix postfix/main_mailer_type select No configuration\n"
    subprocess.run(["debconf-set-selections"], input=selection, text=True, check=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PostfixError(f"apt-get install failed (run apt-get update?):\n{result.stderr}")


def version() -> str:
    """Postfix's version from its compiled-in defaults (needs no main.cf)."""
    result = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def _main_cf(peer: PostfixPeer, message_size_limit: int) -> str:
    """main.cf: a null client for local mail, a relay for authenticated submitters."""
    return f"""\
{main_cf_paths(peer, HOSTNAME, "bench.test")}\
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{peer.sink_port}
smtp_tls_security_level = none
# Only matter if the sink ever refuses a delivery: retry soon, so a drain completes.
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 10s
message_size_limit = {message_size_limit}
smtpd_tls_cert_file = {peer.cert_file}
smtpd_tls_key_file = {peer.key_file}
smtpd_tls_security_level = may
{main_cf_sasl(peer)}\
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
"""


def _master_cf(peer: PostfixPeer) -> str:
    """master.cf: one submission listener on the loopback port, then the services."""
    return f"""\
127.0.0.1:{peer.port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
{services()}"""


def setup(
    root: Path,
    port: int,
    sink_port: int,
    user: str = DEFAULT_USER,
    password: str = "bench-password",
    key_type: str = "ec",
    message_size_limit: int = 64 * 1024 * 1024,
    cert_pair: tuple[Path, Path] | None = None,
) -> PostfixPeer:
    """Write a complete instance under `root` (which must be empty or absent).
    `cert_pair` (cert, key) reuses a certificate the other servers also get."""
    ensure_installed()
    peer = PostfixPeer(root=root, port=port, sink_port=sink_port, user=user, password=password)
    make_directories(peer)
    if cert_pair:
        shutil.copyfile(cert_pair[0], peer.cert_file)
        shutil.copyfile(cert_pair[1], peer.key_file)
        peer.key_file.chmod(0o600)
    else:
        make_self_signed(peer.cert_file, peer.key_file, HOSTNAME, key_type)
    (peer.config_dir / "main.cf").write_text(_main_cf(peer, message_size_limit))
    (peer.config_dir / "master.cf").write_text(_master_cf(peer))
    write_sasl(peer, user, password)
    return peer


def start(peer: PostfixPeer, timeout: float = 20.0) -> None:
    """Start the instance and wait until its submission port answers."""
    start_instance(peer, peer.port, timeout=timeout)


def destroy(peer: PostfixPeer) -> None:
    """Stop the instance and delete its directory."""
    peer.stop()
    shutil.rmtree(peer.root, ignore_errors=True)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a private Postfix submission peer.")
    parser.add_argument("--port", type=int, default=2587)
    parser.add_argument("--sink-port", type=int, default=2525)
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--root", type=Path, help="directory (default: a new temporary one)")
    return parser.parse_args()


def main() -> None:
    """Start one instance and keep it until Ctrl-C, for poking at it by hand."""
    args = _parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="postfix-peer-"))
    peer = setup(root, args.port, args.sink_port, args.user, args.password)
    start(peer)
    print(f"postfix {version()} on 127.0.0.1:{peer.port}, relaying to :{peer.sink_port}")
    print(f"root {root}; CA file {peer.cert_file}; master pid {peer.master_pid()}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        destroy(peer)


if __name__ == "__main__":
    main()
