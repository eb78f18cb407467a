"""Real SMTP clients submit to a real submitd over STARTTLS (587-style) and implicit TLS
(465-style), with AUTH PLAIN and AUTH LOGIN, and the message is found in the queue byte
for byte behind our Received field.

Clients: Python's smtplib, aiosmtplib, swaks, msmtp, curl and nodemailer. Every one
verifies the server certificate against the test's self-signed certificate; all but
swaks also check that it names "localhost" (swaks checks the chain only). Each connects
to 127.0.0.1 and is told the name separately, because "localhost" may also resolve to
::1, where the server does not listen.

Each message carries a unique Message-ID, which is how its test finds it in the queue of
the module's shared server. It exercises dot-stuffing (lines beginning with dots, and a
lone dot), trailing white space, a folded header and CRLF line ends; clients that can
declare BODY=8BITMIME send 8-bit UTF-8 text, the others (swaks, msmtp, curl) ASCII only.
None of these clients changes a message that already has From, Date and Message-ID
fields and CRLF line ends, so the stored bytes must equal the bytes handed to the
client; where a client could change them, the test says why it does not.

The tools come from Debian packages (swaks, msmtp, curl) and npm (nodemailer, installed
by `npm ci --prefix tests/interop/node`); a missing Debian tool fails its tests, a
missing node_modules/nodemailer skips them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import aiosmtplib
import pytest
from interop_support import (
    HOSTNAME,
    LOOPBACK,
    RECIPIENTS,
    SENDER,
    check_queued,
    client_context,
    connect_loopback,
    find_queued,
    has_8bit,
    make_message,
    queue_id_in,
)

from submitd.tls import write_self_signed

if TYPE_CHECKING:
    from conftest import RunningServer

TRANSPORTS = ("starttls", "tls")
MECHANISMS = ("PLAIN", "LOGIN")
NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENT_TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(120)


def port_of(server: RunningServer, transport: str) -> int:
    return server.starttls_port if transport == "starttls" else server.tls_port


def new_tag(client: str, transport: str, mechanism: str) -> str:
    return f"{client}-{transport}-{mechanism.lower()}-{uuid.uuid4().hex[:12]}"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package}")
    return path


def client_env(home: Path) -> dict[str, str]:
    """The environment for a client program: no user configuration, no proxies."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SWAKS_")
        and key.lower() not in ("all_proxy", "http_proxy", "https_proxy", "curl_home")
        and key != "NODE_TLS_REJECT_UNAUTHORIZED"
    }
    env["HOME"] = str(home)  # no ~/.swaksrc, ~/.msmtprc or ~/.curlrc
    env["LC_ALL"] = "C.UTF-8"
    return env


def run_client(
    argv: list[str],
    server: RunningServer,
    home: Path,
    *,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        env=client_env(home),
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{argv[0]} exited with {result.returncode}\n"
            f"--- stdout\n{result.stdout.decode(errors='replace')}\n"
            f"--- stderr\n{result.stderr.decode(errors='replace')}\n"
            f"--- server log (tail)\n{server.log_text()[-3000:]}"
        )
    return result


def transcript(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode("utf-8", "replace")


all_combinations = pytest.mark.parametrize(
    ("transport", "mechanism"),
    [(t, m) for t in TRANSPORTS for m in MECHANISMS],
    ids=[f"{t}-{m}" for t in TRANSPORTS for m in MECHANISMS],
)


# ------------------------------------------------------------------- Python smtplib


class LoopbackSMTP(smtplib.SMTP):
    """smtplib.SMTP that connects to 127.0.0.1 while STARTTLS verifies "localhost".

    smtplib verifies the name it was asked to connect to (`self._host`); only the
    socket is redirected here.
    """

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(LOOPBACK, port, timeout)  # type: ignore[misc]
        return sock


class LoopbackSMTPSSL(smtplib.SMTP_SSL):
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(LOOPBACK, port, timeout)  # type: ignore[misc]
        return sock


@pytest.mark.parametrize("initial_response", [True, False], ids=["ir", "no-ir"])
@all_combinations
def test_smtplib(
    shared_server: RunningServer, transport: str, mechanism: str, initial_response: bool
) -> None:
    server = shared_server
    tag = new_tag("smtplib", transport, mechanism)
    message = make_message(tag, eight_bit=True)
    context = client_context(server.cafile)
    helo = "smtplib.interop.test"
    smtp: smtplib.SMTP
    if transport == "starttls":
        smtp = LoopbackSMTP(HOSTNAME, server.starttls_port, local_hostname=helo, timeout=20)
    else:
        smtp = LoopbackSMTPSSL(
            HOSTNAME, server.tls_port, local_hostname=helo, timeout=20, context=context
        )
    with smtp:
        if transport == "starttls":
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            assert not smtp.has_extn("auth"), "AUTH offered before TLS"
            code, _ = smtp.starttls(context=context)
            assert code == 220
        smtp.ehlo()
        assert smtp.has_extn("8bitmime")
        assert set(smtp.esmtp_features["auth"].upper().split()) >= {"PLAIN", "LOGIN"}
        smtp.user, smtp.password = server.user, server.password
        authenticate = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        code, reply = smtp.auth(mechanism, authenticate, initial_response_ok=initial_response)
        assert (code, reply) == (235, b"2.7.0 Authentication successful")
        assert smtp.mail(SENDER, ["BODY=8BITMIME"]) == (250, b"2.1.0 Sender ok")
        for recipient in RECIPIENTS:
            assert smtp.rcpt(recipient) == (250, b"2.1.5 Recipient ok")
        code, reply = smtp.data(message)  # dot-stuffs; the CRLF message needs no more
        assert code == 250, reply
    queued = check_queued(server, tag, message, helo=helo, body="8BITMIME")
    assert queue_id_in(f"{code} {reply.decode()}") == queued.queue_id


# ---------------------------------------------------------------------- aiosmtplib


async def _aiosmtplib_send(
    server: RunningServer, transport: str, mechanism: str, message: bytes, helo: str
) -> str:
    context = client_context(server.cafile)
    # A socket connected to 127.0.0.1; `hostname` is then only the name TLS verifies.
    sock = connect_loopback(port_of(server, transport))
    smtp = aiosmtplib.SMTP(
        hostname=HOSTNAME,
        sock=sock,
        use_tls=transport == "tls",
        start_tls=False,  # STARTTLS explicitly below, never "if offered"
        tls_context=context,
        local_hostname=helo,
        timeout=20,
    )
    await smtp.connect()
    try:
        if transport == "starttls":
            await smtp.ehlo()
            assert smtp.supports_extension("starttls")
            assert not smtp.supports_extension("auth"), "AUTH offered before TLS"
            await smtp.starttls(tls_context=context)
        await smtp.ehlo()
        assert smtp.supports_extension("8bitmime")
        # aiosmtplib's login() picks a mechanism itself; these name it.
        if mechanism == "PLAIN":
            response = await smtp.auth_plain(server.user, server.password)
        else:
            response = await smtp.auth_login(server.user, server.password)
        assert response.code == 235, response
        errors, reply = await smtp.sendmail(
            SENDER, list(RECIPIENTS), message, mail_options=["BODY=8BITMIME"]
        )
        assert errors == {}, errors
        await smtp.quit()
        return reply
    finally:
        smtp.close()


@all_combinations
def test_aiosmtplib(shared_server: RunningServer, transport: str, mechanism: str) -> None:
    tag = new_tag("aiosmtplib", transport, mechanism)
    message = make_message(tag, eight_bit=True)
    helo = "aiosmtplib.interop.test"
    reply = asyncio.run(_aiosmtplib_send(shared_server, transport, mechanism, message, helo))
    queued = check_queued(shared_server, tag, message, helo=helo, body="8BITMIME")
    assert queue_id_in(f"250 {reply}") == queued.queue_id


# ------------------------------------------------------ command-line and Node clients
#
# Each builder returns the command and its stdin for one submission, so that the same
# command can be run against the right CA file (and must succeed) and a wrong one (and
# must fail).


@dataclass(frozen=True)
class Submit:
    """One submission by a client program."""

    server: RunningServer
    transport: str
    mechanism: str
    message: bytes
    helo: str
    cafile: Path
    workdir: Path
    name: str = HOSTNAME  # the name the certificate must carry (swaks does not check it)

    @property
    def port(self) -> int:
        return port_of(self.server, self.transport)


Command = tuple[list[str], bytes | None]


def swaks_command(job: Submit, *, pipelining: bool = False) -> Command:
    swaks = require_tool("swaks", "swaks libnet-ssleay-perl")
    # swaks ends the data with CRLF "." CRLF after the text it is given, so a text that
    # ends with CRLF gains an empty line; given without its last CRLF, the message
    # arrives whole.
    assert job.message.endswith(b"\r\n")
    data = job.workdir / "message.eml"
    data.write_bytes(job.message[:-2])
    argv = [
        swaks,
        "--server",
        LOOPBACK,
        "--port",
        str(job.port),
        "--tls" if job.transport == "starttls" else "--tls-on-connect",
        # swaks verifies the chain against the CA file, but not the name in it.
        "--tls-verify",
        "--tls-ca-path",
        str(job.cafile),
        "--tls-sni",
        job.name,
        "--ehlo",
        job.helo,
        "--auth",
        job.mechanism,
        "--auth-user",
        job.server.user,
        "--auth-password",
        job.server.password,
        "--from",
        SENDER,
        "--to",
        ",".join(RECIPIENTS),
        # swaks's data fixup dot-stuffs, rebuilds the header section line by line with
        # CRLF, and replaces %TOKENS% and backslash-n escapes, of which the message has
        # none: what it sends unstuffs to the file's bytes.
        "--data",
        f"@{data}",
        "--timeout",
        "20",
    ]
    if pipelining:
        argv.append("--pipeline")  # MAIL, RCPT, RCPT and DATA in one write (RFC 2920)
    return argv, None


def msmtp_command(job: Submit) -> Command:
    msmtp = require_tool("msmtp", "msmtp")
    config = job.workdir / "msmtprc"
    config.write_text(
        "defaults\n"
        "syslog off\n"
        "account default\n"
        f"host {LOOPBACK}\n"
        f"port {job.port}\n"
        "tls on\n"
        f"tls_starttls {'on' if job.transport == 'starttls' else 'off'}\n"
        f"tls_trust_file {job.cafile}\n"
        f"tls_host_override {job.name}\n"  # verify the name "localhost", not 127.0.0.1
        f"domain {job.helo}\n"
        f"auth {job.mechanism.lower()}\n"
        f"user {job.server.user}\n"
        f'password "{job.server.password}"\n'
        f"from {SENDER}\n"
        # The message has From, Date and Message-ID, so msmtp's defaults (auto) would add
        # none; off makes sure. It has no Bcc for msmtp to remove.
        "set_from_header off\n"
        "set_date_header off\n"
        "set_msgid_header off\n"
        "timeout 20\n"
    )
    config.chmod(0o600)  # msmtp refuses a configuration with a password others can read
    # The dialogue, with the 250 that names the queue id, goes to stdout with --debug.
    argv = [msmtp, "--debug", "-C", str(config), "-a", "default", "--", *RECIPIENTS]
    return argv, job.message


def curl_command(job: Submit) -> Command:
    curl = require_tool("curl", "curl")
    data = job.workdir / "message.eml"
    data.write_bytes(job.message)
    scheme = "smtp" if job.transport == "starttls" else "smtps"
    argv = [
        curl,
        "-q",  # no ~/.curlrc
        "--silent",
        "--show-error",
        "--verbose",  # the dialogue, with the 250 that names the queue id, on stderr
        "--noproxy",
        "*",
        "--max-time",
        "30",
        "--url",
        f"{scheme}://{job.name}:{job.port}/{job.helo}",  # the path is the EHLO argument
        "--resolve",
        f"{job.name}:{job.port}:{LOOPBACK}",
        "--cacert",
        str(job.cafile),
        "--mail-from",
        SENDER,
        *[arg for recipient in RECIPIENTS for arg in ("--mail-rcpt", recipient)],
        "--user",
        f"{job.server.user}:{job.server.password}",
        "--login-options",
        f"AUTH={job.mechanism}",
        # Sent as is (no --crlf), with curl's own dot-stuffing.
        "--upload-file",
        str(data),
    ]
    if job.transport == "starttls":
        argv.append("--ssl-reqd")  # STARTTLS or fail, never plaintext
    return argv, None


def nodemailer_command(job: Submit) -> Command:
    if not (NODE_DIR / "node_modules" / "nodemailer").is_dir():
        pytest.skip("nodemailer is not installed: run `npm ci --prefix tests/interop/node`")
    node = require_tool("node", "nodejs (version 20 or later, as nodemailer needs)")
    request = {
        "host": LOOPBACK,
        "port": job.port,
        "secure": job.transport == "tls",
        "requireTLS": job.transport == "starttls",
        "name": job.helo,
        "servername": job.name,
        "ca": str(job.cafile),
        "auth": {"user": job.server.user, "pass": job.server.password},
        "authMethod": job.mechanism,
        # use8BitMime: nodemailer adds BODY=8BITMIME when the server offers 8BITMIME.
        "envelope": {"from": SENDER, "to": list(RECIPIENTS), "use8BitMime": True},
        # `raw`: sent unchanged, apart from dot-stuffing (see send.js).
        "raw_b64": base64.b64encode(job.message).decode("ascii"),
    }
    return [node, str(NODE_DIR / "send.js")], json.dumps(request).encode()


class Program(NamedTuple):
    build: Callable[[Submit], Command]
    eight_bit: bool  # whether the client can declare BODY=8BITMIME
    body: str  # the BODY= the queued envelope must show
    checks_name: bool  # whether the client checks the name in the certificate


PROGRAMS = {
    # swaks, msmtp and curl have no way to send BODY=8BITMIME: ASCII messages.
    "swaks": Program(swaks_command, eight_bit=False, body="7BIT", checks_name=False),
    "swaks-pipelining": Program(
        partial(swaks_command, pipelining=True), eight_bit=False, body="7BIT", checks_name=False
    ),
    "msmtp": Program(msmtp_command, eight_bit=False, body="7BIT", checks_name=True),
    "curl": Program(curl_command, eight_bit=False, body="7BIT", checks_name=True),
    "nodemailer": Program(nodemailer_command, eight_bit=True, body="8BITMIME", checks_name=True),
}


def program_output(name: str, result: subprocess.CompletedProcess[bytes]) -> str:
    """Where the client reports the server's reply to the end of data."""
    if name == "nodemailer":
        outcome = json.loads(result.stdout)
        assert outcome["accepted"] == list(RECIPIENTS)
        assert outcome["rejected"] == []
        return str(outcome["response"])
    return (result.stdout + result.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("name", list(PROGRAMS))
@all_combinations
def test_program(
    shared_server: RunningServer, tmp_path: Path, name: str, transport: str, mechanism: str
) -> None:
    program = PROGRAMS[name]
    tag = new_tag(name, transport, mechanism)
    message = make_message(tag, eight_bit=program.eight_bit)
    assert has_8bit(message) == program.eight_bit
    job = Submit(
        server=shared_server,
        transport=transport,
        mechanism=mechanism,
        message=message,
        helo=f"{name}.interop.test",
        cafile=shared_server.cafile,
        workdir=tmp_path,
    )
    argv, stdin = program.build(job)
    result = run_client(argv, shared_server, tmp_path, stdin=stdin)
    queued = check_queued(shared_server, tag, message, helo=job.helo, body=program.body)
    assert queue_id_in(program_output(name, result)) == queued.queue_id


def refused(job: Submit, program: Program) -> None:
    """The client gives up for the certificate's sake, and nothing is queued."""
    argv, stdin = program.build(job)
    result = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        env=client_env(job.workdir),
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    output = transcript(result)
    assert result.returncode != 0, output
    assert re.search(r"(?i)certificate", output), output
    assert "queued as" not in output
    tag = re.search(rb"Message-ID: <([^@]+)@", job.message)
    assert tag is not None
    with pytest.raises(AssertionError, match="expected one message"):
        find_queued(job.server, tag[1].decode())


@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_program_refuses_an_unknown_certificate(
    shared_server: RunningServer, tmp_path: Path, name: str, transport: str
) -> None:
    """The verification in test_program is real: trusting another certificate for
    "localhost" instead of the server's, each client gives up before AUTH."""
    other_cert = tmp_path / "other.crt"
    write_self_signed(HOSTNAME, other_cert, tmp_path / "other.key")
    program = PROGRAMS[name]
    job = Submit(
        server=shared_server,
        transport=transport,
        mechanism="PLAIN",
        message=make_message(new_tag(name, transport, "plain"), eight_bit=program.eight_bit),
        helo=f"{name}.interop.test",
        cafile=other_cert,
        workdir=tmp_path,
    )
    refused(job, program)


@pytest.mark.parametrize("name", [n for n, p in PROGRAMS.items() if p.checks_name])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_program_refuses_a_certificate_for_another_name(
    shared_server: RunningServer, tmp_path: Path, name: str, transport: str
) -> None:
    """Trusting the server's certificate but expecting another name, the client gives up."""
    program = PROGRAMS[name]
    job = Submit(
        server=shared_server,
        transport=transport,
        mechanism="PLAIN",
        message=make_message(new_tag(name, transport, "plain"), eight_bit=program.eight_bit),
        helo=f"{name}.interop.test",
        cafile=shared_server.cafile,
        workdir=tmp_path,
        name="mail.example.org",
    )
    refused(job, program)
