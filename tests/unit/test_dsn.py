"""Tests for submitd.message.dsn: RFC 3464 delivery status notifications.

Every DSN is parsed back with the standard email package, an independent MIME reader,
and checked field by field; the returned original is compared octet for octet with what
was submitted, by slicing the DSN's own bytes at the delimiters.
"""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import re
from collections.abc import Iterable, Sequence
from typing import cast

import pytest

from submitd.envelope import Envelope, Recipient
from submitd.message.dsn import (
    Dsn,
    RecipientReport,
    build_dsn,
    should_notify,
    xtext_encode,
)

CRLF = b"\r\n"
ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 3600
HEADER = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@example.org>\r\n"
)
BODY = b"Shall we?\r\n\r\n-- \r\nAlice\r\n"
ORIGINAL = HEADER + CRLF + BODY


def envelope(**kwargs: object) -> Envelope:
    base: dict[str, object] = {"sender": "alice@example.org"}
    base.update(kwargs)
    return Envelope(**base)  # type: ignore[arg-type]


def failed(
    address: str = "bob@example.net",
    *,
    orcpt: str | None = None,
    diagnostic: str | None = "550 5.1.1 <bob@example.net>: no such user",
    remote_mta: str | None = "mx.example.net",
) -> RecipientReport:
    return RecipientReport(
        recipient=Recipient(address, None, orcpt),
        action="failed",
        status="5.1.1",
        diagnostic=diagnostic,
        remote_mta=remote_mta,
        last_attempt=NOW - 60,
        will_retry_until=None,
    )


def build(
    reports: Sequence[RecipientReport],
    env: Envelope | None = None,
    *,
    header: bytes = HEADER + CRLF,
    original: Iterable[bytes] | None = (ORIGINAL[:10], ORIGINAL[10:]),
) -> Dsn:
    return build_dsn(
        reporting_mta="submit.example.org",
        postmaster="postmaster@example.org",
        envelope=env or envelope(),
        queue_id="Q1ABC",
        arrival=ARRIVAL,
        now=NOW,
        reports=reports,
        original_header=header,
        original=original,
        message_id_domain="example.org",
    )


def parse(dsn: Dsn) -> email.message.EmailMessage:
    assert_well_formed(dsn.message)
    message = email.message_from_bytes(dsn.message, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert not message.defects
    return message


def assert_well_formed(data: bytes) -> None:
    """CRLF only, no line over 998 octets (RFC 5322 2.1.1)."""
    assert b"\r" not in data.replace(CRLF, b"") and b"\n" not in data.replace(CRLF, b"")
    assert all(len(line) <= 998 for line in data.split(CRLF))


def parts(message: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return cast(list[email.message.EmailMessage], payload)


def status_blocks(part: email.message.Message) -> list[email.message.EmailMessage]:
    """The stdlib reads message/delivery-status as one Message per block of fields."""
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return cast(list[email.message.EmailMessage], blocks)


def raw_parts(data: bytes) -> list[bytes]:
    """The body parts as octets, cut at the delimiters (RFC 2046 5.1.1)."""
    header = email.message_from_bytes(data, policy=email.policy.default)
    boundary = header.get_boundary()
    assert boundary
    delimiter = CRLF + b"--" + boundary.encode()
    body = data.split(CRLF + CRLF, 1)[1]
    pieces = (CRLF + body).split(delimiter)
    assert pieces[-1] == b"--" + CRLF  # the close-delimiter ends the message
    return [piece.removeprefix(CRLF) for piece in pieces[1:-1]]


def content_of(raw_part: bytes) -> bytes:
    return raw_part.split(CRLF + CRLF, 1)[1]


def text_of(message: email.message.EmailMessage) -> str:
    """The human-readable part with its line breaks undone, to look for sentences."""
    content = parts(message)[0].get_content()
    assert isinstance(content, str)
    return " ".join(content.split())


def raw_status_blocks(data: bytes) -> list[email.message.Message]:
    """The blocks of the second part, read as header sections one by one; the stdlib
    does not know message/global-delivery-status (RFC 6533) and reads only its first."""
    content = content_of(raw_parts(data)[1])
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    return [parser.parsebytes(block + CRLF) for block in content.split(CRLF + CRLF) if block]


# The top level.


def test_failure_header_fields() -> None:
    dsn = build([failed()])
    message = parse(dsn)
    assert message["From"] == "Mail Delivery System <postmaster@example.org>"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert b"\r\nTo: <alice@example.org>\r\n" in dsn.message
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == "Tue, 14 Nov 2023 23:13:20 +0000"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert re.fullmatch(r"<Q1ABC\.dsn\.\d+-[0-9a-f]{8}@example\.org>", message["Message-ID"])
    assert message["Message-ID"] == dsn.message_id
    assert not dsn.eight_bit and not dsn.smtputf8
    assert dsn.message.isascii()


def test_three_parts_in_rfc_6522_order() -> None:
    message = parse(build([failed()]))
    types = [part.get_content_type() for part in parts(message)]
    assert types == ["text/plain", "message/delivery-status", "message/rfc822"]


def test_message_ids_differ_between_reports() -> None:
    first = build([failed()])
    second = build([failed("carol@example.net")])
    assert first.message_id != second.message_id


def test_same_input_same_bytes() -> None:
    assert build([failed()]).message == build([failed()]).message


# The delivery-status part.


def test_per_message_fields() -> None:
    message = parse(build([failed()]))
    per_message = status_blocks(parts(message)[1])[0]
    assert per_message["Reporting-MTA"] == "dns; submit.example.org"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_message["X-Submitd-Queue-ID"] == "Q1ABC"
    assert "Original-Envelope-Id" not in per_message


def test_envid_is_xtext_encoded() -> None:
    message = parse(build([failed()], envelope(envid="id+1 = x")))
    per_message = status_blocks(parts(message)[1])[0]
    assert per_message["Original-Envelope-Id"] == "id+2B1+20+3D+20x"


def test_one_failed_recipient_fields() -> None:
    message = parse(build([failed()]))
    blocks = status_blocks(parts(message)[1])
    assert len(blocks) == 2
    block = blocks[1]
    assert "Original-Recipient" not in block
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert block["Last-Attempt-Date"] == "Tue, 14 Nov 2023 23:12:20 +0000"
    assert "Will-Retry-Until" not in block


def test_several_recipients_with_and_without_orcpt() -> None:
    reports = [
        failed("bob@example.net", orcpt="rfc822;Bob@Example.NET"),
        failed("carol@example.net", diagnostic=None, remote_mta=None),
        failed("dave@example.net", orcpt="x400;c=us;a=x;p=y;s=dave"),
    ]
    message = parse(build(reports))
    blocks = status_blocks(parts(message)[1])[1:]
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@example.net",
        "rfc822; carol@example.net",
        "rfc822; dave@example.net",
    ]
    assert blocks[0]["Original-Recipient"] == "rfc822; Bob@Example.NET"
    assert "Original-Recipient" not in blocks[1]
    assert blocks[2]["Original-Recipient"] == "x400; c=us;a=x;p=y;s=dave"
    assert "Remote-MTA" not in blocks[1] and "Diagnostic-Code" not in blocks[1]
    text = text_of(message)
    for address in ("bob@example.net", "carol@example.net", "dave@example.net"):
        assert f"<{address}>: could not be delivered (status 5.1.1)" in text
    assert "mx.example.net said: 550 5.1.1 <bob@example.net>: no such user" in text


def test_own_diagnosis_is_not_typed_smtp() -> None:
    report = failed(diagnostic="domain has a null MX (RFC 7505)", remote_mta=None)
    block = status_blocks(parts(parse(build([report])))[1])[1]
    assert block["Diagnostic-Code"] == "X-Submitd; domain has a null MX (RFC 7505)"


def test_delay() -> None:
    report = RecipientReport(
        recipient=Recipient("bob@example.net", ("DELAY", "FAILURE")),
        action="delayed",
        status="4.4.1",
        diagnostic="421 4.4.1 try again later",
        remote_mta="[192.0.2.7]",
        last_attempt=NOW - 30,
        will_retry_until=ARRIVAL + 5 * 86400,
    )
    message = parse(build([report]))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(parts(message)[1])[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Remote-MTA"] == "dns; [192.0.2.7]"
    assert block["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert block["Last-Attempt-Date"] == "Tue, 14 Nov 2023 23:12:50 +0000"
    # RET concerns failed DSNs only (RFC 3461 4.3): a delay carries the header section.
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert "Will-Retry-Until" not in status_blocks(parts(parse(build([failed()])))[1])[1]


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded"])
def test_success(action: str) -> None:
    report = RecipientReport(
        Recipient("bob@example.net", ("SUCCESS",)), action, "2.0.0", "250 2.0.0 Ok", "mx", NOW
    )
    message = parse(build([report], envelope(ret="FULL")))
    assert message["Subject"] == "Successful Mail Delivery Report"
    block = status_blocks(parts(message)[1])[1]
    assert block["Action"] == action
    assert block["Status"] == "2.0.0"
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"


def test_mixed_report_subject_is_the_worst_news() -> None:
    delayed = RecipientReport(Recipient("c@example.net"), "delayed", "4.0.0", None, None, None)
    message = parse(build([delayed, failed()]))
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in status_blocks(parts(message)[1])[1:]] == ["delayed", "failed"]


# The returned message (RFC 3461 4.3).


@pytest.mark.parametrize("ret", [None, "FULL"])
def test_full_return_is_the_original_octet_for_octet(ret: str | None) -> None:
    dsn = build([failed()], envelope(ret=ret))
    message = parse(dsn)
    returned = parts(message)[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = parts(returned)[0]
    assert inner["Subject"] == "lunch"
    assert content_of(raw_parts(dsn.message)[2]) == ORIGINAL
    assert "Your message is attached below." in text_of(message)


def test_ret_hdrs_returns_only_the_header() -> None:
    dsn = build([failed()], envelope(ret="HDRS"))
    returned = parts(parse(dsn))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert content_of(raw_parts(dsn.message)[2]) == HEADER
    assert BODY not in dsn.message
    text = text_of(parse(dsn))
    assert "The header of your message is attached below." in text


def test_header_without_its_empty_line_is_accepted() -> None:
    dsn = build([failed()], envelope(ret="HDRS"), header=HEADER)
    assert content_of(raw_parts(dsn.message)[2]) == HEADER


def test_no_original_falls_back_to_headers_and_says_so() -> None:
    dsn = build([failed()], original=None)
    message = parse(dsn)
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert content_of(raw_parts(dsn.message)[2]) == HEADER
    assert "too large to return in full" in text_of(message)


def test_original_that_is_not_8bit_mime_is_not_returned_whole() -> None:
    binary = HEADER + CRLF + b"bare\nline feed\r\n"
    dsn = build([failed()], envelope(body="BINARYMIME"), original=[binary])
    message = parse(dsn)
    assert parts(message)[2].get_content_type() == "text/rfc822-headers"
    assert "cannot be returned as it was sent" in text_of(message)


def test_eight_bit_original_is_flagged() -> None:
    original = HEADER + CRLF + "Grüße\r\n".encode()
    dsn = build([failed()], envelope(body="8BITMIME"), original=[original])
    assert dsn.eight_bit and not dsn.smtputf8
    message = parse(dsn)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert parts(message)[2]["Content-Transfer-Encoding"] == "8bit"
    assert parts(message)[1]["Content-Transfer-Encoding"] == "7bit"
    assert content_of(raw_parts(dsn.message)[2]) == original


def test_boundary_never_occurs_in_the_parts() -> None:
    dsn = build([failed()])
    boundary = parse(dsn).get_boundary()
    assert boundary is not None
    for raw in raw_parts(dsn.message):
        assert boundary.encode() not in raw


# SMTPUTF8 originals (RFC 6533).


def test_smtputf8_original_uses_the_global_types() -> None:
    header = "From: <jörg@exämple.org>\r\nSubject: grüß\r\n".encode()
    original = header + CRLF + b"hallo\r\n"
    env = Envelope(sender="jörg@exämple.org", smtputf8=True, body="8BITMIME")
    report = failed("zoë@exämple.net", orcpt="utf-8;zo\\x{EB}@ex\\x{E4}mple.net")
    dsn = build([report], env, header=header, original=[original])
    assert dsn.eight_bit and dsn.smtputf8
    message = parse(dsn)
    assert "\r\nTo: <jörg@exämple.org>\r\n".encode() in dsn.message
    types = [part.get_content_type() for part in parts(message)]
    assert types == ["text/plain", "message/global-delivery-status", "message/global"]
    assert parts(message)[0].get_content_charset() == "utf-8"
    assert "<zoë@exämple.net>" in text_of(message)
    assert content_of(raw_parts(dsn.message)[2]) == original
    per_message, block = raw_status_blocks(dsn.message)
    assert per_message["Reporting-MTA"] == "dns; submit.example.org"
    assert block["Final-Recipient"] == "utf-8; zoë@exämple.net"
    assert block["Original-Recipient"] == "utf-8; zo\\x{EB}@ex\\x{E4}mple.net"
    assert block["Action"] == "failed"


def test_smtputf8_original_headers_only_is_global_headers() -> None:
    env = Envelope(sender="alice@example.org", smtputf8=True, ret="HDRS")
    dsn = build([failed()], env)
    assert not dsn.smtputf8  # an ASCII sender: the DSN's own header stays ASCII
    types = [part.get_content_type() for part in parts(parse(dsn))]
    assert types[2] == "message/global-headers"


def test_non_ascii_address_in_a_plain_dsn_is_escaped() -> None:
    dsn = build([failed("zoë+x@exämple.net", orcpt="rfc822;zoë@exämple.net")])
    assert dsn.message.isascii()
    block = status_blocks(parts(parse(dsn))[1])[1]
    assert block["Final-Recipient"] == "utf-8; zo\\x{EB}\\x{2B}x@ex\\x{E4}mple.net"
    assert block["Original-Recipient"] == "utf-8; zo\\x{EB}@ex\\x{E4}mple.net"


# Outside text cannot inject fields.


def test_reply_with_line_breaks_cannot_add_fields() -> None:
    evil = "550 5.1.1 no\r\nBcc: victim@example.com\r\n\r\nX-Evil: 1\nStatus: 2.0.0"
    report = failed(diagnostic=evil, remote_mta="mx\r\nX-Evil: 2")
    dsn = build([report], envelope(envid="id\r\nX-Evil: 3"))
    message = parse(dsn)
    assert "Bcc" not in message and "X-Evil" not in message
    blocks = status_blocks(parts(message)[1])
    assert len(blocks) == 2
    for block in blocks:
        assert "X-Evil" not in block and "Bcc" not in block
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1].get_all("Status") == ["5.1.1"]
    assert blocks[1]["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no Bcc: victim@")
    assert blocks[1]["Remote-MTA"] == "dns; mxX-Evil:2"
    assert blocks[0]["Original-Envelope-Id"] == "id+0D+0AX-Evil:+203"


def test_multiline_reply_is_one_field() -> None:
    reply = "550-5.1.1 first line\r\n550 5.1.1 second line"
    block = status_blocks(parts(parse(build([failed(diagnostic=reply)])))[1])[1]
    assert block["Diagnostic-Code"] == "smtp; 550-5.1.1 first line 550 5.1.1 second line"


def test_long_reply_is_folded_and_unfolds_to_itself() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(400))
    dsn = build([failed(diagnostic=reply)])
    raw = content_of(raw_parts(dsn.message)[1])
    assert all(len(line) <= 78 for line in raw.split(CRLF))
    block = status_blocks(parts(parse(dsn))[1])[1]
    assert block["Diagnostic-Code"] == f"smtp; {reply}"


@pytest.mark.parametrize("smtputf8", [False, True])
def test_unbreakable_word_is_cut_within_998_octets(smtputf8: bool) -> None:
    word = "é" * 3000
    env = Envelope(sender="a@example.org", smtputf8=smtputf8)
    dsn = build([failed(diagnostic=f"550 {word}")], env)
    assert_well_formed(dsn.message)
    block = raw_status_blocks(dsn.message)[1]
    expected = word if smtputf8 else "\\x{E9}" * 3000
    assert block["Diagnostic-Code"].replace(" ", "") == f"smtp;550{expected}"


def test_undecodable_reply_octets_do_not_break_the_dsn() -> None:
    reply = b"550 caf\xe9".decode("utf-8", "surrogateescape")
    block = status_blocks(parts(parse(build([failed(diagnostic=reply)])))[1])[1]
    assert block["Diagnostic-Code"] == "smtp; 550 caf?"


# Refusals.


def test_null_sender_gets_no_dsn() -> None:
    with pytest.raises(ValueError, match="null reverse-path"):
        build([failed()], Envelope(sender=""))


def test_unknown_action_is_refused() -> None:
    report = RecipientReport(Recipient("b@example.net"), "bounced", "5.0.0", None, None, None)
    with pytest.raises(ValueError, match="unknown DSN action"):
        build([report])


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        ("failed", "5.1", "5.0.0"),
        ("failed", "", "5.0.0"),
        ("delayed", "3.0.0", "4.0.0"),
        ("delivered", "2.0.0\r\nX: y", "2.0.0"),
        ("failed", "4.4.7", "4.4.7"),  # expired in the queue: the last status stands
    ],
)
def test_malformed_status_gets_the_generic_code(action: str, status: str, expected: str) -> None:
    report = RecipientReport(Recipient("b@example.net"), action, status, None, None, None)
    block = status_blocks(parts(parse(build([report])))[1])[1]
    assert block["Status"] == expected


def test_no_reports_is_refused() -> None:
    with pytest.raises(ValueError):
        build([])


# Helpers.


@pytest.mark.parametrize(
    ("notify", "action", "expected"),
    [
        (None, "failed", True),
        (None, "delayed", True),
        (None, "delivered", False),
        (("NEVER",), "failed", False),
        (("SUCCESS",), "delivered", True),
        (("SUCCESS",), "relayed", True),
        (("SUCCESS",), "failed", False),
        (("FAILURE",), "delayed", False),
        (("DELAY",), "delayed", True),
    ],
)
def test_should_notify(notify: tuple[str, ...] | None, action: str, expected: bool) -> None:
    assert should_notify(envelope(), Recipient("b@example.net", notify), action) is expected


def test_should_notify_never_for_the_null_sender() -> None:
    assert not should_notify(Envelope(sender=""), Recipient("b@example.net"), "failed")


def test_xtext_encode() -> None:
    assert xtext_encode("abc+=d e") == "abc+2B+3Dd+20e"
    assert xtext_encode("é") == "+C3+A9"
