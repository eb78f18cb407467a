"""What an administrator does: dev mode, configuration errors, rights, queue commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from submitd.store.database import connect
from tests.conftest import RunningServer, make_server, wait_for_port
from tests.integration.rawclient import RawClient, code_of


def run_cli(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "submitd", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dev_mode_zero_setup(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "submitd", "serve", "--dev"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(2587, process)  # type: ignore[arg-type]
        wait_for_port(2465, process)  # type: ignore[arg-type]
        password = (tmp_path / "submitd-data" / "dev-password").read_text().strip()
        assert len(password) >= 12
        assert oct((tmp_path / "submitd-data" / "dev-password").stat().st_mode & 0o777) == "0o600"
        server = RunningServer(root=tmp_path, starttls_port=2587, tls_port=2465)
        server.user, server.password = "dev@example.test", password
        # The dev certificate is for localhost.localdomain: trust it, skip the name.
        context = server.client_context

        def unverified_name() -> object:
            ctx = context()
            ctx.check_hostname = False
            return ctx

        server.client_context = unverified_name  # type: ignore[method-assign,assignment]
        server.root = tmp_path
        (tmp_path / "data").symlink_to(tmp_path / "submitd-data")
        client = RawClient(server).ready()
        assert client.command("MAIL FROM:<dev@example.test>")[0] == 250
        assert client.command("RCPT TO:<someone@example.org>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"From: dev@example.test\r\nSubject: dev\r\n\r\nhello\r\n.\r\n")
        code, text = client.read_reply()
        assert code == 250, text
        listing = run_cli("queue", "list", "--json", cwd=tmp_path)
        assert text.rsplit(" ", 1)[-1] in listing.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=40)
    assert process.returncode == 0
    assert f"password: {password}" in output


@pytest.mark.parametrize(
    "content, key",
    [
        ("[limits]\nrecipientz = 5\n", "limits.recipientz: unknown key"),
        ("[limits]\nrecipients = 0\n", "limits.recipients"),
        ("[listen]\nsubmission = ['nonsense']\n", "listen.submission"),
        ("hostname = 'bad name'\n", "hostname"),
        ("[tls]\nmin_version = '1.0'\n", "tls.min_version"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_check_config_names_the_key(tmp_path: Path, content: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode != 0
    assert key in result.stderr
    # serve refuses to start with the same message
    served = run_cli("serve", "--config", str(path))
    assert served.returncode != 0 and key in served.stderr


def test_check_config_accepts_defaults(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text('hostname = "mail.example.org"\n[limits]\nrecipients = 50\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr


def submit(client: RawClient, sender: str, header_from: str) -> tuple[int, str]:
    assert client.command(f"MAIL FROM:<{sender}>")[0] == 250
    assert client.command("RCPT TO:<bob@example.net>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(f"From: {header_from}\r\nSubject: rights\r\n\r\nhi\r\n.\r\n".encode())
    return client.read_reply()


def test_address_rights_follow_the_cli(server: RunningServer) -> None:
    client = RawClient(server).ready()
    assert code_of(client.command("MAIL FROM:<sales@example.org>")) == "550 5.7.1"
    server.cli("user", "address", "add", server.user, "sales@example.org")
    server.cli("user", "address", "add", server.user, "@shop.example")
    time.sleep(1.1)  # a cached login notices a change within a second
    client = RawClient(server).ready()  # addresses are read at AUTH
    assert submit(client, "sales@example.org", "Sales <sales@example.org>")[0] == 250
    assert submit(client, "anyone@shop.example", "anyone@shop.example")[0] == 250
    assert code_of(submit(client, "alice@example.org", "ceo@bank.example")) == "550 5.7.1"
    server.cli("user", "relax-header-from", server.user, "--on")
    time.sleep(1.1)
    client = RawClient(server).ready()
    assert submit(client, "alice@example.org", "list@lists.example")[0] == 250
    assert code_of(client.command("MAIL FROM:<ceo@bank.example>")) == "550 5.7.1"


def test_password_change_applies_at_once(server: RunningServer) -> None:
    assert RawClient(server).ready()  # fills the login cache
    server.cli("user", "passwd", server.user, "--password-stdin", stdin="new password 2")
    client = RawClient(server)
    client.command("EHLO client.example.org")
    client.starttls()
    client.command("EHLO client.example.org")
    time.sleep(1.1)  # the generation counter is read at most once a second
    assert code_of(client.login()) == "535 5.7.8"
    assert client.login(password="new password 2")[0] == 235


def test_queue_commands(server: RunningServer) -> None:
    client = RawClient(server).ready()
    code, text = submit(client, "alice@example.org", "alice@example.org")
    assert code == 250
    queue_id = text.rsplit(" ", 1)[-1]
    listing = json.loads(server.cli("queue", "list", "--json"))
    entries = listing if isinstance(listing, list) else listing["messages"]
    assert any(queue_id in json.dumps(entry) for entry in entries)
    shown = server.cli("queue", "show", queue_id)
    assert "bob@example.net" in shown and "Subject: rights" in shown
    missing = run_cli("queue", "show", "NOSUCHID", "--config", str(server.config_path))
    assert missing.returncode != 0


def test_database_commits_are_durable(server: RunningServer) -> None:
    """The queue is in WAL mode with synchronous=FULL: a commit fsyncs the log."""
    conn = connect(server.data_dir / "submitd.sqlite3")  # as the server opens it
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        conn.close()


def test_sigterm_says_421_to_idle_sessions(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    client = RawClient(server).ready()
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGTERM)
    assert code_of(client.read_reply()) == "421 4.3.2"
    assert server.stop() == 0
