"""Checking and completing the header section of a submitted message (RFC 6409 4-8).

Pure: bytes and values in, bytes or a rejection out. The clock (``now``), the queue id
and the user directory (``owns``, ``is_local_user``) come in through
:class:`CleanupContext`, so every rule can be tested from a table.

How the header is changed (DESIGN principle 4, RFC 6409 8): a field that is added or
replaced is written at the *top* of the header and a replaced field is removed from where
it was; every other line is passed through byte for byte and in order, folding, tabs and
8-bit octets included. The client's own DKIM signature therefore survives unless it
covers a field we had to replace. Nothing is re-serialised.

What is refused rather than repaired (RFC 6409 3.2: "better to reject a message than to
risk sending one that is damaged", above all "an invalid 'From' field"): a header that is
not a sequence of RFC 5322 fields, a missing From, address fields that are not valid
RFC 5322 address lists, domains that are not fully qualified (RFC 6409 4.2), UTF-8 in an
address outside SMTPUTF8 (RFC 6532), fields RFC 5322 3.6 allows once given twice, and
fields the site forbids. What is repaired is only what RFC 6409 8 names: Date (8.2),
Message-ID (8.3), Sender (8.1), configured address rewriting (8.8), single-label domains
the site expands (4.2), and Bcc, which must not reach the recipients (RFC 5322 3.6.3).

The checks run in a fixed order so that a message with several problems always gets the
same reply: header structure, field count, forbidden fields, (strip fields), From present,
duplicates, then each address field in header order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from submitd.message.addresses import (
    AddressError,
    Grammar,
    Mailbox,
    NeedsUtf8,
    is_fully_qualified,
    parse_addr_spec,
    parse_addresses,
    remove_comments,
    rewrite_address,
    rewrite_parts,
    same_address,
    valid_msg_id,
)
from submitd.message.dates import date_text
from submitd.smtp.replies import Reply, reply

__all__ = [
    "CleanedHeader",
    "CleanupContext",
    "CleanupRejection",
    "CleanupSettings",
    "clean_header",
    "rewrite_address",
    "valid_date",
]

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 2.1.1, octets without the CRLF


@dataclass(frozen=True, slots=True)
class CleanupSettings:
    """What the site wants done to every submitted header."""

    hostname: str  # right-hand side of the Message-IDs we add
    remove_bcc: bool = True
    keep_original_date: bool = False  # keep a replaced Date as X-Original-Date
    max_header_fields: int = 500
    forbidden_fields: tuple[str, ...] = ()  # present -> 554 5.7.1
    strip_fields: tuple[str, ...] = ()  # removed silently
    rewrite: tuple[tuple[str, str], ...] = ()  # (pattern, replacement), see rewrite_parts
    single_label_domain: str | None = None  # "example.net": bob@sales -> bob@sales.example.net


@dataclass(frozen=True, slots=True)
class CleanupContext:
    """What is known about this submission; everything impure comes in through here."""

    login: str  # the authenticated user, an email address
    owns: Callable[[str], bool]  # may the user send as this address
    is_local_user: Callable[[str], bool]  # is this address one of our users
    smtputf8: bool  # the transaction used SMTPUTF8 (RFC 6531 3.4)
    now: float  # unix time, for Date
    unique: str  # unique token (the queue id), for Message-ID


class CleanupRejection(Exception):
    """The message must be refused with ``reply`` (after end of data, RFC 6409 5.1)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced or ''} {' '.join(reply.lines)}")
        self.reply = reply


@dataclass(frozen=True, slots=True)
class CleanedHeader:
    header: bytes  # the new header section, ending with CRLF (no blank line)
    changes: tuple[str, ...]  # notes for the log: "added Date", "removed Bcc", ...


def _reject(code: int, enhanced: str, text: str) -> CleanupRejection:
    return CleanupRejection(reply(code, enhanced, text))


def _printable(text: str, limit: int = 80) -> str:
    """Client text made safe to echo in a reply: printable ASCII only, bounded length."""
    cleaned = "".join(ch if 32 <= ord(ch) <= 126 else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


# --- Fields (RFC 5322 2.2) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    """One header field exactly as received: all its lines, each with its CRLF."""

    name: str  # as written, without the obsolete WSP before the colon (RFC 5322 4.5)
    raw: bytes
    colon: int  # index of the ":" in raw
    key: str  # the name in lower case, for lookups (field names are case-insensitive)

    @property
    def value(self) -> bytes:
        """The value after the colon, folds included, final CRLF excluded."""
        return self.raw[self.colon + 1 : -2]

    @property
    def text(self) -> str:
        # surrogateescape: 8-bit octets that are not UTF-8 survive a round trip unchanged.
        return self.value.decode("utf-8", "surrogateescape")


def _malformed(number: int, problem: str) -> CleanupRejection:
    return _reject(554, "5.6.0", f"Malformed header line {number}: {problem}")


def _check_field_line(line: bytes, number: int) -> None:
    """RFC 5322 2.2: field-name ":" field-body; field-name = 1*ftext (3.6.8)."""
    colon = line.find(b":")
    if colon < 0:
        raise _malformed(number, "no colon and not a continuation (RFC 5322 2.2)")
    # RFC 5322 4.5: obs-optional allows WSP between the name and the colon.
    name = line[:colon].rstrip(b" \t")
    if not name:
        raise _malformed(number, "empty field name (RFC 5322 2.2)")
    if not _FIELD_NAME.fullmatch(name):
        shown = _printable(name.decode("latin-1"), 40)
        raise _malformed(number, f"bad character in field name '{shown}' (RFC 5322 3.6.8)")


_FIELD_NAME = re.compile(rb"[\x21-\x7e]+")  # RFC 5322 3.6.8 ftext (the colon is split off)


def _make_field(lines: list[bytes]) -> _Field:
    colon = lines[0].index(b":")
    name = lines[0][:colon].rstrip(b" \t").decode("ascii")
    return _Field(name, b"".join(line + CRLF for line in lines), colon, name.lower())


def _split_fields(header: bytes) -> list[_Field]:
    """The fields of a header section; a continuation line starts with WSP (RFC 5322 2.2.3)."""
    if header and not header.endswith(CRLF):
        raise ValueError("the header section must end with CRLF")
    fields: list[_Field] = []
    lines: list[bytes] = []
    for number, line in enumerate(header.split(CRLF)[:-1], 1):
        if line[:1] in (b" ", b"\t"):
            if not lines:
                raise _malformed(number, "continuation line before any field (RFC 5322 2.2.3)")
            lines.append(line)
            continue
        _check_field_line(line, number)
        if lines:
            fields.append(_make_field(lines))
        lines = [line]
    if lines:
        fields.append(_make_field(lines))
    return fields


# --- The edit in progress -------------------------------------------------------------------


@dataclass(slots=True)
class _Edit:
    """Fields as received, which of them go, what goes on top, and the notes for the log."""

    fields: list[_Field]
    removed: set[int] = field(default_factory=set)
    top: list[bytes] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    # Field indexes by name: the checks ask for some twenty names, and scanning every
    # field for each was a tenth of the cost of accepting a small message.
    _by_key: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, item in enumerate(self.fields):
            self._by_key.setdefault(item.key, []).append(index)

    def live(self, key: str) -> list[tuple[int, _Field]]:
        return [
            (index, self.fields[index])
            for index in self._by_key.get(key, ())
            if index not in self.removed
        ]

    def remove(self, index: int, note: str | None = None) -> None:
        self.removed.add(index)
        if note:
            self.changes.append(note)

    def prepend(self, raw: bytes, note: str) -> None:
        self.top.append(raw)
        self.changes.append(note)

    def result(self) -> CleanedHeader:
        kept = (item.raw for index, item in enumerate(self.fields) if index not in self.removed)
        return CleanedHeader(b"".join([*self.top, *kept]), tuple(self.changes))


# --- Site checks ------------------------------------------------------------------------------


def _check_count(edit: _Edit, settings: CleanupSettings) -> None:
    if len(edit.fields) > settings.max_header_fields:
        limit = settings.max_header_fields
        raise _reject(554, "5.6.0", f"Message has too many header fields (more than {limit})")


def _check_forbidden(edit: _Edit, settings: CleanupSettings) -> None:
    # RFC 6409 6.3: the MSA may refuse a message that violates site policy.
    forbidden = {name.lower() for name in settings.forbidden_fields}
    for item in edit.fields:
        if item.key in forbidden:
            raise _reject(554, "5.7.1", f"Header field {_printable(item.name)} is not allowed")


def _strip(edit: _Edit, settings: CleanupSettings) -> None:
    strip = {name.lower() for name in settings.strip_fields}
    for index, item in enumerate(edit.fields):
        if item.key in strip:
            edit.remove(index, f"removed {item.name}")


# RFC 5322 3.6: the fields that may occur at most once.
_AT_MOST_ONCE = (
    "date",
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
)


def _check_from_and_duplicates(edit: _Edit) -> None:
    # RFC 5322 3.6: From is required. RFC 6409 3.2 names an invalid From as the first
    # thing to refuse, and two of them make it ambiguous who the author is.
    if not edit.live("from"):
        raise _reject(554, "5.6.0", "Message has no From: header field")
    for key in _AT_MOST_ONCE:
        found = edit.live(key)
        if len(found) > 1:
            name = found[0][1].name
            raise _reject(
                554, "5.6.0", f"Message has more than one {name}: header field (RFC 5322 3.6)"
            )


# --- Address fields (RFC 5322 3.6.2, 3.6.3, 3.6.6; RFC 6409 4.2, 5.1) ----------------------

_GRAMMARS: dict[str, Grammar] = {
    "from": "mailbox-list",
    "sender": "mailbox",
    "reply-to": "address-list",
    "to": "address-list",
    "cc": "address-list",
    "bcc": "optional-address-list",
    "resent-from": "mailbox-list",
    "resent-sender": "mailbox",
    "resent-to": "address-list",
    "resent-cc": "address-list",
    "resent-bcc": "optional-address-list",
}
# The fields RFC 6409 8.8 rewriting applies to. Resent- fields belong to a resent block
# (RFC 5322 3.6.6) whose lines must stay together, so they are never moved.
_REWRITTEN = ("from", "sender", "reply-to", "to", "cc")
_EXPANDABLE = (*_REWRITTEN, "bcc")


@dataclass(frozen=True, slots=True)
class _Addresses:
    """A checked address field: its mailboxes and, per mailbox, a site expansion if any."""

    index: int
    field: _Field
    mailboxes: tuple[Mailbox, ...]
    expanded: tuple[str | None, ...]

    def final(self, position: int) -> str:
        return self.expanded[position] or self.mailboxes[position].address


def _not_qualified(address: str, name: str) -> CleanupRejection:
    shown = _printable(address)
    return _reject(
        554,
        "5.1.2",
        f"Address {shown} in {name}: header field is not fully qualified (RFC 6409 4.2)",
    )


def _qualify(
    mailbox: Mailbox, item: _Field, context: CleanupContext, settings: CleanupSettings
) -> str | None:
    """The expanded address for a single-label domain, None when none is needed.

    RFC 6409 4.2: domains in address fields must be fully qualified. A site may expand a
    single-label domain ("bob@sales" -> "bob@sales.example.net") but, per the note in
    section 8, only once the result is verified to be a real local address. An
    incomplete multi-level domain ("squeaky.sales") must be refused, not expanded; without
    DNS it looks like any other two-label name, so it is recognised the same way: the
    site suffix is configured and the address it would complete to is one of our users.
    """
    site = settings.single_label_domain
    if is_fully_qualified(mailbox.domain):
        if site and _is_partial(mailbox, site, context):
            raise _not_qualified(mailbox.address, item.name)
        return None
    if site and item.key in _EXPANDABLE and "." not in mailbox.domain:
        candidate = f"{mailbox.address}.{site}"
        if context.is_local_user(candidate):
            return candidate
    raise _not_qualified(mailbox.address, item.name)


def _is_partial(mailbox: Mailbox, site: str, context: CleanupContext) -> bool:
    """Whether a multi-label domain is an incomplete name under the site's domain."""
    domain = mailbox.domain.lower()
    if domain.startswith("[") or domain == site.lower() or domain.endswith("." + site.lower()):
        return False
    return context.is_local_user(f"{mailbox.address}.{site}")


def _parse_field(item: _Field, context: CleanupContext) -> tuple[Mailbox, ...]:
    try:
        parsed = parse_addresses(item.text, _GRAMMARS[item.key], utf8=context.smtputf8)
    except NeedsUtf8 as error:
        # RFC 6531 3.7.4.1 / RFC 3463 5.6.7: the address needs SMTPUTF8.
        address = _printable(error.address)
        raise _reject(
            554,
            "5.6.7",
            f"Address {address} in {item.name}: header field needs SMTPUTF8 (RFC 6532)",
        ) from None
    except AddressError as error:
        # RFC 6409 5.1: 554 after end of data for invalid addresses in the header.
        reason = _printable(error.reason, 120)
        raise _reject(
            554,
            "5.6.0",
            f"Bad address syntax in {item.name}: header field: {reason} (RFC 5322 3.4)",
        ) from None
    return parsed.mailboxes


def _check_addresses(
    edit: _Edit, context: CleanupContext, settings: CleanupSettings
) -> dict[str, _Addresses]:
    """Parse and qualify every address field, in header order; keyed by lowercase name.

    Resent- fields may repeat (one block per resending, RFC 5322 3.6.6), so the result
    keeps only the last of each; that loses nothing, as the fix-ups read only fields that
    occur at most once (checked before).
    """
    checked: dict[str, _Addresses] = {}
    for index, item in enumerate(edit.fields):
        if index in edit.removed or item.key not in _GRAMMARS:
            continue
        mailboxes = _parse_field(item, context)
        expanded = tuple(_qualify(mailbox, item, context, settings) for mailbox in mailboxes)
        checked[item.key] = _Addresses(index, item, mailboxes, expanded)
    return checked


# --- Date (RFC 6409 8.2, RFC 5322 3.3 and 4.3) -----------------------------------------------

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
# RFC 5322 4.3 obs-zone: the US zones and the military letters (every letter but J).
_OBS_ZONES = frozenset({"ut", "gmt", "est", "edt", "cst", "cdt", "mst", "mdt", "pst", "pdt"}) | (
    frozenset("abcdefghiklmnopqrstuvwxyz")
)
# RFC 5322 3.3 date-time, on a value whose CFWS has been reduced to single spaces.
_DATE_TIME = re.compile(
    r"(?:(?P<dow>[A-Za-z]{3}) ?, ?)?(?P<day>[0-9]{1,2}) (?P<month>[A-Za-z]{3}) "
    r"(?P<year>[0-9]{2,}) (?P<hour>[0-9]{2}) ?: ?(?P<minute>[0-9]{2})"
    r"(?: ?: ?(?P<second>[0-9]{2}))? (?P<zone>[+-][0-9]{4}|[A-Za-z]{1,3})"
)


def _full_year(digits: str) -> int:
    # RFC 5322 4.3 obs-year: two digits are 19xx from 50 and 20xx below; three add 1900.
    year = int(digits)
    if len(digits) == 2:
        return year + (1900 if year >= 50 else 2000)
    return year + 1900 if len(digits) == 3 else year


def _valid_time(match: re.Match[str]) -> bool:
    zone = match["zone"].lower()
    if zone[0] in "+-":
        if int(zone[3:]) > 59:  # RFC 5322 3.3: zone minutes
            return False
    elif zone not in _OBS_ZONES:
        return False
    second = int(match["second"] or 0)
    # RFC 5322 3.3: hour 00-23, minute 00-59, second 00-60 (a leap second).
    return int(match["hour"]) <= 23 and int(match["minute"]) <= 59 and second <= 60


def _valid_calendar(match: re.Match[str]) -> bool:
    month = match["month"].lower()
    dow = (match["dow"] or "").lower()
    if month not in _MONTHS or (dow and dow not in _DAYS):
        return False
    year = _full_year(match["year"])
    try:
        day = date(year, _MONTHS.index(month) + 1, int(match["day"]))
    except (ValueError, OverflowError):  # 30 February, year 10000, a 20-digit year
        return False
    # RFC 5322 3.3: the year is 1900 or later; a day-of-week MUST match the date.
    return year >= 1900 and (not dow or _DAYS.index(dow) == day.weekday())


def valid_date(value: bytes) -> bool:
    """Whether a Date value is an RFC 5322 3.3 date-time (obsolete forms of 4.3 included).

    ``email.utils.parsedate_to_datetime`` is too lenient to be the judge: it takes a
    missing zone, a missing comma, month and day swapped, and refuses the leap second
    RFC 5322 allows. So the grammar is a regular expression over the value with its
    comments and folds reduced to spaces, and the calendar is checked with ``datetime``.
    """
    try:
        text = remove_comments(value.decode("ascii"))
    except (UnicodeDecodeError, AddressError):
        return False
    # Only SP and HTAB are WSP (RFC 5234 B.1); str.split() would take \v and \f as well.
    match = _DATE_TIME.fullmatch(re.sub(r"[ \t]+", " ", text).strip(" "))
    return match is not None and _valid_time(match) and _valid_calendar(match)


def _renamed(item: _Field, name: bytes) -> bytes:
    """The field under another name, its value byte for byte.

    A longer name could push the first line past 998 octets (RFC 5322 2.1.1); the value
    then starts on a folded line, which only adds FWS before it.
    """
    raw = name + b":" + item.raw[item.colon + 1 :]
    if raw.index(CRLF) > MAX_LINE:
        raw = name + b":" + CRLF + b" " + item.raw[item.colon + 1 :]
    return raw


def _date_field(now: float) -> bytes:
    # RFC 5322 3.3 with a numeric zone; UTC, as we do not know the client's zone.
    return f"Date: {date_text(now)}".encode("ascii") + CRLF


def _fix_date(edit: _Edit, context: CleanupContext, settings: CleanupSettings) -> None:
    """RFC 6409 8.2: add a missing Date; replace one that is not RFC 5322 syntax."""
    found = edit.live("date")
    if not found:
        edit.prepend(_date_field(context.now), "added Date")
        return
    index, item = found[0]
    if valid_date(item.value):
        return
    edit.remove(index)
    edit.prepend(_date_field(context.now), "replaced invalid Date")
    if settings.keep_original_date:
        edit.prepend(_renamed(item, b"X-Original-Date"), "kept invalid Date as X-Original-Date")


# --- Message-ID (RFC 6409 8.3, RFC 5322 3.6.4) ------------------------------------------------


def _fix_message_id(edit: _Edit, context: CleanupContext, settings: CleanupSettings) -> None:
    """RFC 6409 8.3: add a Message-ID when missing or not valid msg-id syntax."""
    new = f"<{context.unique}@{settings.hostname}>"
    if not valid_msg_id(new, utf8=False):
        raise ValueError(f"cannot build a valid Message-ID from {new!r}")
    found = edit.live("message-id")
    if found and valid_msg_id(found[0][1].text, utf8=context.smtputf8):
        return
    note = "added Message-ID"
    if found:
        edit.remove(found[0][0])
        note = "replaced invalid Message-ID"
    edit.prepend(f"Message-ID: {new}".encode("ascii") + CRLF, note)


# --- Sender (RFC 6409 8.1, RFC 5322 3.6.2) ----------------------------------------------------


def _identities(context: CleanupContext, settings: CleanupSettings) -> tuple[Mailbox, ...]:
    """The user's login as an address we may write, then as the site rewrites it.

    Empty when the login is not a valid, fully qualified address in this transaction:
    RFC 6409 8.1 lets us write only valid addresses. The rewritten form counts as the
    user too, so a header we have cleaned needs nothing more when checked again.
    """
    try:
        login = parse_addr_spec(context.login, utf8=context.smtputf8)
    except AddressError:
        return ()
    if not is_fully_qualified(login.domain):
        return ()
    rewritten = rewrite_address(login.address, settings.rewrite)
    return (login, parse_addr_spec(rewritten, utf8=True))


def _is_user(address: str, identities: tuple[Mailbox, ...], context: CleanupContext) -> bool:
    if not identities:
        return address == context.login
    try:
        mailbox = parse_addr_spec(address, utf8=True)
    except AddressError:
        return False
    return any(same_address(mailbox, identity) for identity in identities)


def _sender_needed(
    checked: dict[str, _Addresses], identities: tuple[Mailbox, ...], context: CleanupContext
) -> bool:
    """Whether the header fails to name the authenticated user as its sender.

    RFC 5322 3.6.2: with several authors, Sender is required; with one author who is not
    the user, Sender says who actually sent it. An existing Sender is kept when it is the
    user or an address the user may send as (``owns``).
    """
    sender = checked.get("sender")
    if sender is not None:
        address = sender.final(0)
        return not (_is_user(address, identities, context) or context.owns(address))
    authors = checked["from"]
    return len(authors.mailboxes) != 1 or not _is_user(authors.final(0), identities, context)


def _fix_sender(
    edit: _Edit,
    checked: dict[str, _Addresses],
    context: CleanupContext,
    settings: CleanupSettings,
) -> None:
    """RFC 6409 8.1: add or replace Sender with the authenticated user's address."""
    identities = _identities(context, settings)
    if not _sender_needed(checked, identities, context):
        return
    if not identities:
        edit.changes.append("Sender not added: the login is not a valid address to write")
        return
    note = "added Sender"
    if "sender" in checked:
        edit.remove(checked.pop("sender").index)
        note = "replaced Sender"
    edit.prepend(f"Sender: <{identities[-1].address}>".encode() + CRLF, note)


# --- Bcc (RFC 5322 3.6.3) ------------------------------------------------------------------------


def _remove_bcc(edit: _Edit, settings: CleanupSettings) -> None:
    """Bcc (and Resent-Bcc) must not reach the recipients it hides them from."""
    if not settings.remove_bcc:
        return
    for key in ("bcc", "resent-bcc"):
        for index, item in edit.live(key):
            edit.remove(index, f"removed {item.name}")


# --- Rewriting and expansion (RFC 6409 8.8 and 4.2) -----------------------------------------


def _new_address(checked: _Addresses, position: int, settings: CleanupSettings) -> str | None:
    mailbox = checked.mailboxes[position]
    address = checked.final(position)
    if checked.field.key in _REWRITTEN:
        local, _, domain = address.rpartition("@")
        address = rewrite_parts(local, domain, settings.rewrite) or address
    return None if address == mailbox.address else address


def _replace_spans(item: _Field, spans: list[tuple[Mailbox, str]]) -> bytes:
    """The field with each addr-spec replaced, everything else kept as written.

    Display names, comments, group syntax and folding stay; only CFWS *inside* an
    obsolete addr-spec ("john . doe @ example . net") is lost, because the addr-spec is
    replaced as a whole. A line that would grow past 998 octets (RFC 5322 2.1.1) gets a
    fold before each new address; CFWS is allowed there (the local part may start with it).
    """
    text = item.text
    for fold in ("", "\r\n "):
        pieces: list[str] = []
        last = 0
        for mailbox, new in spans:
            pieces += [text[last : mailbox.start], fold, new]
            last = mailbox.end
        pieces.append(text[last:])
        value = "".join(pieces).encode("utf-8", "surrogateescape")
        raw = item.raw[: item.colon + 1] + value + CRLF
        if all(len(line) <= MAX_LINE for line in raw.split(CRLF)):
            break
    return raw


def _pairs(spans: list[tuple[Mailbox, str]], shown: int = 3) -> str:
    """The first rewrites of a field, for the log; RFC 6409 5.2 asks for bounded logging."""
    text = ", ".join(f"{mailbox.address} -> {new}" for mailbox, new in spans[:shown])
    return text + (f" and {len(spans) - shown} more" if len(spans) > shown else "")


def _rewrite_fields(edit: _Edit, checked: dict[str, _Addresses], settings: CleanupSettings) -> None:
    """Replace the fields whose addresses a site rule or expansion changes (moved on top)."""
    for entry in sorted(checked.values(), key=lambda entry: entry.index):
        if entry.index in edit.removed or entry.field.key not in _EXPANDABLE:
            continue
        spans = []
        for position, mailbox in enumerate(entry.mailboxes):
            new = _new_address(entry, position, settings)
            if new is not None:
                spans.append((mailbox, new))
        if spans:
            edit.remove(entry.index)
            note = f"rewrote {entry.field.name}: {_pairs(spans)}"
            edit.prepend(_replace_spans(entry.field, spans), note)


# --- The whole ---------------------------------------------------------------------------------


def clean_header(
    header: bytes, context: CleanupContext, settings: CleanupSettings
) -> CleanedHeader:
    """Check the header section and apply the RFC 6409 8 fix-ups; raise CleanupRejection.

    ``header`` is the header as received, every line ending in CRLF, without the empty
    line; the caller has already refused lines over 998 octets and bare CR or LF.
    """
    edit = _Edit(_split_fields(header))
    _check_count(edit, settings)
    _check_forbidden(edit, settings)
    _strip(edit, settings)
    _check_from_and_duplicates(edit)
    checked = _check_addresses(edit, context, settings)
    _fix_date(edit, context, settings)
    _fix_message_id(edit, context, settings)
    _fix_sender(edit, checked, context, settings)
    _remove_bcc(edit, settings)
    _rewrite_fields(edit, checked, settings)
    return edit.result()
