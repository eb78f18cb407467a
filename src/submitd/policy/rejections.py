"""One log line per policy rejection, at a bounded rate (RFC 6409 5.2).

RFC 6409 5.2: the MSA SHOULD log message errors, "especially apparent misconfigurations
of client software", and "it is important to impose limits on such logging" so that a
client cannot fill the disk. A misconfigured client retrying every second is exactly
the case: its first lines say everything, the rest only how many there were.

Each line names the user, the rule (the configuration key that caused the rejection),
the reply code and the enhanced status code (RFC 3463) and the reply text, as
`key=value` fields like the session log. At most `policy.rejection_log_per_minute`
lines per user and minute are written; the others are counted, and one line
"N more rejections suppressed" per user follows when the minute is over.

Minutes are fixed UTC minutes shared by all users, so at the turn of a minute the whole
table is summarised and emptied: memory holds only the users rejected in the current
minute, and at most `max_users` of them. Past that (thousands of users rejected in one
minute) further users share one counter, summarised as rejections of other users. The
turn is noticed by the next `log` call, or by `flush`, which a periodic task may call
so that a summary is not held back until the next rejection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from submitd.smtp.replies import Reply

logger = logging.getLogger("submitd.policy")

DEFAULT_MAX_USERS = 10_000


@dataclass(slots=True)
class _UserLines:
    login: str  # as first seen this minute, for the summary line
    logged: int = 0
    suppressed: int = 0


class RejectionLog:
    """Logs rejections, at most `per_minute` lines per user and minute; the server
    passes `policy.rejection_log_per_minute`."""

    def __init__(self, per_minute: int, *, max_users: int = DEFAULT_MAX_USERS) -> None:
        self._per_minute = per_minute
        self._max_users = max_users
        self._minute = 0
        self._users: dict[str, _UserLines] = {}
        self._overflow = 0  # rejections of users beyond max_users this minute

    def log(self, login: str, rule: str, reply: Reply, now: float) -> None:
        """Log one rejection of `login` by `rule`, or count it if over the rate."""
        self.flush(now)
        lines = self._lines_for(login)
        if lines is None:
            self._overflow += 1
        elif lines.logged < self._per_minute:
            lines.logged += 1
            logger.info(
                "rejected user=%s rule=%s code=%d enhanced=%s text=%s",
                printable(login),
                printable(rule),
                reply.code,
                reply.enhanced or "-",
                printable(" ".join(reply.lines)),
            )
        else:
            lines.suppressed += 1

    def flush(self, now: float) -> None:
        """Once the minute of `now` is past the current one: summarise and start over."""
        minute = int(now // 60)
        if minute <= self._minute:
            return  # same minute (or the clock stepped back: keep counting in this one)
        for lines in self._users.values():
            if lines.suppressed:
                logger.info(
                    "user=%s %d more rejections suppressed",
                    printable(lines.login),
                    lines.suppressed,
                )
        if self._overflow:
            logger.info("%d more rejections of other users suppressed", self._overflow)
        self._users.clear()
        self._overflow = 0
        self._minute = minute

    def _lines_for(self, login: str) -> _UserLines | None:
        key = login.lower()
        lines = self._users.get(key)
        if lines is None and len(self._users) < self._max_users:
            lines = self._users[key] = _UserLines(login)
        return lines


def printable(text: str) -> str:
    """No control characters in a log line or reply text: a CR or LF would forge one."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
