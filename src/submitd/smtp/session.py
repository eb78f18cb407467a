"""The SMTP submission session as a sans-I/O state machine (RFC 5321, RFC 6409).

Bytes go in (`receive_data`), events come out (`smtp/events.py`): replies to send, a
TLS upgrade, credentials to check, message content to store. No socket, clock, thread
or database is touched here, which is what makes the protocol testable without a
network, fuzzable, and fast: a pipelined batch (RFC 2920) is parsed in one pass and its
replies leave as one write.

Why not aiosmtpd: it advertises neither PIPELINING, ENHANCEDSTATUSCODES, DSN nor
CHUNKING, offers no AUTH on implicit TLS, and costs several times the CPU per message.

The session decides only what SMTP decides: syntax, the order of commands, protocol
limits. Whether a login is right, and whether a user may use a sender or a recipient,
it asks of others: the transport answers `Authenticate` with `auth_result`, handing
back a `Principal` that judges addresses.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from submitd.envelope import Envelope, Recipient
from submitd.smtp import replies as R
from submitd.smtp.body import BodyProblem, DataReader, LineChecker
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
from submitd.smtp.sasl import MECHANISMS, Challenge, Credentials, Mechanism, SaslError
from submitd.smtp.syntax import (
    SyntaxProblem,
    parse_forward_path,
    parse_mail_params,
    parse_params,
    parse_rcpt_params,
    parse_reverse_path,
    split_argument,
)

AUTH_LINE_MAX = 12288  # RFC 4954 4: AUTH command and response lines may be this long


class Principal(Protocol):
    """An authenticated user, as the policy side sees it."""

    @property
    def login(self) -> str: ...

    def check_mail(self, sender: str, declared_size: int | None) -> Reply | None:
        """None if the user may start this transaction (RFC 6409 6.1), else the refusal."""
        ...

    def check_recipient(self, address: str, accepted: int) -> Reply | None:
        """None if the user may add this recipient to the `accepted` ones so far."""
        ...


@dataclass(frozen=True, slots=True)
class SessionSettings:
    hostname: str
    max_line: int = 512  # octets including CRLF, RFC 5321 4.5.3.1.4
    max_recipients: int = 100
    max_message_size: int = 50 * 1024 * 1024
    max_errors: int = 20
    max_auth_failures: int = 3  # failed AUTH in one session, then 421 4.7.0 and close
    tls_available: bool = True


class Mode(Enum):
    COMMAND = auto()
    AUTH_RESPONSE = auto()  # waiting for a line answering a 334 challenge
    DATA = auto()
    BDAT = auto()  # reading the octets of one chunk
    WAIT_AUTH = auto()  # credentials are being checked; input is held
    WAIT_COMMIT = auto()  # the message is being committed; input is held
    WAIT_TLS = auto()  # STARTTLS accepted; nothing is read until the handshake is done
    CLOSED = auto()


_EXTENSIONS_BEFORE_SIZE = ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8")


class Session:
    """One client connection's protocol state."""

    def __init__(self, settings: SessionSettings, *, tls: bool) -> None:
        self.settings = settings
        self.tls = tls
        self.principal: Principal | None = None
        self.ehlo_name: str | None = None
        self.esmtp = False
        self.envelope: Envelope | None = None
        self.errors = 0
        self.auth_failures = 0
        self._mode = Mode.COMMAND
        self._buffer = bytearray()
        self._events: list[Event] = []
        self._discarding = False  # inside an over-long line, dropping until its LF
        self._mechanism: Mechanism | None = None
        self._data: DataReader | None = None
        self._bdat: LineChecker | None = None  # set once a BDAT transaction has begun
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None  # reply owed once the chunk is consumed
        self._message_open = False  # a MessageBegin is not yet followed by End or Abort

    # ------------------------------------------------------------------ inputs

    def greeting(self) -> list[Event]:
        # RFC 2034 3: no enhanced code on the greeting.
        host = self.settings.hostname
        return [Send(R.Reply(220, None, f"{host} ESMTP submitd").encode())]

    def receive_data(self, data: bytes) -> list[Event]:
        if self._mode is Mode.CLOSED or self._mode is Mode.WAIT_TLS:
            return []  # RFC 3207 5: nothing sent before the handshake is ever executed
        if self._mode is Mode.DATA and not self._buffer:
            self._consume_data(data)  # the bulk of a message: no copy into the buffer
        else:
            self._buffer += data
        return self._run()

    def auth_result(
        self, principal: Principal | None, *, failure: Reply = R.AUTH_FAILED
    ) -> list[Event]:
        """`principal` on success; else `failure` (535 5.7.8, or 454 4.7.0 when the
        check itself could not be made, RFC 4954 6)."""
        if self._mode is not Mode.WAIT_AUTH:
            return []  # closed meanwhile (timeout, shutdown)
        self._mode = Mode.COMMAND
        if principal is None:
            self.auth_failures += failure.code == 535  # a 454 is not the client's fault
            if failure.code == 535 and self.auth_failures >= self.settings.max_auth_failures:
                self._close(
                    R.AUTH_TOO_MANY_FAILURES
                )  # a guesser gets no more tries on this connection
                events, self._events = self._events, []
                return events
            self._error(failure)
        else:
            self.principal = principal
            self._send(R.AUTH_OK)
        return self._run()

    def message_result(self, reply: Reply) -> list[Event]:
        """The transport's verdict on the message: `250 ... queued as` or a failure."""
        if self._mode is not Mode.WAIT_COMMIT:
            return []
        self._mode = Mode.COMMAND
        self.envelope = None
        self._data = None
        self._bdat = None
        self._send(reply)
        return self._run()

    def tls_started(self) -> list[Event]:
        """RFC 3207 4.2: after the handshake the client starts over with EHLO."""
        if self._mode is not Mode.WAIT_TLS:
            return []
        self.tls = True
        self.ehlo_name = None
        self.esmtp = False
        self.principal = None
        self._reset_transaction()
        self._mode = Mode.COMMAND
        return self._run()

    def timeout(self) -> list[Event]:
        return self._close_with(R.TIMEOUT)

    def shutdown(self) -> list[Event]:
        return self._close_with(R.SHUTTING_DOWN)

    @property
    def closed(self) -> bool:
        return self._mode is Mode.CLOSED

    @property
    def waiting(self) -> bool:
        """True while an answer from the transport is owed and input is held."""
        return self._mode in (Mode.WAIT_AUTH, Mode.WAIT_COMMIT, Mode.WAIT_TLS)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None

    @property
    def partial_line(self) -> bool:
        """Part of a command line has arrived: the line timer runs (issue 6, slow clients)."""
        return bool(self._buffer) and self._mode in (Mode.COMMAND, Mode.AUTH_RESPONSE)

    @property
    def in_content(self) -> bool:
        """Reading DATA or BDAT content: the minimum transfer rate applies."""
        return self._mode in (Mode.DATA, Mode.BDAT)

    # ------------------------------------------------------------- the engine

    def _run(self) -> list[Event]:
        while self._buffer or self._mode is Mode.BDAT:
            mode = self._mode
            if mode is Mode.DATA:
                self._consume_data()
            elif mode is Mode.BDAT:
                if not self._consume_bdat():
                    break
            elif mode is Mode.COMMAND or mode is Mode.AUTH_RESPONSE:
                line = self._next_line()
                if line is False:
                    break
                if line is not True:
                    self._dispatch(line)
            else:
                break
            if self._mode is mode and mode is Mode.DATA:
                break  # all input consumed, the end of data not yet seen
        events, self._events = self._events, []
        return events

    def _dispatch(self, line: bytes) -> None:
        if self._mode is Mode.AUTH_RESPONSE:
            self._auth_response(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.reply(500, "5.5.2", "Command is not valid UTF-8"))
            return
        verb, _, arg = text.partition(" ")
        handler = _HANDLERS.get(verb.upper())
        if handler is None:
            refused = verb.upper() in _REFUSED
            self._error(R.NOT_IMPLEMENTED if refused else R.UNKNOWN_COMMAND)
            return
        try:
            handler(self, arg)
        except SyntaxProblem as problem:
            self._error(problem.reply)

    def _next_line(self) -> bytes | bool:
        """The next complete line without its CRLF; False if more input is needed, True
        if a line was consumed and answered here.

        An over-long line is dropped up to its LF and answered once; its tail is never
        taken for a command. A line with a bare CR or LF is refused (RFC 5321 2.3.8).
        """
        buffer = self._buffer
        limit = self._line_limit()
        lf = buffer.find(b"\n")
        if lf < 0:
            if len(buffer) > limit:
                self._discarding = True
                del buffer[:]
            return False
        line = bytes(buffer[: lf + 1])
        del buffer[: lf + 1]
        if self._discarding or len(line) > limit:
            self._discarding = False
            self._line_too_long()
            return True
        if line[-2:-1] != b"\r" or b"\r" in line[:-2]:
            if self._mode is Mode.AUTH_RESPONSE:
                self._mode = Mode.COMMAND
                self._mechanism = None
            self._error(R.BARE_LINE_ENDING)
            return True
        return line[:-2]

    def _line_limit(self) -> int:
        if self._mode is Mode.AUTH_RESPONSE or self._buffer[:5].upper() == b"AUTH ":
            return AUTH_LINE_MAX
        return self.settings.max_line

    def _line_too_long(self) -> None:
        if self._mode is Mode.AUTH_RESPONSE:
            self._mode = Mode.COMMAND
            self._mechanism = None
            self._error(R.reply(500, "5.5.6", "Authentication exchange line is too long"))
        else:
            self._error(R.LINE_TOO_LONG)

    # -------------------------------------------------------------- replies

    def _send(self, reply: Reply) -> None:
        self._events.append(Send(reply.encode()))

    def _error(self, reply: Reply) -> None:
        """An error reply to a command; too many of them end the session."""
        self._send(reply)
        self.errors += 1
        if self.errors >= self.settings.max_errors:
            self._close(R.TOO_MANY_ERRORS)

    def _close_with(self, reply: Reply) -> list[Event]:
        self._close(reply)
        events, self._events = self._events, []
        return events

    def _close(self, reply: Reply) -> None:
        if self._mode is Mode.CLOSED:
            return
        self._abort_message()
        self._send(reply)
        self._events.append(Close())
        self._mode = Mode.CLOSED
        self._buffer.clear()

    def _begin_message(self) -> None:
        assert self.envelope is not None
        self._events.append(MessageBegin(self.envelope))
        self._message_open = True

    def _end_message(self) -> None:
        self._events.append(MessageEnd())
        self._message_open = False

    def _abort_message(self) -> None:
        """Discard the content begun, once: after an End or an Abort this does nothing."""
        if self._message_open:
            self._events.append(MessageAbort())
            self._message_open = False

    def _reset_transaction(self) -> None:
        self._abort_message()
        self.envelope = None
        self._data = None
        self._bdat = None
        self._bdat_error = None

    # ------------------------------------------------------------- commands

    def _ehlo(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _helo(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, *, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name:
            self._error(R.reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        self._reset_transaction()  # RFC 5321 4.1.4
        self.ehlo_name = name
        self.esmtp = esmtp
        greeting = f"{self.settings.hostname} greets {_echo(name)}"
        # RFC 2034 3: the EHLO reply carries no enhanced codes.
        lines = (greeting, *self._extensions()) if esmtp else (greeting,)
        self._send(R.Reply(250, None, lines))

    def _extensions(self) -> list[str]:
        """Exactly what works in the current state (RFC 5321 4.1.1.1)."""
        lines = [*_EXTENSIONS_BEFORE_SIZE, f"SIZE {self.settings.max_message_size}"]
        lines += ["CHUNKING", "BINARYMIME", "DSN"]
        if not self.tls and self.settings.tls_available:
            lines.append("STARTTLS")
        if self.tls and self.principal is None:
            lines.append("AUTH " + " ".join(MECHANISMS))  # RFC 4954: only under TLS
        lines.append("HELP")
        return lines

    def _starttls(self, arg: str) -> None:
        if arg.strip():
            self._error(R.SYNTAX_ARGS)
        elif self.tls:
            self._error(R.reply(503, "5.5.1", "TLS already active"))
        elif not self.settings.tls_available:
            self._error(R.TLS_NOT_AVAILABLE)
        else:
            self._send(R.READY_TLS)
            self._events.append(StartTLS())
            self._mode = Mode.WAIT_TLS
            self._buffer.clear()  # RFC 3207 5: pipelined commands after STARTTLS are void

    def _auth(self, arg: str) -> None:
        if not self.tls:
            self._error(R.AUTH_ENCRYPTION_REQUIRED)  # RFC 4954 4, RFC 6409 4.3
            return
        if self.ehlo_name is None or not self.esmtp:
            self._error(R.reply(503, "5.5.1", "Send EHLO first"))
            return
        if self.principal is not None:
            self._error(R.reply(503, "5.5.1", "Already authenticated"))  # RFC 4954 4
            return
        if self.envelope is not None:
            self._error(R.reply(503, "5.5.1", "AUTH not permitted during a mail transaction"))
            return
        name, _, initial_text = arg.strip().partition(" ")
        factory = MECHANISMS.get(name.upper())
        if factory is None:
            self._error(R.AUTH_MECH_UNKNOWN)
            return
        initial: bytes | None = None
        if initial_text:
            initial = self._decode_sasl(initial_text)
            if initial is None:
                return
        self._mechanism = factory()
        self._sasl_step(lambda mechanism: mechanism.start(initial))

    def _auth_response(self, line: bytes) -> None:
        if line == b"*":
            self._mode = Mode.COMMAND
            self._mechanism = None
            self._error(R.AUTH_CANCELLED)  # RFC 4954 4
            return
        self._mode = Mode.COMMAND
        response = self._decode_sasl(line.decode("ascii", "replace"))
        if response is None:
            self._mechanism = None
            return
        self._sasl_step(lambda mechanism: mechanism.step(response))

    def _decode_sasl(self, text: str) -> bytes | None:
        if text == "=":
            return b""  # RFC 4954 4: an empty initial response
        try:
            return base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._error(R.AUTH_BAD_BASE64)
            return None

    def _sasl_step(self, step: Callable[[Mechanism], Challenge | Credentials]) -> None:
        mechanism = self._mechanism
        assert mechanism is not None
        try:
            outcome = step(mechanism)
        except SaslError as problem:
            self._mechanism = None
            self._error(R.AUTH_BAD_BASE64 if problem.malformed else R.AUTH_FAILED)
            return
        if isinstance(outcome, Challenge):
            challenge = base64.b64encode(outcome.data).decode("ascii")
            self._send(R.Reply(334, None, challenge))
            self._mode = Mode.AUTH_RESPONSE
            return
        self._mechanism = None
        self._mode = Mode.WAIT_AUTH
        self._events.append(Authenticate(outcome.login, outcome.password, mechanism.name))

    def _mail(self, arg: str) -> None:
        if self.ehlo_name is None:
            self._error(R.reply(503, "5.5.1", "Send EHLO first"))
            return
        if self.principal is None:
            # RFC 6409 4.3: no mail before authentication; say what is missing.
            self._error(R.AUTH_REQUIRED if self.tls else R.TLS_REQUIRED)
            return
        if self.envelope is not None:
            self._error(R.reply(503, "5.5.1", "Nested MAIL command"))
            return
        path, param_text = split_argument(arg, "FROM")
        if param_text and not self.esmtp:
            self._error(R.reply(555, "5.5.4", "Parameters need EHLO"))
            return
        params = parse_mail_params(
            parse_params(param_text), max_size=self.settings.max_message_size
        )
        mailbox = parse_reverse_path(path, utf8=params.smtputf8)
        sender = "" if mailbox is None else str(mailbox)
        refusal = self.principal.check_mail(sender, params.size)
        if refusal is not None:
            self._error(refusal)
            return
        self.envelope = Envelope(
            sender=sender,
            body=params.body,
            smtputf8=params.smtputf8,
            size=params.size,
            ret=params.ret,
            envid=params.envid,
            auth=params.auth,
        )
        self._send(R.SENDER_OK)

    def _rcpt(self, arg: str) -> None:
        envelope = self.envelope
        if envelope is None or self.principal is None:
            self._error(R.reply(503, "5.5.1", "Need MAIL command first"))
            return
        if len(envelope.recipients) >= self.settings.max_recipients:
            self._send(R.TOO_MANY_RECIPIENTS)  # RFC 5321 4.5.3.1.10
            return
        path, param_text = split_argument(arg, "TO")
        if param_text and not self.esmtp:
            self._error(R.reply(555, "5.5.4", "Parameters need EHLO"))
            return
        params = parse_rcpt_params(parse_params(param_text))
        mailbox = parse_forward_path(path, utf8=envelope.smtputf8)
        # RFC 5321 4.1.1.3: <Postmaster> without a domain means our own postmaster.
        address = str(mailbox) if mailbox.domain else f"postmaster@{self.settings.hostname}"
        refusal = self.principal.check_recipient(address, len(envelope.recipients))
        if refusal is not None:
            self._error(refusal)
            return
        envelope.recipients.append(Recipient(address, params.notify, params.orcpt))
        self._send(R.RECIPIENT_OK)

    def _check_ready_for_content(self) -> Reply | None:
        if self.envelope is None:
            return R.reply(503, "5.5.1", "Need MAIL command first")
        if not self.envelope.recipients:
            return R.reply(554, "5.5.1", "No valid recipients")  # RFC 2920 3.1
        return None

    def _data_command(self, arg: str) -> None:
        if arg.strip():
            self._error(R.SYNTAX_ARGS)
            return
        problem = self._check_ready_for_content()
        if problem is None and self._bdat is not None:
            problem = R.reply(503, "5.5.1", "DATA cannot follow BDAT")  # RFC 3030 3
        if problem is None and self.envelope is not None and self.envelope.body == "BINARYMIME":
            problem = R.reply(503, "5.5.1", "BODY=BINARYMIME needs BDAT")  # RFC 3030 3
        if problem is not None:
            self._error(problem)
            return
        assert self.envelope is not None
        self._send(R.START_DATA)
        self._begin_message()
        self._data = DataReader(self.settings.max_message_size)
        self._mode = Mode.DATA

    def _consume_data(self, data: bytes | None = None) -> None:
        """Feed DATA content: `data` directly, or else everything buffered."""
        reader = self._data
        assert reader is not None
        if data is None:
            data = bytes(self._buffer)
            self._buffer.clear()
        content, rest = reader.feed(data)
        if reader.checker.problem is not None:
            self._abort_message()  # once; the rest is read and dropped
        elif content:
            self._events.append(MessageChunk(content))
        if rest is None:
            return
        self._buffer += rest
        self._mode = Mode.COMMAND
        self._finish_content(reader.checker)

    def _finish_content(self, checker: LineChecker) -> None:
        """After the end of DATA or BDAT LAST: refuse, or hand over for commit."""
        problem = checker.finish()
        if problem is None:
            self._mode = Mode.WAIT_COMMIT
            self._end_message()
            return
        self._abort_message()
        self._data = None
        self._bdat = None
        self.envelope = None
        self._send(_PROBLEM_REPLIES[problem])

    def _bdat_command(self, arg: str) -> None:
        """RFC 3030 2: BDAT size [LAST]; the octets follow the line at once."""
        words = arg.split()
        valid = 1 <= len(words) <= 2 and words[0].isdigit() and len(words[0]) <= 20
        if not valid or (len(words) == 2 and words[1].upper() != "LAST"):
            # The chunk size is unknown, so its octets cannot be skipped.
            self._error(R.reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            return
        self._bdat_remaining = int(words[0])
        self._bdat_last = len(words) == 2
        self._bdat_error = self._check_ready_for_content()
        if self._bdat_error is None and self._data is not None:
            self._bdat_error = R.reply(503, "5.5.1", "BDAT cannot follow DATA")
        if self._bdat_error is None and self._bdat is None:
            assert self.envelope is not None
            binary = self.envelope.body == "BINARYMIME"
            self._bdat = LineChecker(self.settings.max_message_size, binary=binary)
            self._begin_message()
        self._mode = Mode.BDAT

    def _consume_bdat(self) -> bool:
        """Take this chunk's octets; False if more input is needed."""
        take = min(self._bdat_remaining, len(self._buffer))
        if take:
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            self._bdat_remaining -= take
            checker = self._bdat
            if self._bdat_error is None and checker is not None:
                checker.feed(piece)
                if checker.problem is not None:
                    self._abort_message()
                else:
                    self._events.append(MessageChunk(piece))
        if self._bdat_remaining:
            return False
        self._mode = Mode.COMMAND
        self._end_bdat_chunk()
        return True

    def _end_bdat_chunk(self) -> None:
        if self._bdat_error is not None:
            self._error(self._bdat_error)
            self._bdat_error = None
            return
        checker = self._bdat
        assert checker is not None
        if checker.problem is not None:
            # RFC 3030 2: a failed chunk fails the transaction; later chunks get 503.
            self._bdat = None
            self.envelope = None
            self._send(_PROBLEM_REPLIES[checker.problem])
        elif self._bdat_last:
            self._finish_content(checker)
        else:
            self._send(R.reply(250, "2.0.0", f"{checker.size} octets received"))

    def _rset(self, arg: str) -> None:
        if arg.strip():
            self._error(R.SYNTAX_ARGS)
            return
        self._reset_transaction()
        self._send(R.RESET_OK)

    def _noop(self, arg: str) -> None:
        self._send(R.NOOP_OK)

    def _vrfy(self, arg: str) -> None:
        if not arg.strip():
            self._error(R.SYNTAX_ARGS)
        else:
            self._send(R.VRFY_CANNOT)  # RFC 5321 3.5.3: 252, never confirm users

    def _help(self, arg: str) -> None:
        self._send(R.HELP)

    def _quit(self, arg: str) -> None:
        self._reset_transaction()
        self._send(R.BYE)
        self._events.append(Close())
        self._mode = Mode.CLOSED
        self._buffer.clear()


def _echo(text: str, limit: int = 64) -> str:
    """Client text fit for a reply line: printable ASCII only, short enough that the
    line stays within 512 octets (RFC 5321 4.2, 4.5.3.1.5)."""
    kept = "".join(c if " " < c < "\x7f" else "?" for c in text[:limit])
    return kept + ("..." if len(text) > limit else "")


_PROBLEM_REPLIES = {
    BodyProblem.TOO_BIG: R.MESSAGE_TOO_BIG,
    BodyProblem.LINE_TOO_LONG: R.DATA_LINE_TOO_LONG,
    BodyProblem.BARE_LINE_ENDING: R.DATA_BARE_LINE_ENDING,
}

_HANDLERS: dict[str, Callable[[Session, str], None]] = {
    "EHLO": Session._ehlo,
    "HELO": Session._helo,
    "STARTTLS": Session._starttls,
    "AUTH": Session._auth,
    "MAIL": Session._mail,
    "RCPT": Session._rcpt,
    "DATA": Session._data_command,
    "BDAT": Session._bdat_command,
    "RSET": Session._rset,
    "NOOP": Session._noop,
    "VRFY": Session._vrfy,
    "HELP": Session._help,
    "QUIT": Session._quit,
}

# RFC 6409 table 1: ETRN and ATRN MUST NOT be offered on submission; EXPN and TURN
# are not offered either. They are known, so they get 502 rather than 500.
_REFUSED = frozenset({"ETRN", "ATRN", "EXPN", "TURN", "SEND", "SOML", "SAML"})
