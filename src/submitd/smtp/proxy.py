"""Sans-I/O reader for the PROXY protocol header (HAProxy's spec, versions 1 and 2).

Behind a TCP load balancer every connection comes from the balancer, so the address the
policy code sees (rate limits per client, logs, the Received: header) would be the
balancer's. The PROXY protocol puts the real client's address in a short header that
the balancer sends before any other octet; this module reads that header and nothing
else. It does no I/O: the transport feeds it octets, and once the header is complete it
takes `result` (the client's address) and `rest` (the octets after the header, which
belong to the SMTP session) and hands them on.

Why it is strict. The spec (doc/proxy-protocol.txt in HAProxy) says a receiver must not
guess whether the header is there and must drop any connection whose header does not
match exactly: a listener that takes the header is only ever reached through the
balancer, and a header that is off in any way is either a misconfiguration or someone
trying to choose the address we log. So anything malformed raises `ProxyError` and the
caller closes the connection without a reply (SMTP's greeting has not been sent yet;
the server speaks first, and the spec forbids speaking before the header is in).

What is accepted:

* Version 1, one line of US-ASCII ended by CRLF, at most 107 octets with the CRLF:
  ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` with single spaces, addresses of
  the named family in the textual forms `ipaddress` reads (IPv4 without leading zeros,
  IPv6 without a zone index), ports decimal in 0..65535 without leading zeros. ``PROXY
  UNKNOWN`` may be followed by anything up to the CRLF, which the spec says to ignore; it
  means "use the real peer address" (`result` is None). A lone CR or LF is malformed.
* Version 2, the binary form: the 12-octet signature, version 2 with command LOCAL
  (0x20: the balancer's own health check; `result` is None and the family and address
  block are skipped) or PROXY (0x21), family and protocol TCP over IPv4 (0x11), TCP over
  IPv6 (0x21) or UNSPEC (0x00, `result` None), a 16-bit length and that many octets of
  addresses and TLVs. The TLVs are checked for framing (each one must fit inside the
  declared length) and otherwise skipped: nothing in submitd uses them, and PP2_CRC32C is
  not verified (the spec lets a receiver that does not support it skip it).
* UDP (0x12, 0x22) and UNIX sockets (0x31, 0x32) are refused with the PROXY command: an
  SMTP submission client is a TCP client with an IP address, so a header that says
  otherwise means the balancer is wired to the wrong listener, and there is no address
  we could use for policy. (The spec allows refusing families a receiver does not
  support.)

Bounds. The whole header must fit in 536 octets (the smallest TCP segment every host
must accept, which is why the spec chose it), version 1 in 107. The limits are checked as
octets arrive, and a v2 header that declares a longer length is refused as soon as the
length is read, so a peer cannot make the reader buffer more than that. The reader never
looks past the declared length: whatever follows goes to `rest` untouched, because a
pipelining client's first command may arrive in the same segment as the header.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

__all__ = [
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxiedAddress",
    "ProxyError",
    "ProxyHeaderReader",
]

#: The 12-octet signature that opens a version 2 header. It holds a NUL and CRLFs so
#: that no text protocol, and no version 1 reader, can take it for its own.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest version 1 line the spec allows, CRLF included ("PROXY UNKNOWN" with two
#: full-length IPv6 addresses and two five-digit ports).
V1_MAX_LENGTH = 107
#: Longest header we accept in either version: the spec's 536-octet minimum segment.
V2_MAX_LENGTH = 536

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16  # signature, version/command, family/protocol, 16-bit length

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1

_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_UDP4 = 0x12
_FAM_TCP6 = 0x21
_FAM_UDP6 = 0x22
_FAM_UNIX_STREAM = 0x31
_FAM_UNIX_DGRAM = 0x32

# Decimal, no leading zero (the spec forbids them so that no one reads a port as octal).
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True, slots=True)
class ProxiedAddress:
    """The connection as the balancer saw it: the client's end and the balancer's own.

    Addresses are in `ipaddress`'s normal form (IPv6 compressed, lower case). An
    IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a balancer listening on a
    dual-stack socket sends in a TCP6 header for an IPv4 client) is given as the plain
    IPv4 address: the client is an IPv4 client, per-address policy and logs should see
    one spelling for it, and `ipaddress` itself prints mapped addresses differently
    across Python versions.

    `server_ip` and `server_port` are the address the client connected to on the
    balancer; they are None only where no address was sent, which the reader reports
    as a `result` of None anyway, so they are optional for callers that build this
    from other sources.
    """

    client_ip: str
    client_port: int
    server_ip: str | None
    server_port: int | None


class ProxyError(Exception):
    """The header is malformed, too long, or of a kind we refuse.

    The caller closes the connection without a reply: the spec says to abort at once so
    the sender notices, and there is nobody trustworthy to reply to.
    """


class ProxyHeaderReader:
    """Feed bytes until the header is complete; then `result` and `rest`.

    `rest` holds the octets after the header, to hand to the SMTP session. `result` is
    None for a v2 LOCAL or UNSPEC header or a v1 UNKNOWN line: use the real peer
    address then.

    Octets are checked as they come, so garbage (a client that reached the listener
    without the balancer, a TLS ClientHello, an SMTP command) is refused at its first
    wrong octet instead of after a timeout. Once the header is complete, further
    `feed` calls append to `rest` and return True; once `ProxyError` has been raised,
    every later `feed` raises it again.
    """

    __slots__ = ("_buffer", "_done", "_error", "rest", "result")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False
        self._error: str | None = None
        self.result: ProxiedAddress | None = None
        self.rest: bytes = b""

    @property
    def done(self) -> bool:
        """True once the whole header has been read."""
        return self._done

    def feed(self, data: bytes) -> bool:
        """Take the next octets; True when the header is complete.

        Raises `ProxyError` on malformed input, and when more than 536 octets (107 for
        version 1) have arrived without a complete header.
        """
        if self._error is not None:
            raise ProxyError(self._error)
        if self._done:
            self.rest += data
            return True
        self._buffer += data
        try:
            return self._parse()
        except ProxyError as error:
            self._error = str(error)
            self._buffer.clear()
            raise

    def _parse(self) -> bool:
        buffer = self._buffer
        if not buffer:
            return False
        if buffer[0] == V2_SIGNATURE[0]:
            return self._parse_v2()
        if buffer[0] == _V1_PREFIX[0]:
            return self._parse_v1()
        raise ProxyError("not a PROXY protocol header")

    def _finish(self, length: int, result: ProxiedAddress | None) -> bool:
        self.result = result
        self.rest = bytes(self._buffer[length:])
        self._buffer.clear()
        self._done = True
        return True

    # Version 1 ------------------------------------------------------------------

    def _parse_v1(self) -> bool:
        buffer = self._buffer
        seen = min(len(buffer), len(_V1_PREFIX))
        if buffer[:seen] != _V1_PREFIX[:seen]:
            raise ProxyError("not a PROXY protocol header")
        window = bytes(buffer[:V1_MAX_LENGTH])
        newline = window.find(b"\n")
        if newline < 0:
            # A CR is fine only as the last octet so far, where its LF may still come.
            carriage = window.find(b"\r")
            if carriage >= 0 and carriage != len(window) - 1:
                raise ProxyError("PROXY v1 line has a CR without LF")
            if len(window) >= V1_MAX_LENGTH:
                raise ProxyError("PROXY v1 line longer than 107 octets")
            return False
        if newline == 0 or window[newline - 1] != 0x0D or b"\r" in window[: newline - 1]:
            raise ProxyError("PROXY v1 line not ended by CRLF")
        result = _parse_v1_line(window[: newline - 1])
        return self._finish(newline + 1, result)

    # Version 2 ------------------------------------------------------------------

    def _parse_v2(self) -> bool:
        buffer = self._buffer
        seen = min(len(buffer), len(V2_SIGNATURE))
        if buffer[:seen] != V2_SIGNATURE[:seen]:
            raise ProxyError("not a PROXY protocol header")
        if len(buffer) > 12:
            version, command = buffer[12] >> 4, buffer[12] & 0x0F
            if version != 2:
                raise ProxyError(f"PROXY v2 header with version {version}")
            if command not in (_CMD_LOCAL, _CMD_PROXY):
                raise ProxyError(f"PROXY v2 header with unknown command {command:#x}")
        if len(buffer) > 13 and buffer[12] & 0x0F == _CMD_PROXY:
            _check_family(buffer[13])
        if len(buffer) < _V2_FIXED:
            return False
        (declared,) = struct.unpack_from("!H", buffer, 14)
        total = _V2_FIXED + declared
        if total > V2_MAX_LENGTH:
            raise ProxyError(f"PROXY v2 header of {total} octets, more than {V2_MAX_LENGTH}")
        if len(buffer) < total:
            return False
        block = bytes(buffer[_V2_FIXED:total])
        if buffer[12] & 0x0F == _CMD_LOCAL:
            # The balancer's own connection: the spec says to discard the whole block,
            # family included, and use the real endpoints.
            return self._finish(total, None)
        return self._finish(total, _parse_v2_block(buffer[13], block))


def _parse_v1_line(line: bytes) -> ProxiedAddress | None:
    """One v1 line without its CRLF, already known to start with "PROXY "."""
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # The spec: "the receiver must ignore anything presented before the CRLF".
        return None
    parts = line.split(b" ")
    if len(parts) != 6:
        raise ProxyError("PROXY v1 line needs six fields separated by single spaces")
    _, protocol, source, destination, source_port, destination_port = parts
    if protocol == b"TCP4":
        version = 4
    elif protocol == b"TCP6":
        version = 6
    else:
        raise ProxyError("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN")
    return ProxiedAddress(
        client_ip=_v1_address(source, version),
        client_port=_v1_port(source_port),
        server_ip=_v1_address(destination, version),
        server_port=_v1_port(destination_port),
    )


def _v1_address(field: bytes, version: int) -> str:
    try:
        text = field.decode("ascii")
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
        )
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"PROXY v1 address is not IPv{version}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ProxyError("PROXY v1 address has a zone index")
    return _text(address)


def _v1_port(field: bytes) -> int:
    if _V1_PORT.fullmatch(field) is None:
        raise ProxyError("PROXY v1 port is not a decimal number without leading zeros")
    port = int(field)
    if port > 0xFFFF:
        raise ProxyError("PROXY v1 port out of range")
    return port


def _check_family(family: int) -> None:
    """Refuse, as soon as the octet is in, a family we will not take with PROXY."""
    if family in (_FAM_TCP4, _FAM_TCP6, _FAM_UNSPEC):
        return
    if family in (_FAM_UDP4, _FAM_UDP6):
        raise ProxyError("PROXY v2 header for UDP on an SMTP listener")
    if family in (_FAM_UNIX_STREAM, _FAM_UNIX_DGRAM):
        raise ProxyError("PROXY v2 header for a UNIX socket on an SMTP listener")
    raise ProxyError(f"PROXY v2 header with unknown family/protocol {family:#04x}")


def _parse_v2_block(family: int, block: bytes) -> ProxiedAddress | None:
    """The address block and TLVs of a v2 PROXY command (family already checked)."""
    if family == _FAM_UNSPEC:
        # Unknown origin: the spec lets us accept it and use the real endpoints. The
        # block is not read at all, as the spec asks ("should ignore address
        # information").
        return None
    size = 4 if family == _FAM_TCP4 else 16
    needed = 2 * size + 4
    if len(block) < needed:
        raise ProxyError("PROXY v2 address block shorter than its family needs")
    source, destination = block[:size], block[size : 2 * size]
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    _check_tlvs(block[needed:])
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    return ProxiedAddress(
        client_ip=_text(make(source)),
        client_port=source_port,
        server_ip=_text(make(destination)),
        server_port=destination_port,
    )


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Normal form, with IPv4-mapped IPv6 given as IPv4 (see `ProxiedAddress`)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _check_tlvs(tlvs: bytes) -> None:
    """Walk the TLVs: each must fit inside the declared length; their values are skipped.

    A TLV that runs past the end means the header was cut or built wrong, and the
    octets after it could be TLV or SMTP: refusing is the only safe reading.
    """
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyError("PROXY v2 TLV cut short")
        (length,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += 3 + length
        if offset > len(tlvs):
            raise ProxyError("PROXY v2 TLV longer than the header")
