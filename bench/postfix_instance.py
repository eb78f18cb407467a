"""A private Postfix instance under one directory: the set-up that the benchmark's
reference server (postfix_peer.py) and the delivery tests' smarthost
(tests/delivery/postfix_fixture.py) have in common.

Everything lives under one root (configuration, queue, data, log, SASL database,
certificate) and runs with `postfix -c DIR start`, so /etc/postfix and any system mail
setup are neither read for configuration nor changed. Each user writes its own listener
and routing; this module gives the directory layout, the main.cf lines about paths and
SASL, the unix-domain services, the sasldb, start, stop and Postfix's own diagnosis.

Gotchas handled here (see shared/notes/test-peers.md): there is no syslog, so
`maillog_file` is set (and allowed through `maillog_file_prefixes`) and postlogd runs;
`postfix start` reports configuration errors only to syslog when stderr is not a
terminal, so on failure `postfix check` is re-run under `script` to get its messages;
every service is unchrooted (a chroot would need copies of the SASL database and
libraries); the sasldb must be readable by the postfix group; the postfix user must be
able to walk down into the root.

Standard library only, and no import of another bench module: bench scripts import it
as `postfix_instance` (bench/ is their sys.path[0]), the tests as
`bench.postfix_instance` (the repository root is on pytest's path).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

# The Debian packages that provide postfix, postconf and saslpasswd2 with sasldb support.
PACKAGES = ("postfix", "sasl2-bin", "libsasl2-modules", "libsasl2-modules-db")

# The unix-domain services of Debian's master.cf.proto, all with chroot "n"; no port-25
# listener: each instance adds its own listener in front of these.
_SERVICES = (
    "pickup     unix  n  -  n  60    1  pickup",
    "cleanup    unix  n  -  n  -     0  cleanup",
    "qmgr       unix  n  -  n  300   1  qmgr",
    "tlsmgr     unix  -  -  n  1000? 1  tlsmgr",
    "rewrite    unix  -  -  n  -     -  trivial-rewrite",
    "bounce     unix  -  -  n  -     0  bounce",
    "defer      unix  -  -  n  -     0  bounce",
    "trace      unix  -  -  n  -     0  bounce",
    "verify     unix  -  -  n  -     1  verify",
    "flush      unix  n  -  n  1000? 0  flush",
    "proxymap   unix  -  -  n  -     -  proxymap",
    "proxywrite unix  -  -  n  -     1  proxymap",
    "smtp       unix  -  -  n  -     -  smtp",
    "relay      unix  -  -  n  -     -  smtp",
    "showq      unix  n  -  n  -     -  showq",
    "error      unix  -  -  n  -     -  error",
    "retry      unix  -  -  n  -     -  error",
    "discard    unix  -  -  n  -     -  discard",
    "local      unix  -  n  n  -     -  local",
    "anvil      unix  -  -  n  -     1  anvil",
    "scache     unix  -  -  n  -     1  scache",
    "postlog    unix-dgram n  -  n  -  1  postlogd",
)


def services(omit: Collection[str] = ()) -> str:
    """master.cf lines of the unix-domain services, without those named in `omit`."""
    return "".join(line + "\n" for line in _SERVICES if line.split()[0] not in omit)


class PostfixError(RuntimeError):
    """Postfix could not be found, set up or started, or a wait timed out; says why."""


@dataclass
class PostfixInstance:
    """Where a private instance lives under `root`, and its master process."""

    root: Path

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
    def sasl_dir(self) -> Path:
        return self.config_dir / "sasl"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "maillog"

    def log_text(self) -> str:
        """Postfix's log so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

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

    def stop(self, timeout: float = 15.0) -> None:
        """`postfix -c DIR stop`; kill the master and its children (the process group
        it leads) if it does not exit in time."""
        pid = self.master_pid()
        if pid is None:
            return
        postfix(self, "stop")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if self.master_pid() == pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def tool(name: str) -> str:
    """Absolute path of a program, also when /usr/sbin is not on PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise PostfixError(
            f"{name} not found: install the Debian packages {' '.join(PACKAGES)} "
            "(preseed `postfix postfix/main_mailer_type select No configuration`)"
        )
    return found


def postfix(instance: PostfixInstance, *args: str) -> subprocess.CompletedProcess[str]:
    """`postfix -c DIR ARGS...` for this instance."""
    return subprocess.run(
        [tool("postfix"), "-c", str(instance.config_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def diagnose(instance: PostfixInstance) -> str:
    """Postfix's own complaint: `postfix check` prints to a terminal only, hence script."""
    command = f"{tool('postfix')} -c {instance.config_dir} check"
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=60
    )
    return f"postfix check: {result.stdout.strip()}\nmaillog tail:\n{instance.log_text()[-4000:]}"


def check_traversable(path: Path) -> None:
    """The postfix user (and a pipe command's user) must walk down into the root; a
    parent made by mkdtemp (mode 0700) would stop it with a bare "Permission denied"."""
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & 0o001:
            raise PostfixError(f"{directory} is not searchable by others (chmod o+x it)")


def make_directories(instance: PostfixInstance, extra: Collection[str] = ()) -> None:
    """The root (created if absent, mode 0755, searchable from /), its etc/, spool/ and
    log/ (and `extra` ones), and data/ owned by the postfix user."""
    root = instance.root
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    check_traversable(root)
    for sub in ("etc", "spool", "log", *extra):
        (root / sub).mkdir()
    postfix_user = pwd.getpwnam("postfix")
    (root / "data").mkdir(mode=0o700)
    os.chown(root / "data", postfix_user.pw_uid, postfix_user.pw_gid)


def main_cf_paths(instance: PostfixInstance, hostname: str, domain: str) -> str:
    """The first main.cf lines: this instance's directories and log, Debian's program
    directories, the identity, and no local domains."""
    return f"""\
compatibility_level = 3.6
queue_directory = {instance.queue_dir}
data_directory = {instance.root / "data"}
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {instance.log_file}
maillog_file_prefixes = {instance.root}
myhostname = {hostname}
mydomain = {domain}
myorigin = $myhostname
mydestination =
"""


def main_cf_sasl(instance: PostfixInstance) -> str:
    """main.cf lines for Cyrus SASL from write_sasl's sasldb; relay for its users only."""
    return f"""\
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {instance.sasl_dir}
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
"""


def write_sasl(instance: PostfixInstance, user: str, password: str) -> None:
    """sasldb with the one user (`local@domain`), and smtpd.conf pointing Cyrus SASL at it."""
    sasl_dir = instance.sasl_dir
    sasl_dir.mkdir()
    db = sasl_dir / "sasldb2"
    local, _, domain = user.partition("@")
    subprocess.run(
        [tool("saslpasswd2"), "-f", str(db), "-p", "-c", "-u", domain, local],
        input=password,
        text=True,
        check=True,
        timeout=60,
    )
    # smtpd reads the database after dropping to the postfix user.
    os.chown(db, 0, grp.getgrnam("postfix").gr_gid)
    db.chmod(0o640)
    (sasl_dir / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
        f"mech_list: PLAIN LOGIN\nsasldb_path: {db}\n"
    )


def start(
    instance: PostfixInstance, port: int, host: str = "127.0.0.1", timeout: float = 20.0
) -> None:
    """`postfix start`, then wait until host:port accepts connections. On failure raise
    PostfixError with Postfix's diagnosis (the instance may be left half started: stop it)."""
    result = postfix(instance, "start")
    if result.returncode != 0:
        raise PostfixError(f"postfix start failed: {result.stderr.strip()}\n{diagnose(instance)}")
    if not wait_for_port(port, timeout, host):
        raise PostfixError(f"postfix did not listen on {port}\n{diagnose(instance)}")


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """True once something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False
