"""Table-driven tests for submitd.smtp.syntax, the MAIL/RCPT argument parser.

Each table row is one client input and the outcome the RFCs call for, so a failing row
names the exact rule that broke.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from submitd.smtp.replies import Reply
from submitd.smtp.syntax import (
    Mailbox,
    MailParams,
    RcptParams,
    SyntaxProblem,
    decode_xtext,
    is_fully_qualified,
    parse_forward_path,
    parse_mail_params,
    parse_params,
    parse_rcpt_params,
    parse_reverse_path,
    split_argument,
)

MAIL_USAGE = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_USAGE = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
SENDER_NOT_FQDN = Reply(554, "5.1.2", "Sender domain must be fully qualified (RFC 6409 4.2)")
RECIPIENT_NOT_FQDN = Reply(554, "5.1.2", "Recipient domain must be fully qualified (RFC 6409 4.2)")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")

LONG_LABEL = "a" * 63
LOCAL_64 = "l" * 64


def _problem(call: object) -> Reply:
    """Run ``call`` (a zero-argument callable) and return the reply it refused with."""
    assert callable(call)
    with pytest.raises(SyntaxProblem) as info:
        call()
    return info.value.reply


# --- split_argument ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "keyword", "expected"),
    [
        (" FROM:<a@b.example> SIZE=10", "FROM", ("<a@b.example>", "SIZE=10")),
        ("FROM:<a@b.example>", "FROM", ("<a@b.example>", "")),
        (" from:<a@b.example>", "FROM", ("<a@b.example>", "")),
        (" FROM:<>", "FROM", ("<>", "")),
        (" FROM: <a@b.example>", "FROM", ("<a@b.example>", "")),  # common client leniency
        (
            " FROM:<a@b.example>  SIZE=1  BODY=8BITMIME ",
            "FROM",
            ("<a@b.example>", "SIZE=1  BODY=8BITMIME"),
        ),
        ("TO:<x@y.example>", "TO", ("<x@y.example>", "")),
        (" To:<x@y.example> NOTIFY=NEVER", "TO", ("<x@y.example>", "NOTIFY=NEVER")),
        (' TO:<"a>b"@x.example>', "TO", ('<"a>b"@x.example>', "")),
        (' TO:<"a\\">b"@x.example> X=1', "TO", ('<"a\\">b"@x.example>', "X=1")),
        (" TO:<a@[tag:x>y]> X=1", "TO", ("<a@[tag:x>y]>", "X=1")),
        (" TO:<Postmaster>", "TO", ("<Postmaster>", "")),
    ],
)
def test_split_argument_good(arg: str, keyword: str, expected: tuple[str, str]) -> None:
    assert split_argument(arg, keyword) == expected


@pytest.mark.parametrize(
    ("arg", "keyword", "reply"),
    [
        ("", "FROM", MAIL_USAGE),
        (" FROM", "FROM", MAIL_USAGE),
        (" FROM<a@b.example>", "FROM", MAIL_USAGE),
        (" FROM :<a@b.example>", "FROM", MAIL_USAGE),
        (" FROM:a@b.example", "FROM", MAIL_USAGE),
        (" FROM:<a@b.example", "FROM", MAIL_USAGE),
        (" FROM:<a@b.example>SIZE=10", "FROM", MAIL_USAGE),
        (" TO:<a@b.example>", "FROM", MAIL_USAGE),
        (" FROM:<a@b.example>", "TO", RCPT_USAGE),
        (" TO:", "TO", RCPT_USAGE),
        (' TO:<"a>b@x.example>', "TO", RCPT_USAGE),  # unterminated quote
        (" TOO:<a@b.example>", "TO", RCPT_USAGE),
    ],
)
def test_split_argument_bad(arg: str, keyword: str, reply: Reply) -> None:
    assert _problem(lambda: split_argument(arg, keyword)) == reply


def test_split_argument_rejects_unknown_keyword() -> None:
    with pytest.raises(ValueError):
        split_argument(" X:<a@b.example>", "X")


# --- Paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "utf8", "expected"),
    [
        ("<a@b.example>", False, Mailbox("a", "b.example")),
        ("<First.Last@Sub.Example.COM>", False, Mailbox("First.Last", "Sub.Example.COM")),
        ("<a!#$%&'*+-/=?^_`{|}~@x.example>", False, Mailbox("a!#$%&'*+-/=?^_`{|}~", "x.example")),
        ('<"john doe"@x.example>', False, Mailbox('"john doe"', "x.example")),
        ('<"a\\"b\\\\c"@x.example>', False, Mailbox('"a\\"b\\\\c"', "x.example")),
        ('<"a@b"@x.example>', False, Mailbox('"a@b"', "x.example")),
        ('<""@x.example>', False, Mailbox('""', "x.example")),
        ("<a@[192.0.2.1]>", False, Mailbox("a", "[192.0.2.1]")),
        ("<a@[IPv6:2001:db8::1]>", False, Mailbox("a", "[IPv6:2001:db8::1]")),
        ("<a@[ipv6:::ffff:192.0.2.1]>", False, Mailbox("a", "[ipv6:::ffff:192.0.2.1]")),
        ("<a@[x-tag:some-content]>", False, Mailbox("a", "[x-tag:some-content]")),
        ("<@a.example,@b.example:u@d.example>", False, Mailbox("u", "d.example")),
        ("<@relay.example:u@d.example>", False, Mailbox("u", "d.example")),
        ("<a@xn--bcher-kva.example>", False, Mailbox("a", "xn--bcher-kva.example")),
        ("<a@1-2.b-c.example>", False, Mailbox("a", "1-2.b-c.example")),
        (f"<a@{LONG_LABEL}.example>", False, Mailbox("a", f"{LONG_LABEL}.example")),
        (f"<{LOCAL_64}@x.example>", False, Mailbox(LOCAL_64, "x.example")),
        ("<用户@例子.广告>", True, Mailbox("用户", "例子.广告")),
        ("<jöran@bücher.example>", True, Mailbox("jöran", "bücher.example")),
        ('<"δοκιμή test"@x.example>', True, Mailbox('"δοκιμή test"', "x.example")),
        ("<a@[192.0.2.1]>", True, Mailbox("a", "[192.0.2.1]")),
        ("<@例子.广告:u@d.example>", True, Mailbox("u", "d.example")),
    ],
)
def test_paths_good(path: str, utf8: bool, expected: Mailbox) -> None:
    assert parse_forward_path(path, utf8=utf8) == expected
    assert parse_reverse_path(path, utf8=utf8) == expected


BAD_PATHS = [
    "<>x",
    "a@b.example",
    "<a@b.example",
    "<a>",
    "<@b.example>",
    "<a@>",
    "<@x.example:>",
    "<.a@x.example>",
    "<a.@x.example>",
    "<a..b@x.example>",
    "<a b@x.example>",
    "< a@x.example>",
    "<a@x.example >",
    "<a@b@x.example>",
    "<a(comment)@x.example>",
    '<"a"b@x.example>',
    '<"a@x.example>',
    '<"a\\\x01"@x.example>',  # quoted-pairSMTP is %d92 %d32-126 only
    '<"tab\there"@x.example>',
    "<a@x.example.>",  # trailing dot
    "<a@.x.example>",
    "<a@x..example>",
    "<a@-x.example>",
    "<a@x-.example>",
    "<a@x_y.example>",
    f"<a@{'a' * 64}.example>",  # label over 63
    f"<{'l' * 65}@x.example>",  # local part over 64
    f'<"{"q" * 63}"@x.example>',  # quoted local part over 64 with its quotes
    "<a@" + ".".join(["abcdefghi"] * 26) + ">",  # domain over 255, path over 256
    "<a@[192.0.2.256]>",
    "<a@[192.0.2]>",
    "<a@[192.0.2.01]>",
    "<a@[IPv6:2001:db8::zz]>",
    "<a@[IPv6:fe80::1%eth0]>",
    "<a@[IPv6:1.2.3.4]>",
    "<a@[tag:]>",
    "<a@[-:x]>",
    "<a@[tag:a[b]>",
    "<a@[]>",
    "<@a.example,b.example:u@d.example>",  # each route hop needs "@"
    "<@a.example u@d.example>",
    "<@[192.0.2.1]:u@d.example>",  # At-domain is a Domain, not a literal
    "<用户@x.example>",  # UTF-8 without SMTPUTF8
    "<a@例子.广告>",
    '<"δ"@x.example>',
    "<a\x00b@x.example>",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_paths_bad_syntax(path: str) -> None:
    assert _problem(lambda: parse_reverse_path(path, utf8=False)) == BAD_SENDER
    assert _problem(lambda: parse_forward_path(path, utf8=False)) == BAD_RECIPIENT


@pytest.mark.parametrize(
    "path",
    [
        "<a b@x.example>",
        "<a\u00a0b@x.example>",  # no-break space is not atext even under SMTPUTF8
        "<a\x85b@x.example>",  # C1 control
        "<a\udcffb@x.example>",  # lone surrogate: the input was not UTF-8
        "<a@bü_cher.example>",
        "<a@-bücher.example>",
        "<a@bu\u0308cher.example>",  # not NFC
        "<a@\u0308x.example>",  # starts with a combining mark
        "<a@☃.example>",  # a symbol, not a letter
        '<"\\é"@x.example>',  # quoted-pairSMTP stays ASCII under RFC 6531
        "<a@" + "ü" * 60 + ".example>",  # A-label longer than 63
    ],
)
def test_paths_bad_syntax_utf8(path: str) -> None:
    assert _problem(lambda: parse_forward_path(path, utf8=True)) == BAD_RECIPIENT


def test_path_length_counts_octets() -> None:
    # 64 characters but 128 octets: RFC 5321 4.5.3.1.1 limits octets.
    path = "<" + "é" * 64 + "@x.example>"
    assert _problem(lambda: parse_forward_path(path, utf8=True)) == BAD_RECIPIENT
    assert parse_forward_path("<" + "é" * 32 + "@x.example>", utf8=True).local == "é" * 32


def test_path_length_limit_is_256() -> None:
    # RFC 5321 4.5.3.1.3: 256 octets for the whole path, "<", ">" and route included.
    domain = ".".join(["b" * 60] * 3) + ".example"  # 190 octets
    route = "@" + "r" * 40 + ".example:"  # 50 octets
    local = "l" * (256 - len("<@>") - len(domain) - len(route))  # 13 octets
    fits = f"<{route}{local}@{domain}>"
    assert len(fits) == 256
    assert parse_forward_path(fits, utf8=False) == Mailbox(local, domain)
    too_long = f"<{route}{local}l@{domain}>"
    assert _problem(lambda: parse_forward_path(too_long, utf8=False)) == BAD_RECIPIENT


@pytest.mark.parametrize("path", ["<a@sales>", "<a@localhost>", '<"x y"@SALES>'])
def test_paths_not_fully_qualified(path: str) -> None:
    assert _problem(lambda: parse_reverse_path(path, utf8=False)) == SENDER_NOT_FQDN
    assert _problem(lambda: parse_forward_path(path, utf8=False)) == RECIPIENT_NOT_FQDN


def test_not_fully_qualified_utf8_label() -> None:
    assert _problem(lambda: parse_forward_path("<a@例子>", utf8=True)) == RECIPIENT_NOT_FQDN


def test_syntax_error_wins_over_fqdn() -> None:
    assert _problem(lambda: parse_forward_path("<a..b@sales>", utf8=False)) == BAD_RECIPIENT


def test_route_does_not_need_fqdn_but_mailbox_does() -> None:
    assert parse_forward_path("<@relay:u@d.example>", utf8=False) == Mailbox("u", "d.example")
    assert _problem(lambda: parse_forward_path("<@r.example:u@d>", utf8=False)) == (
        RECIPIENT_NOT_FQDN
    )


def test_null_reverse_path() -> None:
    assert parse_reverse_path("<>", utf8=False) is None
    assert parse_reverse_path("<>", utf8=True) is None


def test_null_forward_path_is_an_error() -> None:
    assert _problem(lambda: parse_forward_path("<>", utf8=False)) == BAD_RECIPIENT


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_recipient(path: str) -> None:
    mailbox = parse_forward_path(path, utf8=False)
    assert mailbox == Mailbox("Postmaster", "")
    assert str(mailbox) == "Postmaster"


def test_bare_postmaster_is_not_a_sender() -> None:
    assert _problem(lambda: parse_reverse_path("<Postmaster>", utf8=False)) == BAD_SENDER


def test_postmaster_with_domain_is_an_ordinary_mailbox() -> None:
    assert parse_forward_path("<postmaster@x.example>", utf8=False) == Mailbox(
        "postmaster", "x.example"
    )


def test_mailbox_str() -> None:
    assert str(Mailbox('"a b"', "[192.0.2.1]")) == '"a b"@[192.0.2.1]'


# --- is_fully_qualified --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", True),
        ("a.b.c", True),
        ("例子.广告", True),
        ("[192.0.2.1]", True),
        ("[IPv6:::1]", True),
        ("sales", False),
        ("", False),
        ("example.", False),
        (".example", False),
        ("[]", False),
    ],
)
def test_is_fully_qualified(domain: str, expected: bool) -> None:
    assert is_fully_qualified(domain) is expected


# --- parse_params --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("SIZE=10", {"SIZE": "10"}),
        ("size=10 body=8bitmime", {"SIZE": "10", "BODY": "8bitmime"}),
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("X-FOO=a<b>c~", {"X-FOO": "a<b>c~"}),
        ("ENVID=QQ+2B1  RET=HDRS", {"ENVID": "QQ+2B1", "RET": "HDRS"}),
        ("X=ünïcode", {"X": "ünïcode"}),  # RFC 6531 3.3: esmtp-value =/ UTF8-non-ascii
        ("9X=1", {"9X": "1"}),
    ],
)
def test_parse_params_good(text: str, expected: dict[str, str | None]) -> None:
    assert parse_params(text) == expected


@pytest.mark.parametrize(
    ("text", "text_in_reply"),
    [
        ("SIZE=10 size=20", "Duplicate parameter: SIZE"),
        ("SMTPUTF8 smtputf8", "Duplicate parameter: SMTPUTF8"),
        ("SIZE=", "Malformed parameter value: SIZE"),
        ("X=a=b", "Malformed parameter value: X"),
        ("X=a\tb", "Malformed parameter value: X"),
        ("X=a\x7fb", "Malformed parameter value: X"),
        ("-X=1", "Malformed parameter: -X=1"),
        ("X_Y=1", "Malformed parameter: X_Y=1"),
        ("=1", "Malformed parameter: =1"),
        ("KÉY=1", "Malformed parameter: K?Y=1"),
        ("A\rB=1", "Malformed parameter: A?B=1"),
    ],
)
def test_parse_params_bad(text: str, text_in_reply: str) -> None:
    assert _problem(lambda: parse_params(text)) == Reply(555, "5.5.4", text_in_reply)


def test_parse_params_long_bad_name_is_truncated() -> None:
    reply = _problem(lambda: parse_params("_" * 500))
    assert isinstance(reply.text, str)
    assert len(reply.text) < 100


# --- parse_mail_params ---------------------------------------------------------------------


def _mail(text: str, max_size: int = 1000) -> MailParams:
    return parse_mail_params(parse_params(text), max_size=max_size)


DEFAULT_MAIL = MailParams(size=None, body="7BIT", smtputf8=False, ret=None, envid=None, auth=None)


@pytest.mark.parametrize(
    ("text", "max_size", "expected"),
    [
        ("", 1000, DEFAULT_MAIL),
        ("SIZE=1000", 1000, MailParams(1000, "7BIT", False, None, None, None)),
        ("SIZE=0", 1000, MailParams(0, "7BIT", False, None, None, None)),
        ("SIZE=" + "9" * 20, 0, MailParams(10**20 - 1, "7BIT", False, None, None, None)),
        ("body=8bitmime", 1000, MailParams(None, "8BITMIME", False, None, None, None)),
        ("BODY=BinaryMIME", 1000, MailParams(None, "BINARYMIME", False, None, None, None)),
        ("BODY=7bit", 1000, DEFAULT_MAIL),
        ("SMTPUTF8", 1000, MailParams(None, "7BIT", True, None, None, None)),
        ("RET=full", 1000, MailParams(None, "7BIT", False, "FULL", None, None)),
        ("RET=HDRS", 1000, MailParams(None, "7BIT", False, "HDRS", None, None)),
        ("ENVID=QQ314159+2B+3D", 1000, MailParams(None, "7BIT", False, None, "QQ314159+=", None)),
        ("ENVID=a+20b", 1000, MailParams(None, "7BIT", False, None, "a b", None)),
        ("ENVID=" + "e" * 100, 1000, MailParams(None, "7BIT", False, None, "e" * 100, None)),
        ("AUTH=<>", 1000, MailParams(None, "7BIT", False, None, None, "<>")),
        (
            "AUTH=e+2Bx@y.example",
            1000,
            MailParams(None, "7BIT", False, None, None, "e+x@y.example"),
        ),
        (
            "SIZE=5 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id AUTH=<>",
            10,
            MailParams(5, "8BITMIME", True, "HDRS", "id", "<>"),
        ),
    ],
)
def test_parse_mail_params_good(text: str, max_size: int, expected: MailParams) -> None:
    assert _mail(text, max_size) == expected


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("SIZE", "SIZE"),
        ("SIZE=12x", "SIZE"),
        ("SIZE=-1", "SIZE"),
        ("SIZE=+1", "SIZE"),
        ("SIZE=" + "1" * 21, "SIZE"),
        ("SIZE=١٢", "SIZE"),  # Arabic-Indic digits are not DIGIT
        ("BODY", "BODY"),
        ("BODY=8BIT", "BODY"),
        ("SMTPUTF8=yes", "SMTPUTF8"),
        ("RET", "RET"),
        ("RET=ALL", "RET"),
        ("ENVID", "ENVID"),
        ("ENVID=a+2b", "ENVID"),  # lowercase hex
        ("ENVID=a+2", "ENVID"),
        ("ENVID=a+0Ab", "ENVID"),  # decodes to a control character
        ("ENVID=" + "e" * 101, "ENVID"),
        ("AUTH", "AUTH"),
        ("AUTH=a+ZZ", "AUTH"),
        ("AUTH=a+FF", "AUTH"),  # not UTF-8 once decoded
        ("NOTIFY=NEVER", "NOTIFY"),  # RCPT parameter on MAIL
        ("X-UNKNOWN=1", "X-UNKNOWN"),
        ("DELIVERBY=100", "DELIVERBY"),
    ],
)
def test_parse_mail_params_bad(text: str, name: str) -> None:
    reply = _problem(lambda: _mail(text))
    assert reply == Reply(555, "5.5.4", f"Unsupported or malformed parameter: {name}")


def test_size_over_maximum() -> None:
    assert _problem(lambda: _mail("SIZE=1001", 1000)) == TOO_BIG


def test_size_zero_maximum_means_no_limit() -> None:
    assert _mail("SIZE=99999999999", 0).size == 99999999999


def test_malformed_parameter_wins_over_size() -> None:
    reply = _problem(lambda: _mail("SIZE=1001 BODY=9BIT", 1000))
    assert reply.code == 555


def test_mail_params_accept_lowercase_keys_given_directly() -> None:
    assert parse_mail_params({"size": "5"}, max_size=10).size == 5


# --- parse_rcpt_params ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", RcptParams(None, None)),
        ("NOTIFY=NEVER", RcptParams(("NEVER",), None)),
        ("notify=never", RcptParams(("NEVER",), None)),
        ("NOTIFY=SUCCESS,FAILURE,DELAY", RcptParams(("SUCCESS", "FAILURE", "DELAY"), None)),
        ("NOTIFY=delay,Failure", RcptParams(("DELAY", "FAILURE"), None)),
        ("ORCPT=rfc822;a+2Bb@x.example", RcptParams(None, "rfc822;a+b@x.example")),
        ("ORCPT=RFC822;a@x.example", RcptParams(None, "rfc822;a@x.example")),
        ("ORCPT=rfc822;j+C3+B6ran@x.example", RcptParams(None, "rfc822;jöran@x.example")),
        (
            "NOTIFY=FAILURE ORCPT=rfc822;u@d.example",
            RcptParams(("FAILURE",), "rfc822;u@d.example"),
        ),
    ],
)
def test_parse_rcpt_params_good(text: str, expected: RcptParams) -> None:
    assert parse_rcpt_params(parse_params(text)) == expected


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("NOTIFY", "NOTIFY"),
        ("NOTIFY=NEVER,SUCCESS", "NOTIFY"),
        ("NOTIFY=SUCCESS,NEVER", "NOTIFY"),
        ("NOTIFY=SUCCESS,SUCCESS", "NOTIFY"),
        ("NOTIFY=SUCCESS,", "NOTIFY"),
        ("NOTIFY=,SUCCESS", "NOTIFY"),
        ("NOTIFY=ALWAYS", "NOTIFY"),
        ("ORCPT", "ORCPT"),
        ("ORCPT=a@x.example", "ORCPT"),  # no addr-type
        ("ORCPT=;a@x.example", "ORCPT"),
        ("ORCPT=rfc822;", "ORCPT"),
        ("ORCPT=rfc822;a+2bb@x.example", "ORCPT"),
        ("ORCPT=rfc(822);a@x.example", "ORCPT"),
        ("ORCPT=rfc822;" + "a" * 500, "ORCPT"),
        ("SIZE=10", "SIZE"),  # MAIL parameter on RCPT
        ("X-OTHER", "X-OTHER"),
    ],
)
def test_parse_rcpt_params_bad(text: str, name: str) -> None:
    reply = _problem(lambda: parse_rcpt_params(parse_params(text)))
    assert reply == Reply(555, "5.5.4", f"Unsupported or malformed parameter: {name}")


# --- decode_xtext --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("plain", "plain"),
        ("a+2Bb", "a+b"),
        ("+3D+2B+20", "=+ "),
        ("<>", "<>"),
        ("caf+C3+A9", "café"),
        ("!~", "!~"),
    ],
)
def test_decode_xtext_good(text: str, expected: str) -> None:
    assert decode_xtext(text) == expected


@pytest.mark.parametrize(
    "text",
    ["a+", "a+2", "a+2b", "a+G0", "a=b", "a b", "é", "a\x7f", "+FF", "+C3"],
)
def test_decode_xtext_bad(text: str) -> None:
    with pytest.raises(ValueError):
        decode_xtext(text)


# --- Property: generated mailboxes round-trip ---------------------------------------------

_ATEXT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
_QTEXT = "".join(chr(c) for c in range(32, 127) if chr(c) not in '"\\')
_LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_UTF8_LETTERS = "éüößçñåøλδπжя中文字例用户"

atoms = st.text(alphabet=_ATEXT, min_size=1, max_size=12)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join)
quoted_strings = st.lists(
    st.one_of(
        st.sampled_from(_QTEXT),
        st.sampled_from([chr(c) for c in range(32, 127)]).map(lambda c: "\\" + c),
    ),
    max_size=20,
).map(lambda parts: '"' + "".join(parts) + '"')
labels = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_LDH),
    st.text(alphabet=_LDH + "-", max_size=10),
    st.sampled_from(_LDH),
) | st.sampled_from(_LDH)
domain_names = st.lists(labels, min_size=2, max_size=4).map(".".join)
ipv4_literals = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
ipv6_literals = st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]")
ascii_mailboxes = st.builds(
    Mailbox,
    local=dot_strings | quoted_strings,
    domain=domain_names | ipv4_literals | ipv6_literals,
)

utf8_atoms = st.text(alphabet=_ATEXT + _UTF8_LETTERS, min_size=1, max_size=8)
utf8_labels = st.text(alphabet=_LDH + _UTF8_LETTERS, min_size=1, max_size=8)
utf8_mailboxes = st.builds(
    Mailbox,
    local=st.lists(utf8_atoms, min_size=1, max_size=3).map(".".join),
    domain=st.lists(utf8_labels, min_size=2, max_size=3).map(".".join),
)


def _fits(mailbox: Mailbox) -> bool:
    return len(mailbox.local.encode()) <= 64 and len(str(mailbox).encode()) + 2 <= 256


@given(ascii_mailboxes)
def test_round_trip_ascii(mailbox: Mailbox) -> None:
    assume(_fits(mailbox))
    parsed = parse_forward_path("<" + str(mailbox) + ">", utf8=False)
    assert parsed == mailbox
    assert str(parsed) == str(mailbox)
    assert parse_reverse_path("<" + str(mailbox) + ">", utf8=False) == mailbox


@given(utf8_mailboxes)
def test_round_trip_utf8(mailbox: Mailbox) -> None:
    assume(_fits(mailbox))
    assert str(parse_forward_path("<" + str(mailbox) + ">", utf8=True)) == str(mailbox)


@given(ascii_mailboxes, st.lists(domain_names, min_size=1, max_size=3))
def test_round_trip_ignores_source_route(mailbox: Mailbox, route: list[str]) -> None:
    path = "<" + ",".join("@" + hop for hop in route) + ":" + str(mailbox) + ">"
    assume(_fits(mailbox) and len(path.encode()) <= 256)
    assert parse_forward_path(path, utf8=False) == mailbox


@given(ascii_mailboxes)
def test_split_then_parse(mailbox: Mailbox) -> None:
    assume(_fits(mailbox))
    path, params = split_argument(f" TO:<{mailbox}> NOTIFY=NEVER", "TO")
    assert parse_forward_path(path, utf8=False) == mailbox
    assert parse_rcpt_params(parse_params(params)) == RcptParams(("NEVER",), None)


# --- Property: arbitrary input never escapes as anything but SyntaxProblem ----------------

_NASTY = st.text(
    alphabet=st.sampled_from(list('<>@"\\[]:,.; =+-aZ09é中\x00\t\r\n\x85\udcff')) | st.characters(),
    max_size=40,
)


@given(_NASTY, st.booleans())
def test_paths_only_raise_syntax_problem(text: str, utf8: bool) -> None:
    for parse in (parse_forward_path, parse_reverse_path):
        with contextlib.suppress(SyntaxProblem):
            parse(text, utf8=utf8)


@given(_NASTY)
def test_arguments_and_params_only_raise_syntax_problem(text: str) -> None:
    with contextlib.suppress(SyntaxProblem):
        split_argument(text, "FROM")
    try:
        params = parse_params(text)
    except SyntaxProblem:
        return
    for interpret in (
        lambda: parse_mail_params(params, max_size=100),
        lambda: parse_rcpt_params(params),
    ):
        with contextlib.suppress(SyntaxProblem):
            interpret()
