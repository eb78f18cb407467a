"""RFC 5322 address fields, parsed strictly, with the position of every addr-spec.

The address header fields (From, Sender, Reply-To, To, Cc, Bcc and their Resent-
variants) must be checked before a message is queued (RFC 6409 4.2 and 5.1), and some of
them rewritten (RFC 6409 8.8). This module is the grammar for both.

Why a hand-written parser rather than the standard library:

* ``email.utils.getaddresses`` is built to read whatever arrives: it returns
  ``john doe@example.net`` as an address and turns ``x@@y`` into ``@y``, so it cannot
  tell a client "this field is broken" (RFC 6409 3.2: reject what the client can fix).
* ``email.headerregistry`` with ``policy.default`` is stricter, but it repairs as it
  goes (``<jdoe@example.net`` gets its ``>``, ``john doe@x`` becomes ``"john doe"@x``,
  ``a@b; c@d`` silently loses ``c@d``), reports every problem as the same
  ``InvalidHeaderDefect`` rather than one precise reason, and forgets where in the raw
  value each address was. Its engine is the private ``email._header_value_parser``,
  whose behaviour may change in any Python release.
* Rewriting a field without damaging it (DESIGN principle 4) needs the exact span of
  each addr-spec in the raw value, so that display names, comments and folding are kept
  byte for byte and only the address itself is replaced.

The grammar is RFC 5322 3.2-3.4 including the obsolete forms of section 4 that clients
still produce (obs-FWS, obs-phrase such as ``John Q. Public``, obs-local-part, obs-domain,
obs-route, empty list elements, obs-qtext). RFC 6532 3.2 admits UTF-8 in atoms, quoted
strings, comments and domain literals; whether an *address* may contain it depends on
the SMTPUTF8 transaction (RFC 6531 3.4), so the parser takes that as ``utf8``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AddressError",
    "Grammar",
    "Mailbox",
    "NeedsUtf8",
    "ParsedAddresses",
    "check_rewrite_rules",
    "is_fully_qualified",
    "parse_addr_spec",
    "parse_addresses",
    "remove_comments",
    "rewrite_address",
    "rewrite_parts",
    "same_address",
    "skip_cfws",
    "unquote_local",
    "valid_msg_id",
]

Grammar = Literal["mailbox", "mailbox-list", "address-list", "optional-address-list"]


class AddressError(ValueError):
    """The text does not match the grammar; ``reason`` says why, in words for a reply."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NeedsUtf8(AddressError):
    """An address with non-ASCII characters outside an SMTPUTF8 transaction (RFC 6532 3.2)."""

    def __init__(self, address: str) -> None:
        super().__init__(f"address {address} needs SMTPUTF8")
        self.address = address


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One addr-spec as written, and where it is in the parsed text.

    ``local`` and ``domain`` keep the client's spelling (quotes, escapes, case) with only
    CFWS and folding removed; ``start``/``end`` delimit the addr-spec in the text that was
    parsed, so a rewrite can replace exactly it.
    """

    local: str
    domain: str
    start: int
    end: int

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class ParsedAddresses:
    """The mailboxes of a field, group members included, in order of appearance."""

    mailboxes: tuple[Mailbox, ...]
    groups: int  # number of groups (RFC 5322 3.4 group), empty ones included


# --- Lexical level (RFC 5322 3.2) ---------------------------------------------------------

# RFC 5322 3.2.3: atext. UTF8-non-ascii is added below (RFC 6532 3.2).
_ATEXT = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
)
# RFC 5322 3.2.3: specials that are tokens on their own ('"', "[", "(" start longer ones).
_SPECIAL_TOKENS = frozenset("<>:;@,.")
_WSP = " \t"
_WSP_RUN = re.compile(r"[ \t]+")


def _is_atext(ch: str) -> bool:
    # RFC 6532 3.2: atext =/ UTF8-non-ascii. Undecodable octets (surrogate escapes) are
    # let through here and refused only inside an address, where they matter.
    return ch in _ATEXT or ord(ch) > 127


def _fold_end(text: str, pos: int) -> int:
    """Index past a fold (CRLF followed by WSP) at ``pos``; raises on a bare CR or LF.

    RFC 5322 3.2.2: FWS = ([*WSP CRLF] 1*WSP); obs-FWS (4.2) allows several folds in a row
    and lines of white space only, which the callers' loops accept naturally.
    """
    if text.startswith("\r\n", pos) and text[pos + 2 : pos + 3] in (" ", "\t"):
        return pos + 2
    raise AddressError("bare CR or LF")


def _comment_end(text: str, pos: int) -> int:
    """Index past the comment (nested, RFC 5322 3.2.2) opening at ``pos``."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return pos + 1
        elif ch == "\\":  # quoted-pair, obs-qp (RFC 5322 3.2.1, 4.1)
            pos += 1
        elif ch in "\r\n":
            pos = _fold_end(text, pos) - 1
        elif ch == "\0":
            raise AddressError("NUL in a comment")
        pos += 1
    raise AddressError("unterminated comment")


def skip_cfws(text: str, pos: int) -> int:
    """Index of the first character at or after ``pos`` that is not CFWS (RFC 5322 3.2.2)."""
    while pos < len(text):
        ch = text[pos]
        if ch in _WSP:
            pos += 1
        elif ch in "\r\n":
            pos = _fold_end(text, pos)
        elif ch == "(":
            pos = _comment_end(text, pos)
        else:
            break
    return pos


def remove_comments(text: str) -> str:
    """``text`` with every comment and fold replaced by one space (RFC 5322 3.2.2).

    Used to read structured values such as the date-time, where CFWS may appear between
    any two tokens (RFC 5322 4.3). Raises AddressError on an unterminated comment.
    """
    if "(" not in text and "\r" not in text and "\n" not in text:
        return _WSP_RUN.sub(" ", text)  # the common case, without a walk in Python
    return _remove_comments_walk(text)


def _remove_comments_walk(text: str) -> str:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        end = skip_cfws(text, pos)
        if end > pos:
            out.append(" ")
            pos = end
            continue
        out.append(text[pos])
        pos += 1
    return "".join(out)


def _delimited_end(text: str, pos: int, close: str, what: str) -> int:
    """Index past a quoted-string or domain-literal opening at ``pos``.

    RFC 5322 3.2.4 qcontent and 3.4.1 dtext, with their obsolete forms (4.1, 4.4):
    controls other than NUL, CR and LF are accepted, quoted-pair may escape anything,
    FWS may fold inside. A "[" inside a literal is refused (dtext excludes it).
    """
    pos += 1
    while pos < len(text):
        ch = text[pos]
        if ch == close:
            return pos + 1
        if ch == "\\":
            pos += 2
            continue
        if ch in "\r\n":
            pos = _fold_end(text, pos)
            continue
        if ch == "\0" or (close == "]" and ch == "["):
            raise AddressError(f"character not allowed in {what}")
        pos += 1
    raise AddressError(f"unterminated {what}")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "atom", "quoted", "literal", or the special character itself
    text: str  # as written, delimiters included
    start: int
    end: int


def _tokenize(text: str) -> list[_Token]:
    """The tokens of a structured field value, CFWS dropped (RFC 5322 3.2)."""
    tokens: list[_Token] = []
    pos = skip_cfws(text, 0)
    while pos < len(text):
        ch = text[pos]
        if ch == '"':
            end, kind = _delimited_end(text, pos, '"', "quoted string"), "quoted"
        elif ch == "[":
            end, kind = _delimited_end(text, pos, "]", "domain literal"), "literal"
        elif ch in _SPECIAL_TOKENS:
            end, kind = pos + 1, ch
        elif _is_atext(ch):
            end = pos + 1
            while end < len(text) and _is_atext(text[end]):
                end += 1
            kind = "atom"
        else:
            raise AddressError(f"unexpected character {_show(ch)}")
        tokens.append(_Token(kind, text[pos:end], pos, end))
        pos = skip_cfws(text, end)
    return tokens


def _show(text: str, limit: int = 60) -> str:
    """Client text made safe for a reply line: printable ASCII only, bounded, quoted."""
    cleaned = "".join(ch if 32 <= ord(ch) <= 126 else "?" for ch in text)
    if len(cleaned) > limit:
        cleaned = cleaned[:limit] + "..."
    return f"'{cleaned}'"


def _unfold(text: str) -> str:
    # RFC 5322 3.2.2 / 3.2.4: the CRLF of a fold is not part of the value.
    return text.replace("\r\n", "")


# --- Syntactic level (RFC 5322 3.4) --------------------------------------------------------

_WORDS = frozenset({"atom", "quoted", "."})


class _Parser:
    """Recursive descent over the tokens of one field value."""

    def __init__(self, text: str, utf8: bool) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0
        self.utf8 = utf8

    def peek(self) -> str | None:
        return self.tokens[self.pos].kind if self.pos < len(self.tokens) else None

    def take(self, kind: str, expected: str) -> _Token:
        if self.peek() != kind:
            raise AddressError(f"expected {expected}, found {self.found()}")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def found(self) -> str:
        return "end of field" if self.peek() is None else _show(self.tokens[self.pos].text)

    def address_list(self, groups: bool) -> tuple[list[Mailbox], int, int]:
        """RFC 5322 3.4 address-list / mailbox-list, with obs-addr-list empty elements (4.4)."""
        mailboxes: list[Mailbox] = []
        count = group_count = 0
        while True:
            while self.peek() == ",":
                self.pos += 1
            if self.peek() is None:
                return mailboxes, count, group_count
            members, is_group = self.address(groups)
            mailboxes.extend(members)
            count += 1
            group_count += is_group
            if self.peek() not in (",", None):
                raise AddressError(f"expected ',' between addresses, found {self.found()}")

    def address(self, groups: bool) -> tuple[list[Mailbox], bool]:
        """RFC 5322 3.4: address = mailbox / group; mailbox = name-addr / addr-spec."""
        if self.peek() == "<":
            return [self.angle_addr()], False
        words = self.words()
        kind = self.peek()
        if kind == "<" and words:
            _check_phrase(words)
            return [self.angle_addr()], False
        if kind == ":" and words:
            if not groups:
                raise AddressError("a group is not allowed here")
            _check_phrase(words)
            return self.group(), True
        if kind == "@" and words:
            return [self.addr_spec(words)], False
        if not words:
            raise AddressError(f"expected an address, found {self.found()}")
        raise AddressError(f"expected '@', '<' or ':' after {_show(self.span(words))}")

    def words(self) -> list[_Token]:
        start = self.pos
        while self.peek() in _WORDS:
            self.pos += 1
        return self.tokens[start : self.pos]

    def span(self, tokens: list[_Token]) -> str:
        return _unfold(self.text[tokens[0].start : tokens[-1].end])

    def group(self) -> list[Mailbox]:
        """RFC 5322 3.4: group = display-name ":" [group-list] ";" (obs-group-list, 4.4)."""
        self.take(":", "':'")
        members: list[Mailbox] = []
        while True:
            while self.peek() == ",":
                self.pos += 1
            if self.peek() == ";":
                self.pos += 1
                return members
            if self.peek() is None:
                raise AddressError("group not closed by ';'")
            mailbox, _ = self.address(groups=False)
            members.extend(mailbox)
            if self.peek() is None:
                raise AddressError("group not closed by ';'")
            if self.peek() not in (",", ";"):
                raise AddressError(f"expected ',' or ';' in group, found {self.found()}")

    def angle_addr(self) -> Mailbox:
        """RFC 5322 3.4 angle-addr, and obs-angle-addr whose obs-route is ignored (4.4)."""
        self.take("<", "'<'")
        if self.peek() in ("@", ","):
            self.obs_route()
        if self.peek() == ">":
            raise AddressError("empty address <>")
        mailbox = self.addr_spec(self.words())
        self.take(">", "'>'")
        return mailbox

    def obs_route(self) -> None:
        # RFC 5322 4.4: obs-route = obs-domain-list ":"; "MUST be ignored" but parsed.
        while self.peek() != ":":
            if self.peek() == ",":
                self.pos += 1
            else:
                self.take("@", "'@' in a route")
                self.domain()
        self.pos += 1

    def addr_spec(self, local: list[_Token]) -> Mailbox:
        """RFC 5322 3.4.1: addr-spec = local-part "@" domain."""
        if not local:
            raise AddressError("an address needs a local part before '@'")
        if not _valid_local(local):
            raise AddressError(f"malformed local part {_show(self.span(local))}")
        self.take("@", "'@'")
        domain = self.domain()
        mailbox = Mailbox(
            local="".join(_unfold(token.text) for token in local),
            domain="".join(_unfold(token.text) for token in domain),
            start=local[0].start,
            end=domain[-1].end,
        )
        _check_characters(mailbox, self.utf8)
        return mailbox

    def domain(self) -> list[_Token]:
        """RFC 5322 3.4.1: domain = dot-atom / domain-literal / obs-domain (4.4)."""
        if self.peek() == "literal":
            return [self.take("literal", "a domain")]
        tokens = [self.take("atom", "a domain")]
        while self.peek() == ".":
            tokens.append(self.take(".", "'.'"))
            tokens.append(self.take("atom", "a domain label after '.'"))
        return tokens


def _check_phrase(words: list[_Token]) -> None:
    # RFC 5322 3.2.5 phrase = 1*word / obs-phrase; obs-phrase = word *(word / "." / CFWS)
    # (4.1): so "John Q. Public" is a display name, but one may not begin with ".".
    if words[0].kind == ".":
        raise AddressError("a display name may not begin with '.'")


def _valid_local(words: list[_Token]) -> bool:
    # RFC 5322 3.4.1 local-part = dot-atom / quoted-string / obs-local-part, and
    # obs-local-part = word *("." word) (4.4): words and dots alternate, words at both ends.
    alternating = all((token.kind == ".") == (index % 2 == 1) for index, token in enumerate(words))
    return alternating and words[-1].kind != "."


def _check_characters(mailbox: Mailbox, utf8: bool) -> None:
    """RFC 6532 3.2: UTF-8 in an address only in an SMTPUTF8 transaction (RFC 6531 3.4).

    Octets that are not UTF-8 at all (decoded as surrogate escapes) are never an address.
    """
    address = mailbox.address
    if address.isascii():
        return
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in address):
        raise AddressError(f"address {_show(address)} is not valid UTF-8")
    if not utf8:
        raise NeedsUtf8(address)


def parse_addresses(text: str, grammar: Grammar, *, utf8: bool) -> ParsedAddresses:
    """Parse a field value (after the colon, folds included) by one of RFC 5322's rules.

    ``mailbox`` (Sender, Resent-Sender), ``mailbox-list`` (From, Resent-From),
    ``address-list`` (Reply-To, To, Cc, Resent-To, Resent-Cc) and
    ``optional-address-list`` (Bcc, Resent-Bcc, which may be empty: RFC 5322 3.6.3).
    Raises AddressError (NeedsUtf8 for UTF-8 outside SMTPUTF8).
    """
    simple = _simple_mailbox(text)
    if simple is not None:
        return ParsedAddresses((simple,), 0)
    parser = _Parser(text, utf8)
    mailboxes, count, groups = parser.address_list(groups=grammar.endswith("address-list"))
    if count == 0 and grammar != "optional-address-list":
        raise AddressError("no address")
    if grammar == "mailbox" and count > 1:
        raise AddressError("only one mailbox is allowed")
    return ParsedAddresses(tuple(mailboxes), groups)


# The shape most fields have ("a@b.example", "<a@b.example>", "Alice Smith <a@b.example>"),
# in plain ASCII atoms: recognised by one regular expression, the same Mailbox as the full
# parser gives (the tests compare the two), without tokenizing. Anything else, including
# every unusual or invalid form, takes the full parser.
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_ADDR_SPEC = f"{_DOT_ATOM}@{_DOT_ATOM}"
_PHRASE = r"(?:[A-Za-z0-9]+[ \t]+)*[A-Za-z0-9]*[ \t]*"
_SIMPLE = re.compile(rf"[ \t]*(?:{_PHRASE}<(?P<angled>{_ADDR_SPEC})>|(?P<bare>{_ADDR_SPEC}))[ \t]*")


def _simple_mailbox(text: str) -> Mailbox | None:
    match = _SIMPLE.fullmatch(text)
    if match is None:
        return None
    group = "angled" if match.group("angled") is not None else "bare"
    local, _, domain = match.group(group).rpartition("@")
    return Mailbox(local, domain, match.start(group), match.end(group))


def parse_addr_spec(text: str, *, utf8: bool) -> Mailbox:
    """Parse a bare addr-spec (no display name, no comments), such as a login name."""
    parsed = parse_addresses(text, "mailbox", utf8=utf8)
    mailbox = parsed.mailboxes[0]
    if mailbox.address != text:
        raise AddressError(f"not a bare address: {_show(text)}")
    return mailbox


# --- Comparing addresses --------------------------------------------------------------------


def unquote_local(local: str) -> str:
    """The local part's value: quotes dropped and quoted-pairs resolved (RFC 5322 3.2.4).

    ``"jdoe"`` and ``jdoe`` are the same local part (RFC 5322 3.4.1 calls the quoted form
    semantically equivalent), so comparisons use this.
    """
    out: list[str] = []
    quoted = escaped = False
    for ch in local:
        if escaped:
            out.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        else:
            out.append(ch)
    return "".join(out)


def same_address(a: Mailbox, b: Mailbox) -> bool:
    """Same mailbox: local parts compared exactly (RFC 5321 2.4), domains without case."""
    return unquote_local(a.local) == unquote_local(b.local) and a.domain.lower() == (
        b.domain.lower()
    )


def is_fully_qualified(domain: str) -> bool:
    """RFC 6409 4.2 "fully qualified", as far as it can be told without DNS.

    Two or more labels, or an address literal (which names a host directly). Whether a
    two-label name is a partial reference is a site question; the cleanup module decides
    it with the site's configuration.
    """
    if domain.startswith("["):
        return True
    labels = domain.split(".")
    return len(labels) >= 2 and all(labels)


# --- Message-ID (RFC 5322 3.6.4) -------------------------------------------------------------


def _dot_atom_text(text: str, utf8: bool) -> bool:
    # RFC 5322 3.2.3: dot-atom-text = 1*atext *("." 1*atext); RFC 6532 3.2 adds UTF-8.
    return all(
        atom and all(ch in _ATEXT or (utf8 and ord(ch) > 127) for ch in atom)
        for atom in text.split(".")
    )


def _no_fold_literal(text: str) -> bool:
    # RFC 5322 3.6.4: no-fold-literal = "[" *dtext "]"; dtext = %d33-90 / %d94-126.
    return (
        len(text) >= 2
        and text[0] == "["
        and text[-1] == "]"
        and all(33 <= ord(ch) <= 126 and ch not in "[]\\" for ch in text[1:-1])
    )


def valid_msg_id(value: str, *, utf8: bool) -> bool:
    """Whether a field value is one msg-id: [CFWS] "<" id-left "@" id-right ">" [CFWS].

    RFC 5322 3.6.4 with id-left = dot-atom-text and id-right = dot-atom-text /
    no-fold-literal; the obsolete forms (quoted id-left, CFWS inside) are not accepted,
    as they are what RFC 6409 8.3 asks us to replace.
    """
    try:
        start = skip_cfws(value, 0)
        close = value.find(">", start)
        if (
            close < 0
            or value[start : start + 1] != "<"
            or skip_cfws(value, close + 1) != len(value)
        ):
            return False
    except AddressError:
        return False
    left, at, right = value[start + 1 : close].rpartition("@")
    return (
        bool(at)
        and _dot_atom_text(left, utf8)
        and (_dot_atom_text(right, utf8) or _no_fold_literal(right))
    )


# --- Rewriting (RFC 6409 8.8) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: Literal["address", "domain", "wildcard"]
    local: str  # unquoted local part, for "address" rules only
    domain: str  # lowercased domain; for "wildcard", the suffix with its leading "."
    new: str  # the new address ("address") or the new domain (the others)


@dataclass(frozen=True, slots=True)
class _Rules:
    addresses: dict[tuple[str, str], str]  # (unquoted local, lower domain) -> new address
    domains: dict[str, str]  # lower domain -> new domain
    wildcards: tuple[tuple[str, str], ...]  # (".suffix" lowercased, new domain), in order


def _rule_domain(text: str, rule: str) -> str:
    # The domain of a rule must itself be a fully qualified dot-atom, so that a rule can
    # never produce an invalid address (RFC 6409 8.1: never write a bad one).
    if not (_dot_atom_text(text, utf8=True) and is_fully_qualified(text)):
        raise ValueError(f"rewrite rule {rule!r}: {text!r} is not a fully qualified domain")
    return text


def _compile_rule(pattern: str, replacement: str) -> _Rule:
    rule = f"{pattern} -> {replacement}"
    if not replacement.isascii():
        raise ValueError(f"rewrite rule {rule!r}: write the replacement in ASCII (A-labels)")
    if pattern.startswith("@"):
        if not replacement.startswith("@"):
            raise ValueError(f"rewrite rule {rule!r}: a domain maps to a domain ('@...')")
        new = _rule_domain(replacement[1:], rule)
        if pattern.startswith("@*."):
            return _Rule("wildcard", "", "." + _rule_domain(pattern[3:], rule).lower(), new)
        return _Rule("domain", "", _rule_domain(pattern[1:], rule).lower(), new)
    try:
        old = parse_addr_spec(pattern, utf8=True)
        new_address = parse_addr_spec(replacement, utf8=False)
    except AddressError as error:
        raise ValueError(f"rewrite rule {rule!r}: {error.reason}") from None
    _rule_domain(old.domain, rule)
    _rule_domain(new_address.domain, rule)
    return _Rule("address", unquote_local(old.local), old.domain.lower(), replacement)


@functools.lru_cache(maxsize=16)
def _compile(rules: tuple[tuple[str, str], ...]) -> _Rules:
    addresses: dict[tuple[str, str], str] = {}
    domains: dict[str, str] = {}
    wildcards: list[tuple[str, str]] = []
    for pattern, replacement in rules:
        rule = _compile_rule(pattern, replacement)
        if rule.kind == "address":
            addresses.setdefault((rule.local, rule.domain), rule.new)
        elif rule.kind == "domain":
            domains.setdefault(rule.domain, rule.new)
        else:
            wildcards.append((rule.domain, rule.new))
    return _Rules(addresses, domains, tuple(wildcards))


def check_rewrite_rules(rules: tuple[tuple[str, str], ...]) -> None:
    """Raise ValueError naming the first malformed rule; for checking the configuration."""
    _compile(rules)


def rewrite_parts(local: str, domain: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """The rewritten address for ``local@domain``, or None when no rule matches.

    RFC 6409 8.8 allows only configured rewrites, so there are three kinds of rule and
    nothing else: an exact address (``jdoe@example.net``, the only kind that changes a
    local part), a domain (``@host.sales.example.net``) and the subdomains of a domain
    (``@*.sales.example.net``, not the domain itself). The most specific kind wins
    (address, then domain, then wildcard), and among wildcards the first listed. Rules are
    applied once: a result is never rewritten again. Raises ValueError on a malformed rule.
    """
    compiled = _compile(rules)
    lowered = domain.lower()
    exact = compiled.addresses.get((unquote_local(local), lowered))
    if exact is not None:
        return exact
    new_domain = compiled.domains.get(lowered)
    if new_domain is None:
        matches = (new for suffix, new in compiled.wildcards if lowered.endswith(suffix))
        new_domain = next(matches, None)
    return None if new_domain is None else f"{local}@{new_domain}"


def rewrite_address(address: str, rules: tuple[tuple[str, str], ...]) -> str:
    """``address`` after the site's rewrite rules (RFC 6409 8.8); unchanged if none match.

    For envelope addresses (``local@domain`` as given in MAIL/RCPT) and header addresses
    alike. An address without "@" (``Postmaster``, the null path) or with an address
    literal is never rewritten: no rule can name it.
    """
    if address.endswith("]"):
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    return rewrite_parts(local, domain, rules) or address
