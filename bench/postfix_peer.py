"""A private Postfix instance as the benchmark's reference submission server.

Everything lives under one temporary directory (configuration, queue, data, log, SASL
database, certificate) and is started with `postfix -c DIR start`, so the system's
/etc/postfix and any system mail setup are never read for configuration nor changed.
The instance is set up the way a careful administrator runs port 587: STARTTLS required
(`smtpd_tls_security_level=encrypt`), AUTH only after TLS, Cyrus SASL from a sasldb
file (no saslauthd daemon needed), relay only for authenticated clients, everything
relayed to the benchmark's sink, and Postfix's normal fsync'd queue, so the comparison
with submitd is one of equal durability.

Gotchas handled here (see shared/notes/test-peers.md): there is no syslog, so
`maillog_file` is set (and allowed through `maillog_file_prefixes`); `postfix start`
reports configuration errors only to syslog when stderr is not a terminal, so on
failure `postfix check` is re-run under `script` to get its messages; every service is
unchrooted (a chroot would need copies of the SASL database and libraries).

Used as a module by run.py; `python bench/postfix_peer.py --port 2587 --sink-port 2525`
starts one by hand and prints how to reach it.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from proctree import cpu_seconds, tree_pids
from tlscert import make_self_signed

HOSTNAME = "postfix.bench.test"
DEFAULT_USER = "bench@example.test"
PACKAGES = ("postfix", "sasl2-bin", "libsasl2-modules", "libsasl2-modules-db")

# The unix-domain services of Debian's master.cf.proto, all with chroot "n"; the
# port-25 listener is left out on purpose: this instance only speaks submission.
_SERVICES = """\
pickup     unix  n  -  n  60    1  pickup
cleanup    unix  n  -  n  -     0  cleanup
qmgr       unix  n  -  n  300   1  qmgr
tlsmgr     unix  -  -  n  1000? 1  tlsmgr
rewrite    unix  -  -  n  -     -  trivial-rewrite
bounce     unix  -  -  n  -     0  bounce
defer      unix  -  -  n  -     0  bounce
trace      unix  -  -  n  -     0  bounce
verify     unix  -  -  n  -     1  verify
flush      unix  n  -  n  1000? 0  flush
proxymap   unix  -  -  n  -     -  proxymap
proxywrite unix  -  -  n  -     1  proxymap
smtp       unix  -  -  n  -     -  smtp
relay      unix  -  -  n  -     -  smtp
showq      unix  n  -  n  -     -  showq
error      unix  -  -  n  -     -  error
retry      unix  -  -  n  -     -  error
discard    unix  -  -  n  -     -  discard
local      unix  -  n  n  -     -  local
anvil      unix  -  -  n  -     1  anvil
scache     unix  -  -  n  -     1  scache
postlog    unix-dgram n  -  n  -  1  postlogd
"""


class PostfixError(RuntimeError):
    """Postfix could not be installed, configured or started; the text says why."""


@dataclass
class PostfixPeer:
    """One private instance: where it lives and how to reach it."""

    root: Path
    port: int
    sink_port: int
    user: str
    password: str

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def cert_file(self) -> Path:
        return self.config_dir / "cert.pem"

    @property
    def key_file(self) -> Path:
        return self.config_dir / "key.pem"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "maillog"

    def master_pid(self) -> int | None:
        """The master daemon's pid, or None if it is not running. The pid file alone
        could name a recycled pid (of someone else's process, which stop() would then
        kill); this instance's master is the process whose working directory is its
        queue directory."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            running_in = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError, IndexError):
            return None
        return pid if running_in == str(self.queue_dir) else None

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
    root = peer.root
    return f"""\
compatibility_level = 3.6
queue_directory = {peer.queue_dir}
data_directory = {root / "data"}
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {peer.log_file}
maillog_file_prefixes = {root}
myhostname = {HOSTNAME}
mydomain = bench.test
myorigin = $myhostname
mydestination =
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
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {peer.config_dir / "sasl"}
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
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
{_SERVICES}"""


def _write_sasl(peer: PostfixPeer) -> None:
    """sasldb with the one test user, and smtpd.conf pointing Cyrus SASL at it."""
    sasl_dir = peer.config_dir / "sasl"
    sasl_dir.mkdir()
    db = sasl_dir / "sasldb2"
    local, _, domain = peer.user.partition("@")
    subprocess.run(
        ["saslpasswd2", "-f", str(db), "-p", "-c", "-u", domain, local],
        input=peer.password,
        text=True,
        check=True,
    )
    # smtpd reads the database after dropping to the postfix user.
    os.chown(db, 0, grp.getgrnam("postfix").gr_gid)
    db.chmod(0o640)
    (sasl_dir / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
        f"mech_list: PLAIN LOGIN\nsasldb_path: {db}\n"
    )


def _check_traversable(path: Path) -> None:
    """The postfix user must walk down to data/, sasl/ and log/; a parent made by
    mkdtemp (mode 0700) would stop it with a bare "Permission denied" in the log."""
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & 0o001:
            raise PostfixError(f"{directory} is not searchable by others (chmod o+x it)")


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
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    _check_traversable(root)
    for sub in ("etc", "spool", "log"):
        (root / sub).mkdir()
    postfix_user = pwd.getpwnam("postfix")
    (root / "data").mkdir(mode=0o700)
    os.chown(root / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    if cert_pair:
        shutil.copyfile(cert_pair[0], peer.cert_file)
        shutil.copyfile(cert_pair[1], peer.key_file)
        peer.key_file.chmod(0o600)
    else:
        make_self_signed(peer.cert_file, peer.key_file, HOSTNAME, key_type)
    (peer.config_dir / "main.cf").write_text(_main_cf(peer, message_size_limit))
    (peer.config_dir / "master.cf").write_text(_master_cf(peer))
    _write_sasl(peer)
    return peer


def _postfix(peer: PostfixPeer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["postfix", "-c", str(peer.config_dir), *args], capture_output=True, text=True
    )


def _diagnose(peer: PostfixPeer) -> str:
    """Postfix's own complaint: `postfix check` prints to a terminal only, hence script."""
    command = f"postfix -c {peer.config_dir} check"
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"], capture_output=True, text=True
    )
    log = peer.log_file.read_text()[-2000:] if peer.log_file.exists() else ""
    return f"postfix check: {result.stdout.strip()}\nmaillog tail:\n{log}"


def start(peer: PostfixPeer, timeout: float = 20.0) -> None:
    """Start the instance and wait until its submission port answers."""
    result = _postfix(peer, "start")
    if result.returncode != 0:
        raise PostfixError(f"postfix start failed: {result.stderr.strip()}\n{_diagnose(peer)}")
    if not wait_for_port(peer.port, timeout):
        raise PostfixError(f"postfix did not listen on {peer.port}\n{_diagnose(peer)}")


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """True once something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def stop(peer: PostfixPeer, timeout: float = 15.0) -> None:
    """Stop the instance; kill its tree if the master does not exit in time."""
    pids = peer.pids()
    if not pids:
        return
    _postfix(peer, "stop")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pids[0]}").exists():
        time.sleep(0.1)
    for pid in peer.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def destroy(peer: PostfixPeer) -> None:
    """Stop the instance and delete its directory."""
    stop(peer)
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
