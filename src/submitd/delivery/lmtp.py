"""LMTP delivery (RFC 2033) to a local mailbox server such as Dovecot or Cyrus.

Why LMTP and not SMTP for the last hop: an LMTP server has no queue of its own, so it
answers for each recipient after the message is sent (RFC 2033 4.2). One mailbox over
quota no longer decides for all the others, and a 250 means "in the mailbox", not
"queued somewhere". aiosmtplib speaks no LMTP (it expects one reply after DATA), so
this route is written directly on asyncio streams.

One connection per `deliver()` call, closed with QUIT at the end: a local mailbox server
accepts a connection in microseconds, and a fresh connection per job means no shared
state between concurrent deliveries and nothing stale to detect. `close()` has nothing
to release.

What the route answers, per recipient (types.Route): 2xx DELIVERED, 4xx DEFERRED, 5xx
FAILED, from the reply to RCPT, or to the message itself for the recipients the server
accepted. Everything that ends the session early (no connection, a timeout, a lost
connection, a reply that is not LMTP) defers the recipients not yet decided: the
scheduler tries again later, and a possible duplicate is better than a loss
(RFC 5321 6.1).

Message content is read and dot-stuffed by `submitd.delivery.content`, as for SMTP:
spooled bodies in a thread, never line by line in Python.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from submitd.delivery.content import DotStuffer, pieces
from submitd.delivery.types import Job, Outcome, Status
from submitd.envelope import Recipient

_MAX_REPLY_LINES = 100  # a multi-line reply longer than this is not a mailbox server's
_READ_LIMIT = 64 * 1024  # longest reply line we accept (RFC 5321 4.5.3.1.5 says 512)
_QUIT_TIMEOUT = 10.0  # the QUIT reply is a courtesy: never wait the full timeout for it

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]?)(.*?)\r?\n?$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")
# CR, LF and NUL in an address would smuggle a command into the session; the session
# that accepted the message refuses them, and this check keeps it that way here.
_UNSAFE_ADDRESS = re.compile(r"[\r\n\x00]")


@dataclass(frozen=True, slots=True)
class LmtpSettings:
    """Where the mailbox server listens: a Unix socket, or a host and port on TCP.

    `timeout` bounds every single wait (connect, each reply, each write), in seconds;
    RFC 5321 4.5.3.2 suggests minutes, not seconds, for the DATA phase, and a mailbox
    server under load can take a while to say "saved".
    """

    socket: Path | None = None
    host: str | None = None
    port: int | None = None
    lhlo_name: str = "localhost"
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.host is None):
            raise ValueError("LMTP needs either a Unix socket or a host (and port), not both")
        if self.host is not None:
            if self.port is None:
                raise ValueError("LMTP over TCP needs a port")
            if self.port == 25:
                # RFC 2033 1: LMTP "MUST NOT be used on TCP port 25".
                raise ValueError("LMTP must not be used on TCP port 25 (RFC 2033 1)")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if not self.lhlo_name or any(c.isspace() for c in self.lhlo_name):
            raise ValueError("lhlo_name must be a host name without spaces")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")

    @property
    def remote_mta(self) -> str:
        """How outcomes name this hop: "lmtp:/run/dovecot/lmtp" or "lmtp:127.0.0.1:24"."""
        if self.socket is not None:
            return f"lmtp:{self.socket}"
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"lmtp:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) reply from the server."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as one line for an Outcome and a DSN: "550 5.1.1 <x> unknown"."""
        return " ".join([str(self.code), *(line for line in self.lines if line)])

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code the server gave (RFC 2034, which RFC 2033 5 makes every
        LMTP server offer); "X.0.0" of the reply's class when it gave none, or gave one
        of another class than the reply's own."""
        found = _ENHANCED.match(self.lines[0]) if self.lines else None
        if found is not None and int(found.group(1)) == self.code // 100:
            return found.group(0)
        return f"{self.code // 100}.0.0"


class _SessionEnded(Exception):
    """The session cannot go on; every recipient not yet decided gets this outcome."""

    def __init__(self, reply: str, enhanced: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.enhanced = enhanced


def _outcome(recipient: Recipient, reply: Reply, remote_mta: str) -> Outcome:
    """2xx DELIVERED, 4xx DEFERRED, 5xx FAILED (RFC 5321 4.2.1), with the server's
    reply and enhanced code kept for the log and the DSN."""
    klass = reply.code // 100
    status = {2: Status.DELIVERED, 4: Status.DEFERRED}.get(klass, Status.FAILED)
    return Outcome(recipient, status, reply.text, reply.enhanced, remote_mta)


class _Session:
    """One LMTP session on an open connection, for one job."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        settings: LmtpSettings,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.settings = settings
        self.remote_mta = settings.remote_mta
        self.decided: dict[int, Outcome] = {}  # recipient index -> outcome
        self.data_sent = False  # the whole message went out: its fate may be unknown

    async def run(self, job: Job) -> list[Outcome]:
        try:
            await self._transaction(job)
        except _SessionEnded as end:
            self._defer_rest(job.recipients, end.reply, end.enhanced)
        except TimeoutError:
            self._defer_rest(job.recipients, self._lost("timed out"), "4.4.2")
        except (OSError, asyncio.IncompleteReadError, EOFError) as exc:
            self._defer_rest(job.recipients, self._lost(f"connection lost ({exc})"), "4.4.2")
        else:
            await self._quit()
        return [self.decided[i] for i in range(len(job.recipients))]

    def _lost(self, what: str) -> str:
        if self.data_sent:
            # RFC 2033 4.2 leaves no way to know which of the remaining recipients got
            # the message; trying again may duplicate, giving up may lose (RFC 5321 6.1).
            return f"{self.remote_mta} {what} after the message was sent; trying again"
        return f"{self.remote_mta} {what}"

    def _defer_rest(self, recipients: Sequence[Recipient], reply: str, enhanced: str) -> None:
        for index, recipient in enumerate(recipients):
            if index not in self.decided:
                self.decided[index] = Outcome(
                    recipient, Status.DEFERRED, reply, enhanced, self.remote_mta
                )

    def _decide_all(
        self, recipients: Sequence[Recipient], status: Status, reply: str, code: str
    ) -> None:
        for index, recipient in enumerate(recipients):
            self.decided.setdefault(index, Outcome(recipient, status, reply, code, self.remote_mta))

    async def _transaction(self, job: Job) -> None:
        recipients = job.recipients
        envelope = job.envelope
        greeting = await self._read_reply()
        if greeting.code != 220:
            raise _SessionEnded(greeting.text, _temporary(greeting))
        # RFC 2033 4.1: LHLO, never HELO or EHLO; the reply lists the extensions.
        await self._send(f"LHLO {self.settings.lhlo_name}\r\n".encode())
        lhlo = await self._read_reply()
        if lhlo.code != 250:
            raise _SessionEnded(lhlo.text, _temporary(lhlo))
        extensions = _extensions(lhlo)

        refusal = self._refusal(job, extensions)
        if refusal is not None:
            self._decide_all(recipients, Status.FAILED, *refusal)
            return

        binary = envelope.body.upper() == "BINARYMIME"
        mail = _mail_command(job, extensions, binary)
        rcpts: list[tuple[int, bytes]] = []
        for index, recipient in enumerate(recipients):
            if _UNSAFE_ADDRESS.search(recipient.address):
                self.decided[index] = Outcome(
                    recipient,
                    Status.FAILED,
                    "recipient address with CR, LF or NUL: not sent",
                    "5.1.3",
                    None,
                )
            else:
                rcpts.append((index, _path_command("RCPT TO", recipient.address)))
        if not rcpts:
            return

        # RFC 2920 3.1 (which RFC 2033 5 requires an LMTP server to offer): MAIL, the
        # RCPTs and DATA go in one write, and the replies are read in order after it.
        pipelined = "PIPELINING" in extensions
        send_data_early = pipelined and not binary
        if pipelined:
            group = [mail, *(command for _, command in rcpts)]
            if send_data_early:
                group.append(b"DATA\r\n")
            await self._send(b"".join(group))
        else:
            await self._send(mail)
        mail_reply = await self._read_reply()
        mail_ok = self._check_mail(mail_reply)

        accepted: list[int] = []
        for index, command in rcpts:
            if not pipelined:
                if not mail_ok:
                    break
                await self._send(command)
            reply = await self._read_reply()
            if not mail_ok:
                continue  # 503s after a refused MAIL: the MAIL reply decides
            if reply.code // 100 == 2:
                accepted.append(index)
            elif reply.code // 100 in (4, 5):
                self.decided[index] = _outcome(recipients[index], reply, self.remote_mta)
            else:
                raise _SessionEnded(f"unexpected reply to RCPT: {reply.text}", "4.5.0")
        if not mail_ok:
            # A refused MAIL decides for every recipient (RFC 5321 4.1.1.2).
            status = Status.DEFERRED if mail_reply.code // 100 == 4 else Status.FAILED
            self._decide_all(recipients, status, mail_reply.text, mail_reply.enhanced)

        if binary:
            if accepted:
                await self._send_bdat(job)
                await self._read_per_recipient(recipients, accepted)
            return

        if send_data_early:
            data_reply = await self._read_reply()
        elif accepted:
            await self._send(b"DATA\r\n")
            data_reply = await self._read_reply()
        else:
            return  # nobody accepted: no DATA (RFC 2033 4.2 would answer 503 anyway)

        if data_reply.code != 354:
            if accepted and data_reply.code // 100 in (4, 5):
                for index in accepted:
                    self.decided[index] = _outcome(recipients[index], data_reply, self.remote_mta)
                return
            if not accepted:
                return  # the expected 503/554 to a DATA with no valid recipient
            raise _SessionEnded(f"unexpected reply to DATA: {data_reply.text}", "4.5.0")
        if not accepted:
            # A 354 to a pipelined DATA after every RCPT was refused (RFC 2033 4.2 says
            # 503): the bare terminator, no message (RFC 2920 3.1), and by the rule of
            # one reply per accepted RCPT, no reply to wait for.
            await self._send(b".\r\n")
            return
        await self._send_data(job)
        # RFC 2033 4.2: one reply per accepted RCPT, in RCPT order.
        await self._read_per_recipient(recipients, accepted)

    def _refusal(self, job: Job, extensions: dict[str, str]) -> tuple[str, str] | None:
        """A permanent reason not to send the message to this server at all."""
        envelope = job.envelope
        if _UNSAFE_ADDRESS.search(envelope.sender):
            return "sender address with CR, LF or NUL: not sent", "5.1.7"
        if envelope.smtputf8 and "SMTPUTF8" not in extensions:
            # RFC 6531 3.4: a message that needs SMTPUTF8 must not go to a server that
            # does not offer it; X.6.7 is the code RFC 6531 registers for this.
            return f"{self.remote_mta} does not offer SMTPUTF8, which the message needs", "5.6.7"
        if envelope.body.upper() == "BINARYMIME" and not (
            "BINARYMIME" in extensions and "CHUNKING" in extensions
        ):
            # RFC 3030 3: BINARYMIME content goes only by BDAT to a server that offers
            # it; there is no downgrade that leaves such content intact.
            return (
                f"{self.remote_mta} does not offer BINARYMIME and CHUNKING, "
                "which the message needs",
                "5.6.3",
            )
        limit = extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and job.message.size > int(limit):
            # RFC 1870 6: a message larger than the announced limit is not sent.
            return (
                f"message of {job.message.size} octets is larger than the "
                f"{limit} {self.remote_mta} accepts",
                "5.3.4",
            )
        return None

    def _check_mail(self, reply: Reply) -> bool:
        if reply.code // 100 == 2:
            return True
        if reply.code // 100 in (4, 5):
            return False
        raise _SessionEnded(f"unexpected reply to MAIL: {reply.text}", "4.5.0")

    async def _read_per_recipient(
        self, recipients: Sequence[Recipient], accepted: list[int]
    ) -> None:
        for index in accepted:
            reply = await self._read_reply()
            if reply.code // 100 not in (2, 4, 5):
                raise _SessionEnded(self._lost(f"gave a bad reply ({reply.text})"), "4.5.0")
            self.decided[index] = _outcome(recipients[index], reply, self.remote_mta)

    async def _send_data(self, job: Job) -> None:
        stuffer = DotStuffer()
        async for piece in pieces(job.message):
            await self._send(stuffer.feed(piece))
        await self._send(stuffer.finish())
        self.data_sent = True

    async def _send_bdat(self, job: Job) -> None:
        """The whole message as one `BDAT n LAST` chunk (RFC 3030 2): no stuffing, no
        terminator, so the size must be exact; a source that yields another number of
        octets leaves the server mid-chunk, and the session is ended, not QUIT."""
        size = job.message.size
        await self._send(f"BDAT {size} LAST\r\n".encode())
        sent = 0
        async for piece in pieces(job.message):
            sent += len(piece)
            if sent > size:
                break
            await self._send(piece)
        if sent != size:
            raise _SessionEnded(
                f"the stored message has not the {size} octets it claims: not sent", "4.3.0"
            )
        self.data_sent = True

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.settings.timeout):
            await self.writer.drain()

    async def _read_reply(self, timeout: float | None = None) -> Reply:
        """One reply, all its lines (RFC 5321 4.2.1): "250-..." continues, "250 ..."
        (or a bare "250") ends it; every line must carry the same code."""
        lines: list[str] = []
        code: int | None = None
        async with asyncio.timeout(timeout or self.settings.timeout):
            while len(lines) < _MAX_REPLY_LINES:
                try:
                    raw = await self.reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    raise _SessionEnded(
                        self._lost("sent an over-long reply line"), "4.5.0"
                    ) from exc
                except asyncio.IncompleteReadError as exc:
                    raise _SessionEnded(self._lost("closed the connection"), "4.4.2") from exc
                found = _REPLY_LINE.match(raw)
                if found is None or (code is not None and int(found.group(1)) != code):
                    shown = raw[:80].decode("utf-8", "replace").strip()
                    raise _SessionEnded(self._lost(f"gave a bad reply line {shown!r}"), "4.5.0")
                code = int(found.group(1))
                lines.append(found.group(3).decode("utf-8", "replace").strip())
                if found.group(2) != b"-":
                    return Reply(code, tuple(lines))
        raise _SessionEnded(self._lost("sent a reply of too many lines"), "4.5.0")

    async def _quit(self) -> None:
        """QUIT (RFC 5321 4.1.1.10) after a session that ended in order. Its reply
        changes nothing, so a failure here is ignored."""
        with suppress(OSError, TimeoutError, _SessionEnded, asyncio.IncompleteReadError):
            await self._send(b"QUIT\r\n")
            await self._read_reply(timeout=min(self.settings.timeout, _QUIT_TIMEOUT))


def _temporary(reply: Reply) -> str:
    """The enhanced code for a session the server would not start: its own if it is a
    4xx one, otherwise 4.3.0. A 5xx greeting or LHLO reply from a mailbox server we are
    configured to use says the server is broken or misconfigured, not that the mail is
    undeliverable, so the mail waits in the queue for it to be fixed."""
    return reply.enhanced if reply.code // 100 == 4 else "4.3.0"


def _extensions(lhlo: Reply) -> dict[str, str]:
    """The LHLO reply's lines after the first, as {"SIZE": "1000000", "PIPELINING": ""}."""
    found: dict[str, str] = {}
    for line in lhlo.lines[1:]:
        keyword, _, parameters = line.partition(" ")
        if keyword:
            found[keyword.upper()] = parameters.strip()
    return found


def _path_command(verb: str, address: str) -> bytes:
    # UTF-8 is only ever non-ASCII when the transaction is SMTPUTF8 (RFC 6531 3.3);
    # the session refused a non-ASCII address in any other one.
    return f"{verb}:<{address}>\r\n".encode()


def _mail_command(job: Job, extensions: dict[str, str], binary: bool) -> bytes:
    """MAIL FROM with the parameters the server offers and the message needs.

    BODY=8BITMIME only where the server offers 8BITMIME (RFC 6152 3). An 8-bit message
    to a server that does not offer it is still sent, without the parameter: an LMTP
    server is a mailbox store set up by prior arrangement (RFC 2033 1), RFC 2033 5 says
    it SHOULD offer 8BITMIME, and the stores in use take 8-bit content as it is (this is
    what Postfix's LMTP client does as well).
    """
    envelope = job.envelope
    parameters: list[str] = []
    if binary:
        parameters.append("BODY=BINARYMIME")  # RFC 3030 3; _refusal checked the offer
    elif envelope.body.upper() == "8BITMIME" and "8BITMIME" in extensions:
        parameters.append("BODY=8BITMIME")
    if envelope.smtputf8:
        parameters.append("SMTPUTF8")  # RFC 6531 3.4; _refusal checked the offer
    if "SIZE" in extensions:
        parameters.append(f"SIZE={job.message.size}")  # RFC 1870 6
    command = _path_command("MAIL FROM", envelope.sender)
    if parameters:
        command = command[:-2] + (" " + " ".join(parameters)).encode() + b"\r\n"
    return command


class LmtpRoute:
    """A route to one LMTP server (types.Route). Safe to use from concurrent tasks:
    each `deliver()` has its own connection."""

    def __init__(self, settings: LmtpSettings) -> None:
        self.settings = settings

    @property
    def remote_mta(self) -> str:
        return self.settings.remote_mta

    async def deliver(self, job: Job) -> list[Outcome]:
        """One outcome per recipient of the job, in order; never raises for a delivery
        problem."""
        if not job.recipients:
            return []
        try:
            async with asyncio.timeout(self.settings.timeout):
                reader, writer = await self._connect()
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            # Nobody answered, so no remote_mta: the DSN's Remote-MTA is for a host that
            # said something (RFC 3464 2.3.5).
            return [
                Outcome(
                    recipient,
                    Status.DEFERRED,
                    f"cannot connect to {self.remote_mta}: {reason}",
                    "4.4.1",  # RFC 3463: no answer from host
                )
                for recipient in job.recipients
            ]
        session = _Session(reader, writer, self.settings)
        try:
            return await session.run(job)
        finally:
            writer.close()
            with suppress(OSError, TimeoutError):
                async with asyncio.timeout(_QUIT_TIMEOUT):
                    await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        settings = self.settings
        if settings.socket is not None:
            return await asyncio.open_unix_connection(settings.socket, limit=_READ_LIMIT)
        return await asyncio.open_connection(settings.host, settings.port, limit=_READ_LIMIT)

    async def close(self) -> None:
        """Nothing is kept open between deliveries, so there is nothing to close."""
