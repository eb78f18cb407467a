"""Disk full: the message gets 452 4.3.1, nothing queued is damaged, acceptance resumes.

The data directory lives on a tmpfs of its own with a size limit (we run as root), so
the disk really fills: no fake error is injected anywhere.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, split_received
from tests.integration.rawclient import RawClient, code_of

HEADER = (
    b"From: alice@example.org\r\nDate: Sat, 28 Nov 2026 16:30:28 +0000\r\n"
    b"Message-ID: <full@example.org>\r\n\r\n"
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def send(client: RawClient, body: bytes) -> tuple[int, str]:
    assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
    assert client.command("RCPT TO:<bob@example.net>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(HEADER + body + b".\r\n")
    return client.read_reply()


def test_disk_full_refuses_then_recovers(small_disk: Path) -> None:
    server = RunningServer(root=small_disk)
    server.write_config()
    server.cli("user", "add", server.user, "--password-stdin", stdin=server.password)
    server.start()
    try:
        client = RawClient(server).ready()
        first = send(client, b"kept\r\n")
        assert first[0] == 250
        kept_id = first[1].rsplit(" ", 1)[-1]
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * 1)
        with filler.open("ab") as handle:  # fill the disk to the last block
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        big = (b"y" * 70 + b"\r\n") * 20000  # 1.4 MB: spooled, cannot fit
        assert code_of(send(client, big)) == "452 4.3.1"
        small = send(client, b"small\r\n")
        # SQLite may still have a free page for a small inline message, or not.
        assert small[0] == 250 or code_of(small) == "452 4.3.1"
        filler.unlink()  # space returns: acceptance resumes by itself
        again = send(client, big)
        assert again[0] == 250, again
        assert split_received(server.queued_message(kept_id))[1] == HEADER + b"kept\r\n"
        stored = server.queued_message(again[1].rsplit(" ", 1)[-1])
        assert split_received(stored)[1] == HEADER + big
    finally:
        server.stop()
