"""The delivery worker process: started with the server, restarted, never left behind.

A worker that outlived a killed server would keep its leases while the restarted server
took them back as its own, and deliver twice; one that died unseen would leave mail
queued forever. These run a real server and look at the real process tree.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import RunningServer, make_server
from tests.delivery.peer import Peer
from tests.delivery.test_delivery_e2e import entry, message, peer_route, submit, wait_for


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, from /proc (every thread's children list)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(child) for child in text)
    return children


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


def _worker(server: RunningServer) -> int:
    assert server.process is not None
    wait_for(lambda: len(_children(server.process.pid)) == 1 if server.process else False)
    [worker] = _children(server.process.pid)
    return worker


def _delivered(server: RunningServer, peer: Peer, tag: str) -> None:
    queue_id = submit(server, message(tag, "body\r\n"), ("bob@example.net",))
    wait_for(lambda: entry(server, queue_id)["state"] == "done", timeout=30)
    assert any(tag.encode() in (t.message or b"") for t in peer.transactions)


def test_worker_runs_beside_the_server_and_stops_with_it(tmp_path: Path) -> None:
    with Peer() as peer:
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            worker = _worker(server)
            _delivered(server, peer, "first")
        finally:
            server.stop()
        assert not _alive(worker)


def test_worker_dies_with_a_killed_server(tmp_path: Path) -> None:
    with Peer() as peer:
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            worker = _worker(server)
            assert server.process is not None
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            deadline = time.monotonic() + 5
            while _alive(worker) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(worker)
        finally:
            server.stop()


def test_worker_that_dies_is_restarted_and_delivers(tmp_path: Path) -> None:
    with Peer() as peer:
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            first = _worker(server)
            os.kill(first, signal.SIGKILL)
            assert server.process is not None
            wait_for(
                lambda: (
                    [w for w in _children(server.process.pid) if w != first and _alive(w)]
                    if server.process
                    else False
                ),
                timeout=15,
            )
            _delivered(server, peer, "after-restart")
            assert "delivery worker exited" in server.log_path.read_text()
        finally:
            server.stop()


def test_terminating_server_and_worker_together_starts_no_new_worker(tmp_path: Path) -> None:
    """What a service manager does that signals the whole process group."""
    with Peer() as peer:
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            worker = _worker(server)
            assert server.process is not None
            os.kill(worker, signal.SIGTERM)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0
            log = server.log_path.read_text()
            assert "restarting" not in log and "delivery worker started" in log
            assert log.count("delivery worker started") == 1
        finally:
            server.stop()
