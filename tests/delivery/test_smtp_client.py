"""HopPool against our programmable peer (tests/delivery/peer.py) over real sockets.

What is checked is what the next hop sees (raw MAIL/RCPT lines, the exact octets after
dot-unstuffing, connection counts) and the outcome each recipient gets.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from submitd.delivery import smtp_client
from submitd.delivery.smtp_client import HopPool, HopSettings, utf8_addr_xtext, xtext
from submitd.delivery.types import Job, Outcome, Status
from submitd.envelope import Envelope, Recipient
from tests.delivery.peer import Peer, PeerCert, make_cert, peer_fixture, peer_settings

__all__ = ["peer_fixture"]  # the `peer` fixture

TEXT = (
    b"From: alice@example.org\r\n"
    b"To: bob@x.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"middle . and\r\n"
    b". dot space\r\n"
    b"last line\r\n"
)


@dataclass
class Stored:
    """A MessageSource over bytes, served in small pieces to cross every border."""

    data: bytes
    piece: int = 7

    @property
    def size(self) -> int:
        return len(self.data)

    in_memory = True

    def chunks(self) -> Iterator[bytes]:
        for start in range(0, len(self.data), self.piece):
            yield self.data[start : start + self.piece]


def job(
    data: bytes = TEXT,
    recipients: tuple[str | Recipient, ...] = ("bob@x.test",),
    piece: int = 7,
    **envelope: Any,
) -> Job:
    rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
    env = Envelope(sender=envelope.pop("sender", "alice@example.org"), **envelope)
    env.recipients = list(rcpts)
    return Job("Q1", env, rcpts, Stored(data, piece))


def hop(running: Peer, **overrides: Any) -> HopSettings:
    return HopSettings(**peer_settings(running, **overrides))


def send(
    settings: HopSettings, *jobs: Job, address: str | None = None, **pool: Any
) -> list[list[Outcome]]:
    """Send the jobs one after the other through one pool, then close it."""

    async def go() -> list[list[Outcome]]:
        hop_pool = HopPool(**pool)
        try:
            return [await hop_pool.send(settings, address, j) for j in jobs]
        finally:
            await hop_pool.close()

    return asyncio.run(go())


def statuses(outcomes: list[Outcome]) -> list[tuple[Status, str]]:
    return [(o.status, o.enhanced) for o in outcomes]


@pytest.fixture
def cert(tmp_path: Path) -> PeerCert:
    return make_cert(tmp_path / "good")


# --- content ------------------------------------------------------------------------


def test_delivers_exact_bytes_with_dots_across_piece_borders(peer: Peer) -> None:
    for piece in (1, 2, 3, 7, 1000):
        peer.reset_records()
        [outcomes] = send(hop(peer), job(piece=piece))
        assert [o.status for o in outcomes] == [Status.DELIVERED]
        assert peer.transactions[-1].message == TEXT
    out = outcomes[0]
    assert out.reply == "250 2.0.0 Ok: queued"
    assert out.enhanced == "2.0.0"
    assert out.remote_mta == "[127.0.0.1]"
    assert not out.dsn_relayed


def test_message_starting_with_dot_and_empty_body(peer: Peer) -> None:
    for data in (b".x\r\n", b"", b"a\r\n.\r\n.\r\n"):
        peer.reset_records()
        [outcomes] = send(hop(peer), job(data, piece=1))
        assert outcomes[0].status is Status.DELIVERED
        assert peer.transactions[0].message == data


def test_large_message_is_streamed_exactly(peer: Peer) -> None:
    line = b"." + b"x" * 70 + b"\r\n"
    data = b"Subject: big\r\n\r\n" + line * 80_000  # about 5.7 MB
    [outcomes] = send(hop(peer), job(data, piece=65536))
    assert outcomes[0].status is Status.DELIVERED
    assert peer.transactions[0].message == data


def test_remote_mta_is_the_host_name(peer: Peer) -> None:
    [outcomes] = send(hop(peer, host="localhost"), job(), address="127.0.0.1")
    assert outcomes[0].remote_mta == "localhost"


def test_8bit_goes_as_8bitmime_when_offered(peer: Peer) -> None:
    data = "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGrüße.\r\n".encode()
    [outcomes] = send(hop(peer), job(data, body="8BITMIME"))
    assert outcomes[0].status is Status.DELIVERED
    received = peer.transactions[0]
    assert "BODY=8BITMIME" in received.mail_params
    assert received.message == data


def test_8bitmime_is_downgraded_for_a_hop_without_it(peer: Peer) -> None:
    peer.extensions = ["ENHANCEDSTATUSCODES"]
    text = "Grüße aus Köln, ça va?\r\n.dotted ünïcode line\r\n"
    data = f"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}".encode()
    [outcomes] = send(hop(peer), job(data, body="8BITMIME"))
    assert outcomes[0].status is Status.DELIVERED
    received = peer.transactions[0]
    assert not any(p.upper().startswith("BODY=") for p in received.mail_params)
    assert received.message is not None and received.message.isascii()
    parsed = email.message_from_bytes(received.message, policy=email.policy.default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_payload(decode=True) == text.encode()


def test_8bit_header_cannot_be_downgraded(peer: Peer) -> None:
    peer.extensions = []
    data = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    [outcomes] = send(hop(peer), job(data, recipients=("a@x.test", "b@x.test"), body="8BITMIME"))
    assert statuses(outcomes) == [(Status.FAILED, "5.6.3")] * 2
    assert peer.attempts == []


def test_binarymime_goes_by_bdat_when_offered(peer: Peer) -> None:
    peer.extensions = ["CHUNKING", "BINARYMIME", "8BITMIME"]
    data = b"Subject: bin\r\nContent-Type: application/octet-stream\r\n\r\n\x00\xff\n.\r\n.\r\x80"
    [outcomes] = send(hop(peer), job(data, piece=5, body="BINARYMIME"))
    assert outcomes[0].status is Status.DELIVERED
    received = peer.transactions[0]
    assert received.command == "BDAT"
    assert "BODY=BINARYMIME" in received.mail_params
    assert received.message == data
    bdats = [c for c in peer.commands if c.startswith("BDAT")]
    assert len(bdats) == len(range(0, len(data), 5))
    assert bdats[-1].endswith(" LAST") and not any(c.endswith("LAST") for c in bdats[:-1])


def test_binarymime_is_converted_for_a_hop_without_chunking(peer: Peer) -> None:
    peer.extensions = ["8BITMIME"]
    payload = bytes(range(256))
    data = b"Subject: bin\r\nContent-Type: application/octet-stream\r\n\r\n" + payload
    [outcomes] = send(hop(peer), job(data, body="BINARYMIME"))
    assert outcomes[0].status is Status.DELIVERED
    received = peer.transactions[0]
    assert received.command == "DATA" and received.message is not None
    assert received.message.isascii()
    parsed = email.message_from_bytes(received.message, policy=email.policy.default)
    assert parsed.get_content() == payload


# --- extensions decided at EHLO -----------------------------------------------------


def test_dsn_parameters_when_offered(peer: Peer) -> None:
    rcpts = (
        Recipient("a+b@x.test", notify=("SUCCESS", "FAILURE")),
        Recipient("c@x.test", notify=("NEVER",), orcpt="rfc822;Old=Name@x.test"),
        Recipient("d@x.test"),
    )
    [outcomes] = send(hop(peer), job(recipients=rcpts, ret="HDRS", envid="id+1=x"))
    assert [o.status for o in outcomes] == [Status.DELIVERED] * 3
    assert not any(o.dsn_relayed for o in outcomes)
    received = peer.transactions[0]
    assert "RET=HDRS" in received.mail_params
    assert "ENVID=id+2B1+3Dx" in received.mail_params
    assert received.rcpt_params(0) == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a+2Bb@x.test"]
    assert received.rcpt_params(1) == ["NOTIFY=NEVER", "ORCPT=rfc822;Old+3DName@x.test"]
    assert received.rcpt_params(2) == ["ORCPT=rfc822;d@x.test"]


def test_no_dsn_parameters_without_dsn_and_success_is_relayed(peer: Peer) -> None:
    peer.extensions = ["8BITMIME"]
    rcpts = (Recipient("a@x.test", notify=("SUCCESS",)), Recipient("b@x.test", notify=("FAILURE",)))
    [outcomes] = send(hop(peer), job(recipients=rcpts, ret="FULL", envid="e1"))
    assert [o.status for o in outcomes] == [Status.DELIVERED] * 2
    assert [o.dsn_relayed for o in outcomes] == [True, False]
    received = peer.transactions[0]
    assert received.mail_params == []
    assert received.rcpt_params(0) == [] and received.rcpt_params(1) == []


def test_smtputf8_refused_by_a_hop_without_it(peer: Peer) -> None:
    peer.extensions = ["8BITMIME", "DSN"]
    [outcomes] = send(
        hop(peer), job(recipients=("ü@x.test", "b@x.test"), smtputf8=True, body="8BITMIME")
    )
    assert statuses(outcomes) == [(Status.FAILED, "5.6.7")] * 2
    assert peer.attempts == []


def test_smtputf8_passed_when_offered(peer: Peer) -> None:
    data = "Subject: ü\r\n\r\nü\r\n".encode()
    [outcomes] = send(
        hop(peer),
        job(data, recipients=(Recipient("jü@x.test"),), smtputf8=True, body="8BITMIME"),
    )
    assert outcomes[0].status is Status.DELIVERED
    received = peer.transactions[0]
    assert "SMTPUTF8" in received.mail_params and "BODY=8BITMIME" in received.mail_params
    assert received.accepted == ["jü@x.test"]
    assert received.rcpt_params(0) == ["ORCPT=utf-8;j\\x{FC}@x.test"]
    assert received.message == data


def test_size_declared_and_too_big_refused(peer: Peer) -> None:
    peer.extensions = ["SIZE 1000", "8BITMIME"]
    [small, big] = send(hop(peer), job(), job(b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n"))
    assert small[0].status is Status.DELIVERED
    assert f"SIZE={len(TEXT)}" in peer.transactions[0].mail_params
    assert statuses(big) == [(Status.FAILED, "5.3.4")]
    assert len(peer.attempts) == 1
    assert peer.connections == 1  # the refusal left the connection usable


# --- replies ------------------------------------------------------------------------


def test_per_recipient_replies(peer: Peer) -> None:
    peer.rcpt_replies = {
        "bad@x.test": "550 5.1.1 no such user",
        "later@x.test": "451 4.3.0 try later",
    }
    [outcomes] = send(hop(peer), job(recipients=("bad@x.test", "ok@x.test", "later@x.test")))
    assert statuses(outcomes) == [
        (Status.FAILED, "5.1.1"),
        (Status.DELIVERED, "2.0.0"),
        (Status.DEFERRED, "4.3.0"),
    ]
    assert outcomes[0].reply == "550 5.1.1 no such user"
    assert [o.recipient.address for o in outcomes] == ["bad@x.test", "ok@x.test", "later@x.test"]
    assert peer.transactions[0].accepted == ["ok@x.test"]


def test_reply_without_enhanced_code_gets_the_class_default(peer: Peer) -> None:
    peer.rcpt_replies = {"bad@x.test": "550 unknown", "later@x.test": "452 full"}
    [outcomes] = send(hop(peer), job(recipients=("bad@x.test", "later@x.test")))
    assert statuses(outcomes) == [(Status.FAILED, "5.0.0"), (Status.DEFERRED, "4.0.0")]
    assert outcomes[0].reply == "550 5.0.0 unknown"


def test_all_recipients_refused_sends_no_content_and_keeps_the_connection(peer: Peer) -> None:
    """Pipelined (RFC 2920 3.1), DATA goes out in the group and is refused; either way no
    content is sent, and the connection is reset and reused."""
    peer.rcpt_replies = {"bad@x.test": "550 5.1.1 no"}
    first, second = send(hop(peer), job(recipients=("bad@x.test",)), job())
    assert statuses(first) == [(Status.FAILED, "5.1.1")]
    assert second[0].status is Status.DELIVERED
    assert peer.commands.count("DATA") == 2 and len(peer.transactions) == 1
    assert "RSET" in peer.commands
    assert peer.connections == 1


def test_all_recipients_refused_without_pipelining_sends_no_data(peer: Peer) -> None:
    peer.extensions = ["8BITMIME", "ENHANCEDSTATUSCODES"]
    peer.rcpt_replies = {"bad@x.test": "550 5.1.1 no"}
    first, second = send(hop(peer), job(recipients=("bad@x.test",)), job())
    assert statuses(first) == [(Status.FAILED, "5.1.1")]
    assert second[0].status is Status.DELIVERED
    assert peer.commands.count("DATA") == 1
    assert peer.connections == 1


def test_envelope_is_pipelined_when_offered(peer: Peer) -> None:
    """MAIL, every RCPT and DATA in one group; the content waits for 354."""
    [outcomes] = send(hop(peer), job(recipients=("a@x.test", "b@x.test")))
    assert statuses(outcomes) == [(Status.DELIVERED, "2.0.0")] * 2
    group = [(command.split(":")[0], waiting) for command, waiting in peer.arrivals[1:5]]
    assert group == [("MAIL FROM", True), ("RCPT TO", True), ("RCPT TO", True), ("DATA", False)]


def test_envelope_goes_step_by_step_without_pipelining(peer: Peer) -> None:
    peer.extensions = ["8BITMIME", "ENHANCEDSTATUSCODES"]
    [outcomes] = send(hop(peer), job(recipients=("a@x.test", "b@x.test")))
    assert statuses(outcomes) == [(Status.DELIVERED, "2.0.0")] * 2
    assert [waiting for _, waiting in peer.arrivals] == [False] * len(peer.arrivals)


def test_pipelined_group_after_a_refused_mail_stays_in_step(peer: Peer) -> None:
    """MAIL refused: the RCPT and DATA replies of the group are read and dropped, and the
    same connection carries the next message."""
    peer.mail_reply = "451 4.3.0 try later"
    [first] = send(hop(peer), job(recipients=("a@x.test", "b@x.test")))
    assert statuses(first) == [(Status.DEFERRED, "4.3.0")] * 2
    peer.mail_reply = "250 2.1.0 Ok"
    first, second = send(hop(peer), job(), job())
    assert [o.status for o in first + second] == [Status.DELIVERED] * 2
    assert peer.connections == 2  # one per send() call: the pool is closed in between


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("451 4.3.0 try later", (Status.DEFERRED, "4.3.0")),
        ("554 5.6.0 no", (Status.FAILED, "5.6.0")),
    ],
)
def test_data_reply_applies_to_the_accepted(
    peer: Peer, reply: str, expected: tuple[Status, str]
) -> None:
    peer.data_reply = reply
    peer.rcpt_replies = {"bad@x.test": "550 5.1.1 no"}
    [outcomes] = send(hop(peer), job(recipients=("a@x.test", "bad@x.test", "b@x.test")))
    assert statuses(outcomes) == [expected, (Status.FAILED, "5.1.1"), expected]
    assert outcomes[0].reply == reply


def test_data_command_refused(peer: Peer) -> None:
    peer.data_start_reply = "554 5.5.0 no data for you"
    first, second = send(hop(peer), job(), job())
    assert statuses(first) == statuses(second) == [(Status.FAILED, "5.5.0")]
    assert "RSET" in peer.commands and peer.connections == 1


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("553 5.7.1 sender refused", Status.FAILED), ("451 4.7.1 greylisted", Status.DEFERRED)],
)
def test_mail_refused(peer: Peer, reply: str, expected: Status) -> None:
    peer.mail_reply = reply
    [outcomes] = send(hop(peer), job(recipients=("a@x.test", "b@x.test")))
    assert [o.status for o in outcomes] == [expected] * 2
    assert outcomes[1].reply == reply
    # The pipelined RCPTs and DATA (RFC 2920) were refused after MAIL: no content sent.
    assert not peer.transactions


def test_421_to_data_defers_and_drops_the_connection(peer: Peer) -> None:
    peer.command_replies["DATA"] = "421 4.3.2 bye"
    [outcomes] = send(hop(peer), job(recipients=("a@x.test", "b@x.test")))
    assert statuses(outcomes) == [(Status.DEFERRED, "4.3.2")] * 2
    assert "QUIT" not in peer.commands


def test_421_on_rcpt_defers_the_rest_and_drops_the_connection(peer: Peer) -> None:
    peer.rcpt_replies = {"b@x.test": "421 4.3.2 shutting down"}
    first, second = send(hop(peer), job(recipients=("a@x.test", "b@x.test", "c@x.test")), job())
    assert [o.status for o in first] == [Status.DEFERRED] * 3
    assert first[1].enhanced == "4.3.2"
    assert second[0].status is Status.DELIVERED
    assert peer.connections == 2


# --- connection, TLS, AUTH ----------------------------------------------------------


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_is_deferred() -> None:
    settings = HopSettings(host="127.0.0.1", port=unused_port(), tls="none", connect_timeout=2)
    [outcomes] = send(settings, job(recipients=("a@x.test", "b@x.test")))
    assert statuses(outcomes) == [(Status.DEFERRED, "4.4.1")] * 2
    assert "connect to 127.0.0.1" in outcomes[0].reply


def test_greeting_refusal_is_deferred(peer: Peer) -> None:
    peer.greeting = "554 5.3.2 not today"
    [outcomes] = send(hop(peer), job())
    assert statuses(outcomes) == [(Status.DEFERRED, "4.4.1")]
    assert "554 5.3.2 not today" in outcomes[0].reply


def test_starttls_required_but_not_offered(peer: Peer) -> None:
    [outcomes] = send(hop(peer, tls="starttls"), job())
    assert statuses(outcomes) == [(Status.DEFERRED, "4.7.4")]
    assert peer.attempts == []


def test_starttls_with_the_right_ca(cert: PeerCert) -> None:
    with Peer(tls=cert, starttls=True) as running:
        settings = hop(running, tls="starttls", ca_file=cert.ca_file, host="localhost")
        [outcomes] = send(settings, job(), address="127.0.0.1")
        assert outcomes[0].status is Status.DELIVERED
        assert running.transactions[0].tls
        assert running.transactions[0].message == TEXT


def test_starttls_with_the_wrong_ca_is_deferred(cert: PeerCert, tmp_path: Path) -> None:
    other = make_cert(tmp_path / "other")
    with Peer(tls=cert, starttls=True) as running:
        [outcomes] = send(hop(running, tls="starttls", ca_file=other.ca_file), job())
        assert statuses(outcomes) == [(Status.DEFERRED, "4.7.5")]
        assert "certificate verify failed" in outcomes[0].reply
        assert running.attempts == []


def test_starttls_checks_the_name(cert: PeerCert) -> None:
    with Peer(tls=cert, starttls=True) as running:
        settings = hop(running, tls="starttls", ca_file=cert.ca_file, host="mx.elsewhere.test")
        [outcomes] = send(settings, job(), address="127.0.0.1")
        assert statuses(outcomes) == [(Status.DEFERRED, "4.7.5")]
        settings = hop(
            running,
            tls="starttls",
            ca_file=cert.ca_file,
            host="mx.elsewhere.test",
            tls_name="localhost",
        )
        [outcomes] = send(settings, job(), address="127.0.0.1")
        assert outcomes[0].status is Status.DELIVERED


def test_opportunistic_tls_does_not_verify(cert: PeerCert, tmp_path: Path) -> None:
    other = make_cert(tmp_path / "other")
    with Peer(tls=cert, starttls=True) as running:
        [outcomes] = send(hop(running, tls="opportunistic", ca_file=other.ca_file), job())
        assert outcomes[0].status is Status.DELIVERED
        assert running.transactions[0].tls


def test_implicit_tls(cert: PeerCert, tmp_path: Path) -> None:
    with Peer(tls=cert, implicit_tls=True) as running:
        good = hop(running, tls="implicit", ca_file=cert.ca_file, host="localhost")
        [outcomes] = send(good, job(), address="127.0.0.1")
        assert outcomes[0].status is Status.DELIVERED
        assert running.transactions[0].tls
        other = make_cert(tmp_path / "other")
        [outcomes] = send(hop(running, tls="implicit", ca_file=other.ca_file), job())
        assert statuses(outcomes) == [(Status.DEFERRED, "4.7.5")]


def test_auth_ok(cert: PeerCert) -> None:
    users = {"relay": "s3cret pass"}
    with Peer(tls=cert, starttls=True, users=users, auth_required=True) as running:
        settings = hop(
            running, tls="starttls", ca_file=cert.ca_file, username="relay", password="s3cret pass"
        )
        assert "s3cret" not in repr(settings)
        results = send(settings, job(), job())
        assert [r[0].status for r in results] == [Status.DELIVERED] * 2
        assert [t.user for t in running.transactions] == ["relay", "relay"]
        assert len(running.auth_attempts) == 1  # the reused connection stays authenticated


def test_auth_failure_is_deferred(cert: PeerCert) -> None:
    with Peer(tls=cert, starttls=True, users={"relay": "right"}, auth_required=True) as running:
        settings = hop(
            running, tls="starttls", ca_file=cert.ca_file, username="relay", password="wrong"
        )
        [outcomes] = send(settings, job(recipients=("a@x.test", "b@x.test")))
        assert statuses(outcomes) == [(Status.DEFERRED, "4.7.8")] * 2
        assert "535 5.7.8" in outcomes[0].reply
        assert "wrong" not in outcomes[0].reply
        assert running.attempts == []
        assert len(running.auth_attempts) == 1  # one try: failures may lock the account


def test_auth_login_when_plain_is_not_offered(cert: PeerCert) -> None:
    with Peer(
        tls=cert, starttls=True, users={"relay": "pw"}, auth_mechanisms=("LOGIN",)
    ) as running:
        settings = hop(
            running, tls="starttls", ca_file=cert.ca_file, username="relay", password="pw"
        )
        [outcomes] = send(settings, job())
        assert outcomes[0].status is Status.DELIVERED
        assert running.auth_attempts == [("LOGIN", "relay", "pw", True)]


def test_auth_not_offered_is_deferred(cert: PeerCert) -> None:
    with Peer(tls=cert, starttls=True) as running:
        settings = hop(
            running, tls="starttls", ca_file=cert.ca_file, username="relay", password="pw"
        )
        [outcomes] = send(settings, job())
        assert statuses(outcomes) == [(Status.DEFERRED, "4.7.0")]


def test_no_credentials_over_cleartext(cert: PeerCert) -> None:
    with Peer(users={"relay": "pw"}, auth_needs_tls=False) as running:
        settings = hop(running, tls="opportunistic", username="relay", password="pw")
        [outcomes] = send(settings, job())
        assert statuses(outcomes) == [(Status.DEFERRED, "4.7.10")]
        assert running.auth_attempts == []
        [outcomes] = send(hop(running, tls="none", username="relay", password="pw"), job())
        assert outcomes[0].status is Status.DELIVERED  # "none" is the administrator's choice


# --- the pool -----------------------------------------------------------------------


def test_connection_reuse(peer: Peer) -> None:
    results = send(hop(peer), job(), job(), job())
    assert [o[0].status for o in results] == [Status.DELIVERED] * 3
    assert peer.connections == 1
    assert len(peer.transactions) == 3
    assert peer.commands.count("NOOP") == 0  # reused at once: no check needed
    assert peer.commands[-1] == "QUIT"  # close() says goodbye


def test_connection_idle_for_a_while_is_checked(
    peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smtp_client, "NOOP_AFTER_IDLE", 0.0)
    results = send(hop(peer), job(), job(), job())
    assert [o[0].status for o in results] == [Status.DELIVERED] * 3
    assert peer.connections == 1
    assert peer.commands.count("NOOP") == 2  # checked before each reuse


def test_connection_dropped_unseen_is_retried_on_a_new_one(peer: Peer) -> None:
    """A reused connection that dies before answering anything: nothing can have been
    accepted, so the message goes at once on a new connection instead of waiting."""

    outcomes = _second_after(peer, lambda: setattr(peer, "drop_once", {"MAIL"}))
    assert outcomes[0].status is Status.DELIVERED
    assert peer.connections == 2 and len(peer.transactions) == 2


def test_connection_dropped_on_a_new_connection_is_deferred(peer: Peer) -> None:
    peer.drop_once = {"MAIL"}
    [outcomes] = send(hop(peer), job())
    assert statuses(outcomes) == [(Status.DEFERRED, "4.4.2")]
    assert peer.connections == 1


def test_dead_idle_connection_is_replaced(peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_client, "NOOP_AFTER_IDLE", 0.0)

    outcomes = _second_after(peer, lambda: peer.command_replies.update(NOOP="421 4.3.2 going away"))
    assert outcomes[0].status is Status.DELIVERED
    assert peer.connections == 2 and len(peer.transactions) == 2


def _second_after(peer: Peer, between: Callable[[], object]) -> list[Outcome]:
    """Two messages through one pool, with `between` done to the peer after the first;
    the outcomes of the second."""

    async def go() -> list[Outcome]:
        pool = HopPool()
        try:
            settings = hop(peer)
            await pool.send(settings, None, job())
            between()
            return await pool.send(settings, None, job())
        finally:
            await pool.close()

    return asyncio.run(go())


def test_idle_connections_expire(peer: Peer) -> None:
    async def go() -> None:
        pool = HopPool(idle_seconds=0.2)
        try:
            await pool.send(hop(peer), None, job())
            await asyncio.sleep(0.6)
            assert peer.concurrent == 0  # closed by the pool after idle_seconds
            assert "QUIT" in peer.commands
            await pool.send(hop(peer), None, job())
        finally:
            await pool.close()

    asyncio.run(go())
    assert peer.connections == 2


def test_per_destination_limit(peer: Peer) -> None:
    peer.data_delay = 0.2

    async def go() -> list[list[Outcome]]:
        pool = HopPool(per_destination=2)
        try:
            settings = hop(peer)
            return await asyncio.gather(*(pool.send(settings, None, job()) for _ in range(6)))
        finally:
            await pool.close()

    results = asyncio.run(go())
    assert [r[0].status for r in results] == [Status.DELIVERED] * 6
    assert peer.max_concurrent == 2
    assert peer.connections == 2
    assert len(peer.transactions) == 6


def test_total_limit_closes_idle_connections_of_other_hops() -> None:
    with Peer() as one, Peer(host="127.0.0.2") as two:

        async def go() -> None:
            pool = HopPool(total=1)
            try:
                for running in (one, two, one):
                    [outcome] = await pool.send(hop(running), None, job())
                    assert outcome.status is Status.DELIVERED
                    assert one.concurrent + two.concurrent <= 1
            finally:
                await pool.close()

        asyncio.run(go())
        assert one.connections == 2 and two.connections == 1


def test_credentials_separate_connections(cert: PeerCert) -> None:
    users = {"u1": "p1", "u2": "p2"}
    with Peer(tls=cert, starttls=True, users=users) as running:
        base = {"tls": "starttls", "ca_file": cert.ca_file}
        first = hop(running, username="u1", password="p1", **base)
        second = hop(running, username="u2", password="p2", **base)

        async def go() -> None:
            pool = HopPool()
            try:
                for settings in (first, second, first):
                    await pool.send(settings, None, job())
            finally:
                await pool.close()

        asyncio.run(go())
        assert [t.user for t in running.transactions] == ["u1", "u2", "u1"]
        assert running.connections == 2


# --- encodings ----------------------------------------------------------------------


def test_xtext() -> None:
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert utf8_addr_xtext("jö+\\@x") == "j\\x{F6}\\x{2B}\\x{5C}@x"
