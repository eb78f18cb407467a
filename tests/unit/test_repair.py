"""Tests for submitd.message.repair: RFC 6409 8.4 transfer encoding of 8-bit submissions.

Expected output is written out in full where it is short, so a test also proves that
every octet we did not mean to touch (preamble, delimiters, 7-bit parts) is unchanged.
Round trips decode the repaired message with the standard email package, an
independent MIME reader, and must give back the submitted octets exactly.
"""

from __future__ import annotations

import email
import email.message

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from submitd.message.repair import (
    RepairImpossible,
    base64_encode,
    needs_repair,
    qp_encode,
    repair_8bit,
)

CRLF = b"\r\n"
HEADER = b"From: <a@example.net>\r\nTo: <b@example.org>\r\nSubject: hi\r\n"
MIME_TOP = b"From: <a@example.net>\r\nMIME-Version: 1.0\r\n"


def parse(header: bytes, body: bytes) -> email.message.Message:
    return email.message_from_bytes(header + CRLF + body)


def assert_clean(header: bytes, body: bytes) -> None:
    """The repaired message is 7-bit, CRLF-only, with lines of at most 998 octets."""
    whole = header + CRLF + body
    assert whole.isascii()
    assert b"\r" not in whole.replace(CRLF, b"") and b"\n" not in whole.replace(CRLF, b"")
    assert all(len(line) <= 998 for line in whole.split(CRLF))


def leaves(message: email.message.Message) -> list[email.message.Message]:
    return [part for part in message.walk() if not part.is_multipart()]


# --- non-MIME messages --------------------------------------------------------------


def test_non_mime_utf8_body_becomes_text_plain_utf8_qp() -> None:
    body = "Grüße, Jürgen \r\n.\r\n".encode()
    header, new_body = repair_8bit(HEADER, body)
    assert header == (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n" + HEADER
    )
    assert new_body == b"Gr=C3=BC=C3=9Fe, J=C3=BCrgen=20\r\n.\r\n"
    assert parse(header, new_body).get_payload(decode=True) == body
    assert_clean(header, new_body)


def test_non_mime_non_utf8_body_is_unknown_8bit() -> None:
    body = b"caf\xe9\r\n"
    header, new_body = repair_8bit(HEADER, body)
    assert header.startswith(
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=unknown-8bit\r\n"
    )
    assert new_body == b"caf=E9\r\n"
    assert parse(header, new_body).get_content_charset() == "unknown-8bit"


def test_existing_mime_version_is_kept_and_stray_cte_replaced() -> None:
    header = b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: 8bit\r\nSubject: x\r\n"
    new_header, _ = repair_8bit(header, b"\xff\r\n")
    assert new_header == (
        b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"MIME-Version: 1.0\r\nSubject: x\r\n"
    )


def test_seven_bit_message_is_returned_unchanged() -> None:
    body = b"plain\r\n"
    assert repair_8bit(HEADER, body) == (HEADER, body)


def test_content_type_without_mime_version_gets_mime_version() -> None:
    header = b"Content-Type: text/plain; charset=iso-8859-1\r\nSubject: x\r\n"
    new_header, new_body = repair_8bit(header, b"\xe9\r\n")
    assert new_header == (
        b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n" + header
    )
    assert new_body == b"=E9\r\n"


def test_singlepart_application_becomes_base64_ending_in_crlf() -> None:
    header = MIME_TOP + b"Content-Type: application/octet-stream\r\n"
    data = bytes(range(256))
    new_header, new_body = repair_8bit(header, data + CRLF)
    assert new_header.startswith(b"Content-Transfer-Encoding: base64\r\n")
    assert new_body.endswith(CRLF)
    assert parse(new_header, new_body).get_payload(decode=True) == data + CRLF
    assert_clean(new_header, new_body)


# --- multipart ----------------------------------------------------------------------

MIXED_HEADER = MIME_TOP + b'Content-Type: multipart/mixed;\r\n boundary="=_b1"\r\n'
SEVEN_BIT_PART = (
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Disposition: inline;\r\n\tfilename=a.txt\r\n"
    b"\r\n"
    b"seven bit   \r\n.\r\nend"
)
PREAMBLE = b"This is a multi-part message in MIME format.  \r\n\r\n"
EPILOGUE = b"\r\nepilogue \r\n"


def mixed(*parts: bytes, boundary: bytes = b"=_b1") -> bytes:
    delimiter = b"--" + boundary
    inner = b"".join(delimiter + b"\r\n" + part + CRLF for part in parts)
    return PREAMBLE + inner + delimiter + b"--" + EPILOGUE


def test_multipart_repairs_only_the_8bit_part() -> None:
    eight = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    body = mixed(eight + CRLF + "naïve\r\nline".encode(), SEVEN_BIT_PART)
    header, new_body = repair_8bit(MIXED_HEADER, body)
    assert header == MIXED_HEADER
    assert new_body == mixed(
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nna=C3=AFve\r\nline",
        SEVEN_BIT_PART,
    )
    assert new_body.startswith(PREAMBLE) and new_body.endswith(EPILOGUE)
    assert SEVEN_BIT_PART in new_body
    texts = [p.get_payload(decode=True) for p in leaves(parse(header, new_body))]
    assert texts == ["naïve\r\nline".encode(), b"seven bit   \r\n.\r\nend"]
    assert_clean(header, new_body)


def test_untyped_part_gets_content_type_and_qp() -> None:
    body = mixed(b"\r\ncaf\xe9", SEVEN_BIT_PART)
    _, new_body = repair_8bit(MIXED_HEADER, body)
    assert new_body == mixed(
        b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9",
        SEVEN_BIT_PART,
    )


def test_nested_alternative_inside_mixed() -> None:
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"
        b"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>\xc3\xa9t\xc3\xa9</p>\r\n"
        b"--alt--\r\n"
    )
    header, new_body = repair_8bit(MIXED_HEADER, mixed(alternative, SEVEN_BIT_PART))
    assert SEVEN_BIT_PART in new_body and new_body.startswith(PREAMBLE)
    payloads = [
        (p.get_content_type(), p["Content-Transfer-Encoding"], p.get_payload(decode=True))
        for p in leaves(parse(header, new_body))
    ]
    assert payloads == [
        ("text/plain", "quoted-printable", "été".encode()),
        ("text/html", "quoted-printable", "<p>été</p>".encode()),
        ("text/plain", None, b"seven bit   \r\n.\r\nend"),
    ]
    assert_clean(header, new_body)


def test_octet_stream_part_becomes_base64() -> None:
    data = bytes(range(256)) * 3
    part = b"Content-Type: application/octet-stream\r\n\r\n" + data
    header, new_body = repair_8bit(MIXED_HEADER, mixed(part, SEVEN_BIT_PART))
    repaired = leaves(parse(header, new_body))[0]
    assert repaired["Content-Transfer-Encoding"] == "base64"
    assert repaired.get_payload(decode=True) == data
    encoded = new_body.split(b"\r\n\r\n", 2)[2].split(b"\r\n--=_b1")[0]
    assert all(len(line) == 76 for line in encoded.split(CRLF)[:-1])
    assert_clean(header, new_body)


def test_message_rfc822_is_repaired_inside_not_base64() -> None:
    inner = b"From: <c@example.com>\r\nSubject: fwd\r\n\r\nk\xf6ln\r\n"
    part = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner
    header, new_body = repair_8bit(MIXED_HEADER, mixed(part, SEVEN_BIT_PART))
    assert (
        b"Content-Transfer-Encoding: 7bit\r\nContent-Type: message/rfc822\r\n\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"From: <c@example.com>\r\nSubject: fwd\r\n\r\nk=F6ln\r\n"
    ) in new_body
    embedded, _ = leaves(parse(header, new_body))[:2]
    assert embedded.get_content_type() == "text/plain"  # the embedded message's own body
    assert embedded.get_payload(decode=True) == b"k\xf6ln\r\n"
    assert_clean(header, new_body)


def test_digest_parts_default_to_message_rfc822() -> None:
    header = MIME_TOP + b"Content-Type: multipart/digest; boundary=d\r\n"
    body = b"--d\r\n\r\nSubject: x\r\n\r\n\xe9\r\n--d--\r\n"
    _, new_body = repair_8bit(header, body)
    assert new_body == (
        b"--d\r\n\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\nSubject: x\r\n\r\n=E9\r\n--d--\r\n"
    )


def test_binary_part_with_long_line_is_encoded() -> None:
    data = b"x" * 2000
    part = b"Content-Type: image/png\r\nContent-Transfer-Encoding: binary\r\n\r\n" + data
    header, new_body = repair_8bit(MIXED_HEADER, mixed(part, b"\r\n\xff"))
    repaired = leaves(parse(header, new_body))[0]
    assert repaired["Content-Transfer-Encoding"] == "base64"
    assert repaired.get_payload(decode=True) == data
    assert_clean(header, new_body)


# --- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "body", "reason"),
    [
        (HEADER + b"X-Note: caf\xc3\xa9\r\n", b"ok\r\n", "8-bit data in header field X-Note"),
        (
            HEADER + b"Subject2: a\r\n b\xe9\r\n",
            b"\xe9\r\n",
            "8-bit data in header field Subject2",
        ),
        (
            MIXED_HEADER,
            mixed(b"Content-Disposition: attachment; filename=\xe9.txt\r\n\r\nx"),
            "8-bit data in body part header field Content-Disposition",
        ),
        (
            MIME_TOP + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n",
            b"QUJD\xff\r\n",
            "8-bit data in a part declared Content-Transfer-Encoding: base64",
        ),
        (
            MIXED_HEADER,
            b"pre\xe9\r\n--=_b1\r\n\r\nx\r\n--=_b1--\r\n",
            "8-bit data in the preamble or epilogue of the multipart/mixed",
        ),
        (
            MIME_TOP + b"Content-Type: multipart/mixed\r\n",
            b"\xe9\r\n",
            "8-bit data in a multipart/mixed without boundary",
        ),
        (
            MIME_TOP + b"Content-Type: message/partial; id=x; number=1\r\n",
            b"\xe9\r\n",
            "8-bit data in a message/partial part, which cannot be encoded",
        ),
    ],
)
def test_unrepairable(header: bytes, body: bytes, reason: str) -> None:
    with pytest.raises(RepairImpossible) as caught:
        repair_8bit(header, body)
    assert caught.value.reason == reason


# --- encoders -----------------------------------------------------------------------


def test_qp_soft_breaks_and_trailing_white_space() -> None:
    line = b"a" * 74 + b"\xff" + b" \t"
    encoded = qp_encode(line + CRLF + b"end \r\n")
    assert encoded == b"a" * 74 + b"=\r\n=FF =09\r\nend=20\r\n"
    assert all(len(x) <= 76 for x in encoded.split(CRLF))


def test_qp_keeps_bare_cr_and_lf_as_data() -> None:
    assert qp_encode(b"a\rb\nc\r\n") == b"a=0Db=0Ac\r\n"


def test_base64_lines() -> None:
    encoded = base64_encode(b"\x00" * 120)
    assert [len(line) for line in encoded.split(CRLF)] == [76, 76, 8]


def test_needs_repair() -> None:
    assert not needs_repair(b"x" * 998 + CRLF)
    assert needs_repair(b"x" * 999 + CRLF)
    assert needs_repair(b"\x80")


# --- round trips (hypothesis) -------------------------------------------------------

interesting = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b" ", b"\t", b" \r\n", b"\r\n.", b"\r\n..", b"=", b"From ", b"\xff"]
)
content = st.lists(st.binary(max_size=40) | interesting, max_size=60).map(b"".join)
eight_bit = st.tuples(content, st.binary(min_size=1).map(lambda b: bytes([b[0] | 0x80])), content)
eight_bit_content = eight_bit.map(lambda t: t[0] + t[1] + t[2])


@settings(max_examples=300, deadline=None)
@given(body=eight_bit_content)
def test_round_trip_non_mime(body: bytes) -> None:
    header, new_body = repair_8bit(HEADER, body)
    assert_clean(header, new_body)
    assert parse(header, new_body).get_payload(decode=True) == body


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.sampled_from([b"text/plain", b"text/html", b"image/gif"]), eight_bit_content),
        min_size=1,
        max_size=4,
    )
)
def test_round_trip_multipart(parts: list[tuple[bytes, bytes]]) -> None:
    for _, data in parts:
        assume(b"--=_b1" not in data)
    raw = [b"Content-Type: " + ctype + b"\r\n\r\n" + data for ctype, data in parts]
    header, new_body = repair_8bit(MIXED_HEADER, mixed(*raw, SEVEN_BIT_PART))
    assert_clean(header, new_body)
    assert new_body.startswith(PREAMBLE) and new_body.endswith(EPILOGUE)
    assert SEVEN_BIT_PART in new_body
    decoded = [p.get_payload(decode=True) for p in leaves(parse(header, new_body))]
    assert decoded == [data for _, data in parts] + [b"seven bit   \r\n.\r\nend"]
