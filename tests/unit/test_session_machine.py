"""Issue 6 "Proof": a hypothesis state machine drives the sans-I/O session.

The machine plays the client *and* the transport. Each step builds a pipelined batch of
meaningful commands (EHLO/HELO, STARTTLS, AUTH PLAIN/LOGIN, MAIL/RCPT with good and bad
paths and parameters, DATA bodies, BDAT chunks, RSET, NOOP, QUIT, garbage), splits it
at random points into several `receive_data` calls, and answers what the session asks
(`Authenticate`, `MessageEnd`, `StartTLS`), sometimes late, after a timeout.

Two layers of checks:

1. Invariants that need no model, checked on every event list the session returns
   (`Observer`): reply syntax and enhanced codes, no AUTH before TLS, no MAIL accepted
   before AUTH in the current TLS epoch, the reset after STARTTLS, nothing after Close,
   sane message event order.
2. A small reference model (`Model`) of RFC 5321/6409 as seen by the client predicts,
   command by command, the exact abstract event sequence: each reply's code (a set of
   codes only where a body has two problems and the one reported depends on the reads,
   known bug 3), message begin/end/abort, the credentials handed over,
   the unstuffed content of every accepted message. This is stronger than counting
   replies per command line: it proves replies come in command order, one per command,
   with none for octets inside DATA/BDAT content or after STARTTLS/Close.

Three bugs this machine found (end of data after a bare LF depending on the read
boundary, a second MessageAbort on close, the body-problem reply depending on the read
boundary) are fixed; the tests at the end pin them. The generators still steer around
them in places (marked "Known bug"), which now only narrows what they explore.
"""

from __future__ import annotations

import base64
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from submitd.smtp import replies as R
from submitd.smtp.events import (
    Authenticate,
    Close,
    Event,
    MessageAbort,
    MessageBegin,
    MessageChunk,
    MessageEnd,
    Send,
    StartTLS,
)
from submitd.smtp.replies import Reply
from submitd.smtp.session import Session, SessionSettings

T = TypeVar("T")


class Draw(Protocol):
    """`data.draw` or a composite's `draw`."""

    def __call__(self, strategy: st.SearchStrategy[T], /) -> T: ...


HOST = "mx.example.org"
ALICE = "alice@example.org"
GOOD_PASSWORD = "secret"
TEMPFAIL_PASSWORD = "tempfail"  # the transport cannot check: 454 4.7.0
MAX_SIZE = 3000
MAX_RCPTS = 3
MAX_LINE = 512
DENIED = "denied@example.net"  # the principal refuses this recipient


@dataclass
class Alice:
    login: str = ALICE

    def check_mail(self, sender: str, declared_size: int | None) -> Reply | None:
        return None if sender in ("", ALICE) else R.SENDER_NOT_OWNED

    def check_recipient(self, address: str, accepted: int) -> Reply | None:
        return R.reply(550, "5.7.1", "Recipient refused") if address == DENIED else None


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# ------------------------------------------------------------------ abstract events
#
# Expected and observed events are compared as tuples:
#   ("reply", code)       observed; expected ("reply", frozenset of codes, what)
#   ("begin",) ("end", content) ("abort",) ("auth", login, password, mechanism)
#   ("starttls",) ("close",)
# A code is "250 2.1.0", or just "250"/"334"/"354" for replies without enhanced code.

Item = tuple[Any, ...]

_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.S)
_ENHANCED = re.compile(r"^([245])\.[0-9]{1,3}\.[0-9]{1,3}$")


@dataclass
class ParsedReply:
    code: int
    enhanced: str | None
    lines: list[str]

    @property
    def key(self) -> str:
        return f"{self.code} {self.enhanced}" if self.enhanced else str(self.code)


def parse_replies(data: bytes) -> list[ParsedReply]:
    """Split one Send into replies, checking RFC 5321 4.2 syntax and RFC 2034 codes."""
    assert data.endswith(b"\r\n"), data
    out: list[ParsedReply] = []
    current: list[tuple[int, str]] = []
    for raw in data[:-2].split(b"\r\n"):
        match = _LINE.match(raw)
        assert match, f"malformed reply line {raw!r}"
        code, sep, text = int(match[1]), match[2], match[3].decode("utf-8")
        assert not current or current[0][0] == code, f"mixed codes in a reply: {data!r}"
        current.append((code, text))
        if sep == b" ":
            out.append(_enhanced(current))
            current = []
    assert not current, f"reply not finished within one Send: {data!r}"
    return out


def _enhanced(lines: list[tuple[int, str]]) -> ParsedReply:
    code = lines[0][0]
    texts = [text for _, text in lines]
    first = texts[0].split(" ", 1)[0]
    if _ENHANCED.match(first):
        assert int(first[0]) == code // 100, f"class mismatch: {code} {first}"
        for text in texts:  # every line of a multi-line reply carries it (RFC 2034 4)
            assert text.split(" ", 1)[0] == first, texts
        return ParsedReply(code, first, [t.split(" ", 1)[1] if " " in t else "" for t in texts])
    # RFC 2034 3: only the greeting, the EHLO/HELO reply, 334 and 354 go without.
    hello = code == 250 and " greets " in texts[0]
    assert code in (220, 334, 354) or hello, f"reply without enhanced code: {texts}"
    return ParsedReply(code, None, texts)


# ---------------------------------------------------------------------- observer


@dataclass
class Observer:
    """Checks every event list; keeps the abstract history for the model comparison."""

    session: Session
    tls: bool
    authed: bool = False  # a 235 was seen in this TLS epoch
    closed: bool = False
    in_message: bool = False
    content: bytearray = field(default_factory=bytearray)
    history: list[Item] = field(default_factory=list)

    def take(self, events: list[Event], *, from_auth_success: bool = False) -> list[Event]:
        for index, event in enumerate(events):
            assert not self.closed, f"event after Close: {event!r}"
            if isinstance(event, (Authenticate, MessageEnd, StartTLS, Close)):
                # The session stops at these: it waits for an answer, or is gone.
                assert index == len(events) - 1, f"{event!r} is not the last event: {events}"
            self._one(event, from_auth_success=from_auth_success)
        return events

    def _one(self, event: Event, *, from_auth_success: bool) -> None:
        if isinstance(event, Send):
            for reply in parse_replies(event.data):
                self._reply(reply, from_auth_success=from_auth_success)
        elif isinstance(event, MessageBegin):
            assert not self.in_message, "MessageBegin inside a message"
            self.in_message = True
            self.content.clear()
            self.history.append(("begin",))
        elif isinstance(event, MessageChunk):
            assert self.in_message, "MessageChunk outside a message"
            assert event.data, "empty MessageChunk"
            self.content += event.data
        elif isinstance(event, MessageEnd):
            assert self.in_message, "MessageEnd outside a message"
            self.in_message = False
            self.history.append(("end", bytes(self.content)))
        elif isinstance(event, MessageAbort):
            assert self.in_message, "MessageAbort outside a message (or a second one)"
            self.in_message = False
            self.history.append(("abort",))
        elif isinstance(event, Authenticate):
            assert self.tls, "credentials taken before TLS"
            self.history.append(("auth", event.login, event.password, event.mechanism))
        elif isinstance(event, StartTLS):
            assert not self.tls
            self.history.append(("starttls",))
        elif isinstance(event, Close):
            last = self.history[-1] if self.history else None
            assert last is not None and last[0] == "reply" and last[1][:3] in ("421", "221")
            assert not self.in_message, "closed with a message neither ended nor aborted"
            self.closed = True
            self.history.append(("close",))

    def _reply(self, reply: ParsedReply, *, from_auth_success: bool) -> None:
        if self.history and self.history[-1][0] == "reply":
            assert self.history[-1][1][:3] not in ("421", "221"), "reply after 421/221"
        if reply.code == 250 and reply.enhanced is None and len(reply.lines) > 1:
            offered = [line for line in reply.lines if line.upper().startswith("AUTH")]
            assert self.tls or not offered, "AUTH offered before TLS"
        if reply.code in (334, 235):
            assert self.tls, f"AUTH went on before TLS: {reply}"
        if reply.code == 235:
            assert from_auth_success, "235 not in answer to a good auth_result"
            self.authed = True
        if reply.key == "250 2.1.0":  # SENDER_OK: the only 2.1.0
            assert self.authed, "MAIL accepted before AUTH in this TLS epoch"
        self.history.append(("reply", reply.key))

    def tls_started(self) -> None:
        self.tls = True
        self.authed = False
        session = self.session
        assert session.ehlo_name is None and session.principal is None
        assert not session.esmtp and not session.in_transaction


# ------------------------------------------------------------------------- model


@dataclass
class Wait:
    """What the transport does when the session next waits for it."""

    kind: str  # "auth", "commit" or "tls"
    interrupt: bool = False  # time out instead of answering, answer late
    reply: Reply = R.OK  # for "commit"
    late: bytes = b""  # for "tls": octets the client sends before the handshake


@dataclass
class Model:
    """What a correct submission server does, seen from the client."""

    tls: bool
    tls_available: bool
    max_errors: int
    mode: str = "command"  # command, plain, login_user, login_pass, data, closed
    hello: str | None = None  # "EHLO" or "HELO"
    authed: bool = False
    envelope: bool = False
    body: str = "7BIT"
    rcpts: int = 0
    bdat_open: bool = False
    bdat_binary: bool = False
    content: bytearray = field(default_factory=bytearray)
    data_problem: bool = False  # a DATA body already has a problem (known-bug steering)
    login_user: str = ""
    errors: int = 0
    expected: list[Item] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.mode == "closed"

    # -- bookkeeping, mirrors of RFC behaviour
    def reply(self, *codes: str, what: str) -> None:
        self.expected.append(("reply", frozenset(codes), what))

    def error(self, code: str, what: str) -> None:
        self.reply(code, what=what)
        self.errors += 1
        if self.errors >= self.max_errors:
            self.close("421 4.7.0", "too many errors")

    def close(self, code: str, what: str) -> None:
        if self.closed:
            return
        if self.mode == "data" or (self.bdat_open and self.mode != "commit"):
            self.expected.append(("abort",))
        self.reply(code, what=what)
        self.expected.append(("close",))
        self.mode = "closed"

    def reset_transaction(self) -> None:
        if self.bdat_open:
            self.expected.append(("abort",))
        self.envelope = False
        self.rcpts = 0
        self.bdat_open = False

    def finish_message(self, draw: Draw) -> None:
        self.expected.append(("end", bytes(self.content)))
        interrupt = draw(st.integers(0, 19)) == 0
        reply = draw(st.sampled_from([R.OK, R.reply(250, "2.0.0", "Ok: queued"), R.LOCAL_ERROR]))
        self.waits.append(Wait("commit", interrupt, reply))
        self.mode = "commit"
        if interrupt:
            self.close("421 4.4.2", "timeout while committing")
            return
        self.reply(f"{reply.code} {reply.enhanced}", what="message result")
        self.mode = "command"
        self.envelope = False
        self.rcpts = 0
        self.bdat_open = False

    def authenticate(self, login: str, password: str, mechanism: str, draw: Draw) -> None:
        self.expected.append(("auth", login, password, mechanism))
        interrupt = draw(st.integers(0, 19)) == 0
        self.waits.append(Wait("auth", interrupt))
        if interrupt:
            self.mode = "wait_auth"
            self.close("421 4.4.2", "timeout while authenticating")
            return
        self.mode = "command"
        if password == TEMPFAIL_PASSWORD:
            self.error("454 4.7.0", "auth tempfail")
        elif (login, password) == (ALICE, GOOD_PASSWORD):
            self.authed = True
            self.reply("235 2.7.0", what="auth ok")
        else:
            self.error("535 5.7.8", "auth failed")


def content_codes(content: bytes, *, binary: bool, final: bool) -> frozenset[str]:
    """The replies a body problem may give; empty if the content is sound.

    Which problem is found first depends on how the octets were cut into reads (the
    size is checked before the lines of each read), so a body that is both too big and
    malformed early may get either reply (known bug 3).
    """

    def malformed(body: bytes) -> bool:
        if binary:
            return False
        if body.endswith(b"\r") and not final:
            body = body[:-1]  # may begin a CRLF in the next read
        rest = body.replace(b"\r\n", b"")
        if b"\r" in rest or b"\n" in rest:
            return True
        return any(len(line) > 998 for line in body.split(b"\r\n"))

    codes: set[str] = set()
    if len(content) > MAX_SIZE:
        codes.add("552 5.3.4")
        if malformed(content[:MAX_SIZE]):
            codes.add("554 5.6.0")
    elif malformed(content):
        codes.add("554 5.6.0")
    return frozenset(codes)


# -------------------------------------------------------------------- generators

PARAMS_MAIL: list[tuple[str, str | None, str]] = [
    ("", None, "7BIT"),
    ("BODY=8BITMIME", None, "8BITMIME"),
    ("BODY=BINARYMIME", None, "BINARYMIME"),
    ("BODY=7BIT SIZE=100", None, "7BIT"),
    ("RET=HDRS ENVID=abc", None, "7BIT"),
    ("FOO=BAR", "555 5.5.4", ""),
    ("BODY=FOO", "555 5.5.4", ""),
    (f"SIZE={MAX_SIZE + 1}", "552 5.3.4", ""),
]
PARAMS_RCPT: list[tuple[str, str | None]] = [
    ("", None),
    ("NOTIFY=NEVER", None),
    ("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@x.example", None),
    ("NOTIFY=BOGUS", "555 5.5.4"),
    ("FOO=1", "555 5.5.4"),
]
CREDENTIALS = [
    (ALICE, GOOD_PASSWORD),
    (ALICE, GOOD_PASSWORD),
    (ALICE, "wrong"),
    (ALICE, TEMPFAIL_PASSWORD),
    ("bob@example.org", GOOD_PASSWORD),
]

text_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dot_line = st.sampled_from([b".", b"..", b".x", b"...", b". "])
long_line = st.builds(
    lambda dot, n: dot + b"y" * n, st.sampled_from([b"", b"."]), st.sampled_from([997, 998, 999])
)
huge_line = st.just(b"z" * 1300)
# Known bug 1 (test_end_of_data_after_bare_lf_depends_on_the_read_boundary): a bare LF
# followed by ".\r\n" may end the data, depending on the reads. No bare LF here is
# followed by a dot.
bare_line = st.sampled_from([b"a\nb", b"a\rb", b"\n", b"\r", b"x\r", b"\nx", b"a\r\rb"])
body_line = st.one_of(
    *[text_line] * 6, dot_line, dot_line, long_line, st.one_of(huge_line, bare_line)
)
chunk_text = st.lists(st.one_of(text_line, dot_line, bare_line, long_line), max_size=4).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines)
)
chunk_bytes = st.one_of(chunk_text, st.binary(max_size=60), st.just(b"q" * 1400))


def verb(draw: Draw, name: str) -> str:
    return str(draw(st.sampled_from([name, name, name.lower(), name.title()])))


def command_token(model: Model, draw: Draw) -> bytes:
    """One client command (and, for BDAT, its chunk); updates the model."""
    kind = draw(
        st.sampled_from(
            ["ehlo"] * 3
            + ["helo", "starttls", "starttls", "auth", "auth", "auth", "auth"]
            + ["mail"] * 4
            + ["rcpt"] * 4
            + ["data"] * 3
            + ["bdat"] * 3
            + ["rset", "rset", "rset", "noop", "help", "vrfy", "quit", "garbage", "badline"]
            + ["longline"]
        )
    )
    return COMMANDS[kind](model, draw)


def _cmd_ehlo(model: Model, draw: Draw, good: bool = False) -> bytes:
    names = ["client.example.org", "[192.0.2.1]"] + ([] if good else ["", "two words"])
    name = draw(st.sampled_from(names))
    line = f"{verb(draw, 'EHLO')} {name}".rstrip()
    if not name or " " in name:
        model.error("501 5.5.4", "EHLO syntax")
    else:
        model.reset_transaction()
        model.hello = "EHLO"
        model.reply("250", what="EHLO")
    return line.encode() + b"\r\n"


def _cmd_helo(model: Model, draw: Draw) -> bytes:
    model.reset_transaction()
    model.hello = "HELO"
    model.reply("250", what="HELO")
    return f"{verb(draw, 'HELO')} client.example.org\r\n".encode()


def _cmd_starttls(model: Model, draw: Draw, good: bool = False) -> bytes:
    arg = "" if good else draw(st.sampled_from(["", "", "", " now"]))
    if arg:
        model.error("501 5.5.4", "STARTTLS args")
    elif model.tls:
        model.error("503 5.5.1", "TLS already")
    elif not model.tls_available:
        model.error("454 4.7.0", "no TLS")
    else:
        model.reply("220 2.0.0", what="STARTTLS")
        model.expected.append(("starttls",))
        late = draw(st.sampled_from([b"", b"", b"MAIL FROM:<x@evil.example>\r\n", b"QUIT\r\n"]))
        interrupt = draw(st.integers(0, 19)) == 0
        model.waits.append(Wait("tls", interrupt, late=late))
        model.mode = "wait_tls"
        if interrupt:
            model.close("421 4.4.2", "timeout during TLS handshake")
        else:
            model.tls = True
            model.hello = None
            model.authed = False
            model.reset_transaction()
            # Stays "wait_tls" until the batch is cut; the driver resets it.
    return f"{verb(draw, 'STARTTLS')}{arg}\r\n".encode()


def _cmd_auth(model: Model, draw: Draw, good: bool = False) -> bytes:
    kinds = ["plain_initial", "plain_initial", "plain", "login", "login_initial"]
    if not good:
        kinds += ["plain_initial", "unknown", "badb64", "malformed", "emptypw"]
    kind = draw(st.sampled_from(kinds))
    login, password = (ALICE, GOOD_PASSWORD) if good else draw(st.sampled_from(CREDENTIALS))
    lines = {
        "plain_initial": b"AUTH PLAIN " + b64(f"\0{login}\0{password}".encode()),
        "plain": b"AUTH PLAIN",
        "login": b"AUTH LOGIN",
        "login_initial": b"AUTH LOGIN " + b64(login.encode()),
        "unknown": b"AUTH CRAM-MD5",
        "badb64": b"AUTH PLAIN !!!",
        "malformed": b"AUTH PLAIN " + b64(b"no separators"),
        "emptypw": b"AUTH PLAIN " + b64(f"\0{login}\0".encode()),
    }
    line = verb(draw, "AUTH").encode() + lines[kind][4:] + b"\r\n"
    if not model.tls:
        model.error("538 5.7.11", "AUTH before TLS")
    elif model.hello != "EHLO":
        model.error("503 5.5.1", "AUTH before EHLO")
    elif model.authed:
        model.error("503 5.5.1", "AUTH twice")
    elif model.envelope:
        model.error("503 5.5.1", "AUTH in transaction")
    elif kind == "unknown":
        model.error("504 5.5.4", "AUTH mechanism")
    elif kind in ("badb64", "malformed"):
        model.error("501 5.5.2", "AUTH base64")
    elif kind == "emptypw":
        model.error("535 5.7.8", "AUTH empty password")
    elif kind == "plain_initial":
        model.authenticate(login, password, "PLAIN", draw)
    else:
        model.reply("334", what="AUTH challenge")
        model.mode = {"plain": "plain", "login": "login_user"}.get(kind, "login_pass")
        model.login_user = login
    return line


def auth_response_token(model: Model, draw: Draw, good: bool = False) -> bytes:
    kinds = ["answer"] * 5 + ["cancel", "badb64", "bare"]
    kind = "answer" if good else draw(st.sampled_from(kinds))
    login, password = (ALICE, GOOD_PASSWORD) if good else draw(st.sampled_from(CREDENTIALS))
    mode, model.mode = model.mode, "command"
    if kind == "cancel":
        model.error("501 5.0.0", "AUTH cancelled")
        return b"*\r\n"
    if kind == "badb64":
        model.error("501 5.5.2", "AUTH base64")
        return b"!!!\r\n"
    if kind == "bare":
        model.error("500 5.5.2", "bare LF in AUTH")
        return b64(b"x") + b"\n"
    if mode == "plain":
        model.authenticate(login, password, "PLAIN", draw)
        return b64(f"\0{login}\0{password}".encode()) + b"\r\n"
    if mode == "login_user":
        model.reply("334", what="AUTH LOGIN password")
        model.mode = "login_pass"
        model.login_user = login
        return b64(login.encode()) + b"\r\n"
    model.authenticate(model.login_user, password, "LOGIN", draw)
    return b64(password.encode()) + b"\r\n"


def _cmd_mail(model: Model, draw: Draw, good: bool = False) -> bytes:
    paths = ["<alice@example.org>", "<>"]
    if not good:
        paths += ["<mallory@example.org>", "<bob@@x.example>"]
    path = draw(st.sampled_from(paths))
    malformed = not good and draw(st.integers(0, 9)) == 0
    choices = [p for p in PARAMS_MAIL if not (good and p[1])]
    if good and model.hello == "HELO":
        choices = choices[:1]
    params, param_code, body = draw(st.sampled_from(choices))
    arg = "FROM alice" if malformed else f"FROM:{path} {params}".rstrip()
    if model.hello is None:
        model.error("503 5.5.1", "MAIL before EHLO")
    elif not model.authed:
        model.error("530 5.7.0", "MAIL before AUTH")
    elif model.envelope:
        model.error("503 5.5.1", "nested MAIL")
    elif malformed:
        model.error("501 5.5.4", "MAIL syntax")
    elif params and model.hello == "HELO":
        model.error("555 5.5.4", "MAIL params after HELO")
    elif param_code:
        model.error(param_code, "MAIL params")
    elif path == "<bob@@x.example>":
        model.error("501 5.1.7", "bad sender")
    elif path == "<mallory@example.org>":
        model.error("550 5.7.1", "sender not owned")
    else:
        model.reply("250 2.1.0", what="MAIL")
        model.envelope = True
        model.body = body
        model.rcpts = 0
    return f"{verb(draw, 'MAIL')} {arg}\r\n".encode()


RCPT_PATHS: list[tuple[str, str | None]] = [
    ("<bob@example.net>", None),
    ("<Postmaster>", None),
    ("<b@x.example>", None),
    ("<bad@@example.net>", "501 5.1.3"),
    ("<d@sales>", "554 5.1.2"),
    (f"<{DENIED}>", "550 5.7.1"),
    ("bob@example.net", "501 5.5.4"),  # no angle brackets
]


def _cmd_rcpt(model: Model, draw: Draw, good: bool = False) -> bytes:
    path, path_code = draw(st.sampled_from(RCPT_PATHS[:3] if good else RCPT_PATHS))
    params, param_code = draw(st.sampled_from(PARAMS_RCPT[:3] if good else PARAMS_RCPT))
    if good and model.hello == "HELO":
        params = ""
    if path_code == "501 5.5.4":
        params = ""  # the syntax error comes before the parameters are looked at
    if not model.envelope:
        model.error("503 5.5.1", "RCPT before MAIL")
    elif model.rcpts >= MAX_RCPTS:
        model.reply("452 4.5.3", what="too many recipients")  # not counted as an error
    elif path_code == "501 5.5.4":
        model.error(path_code, "RCPT syntax")
    elif params and model.hello == "HELO":
        model.error("555 5.5.4", "RCPT params after HELO")
    elif param_code:
        model.error(param_code, "RCPT params")
    elif path_code:
        model.error(path_code, "bad recipient")
    else:
        model.reply("250 2.1.5", what="RCPT")
        model.rcpts += 1
    return f"{verb(draw, 'RCPT')} TO:{path} {params}".rstrip().encode() + b"\r\n"


def _cmd_data(model: Model, draw: Draw) -> bytes:
    arg = draw(st.sampled_from(["", "", "", " now"]))
    if arg:
        model.error("501 5.5.4", "DATA args")
    elif not model.envelope:
        model.error("503 5.5.1", "DATA without MAIL")
    elif not model.rcpts:
        model.error("554 5.5.1", "DATA without RCPT")
    elif model.bdat_open:
        model.error("503 5.5.1", "DATA after BDAT")
    elif model.body == "BINARYMIME":
        model.error("503 5.5.1", "DATA with BINARYMIME")
    else:
        model.reply("354", what="DATA")
        model.expected.append(("begin",))
        model.mode = "data"
        model.content.clear()
        model.data_problem = False
    return f"{verb(draw, 'DATA')}{arg}\r\n".encode()


def data_token(model: Model, draw: Draw, end: bool | None = None) -> bytes:
    """Some lines of a DATA body, dot-stuffed, maybe with the end marker."""
    lines = draw(st.lists(body_line, max_size=5))
    if end is None:
        end = draw(st.booleans())
    end = end or not lines
    wire = bytearray()
    for line in lines:
        wire += (b"." + line if line.startswith(b".") else line) + b"\r\n"
        model.content += line + b"\r\n"
    codes = content_codes(bytes(model.content), binary=False, final=True)
    if codes and not model.data_problem:
        model.expected.append(("abort",))  # as soon as the bad line is read
    model.data_problem = bool(codes)
    if end:
        wire += b".\r\n"
        model.mode = "command"
        model.data_problem = False
        if codes:
            model.reply(*codes, what="body problem")
            model.envelope = False
            model.rcpts = 0
        else:
            model.finish_message(draw)
    return bytes(wire)


def _cmd_bdat(model: Model, draw: Draw, last: bool | None = None) -> bytes:
    if last is None and draw(st.integers(0, 9)) == 0:
        line = draw(st.sampled_from([b"BDAT", b"BDAT x", b"BDAT 5 NOTLAST", b"BDAT -1"]))
        model.error("501 5.5.4", "BDAT syntax")
        return line + b"\r\n"
    chunk = draw(chunk_bytes)
    if last is None:
        last = draw(st.booleans())
    line = f"{verb(draw, 'BDAT')} {len(chunk)}{' LAST' if last else ''}\r\n".encode()
    if not model.envelope:
        model.error("503 5.5.1", "BDAT without MAIL")
        return line + chunk
    if not model.rcpts:
        model.error("554 5.5.1", "BDAT without RCPT")
        return line + chunk
    if not model.bdat_open:
        model.bdat_open = True
        model.bdat_binary = model.body == "BINARYMIME"
        model.content.clear()
        model.expected.append(("begin",))
    whole = bytes(model.content) + chunk
    codes = content_codes(whole, binary=model.bdat_binary, final=False)
    if not codes and last:
        codes = content_codes(whole, binary=model.bdat_binary, final=True)
    if codes:
        model.expected.append(("abort",))
        model.reply(*codes, what="BDAT problem")
        model.envelope = False
        model.rcpts = 0
        model.bdat_open = False
        return line + chunk
    model.content += chunk
    if last:
        model.finish_message(draw)
    else:
        model.reply("250 2.0.0", what="BDAT chunk")
    return line + chunk


def _cmd_rset(model: Model, draw: Draw) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        model.error("501 5.5.4", "RSET args")
        return b"RSET now\r\n"
    model.reset_transaction()
    model.reply("250 2.0.0", what="RSET")
    return verb(draw, "RSET").encode() + b"\r\n"


def _cmd_noop(model: Model, draw: Draw) -> bytes:
    model.reply("250 2.0.0", what="NOOP")
    return draw(st.sampled_from([b"NOOP\r\n", b"noop\r\n", b"NOOP anything at all\r\n"]))


def _cmd_help(model: Model, draw: Draw) -> bytes:
    model.reply("214 2.0.0", what="HELP")
    return b"HELP\r\n"


def _cmd_vrfy(model: Model, draw: Draw) -> bytes:
    if draw(st.booleans()):
        model.error("501 5.5.4", "VRFY without argument")
        return b"VRFY\r\n"
    model.reply("252 2.5.0", what="VRFY")
    return b"VRFY bob\r\n"


def _cmd_quit(model: Model, draw: Draw) -> bytes:
    model.reset_transaction()
    model.close("221 2.0.0", "QUIT")
    return verb(draw, "QUIT").encode() + b"\r\n"


def _cmd_garbage(model: Model, draw: Draw) -> bytes:
    """Lines of random octets that cannot be a command (they start with NUL)."""
    segments = draw(
        st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), min_size=1)
    )
    wire = bytearray()
    for segment in segments[:3]:
        line = b"\0" + segment + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        wire += line
        if model.closed:
            continue
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            model.error("500 5.5.2", "bare CR or LF")
        else:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                model.error("500 5.5.2", "not UTF-8")
            else:
                model.error("500 5.5.1", "unknown command")
    return bytes(wire)


def _cmd_badline(model: Model, draw: Draw) -> bytes:
    line, code = draw(
        st.sampled_from(
            [
                (b"NOOP\n", "500 5.5.2"),
                (b"NO\rOP\r\n", "500 5.5.2"),
                (b"\xff\xfe\r\n", "500 5.5.2"),
                (b"ETRN example.org\r\n", "502 5.5.1"),
                (b"EXPN staff\r\n", "502 5.5.1"),
                (b"FOO\r\n", "500 5.5.1"),
                (b"\r\n", "500 5.5.1"),
            ]
        )
    )
    model.error(code, "bad line")
    return line


def _cmd_longline(model: Model, draw: Draw) -> bytes:
    n = draw(st.sampled_from([MAX_LINE - 7, MAX_LINE - 6, 600, 3000]))
    line = b"NOOP " + b"x" * n + b"\r\n"
    if len(line) > MAX_LINE:
        model.error("500 5.5.2", "line too long")
    else:
        model.reply("250 2.0.0", what="NOOP at the limit")
    return line


COMMANDS: dict[str, Callable[[Model, Draw], bytes]] = {
    "ehlo": _cmd_ehlo,
    "helo": _cmd_helo,
    "starttls": _cmd_starttls,
    "auth": _cmd_auth,
    "mail": _cmd_mail,
    "rcpt": _cmd_rcpt,
    "data": _cmd_data,
    "bdat": _cmd_bdat,
    "rset": _cmd_rset,
    "noop": _cmd_noop,
    "help": _cmd_help,
    "vrfy": _cmd_vrfy,
    "quit": _cmd_quit,
    "garbage": _cmd_garbage,
    "badline": _cmd_badline,
    "longline": _cmd_longline,
}


def next_token(model: Model, draw: Draw) -> bytes:
    if model.mode == "data":
        return data_token(model, draw)
    if model.mode in ("plain", "login_user", "login_pass"):
        return auth_response_token(model, draw)
    return command_token(model, draw)


AFTER_END = st.sampled_from(
    [b"", b"NOOP\r\n", b"MAIL FROM:<x@evil.example>\r\nRCPT TO:<y@evil.example>\r\n"]
)


AUTH_MODES = ("plain", "login_user", "login_pass")


def login_script(model: Model, draw: Draw) -> Iterator[bytes]:
    """Towards an authenticated session: EHLO, STARTTLS, EHLO, AUTH (any mechanism)."""
    if model.mode in AUTH_MODES:
        while model.mode in AUTH_MODES:
            yield auth_response_token(model, draw, good=True)
        return
    if not model.tls:
        if model.hello is None or draw(st.booleans()):
            yield _cmd_ehlo(model, draw, good=True)
        yield _cmd_starttls(model, draw, good=True)
        return
    if model.hello != "EHLO":
        yield _cmd_ehlo(model, draw, good=True)
    if not model.authed:
        yield _cmd_auth(model, draw, good=True)
    while model.mode in AUTH_MODES:
        yield auth_response_token(model, draw, good=True)


def transaction_script(model: Model, draw: Draw) -> Iterator[bytes]:
    """MAIL, RCPTs (maybe a bad one), then a DATA body or BDAT chunks, all pipelined."""
    if model.mode == "data":
        yield data_token(model, draw, end=True)
        return
    if model.mode in AUTH_MODES:
        yield from login_script(model, draw)
        return
    if not model.envelope:
        yield _cmd_mail(model, draw, good=True)
    for _ in range(draw(st.integers(1, 3))):
        yield _cmd_rcpt(model, draw, good=draw(st.integers(0, 4)) > 0)
    if model.bdat_open or (model.body == "BINARYMIME") or draw(st.booleans()):
        chunks = draw(st.integers(1, 3))
        for index in range(chunks):
            # Sometimes left open, for what comes next (RSET, EHLO, STARTTLS, timeout).
            yield _cmd_bdat(model, draw, last=index == chunks - 1 and draw(st.integers(0, 3)) > 0)
        return
    yield _cmd_data(model, draw)
    if model.mode == "data":
        for index in range(3):
            if model.mode != "data":
                break
            yield data_token(model, draw, end=index == 2 or None)


def random_script(model: Model, draw: Draw) -> Iterator[bytes]:
    for _ in range(draw(st.integers(1, 6))):
        yield next_token(model, draw)


SCRIPTS = {"login": login_script, "transaction": transaction_script, "random": random_script}


@dataclass
class Batch:
    wire: bytes
    cut_before: int  # split points must be below this (STARTTLS: the rest in one write)


def draw_batch(model: Model, draw: Draw, script: str) -> Batch:
    wire = bytearray()
    tokens = SCRIPTS[script](model, draw)
    for token in tokens:
        wire += token
        if model.closed or model.mode == "wait_tls":
            break
    else:
        for _ in range(draw(st.integers(0, 2))):  # and some more pipelined at random
            wire += next_token(model, draw)
            if model.closed or model.mode == "wait_tls":
                break
    cut_before = len(wire)
    if model.closed or model.mode == "wait_tls":
        # Pipelined after STARTTLS (in the same write) or after QUIT/421: never answered.
        cut_before = len(wire) - 1
        wire += draw(AFTER_END)
        if model.mode == "wait_tls":
            model.mode = "command"
    return Batch(bytes(wire), cut_before)


def split(draw: Draw, batch: Batch) -> list[bytes]:
    if batch.cut_before <= 1:
        return [batch.wire]
    points = draw(st.lists(st.integers(1, batch.cut_before - 1), max_size=4, unique=True))
    bounds = [0, *sorted(points), len(batch.wire)]
    return [batch.wire[a:b] for a, b in itertools.pairwise(bounds)]


# ------------------------------------------------------------------------ driver


@dataclass
class Driver:
    """Feeds the session and plays the transport, answering in the planned way."""

    session: Session
    observer: Observer
    waits: list[Wait] = field(default_factory=list)

    def feed(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            events = self.observer.take(self.session.receive_data(piece))
            self.answer(events)

    def answer(self, events: list[Event]) -> None:
        while events and isinstance(events[-1], (Authenticate, MessageEnd, StartTLS)):
            last = events[-1]
            assert self.waits, f"unexpected {last!r}"
            wait = self.waits.pop(0)
            assert wait.kind == {Authenticate: "auth", MessageEnd: "commit"}.get(
                type(last), "tls"
            ), (wait, last)
            assert self.session.waiting
            if isinstance(last, StartTLS):
                # Octets sent before the handshake are never read.
                assert self.session.receive_data(wait.late) == []
            if wait.interrupt:
                self.observer.take(self.session.timeout())
                assert self.late_answer(last) == [], "answer accepted after close"
                return
            if isinstance(last, Authenticate):
                good = (last.login, last.password) == (ALICE, GOOD_PASSWORD)
                if last.password == TEMPFAIL_PASSWORD:
                    events = self.session.auth_result(None, failure=R.AUTH_TEMPORARY)
                else:
                    events = self.session.auth_result(Alice() if good else None)
                self.observer.take(events, from_auth_success=good)
            elif isinstance(last, MessageEnd):
                events = self.observer.take(self.session.message_result(wait.reply))
            else:
                events = self.observer.take(self.session.tls_started())
                assert not any(isinstance(e, Send) for e in events)
                self.observer.tls_started()

    def late_answer(self, last: Event) -> list[Event]:
        if isinstance(last, Authenticate):
            return self.session.auth_result(Alice())
        if isinstance(last, MessageEnd):
            return self.session.message_result(R.OK)
        return self.session.tls_started()


def matches(expected: list[Item], actual: list[Item]) -> bool:
    if len(expected) != len(actual):
        return False
    for want, got in zip(expected, actual, strict=True):
        if want[0] != got[0]:
            return False
        if want[0] == "reply":
            if got[1] not in want[1]:
                return False
        elif want != got:
            return False
    return True


# ----------------------------------------------------------------- the machine


class SessionMachine(RuleBasedStateMachine):
    @initialize(
        tls=st.booleans(),
        tls_available=st.sampled_from([True] * 5 + [False]),
        max_errors=st.sampled_from([6, 50, 50]),
    )
    def start(self, tls: bool, tls_available: bool, max_errors: int) -> None:
        settings_ = SessionSettings(
            hostname=HOST,
            max_line=MAX_LINE,
            max_recipients=MAX_RCPTS,
            max_message_size=MAX_SIZE,
            max_errors=max_errors,
            max_auth_failures=10**6,  # the model knows 535 only; the close is unit-tested
            tls_available=tls_available,
        )
        self.session = Session(settings_, tls=tls)
        self.model = Model(tls=tls, tls_available=tls_available, max_errors=max_errors)
        self.observer = Observer(self.session, tls=tls)
        self.driver = Driver(self.session, self.observer)
        self.observer.take(self.session.greeting())
        assert self.observer.history == [("reply", "220")]
        self.observer.history.clear()

    def check(self) -> None:
        expected, actual = self.model.expected, self.observer.history
        assert matches(expected, actual), "\n".join(
            ["expected:", *map(repr, expected), "actual:", *map(repr, actual)]
        )
        assert not self.driver.waits, f"planned answers never asked for: {self.driver.waits}"
        expected.clear()
        actual.clear()

    @rule(data=st.data(), script=st.sampled_from(["login", "transaction", "transaction", "random"]))
    def batch(self, data: st.DataObject, script: str) -> None:
        model = self.model
        if model.closed:
            batch = Batch(data.draw(AFTER_END) + b"QUIT\r\n", 0)
        else:
            batch = draw_batch(model, data.draw, script)
        self.driver.waits = list(model.waits)
        model.waits.clear()
        self.driver.feed(split(data.draw, batch))
        self.check()

    # Known bug 2 (test_timeout_after_a_body_problem_aborts_twice): a timeout after a
    # DATA body went bad gives a second MessageAbort. Not done until fixed.
    @precondition(lambda self: not self.model.closed and not self.model.data_problem)
    @rule(how=st.sampled_from(["timeout", "shutdown", *["no"] * 10]))
    def timeout(self, how: str) -> None:
        if how == "no":  # keep sessions alive long enough to get somewhere
            return
        if how == "shutdown":
            self.model.close("421 4.3.2", "shutdown")
            self.observer.take(self.session.shutdown())
        else:
            self.model.close("421 4.4.2", "timeout")
            self.observer.take(self.session.timeout())
        self.check()

    @rule()
    def answers_nobody_asked_for(self) -> None:
        """Late or spurious transport answers are ignored."""
        assert self.session.auth_result(Alice()) == []
        assert self.session.message_result(R.OK) == []
        assert self.session.tls_started() == []

    @invariant()
    def state_agrees(self) -> None:
        if not hasattr(self, "model"):
            return
        assert self.session.closed == self.model.closed
        assert not self.session.waiting or self.session.closed
        if not self.session.closed:
            assert self.session.tls == self.model.tls
            assert (self.session.principal is not None) == self.model.authed
            assert self.session.in_transaction == self.model.envelope


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------- split points change nothing


@st.composite
def session_streams(draw: Draw) -> bytes:
    """The octets a client sends in a whole session, built with the machine's generators."""
    model = Model(tls=True, tls_available=True, max_errors=50)
    wire = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        script = draw(st.sampled_from(["login", "transaction", "transaction", "random"]))
        wire += draw_batch(model, draw, script).wire
        if model.closed:
            break
    return bytes(wire)


def run_stream(pieces: list[bytes]) -> tuple[bytes, list[Item]]:
    """Replies (all Send data) and the abstract events, playing a plain transport."""
    settings_ = SessionSettings(
        hostname=HOST,
        max_line=MAX_LINE,
        max_recipients=MAX_RCPTS,
        max_message_size=MAX_SIZE,
        max_auth_failures=10**6,
    )
    session = Session(settings_, tls=True)
    observer = Observer(session, tls=True)
    replies = bytearray()

    def take(events: list[Event], *, good: bool = False) -> None:
        observer.take(events, from_auth_success=good)
        replies.extend(b"".join(e.data for e in events if isinstance(e, Send)))
        if events and isinstance(events[-1], Authenticate):
            good = (events[-1].login, events[-1].password) == (ALICE, GOOD_PASSWORD)
            take(session.auth_result(Alice() if good else None), good=good)
        elif events and isinstance(events[-1], MessageEnd):
            take(session.message_result(R.OK))

    for piece in pieces:
        take(session.receive_data(piece))
    return bytes(replies), observer.history


@given(stream=session_streams(), data=st.data())
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_split_points_change_nothing(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12, unique=True))
    bounds = [0, *sorted(cuts), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    whole = run_stream([stream])
    split_ = run_stream(pieces)
    assert body_problems_alike(split_[0]) == body_problems_alike(whole[0])
    assert split_[1] == whole[1]


_BODY_PROBLEMS = re.compile(
    b"|".join(
        re.escape(reply.encode())
        for reply in (R.MESSAGE_TOO_BIG, R.DATA_LINE_TOO_LONG, R.DATA_BARE_LINE_ENDING)
    )
)


def body_problems_alike(replies: bytes) -> bytes:
    """Known bug 3 (test_body_problem_reply_depends_on_the_read_boundary): when content
    has two problems, which one is reported depends on the reads. Equal up to that."""
    return _BODY_PROBLEMS.sub(b"<body problem>\r\n", replies)


# --------------------------------------------------------------- known bugs


def _authed_in_data(max_message_size: int = 50 * 1024 * 1024) -> Session:
    session = Session(SessionSettings(hostname=HOST, max_message_size=max_message_size), tls=True)
    session.receive_data(b"EHLO c.example.org\r\n")
    session.receive_data(b"AUTH PLAIN " + b64(f"\0{ALICE}\0{GOOD_PASSWORD}".encode()) + b"\r\n")
    session.auth_result(Alice())
    session.receive_data(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<b@x.example>\r\n")
    return session


def test_end_of_data_after_bare_lf_depends_on_the_read_boundary() -> None:
    body = b"a\n.\r\nRSET\r\n.\r\n"
    replies = []
    for pieces in ([body], [body[:2], body[2:]]):
        session = _authed_in_data()
        session.receive_data(b"DATA\r\n")
        events = [e for piece in pieces for e in session.receive_data(piece)]
        replies.append(b"".join(e.data for e in events if isinstance(e, Send)))
    # One write: a single 554 at the real end. Two writes: 554, then "250 Reset" for
    # the RSET inside the body, then 500 for the final "." line.
    assert replies[1] == replies[0]


def test_body_problem_reply_depends_on_the_read_boundary() -> None:
    body = b"x" * 1200 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n"
    replies = []
    for pieces in ([body], [body[:1202], body[1202:]]):
        session = _authed_in_data(max_message_size=2000)
        session.receive_data(b"DATA\r\n")
        events = [e for piece in pieces for e in session.receive_data(piece)]
        replies.append(b"".join(e.data for e in events if isinstance(e, Send))[:9])
    assert replies[1] == replies[0]  # b"552 5.3.4" in one write, b"554 5.6.0" in two


@pytest.mark.parametrize(
    "prelude, wire",
    [
        (b"DATA\r\n", b"a\nb\r\n"),  # DATA body with a bare LF, not yet ended
        (b"", b"BDAT 10\r\na\nc"),  # BDAT chunk with a bare LF, partly received
        (b"RSET\r\n", b"BDAT 10\r\nabc"),  # BDAT refused (no MAIL), partly received
    ],
)
@pytest.mark.parametrize("close", ["timeout", "shutdown"])
def test_close_mid_content_aborts_at_most_once(prelude: bytes, wire: bytes, close: str) -> None:
    session = _authed_in_data()
    events = session.receive_data(prelude)
    events += session.receive_data(wire) + getattr(session, close)()
    begun = sum(isinstance(e, MessageBegin) for e in events)
    finished = sum(isinstance(e, (MessageAbort, MessageEnd)) for e in events)
    assert finished <= begun, [type(e).__name__ for e in events]
