"""Crash safety: SIGKILL while clients submit; every acknowledged message survives.

A SIGKILL catches a 250 sent before the commit (the message would be missing after
the restart) and any state kept only in memory. It cannot catch a missing fsync: the
kernel keeps the page cache across a process kill. That the commit flushes is checked
where it is decided (the database runs with synchronous=FULL, see test_durability).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.conftest import make_server, split_received
from tests.integration.rawclient import RawClient

CLIENTS = 8
MINIMUM_ACKS = 150


def _submit_until_killed(
    client: RawClient, number: int, acked: dict[str, bytes], lock: threading.Lock
) -> None:
    sequence = 0
    try:
        while True:
            sequence += 1
            size = 200 + (sequence * 997 + number * 131) % 300_000  # inline and spilled
            body = (
                f"From: alice@example.org\r\nSubject: crash {number}-{sequence}\r\n"
                f"Date: Sat, 28 Nov 2026 16:30:28 +0000\r\n"
                f"Message-ID: <{number}.{sequence}@example.org>\r\n\r\n".encode()
                + (b"z" * 70 + b"\r\n") * (size // 72)
            )
            client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
            for _ in range(3):
                client.read_reply()
            client.send(body + b".\r\n")
            code, text = client.read_reply()
            if code == 250:
                with lock:
                    acked[text.rsplit(" ", 1)[-1]] = body
    except (OSError, ConnectionError):
        return  # the server was killed


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    clients = [RawClient(server).ready() for _ in range(CLIENTS)]
    threads = [
        threading.Thread(target=_submit_until_killed, args=(client, n, acked, lock))
        for n, client in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < MINIMUM_ACKS and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop(signal.SIGKILL)  # mid-flight: other messages are half-sent or committing
    for thread in threads:
        thread.join(timeout=30)
    assert len(acked) >= MINIMUM_ACKS

    server.start()
    try:
        stored = set(server.queue_ids())
        missing = set(acked) - stored
        assert not missing, f"{len(missing)} acknowledged messages lost"
        for queue_id, body in acked.items():
            assert split_received(server.queued_message(queue_id))[1] == body
        # A message that was never acknowledged may or may not be there, but whole.
        for queue_id in stored - set(acked):
            assert server.queued_message(queue_id).endswith(b"\r\n")
    finally:
        server.stop()
