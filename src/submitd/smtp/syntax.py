"""Parsing of the MAIL and RCPT arguments: paths, mailboxes and ESMTP parameters.

This module is pure: it takes the text after the verb and returns plain values, or raises
:class:`SyntaxProblem` carrying the exact reply the session should send. Keeping it free of
I/O and session state lets every rule be tested from a table, and lets the session stay a
thin state machine.

Why a hand-written parser rather than one big regular expression: the grammar (RFC 5321
4.1.2, extended by RFC 6531 3.3) has quoted strings with escapes, address literals, source
routes and octet length limits, and the replies must tell a sender problem from a
recipient problem and a syntax problem from a policy one (RFC 6409 4.2 wants 554 for
domains that are not fully qualified). Small named checks make each of those decisions
visible and citable.

All lengths are counted in UTF-8 octets, because that is what the limits of RFC 5321
4.5.3.1 are about and what a client under SMTPUTF8 actually sends.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from submitd.smtp.replies import Reply

__all__ = [
    "MailParams",
    "Mailbox",
    "RcptParams",
    "SyntaxProblem",
    "decode_xtext",
    "is_fully_qualified",
    "parse_forward_path",
    "parse_mail_params",
    "parse_params",
    "parse_rcpt_params",
    "parse_reverse_path",
    "split_argument",
]


class SyntaxProblem(Exception):
    """A MAIL or RCPT argument the session must refuse, with the reply to refuse it with.

    The parser decides the reply (code, enhanced code, text) because only it knows which
    rule failed; the session just sends ``.reply`` and counts the error.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced or ''} {' '.join(reply.lines)}".strip())
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox, kept exactly as the client wrote it.

    Nothing is normalised (no case folding, no unquoting, no IDNA conversion) so that the
    address we store, log and deliver to is byte for byte the one the client gave; the
    local part in particular is case-sensitive (RFC 5321 2.4).
    """

    local: str  # local part as written (a Quoted-string keeps its quotes and escapes)
    domain: str  # domain name or address literal as written; "" only for <Postmaster>

    def __str__(self) -> str:
        # RFC 5321 4.1.1.3: the bare "<Postmaster>" recipient has no domain at all.
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class MailParams:
    """The MAIL parameters submitd understands, validated and decoded."""

    size: int | None  # RFC 1870 declared size
    body: str  # "7BIT", "8BITMIME" or "BINARYMIME" (RFC 6152, RFC 3030)
    smtputf8: bool  # RFC 6531 3.4
    ret: str | None  # "FULL" or "HDRS" (RFC 3461 4.3)
    envid: str | None  # RFC 3461 4.4, xtext decoded
    auth: str | None  # RFC 4954 5, xtext decoded; "<>" when the client gave so


@dataclass(frozen=True, slots=True)
class RcptParams:
    """The RCPT parameters submitd understands, validated and decoded."""

    notify: tuple[str, ...] | None  # RFC 3461 4.1: ("NEVER",) or SUCCESS/FAILURE/DELAY
    orcpt: str | None  # RFC 3461 4.2: "addr-type;address", xtext decoded


# --- Replies ----------------------------------------------------------------------------

_VERBS = {"FROM": "MAIL", "TO": "RCPT"}

# RFC 6409 5.1: 501 rejects a MAIL or RCPT with a detectably improper address;
# RFC 3463 3.2 gives 5.1.7 (sender) and 5.1.3 (destination) for bad address syntax.
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
# RFC 6409 4.2: the MSA MUST ensure all envelope domains are fully qualified, and uses 554.
SENDER_NOT_FQDN = Reply(554, "5.1.2", "Sender domain must be fully qualified (RFC 6409 4.2)")
RECIPIENT_NOT_FQDN = Reply(554, "5.1.2", "Recipient domain must be fully qualified (RFC 6409 4.2)")
# RFC 1870 6.1: a declared SIZE above the fixed maximum is refused with 552.
SIZE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")


def _param_problem(text: str, name: str) -> SyntaxProblem:
    # RFC 5321 4.1.1.11 / 4.2.3: 555 "MAIL FROM/RCPT TO parameters not recognized or not
    # implemented"; RFC 3463 3.6 gives 5.5.4 "Invalid command arguments".
    return SyntaxProblem(Reply(555, "5.5.4", f"{text}: {_printable(name)}"))


def _unsupported(name: str) -> SyntaxProblem:
    return _param_problem("Unsupported or malformed parameter", name)


def _printable(text: str, limit: int = 40) -> str:
    """Client text made safe to echo in a reply: no controls, no CR/LF, bounded length.

    A parameter name comes from the client; echoing it raw could split the reply line
    or flood the log.
    """
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


class _Malformed(Exception):
    """Internal: the path does not match the grammar; the caller picks the reply."""


# --- Character classes -------------------------------------------------------------------

# RFC 5322 3.2.3: atext = ALPHA / DIGIT / "!" / "#" / ... / "~" (RFC 5321 4.1.2 imports it).
_ATEXT = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
)

# RFC 5321 4.1.2: Let-dig = ALPHA / DIGIT; Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig;
# sub-domain = Let-dig [Ldh-str]. RFC 1035 2.3.4 / RFC 5321 4.5.3.1.2 bound labels at 63.
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# RFC 5321 4.1.3: Standardized-tag = Ldh-str.
_LDH_STR = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]")
# RFC 5321 4.1.3: IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT.
_IPV4_SHAPE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# RFC 5321 4.1.3: IPv6-addr is made of HEXDIG, ":" and (for IPv6v4 forms) "." and DIGIT.
# Spelling it out keeps out what ipaddress would otherwise accept, such as "%zone".
_IPV6_SHAPE = re.compile(r"[0-9A-Fa-f:.]+")
# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 1870 3 (4): size-value = 1*20DIGIT.
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")

# RFC 5321 4.5.3.1.1 / 4.5.3.1.2 / 4.5.3.1.3 size limits, in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
_MAX_LABEL = 63  # RFC 1035 2.3.4, via RFC 5321 4.1.2 sub-domain

# RFC 3461 4.4: the ENVID value is at most 100 characters.
MAX_ENVID = 100
# RFC 3461 3: NOTIFY and ORCPT together lengthen the RCPT line by at most 500 characters.
MAX_ORCPT = 500


def _octets(text: str) -> int:
    # surrogatepass so that a lone surrogate (undecodable input) is counted, not raised on;
    # the character checks reject it afterwards.
    return len(text.encode("utf-8", "surrogatepass"))


def _utf8_non_ascii(ch: str) -> bool:
    """RFC 6532 3.1 UTF8-non-ascii, as RFC 6531 3.3 admits it into atext and qtextSMTP.

    C1 controls are not text, and a surrogate means the line was not valid UTF-8 at all
    (as when decoded with surrogateescape), so both are refused.
    """
    return ord(ch) > 127 and unicodedata.category(ch) not in ("Cc", "Cs")


def _is_atext(ch: str, utf8: bool) -> bool:
    if ch in _ATEXT:
        return True
    # RFC 6531 3.3: atext =/ UTF8-non-ascii. No spaces of any kind outside quotes.
    return utf8 and _utf8_non_ascii(ch) and not ch.isspace()


def _is_qtext(ch: str, utf8: bool) -> bool:
    # RFC 5321 4.1.2: qtextSMTP = %d32-33 / %d35-91 / %d93-126 (not '"' nor '\').
    code = ord(ch)
    if 32 <= code <= 126:
        return ch not in '"\\'
    # RFC 6531 3.3: qtextSMTP =/ UTF8-non-ascii.
    return utf8 and _utf8_non_ascii(ch)


# --- Local part --------------------------------------------------------------------------


def _valid_dot_string(local: str, utf8: bool) -> bool:
    # RFC 5321 4.1.2: Dot-string = Atom *("." Atom); Atom = 1*atext. Hence no leading,
    # trailing or doubled dots: every piece between dots must be a non-empty Atom.
    return all(atom and all(_is_atext(ch, utf8) for ch in atom) for atom in local.split("."))


def _quoted_string_end(text: str, utf8: bool) -> int:
    """Index just past the Quoted-string that starts ``text``; raises _Malformed.

    RFC 5321 4.1.2: Quoted-string = DQUOTE *QcontentSMTP DQUOTE,
    QcontentSMTP = qtextSMTP / quoted-pairSMTP.
    """
    index = 1
    while index < len(text):
        ch = text[index]
        if ch == '"':
            return index + 1
        if ch == "\\":
            # RFC 5321 4.1.2: quoted-pairSMTP = %d92 %d32-126. RFC 6531 does not extend it,
            # so a backslash may not escape a non-ASCII character.
            nxt = text[index + 1 : index + 2]
            if not nxt or not 32 <= ord(nxt) <= 126:
                raise _Malformed
            index += 2
            continue
        if not _is_qtext(ch, utf8):
            raise _Malformed
        index += 1
    raise _Malformed  # no closing DQUOTE


# --- Domain ------------------------------------------------------------------------------


def _valid_u_label(label: str) -> bool:
    """A pragmatic check of an RFC 5890 2.3.2.1 U-label, admitted by RFC 6531 3.3.

    Full IDNA2008 validation needs Unicode tables the standard library lacks; this keeps
    the parts that matter for a submission server: only letters, marks and digits
    (roughly IDNA2008's PVALID), no leading combining mark (RFC 5891 4.2.3.2), no leading
    or trailing hyphen and no "--" in positions 3-4 (RFC 5891 4.2.3.1), NFC (RFC 5891
    5.3), and an A-label that fits the 63-octet DNS label (RFC 5890 2.3.2.1).
    """
    if label.startswith("-") or label.endswith("-") or label[2:4] == "--":
        return False
    if unicodedata.category(label[0]).startswith("M"):
        return False
    for ch in label:
        if ch.isascii():
            if not (ch.isalnum() or ch == "-"):
                return False
        elif unicodedata.category(ch)[0] not in "LMN":
            return False
    if not unicodedata.is_normalized("NFC", label):
        return False
    a_label = "xn--" + label.lower().encode("punycode").decode("ascii")
    return len(a_label) <= _MAX_LABEL


def _valid_domain_name(domain: str, utf8: bool) -> bool:
    # RFC 5321 4.1.2: Domain = sub-domain *("." sub-domain). An empty label (leading,
    # trailing or doubled dot) matches no sub-domain, so "example.com." is refused.
    if not domain or _octets(domain) > MAX_DOMAIN:  # RFC 5321 4.5.3.1.2
        return False
    for label in domain.split("."):
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label):
                return False
        elif not (utf8 and label and _valid_u_label(label)):  # RFC 6531 3.3: =/ U-label
            return False
    return True


def _valid_address_literal(literal: str) -> bool:
    # RFC 5321 4.1.2: address-literal = "[" ( IPv4-address-literal /
    #   IPv6-address-literal / General-address-literal ) "]"
    if len(literal) < 3 or literal[0] != "[" or literal[-1] != "]":
        return False
    body = literal[1:-1]
    tag, colon, content = body.partition(":")
    if not colon:
        # RFC 5321 4.1.3: IPv4-address-literal; Snum is 0-255. ipaddress also refuses
        # leading zeros ("010"), which some stacks read as octal: refusing is the safe side.
        if not _IPV4_SHAPE.fullmatch(body):
            return False
        try:
            ipaddress.IPv4Address(body)
        except ValueError:
            return False
        return True
    if tag.lower() == "ipv6":
        # RFC 5321 4.1.3: IPv6-address-literal = "IPv6:" IPv6-addr (ABNF strings are
        # case-insensitive, RFC 5234 2.3).
        if not _IPV6_SHAPE.fullmatch(content):
            return False
        try:
            ipaddress.IPv6Address(content)
        except ValueError:
            return False
        return True
    # RFC 5321 4.1.3: General-address-literal = Standardized-tag ":" 1*dcontent,
    # dcontent = %d33-90 / %d94-126 (printable ASCII except "[", "\", "]").
    return (
        _LDH_STR.fullmatch(tag) is not None
        and bool(content)
        and all(33 <= ord(ch) <= 90 or 94 <= ord(ch) <= 126 for ch in content)
    )


def _valid_domain(domain: str, utf8: bool) -> bool:
    # RFC 5321 4.1.2: Mailbox = Local-part "@" ( Domain / address-literal )
    if domain.startswith("["):
        return _valid_address_literal(domain)
    return _valid_domain_name(domain, utf8)


def is_fully_qualified(domain: str) -> bool:
    """Whether ``domain`` is fully qualified in the sense of RFC 6409 4.2.

    An MSA must not let a bare host name ("sales") into the envelope: it would be resolved
    differently by every relay downstream. Two or more non-empty labels count as qualified
    (the public suffix list is policy, not syntax); an address literal names a host
    directly and so is qualified too. This checks shape only, not the label syntax.
    """
    if len(domain) > 2 and domain.startswith("[") and domain.endswith("]"):
        return True
    labels = domain.split(".")
    return len(labels) >= 2 and all(labels)


# --- Paths -------------------------------------------------------------------------------


def _parse_mailbox(text: str, utf8: bool) -> Mailbox:
    # RFC 5321 4.1.2: Mailbox = Local-part "@" ( Domain / address-literal );
    # Local-part = Dot-string / Quoted-string.
    if text.startswith('"'):
        end = _quoted_string_end(text, utf8)
        local, at, domain = text[:end], text[end : end + 1], text[end + 1 :]
        if at != "@":
            raise _Malformed
    else:
        # A Dot-string cannot contain "@", so the first one ends it; any later "@" lands
        # in the domain, which then fails (unless inside a General-address-literal).
        local, at, domain = text.partition("@")
        if not at or not _valid_dot_string(local, utf8):
            raise _Malformed
    if _octets(local) > MAX_LOCAL_PART:  # RFC 5321 4.5.3.1.1
        raise _Malformed
    if not _valid_domain(domain, utf8):
        raise _Malformed
    return Mailbox(local, domain)


def _parse_path(path: str, utf8: bool) -> Mailbox:
    # RFC 5321 4.5.3.1.3: a path is at most 256 octets, punctuation included.
    if _octets(path) > MAX_PATH:
        raise _Malformed
    # RFC 5321 4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">"
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise _Malformed
    inner = path[1:-1]
    if inner.startswith("@"):
        # RFC 5321 4.1.2: A-d-l = At-domain *( "," At-domain ), At-domain = "@" Domain.
        # The source route "MUST BE accepted, SHOULD NOT be generated, and SHOULD be
        # ignored" (RFC 5321 4.1.2, Appendix C): check its syntax, then drop it. No
        # Domain contains ":", so the first one closes the route.
        route, colon, inner = inner.partition(":")
        if not colon:
            raise _Malformed
        for hop in route.split(","):
            if not hop.startswith("@") or not _valid_domain_name(hop[1:], utf8):
                raise _Malformed
    return _parse_mailbox(inner, utf8)


def parse_reverse_path(path: str, *, utf8: bool) -> Mailbox | None:
    """Parse the MAIL FROM path; ``None`` stands for the null reverse-path ``<>``.

    ``path`` is the first value :func:`split_argument` returned. ``utf8`` is whether the
    client gave SMTPUTF8 on this MAIL command: without it, non-ASCII is a syntax error
    (RFC 6531 3.3 extends the grammar only under the extension).
    """
    # RFC 5321 4.1.1.2: Reverse-path = Path / "<>". Bounces and other notifications use
    # the null path, and RFC 6409 3.2 says it MUST NOT in itself be cause for rejection.
    if path == "<>":
        return None
    try:
        mailbox = _parse_path(path, utf8)
    except _Malformed:
        raise SyntaxProblem(BAD_SENDER) from None
    if not is_fully_qualified(mailbox.domain):  # RFC 6409 4.2
        raise SyntaxProblem(SENDER_NOT_FQDN)
    return mailbox


def parse_forward_path(path: str, *, utf8: bool) -> Mailbox:
    """Parse an RCPT TO path; ``<Postmaster>`` alone gives ``Mailbox("Postmaster", "")``.

    The null path is not a recipient, and any domain must be fully qualified
    (RFC 6409 4.2); syntax errors come first so the client learns the more basic fault.
    """
    # RFC 5321 4.1.1.3: Forward-path = "<Postmaster@" Domain ">" / "<Postmaster>" / Path,
    # and "Postmaster" is case-insensitive there. It is returned in one canonical spelling
    # so routing can compare it without case folding.
    if path.lower() == "<postmaster>":
        return Mailbox("Postmaster", "")
    try:
        mailbox = _parse_path(path, utf8)
    except _Malformed:
        raise SyntaxProblem(BAD_RECIPIENT) from None
    if not is_fully_qualified(mailbox.domain):  # RFC 6409 4.2
        raise SyntaxProblem(RECIPIENT_NOT_FQDN)
    return mailbox


# --- Splitting the argument ------------------------------------------------------------


def _path_end(text: str) -> int:
    """Index just past the ">" closing the path that starts ``text``, or -1.

    A ">" may legally occur inside a Quoted-string (RFC 5321 4.1.2 qtextSMTP) and inside
    a General-address-literal (dcontent includes %d62), so the scan skips both; it does
    not validate them, that is the path parser's job.
    """
    in_quote = in_literal = False
    index = 1
    while index < len(text):
        ch = text[index]
        if in_quote:
            if ch == "\\":
                index += 2
                continue
            if ch == '"':
                in_quote = False
        elif in_literal:
            if ch == "]":
                in_literal = False
        elif ch == '"':
            in_quote = True
        elif ch == "[":
            in_literal = True
        elif ch == ">":
            return index + 1
        index += 1
    return -1


def split_argument(arg: str, keyword: str) -> tuple[str, str]:
    """Split ``" FROM:<a@b.example> SIZE=10"`` into ``("<a@b.example>", "SIZE=10")``.

    ``keyword`` is ``"FROM"`` (MAIL) or ``"TO"`` (RCPT), matched case-insensitively
    (RFC 5321 2.4: verbs and argument keywords are case-insensitive). RFC 5321 4.1.1.2
    and 4.1.1.3 put no space between the colon and the path, but many clients send
    ``FROM: <a@b>`` and refusing them helps nobody, so spaces there are skipped. Only
    the framing is checked here; the path and the parameters are parsed separately so
    that their errors can get their own replies.
    """
    verb = _VERBS.get(keyword.upper())
    if verb is None:
        raise ValueError(f"keyword must be FROM or TO, not {keyword!r}")
    # RFC 5321 4.2.3 / RFC 3463 3.6: 501 5.5.4 for a malformed command argument.
    usage = SyntaxProblem(Reply(501, "5.5.4", f"Syntax: {verb} {keyword.upper()}:<address>"))

    text = arg.lstrip(" ")
    head = text[: len(keyword)]
    if not head.isascii() or head.upper() != keyword.upper():
        raise usage
    rest = text[len(keyword) :]
    if not rest.startswith(":"):
        raise usage
    rest = rest[1:].lstrip(" ")  # leniency: "FROM: <a@b>"
    if not rest.startswith("<"):
        raise usage
    end = _path_end(rest)
    if end < 0:
        raise usage
    path, params = rest[:end], rest[end:]
    # RFC 5321 4.1.1.2: "MAIL FROM:" Reverse-path [SP Mail-parameters] CRLF.
    if params and not params.startswith(" "):
        raise usage
    return path, params.strip(" ")


# --- ESMTP parameters ------------------------------------------------------------------


def _is_esmtp_value_char(ch: str) -> bool:
    # RFC 5321 4.1.2: esmtp-value = 1*(%d33-60 / %d62-126), i.e. no "=", SP or controls;
    # RFC 6531 3.3: esmtp-value =/ UTF8-non-ascii.
    code = ord(ch)
    return (33 <= code <= 126 and ch != "=") or _utf8_non_ascii(ch)


def parse_params(text: str) -> dict[str, str | None]:
    """Split Mail-parameters / Rcpt-parameters into ``{KEYWORD: value or None}``.

    Keywords are uppercased (RFC 5321 2.4: they are case-insensitive) so the MAIL and
    RCPT interpreters can look them up directly. A keyword given twice is refused rather
    than letting the last one win silently: it is ambiguous which one the client meant.
    Runs of spaces between parameters are tolerated.
    """
    params: dict[str, str | None] = {}
    # RFC 5321 4.1.2: Mail-parameters = esmtp-param *(SP esmtp-param)
    for token in text.split(" "):
        if not token:
            continue
        # RFC 5321 4.1.2: esmtp-param = esmtp-keyword ["=" esmtp-value]
        keyword, equals, value = token.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(keyword):
            raise _param_problem("Malformed parameter", token)
        name = keyword.upper()
        if name in params:
            raise _param_problem("Duplicate parameter", name)
        if equals:
            if not value or not all(_is_esmtp_value_char(ch) for ch in value):
                raise _param_problem("Malformed parameter value", name)
            params[name] = value
        else:
            params[name] = None
    return params


def decode_xtext(text: str) -> str:
    """Decode RFC 3461 4 xtext (used by ENVID, ORCPT and AUTH) into text.

    xtext = *( xchar / hexchar ); xchar = %d33-126 except "+" and "="; hexchar = "+"
    followed by two uppercase hex digits. The decoded octets are read as UTF-8, since that
    is what a client encodes a non-ASCII address into. Raises ValueError on anything else,
    including lowercase hex, which RFC 3461 4 does not allow.
    """
    out = bytearray()
    index = 0
    while index < len(text):
        ch = text[index]
        if ch == "+":
            digits = text[index + 1 : index + 3]
            if len(digits) != 2 or any(d not in "0123456789ABCDEF" for d in digits):
                raise ValueError(f"malformed xtext hexchar at offset {index}")
            out.append(int(digits, 16))
            index += 3
        elif 33 <= ord(ch) <= 126 and ch != "=":
            out.append(ord(ch))
            index += 1
        else:
            raise ValueError(f"character not allowed in xtext at offset {index}")
    return out.decode("utf-8")  # UnicodeDecodeError is a ValueError


def _decode_xtext_param(name: str, value: str | None) -> str:
    if value is None:
        raise _unsupported(name)
    try:
        return decode_xtext(value)
    except ValueError:
        raise _unsupported(name) from None


def parse_mail_params(params: dict[str, str | None], *, max_size: int) -> MailParams:
    """Interpret the MAIL parameters; anything not understood is refused with 555.

    RFC 5321 4.1.1.11: a parameter the server does not recognize or cannot implement
    gets 555. Ignoring it instead would leave the client believing it got a behaviour
    (a DSN, a size check) it will not get. ``max_size`` is the SIZE advertised in EHLO;
    as there (RFC 1870 3 (3)), 0 means no fixed limit. The SIZE limit is checked after
    all the syntax, so a malformed command gets a syntax reply rather than a policy one.
    """
    size: int | None = None
    body = "7BIT"
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None

    for raw_name, value in params.items():
        name = raw_name.upper()
        if name == "SIZE":
            # RFC 1870 3 (4): size-value = 1*20DIGIT; RFC 1870 6: one SIZE only
            if value is None or not _SIZE_VALUE.fullmatch(value):
                raise _unsupported(name)
            size = int(value)
        elif name == "BODY":
            # RFC 6152 2: BODY=7BIT / 8BITMIME; RFC 3030 3: BODY=BINARYMIME.
            if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                raise _unsupported(name)
            body = value.upper()
        elif name == "SMTPUTF8":
            # RFC 6531 3.4: "If this parameter is provided, it MUST not accept a value."
            if value is not None:
                raise _unsupported(name)
            smtputf8 = True
        elif name == "RET":
            # RFC 3461 4.3: ret-value = "FULL" / "HDRS"
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise _unsupported(name)
            ret = value.upper()
        elif name == "ENVID":
            # RFC 3461 4.4: envid-parameter = "ENVID=" xtext, at most 100 characters, and
            # the decoded value MUST be printable US-ASCII (graphic and white space).
            if value is not None and len(value) > MAX_ENVID:
                raise _unsupported(name)
            envid = _decode_xtext_param(name, value)
            if not all(32 <= ord(ch) <= 126 or ch == "\t" for ch in envid):
                raise _unsupported(name)
        elif name == "AUTH":
            # RFC 4954 5: "AUTH=" xtext, or "<>" when the submitter is unknown. "<>" is
            # itself valid xtext and decodes to "<>", so one path serves both.
            auth = _decode_xtext_param(name, value)
        else:
            raise _unsupported(name)

    # RFC 1870 6.1: refuse a declared size above the fixed maximum with 552.
    if size is not None and max_size > 0 and size > max_size:
        raise SyntaxProblem(SIZE_TOO_BIG)
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid, auth=auth)


_NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


def _parse_notify(value: str | None) -> tuple[str, ...]:
    # RFC 3461 4.1: notify-esmtp-value = "NEVER" / 1#notify-list-element,
    # notify-list-element = "SUCCESS" / "FAILURE" / "DELAY".
    if value is None:
        raise _unsupported("NOTIFY")
    items = tuple(item.upper() for item in value.split(","))
    if any(item not in _NOTIFY_VALUES for item in items):
        raise _unsupported("NOTIFY")
    if len(set(items)) != len(items):  # each element at most once
        raise _unsupported("NOTIFY")
    if "NEVER" in items and len(items) > 1:  # "NEVER" stands alone
        raise _unsupported("NOTIFY")
    return items


def _parse_orcpt(value: str | None) -> str:
    # RFC 3461 4.2: original-recipient-address = addr-type ";" xtext; addr-type = atom.
    if value is None or len(value) > MAX_ORCPT:  # RFC 3461 3
        raise _unsupported("ORCPT")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not addr_type or any(ch not in _ATEXT for ch in addr_type):
        raise _unsupported("ORCPT")
    address = _decode_xtext_param("ORCPT", encoded)
    if not address:  # an original recipient with no address says nothing
        raise _unsupported("ORCPT")
    # addr-type is case-insensitive (it is an IANA-registered name, e.g. "rfc822"); one
    # spelling keeps the DSN code simple.
    return f"{addr_type.lower()};{address}"


def parse_rcpt_params(params: dict[str, str | None]) -> RcptParams:
    """Interpret the RCPT parameters (RFC 3461 DSN); anything else is refused with 555.

    As for MAIL, an unknown parameter gets 555 rather than being ignored (RFC 5321
    4.1.1.11).
    """
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for raw_name, value in params.items():
        name = raw_name.upper()
        if name == "NOTIFY":
            notify = _parse_notify(value)
        elif name == "ORCPT":
            orcpt = _parse_orcpt(value)
        else:
            raise _unsupported(name)
    return RcptParams(notify=notify, orcpt=orcpt)
