"""Issue 4 end to end: submit to a running submitd, watch it deliver to real next hops.

Next hops: a private Postfix (smarthost with STARTTLS and AUTH, into a mailbox the test
reads), our programmable peer (for replies Postfix cannot be told to give), dnsmasq for
MX lookups, and the queue as the CLI shows it.
"""

from __future__ import annotations

import email
import email.policy
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import RunningServer, make_server, split_received
from tests.delivery.peer import Peer
from tests.delivery.postfix_fixture import PostfixSmarthost
from tests.delivery.postfix_fixture import split_received as split_postfix
from tests.integration.rawclient import RawClient

HEADER = (
    "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
    "Date: Sat, 28 Nov 2026 16:30:28 +0000\r\nMessage-ID: <{id}@example.org>\r\n"
    "Subject: delivery {id}\r\n\r\n"
)
FAST_RETRIES = "retry_first = 0.3\nretry_max = 0.6\npoll_interval = 0.1\n"


def message(tag: str, body: str = "Hello.\r\n..dot line\r\n") -> bytes:
    return (HEADER.format(id=tag) + body).encode()


def submit(server: RunningServer, data: bytes, rcpts: tuple[str, ...], *, params: str = "") -> str:
    client = RawClient(server).ready()
    assert client.command(f"MAIL FROM:<alice@example.org>{params}")[0] == 250
    for rcpt in rcpts:
        assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250, rcpt
    assert client.command("DATA")[0] == 354
    client.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, text = client.read_reply()
    client.close()
    assert code == 250, text
    return text.rsplit(" ", 1)[-1]


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def queue_entries(server: RunningServer) -> list[dict[str, Any]]:
    return list(json.loads(server.cli("queue", "list", "--json", "--all")))


def entry(server: RunningServer, queue_id: str) -> dict[str, Any]:
    return next(e for e in queue_entries(server) if e["id"] == queue_id)


def peer_route(peer: Peer, extra: str = "", retries: str = FAST_RETRIES) -> str:
    return (
        '[delivery]\ndefault_route = "peer"\n'
        + retries
        + extra
        + '[delivery.routes.peer]\ntype = "smarthost"\nhost = "127.0.0.1"\n'
        + f'port = {peer.port}\ntls = "none"\n'
    )


def test_smarthost_postfix_with_starttls_and_auth(
    tmp_path: Path, postfix_smarthost: PostfixSmarthost
) -> None:
    relay = postfix_smarthost
    config = (
        '[delivery]\ndefault_route = "provider"\n'
        + FAST_RETRIES
        + '[delivery.routes.provider]\ntype = "smarthost"\n'
        + f'host = "{relay.host}"\nport = {relay.port}\ntls = "starttls"\n'
        + f'ca_file = "{relay.cafile}"\ntls_name = "{relay.tls_name}"\n'
        + f'username = "{relay.username}"\npassword = "{relay.password}"\n'
    )
    server = make_server(tmp_path, config, delivery=True)
    try:
        relay.clear()
        data = message("pf", "Grüße, 8-bit.\r\n.\r\n..two dots\r\n")
        queue_id = submit(
            server, data, ("bob@example.net", "carol@example.com"), params=" BODY=8BITMIME"
        )
        [delivered] = relay.messages(1, timeout=30)
        assert sorted(delivered.recipients) == ["bob@example.net", "carol@example.com"]
        assert delivered.sender == "alice@example.org"
        _postfix_trace, rest = split_postfix(delivered.data)
        # Byte-exact apart from Postfix's own Received: ours, then the client's bytes
        # (the queued copy may be gone already: a delivered message's content is dropped).
        assert split_received(rest)[1] == data
        done = wait_for(
            lambda: entry(server, queue_id)["state"] == "done" and entry(server, queue_id)
        )
        assert {r["state"] for r in done["recipients"]} == {"delivered"}
    finally:
        server.stop()


def test_4xx_then_2xx_is_retried(tmp_path: Path) -> None:
    with Peer() as peer:
        peer.rcpt_replies["bob@example.net"] = "451 4.3.0 try again later"
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            queue_id = submit(server, message("retry"), ("bob@example.net",))
            wait_for(lambda: entry(server, queue_id)["recipients"][0]["attempts"] >= 1)
            first = entry(server, queue_id)["recipients"][0]
            assert first["state"] == "pending" and "451 4.3.0" in first["last_reply"]
            peer.rcpt_replies.clear()
            wait_for(lambda: peer.transactions)
            assert wait_for(lambda: entry(server, queue_id)["state"] == "done")
            assert entry(server, queue_id)["recipients"][0]["attempts"] >= 2
        finally:
            server.stop()


def dsns(peer: Peer) -> list[email.message.Message]:
    return [
        email.message_from_bytes(t.message or b"", policy=email.policy.default)
        for t in peer.transactions
        if t.mail.upper().startswith("MAIL FROM:<>")
    ]


def test_one_5xx_one_2xx_gives_one_dsn(tmp_path: Path) -> None:
    with Peer() as peer:
        peer.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            queue_id = submit(server, message("mixed"), ("bob@example.net", "nobody@example.net"))
            [dsn] = wait_for(lambda: dsns(peer))
            assert dsn["To"] == "alice@example.org" or "<alice@example.org>" in dsn["To"]
            assert dsn.get_content_type() == "multipart/report"
            assert dsn.get_param("report-type") == "delivery-status"
            status = next(
                p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"
            )
            blocks = status.get_payload()
            assert blocks[0]["Reporting-MTA"] == "dns; localhost"
            recipient = blocks[1]
            assert recipient["Final-Recipient"] == "rfc822; nobody@example.net"
            assert recipient["Action"] == "failed"
            assert recipient["Status"] == "5.1.1"
            assert "550 5.1.1 no such user" in recipient["Diagnostic-Code"]
            assert recipient["Remote-MTA"].startswith("dns; ")
            assert len(blocks) == 2  # bob was delivered: not in the report
            returned = next(p for p in dsn.walk() if p.get_content_type() == "message/rfc822")
            assert returned is not None
            states = {r["address"]: r["state"] for r in entry(server, queue_id)["recipients"]}
            assert states == {"bob@example.net": "delivered", "nobody@example.net": "failed"}
            # The DSN itself went from <> and never causes another notification.
            time.sleep(0.5)
            assert len(dsns(peer)) == 1
        finally:
            server.stop()


def test_down_past_the_lifetime_fails_with_a_notice(tmp_path: Path) -> None:
    peer = Peer().start()
    port = peer.port
    peer.stop()  # nothing listens there any more
    config = (
        '[delivery]\ndefault_route = "dead"\nlifetime = 2.0\n'
        + FAST_RETRIES
        + '[delivery.routes.dead]\ntype = "smarthost"\nhost = "127.0.0.1"\n'
        + f'port = {port}\ntls = "none"\n'
    )
    server = make_server(tmp_path, config, delivery=True)
    try:
        queue_id = submit(server, message("dead"), ("bob@example.net",))
        done = wait_for(
            lambda: entry(server, queue_id)["state"] == "done" and entry(server, queue_id)
        )
        [recipient] = done["recipients"]
        assert recipient["state"] == "failed" and recipient["attempts"] >= 2
        assert "expired" in recipient["last_reply"]
        notices = [e for e in queue_entries(server) if e["sender"] == ""]
        assert len(notices) == 1 and notices[0]["recipients"][0]["address"] == "alice@example.org"
    finally:
        server.stop()


def test_hop_without_extensions(tmp_path: Path) -> None:
    with Peer(extensions=["SIZE 2000"]) as peer:
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        try:
            eight = submit(
                server, message("8bit", "Grüße\r\n"), ("a@example.net",), params=" BODY=8BITMIME"
            )
            utf8 = submit(server, message("utf8"), ("b@example.net",), params=" SMTPUTF8")
            big = submit(server, message("big", "x" * 70 + "\r\n") * 40, ("c@example.net",))
            for queue_id in (eight, utf8, big):
                wait_for(lambda q=queue_id: entry(server, q)["state"] == "done")
            [sent] = [t for t in peer.transactions if b"8bit" in (t.message or b"")]
            assert sent.message is not None and sent.message.isascii()
            assert "BODY=8BITMIME" not in sent.mail
            parsed = email.message_from_bytes(sent.message, policy=email.policy.compat32)
            assert parsed.get_payload(decode=True) == "Grüße\r\n".encode()
            for queue_id, status in ((utf8, "5.6.7"), (big, "5.3.4")):
                [state] = entry(server, queue_id)["recipients"]
                assert (state["state"], state["status"]) == ("failed", status)
            assert not [t for t in peer.transactions if b"utf8" in (t.message or b"")]
        finally:
            server.stop()


def test_kill_during_delivery_loses_nothing(tmp_path: Path) -> None:
    with Peer() as peer:
        peer.data_delay = 0.3
        server = make_server(tmp_path, peer_route(peer), delivery=True)
        ids = [submit(server, message(f"k{n}"), ("bob@example.net",)) for n in range(12)]
        wait_for(lambda: len(peer.attempts) >= 2)
        server.stop(signal.SIGKILL)  # some deliveries are in the middle of DATA
        server.start()
        try:
            wait_for(lambda: all(entry(server, q)["state"] == "done" for q in ids), timeout=40)
            delivered = [t.message for t in peer.transactions if t.reply.startswith("250")]
            for n in range(12):
                tag = f"<k{n}@example.org>".encode()
                assert any(m is not None and tag in m for m in delivered), n
        finally:
            server.stop()


def test_mx_delivery_over_real_dns(tmp_path: Path) -> None:
    from tests.delivery.dns_fixture import host, mx, null_mx, running_dnsmasq

    with Peer(host="127.0.0.2") as primary, Peer(host="127.0.0.3", port=primary.port) as direct:
        records = [
            mx("mx.example.net", "mx1.mx.example.net", 10),
            mx("mx.example.net", "mx2.mx.example.net", 20),
            host("mx1.mx.example.net", "127.0.0.2"),
            host("mx2.mx.example.net", "127.0.0.9"),  # nothing listens: never reached
            null_mx("nullmx.example.net"),
            host("aonly.example.net", "127.0.0.3"),
        ]
        with running_dnsmasq(records, tmp_path / "dns") as dns:
            config = (
                '[delivery]\ndefault_route = "internet"\n'
                + FAST_RETRIES
                + f'resolver = ["{dns.nameserver}"]\n'
                + '[delivery.routes.internet]\ntype = "mx"\n'
                + f"port_override = {primary.port}\n"
            )
            (tmp_path / "submitd").mkdir()
            server = make_server(tmp_path / "submitd", config, delivery=True)
            try:
                queue_id = submit(
                    server,
                    message("mx"),
                    ("bob@mx.example.net", "carol@aonly.example.net", "dan@nullmx.example.net"),
                )
                done = wait_for(
                    lambda: entry(server, queue_id)["state"] == "done" and entry(server, queue_id)
                )
                states = {r["address"]: (r["state"], r["status"]) for r in done["recipients"]}
                assert states == {
                    "bob@mx.example.net": ("delivered", "2.0.0"),
                    "carol@aonly.example.net": ("delivered", "2.0.0"),
                    "dan@nullmx.example.net": ("failed", "5.1.10"),
                }
                assert [t.accepted for t in primary.transactions if t.mail != "MAIL FROM:<>"] == [
                    ["bob@mx.example.net"]
                ]
                assert [t.accepted for t in direct.transactions] == [["carol@aonly.example.net"]]
            finally:
                server.stop()


def test_lmtp_into_dovecot(tmp_path: Path, dovecot: Any) -> None:
    dovecot.clear()
    config = (
        '[delivery]\ndefault_route = "mailboxes"\n'
        + FAST_RETRIES
        + '[delivery.routes.mailboxes]\ntype = "lmtp"\n'
        + f'socket = "{dovecot.socket}"\n'
    )
    server = make_server(tmp_path, config, delivery=True)
    try:
        data = message("lmtp", "Grüße\r\n.leading dot\r\n")
        queue_id = submit(
            server, data, ("bob@example.org", "nosuchuser@example.org"), params=" BODY=8BITMIME"
        )
        done = wait_for(
            lambda: entry(server, queue_id)["state"] == "done" and entry(server, queue_id)
        )
        states = {r["address"]: (r["state"], r["status"]) for r in done["recipients"]}
        assert states["bob@example.org"] == ("delivered", "2.0.0")
        assert states["nosuchuser@example.org"][0] == "failed"
        [stored] = dovecot.delivered("bob")
        # Dovecot adds Return-Path and Delivered-To only: then ours, byte for byte.
        assert split_received(stored[stored.index(b"Received: ") :])[1] == data
    finally:
        server.stop()


def reports(peer: Peer) -> list[tuple[str, list[str]]]:
    """(Action, recipients) of every DSN the peer received."""
    found = []
    for dsn in dsns(peer):
        status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
        blocks = status.get_payload()[1:]
        found.append((blocks[0]["Action"], [b["Final-Recipient"] for b in blocks]))
    return found


def test_notify_success_never_and_one_delay_notice(tmp_path: Path) -> None:
    with Peer(extensions=["8BITMIME", "ENHANCEDSTATUSCODES"]) as peer:  # no DSN offered
        peer.rcpt_replies["never@example.net"] = "550 5.1.1 gone"
        peer.rcpt_replies["slow@example.net"] = "451 4.3.0 later"
        server = make_server(tmp_path, peer_route(peer, "delay_notice = 0.5\n"), delivery=True)
        try:
            client = RawClient(server).ready()
            client.command("MAIL FROM:<alice@example.org>")
            client.command("RCPT TO:<ok@example.net> NOTIFY=SUCCESS")
            client.command("RCPT TO:<never@example.net> NOTIFY=NEVER")
            client.command("RCPT TO:<slow@example.net>")
            assert client.command("DATA")[0] == 354
            client.send(message("notify") + b".\r\n")
            assert client.read_reply()[0] == 250
            wait_for(lambda: len(reports(peer)) >= 2, timeout=20)
            time.sleep(1.5)  # more retries of slow@: still one delay notice
            found = sorted(reports(peer))
            assert found == [
                ("delayed", ["rfc822; slow@example.net"]),
                ("relayed", ["rfc822; ok@example.net"]),
            ]
        finally:
            server.stop()


def test_queue_management_commands(tmp_path: Path) -> None:
    with Peer() as peer:
        peer.rcpt_replies["held@example.net"] = "451 4.3.0 later"
        slow = "retry_first = 30.0\npoll_interval = 0.1\n"  # only `retry` brings it back
        server = make_server(tmp_path, peer_route(peer, retries=slow), delivery=True)
        try:
            queue_id = submit(server, message("manage"), ("held@example.net",))
            wait_for(lambda: entry(server, queue_id)["recipients"][0]["attempts"] == 1)
            server.cli("queue", "hold", queue_id)
            assert entry(server, queue_id)["state"] == "held"
            peer.rcpt_replies.clear()
            server.cli("queue", "retry", queue_id)
            time.sleep(1.0)
            assert entry(server, queue_id)["state"] == "held"  # held: not delivered
            server.cli("queue", "release", queue_id)
            server.cli("queue", "retry", "--all")  # --all: every queued message
            wait_for(lambda: entry(server, queue_id)["state"] == "done")
            # delete --bounce: the sender hears about the recipients still pending
            peer.rcpt_replies["stuck@example.net"] = "451 4.3.0 later"
            stuck = submit(server, message("stuck"), ("stuck@example.net",))
            wait_for(lambda: entry(server, stuck)["recipients"][0]["attempts"] >= 1)
            server.cli("queue", "hold", stuck)  # no attempt may be running while we delete
            server.cli("queue", "delete", stuck, "--bounce")
            assert all(e["id"] != stuck for e in queue_entries(server))
            [(action, rcpts)] = wait_for(lambda: reports(peer))
            assert (action, rcpts) == ("failed", ["rfc822; stuck@example.net"])
        finally:
            server.stop()
