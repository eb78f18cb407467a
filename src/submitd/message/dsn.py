"""Delivery status notifications: the report sent back to the sender (RFC 3464, RFC 3461).

Pure: the envelope, the per-recipient results, the original message and the clock come
in; the DSN comes out as bytes, ready to be queued from the null reverse-path ``<>``
(RFC 3461 6.2, RFC 5321 4.5.5) to ``envelope.sender``. Nothing here reads the queue or
the clock, so every rule can be tested from values.

The message is a ``multipart/report; report-type=delivery-status`` (RFC 6522) of three
parts: a text for people, the machine-readable ``message/delivery-status`` (RFC 3464 2),
and the original message or its header section (RFC 3461 4.3, RET).

Decisions worth knowing:

* RET applies to *failed* DSNs only (RFC 3461 4.3: "be included in any failed DSN").
  A DSN that reports only delays or successes carries the header section, whatever RET
  says; one that reports a failure carries the whole message unless RET=HDRS.
* The whole message is returned only if it is valid ``8bit`` MIME data (RFC 2045 2.8: no
  NUL, no bare CR or LF, no line over 998 octets). A BINARYMIME original that is not
  gets its header section instead, so the DSN never needs BINARYMIME itself; the text
  part says so, as it does when the caller passed no original (too large to return).
* For an SMTPUTF8 original the global types of RFC 6533 are used
  (``message/global-delivery-status``, ``message/global``, ``message/global-headers``),
  and addresses and diagnostics keep their UTF-8. Otherwise everything this module writes
  is ASCII: a non-ASCII address becomes ``utf-8; `` with ``\\x{HEX}`` escapes (RFC 6533 3,
  utf-8-addr-xtext), other non-ASCII text is escaped the same way.
* 8-bit octets can still come with the returned original; :class:`Dsn` says so
  (``eight_bit``: queue it with BODY=8BITMIME, RFC 6152) and whether the DSN's own header
  needs SMTPUTF8 (``smtputf8``: a UTF-8 sender address, RFC 6531).
* Values that come from outside (the remote reply, addresses, ENVID, ORCPT, host names)
  lose their control characters (CR and LF above all) before they are written, and every
  field is folded at spaces to 78 characters where it can be, never past 998 octets
  (RFC 5322 2.1.1, 2.2.3): no value can start a header line of its own.
* The boundary and the Message-ID are derived from the inputs (a hash), not drawn at
  random: the same inputs give the same bytes, and the boundary is checked against every
  part's content (RFC 2046 5.1.1).
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from submitd.envelope import Envelope, Recipient

__all__ = [
    "ACTIONS",
    "Dsn",
    "RecipientReport",
    "build_dsn",
    "should_notify",
    "xtext_encode",
]

# RFC 3464 2.3.3: the values of the Action field.
ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})

MAX_LINE = 998  # octets without CRLF (RFC 5322 2.1.1, RFC 2045 2.8)
FOLD_AT = 78  # characters, the SHOULD of RFC 5322 2.1.1
TEXT_WIDTH = 76  # the human-readable part, leaving room for quoting in replies
# An unbreakable word is cut into pieces of at most this many octets, so that a
# continuation line (one space, the piece) never exceeds MAX_LINE.
_MAX_PIECE = 900

# RFC 3463 2: status-code = class "." subject "." detail, class 2, 4 or 5.
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# An SMTP reply starts with a three-digit code (RFC 5321 4.2); anything else is our own.
_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")
# C0, DEL and C1 controls: never written into a field, CR and LF least of all.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 2045 2.8, what "8bit" data may not contain: a line over 998 octets, a bare CR or
# LF, a NUL.
_NOT_8BIT = re.compile(rb"[^\r\n]{999}|\r(?!\n)|(?<!\r)\n|\x00")

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient, as the scheduler decided it."""

    recipient: Recipient  # address, notify, orcpt ("rfc822;addr" or another type)
    action: str  # one of ACTIONS (RFC 3464 2.3.3)
    status: str  # RFC 3463 code, "5.1.1"
    diagnostic: str | None = None  # the remote reply ("550 5.1.1 no such user") or ours
    remote_mta: str | None = None  # the host that answered, "mx.example.net"
    last_attempt: float | None = None  # unix time
    will_retry_until: float | None = None  # unix time; written for "delayed" only


@dataclass(frozen=True, slots=True)
class Dsn:
    """The notification and what its transport needs.

    ``eight_bit``: the message has octets above 127 (from the returned original, or UTF-8
    text in a global DSN); queue it with BODY=8BITMIME (RFC 6152), or it has to be
    downgraded. ``smtputf8``: its own header has UTF-8 (a non-ASCII sender address), so
    it must be sent with SMTPUTF8 (RFC 6531 3.4).
    """

    message: bytes
    eight_bit: bool
    smtputf8: bool
    message_id: str  # with the angle brackets, for logs


@dataclass(frozen=True, slots=True)
class _Returned:
    """The third part as chosen: its kind, its content, and a sentence for people."""

    kind: str  # "full" or "headers"
    content: bytes
    note: str | None


def should_notify(envelope: Envelope, recipient: Recipient, action: str) -> bool:
    """Whether the sender asked for (or by default gets) a DSN for this outcome.

    RFC 3461 4.1: NOTIFY=NEVER asks for none; otherwise the DSN is sent when NOTIFY names
    the event. Without NOTIFY the MTA chooses: failures and delays, as RFC 3461 4.1
    suggests ("NOTIFY=FAILURE" or "NOTIFY=FAILURE,DELAY"). "relayed" and "expanded"
    answer a SUCCESS request (RFC 3461 5.2.2, 6.2). Nothing is ever sent to ``<>``
    (RFC 5321 4.5.5), which is what stops notification loops.
    """
    if not envelope.sender:
        return False
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    notify = recipient.notify or ("FAILURE", "DELAY")
    wanted = {"failed": "FAILURE", "delayed": "DELAY"}.get(action, "SUCCESS")
    return wanted in notify


def build_dsn(
    *,
    reporting_mta: str,
    postmaster: str,
    envelope: Envelope,
    queue_id: str,
    arrival: float,
    now: float,
    reports: Sequence[RecipientReport],
    original_header: bytes,
    original: Iterable[bytes] | None,
    message_id_domain: str,
) -> Dsn:
    """The DSN for ``reports``, to be queued from ``<>`` to ``envelope.sender``.

    ``original_header`` is the stored header section (with or without its empty line);
    ``original`` the whole stored message in chunks (header, empty line, body), or None
    when it is too large to return. ``arrival`` and ``now`` are unix times. Raises
    ValueError for a null sender, no reports, or an action outside RFC 3464 2.3.3 (all
    programming errors). A malformed status is not one: see :func:`_status`.
    """
    _check(envelope, reports)
    utf8 = envelope.smtputf8
    failed = any(report.action == "failed" for report in reports)
    returned = _choose_returned(envelope, failed, original_header, original)
    parts = [
        _text_part(reporting_mta, reports, returned, utf8),
        _status_part(reporting_mta, envelope, queue_id, arrival, reports, utf8),
    ]
    if returned is not None:
        parts.append(_returned_part(returned, utf8))
    message_id = _message_id(queue_id, now, reports, message_id_domain)
    boundary = _boundary(queue_id, message_id, parts)
    body = _multipart(parts, boundary)
    header = _top_header(
        postmaster, envelope.sender, _subject(reports), now, message_id, boundary, body
    )
    message = header + b"\r\n" + body
    return Dsn(message, not message.isascii(), not header.isascii(), message_id)


# Checks and choices.


def _check(envelope: Envelope, reports: Sequence[RecipientReport]) -> None:
    """Refuse what would make a wrong or harmful DSN rather than write it."""
    if not envelope.sender:
        raise ValueError("no DSN is sent to the null reverse-path (RFC 5321 4.5.5)")
    if not reports:
        raise ValueError("a DSN reports on at least one recipient (RFC 3464 2.3)")
    for report in reports:
        if report.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {report.action!r} (RFC 3464 2.3.3)")


def _subject(reports: Sequence[RecipientReport]) -> str:
    """The worst news first: a failure outweighs a delay, which outweighs success."""
    actions = {report.action for report in reports}
    if "failed" in actions:
        return _SUBJECTS["failed"]
    if "delayed" in actions:
        return _SUBJECTS["delayed"]
    return _SUBJECTS["success"]


def _choose_returned(
    envelope: Envelope, failed: bool, header: bytes, original: Iterable[bytes] | None
) -> _Returned | None:
    """What the third part carries (RFC 3461 4.3), or None when nothing can be returned.

    The whole message only for a failure without RET=HDRS, and only if it is valid 8bit
    MIME data, so that the DSN never needs BINARYMIME; otherwise the header section.
    """
    header = header.rstrip(b"\r\n") + b"\r\n"
    if _NOT_8BIT.search(header):
        return None  # the SMTP layer refuses such headers; never write them into a DSN
    if not failed or (envelope.ret or "").upper() == "HDRS":
        return _Returned("headers", header, None)
    if original is None:
        note = "The message was too large to return in full; only its header is attached."
        return _Returned("headers", header, note)
    data = b"".join(original)
    if _NOT_8BIT.search(data):
        note = "The message cannot be returned as it was sent; only its header is attached."
        return _Returned("headers", header, note)
    return _Returned("full", data, None)


def _message_id(queue_id: str, now: float, reports: Sequence[RecipientReport], domain: str) -> str:
    """``<queue_id.dsn.N@domain>``, N = milliseconds of ``now`` and a hash of the reports.

    A message can get several DSNs (a delay, then a failure; a failure for one recipient
    and a success for another); the time and the hash of what is reported keep their
    Message-IDs apart without the caller having to count (RFC 5322 3.6.4).
    """
    digest = hashlib.sha256()
    for report in reports:
        digest.update(f"{report.recipient.address}\0{report.action}\0{report.status}\0".encode())
    left = re.sub(r"[^A-Za-z0-9_-]", "-", queue_id) or "dsn"
    right = re.sub(r"[^A-Za-z0-9.-]", "", domain).strip(".") or "localhost"
    return f"<{left}.dsn.{int(now * 1000)}-{digest.hexdigest()[:8]}@{right}>"


def _boundary(queue_id: str, message_id: str, parts: Sequence[bytes]) -> str:
    """A boundary that occurs in no part (RFC 2046 5.1.1), the same for the same input.

    ``=_`` cannot occur in quoted-printable or base64 text, and a hash of the message
    makes a collision with anything else practically impossible; the loop makes sure.
    """
    seed = hashlib.sha256(f"{queue_id}\0{message_id}".encode())
    for part in parts:
        seed.update(hashlib.sha256(part).digest())
    counter = 0
    while True:
        boundary = f"=_dsn_{seed.hexdigest()[:32]}_{counter}"
        if all(boundary.encode() not in part for part in parts):
            return boundary
        counter += 1


# Text cleaning and field writing.


def _clean(text: str) -> str:
    """One line of text: controls (CR and LF first) to spaces, runs of space to one.

    Lone surrogates (undecodable octets of a remote reply) become "?", so the text can
    always be encoded as UTF-8.
    """
    text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(_CONTROLS.sub(" ", text).split())


def _escape_non_ascii(text: str) -> str:
    """Non-ASCII characters as ``\\x{HEX}`` (RFC 6533 3, EmbeddedUnicodeChar)."""
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in text)


def _text(text: str, utf8: bool) -> str:
    """Outside text made fit for a field: one line, and ASCII unless the DSN is global."""
    cleaned = _clean(text)
    return cleaned if utf8 else _escape_non_ascii(cleaned)


def xtext_encode(text: str) -> str:
    """RFC 3461 4 xtext: "+" and "=", and octets outside 33-126, as "+" and two hex digits.

    Used for Original-Envelope-Id (RFC 3461 6.3, RFC 3464 2.2.1), which carries ENVID as
    the client sent it, that is, xtext-encoded; the envelope keeps it decoded.
    """
    out: list[str] = []
    for octet in text.encode("utf-8", "replace"):
        if 33 <= octet <= 126 and octet not in b"+=":
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def _pieces(word: str) -> list[str]:
    """A word cut so that no piece has more than _MAX_PIECE octets in UTF-8."""
    pieces: list[str] = []
    current = ""
    size = 0
    for ch in word:
        width = len(ch.encode("utf-8"))
        if size + width > _MAX_PIECE:
            pieces.append(current)
            current, size = "", 0
        current += ch
        size += width
    pieces.append(current)
    return pieces


def _field(name: str, value: str) -> str:
    """``name: value`` folded at spaces (RFC 5322 2.2.3), lines ending in CRLF.

    ``value`` must already be one line. A line is folded before it would pass FOLD_AT
    characters; a word too long for any line is cut into pieces, the only case in which
    unfolding gives back a space that was not there.
    """
    words = [piece for word in value.split(" ") if word for piece in _pieces(word)]
    lines = [f"{name}:"]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > FOLD_AT and lines[-1] != f"{name}:":
            lines.append(f" {word}")
        else:
            lines[-1] += f" {word}"
    return "".join(f"{line}\r\n" for line in lines)


def _date(timestamp: float) -> str:
    """An RFC 5322 3.3 date-time in UTC ("+0000"), to the second."""
    return format_datetime(datetime.fromtimestamp(int(timestamp), UTC))


# The top-level header.


def _top_header(
    postmaster: str,
    sender: str,
    subject: str,
    now: float,
    message_id: str,
    boundary: str,
    body: bytes,
) -> bytes:
    """The DSN's header: from the postmaster, to the sender, marked as automatic.

    Auto-Submitted (RFC 3834 5) keeps well-behaved responders from answering it;
    multipart/report with report-type=delivery-status is RFC 6522 / RFC 3464 2.
    """
    fields = [
        _field("From", f"Mail Delivery System <{_address(postmaster)}>"),
        _field("To", f"<{_address(sender)}>"),
        _field("Subject", subject),
        _field("Date", _date(now)),
        _field("Message-ID", message_id),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
        _field("Content-Transfer-Encoding", "7bit" if body.isascii() else "8bit"),
    ]
    return "".join(fields).encode("utf-8")


def _address(address: str) -> str:
    """An address for a field: no controls and no spaces, whatever it came with."""
    return "".join(_clean(address).split())


# The parts.


def _part(headers: Sequence[tuple[str, str]], content: bytes) -> bytes:
    """One body part: its MIME header, an empty line, the content as given."""
    encoding = "7bit" if content.isascii() else "8bit"
    fields = "".join(_field(name, value) for name, value in headers)
    fields += _field("Content-Transfer-Encoding", encoding)
    return fields.encode("utf-8") + b"\r\n" + content


def _multipart(parts: Sequence[bytes], boundary: str) -> bytes:
    """RFC 2046 5.1.1: each delimiter is CRLF "--" boundary, so a part's content ends
    exactly where it ended before; a returned message stays byte for byte."""
    preamble = b"This is a MIME-encapsulated message.\r\n"
    delimiter = f"\r\n--{boundary}".encode()
    body = preamble + delimiter[2:]  # the first delimiter may start the body's first line
    for index, part in enumerate(parts):
        if index:
            body += delimiter
        body += b"\r\n" + part
    return body + delimiter + b"--\r\n"


def _text_part(
    reporting_mta: str,
    reports: Sequence[RecipientReport],
    returned: _Returned | None,
    utf8: bool,
) -> bytes:
    """RFC 6522 3: the first part says in words what happened, for the person."""
    paragraphs = [f"This is the mail system at host {_text(reporting_mta, utf8)}."]
    paragraphs.append(f"{_summary(reports)} {_attachment_sentence(returned)}")
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += [*textwrap.wrap(paragraph, TEXT_WIDTH, break_on_hyphens=False), ""]
    for report in reports:
        lines += _recipient_lines(report, utf8)
    while lines and not lines[-1]:
        lines.pop()
    charset = "utf-8" if utf8 else "us-ascii"
    content = "".join(f"{line}\r\n" for line in lines).encode("utf-8")
    headers = [
        ("Content-Description", "Notification"),
        ("Content-Type", f"text/plain; charset={charset}"),
    ]
    return _part(headers, content)


def _summary(reports: Sequence[RecipientReport]) -> str:
    """One paragraph for the worst news in the report."""
    actions = {report.action for report in reports}
    if "failed" in actions:
        return "Your message could not be delivered to one or more recipients."
    if "delayed" in actions:
        return (
            "Your message has not yet been delivered to one or more recipients. "
            "The mail system will keep trying; you do not need to send it again."
        )
    return "Your message was delivered, as you asked to be told, to the recipients below."


def _attachment_sentence(returned: _Returned | None) -> str:
    """What the third part holds, and why only the header when the sender asked for more."""
    if returned is None:
        return "The original message cannot be attached."
    if returned.note:
        return returned.note
    if returned.kind == "full":
        return "Your message is attached below."
    return "The header of your message is attached below."


_ACTION_WORDS = {
    "failed": "could not be delivered",
    "delayed": "delivery delayed, still trying",
    "delivered": "delivered",
    "relayed": "passed on to a system that does not report delivery",
    "expanded": "delivered to a list or alias and passed on to its members",
}


def _recipient_lines(report: RecipientReport, utf8: bool) -> list[str]:
    """One recipient, what happened, and the remote server's words, wrapped."""
    address = _text(report.recipient.address, utf8)
    lines = [f"<{address}>: {_ACTION_WORDS[report.action]} (status {_status(report)})"]
    if report.diagnostic:
        said = f"{_text(report.remote_mta, utf8)} said" if report.remote_mta else "reason"
        text = f"{said}: {_text(report.diagnostic, utf8)}"
        lines += textwrap.wrap(text, TEXT_WIDTH, initial_indent="    ", subsequent_indent="    ")
    if report.action == "delayed" and report.will_retry_until is not None:
        lines.append(f"    trying until {_date(report.will_retry_until)}")
    return [*lines, ""]


def _status_part(
    reporting_mta: str,
    envelope: Envelope,
    queue_id: str,
    arrival: float,
    reports: Sequence[RecipientReport],
    utf8: bool,
) -> bytes:
    """RFC 3464 2.1: per-message fields, then one block of fields per recipient, each
    block after an empty line. Global (RFC 6533 6) for an SMTPUTF8 original."""
    fields = [_field("Reporting-MTA", f"dns; {_host(reporting_mta, utf8)}")]
    fields.append(_field("X-Submitd-Queue-ID", _text(queue_id, False)))  # RFC 3464 2.4
    if envelope.envid is not None:
        fields.append(_field("Original-Envelope-Id", xtext_encode(envelope.envid)))
    fields.append(_field("Arrival-Date", _date(arrival)))
    blocks = ["".join(fields)]
    blocks += [_recipient_block(report, utf8) for report in reports]
    content = "\r\n".join(blocks).encode("utf-8")
    kind = "message/global-delivery-status" if utf8 else "message/delivery-status"
    return _part([("Content-Description", "Delivery report"), ("Content-Type", kind)], content)


def _recipient_block(report: RecipientReport, utf8: bool) -> str:
    """RFC 3464 2.3, in the order of its ABNF."""
    recipient = report.recipient
    fields: list[str] = []
    if recipient.orcpt is not None:  # RFC 3464 2.3.1: only when ORCPT was given
        fields.append(_field("Original-Recipient", _original_recipient(recipient.orcpt, utf8)))
    fields.append(_field("Final-Recipient", _final_recipient(recipient.address, utf8)))
    fields.append(_field("Action", report.action))
    fields.append(_field("Status", _status(report)))
    if report.remote_mta:
        fields.append(_field("Remote-MTA", f"dns; {_host(report.remote_mta, utf8)}"))
    if report.diagnostic:
        fields.append(_field("Diagnostic-Code", _diagnostic(report.diagnostic, utf8)))
    if report.last_attempt is not None:
        fields.append(_field("Last-Attempt-Date", _date(report.last_attempt)))
    if report.action == "delayed" and report.will_retry_until is not None:
        fields.append(_field("Will-Retry-Until", _date(report.will_retry_until)))  # 2.3.8
    return "".join(fields)


def _status(report: RecipientReport) -> str:
    """The RFC 3463 code, or the action's generic one when it is malformed.

    The code comes from a remote reply or a route; a bad one must not stop the notice
    (the Status field is mandatory, RFC 3464 2.3.4). Its class is not forced to agree
    with the action: a recipient that expired in the queue fails with its last 4.x.x.
    """
    if _STATUS.fullmatch(report.status):
        return report.status
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(report.action, "2.0.0")


def _host(name: str, utf8: bool) -> str:
    """A host name or address literal, one word."""
    return "".join(_text(name, utf8).split()) or "unknown"


def _diagnostic(text: str, utf8: bool) -> str:
    """RFC 3464 2.3.6: "smtp; " and the reply when it is one; our own words otherwise,
    typed as an extension (the "X-" form of RFC 3464 2.3.6 / 8.3)."""
    cleaned = _text(text, utf8)
    kind = "smtp" if _SMTP_REPLY.match(cleaned) else "X-Submitd"
    return f"{kind}; {cleaned}"


def _final_recipient(address: str, utf8: bool) -> str:
    """RFC 3464 2.3.2: "rfc822; addr" for an ASCII address, else the utf-8 type
    (RFC 6533 3): unitext in a global DSN, xtext (all ASCII) in a plain one."""
    address = _address(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr(address, utf8)}"


def _utf8_addr(address: str, utf8: bool) -> str:
    """RFC 6533 3, utf-8-addr-xtext (or -unitext when ``utf8``): SP, "\\", "+", "=",
    controls (and non-ASCII for xtext) as ``\\x{HEX}``."""
    out: list[str] = []
    for ch in address:
        code = ord(ch)
        plain = 0x21 <= code <= 0x7E and ch not in "\\+="
        out.append(ch if plain or (utf8 and code > 0x7F) else f"\\x{{{code:X}}}")
    return "".join(out)


def _original_recipient(orcpt: str, utf8: bool) -> str:
    """RFC 3464 2.3.1: the ORCPT as the client gave it, "type; address" (RFC 3461 4.2).

    The envelope keeps it xtext-decoded. An ASCII address is written as it is; a
    "utf-8" one is already in RFC 6533 form and only needs its non-ASCII escaped for a
    plain DSN; a non-ASCII "rfc822" one (not valid per RFC 3461 4.2) is given the utf-8
    type, like Final-Recipient.
    """
    addr_type, _, address = orcpt.partition(";")
    addr_type = "".join(_clean(addr_type).split()).lower() or "unknown"
    address = _clean(address)
    if address.isascii() or (utf8 and addr_type != "rfc822"):
        return f"{addr_type}; {address}"
    if addr_type == "rfc822":
        return f"utf-8; {_utf8_addr(''.join(address.split()), utf8)}"
    return f"{addr_type}; {_escape_non_ascii(address)}"


def _returned_part(returned: _Returned, utf8: bool) -> bytes:
    """RFC 3464 2 / RFC 6522: the original message, or its header section only."""
    if returned.kind == "full":
        kind = "message/global" if utf8 else "message/rfc822"
        description = "Undelivered Message"
    else:
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        description = "Message Headers"
    headers = [("Content-Description", description), ("Content-Type", kind)]
    return _part(headers, returned.content)
