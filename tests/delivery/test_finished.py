"""Delivered mail leaves the server: a running submitd, our programmable peer as next hop.

Once every recipient is settled the content goes at once (the spool file of a large
message too) while the outcomes stay listed for `[queue] keep_finished`; with 0 the
whole message goes. A failure notice still returns the full original of a spooled
message, which is read from the spool file after the outcome is recorded.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import RunningServer, make_server, split_received
from tests.delivery.peer import Peer
from tests.delivery.test_delivery_e2e import (
    dsns,
    entry,
    message,
    peer_route,
    queue_entries,
    submit,
    wait_for,
)

SMALL_BODY = "small body line\r\n" * 240  # 4 KB: inline in the database
LARGE_BODY = ("L" * 76 + "\r\n") * 4000  # 312 KB: spooled (inline_max is 256 KiB)


def _rows(server: RunningServer) -> dict[str, tuple[object, ...]]:
    with sqlite3.connect(server.data_dir / "submitd.sqlite3") as conn:
        rows = conn.execute("SELECT id, state, prefix, body, body_path, finished FROM queue")
        return {row[0]: tuple(row[1:]) for row in rows}


def _spool_files(server: RunningServer) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "spool").iterdir())


def test_delivered_messages_lose_their_content_and_keep_their_outcomes(tmp_path: Path) -> None:
    with Peer() as peer:
        peer.data_delay = 1.0  # time to see the large one spooled while it is queued
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            small_data, large_data = message("small", SMALL_BODY), message("large", LARGE_BODY)
            small = submit(server, small_data, ("bob@example.net",))
            large = submit(server, large_data, ("bob@example.net", "carol@example.net"))
            assert _rows(server)[large][3] == f"spool/{large}.eml"
            for queue_id in (small, large):
                wait_for(lambda q=queue_id: entry(server, q)["state"] == "done")
            wait_for(lambda: _spool_files(server) == [])  # unlinked right after the record
            rows = _rows(server)
            for queue_id in (small, large):
                state, prefix, body, body_path, finished = rows[queue_id]
                assert (state, prefix, body, body_path) == ("done", b"", b"", None)
                assert isinstance(finished, float)
            # The next hop got every byte before the content went.
            sent = [t.message or b"" for t in peer.transactions]
            assert sorted(split_received(m)[1] for m in sent) == sorted([small_data, large_data])
            # The outcomes stay listed, per recipient.
            listed = entry(server, large)
            assert listed["finished"] is not None
            assert {r["address"]: r["state"] for r in listed["recipients"]} == {
                "bob@example.net": "delivered",
                "carol@example.net": "delivered",
            }
            assert all(
                e["id"] not in (small, large)
                for e in json.loads(server.cli("queue", "list", "--json"))
            )
            shown, _, content = server.cli("queue", "show", large).partition("\n\n")
            assert json.loads(shown)["state"] == "done" and content == ""
        finally:
            server.stop()


def test_keep_finished_zero_removes_the_message_at_once(tmp_path: Path) -> None:
    with Peer() as peer:
        config = "[queue]\nkeep_finished = 0\n" + peer_route(peer)
        server = make_server(tmp_path, config, delivery=True)
        try:
            small = submit(server, message("small0", SMALL_BODY), ("bob@example.net",))
            large = submit(server, message("large0", LARGE_BODY), ("bob@example.net",))
            wait_for(lambda: len(peer.transactions) == 2)
            wait_for(lambda: not {small, large} & set(server.queue_ids()))
            wait_for(lambda: _spool_files(server) == [])
            assert queue_entries(server) == []
            with sqlite3.connect(server.data_dir / "submitd.sqlite3") as conn:
                assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
        finally:
            server.stop()


@pytest.mark.parametrize("keep_finished", [86400, 0])
def test_failure_notice_returns_the_whole_spooled_original(
    tmp_path: Path, keep_finished: int
) -> None:
    """The notice is built after the record that finishes the message: its spool file
    must still be there for RET=FULL (the default), up to 2 MiB."""
    with Peer() as peer:
        peer.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
        config = f"[queue]\nkeep_finished = {keep_finished}\n" + peer_route(peer)
        server = make_server(tmp_path, config, delivery=True)
        try:
            data = message("bigfail", LARGE_BODY)
            queue_id = submit(server, data, ("nobody@example.net",))
            [dsn] = wait_for(lambda: dsns(peer))
            [raw] = [t.message for t in peer.transactions if t.mail.startswith("MAIL FROM:<>")]
            assert raw is not None
            status = next(
                p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"
            )
            assert status.get_payload()[1]["Status"] == "5.1.1"
            returned = next(p for p in dsn.walk() if p.get_content_type() == "message/rfc822")
            assert returned is not None
            # The whole original, byte for byte: our Received field, then the client's bytes.
            start = raw.index(data)
            received_start = raw.rindex(b"\r\nReceived: ", 0, start) + 2
            assert split_received(raw[received_start:])[1].startswith(data)
            assert b"too large to return" not in raw and b"only its header" not in raw
            # Then the original's spool file goes (and the notice's own, once delivered).
            wait_for(lambda: _spool_files(server) == [])
            if keep_finished:
                state, _prefix, body, body_path, _finished = _rows(server)[queue_id]
                assert (state, body, body_path) == ("done", b"", None)
                assert entry(server, queue_id)["recipients"][0]["state"] == "failed"
            else:
                assert queue_id not in server.queue_ids()
            assert "delivery attempt failed" not in server.log_text()
        finally:
            server.stop()


def test_the_delivery_loop_purges_what_finished_longer_ago_than_keep_finished(
    tmp_path: Path,
) -> None:
    """The loop purges at its start, then once a minute: a restart shows it in seconds."""
    with Peer() as peer:
        config = "[queue]\nkeep_finished = 1.0\n" + peer_route(peer)
        server = make_server(tmp_path, config, delivery=True)
        try:
            queue_id = submit(server, message("purged"), ("bob@example.net",))
            wait_for(lambda: entry(server, queue_id)["state"] == "done")
            time.sleep(1.2)  # older than keep_finished now; the next purge is a minute away
            assert queue_id in server.queue_ids()
            assert server.stop() == 0  # the purge loop ends with the server
            server.start()
            wait_for(lambda: queue_id not in server.queue_ids())
            assert "purged 1 finished messages" in server.log_text()
        finally:
            server.stop()
