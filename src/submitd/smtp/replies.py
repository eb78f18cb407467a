"""SMTP replies with their enhanced status codes (RFC 5321 4.2, RFC 2034, RFC 3463).

Every reply submitd sends carries an enhanced status code, including the greeting's
peers (RFC 2034 3 exempts only the greeting and EHLO's first line; we add it where
clients tolerate it). Replies are built once and kept as bytes where they are constant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str | tuple[str, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def encode(self) -> bytes:
        lines = self.lines
        out = []
        for index, line in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            prefix = f"{self.enhanced} " if self.enhanced else ""
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")


def reply(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, text)


# Positive completions
OK = reply(250, "2.0.0", "Ok")
SENDER_OK = reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = reply(250, "2.1.5", "Recipient ok")
RESET_OK = reply(250, "2.0.0", "Reset")
NOOP_OK = reply(250, "2.0.0", "Ok")
VRFY_CANNOT = reply(252, "2.5.0", "Cannot VRFY user; send mail and delivery will be tried")
HELP = reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
)
START_DATA = reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = reply(235, "2.7.0", "Authentication successful")
BYE = reply(221, "2.0.0", "Bye")

# Transient failures
TIMEOUT = reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Too many recipients")
LOCAL_ERROR = reply(451, "4.3.0", "Local error, message not accepted; try again later")
NO_SPACE = reply(452, "4.3.1", "Insufficient system storage; try again later")
AUTH_TEMPORARY = reply(454, "4.7.0", "Temporary authentication failure")
TLS_NOT_AVAILABLE = reply(454, "4.7.0", "TLS not available")
SHUTTING_DOWN = reply(421, "4.3.2", "Service shutting down")

# Permanent failures
LINE_TOO_LONG = reply(500, "5.5.2", "Line too long")
UNKNOWN_COMMAND = reply(500, "5.5.1", "Command not recognized")
BARE_LINE_ENDING = reply(500, "5.5.2", "Bare CR or LF not allowed; lines end with CRLF")
SYNTAX_ARGS = reply(501, "5.5.4", "Syntax error in parameters")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Command not implemented")
AUTH_CANCELLED = reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = reply(501, "5.5.2", "Cannot decode base64")
AUTH_MECH_UNKNOWN = reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ENCRYPTION_REQUIRED = reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")  # RFC 6409 4.3
TLS_REQUIRED = reply(530, "5.7.0", "Must issue a STARTTLS command first")
SENDER_NOT_OWNED = reply(550, "5.7.1", "Sender address not owned by the authenticated user")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
DATA_LINE_TOO_LONG = reply(
    554, "5.6.0", "Message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)"
)
DATA_BARE_LINE_ENDING = reply(
    554, "5.6.0", "Message has a bare CR or LF; lines end with CRLF (RFC 5321 2.3.8)"
)
NOT_8BIT_CLEAN = reply(
    554, "5.6.0", "Message has 8-bit data but was declared 7BIT; use BODY=8BITMIME"
)
HEADER_FROM_NOT_OWNED = reply(
    550, "5.7.1", "From: header address not owned by the authenticated user"
)
AUTH_TOO_MANY_FAILURES = reply(421, "4.7.0", "Too many failed authentication attempts, closing")
