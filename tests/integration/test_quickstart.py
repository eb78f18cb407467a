"""The README's first quickstart command, for real: a fresh virtual environment, a
plain (non-editable) install of this checkout, `submitd serve --dev` in an empty
directory, and a message sent with swaks as the README shows.

It is what caught a missing runtime dependency that the test extras were hiding.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_readme_quickstart(tmp_path: Path) -> None:
    if _listening(2587) or _listening(2465):
        pytest.fail("the --dev ports 2587/2465 are taken on this machine")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(CHECKOUT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    workdir = tmp_path / "work"
    workdir.mkdir()
    server = subprocess.Popen(
        [str(venv / "bin" / "submitd"), "serve", "--dev"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(2587):
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        password = (workdir / "submitd-data" / "dev-password").read_text().strip()
        swaks = shutil.which("swaks")
        assert swaks, "swaks is installed by scripts/install-test-deps.sh"
        sent = subprocess.run(
            [
                swaks,
                "--server",
                "127.0.0.1:2587",
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                "dev@example.test",
                "--auth-password",
                password,
                "--from",
                "dev@example.test",
                "--to",
                "someone@example.org",
                "--header",
                "From: dev@example.test",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "250 2.0.0 Ok: queued as" in sent.stdout, sent.stdout
        listing = subprocess.run(
            [str(venv / "bin" / "submitd"), "queue", "list"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "someone@example.org" in listing.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=40)
