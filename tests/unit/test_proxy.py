"""Tests for submitd.smtp.proxy, the PROXY protocol header reader (v1 and v2).

Each good header is fed whole, byte by byte and with data after it, because the
transport sees all three: a balancer sends the header in one segment, a slow path may
split it anywhere, and a pipelining client's first command can share its segment. Each
malformed header is fed the same ways and must raise ProxyError, never anything else
and never a result, since the listener would then log an address the sender chose.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from submitd.smtp.proxy import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxiedAddress,
    ProxyError,
    ProxyHeaderReader,
)

SMTP = b"EHLO client.example.org\r\n"

LOCAL, PROXY = 0x20, 0x21
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM = 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32


# Header builders ---------------------------------------------------------------------


def v1(protocol: str, src: str, dst: str, sport: int | str, dport: int | str) -> bytes:
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2(
    command: int = PROXY,
    family: int = TCP4,
    src: str = "192.0.2.1",
    dst: str = "198.51.100.2",
    sport: int = 40000,
    dport: int = 587,
    tlvs: bytes = b"",
    *,
    block: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """A v2 header; `block` replaces the address block, `length` the declared length."""
    if block is None:
        if family in (TCP4, UDP4, TCP6, UDP6):
            block = (
                ipaddress.ip_address(src).packed
                + ipaddress.ip_address(dst).packed
                + struct.pack("!HH", sport, dport)
            )
        else:
            block = b""
    block += tlvs
    declared = len(block) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", declared) + block


# Feeding helpers -----------------------------------------------------------------------


def feed_whole(data: bytes) -> ProxyHeaderReader:
    reader = ProxyHeaderReader()
    assert reader.feed(data)
    return reader


def feed_bytewise(data: bytes) -> ProxyHeaderReader:
    """Feed one octet at a time; only the last one may complete the header."""
    reader = ProxyHeaderReader()
    for index in range(len(data)):
        complete = reader.feed(data[index : index + 1])
        assert complete == (index == len(data) - 1), index
        assert reader.done == complete
    return reader


def assert_rejected(data: bytes) -> None:
    """Malformed whichever way it arrives: whole, or octet by octet."""
    with pytest.raises(ProxyError):
        ProxyHeaderReader().feed(data)
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyError):  # the raise may come at any octet
        for index in range(len(data)):
            reader.feed(data[index : index + 1])
    assert reader.result is None
    assert not reader.done


# Version 1: good -----------------------------------------------------------------------

FFFF = ":".join(["ffff"] * 8)
TCP6_LONGEST = v1("TCP6", FFFF, FFFF, 65535, 65535)  # the spec's 104
UNKNOWN_LONGEST = f"PROXY UNKNOWN {FFFF} {FFFF} 65535 65535\r\n".encode()  # the spec's 107
UNKNOWN_108 = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"


def test_v1_longest_lines_are_exactly_the_spec_limits() -> None:
    assert len(TCP6_LONGEST) == 104
    assert len(UNKNOWN_LONGEST) == V1_MAX_LENGTH
    assert len(UNKNOWN_108) == V1_MAX_LENGTH + 1


V1_GOOD = [
    pytest.param(
        v1("TCP4", "192.0.2.1", "198.51.100.2", 40000, 587),
        ProxiedAddress("192.0.2.1", 40000, "198.51.100.2", 587),
        id="tcp4",
    ),
    pytest.param(
        v1("TCP4", "255.255.255.255", "255.255.255.255", 65535, 65535),
        ProxiedAddress("255.255.255.255", 65535, "255.255.255.255", 65535),
        id="tcp4-longest",
    ),
    pytest.param(
        v1("TCP4", "0.0.0.0", "10.0.0.1", 0, 0),
        ProxiedAddress("0.0.0.0", 0, "10.0.0.1", 0),
        id="tcp4-port-zero",
    ),
    pytest.param(
        v1("TCP6", "2001:db8::1", "2001:db8::2", 1234, 587),
        ProxiedAddress("2001:db8::1", 1234, "2001:db8::2", 587),
        id="tcp6",
    ),
    pytest.param(
        v1("TCP6", "2001:DB8:0:0:0:0:0:1", "::1", 1, 465),
        ProxiedAddress("2001:db8::1", 1, "::1", 465),
        id="tcp6-uppercase-uncompressed-normalized",
    ),
    pytest.param(TCP6_LONGEST, ProxiedAddress(FFFF, 65535, FFFF, 65535), id="tcp6-longest-104"),
    pytest.param(
        v1("TCP6", "::ffff:192.0.2.1", "::ffff:198.51.100.2", 5, 587),
        ProxiedAddress("192.0.2.1", 5, "198.51.100.2", 587),
        id="tcp6-v4-mapped-given-as-ipv4",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", None, id="unknown-short"),
    pytest.param(UNKNOWN_LONGEST, None, id="unknown-worst-case-107"),
    pytest.param(b"PROXY UNKNOWN anything at all \xff\r\n", None, id="unknown-rest-ignored"),
]


@pytest.mark.parametrize(("header", "expected"), V1_GOOD)
def test_v1_good_whole(header: bytes, expected: ProxiedAddress | None) -> None:
    assert len(header) <= V1_MAX_LENGTH
    reader = feed_whole(header)
    assert reader.result == expected
    assert reader.rest == b""


@pytest.mark.parametrize(("header", "expected"), V1_GOOD)
def test_v1_good_bytewise(header: bytes, expected: ProxiedAddress | None) -> None:
    reader = feed_bytewise(header)
    assert reader.result == expected
    assert reader.rest == b""


@pytest.mark.parametrize(("header", "expected"), V1_GOOD)
def test_v1_good_with_smtp_after(header: bytes, expected: ProxiedAddress | None) -> None:
    reader = feed_whole(header + SMTP + b"MAIL FROM:<a@b>\r\n")
    assert reader.result == expected
    assert reader.rest == SMTP + b"MAIL FROM:<a@b>\r\n"


# Version 1: malformed ------------------------------------------------------------------

GOOD_V1 = v1("TCP4", "192.0.2.1", "198.51.100.2", 40000, 587)

V1_BAD = [
    pytest.param(b"proxy TCP4 192.0.2.1 198.51.100.2 40000 587\r\n", id="lowercase-proxy"),
    pytest.param(b"PROXY tcp4 192.0.2.1 198.51.100.2 40000 587\r\n", id="lowercase-proto"),
    pytest.param(b"PROXY TCP5 192.0.2.1 198.51.100.2 40000 587\r\n", id="unknown-proto"),
    pytest.param(b"PROXY UDP4 192.0.2.1 198.51.100.2 40000 587\r\n", id="udp"),
    pytest.param(b"PROXY  TCP4 192.0.2.1 198.51.100.2 40000 587\r\n", id="double-space-1"),
    pytest.param(b"PROXY TCP4 192.0.2.1  198.51.100.2 40000 587\r\n", id="double-space-2"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 587 \r\n", id="trailing-space"),
    pytest.param(b"PROXY TCP4 192.0.2.1\t198.51.100.2 40000 587\r\n", id="tab"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000\r\n", id="five-fields"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 587 25\r\n", id="seven-fields"),
    pytest.param(b"PROXY TCP4\r\n", id="no-addresses"),
    pytest.param(b"PROXY\r\n", id="bare-proxy"),
    pytest.param(b"PROXY \r\n", id="proxy-space"),
    pytest.param(b"PROXY UNKNOWNX\r\n", id="unknown-glued"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 587\n", id="bare-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 587\r\r\n", id="cr-cr-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.1\r198.51.100.2 40000 587\r\n", id="bare-cr-inside"),
    pytest.param(b"PROXY TCP4 192.0.2.1\n198.51.100.2 40000 587\r\n", id="bare-lf-inside"),
    pytest.param(b"PROXY UNKNOWN \n\r\n", id="unknown-bare-lf"),
    pytest.param(v1("TCP4", "192.0.2.01", "198.51.100.2", 1, 2), id="ipv4-leading-zero"),
    pytest.param(v1("TCP4", "192.0.2", "198.51.100.2", 1, 2), id="ipv4-three-parts"),
    pytest.param(v1("TCP4", "192.0.2.256", "198.51.100.2", 1, 2), id="ipv4-256"),
    pytest.param(v1("TCP4", "192.0.2.1", "example.org", 1, 2), id="hostname"),
    pytest.param(v1("TCP4", "2001:db8::1", "198.51.100.2", 1, 2), id="ipv6-in-tcp4"),
    pytest.param(v1("TCP4", "192.0.2.1", "2001:db8::1", 1, 2), id="ipv6-dst-in-tcp4"),
    pytest.param(v1("TCP6", "192.0.2.1", "2001:db8::1", 1, 2), id="ipv4-in-tcp6"),
    pytest.param(v1("TCP6", "fe80::1%eth0", "2001:db8::1", 1, 2), id="zone-index"),
    pytest.param(v1("TCP6", "2001:db8:::1", "2001:db8::1", 1, 2), id="ipv6-triple-colon"),
    pytest.param(v1("TCP6", "1:2:3:4:5:6:7:8:9", "::1", 1, 2), id="ipv6-too-long"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", 65536, 587), id="sport-65536"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", 587, 65536), id="dport-65536"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", 99999, 587), id="port-99999"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", 100000, 587), id="port-six-digits"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "0587", 587), id="port-leading-zero"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "00", 587), id="port-00"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "-1", 587), id="port-negative"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "+1", 587), id="port-plus"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "1_0", 587), id="port-underscore"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "", 587), id="port-empty"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "0x1f", 587), id="port-hex"),
    pytest.param(v1("TCP4", "192.0.2.1", "198.51.100.2", "١٢", 587), id="port-arabic-digits"),
    pytest.param(v1("TCP4", "١.2.3.4", "198.51.100.2", 1, 2), id="ip-arabic-digit"),
    pytest.param(b"PROXY TCP4 " + b"1" * 200 + b"\r\n", id="oversize-v1"),
    pytest.param(UNKNOWN_108, id="unknown-108-octets"),
    pytest.param(b"XPROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n", id="garbage-before"),
    pytest.param(b" " + GOOD_V1, id="space-before"),
    pytest.param(b"\r\n" + GOOD_V1, id="crlf-before"),
    pytest.param(b"EHLO client.example.org\r\n", id="smtp-without-header"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-client-hello"),
    pytest.param(b"GET / HTTP/1.1\r\n", id="http"),
    pytest.param(b"PRO\x00XY TCP4\r\n", id="nul"),
]


@pytest.mark.parametrize("header", V1_BAD)
def test_v1_malformed(header: bytes) -> None:
    assert_rejected(header)


def test_v1_without_crlf_is_refused_at_octet_107() -> None:
    reader = ProxyHeaderReader()
    assert not reader.feed(b"PROXY UNKNOWN " + b"x" * 92)  # 106 octets: CRLF may still come
    with pytest.raises(ProxyError):
        reader.feed(b"x")


def test_v1_cr_at_octet_106_may_still_end_the_line() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    reader = ProxyHeaderReader()
    assert not reader.feed(line[:-1])
    assert reader.feed(line[-1:] + SMTP)
    assert reader.rest == SMTP


def test_garbage_refused_at_first_wrong_octet() -> None:
    """A client that bypassed the balancer is dropped at once, not after a timeout."""
    for first in (b"E", b"\x16", b"\x00", b" ", b"p"):
        with pytest.raises(ProxyError):
            ProxyHeaderReader().feed(first)
    reader = ProxyHeaderReader()
    assert not reader.feed(b"PRO")
    with pytest.raises(ProxyError):
        reader.feed(b"Z")


# Version 2: good -----------------------------------------------------------------------

V2_536 = v2(tlvs=tlv(0x04, b"\x00" * (V2_MAX_LENGTH - 16 - 12 - 3)))


def test_v2_longest_is_exactly_536_octets() -> None:
    assert len(V2_536) == V2_MAX_LENGTH


V2_GOOD = [
    pytest.param(v2(), ProxiedAddress("192.0.2.1", 40000, "198.51.100.2", 587), id="tcp4"),
    pytest.param(
        v2(family=TCP6, src="2001:db8::1", dst="2001:db8::2", sport=1, dport=465),
        ProxiedAddress("2001:db8::1", 1, "2001:db8::2", 465),
        id="tcp6",
    ),
    pytest.param(
        v2(family=TCP6, src="::ffff:192.0.2.1", dst="::1", sport=0, dport=65535),
        ProxiedAddress("192.0.2.1", 0, "::1", 65535),
        id="tcp6-v4-mapped-given-as-ipv4",
    ),
    pytest.param(
        v2(tlvs=tlv(0x01, b"smtp") + tlv(0x04, b"") + tlv(0x05, b"id" * 64) + tlv(0xE0, b"x")),
        ProxiedAddress("192.0.2.1", 40000, "198.51.100.2", 587),
        id="tcp4-tlvs-skipped",
    ),
    pytest.param(
        v2(family=TCP6, src="::1", dst="::2", tlvs=tlv(0x20, b"\x01\x00\x00\x00\x00")),
        ProxiedAddress("::1", 40000, "::2", 587),
        id="tcp6-ssl-tlv",
    ),
    pytest.param(v2(command=LOCAL, family=UNSPEC), None, id="local"),
    pytest.param(v2(command=LOCAL, family=TCP4), None, id="local-with-addresses-skipped"),
    pytest.param(v2(command=LOCAL, family=0xFF, block=b"\xff" * 40), None, id="local-any-family"),
    pytest.param(v2(command=LOCAL, family=UDP4), None, id="local-udp-family-ignored"),
    pytest.param(v2(command=PROXY, family=UNSPEC), None, id="proxy-unspec"),
    pytest.param(v2(family=UNSPEC, block=b"\x00" * 20), None, id="proxy-unspec-block-ignored"),
    pytest.param(V2_536, ProxiedAddress("192.0.2.1", 40000, "198.51.100.2", 587), id="exactly-536"),
]


@pytest.mark.parametrize(("header", "expected"), V2_GOOD)
def test_v2_good_whole(header: bytes, expected: ProxiedAddress | None) -> None:
    reader = feed_whole(header)
    assert reader.result == expected
    assert reader.rest == b""


@pytest.mark.parametrize(("header", "expected"), V2_GOOD)
def test_v2_good_bytewise(header: bytes, expected: ProxiedAddress | None) -> None:
    reader = feed_bytewise(header)
    assert reader.result == expected
    assert reader.rest == b""


@pytest.mark.parametrize(("header", "expected"), V2_GOOD)
def test_v2_good_with_smtp_after(header: bytes, expected: ProxiedAddress | None) -> None:
    reader = feed_whole(header + SMTP)
    assert reader.result == expected
    assert reader.rest == SMTP


def test_v2_never_reads_past_declared_length() -> None:
    """What follows the header, even another header, goes to the session untouched."""
    after = v2(src="203.0.113.9") + GOOD_V1 + b"\x00\xff" + SMTP
    reader = feed_whole(v2() + after)
    assert reader.result == ProxiedAddress("192.0.2.1", 40000, "198.51.100.2", 587)
    assert reader.rest == after


def test_feed_after_completion_appends_to_rest() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(v2() + b"EH")
    assert reader.feed(b"LO x\r\n")
    assert reader.rest == b"EHLO x\r\n"


def test_error_is_sticky() -> None:
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyError):
        reader.feed(b"EHLO")
    with pytest.raises(ProxyError):
        reader.feed(b"")
    with pytest.raises(ProxyError):
        reader.feed(GOOD_V1)
    assert reader.result is None
    assert not reader.done


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(GOOD_V1[:-1], id="v1-without-lf"),
        pytest.param(GOOD_V1[:-2], id="v1-without-crlf"),
        pytest.param(b"PROXY", id="v1-prefix"),
        pytest.param(v2()[:11], id="v2-signature-only"),
        pytest.param(v2()[:15], id="v2-without-length"),
        pytest.param(v2()[:-1], id="v2-address-block-short"),
        pytest.param(v2(tlvs=tlv(1, b"h2"))[:-1], id="v2-tlv-short"),
        pytest.param(b"", id="nothing"),
    ],
)
def test_truncated_header_is_never_complete(header: bytes) -> None:
    """A partial header gives no result; the caller's timeout or EOF closes it."""
    reader = ProxyHeaderReader()
    assert not reader.feed(header)
    assert not reader.done
    assert reader.result is None
    assert reader.rest == b""


# Version 2: malformed ------------------------------------------------------------------


def _bad_signatures() -> list[bytes]:
    headers = []
    for index in range(len(V2_SIGNATURE)):
        broken = bytearray(v2())
        broken[index] ^= 0x40
        headers.append(bytes(broken))
    return headers


V2_BAD = [
    *[pytest.param(h, id=f"signature-octet-{i}") for i, h in enumerate(_bad_signatures())],
    pytest.param(v2(command=0x11), id="version-1"),
    pytest.param(v2(command=0x31), id="version-3"),
    pytest.param(v2(command=0x01), id="version-0"),
    pytest.param(v2(command=0xF1), id="version-15"),
    pytest.param(v2(command=0x22), id="command-2"),
    pytest.param(v2(command=0x2F), id="command-15"),
    pytest.param(v2(family=UDP4), id="udp4"),
    pytest.param(v2(family=UDP6, src="::1", dst="::2"), id="udp6"),
    pytest.param(v2(family=UNIX_STREAM, block=b"/s".ljust(108, b"\0") * 2), id="unix-stream"),
    pytest.param(v2(family=UNIX_DGRAM, block=b"/s".ljust(108, b"\0") * 2), id="unix-dgram"),
    pytest.param(v2(family=0x13), id="unknown-protocol"),
    pytest.param(v2(family=0x41), id="unknown-family"),
    pytest.param(v2(family=0x10), id="inet-unspec-protocol"),
    pytest.param(v2(family=0x01), id="unspec-family-stream"),
    pytest.param(v2(block=b"\xc0\x00\x02\x01" * 2 + b"\x00\x01"), id="tcp4-block-short"),
    pytest.param(v2(block=b""), id="tcp4-block-empty"),
    pytest.param(v2(family=TCP6, block=b"\x00" * 35), id="tcp6-block-short"),
    pytest.param(v2(family=TCP6, block=b"\x00" * 12), id="tcp6-with-ipv4-block"),
    pytest.param(v2(tlvs=b"\x01"), id="tlv-one-octet"),
    pytest.param(v2(tlvs=b"\x01\x00"), id="tlv-two-octets"),
    pytest.param(v2(tlvs=b"\x01\x00\x05abcd"), id="tlv-overruns"),
    pytest.param(v2(tlvs=tlv(1, b"h2") + b"\x02\xff\xff"), id="second-tlv-overruns"),
    pytest.param(v2(length=V2_MAX_LENGTH - 16 + 1), id="declared-537"),
    pytest.param(v2(length=0xFFFF), id="declared-65535"),
    pytest.param(v2(command=LOCAL, family=UNSPEC, length=0xFFFF), id="local-declared-65535"),
    pytest.param(b"\x00" + v2(), id="garbage-before"),
    pytest.param(GOOD_V1[:3] + v2(), id="v1-start-then-v2"),
]


@pytest.mark.parametrize("header", V2_BAD)
def test_v2_malformed(header: bytes) -> None:
    assert_rejected(header + SMTP)


def test_v2_oversize_refused_when_length_arrives() -> None:
    """A declared length over the bound is refused before any of the block is buffered."""
    reader = ProxyHeaderReader()
    assert not reader.feed(v2(length=0xFFFF)[:15])
    with pytest.raises(ProxyError):
        reader.feed(b"\xff")


def test_v2_bad_version_refused_at_octet_13() -> None:
    reader = ProxyHeaderReader()
    assert not reader.feed(V2_SIGNATURE)
    with pytest.raises(ProxyError):
        reader.feed(b"\x10")


# Properties ----------------------------------------------------------------------------


@st.composite
def proxied(draw: st.DrawFn) -> ProxiedAddress:
    # Mapped IPv6 is left out: the reader gives it back as IPv4 (tested above).
    ipv6 = st.ip_addresses(v=6).filter(
        lambda a: isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is None
    )
    ips = draw(st.sampled_from([st.ip_addresses(v=4), ipv6]))
    ports = st.integers(0, 0xFFFF)
    return ProxiedAddress(str(draw(ips)), draw(ports), str(draw(ips)), draw(ports))


def _family(address: ProxiedAddress) -> int:
    return TCP4 if ipaddress.ip_address(address.client_ip).version == 4 else TCP6


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _feed_chunks(chunks: list[bytes]) -> ProxyHeaderReader:
    reader = ProxyHeaderReader()
    for chunk in chunks:
        reader.feed(chunk)
    return reader


tlv_lists = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(lambda t: tlv(*t)), max_size=8
).map(b"".join)


@given(proxied(), st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=6))
def test_round_trip_v1(address: ProxiedAddress, after: bytes, cuts: list[int]) -> None:
    protocol = "TCP4" if _family(address) == TCP4 else "TCP6"
    assert address.server_ip is not None
    assert address.server_port is not None
    header = v1(
        protocol, address.client_ip, address.server_ip, address.client_port, address.server_port
    )
    reader = _feed_chunks(_chunks(header + after, cuts))
    assert reader.done
    assert reader.result == address
    assert reader.rest == after


@given(proxied(), tlv_lists, st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=6))
def test_round_trip_v2(address: ProxiedAddress, tlvs: bytes, after: bytes, cuts: list[int]) -> None:
    assert address.server_ip is not None
    assert address.server_port is not None
    header = v2(
        PROXY,
        _family(address),
        address.client_ip,
        address.server_ip,
        address.client_port,
        address.server_port,
        tlvs,
    )
    reader = ProxyHeaderReader()
    try:
        for chunk in _chunks(header + after, cuts):
            reader.feed(chunk)
    except ProxyError:
        # Only a header that random TLVs pushed past 536 octets may be refused.
        assert len(header) > V2_MAX_LENGTH
        return
    assert len(header) <= V2_MAX_LENGTH
    assert reader.done
    assert reader.result == address
    assert reader.rest == after


def _outcome(chunks: list[bytes]) -> tuple[str, ProxiedAddress | None, bytes]:
    reader = ProxyHeaderReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
    except ProxyError:
        return ("error", None, b"")
    if not reader.done:
        return ("pending", None, b"")
    return ("done", reader.result, reader.rest)


# Random octets, plain and behind each header's opening, so that the search also
# reaches the deeper states (addresses, ports, families, lengths, TLVs).
noise = st.one_of(
    st.binary(max_size=700),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=120).map(lambda b: b"PROXY TCP4 " + b),
    st.binary(max_size=120).map(lambda b: b"PROXY TCP6 " + b),
    st.binary(max_size=600).map(lambda b: V2_SIGNATURE + b),
    st.binary(min_size=2, max_size=600).map(lambda b: V2_SIGNATURE + b"\x21" + b),
    st.binary(max_size=100).map(lambda b: V2_SIGNATURE + b"\x21\x11\x00\x0c" + b),
)


@given(noise, st.lists(st.integers(0, 1000), max_size=8))
def test_random_octets_only_ever_raise_proxy_error(data: bytes, cuts: list[int]) -> None:
    """No input crashes the reader, and splitting it never changes the outcome."""
    whole = _outcome([data])
    assert _outcome(_chunks(data, cuts)) == whole
    assert _outcome([data[i : i + 1] for i in range(len(data))]) == whole
    if whole[0] == "done":
        assert data.endswith(whole[2])
        assert len(data) - len(whole[2]) <= V2_MAX_LENGTH
    if whole[0] == "pending":
        assert len(data) < V2_MAX_LENGTH
