"""A private Dovecot LMTP server for the delivery tests, started once per test session.

Why a real Dovecot: it is the mailbox server an LMTP route meets in practice, and it has
its own opinions (enhanced status codes, its capability list, what it does with an unknown
user, the headers it adds) that a scripted peer would only echo back from our own reading
of RFC 2033.

The instance shares nothing with a system Dovecot: its own configuration file, base_dir
(where its sockets live), state_dir, log file and Maildirs, all under one temporary
directory, and an `instance_name` of its own. It listens on a Unix socket and on one
loopback TCP port. Users come from a passwd-file userdb; the domain of a recipient is
dropped (`auth_username_format = %n`), so <alice@example.org> is the user "alice".

Debian packages: dovecot-core and dovecot-lmtpd (Dovecot 2.3 syntax below). Without the
`dovecot` binary the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USERS = ("alice", "bob", "carol")
DOMAIN = "example.org"
# carol's mailbox holds at most this much: a larger message gets Dovecot's own 452 4.2.2
# after DATA (quota_full_tempfail), the per-recipient 4xx that RFC 2033 4.2 allows.
SMALL_QUOTA = "2K"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_dovecot() -> str | None:
    """The dovecot binary: on PATH, or in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which("dovecot")
    if found is None and os.access("/usr/sbin/dovecot", os.X_OK):
        found = "/usr/sbin/dovecot"
    return found


@dataclass(frozen=True)
class Dovecot:
    """What a test needs to reach the running Dovecot and read what it delivered."""

    root: Path
    socket: Path
    host: str
    port: int
    log: Path

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    def delivered(self, user: str) -> list[bytes]:
        """The files in the user's Maildir new/, oldest first (Maildir names begin with
        the delivery time), exactly as stored."""
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        return [path.read_bytes() for path in sorted(new.iterdir())]

    def clear(self) -> None:
        """Forget every delivered message, so a test sees only its own."""
        for user in USERS:
            for sub in ("new", "cur"):
                folder = self.maildir(user) / sub
                if folder.is_dir():
                    for path in folder.iterdir():
                        path.unlink()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _config(root: Path, port: int, user: str) -> str:
    # Dovecot 2.3 settings. `mail_save_crlf = yes` keeps the CRLF line endings we send,
    # so a test can compare the stored file with the message byte for byte;
    # `lmtp_add_received_header = no` leaves Return-Path and Delivered-To as the only
    # lines Dovecot adds on top. The quota plugin is there for carol (SMALL_QUOTA).
    return f"""\
instance_name = submitd-test-{os.getpid()}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
debug_log_path = {root}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = {user}
default_login_user = {user}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{root}/mail/%n
mail_save_crlf = yes
mail_fsync = never
auth_username_format = %n
lmtp_add_received_header = no
postmaster_address = postmaster@{DOMAIN}
hostname = mailbox.test
mail_plugins = quota
quota_full_tempfail = yes
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {root}/users
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


def _wait_ready(process: subprocess.Popen[bytes], sock: Path, port: int, log: Path) -> None:
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise RuntimeError(
                f"dovecot exited with {process.returncode}: {output}\n"
                + (log.read_text(errors="replace") if log.exists() else "")
            )
        if sock.exists():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"dovecot did not listen on {sock} and port {port} within 20 s")


def start_dovecot(binary: str) -> tuple[Dovecot, subprocess.Popen[bytes]]:
    """Write the configuration and start `dovecot -F`; returns once both listeners answer."""
    # mkdtemp, not pytest's tmp_path: the mail user (not root) must be able to walk into
    # it, and a Unix socket path has to stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="submitd-dovecot-"))
    root.chmod(0o755)
    # Dovecot delivers as the userdb's uid and refuses root for mail; as root, the
    # system's own "dovecot" account (made by dovecot-core) owns the Maildirs.
    root_user = os.geteuid() == 0
    account = pwd.getpwnam("dovecot") if root_user else pwd.getpwuid(os.getuid())
    uid, gid = account.pw_uid, account.pw_gid
    mail = root / "mail"
    mail.mkdir()
    os.chown(mail, uid, gid)
    extra = {"carol": f"userdb_quota_rule=*:storage={SMALL_QUOTA}"}
    lines = [
        f"{name}:{{PLAIN}}secret:{uid}:{gid}::{mail}/{name}::{extra.get(name, '')}\n"
        for name in USERS
    ]
    users = root / "users"
    users.write_text("".join(lines))
    users.chmod(0o644)
    port = free_port()
    conf = root / "dovecot.conf"
    conf.write_text(_config(root, port, account.pw_name))
    log = root / "dovecot.log"
    process = subprocess.Popen(
        [binary, "-c", str(conf), "-F"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Dovecot(root=root, socket=root / "run" / "lmtp", host="127.0.0.1", port=port, log=log)
    try:
        _wait_ready(process, server.socket, port, log)
    except BaseException:
        stop_dovecot(server, process)
        raise
    return server, process


def stop_dovecot(server: Dovecot, process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the master (it ends its children), SIGKILL to the group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session", name="dovecot")
def dovecot_fixture() -> Iterator[Dovecot]:
    """One Dovecot for the whole session; tests clear the Maildirs before they deliver."""
    binary = find_dovecot()
    if binary is None:
        pytest.skip(
            "dovecot is not installed (Debian packages dovecot-core and dovecot-lmtpd); "
            "the LMTP tests against a real Dovecot need it"
        )
    server, process = start_dovecot(binary)
    try:
        yield server
    finally:
        stop_dovecot(server, process)
