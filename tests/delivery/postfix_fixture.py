"""A private Postfix instance as the smarthost that submitd relays to in delivery tests.

Everything lives under one temporary directory (configuration, queue, data, log, SASL
database, certificate, mailbox) and runs with `postfix -c DIR start`, so /etc/postfix and
any system mail setup are neither read for configuration nor changed. The instance:

- listens on 127.0.0.1:<free port> only (IPv4 only), `myhostname = postfix.test`;
- requires STARTTLS before MAIL (`smtpd_tls_security_level = encrypt`) with a self-signed
  certificate for "postfix.test" (also localhost and 127.0.0.1), which `cafile` verifies;
- requires AUTH (Cyrus SASL, PLAIN/LOGIN, from a sasldb file, no saslauthd) after TLS only,
  and relays only for authenticated clients (`permit_sasl_authenticated, reject`);
- has no local domains (`mydestination =` empty) and sends every accepted recipient, of
  any domain, to one `pipe` transport whose command writes the envelope and the message
  into the mailbox directory, which `messages()` reads.

What a delivered message holds, compared with the DATA the client sent:
- Postfix's smtpd prepends exactly one `Received:` field (possibly folded over several
  lines) and nothing else: no Return-Path, Delivered-To, X-Original-To (pipe flags R, D,
  O are not set), no "From " line (no F), no authentication or TLS comment
  (`smtpd_sasl_authenticated_header` and `smtpd_tls_received_header` stay off), and no
  header rewriting or added Date/Message-ID/From/To (`local_header_rewrite_clients` is
  empty, `remote_header_rewrite_domain` is empty by default);
- the rest is the client's message byte for byte: lines end in CRLF (`eol=\\r\\n`), the
  SMTP dot-stuffing is undone and no ">From" or dot quoting is added, 8-bit bytes pass
  unchanged (pipe does no MIME conversion).
`split_received()` separates the two.

The directory layout, the main.cf lines about paths and SASL, the services, the sasldb,
start, stop and Postfix's diagnosis are bench/postfix_instance.py's, shared with the
benchmark's Postfix (bench/postfix_peer.py), and the certificate is bench/tlscert.py's;
both modules import nothing from the rest of bench/, so they load here as `bench.*`
from the repository root (on pytest's path). The gotchas of running Postfix like this
are described there; one more is this fixture's own: pipe refuses to run commands as
root or as the mail owner, so the delivery command runs as `nobody`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench.postfix_instance import (
    PostfixError,
    PostfixInstance,
    main_cf_paths,
    main_cf_sasl,
    make_directories,
    services,
    start,
    tool,
    write_sasl,
)
from bench.tlscert import make_self_signed

TLS_NAME = "postfix.test"
SASL_DOMAIN = "postfix.test"
DELIVERY_USER = "nobody"

# Run by Postfix's pipe(8) as `nobody`, once per delivery (all recipients of one message
# arrive together: the transport's nexthop is fixed). argv: mailbox, queue id, sender,
# recipients. Writes "Q <queue id>\nS <sender>\nR <recipient>\n...\n\n" and then the
# message exactly as pipe hands it over, into tmp/, then renames it into new/.
_DELIVER_SCRIPT = """\
import os
import sys
import time

mailbox, queue_id, sender, *recipients = (os.fsencode(arg) for arg in sys.argv[1:])
envelope = b"Q " + queue_id + b"\\n" + b"S " + sender + b"\\n"
envelope += b"".join(b"R " + recipient + b"\\n" for recipient in recipients) + b"\\n"
name = b"%020d.%d" % (time.time_ns(), os.getpid())
tmp = os.path.join(mailbox, b"tmp", name)
try:
    with open(tmp, "xb") as out:
        out.write(envelope)
        out.write(sys.stdin.buffer.read())
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, os.path.join(mailbox, b"new", name))
except OSError as error:
    print(f"mailbox write failed: {error}", file=sys.stderr)
    sys.exit(75)  # EX_TEMPFAIL: Postfix defers and retries
"""

_QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")


@dataclass(frozen=True)
class DeliveredMessage:
    """One message as the smarthost delivered it: envelope and the exact bytes."""

    sender: str
    recipients: list[str]
    data: bytes
    queue_id: str = ""


@dataclass
class PostfixSmarthost(PostfixInstance):
    """A running private Postfix: where to reach it, how to log in, what it delivered."""

    host: str
    port: int
    cafile: Path
    tls_name: str
    username: str
    password: str

    @property
    def mailbox_dir(self) -> Path:
        return self.root / "mailbox"

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that verifies this instance's certificate."""
        return ssl.create_default_context(cafile=str(self.cafile))

    def delivered(self) -> list[DeliveredMessage]:
        """What has been delivered so far, oldest first, without waiting. Deliveries of
        the same queued message (should Postfix ever split its recipients) are merged."""
        by_queue_id: dict[str, DeliveredMessage] = {}
        result: list[DeliveredMessage] = []
        for path in sorted((self.mailbox_dir / "new").iterdir()):
            message = _parse_delivery(path.read_bytes())
            earlier = by_queue_id.get(message.queue_id)
            if earlier is not None and earlier.data == message.data:
                earlier.recipients.extend(message.recipients)
                continue
            by_queue_id[message.queue_id] = message
            result.append(message)
        return result

    def queue_is_empty(self) -> bool:
        """True when no message waits in any of the instance's queues."""
        for name in _QUEUE_SUBDIRS:
            directory = self.queue_dir / name
            if directory.is_dir() and any(p.is_file() for p in directory.rglob("*")):
                return False
        return True

    def messages(self, count: int = 1, timeout: float = 30.0) -> list[DeliveredMessage]:
        """All messages delivered so far (oldest first), once at least `count` have been
        delivered and the queue is empty, so each message has all its recipients.
        Raises PostfixError with the log's tail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.delivered()
            if len(found) >= count and self.queue_is_empty():
                return found
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{len(found)} of {count} message(s) delivered after {timeout}s "
                    f"(queue empty: {self.queue_is_empty()})\nmaillog tail:\n"
                    f"{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)

    def clear(self) -> None:
        """Forget the messages delivered so far (for the next test of the session)."""
        for path in (self.mailbox_dir / "new").iterdir():
            path.unlink()


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(the Received field Postfix prepended, the rest: the client's message)."""
    if not data.startswith(b"Received: "):
        raise ValueError(f"no leading Received field: {data[:80]!r}")
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def _parse_delivery(raw: bytes) -> DeliveredMessage:
    envelope, _, data = raw.partition(b"\n\n")
    queue_id, sender, recipients = "", "", []
    for line in envelope.split(b"\n"):
        kind, value = line[:2], os.fsdecode(line[2:])
        if kind == b"Q ":
            queue_id = value
        elif kind == b"S ":
            sender = value
        elif kind == b"R ":
            recipients.append(value)
    return DeliveredMessage(sender=sender, recipients=recipients, data=data, queue_id=queue_id)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postfix_installed() -> bool:
    return shutil.which("postfix") is not None or Path("/usr/sbin/postfix").exists()


def _main_cf(smarthost: PostfixSmarthost) -> str:
    return f"""\
{main_cf_paths(smarthost, TLS_NAME, TLS_NAME)}\
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
biff = no
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:local delivery is disabled
# Every recipient of every domain goes to the mailbox writer, one delivery per message.
transport_maps = static:catchall:{TLS_NAME}
default_transport = catchall
catchall_destination_recipient_limit = 1000
# Hermetic: no DNS, no header rewriting, nothing added to headers but Received.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
local_header_rewrite_clients =
smtpd_error_sleep_time = 0
# A short queue life: retry soon, give up soon.
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 10s
maximal_queue_lifetime = 10m
bounce_queue_lifetime = 10m
delay_warning_time = 0
smtpd_tls_cert_file = {smarthost.cafile}
smtpd_tls_key_file = {smarthost.key_file}
smtpd_tls_security_level = encrypt
smtpd_sasl_auth_enable = yes
smtpd_tls_auth_only = yes
{main_cf_sasl(smarthost)}"""


def _master_cf(smarthost: PostfixSmarthost, python: str) -> str:
    script = smarthost.root / "bin" / "deliver.py"
    return f"""\
{smarthost.host}:{smarthost.port} inet n - n - - smtpd
  -o syslog_name=postfix/smarthost
catchall unix - n n - - pipe
  flags=X user={DELIVERY_USER} null_sender= eol=\\r\\n
  argv={python} -I -S {script} {smarthost.mailbox_dir} ${{queue_id}} ${{sender}} ${{recipient}}
{services(omit={"local"})}"""


def _python_for_nobody() -> str:
    """A Python 3 that `nobody` can run (a virtualenv under /root may not be)."""
    for candidate in ("/usr/bin/python3", sys.executable):
        if os.access(candidate, os.X_OK):
            return candidate
    raise PostfixError("no python3 for the delivery command")


def start_smarthost(root: Path | None = None, timeout: float = 20.0) -> PostfixSmarthost:
    """Set up a new instance under `root` (default: a new temporary directory; it must be
    empty or absent and searchable by others) and start it. Needs root privileges."""
    for name in ("postfix", "postconf", "saslpasswd2"):
        tool(name)
    if os.geteuid() != 0:
        raise PostfixError("starting a private Postfix instance needs root")
    root = root or Path(tempfile.mkdtemp(prefix="submitd-postfix-"))
    smarthost = PostfixSmarthost(
        root=root,
        host="127.0.0.1",
        port=free_port(),
        cafile=root / "etc" / "cert.pem",
        tls_name=TLS_NAME,
        username=f"relay@{SASL_DOMAIN}",
        password=secrets.token_urlsafe(18),
    )
    make_directories(smarthost, extra=["bin"])
    delivery_user = pwd.getpwnam(DELIVERY_USER)
    for sub in ("", "tmp", "new"):
        directory = smarthost.mailbox_dir / sub
        directory.mkdir(mode=0o700)
        os.chown(directory, delivery_user.pw_uid, delivery_user.pw_gid)
    (root / "bin" / "deliver.py").write_text(_DELIVER_SCRIPT)
    make_self_signed(smarthost.cafile, smarthost.key_file, TLS_NAME, "ec", days=7)
    (smarthost.config_dir / "main.cf").write_text(_main_cf(smarthost))
    (smarthost.config_dir / "master.cf").write_text(_master_cf(smarthost, _python_for_nobody()))
    write_sasl(smarthost, smarthost.username, smarthost.password)
    try:
        start(smarthost, smarthost.port, smarthost.host, timeout)
    except PostfixError:
        smarthost.stop()
        raise
    return smarthost


@contextlib.contextmanager
def running_smarthost(root: Path | None = None) -> Iterator[PostfixSmarthost]:
    """Start an instance, yield it, then stop it and remove its directory (kept when
    the environment variable SUBMITD_KEEP_POSTFIX is set, for a post-mortem)."""
    smarthost = start_smarthost(root)
    try:
        yield smarthost
    finally:
        smarthost.stop()
        if not os.environ.get("SUBMITD_KEEP_POSTFIX"):
            shutil.rmtree(smarthost.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix_smarthost() -> Iterator[PostfixSmarthost]:
    """One private Postfix smarthost for the whole session; skipped when Postfix is not
    installed. Tests share it: call `clear()` first, or look only at your own messages."""
    if not postfix_installed():
        pytest.skip(
            "postfix is not installed (Debian: preseed `postfix postfix/main_mailer_type "
            "select No configuration`, then apt-get install postfix sasl2-bin "
            "libsasl2-modules)"
        )
    with running_smarthost() as smarthost:
        yield smarthost
