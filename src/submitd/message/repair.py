"""Repairing a 7BIT submission that carries 8-bit octets (RFC 6409 8.4).

A client that gives no ``BODY=8BITMIME`` promises a 7-bit message (RFC 6152). When it
breaks that promise the default is to refuse with 554 5.6.0; a site may instead apply
MIME transfer encoding, which RFC 6409 8.4 allows "if needed and not harmful to the MIME
type". :func:`repair_8bit` does exactly that and nothing more:

* every leaf part whose content has octets above 127 (or a line over 998 octets) is
  encoded: ``text/*`` with quoted-printable (RFC 2045 6.7), which keeps it readable, all
  else with base64 (RFC 2045 6.8); its Content-Transfer-Encoding field is replaced;
* ``multipart/*`` is walked by splitting on its own delimiter lines (RFC 2046 5.1.1), so
  the preamble, the epilogue, the delimiters and every part that needs no change are
  passed through byte for byte; nothing is re-serialised, because re-serialising would
  refold headers and break the client's DKIM signature;
* ``message/rfc822`` may only be 7bit, 8bit or binary (RFC 2046 5.2.1), so it cannot be
  base64-encoded: the embedded message is repaired recursively instead;
* a message (or part) without a Content-Type is text/plain (RFC 2045 5.2) but its
  implied charset, us-ascii, is wrong for 8-bit text, so it is labelled ``charset=utf-8``
  when the text is valid UTF-8 and ``charset=unknown-8bit`` (RFC 1428) otherwise.

Fields are added or replaced at the *top* of a header, and a replaced field is removed
from where it was, as everywhere else in submitd (DESIGN principle 4).

What is refused (:class:`RepairImpossible`, the caller answers 554 5.6.0), following the
RFC 6409 8 note to limit changes to "specific problems that have clear solutions":

* 8-bit octets in any header section: transfer encoding covers bodies only;
* 8-bit octets in a part that already claims base64, quoted-printable or an unknown
  encoding: the part is malformed and re-encoding its raw bytes would deliver the
  sender's broken encoding as if it were the content, so there is no clear repair;
* 8-bit octets in a composite other than multipart/* and message/rfc822, or in a
  multipart without a boundary: these must not be encoded (RFC 2045 6.4, RFC 2046 5.2).

Pure: bytes in, bytes or :class:`RepairImpossible` out.
"""

from __future__ import annotations

import base64
import email
import email.message
import re
from dataclasses import dataclass

__all__ = ["RepairImpossible", "needs_repair", "repair_8bit"]

CRLF = b"\r\n"
MAX_LINE = 998  # octets, without CRLF (RFC 5321 4.5.3.1.6, RFC 2045 2.7)
QP_MAX = 76  # encoded characters per line (RFC 2045 6.7 rule 5)
B64_LINE = 57  # input octets per base64 line: 57 * 4 / 3 = 76 characters (RFC 2045 6.8)
IDENTITY_CTES = frozenset({"7bit", "8bit", "binary"})
_QP_LITERAL = frozenset(range(33, 127)) - {ord("=")}
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


class RepairImpossible(Exception):
    """The message cannot be made 7-bit by transfer encoding; reject with 554 5.6.0."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Entity:
    """A header section and body as they were received (header lines end in CRLF)."""

    header: bytes
    body: bytes

    def to_bytes(self) -> bytes:
        return self.header + CRLF + self.body


def repair_8bit(header: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Return ``(header, body)`` transfer-encoded so that the message is 7-bit.

    ``header`` is the header section (CRLF-terminated lines, no blank line) and ``body``
    everything after the blank line. A message that is already 7-bit comes back
    unchanged. Raises :class:`RepairImpossible` when no transfer encoding can help.
    """
    repaired = _repair_message(_Entity(header, body), where="")
    if needs_repair(repaired.body):
        # Only reachable through octets we keep verbatim by design; never send them on.
        raise RepairImpossible("8-bit data outside any MIME part body")
    return repaired.header, repaired.body


def needs_repair(data: bytes) -> bool:
    """True if ``data`` has an octet above 127 or a line longer than 998 octets."""
    if not data.isascii():
        return True
    return any(len(line) > MAX_LINE for line in data.split(CRLF))


# --- messages and parts -------------------------------------------------------------


def _repair_message(entity: _Entity, where: str) -> _Entity:
    """Repair a whole message: the top level, or one inside message/rfc822.

    A message without Content-Type gets the three MIME fields (RFC 2045 4, 5.2); one
    with a Content-Type but no MIME-Version gets MIME-Version, since the
    Content-Transfer-Encoding we add means nothing outside MIME.
    """
    _check_header(entity.header, where)
    if not needs_repair(entity.body):
        return entity
    fields = _read_fields(entity.header)
    if fields.get("content-type") is None:
        repaired = _repair_untyped(entity, mime_version="mime-version" not in fields)
    else:
        repaired = _repair_entity(entity, _parse_type(entity.header), where)
        if "mime-version" not in fields:
            repaired = _Entity(b"MIME-Version: 1.0" + CRLF + repaired.header, repaired.body)
    if entity.body.endswith(CRLF) and not repaired.body.endswith(CRLF):
        # A message body keeps ending in a line break (base64 output does not).
        repaired = _Entity(repaired.header, repaired.body + CRLF)
    return repaired


def _repair_untyped(entity: _Entity, *, mime_version: bool) -> _Entity:
    """Label untyped 8-bit text as text/plain with a truthful charset and encode it as QP."""
    _check_cte(_cte(_parse_type(entity.header)))
    charset = _guess_charset(entity.body)
    fields = [(b"Content-Type", b"text/plain; charset=" + charset)]
    fields.append((b"Content-Transfer-Encoding", b"quoted-printable"))
    if mime_version:
        fields.insert(0, (b"MIME-Version", b"1.0"))
    header = _replace_fields(entity.header, fields)
    return _Entity(header, qp_encode(entity.body))


def _guess_charset(data: bytes) -> bytes:
    """utf-8 if the octets are valid UTF-8, else RFC 1428's unknown-8bit."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return b"unknown-8bit"
    return b"utf-8"


def _repair_entity(entity: _Entity, parsed: email.message.Message, where: str) -> _Entity:
    """Repair one MIME entity whose header has already been checked to be 7-bit."""
    if not needs_repair(entity.body):
        return entity
    ctype = parsed.get_content_type()
    maintype = parsed.get_content_maintype()
    if maintype == "multipart":
        return _relabel_composite(_repair_multipart(entity, parsed, where), parsed, ctype)
    if ctype == "message/rfc822":
        inner = _repair_message(_split_entity(entity.body), where=f"{where}message/rfc822 ")
        return _relabel_composite(_Entity(entity.header, inner.to_bytes()), parsed, ctype)
    if maintype == "message" and ctype != "message/global":
        raise RepairImpossible(f"8-bit data in a {ctype} part, which cannot be encoded")
    return _encode_leaf(entity, parsed, text=maintype == "text")


def _encode_leaf(entity: _Entity, parsed: email.message.Message, *, text: bool) -> _Entity:
    """Transfer-encode a discrete part: QP for text (RFC 2045 6.7), base64 for the rest."""
    _check_cte(_cte(parsed))
    if text:
        return _Entity(
            _replace_fields(entity.header, [(b"Content-Transfer-Encoding", b"quoted-printable")]),
            qp_encode(entity.body),
        )
    return _Entity(
        _replace_fields(entity.header, [(b"Content-Transfer-Encoding", b"base64")]),
        base64_encode(entity.body),
    )


def _check_cte(cte: str | None) -> None:
    """8-bit octets under base64/QP/unknown: malformed, with no clear repair (see above)."""
    if cte is not None and cte not in IDENTITY_CTES:
        raise RepairImpossible(f"8-bit data in a part declared Content-Transfer-Encoding: {cte}")


def _relabel_composite(entity: _Entity, parsed: email.message.Message, ctype: str) -> _Entity:
    """A composite must be 7bit, 8bit or binary (RFC 2045 6.4); now it is 7bit, say so."""
    cte = _cte(parsed)
    if cte is None or cte == "7bit":
        return entity
    if cte not in IDENTITY_CTES:
        raise RepairImpossible(f"{ctype} part declared Content-Transfer-Encoding: {cte}")
    header = _replace_fields(entity.header, [(b"Content-Transfer-Encoding", b"7bit")])
    return _Entity(header, entity.body)


# --- multipart (RFC 2046 5.1.1) ------------------------------------------------------


def _repair_multipart(entity: _Entity, parsed: email.message.Message, where: str) -> _Entity:
    """Repair each body part between the delimiter lines, keeping every other octet."""
    boundary = parsed.get_boundary()
    if not boundary:
        raise RepairImpossible(f"8-bit data in a {parsed.get_content_type()} without boundary")
    digest = parsed.get_content_type() == "multipart/digest"
    delimiter = boundary.encode("ascii", "replace")
    pieces = _split_multipart(entity.body, delimiter)
    out = pieces[:]  # [preamble, delimiter, chunk, ..., delimiter, chunk or epilogue]
    if needs_repair(pieces[0]) or (
        len(pieces) > 1 and _is_close(pieces[-2], delimiter) and needs_repair(pieces[-1])
    ):
        raise RepairImpossible(
            f"8-bit data in the preamble or epilogue of {where or 'the '}"
            f"{parsed.get_content_type()}"
        )
    for index in range(2, len(pieces), 2):
        if not _is_close(pieces[index - 1], delimiter):
            out[index] = _repair_chunk(pieces[index], digest, where)
    return _Entity(entity.header, b"".join(out))


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """Split ``body`` into [preamble, delimiter, chunk, delimiter, chunk, ...].

    Joining the list gives back ``body``. Each chunk ends with the CRLF that belongs to
    the following delimiter (RFC 2046 5.1.1), if there is one; the last chunk is the
    epilogue when the last delimiter is the close-delimiter.
    """
    pattern = re.compile(rb"^--" + re.escape(boundary) + rb"(?:--)?[ \t]*(?:\r\n|\Z)", re.MULTILINE)
    pieces: list[bytes] = []
    start = 0
    for match in pattern.finditer(body):
        if match.start() and not body.endswith(CRLF, 0, match.start()):
            continue  # a bare LF before it: not a line start in CRLF terms
        pieces += [body[start : match.start()], match.group()]
        start = match.end()
        if _is_close(match.group(), boundary):
            break
    pieces.append(body[start:])
    return pieces


def _is_close(delimiter: bytes, boundary: bytes) -> bool:
    """True for the close-delimiter ``--boundary--`` (with optional padding)."""
    return delimiter.rstrip(b" \t\r\n") == b"--" + boundary + b"--"


def _repair_chunk(chunk: bytes, digest: bool, where: str) -> bytes:
    """Repair one body part; the CRLF before the next delimiter stays outside it."""
    content, tail = (chunk[:-2], CRLF) if chunk.endswith(CRLF) else (chunk, b"")
    part = _split_entity(content)
    _check_header(part.header, f"{where}body part ")
    if not needs_repair(part.body):
        return chunk
    fields = _read_fields(part.header)
    if fields.get("content-type") is None and not digest:
        repaired = _repair_untyped(part, mime_version=False)
    else:
        parsed = _parse_type(part.header, "message/rfc822" if digest else "text/plain")
        repaired = _repair_entity(part, parsed, where)
    return repaired.to_bytes() + tail


def _split_entity(data: bytes) -> _Entity:
    """Split at the first empty line; with none, everything is header (RFC 2046 5.1.1)."""
    if data.startswith(CRLF):
        return _Entity(b"", data[2:])
    end = data.find(CRLF + CRLF)
    if end < 0:
        return _Entity(data, b"")
    return _Entity(data[: end + 2], data[end + 4 :])


# --- header sections ----------------------------------------------------------------


def _check_header(header: bytes, where: str) -> None:
    """Refuse 8-bit header octets: no transfer encoding applies to a header section."""
    for field in _fields(header):
        if not field.isascii():
            match = _FIELD_NAME.match(field)
            name = match.group(1).decode("ascii") if match else repr(field[:20])
            raise RepairImpossible(f"8-bit data in {where}header field {name}")


def _fields(header: bytes) -> list[bytes]:
    """The header's fields, each with its continuation lines and final CRLF."""
    out: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if out and line[:1] in b" \t":
            out[-1] += line
        else:
            out.append(line)
    return out


def _field_name(field: bytes) -> str | None:
    match = _FIELD_NAME.match(field)
    return match.group(1).decode("ascii").lower() if match else None


def _read_fields(header: bytes) -> dict[str, bytes]:
    """Field name (lower case) to the first such field, for presence tests."""
    out: dict[str, bytes] = {}
    for field in _fields(header):
        name = _field_name(field)
        if name is not None:
            out.setdefault(name, field)
    return out


def _replace_fields(header: bytes, new: list[tuple[bytes, bytes]]) -> bytes:
    """Remove every field named in ``new`` and write ``new`` at the top, in order."""
    names = {name.decode("ascii").lower() for name, _ in new}
    kept = [field for field in _fields(header) if _field_name(field) not in names]
    added = [name + b": " + value + CRLF for name, value in new]
    return b"".join(added + kept)


def _parse_type(header: bytes, default: str = "text/plain") -> email.message.Message:
    """Let the email package READ Content-Type and its parameters; it writes nothing."""
    parsed = email.message_from_bytes(header + CRLF)
    parsed.set_default_type(default)
    return parsed


def _cte(parsed: email.message.Message) -> str | None:
    value = parsed.get("Content-Transfer-Encoding")
    return None if value is None else str(value).strip().lower()


# --- encoders -----------------------------------------------------------------------


def qp_encode(data: bytes) -> bytes:
    """Quoted-printable per RFC 2045 6.7, with CRLF line breaks and lines of <= 76.

    CRLF in ``data`` is a line break and becomes a hard break; a bare CR or LF is data
    and becomes ``=0D``/``=0A`` so that decoding gives back the very same octets. Space
    and tab at the end of an encoded line are encoded (rule 3), because transports may
    strip trailing white space.
    """
    return CRLF.join(_qp_line(line) for line in data.split(CRLF))


def _qp_line(line: bytes) -> bytes:
    """Encode one line, adding ``=`` soft breaks so that no line exceeds 76 characters."""
    tokens = [
        bytes([octet]) if octet in _QP_LITERAL or octet in b" \t" else b"=%02X" % octet
        for octet in line
    ]
    if tokens and tokens[-1] in (b" ", b"\t"):
        tokens[-1] = b"=%02X" % tokens[-1][0]
    out: list[bytes] = []
    current = b""
    for token in tokens:
        if len(current) + len(token) > QP_MAX - 1:  # room for the soft break's "="
            out.append(current + b"=")
            current = b""
        current += token
    out.append(current)
    return CRLF.join(out)


def base64_encode(data: bytes) -> bytes:
    """Base64 per RFC 2045 6.8 in 76-character lines joined by CRLF, no final CRLF."""
    lines = (base64.b64encode(data[i : i + B64_LINE]) for i in range(0, len(data), B64_LINE))
    return CRLF.join(lines)
