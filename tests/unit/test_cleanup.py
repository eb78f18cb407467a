"""Table-driven tests for submitd.message.cleanup and submitd.message.addresses.

Every row gives a header as a client might send it and either the exact bytes we must
queue or the exact reply we must refuse it with. Expected headers are written out in
full, so a row also proves that every line we did not mean to touch is byte-identical
and in its original order (DESIGN principle 4).
"""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from submitd.message.addresses import (
    AddressError,
    check_rewrite_rules,
    parse_addresses,
    rewrite_address,
    valid_msg_id,
)
from submitd.message.cleanup import (
    CleanedHeader,
    CleanupContext,
    CleanupRejection,
    CleanupSettings,
    clean_header,
    valid_date,
)
from submitd.smtp.replies import Reply

LOGIN = "jdoe@example.net"
NOW = 1795883428.75  # Sat, 28 Nov 2026 16:30:28 +0000
NEW_DATE = b"Date: Sat, 28 Nov 2026 16:30:28 +0000\r\n"
NEW_ID = b"Message-ID: <Q1x2@mx.example.net>\r\n"
NEW_SENDER = b"Sender: <jdoe@example.net>\r\n"

FROM = b"From: John Doe <jdoe@example.net>\r\n"
DATE = b"Date: Fri, 27 Nov 2026 09:00:00 +0100\r\n"
MSGID = b"Message-ID: <abc.123@client.example.org>\r\n"
TO = b"To: alice@example.org\r\n"
BASE = FROM + DATE + MSGID  # a header nothing needs doing to

OWNED = {"alias@example.net", "team@example.net"}
LOCAL_USERS = {"bob@sales.example.net", "eve@squeaky.sales.example.net", "jdoe@example.net"}

RULES = (
    ("@host.sales.example.net", "@example.net"),
    ("@*.eng.example.net", "@example.net"),
)
EXACT = (("jdoe@example.net", "john.doe@example.net"),)


def context(**overrides: Any) -> CleanupContext:
    values: dict[str, Any] = {
        "login": LOGIN,
        "owns": OWNED.__contains__,
        "is_local_user": LOCAL_USERS.__contains__,
        "smtputf8": False,
        "now": NOW,
        "unique": "Q1x2",
    }
    values.update(overrides)
    return CleanupContext(**values)


def site(**overrides: Any) -> CleanupSettings:
    values: dict[str, Any] = {"hostname": "mx.example.net"}
    values.update(overrides)
    return CleanupSettings(**values)


def clean(header: bytes, ctx: dict[str, Any], conf: dict[str, Any]) -> CleanedHeader:
    return clean_header(header, context(**ctx), site(**conf))


def refusal(header: bytes, ctx: dict[str, Any], conf: dict[str, Any]) -> Reply:
    with pytest.raises(CleanupRejection) as info:
        clean(header, ctx, conf)
    return info.value.reply


def case(
    name: str,
    header: bytes,
    expected: bytes | None = None,
    changes: tuple[str, ...] = (),
    ctx: dict[str, Any] | None = None,
    conf: dict[str, Any] | None = None,
) -> Any:
    """One row: ``expected`` None means the header must come back unchanged."""
    return pytest.param(
        header, header if expected is None else expected, changes, ctx, conf, id=name
    )


# --- Headers that must pass through byte for byte --------------------------------------------

UNCHANGED = [
    case("minimal", BASE),
    case(
        "odd folding, tabs and 8-bit unstructured fields",
        FROM
        + b"Subject: caf\xc3\xa9 au lait\r\n\t \tcontinued\r\n"
        + b"X-Latin1: na\xefve \xe9t\xe9\r\n"
        + b"X-Empty:\r\n"
        + b"X-Blank-Lines: a\r\n \r\n\t\r\n b\r\n"
        + b"x-lower-case:value-without-space\r\n"
        + DATE
        + b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel;\r\n"
        + b"\th=from:to:subject; bh=abc=;\r\n\tb=def=\r\n"
        + MSGID,
    ),
    case("obsolete WSP before colon", FROM + b"Subject  :\thello\r\n" + DATE + MSGID),
    case(
        "lower-case field names",
        b"from: jdoe@example.net\r\ndate: Fri, 27 Nov 2026 09:00:00 +0100\r\nmessage-id: <a@b>\r\n",
    ),
    case("group: undisclosed recipients", BASE + b"To: undisclosed-recipients:;\r\n"),
    case(
        "groups with members, mixed with mailboxes",
        BASE + b"To: Team: a@x.example, B <b@y.example>;, c@z.example,\r\n Empty Group : ; \r\n",
    ),
    case(
        "encoded words in display names",
        b"From: =?utf-8?q?J=C3=B6rg_Doe?= <jdoe@example.net>\r\n"
        + DATE
        + MSGID
        + b"To: =?ISO-8859-1?B?SvZyZw==?= =?utf-8?q?M=C3=BCller?= <jm@example.de>\r\n",
    ),
    case(
        "comments everywhere",
        b"From: jdoe@example.net (John (the) Doe)\r\n"
        + DATE
        + MSGID
        + b"Cc: (lead) alice @ example.org (x), <bob(b)@example.org>\r\n",
    ),
    case(
        "quoted display names with odd characters",
        b'From: "Doe, John \\"JD\\" (work) <x>;:" <jdoe@example.net>\r\n'
        + DATE
        + MSGID
        + b'To: "\x7f\x01odd" <a@example.org>, "" <b@example.org>\r\n',
    ),
    case(
        "obs-FWS and obs-phrase",
        b"From: John Q. Public\r\n \r\n\t<jdoe@example.net>\r\n"
        + DATE
        + MSGID
        + b"To: a@example.org ,\r\n \r\n b@example.org\r\n",
    ),
    case(
        "obs-local-part, obs-domain, quoted local part and empty list elements",
        BASE + b'To: john . "q" . public@example . org, , "a b"@example.org,\r\n',
    ),
    case("obs-route", BASE + b"Reply-To: <@relay.example,@r2.example:jdoe@example.net>\r\n"),
    case("domain literal", BASE + b"Cc: postmaster@[192.0.2.1], x@[IPv6:2001:db8::1]\r\n"),
    case("login with another domain case", b"From: jdoe@EXAMPLE.NET\r\n" + DATE + MSGID),
    case(
        "login quoted",
        b'From: "jdoe"@example.net\r\n' + DATE + MSGID,
    ),
    case("Sender is the login", b"From: boss@example.com\r\n" + NEW_SENDER + DATE + MSGID),
    case(
        "Sender is owned",
        b"From: a@x.example, b@y.example\r\nSender: team@example.net\r\n" + DATE + MSGID,
    ),
    case("empty Bcc kept when asked", BASE + b"Bcc:\r\n", conf={"remove_bcc": False}),
    case(
        "Bcc kept with continuation when asked",
        BASE + b"Bcc: a@example.org,\r\n\tb@example.org\r\n",
        conf={"remove_bcc": False},
    ),
    case(
        "two resent blocks",
        b"Resent-From: a@example.org\r\nResent-To: b@example.org\r\nResent-Date: x\r\n"
        b"Resent-From: c@example.org\r\nResent-Sender: d@example.org\r\n"
        b"Resent-Cc: e@example.org\r\n" + BASE,
    ),
    case(
        "date: obsolete year, zone and comment",
        FROM + b"Date: 28 Nov 26 16:30 GMT (UTC)\r\n" + MSGID,
    ),
    case(
        "date: folded, with leap second",
        FROM + b"Date: Wed, 31 Dec 2008\r\n 23:59:60 +0000\r\n" + MSGID,
    ),
    case("date: military zone, no weekday", FROM + b"Date: 1 Jan 2027 00:00:00 z\r\n" + MSGID),
    case(
        "message-id: literal right side, CFWS around",
        FROM + DATE + b"Message-ID:\r\n (c) <a.b@[10.0.0.1]> (d)\r\n",
    ),
    case(
        "UTF-8 addresses under SMTPUTF8",
        b"From: J\xc3\xb6rg <j\xc3\xb6rg@b\xc3\xbccher.example>\r\n" + DATE + MSGID,
        expected=NEW_SENDER
        + b"From: J\xc3\xb6rg <j\xc3\xb6rg@b\xc3\xbccher.example>\r\n"
        + DATE
        + MSGID,
        changes=("added Sender",),
        ctx={"smtputf8": True},
    ),
    case(
        "raw 8-bit display name is left alone",
        b"From: J\xf6rg <jdoe@example.net>\r\n" + DATE + MSGID,
    ),
    case(
        "rules that do not match",
        BASE + b"To: a@sales.example.net, b@eng.example.net\r\n",
        conf={"rewrite": RULES},
    ),
]


@pytest.mark.parametrize(("header", "expected", "changes", "ctx", "conf"), UNCHANGED)
def test_passes_through(
    header: bytes,
    expected: bytes,
    changes: tuple[str, ...],
    ctx: dict[str, Any] | None,
    conf: dict[str, Any] | None,
) -> None:
    result = clean(header, ctx or {}, conf or {})
    assert result.header == expected
    assert result.changes == changes


# --- Fix-ups (RFC 6409 8) ------------------------------------------------------------------------

MANY_AUTHORS = b",\r\n\t".join(b'"Author %d" <a%d@example.org>' % (n, n) for n in range(60))

FIXES = [
    # RFC 6409 8.2: Date
    case("add Date", FROM + MSGID, NEW_DATE + FROM + MSGID, ("added Date",)),
    case(
        "replace unparseable Date",
        FROM + b"Date: yesterday\r\n" + MSGID,
        NEW_DATE + FROM + MSGID,
        ("replaced invalid Date",),
    ),
    case(
        "replace impossible Date",
        FROM + b"Date: Mon, 30 Feb 2026 10:00:00 +0000\r\n" + MSGID,
        NEW_DATE + FROM + MSGID,
        ("replaced invalid Date",),
    ),
    case(
        "replace Date without zone",
        FROM + b"Date: Sat, 28 Nov 2026 16:30:28\r\n" + MSGID,
        NEW_DATE + FROM + MSGID,
        ("replaced invalid Date",),
    ),
    case(
        "replace Date with wrong weekday",
        FROM + b"Date: Fri, 28 Nov 2026 16:30:28 +0000\r\n" + MSGID,
        NEW_DATE + FROM + MSGID,
        ("replaced invalid Date",),
    ),
    case(
        "replace ISO Date, keeping it as X-Original-Date",
        FROM + b"Date: 2026-11-28T16:30:28Z\r\n\t(iso)\r\n" + MSGID,
        NEW_DATE + b"X-Original-Date: 2026-11-28T16:30:28Z\r\n\t(iso)\r\n" + FROM + MSGID,
        ("replaced invalid Date", "kept invalid Date as X-Original-Date"),
        conf={"keep_original_date": True},
    ),
    case(
        "X-Original-Date folds rather than grow a line past 998 octets",
        FROM + b"Date: " + b"x" * 992 + b"\r\n" + MSGID,
        NEW_DATE + b"X-Original-Date:\r\n  " + b"x" * 992 + b"\r\n" + FROM + MSGID,
        ("replaced invalid Date", "kept invalid Date as X-Original-Date"),
        conf={"keep_original_date": True},
    ),
    # RFC 6409 8.3: Message-ID
    case("add Message-ID", FROM + DATE, NEW_ID + FROM + DATE, ("added Message-ID",)),
    *[
        case(
            f"replace Message-ID {bad!r}",
            FROM + b"Message-ID: " + bad + b"\r\n" + DATE,
            NEW_ID + FROM + DATE,
            ("replaced invalid Message-ID",),
        )
        for bad in [
            b"abc@example.org",
            b"<abc@example.org",
            b"<abc>",
            b"<@example.org>",
            b"<a..b@example.org>",
            b"<a b@example.org>",
            b'<"q"@example.org>',
            b"<a@b> <c@d>",
            b"<a@b> x",
            b"",
        ]
    ],
    # RFC 6409 8.1: Sender
    case(
        "add Sender: many authors, folded",
        b"From: " + MANY_AUTHORS + b"\r\n" + DATE + MSGID,
        NEW_SENDER + b"From: " + MANY_AUTHORS + b"\r\n" + DATE + MSGID,
        ("added Sender",),
    ),
    case(
        "add Sender: several authors",
        b"From: jdoe@example.net, boss@example.com\r\n" + DATE + MSGID,
        NEW_SENDER + b"From: jdoe@example.net, boss@example.com\r\n" + DATE + MSGID,
        ("added Sender",),
    ),
    case(
        "add Sender: author is not the login",
        b"From: Boss <boss@example.com>\r\n" + DATE + MSGID,
        NEW_SENDER + b"From: Boss <boss@example.com>\r\n" + DATE + MSGID,
        ("added Sender",),
    ),
    case(
        "add Sender: local parts are case-sensitive",
        b"From: JDoe@example.net\r\n" + DATE + MSGID,
        NEW_SENDER + b"From: JDoe@example.net\r\n" + DATE + MSGID,
        ("added Sender",),
    ),
    case(
        "add Sender: owning the From address does not name the sender",
        b"From: alias@example.net\r\n" + DATE + MSGID,
        NEW_SENDER + b"From: alias@example.net\r\n" + DATE + MSGID,
        ("added Sender",),
    ),
    case(
        "replace a Sender the user does not own, continuation lines included",
        b"From: boss@example.com\r\nSender: Someone\r\n Else <other@example.com>\r\n"
        + DATE
        + MSGID,
        NEW_SENDER + b"From: boss@example.com\r\n" + DATE + MSGID,
        ("replaced Sender",),
    ),
    case(
        "replace a foreign Sender even when From is the login",
        FROM + b"Sender: other@example.com\r\n" + DATE + MSGID,
        NEW_SENDER + FROM + DATE + MSGID,
        ("replaced Sender",),
    ),
    case(
        "no Sender is written for a login that is not an address",
        b"From: boss@example.com\r\n" + DATE + MSGID,
        changes=("Sender not added: the login is not a valid address to write",),
        ctx={"login": "jdoe"},
    ),
    case(
        "no Sender is written for a UTF-8 login without SMTPUTF8",
        b"From: boss@example.com\r\n" + DATE + MSGID,
        changes=("Sender not added: the login is not a valid address to write",),
        ctx={"login": "j\u00f6rg@example.net"},
    ),
    # RFC 5322 3.6.3: Bcc
    case(
        "remove Bcc with its continuation lines",
        FROM + b"Bcc: a@example.org,\r\n\tb@example.org,\r\n  c@example.org\r\n" + DATE + MSGID,
        BASE,
        ("removed Bcc",),
    ),
    case("remove empty Bcc", BASE + b"BCC:\r\n", BASE, ("removed BCC",)),
    case(
        "remove Resent-Bcc",
        b"Resent-From: a@example.org\r\nResent-Bcc: b@example.org\r\n" + BASE,
        b"Resent-From: a@example.org\r\n" + BASE,
        ("removed Resent-Bcc",),
    ),
    # site policy: strip
    case(
        "strip fields, any case, with continuation lines",
        FROM + b"X-Originating-IP: [192.0.2.1]\r\n" + DATE + b"x-mailer: Foo\r\n 1.0\r\n" + MSGID,
        BASE,
        ("removed X-Originating-IP", "removed x-mailer"),
        conf={"strip_fields": ("X-Mailer", "x-originating-ip")},
    ),
    # RFC 6409 8.8: rewriting
    case(
        "rewrite a domain, keeping display name, comment and folding",
        BASE
        + b'To: "Sales, Team" (hi)\r\n <team@host.sales.example.net> (x),\r\n\tok@example.org\r\n',
        b'To: "Sales, Team" (hi)\r\n <team@example.net> (x),\r\n\tok@example.org\r\n' + BASE,
        ("rewrote To: team@host.sales.example.net -> team@example.net",),
        conf={"rewrite": RULES},
    ),
    case(
        "rewrite domains case-insensitively, keeping the local part as written",
        BASE + b'Cc: "J.R."@Host.Sales.Example.Net\r\n',
        b'Cc: "J.R."@example.net\r\n' + BASE,
        ('rewrote Cc: "J.R."@Host.Sales.Example.Net -> "J.R."@example.net',),
        conf={"rewrite": RULES},
    ),
    case(
        "rewrite an exact address, and the Sender we write",
        b"From: Boss <boss@example.com>\r\nReply-To: jdoe@example.net\r\n" + DATE + MSGID,
        b"Sender: <john.doe@example.net>\r\nReply-To: john.doe@example.net\r\n"
        + b"From: Boss <boss@example.com>\r\n"
        + DATE
        + MSGID,
        ("added Sender", "rewrote Reply-To: jdoe@example.net -> john.doe@example.net"),
        conf={"rewrite": EXACT},
    ),
    case(
        "rewrite From by rule: compared with the login before rewriting",
        FROM + DATE + MSGID,
        b"From: John Doe <john.doe@example.net>\r\n" + DATE + MSGID,
        ("rewrote From: jdoe@example.net -> john.doe@example.net",),
        conf={"rewrite": EXACT},
    ),
    case(
        "rewrite wildcard subdomains, not the domain itself; groups kept",
        BASE + b"To: Devs: a@x.eng.example.net, b@eng.example.net, c@y.z.eng.example.net;\r\n",
        b"To: Devs: a@example.net, b@eng.example.net, c@example.net;\r\n" + BASE,
        (
            "rewrote To: a@x.eng.example.net -> a@example.net, "
            "c@y.z.eng.example.net -> c@example.net",
        ),
        conf={"rewrite": RULES},
    ),
    case(
        "rewritten fields keep their order, on top",
        BASE + b"Cc: a@host.sales.example.net\r\nSubject: s\r\nTo: b@host.sales.example.net\r\n",
        b"Cc: a@example.net\r\nTo: b@example.net\r\n" + BASE + b"Subject: s\r\n",
        (
            "rewrote Cc: a@host.sales.example.net -> a@example.net",
            "rewrote To: b@host.sales.example.net -> b@example.net",
        ),
        conf={"rewrite": RULES},
    ),
    case(
        "Bcc and Resent fields are not rewritten",
        BASE + b"Resent-To: a@host.sales.example.net\r\nBcc: b@host.sales.example.net\r\n",
        BASE + b"Resent-To: a@host.sales.example.net\r\nBcc: b@host.sales.example.net\r\n",
        conf={"rewrite": RULES, "remove_bcc": False},
    ),
    case(
        "a rewrite that would overflow the line folds before the address",
        BASE + b"To: " + b"x" * 960 + b"@host.sales.example.net\r\n",
        b"To: \r\n " + b"x" * 960 + b"@a-much-longer-domain-name.example.net\r\n" + BASE,
        (
            "rewrote To: "
            + "x" * 960
            + "@host.sales.example.net -> "
            + "x" * 960
            + "@a-much-longer-domain-name.example.net",
        ),
        conf={"rewrite": (("@host.sales.example.net", "@a-much-longer-domain-name.example.net"),)},
    ),
    case(
        "the log note names the first three rewrites only",
        BASE + b"Cc: a@host.sales.example.net, b@host.sales.example.net,\r\n"
        b" c@host.sales.example.net, d@host.sales.example.net, e@host.sales.example.net\r\n",
        b"Cc: a@example.net, b@example.net,\r\n"
        b" c@example.net, d@example.net, e@example.net\r\n" + BASE,
        (
            "rewrote Cc: a@host.sales.example.net -> a@example.net, "
            "b@host.sales.example.net -> b@example.net, "
            "c@host.sales.example.net -> c@example.net and 2 more",
        ),
        conf={"rewrite": RULES},
    ),
    # RFC 6409 4.2 and 8: single-label domains the site expands
    case(
        "expand a single-label domain of a local user",
        BASE + b"To: Bob <bob@sales>, alice@example.org\r\n",
        b"To: Bob <bob@sales.example.net>, alice@example.org\r\n" + BASE,
        ("rewrote To: bob@sales -> bob@sales.example.net",),
        conf={"single_label_domain": "example.net"},
    ),
    case(
        "expand in a Bcc that is kept",
        BASE + b"Bcc: bob@sales\r\n",
        b"Bcc: bob@sales.example.net\r\n" + BASE,
        ("rewrote Bcc: bob@sales -> bob@sales.example.net",),
        conf={"single_label_domain": "example.net", "remove_bcc": False},
    ),
    case(
        "expand, then rewrite",
        BASE + b"To: bob@sales\r\n",
        b"To: bob@example.net\r\n" + BASE,
        ("rewrote To: bob@sales -> bob@example.net",),
        conf={
            "single_label_domain": "example.net",
            "rewrite": (("@sales.example.net", "@example.net"),),
        },
    ),
    case(
        "expanded From that is the login needs no Sender",
        b"From: jdoe@example\r\n" + DATE + MSGID,
        b"From: jdoe@example.net\r\n" + DATE + MSGID,
        ("rewrote From: jdoe@example -> jdoe@example.net",),
        conf={"single_label_domain": "net"},
    ),
    # all of them at once: the order of the new fields on top
    case(
        "everything at once",
        b"Subject: all\r\nFrom: a@example.com,\r\n b@host.sales.example.net\r\n"
        + b"Bcc: c@example.org\r\n"
        + b"Date: bad\r\nX-Mailer: m\r\n",
        NEW_DATE
        + b"X-Original-Date: bad\r\n"
        + NEW_ID
        + b"Sender: <john.doe@example.net>\r\n"
        + b"From: a@example.com,\r\n b@example.net\r\n"
        + b"Subject: all\r\n",
        (
            "removed X-Mailer",
            "replaced invalid Date",
            "kept invalid Date as X-Original-Date",
            "added Message-ID",
            "added Sender",
            "removed Bcc",
            "rewrote From: b@host.sales.example.net -> b@example.net",
        ),
        conf={"rewrite": RULES + EXACT, "keep_original_date": True, "strip_fields": ("x-mailer",)},
    ),
]


@pytest.mark.parametrize(("header", "expected", "changes", "ctx", "conf"), FIXES)
def test_fixes(
    header: bytes,
    expected: bytes,
    changes: tuple[str, ...],
    ctx: dict[str, Any] | None,
    conf: dict[str, Any] | None,
) -> None:
    result = clean(header, ctx or {}, conf or {})
    assert result.header == expected
    assert result.changes == changes
    # Cleaning is idempotent: what we queue needs nothing more.
    again = clean(result.header, ctx or {}, conf or {})
    assert again.header == result.header
    assert not [note for note in again.changes if not note.startswith("Sender not added")]


# --- Rejections ----------------------------------------------------------------------------------


def bad(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


def syntax(field: str, reason: str) -> Reply:
    return bad(
        554, "5.6.0", f"Bad address syntax in {field}: header field: {reason} (RFC 5322 3.4)"
    )


def unqualified(address: str, field: str) -> Reply:
    return bad(
        554,
        "5.1.2",
        f"Address {address} in {field}: header field is not fully qualified (RFC 6409 4.2)",
    )


NO_FROM = bad(554, "5.6.0", "Message has no From: header field")
SL = {"single_label_domain": "example.net"}

REJECTIONS = [
    # RFC 5322 2.2: structure
    ("empty header", b"", NO_FROM, {}, {}),
    ("no From", DATE + MSGID + TO, NO_FROM, {}, {}),
    ("From only stripped", BASE, NO_FROM, {}, {"strip_fields": ("from",)}),
    (
        "line without colon",
        FROM + b"Subject hello\r\n",
        bad(
            554, "5.6.0", "Malformed header line 2: no colon and not a continuation (RFC 5322 2.2)"
        ),
        {},
        {},
    ),
    (
        "mbox From_ line",
        b"From jdoe@example.net Sat Nov 28 16:30:28 2026\r\n" + BASE,
        bad(
            554,
            "5.6.0",
            "Malformed header line 1: bad character in field name "
            "'From jdoe@example.net Sat Nov 28 16' (RFC 5322 3.6.8)",
        ),
        {},
        {},
    ),
    (
        "continuation first",
        b" folded\r\n" + BASE,
        bad(
            554,
            "5.6.0",
            "Malformed header line 1: continuation line before any field (RFC 5322 2.2.3)",
        ),
        {},
        {},
    ),
    (
        "empty field name",
        BASE + b": value\r\n",
        bad(554, "5.6.0", "Malformed header line 4: empty field name (RFC 5322 2.2)"),
        {},
        {},
    ),
    (
        "space inside a field name",
        BASE + b"X Bad: value\r\n",
        bad(
            554,
            "5.6.0",
            "Malformed header line 4: bad character in field name 'X Bad' (RFC 5322 3.6.8)",
        ),
        {},
        {},
    ),
    (
        "8-bit field name",
        BASE + b"X-Caf\xc3\xa9: value\r\n",
        bad(
            554,
            "5.6.0",
            "Malformed header line 4: bad character in field name 'X-Caf??' (RFC 5322 3.6.8)",
        ),
        {},
        {},
    ),
    (
        "empty line inside the header",
        FROM + b"\r\n" + DATE,
        bad(
            554, "5.6.0", "Malformed header line 2: no colon and not a continuation (RFC 5322 2.2)"
        ),
        {},
        {},
    ),
    (
        "too many fields",
        BASE + b"X-A: 1\r\nX-B: 2\r\n",
        bad(554, "5.6.0", "Message has too many header fields (more than 4)"),
        {},
        {"max_header_fields": 4},
    ),
    # site policy
    (
        "forbidden field",
        BASE + b"x-spam-override: yes\r\n",
        bad(554, "5.7.1", "Header field x-spam-override is not allowed"),
        {},
        {"forbidden_fields": ("X-Spam-Override",)},
    ),
    # RFC 5322 3.6: fields allowed once
    *[
        (
            f"two {name}",
            BASE + name.encode() + b": x@example.org\r\n" + name.encode() + b": y@example.org\r\n",
            bad(554, "5.6.0", f"Message has more than one {name}: header field (RFC 5322 3.6)"),
            {},
            {},
        )
        for name in ("From", "Sender", "To", "Cc", "Reply-To", "Subject", "Bcc")
    ],
    (
        "two Date",
        BASE + DATE,
        bad(554, "5.6.0", "Message has more than one Date: header field (RFC 5322 3.6)"),
        {},
        {},
    ),
    # RFC 5322 3.4 / RFC 6409 5.1: address syntax
    ("From empty", b"From:\r\n" + DATE, syntax("From", "no address"), {}, {}),
    ("From blank", b"From:  (nobody) \r\n" + DATE, syntax("From", "no address"), {}, {}),
    (
        "From a group",
        b"From: undisclosed:;\r\n" + DATE,
        syntax("From", "a group is not allowed here"),
        {},
        {},
    ),
    (
        "From without domain",
        b"From: jdoe\r\n" + DATE,
        syntax("From", "expected '@', '<' or ':' after 'jdoe'"),
        {},
        {},
    ),
    (
        "From with a space in the local part",
        b"From: john doe@example.net\r\n" + DATE,
        syntax("From", "malformed local part 'john doe'"),
        {},
        {},
    ),
    (
        "From with a trailing dot",
        b"From: jdoe.@example.net\r\n" + DATE,
        syntax("From", "malformed local part 'jdoe.'"),
        {},
        {},
    ),
    (
        "From with double at",
        b"From: jdoe@@example.net\r\n" + DATE,
        syntax("From", "expected a domain, found '@'"),
        {},
        {},
    ),
    (
        "From with a trailing dot in the domain",
        b"From: jdoe@example.net.\r\n" + DATE,
        syntax("From", "expected a domain label after '.', found end of field"),
        {},
        {},
    ),
    (
        "missing >",
        b"From: <jdoe@example.net\r\n" + DATE,
        syntax("From", "expected '>', found end of field"),
        {},
        {},
    ),
    ("empty <>", BASE + b"To: <>\r\n", syntax("To", "empty address <>"), {}, {}),
    ("To empty", BASE + b"To:\r\n", syntax("To", "no address"), {}, {}),
    (
        "To with semicolon",
        BASE + b"To: a@example.org; b@example.org\r\n",
        syntax("To", "expected ',' between addresses, found ';'"),
        {},
        {},
    ),
    (
        "unclosed group",
        BASE + b"To: g: a@example.org\r\n",
        syntax("To", "group not closed by ';'"),
        {},
        {},
    ),
    (
        "nested group",
        BASE + b"To: g: h: a@example.org;;\r\n",
        syntax("To", "a group is not allowed here"),
        {},
        {},
    ),
    (
        "unterminated comment",
        BASE + b"Cc: a@example.org (oops\r\n",
        syntax("Cc", "unterminated comment"),
        {},
        {},
    ),
    (
        "unterminated quote",
        BASE + b'Cc: "oops <a@example.org>\r\n',
        syntax("Cc", "unterminated quoted string"),
        {},
        {},
    ),
    (
        "display name starting with a dot",
        BASE + b"Cc: .x <a@example.org>\r\n",
        syntax("Cc", "a display name may not begin with '.'"),
        {},
        {},
    ),
    (
        "stray bracket",
        BASE + b"Cc: a@example.org]\r\n",
        syntax("Cc", "unexpected character ']'"),
        {},
        {},
    ),
    (
        "two Senders in one field",
        b"From: a@example.org\r\nSender: b@example.org, c@example.org\r\n",
        syntax("Sender", "only one mailbox is allowed"),
        {},
        {},
    ),
    (
        "bad Bcc is refused too",
        BASE + b"Bcc: what\r\n",
        syntax("Bcc", "expected '@', '<' or ':' after 'what'"),
        {},
        {},
    ),
    (
        "bad Resent-To",
        b"Resent-To: x\r\n" + BASE,
        syntax("Resent-To", "expected '@', '<' or ':' after 'x'"),
        {},
        {},
    ),
    (
        "invalid UTF-8 in an address",
        BASE + b"To: j\xf6rg@example.org\r\n",
        syntax("To", "address 'j?rg@example.org' is not valid UTF-8"),
        {"smtputf8": True},
        {},
    ),
    # RFC 6532 / RFC 6531: UTF-8 addresses need SMTPUTF8
    (
        "UTF-8 local part without SMTPUTF8",
        b"From: j\xc3\xb6rg@example.net\r\n" + DATE,
        bad(
            554, "5.6.7", "Address j?rg@example.net in From: header field needs SMTPUTF8 (RFC 6532)"
        ),
        {},
        {},
    ),
    (
        "UTF-8 domain without SMTPUTF8",
        BASE + b"To: Bob <bob@b\xc3\xbccher.example>\r\n",
        bad(
            554, "5.6.7", "Address bob@b?cher.example in To: header field needs SMTPUTF8 (RFC 6532)"
        ),
        {},
        {},
    ),
    # RFC 6409 4.2: fully qualified domains
    (
        "single-label From",
        b"From: jdoe@localhost\r\n" + DATE,
        unqualified("jdoe@localhost", "From"),
        {},
        {},
    ),
    (
        "single-label To",
        BASE + b"To: a@example.org, bob@sales\r\n",
        unqualified("bob@sales", "To"),
        {},
        {},
    ),
    (
        "single-label in a group",
        BASE + b"Cc: g: bob@sales;\r\n",
        unqualified("bob@sales", "Cc"),
        {},
        {},
    ),
    (
        "single-label, not a local user",
        BASE + b"To: zed@sales\r\n",
        unqualified("zed@sales", "To"),
        {},
        SL,
    ),
    (
        "single-label in Resent-To is not expanded",
        b"Resent-To: bob@sales\r\n" + BASE,
        unqualified("bob@sales", "Resent-To"),
        {},
        SL,
    ),
    (
        "partial multi-level domain",
        BASE + b"To: eve@squeaky.sales\r\n",
        unqualified("eve@squeaky.sales", "To"),
        {},
        SL,
    ),
]


@pytest.mark.parametrize(
    ("header", "expected", "ctx", "conf"),
    [pytest.param(h, r, c, s, id=name) for name, h, r, c, s in REJECTIONS],
)
def test_rejections(
    header: bytes, expected: Reply, ctx: dict[str, Any], conf: dict[str, Any]
) -> None:
    assert refusal(header, ctx, conf) == expected


def test_partial_domain_needs_configuration() -> None:
    # Without a site suffix, a two-label name is taken as fully qualified (no DNS here).
    header = BASE + b"To: eve@squeaky.sales\r\n"
    assert clean(header, {}, {}).header == header


def test_replies_never_echo_raw_client_text() -> None:
    header = BASE + b"To: \xe2\x80\xae" + b"x" * 300 + b"\r\n"
    text = refusal(header, {}, {}).encode()
    assert text.isascii()
    assert len(text) < 300
    assert text.count(b"\r\n") == 1


def test_header_must_end_with_crlf() -> None:
    with pytest.raises(ValueError):
        clean(FROM[:-2], {}, {})


def test_message_id_from_bad_queue_id_is_a_bug() -> None:
    with pytest.raises(ValueError):
        clean(FROM + DATE, {"unique": "a b"}, {})


# --- Dates (RFC 5322 3.3, 4.3) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b" Sat, 28 Nov 2026 16:30:28 +0000", True),
        (b"Sat,28 Nov 2026 16:30:28 +0000", True),
        (b" sat, 28 nov 2026 16:30 -0930", True),
        (b" 28 Nov 2026 16:30:28 +0000 (Coordinated Universal Time)", True),
        (b" Sat, 28 Nov 2026 16 : 30 : 28 EST", True),
        (b" 1 Jan 00 00:00:00 +0000", True),  # obs-year: 2000
        (b" 1 Jan 100 00:00:00 +0000", True),  # obs-year: 2000 (three digits + 1900)
        (b" Sat, 28 Nov 2026 16:30:28 +0060", False),  # zone minutes
        (b" Sat, 28 Nov 2026 24:00:00 +0000", False),
        (b" Sat, 28 Nov 2026 16:60:00 +0000", False),
        (b" Sat, 28 Nov 2026 16:30:61 +0000", False),
        (b" Sat, 28 Nov 2026 16:30:28 J", False),  # no military J
        (b" Sat, 28 Nov 2026 16:30:28 CET", False),  # not an RFC 5322 zone
        (b" Sun, 28 Nov 2026 16:30:28 +0000", False),  # wrong weekday
        (b" Xyz, 28 Nov 2026 16:30:28 +0000", False),
        (b" 28 Foo 2026 16:30:28 +0000", False),
        (b" 28 Nov 1899 16:30:28 +0000", False),
        (b" 28 Nov 10000 16:30:28 +0000", False),
        (b" Nov 28 2026 16:30:28 +0000", False),
        (b" Sat 28 Nov 2026 16:30:28 +0000", False),
        (b" 28 Nov 2026 16:30:28+0000", False),
        (b" 28 Nov 2026 16:30:28 +0000 (unclosed", False),
        (b" 28 Nov 2026 16:30:28 +0000 extra", False),
        (b" 28 Nov 2026 16:30:28 \xc3\xa9", False),
        (b" 28\x0bNov 2026 16:30:28 +0000", False),
        (b"", False),
    ],
)
def test_valid_date(value: bytes, valid: bool) -> None:
    assert valid_date(value) is valid


# --- Message-ID (RFC 5322 3.6.4) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "utf8", "valid"),
    [
        (" <a.b@c.d>", False, True),
        ("<a@[1.2.3.4]>", False, True),
        ("<a!#$%&'*+-/=?^_`{|}~@b>", False, True),
        (" (x) <a@b> (y)", False, True),
        ("<\u00e9@b>", False, False),
        ("<\u00e9@b>", True, True),
        ("<a@[1.2 .3.4]>", False, False),
        ("<a@b.>", False, False),
        ("<a@b", False, False),
        ("<a@b> (x", False, False),
    ],
)
def test_valid_msg_id(value: str, utf8: bool, valid: bool) -> None:
    assert valid_msg_id(value, utf8=utf8) is valid


# --- The address parser on its own --------------------------------------------------------------


def test_addr_spec_spans_point_at_the_address() -> None:
    text = ' "Doe, J." (c) <jdoe@example.net>, g: a@b.example;, x . y @ z . example'
    parsed = parse_addresses(text, "address-list", utf8=False)
    assert [text[m.start : m.end] for m in parsed.mailboxes] == [
        "jdoe@example.net",
        "a@b.example",
        "x . y @ z . example",
    ]
    assert [m.address for m in parsed.mailboxes] == [
        "jdoe@example.net",
        "a@b.example",
        "x.y@z.example",
    ]
    assert parsed.groups == 1


def test_bare_cr_is_refused() -> None:
    with pytest.raises(AddressError):
        parse_addresses("a@b.example\r c@d.example", "address-list", utf8=False)


# --- rewrite_address: the same rules for the envelope ---------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("x@host.sales.example.net", "x@example.net"),
        ("x@HOST.sales.example.net", "x@example.net"),
        ("jdoe@example.net", "jdoe@example.net"),
        ("y@a.b.eng.example.net", "y@example.net"),
        ("z@eng.example.net", "z@eng.example.net"),
        ("z@other.example", "z@other.example"),
        ("x@[192.0.2.1]", "x@[192.0.2.1]"),
        ("Postmaster", "Postmaster"),
        ("", ""),
    ],
)
def test_rewrite_address(address: str, expected: str) -> None:
    assert rewrite_address(address, RULES) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("jdoe@example.net", "john.doe@example.net"),
        ("jdoe@EXAMPLE.net", "john.doe@example.net"),
        ('"jdoe"@example.net', "john.doe@example.net"),
        ("JDoe@example.net", "JDoe@example.net"),  # local parts are case-sensitive
        ("jdoe@example.org", "jdoe@example.org"),
    ],
)
def test_rewrite_exact_address(address: str, expected: str) -> None:
    assert rewrite_address(address, EXACT) == expected


def test_check_rewrite_rules() -> None:
    check_rewrite_rules(RULES + EXACT)
    with pytest.raises(ValueError, match="not a fully qualified domain"):
        check_rewrite_rules((("@sales", "@example.net"),))


def test_exact_address_rules_win_over_domain_rules() -> None:
    rules = (("@example.net", "@example.com"), ("jdoe@example.net", "john@example.org"))
    assert rewrite_address("jdoe@example.net", rules) == "john@example.org"
    assert rewrite_address("ann@example.net", rules) == "ann@example.com"


@pytest.mark.parametrize(
    "rule",
    [
        ("@example.net", "example.com"),  # a domain maps to "@domain"
        ("@localhost", "@example.com"),  # not fully qualified
        ("@example.net", "@exa mple.com"),
        ("jdoe@example.net", "john doe@example.com"),
        ("jdoe", "john@example.com"),
        ("@example.net", "@b\u00fccher.example"),  # replacements in ASCII (A-labels)
    ],
)
def test_malformed_rules_are_refused(rule: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        rewrite_address("x@example.net", (rule,))


# --- Property: a header with nothing to fix comes back byte for byte ------------------------

_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_QTEXT = [c for c in string.printable if c not in '"\\\r\n\x0b\x0c'] + ['\\"', "\\\\", "\\("]
_CTEXT = [c for c in string.printable if c not in "()\\\r\n\x0b\x0c"]
_FOLDS = [" ", "\r\n ", "\r\n\t", " \r\n  ", "\r\n \r\n "]

atoms = st.text(_ATEXT, min_size=1, max_size=8)
dot_atoms = st.lists(atoms, min_size=1, max_size=3).map(".".join)
labels = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=8)
domains = st.lists(labels, min_size=2, max_size=4).map(".".join)
addr_specs = st.builds("{}@{}".format, dot_atoms, domains)
quoted = st.lists(st.sampled_from(_QTEXT), max_size=12).map(lambda cs: '"' + "".join(cs) + '"')
comments = st.lists(st.sampled_from(_CTEXT), max_size=12).map(lambda cs: "(" + "".join(cs) + ")")
encoded_words = st.sampled_from(["=?utf-8?q?J=C3=B6rg?=", "=?ISO-8859-1?B?SvZyZw==?="])
phrases = st.lists(st.one_of(atoms, quoted, encoded_words), min_size=1, max_size=3).map(" ".join)
folds = st.sampled_from(_FOLDS)


def _mailbox(address: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        address,
        st.builds("{} <{}>".format, phrases, address),
        st.builds("{}{}<{}>".format, phrases, folds, address),
        st.builds("{} {}".format, address, comments),
    )


mailboxes = _mailbox(addr_specs)
groups = st.builds("{}:{};".format, phrases, st.lists(mailboxes, max_size=3).map(", ".join))
_LIST_SEPARATORS = [",", ", ", ",\r\n ", ",\r\n\t", " ,\r\n \r\n ", ", ,"]


@st.composite
def address_lists(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.one_of(mailboxes, groups), min_size=1, max_size=4))
    text = items[0]
    for item in items[1:]:
        text += draw(st.sampled_from(_LIST_SEPARATORS)) + item
    return text


_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@st.composite
def dates(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)))
    offset = draw(st.integers(-12 * 60, 14 * 60))
    local = moment.replace(tzinfo=UTC).astimezone(timezone(timedelta(minutes=offset)))
    sign = "-" if offset < 0 else "+"
    zone = f"{sign}{abs(offset) // 60:02}{abs(offset) % 60:02}"
    month = _MONTH_NAMES[local.month - 1]
    text = f"{local.day} {month} {local.year} {local.hour:02}:{local.minute:02}"
    if draw(st.booleans()):
        text += f":{local.second:02}"
    if draw(st.booleans()):
        text = f"{_DAY_NAMES[local.weekday()]}, {text}"
    text += draw(st.sampled_from([" ", "\r\n "])) + draw(st.sampled_from([zone, "GMT", "UT"]))
    return text + draw(st.sampled_from(["", " (UTC)", "\r\n\t(comment)"]))


_FIELD_NAME = "".join(chr(c) for c in range(33, 127) if chr(c) != ":")
_SPECIAL_NAMES = {
    "from", "sender", "reply-to", "to", "cc", "bcc", "date", "message-id", "subject",
    "in-reply-to", "references", "resent-from", "resent-sender", "resent-to", "resent-cc",
    "resent-bcc",
}  # fmt: skip
_UNSTRUCTURED = [*(chr(c) for c in range(32, 127)), "\t", "\xe9", "\xff", "\x80"]


def _value(draw: st.DrawFn) -> bytes:
    pieces = draw(st.lists(st.text(st.sampled_from(_UNSTRUCTURED), max_size=40), max_size=4))
    separators = draw(
        st.lists(
            st.sampled_from(["\r\n ", "\r\n\t", "\r\n  \t"]),
            min_size=len(pieces),
            max_size=len(pieces),
        )
    )
    text = "".join(sep + piece for sep, piece in zip(separators, pieces, strict=True))
    return text.removeprefix("\r\n").encode("latin-1")


@st.composite
def unchanged_headers(draw: st.DrawFn) -> bytes:
    login = draw(st.sampled_from([LOGIN, "jdoe@Example.NET", '"jdoe"@example.net']))
    fields = [
        f"From:{draw(folds)}{draw(_mailbox(st.just(login)))}".encode(),
        f"Date:{draw(folds)}{draw(dates())}".encode(),
        f"Message-ID:{draw(folds)}<{draw(dot_atoms)}@{draw(dot_atoms)}>".encode(),
    ]
    for name in ("To", "Cc", "Reply-To"):
        if draw(st.booleans()):
            fields.append(f"{name}:{draw(folds)}{draw(address_lists())}".encode())
    if draw(st.booleans()):
        fields.append(b"Sender: " + LOGIN.encode())
    if draw(st.booleans()):
        fields.append(b"Subject:" + _value(draw))
    names = draw(st.lists(st.text(_FIELD_NAME, min_size=1, max_size=20), max_size=8))
    fields += [
        name.encode() + b":" + _value(draw) for name in names if name.lower() not in _SPECIAL_NAMES
    ]
    ordered = draw(st.permutations(fields))
    return b"".join(item + b"\r\n" for item in ordered)


@settings(max_examples=300, deadline=None)
@given(unchanged_headers())
def test_headers_needing_nothing_pass_byte_for_byte(header: bytes) -> None:
    result = clean(header, {}, {"rewrite": RULES[:1]})
    assert result.header == header
    assert result.changes == ()


@settings(max_examples=200, deadline=None)
@given(unchanged_headers(), st.sets(st.sampled_from(["date", "message-id", "from"])))
def test_fix_ups_only_add_on_top_and_remove(header: bytes, drop: set[str]) -> None:
    """Whatever the fix-ups, the fields we keep are the input's, in order, byte for byte."""
    conf = {"rewrite": RULES[:1]}
    lines = header.split(b"\r\n")
    fields: list[bytes] = []
    for line in lines[:-1]:
        if line[:1] in (b" ", b"\t"):
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    kept = [
        f for f in fields if f.split(b":")[0].lower().decode() not in drop or f.startswith(b"From:")
    ]
    if "from" in drop:  # a From that is not the user: Sender gets added on top
        kept = [b"From: boss@example.com\r\n" if f.startswith(b"From:") else f for f in kept]
    source = b"".join(kept)
    result = clean(source, {}, conf)
    assert result.header.endswith(source)
    added = result.header[: len(result.header) - len(source)]
    assert added.count(b"\r\n") == len(result.changes)
    assert clean(result.header, {}, conf).changes == ()
