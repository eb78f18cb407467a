"""Per-user submission limits: rate, recipients, size and recipient domains.

RFC 6409 6.2 lets the MSA refuse a RCPT inconsistent with the user's permissions (550
5.7.1) and 6.3 lets it refuse a message that violates site policy. The limits come from
`[policy]` with per-user overrides under `[policy.users]`, field by field.

Replies. A recipient domain the user may not send to is permanent: 550 5.7.1 (RFC
6409 6.2). A rate or count limit is temporary, because waiting fixes it: 452 4.7.0 (452
is RFC 5321 4.5.3.1.10's code for too many recipients, a failure clients retry), with a
text that says exactly when the limit resets. A message larger than
the user's limit is 552 5.3.4 (RFC 1870 6 at MAIL SIZE= or after the data; RFC 3463
X.3.4, too big for the system).

Windows: fixed, aligned to the UTC hour (messages) and the UTC day (recipients). A
sliding window would be fairer at the edges (a user could send 2N messages around the
top of an hour), but it needs a timestamp per message, or approximations whose reset
time cannot be stated, and it makes every process's counter a different number to
merge. A fixed window is one integer per user and per counter, adds up across processes
with a plain SQL UPSERT, and lets the reply say exactly when the limit lifts: clients
and users can act on "resets at 15:00:00 UTC (in 23 minutes)". 0 means no limit for
messages_per_hour and recipients_per_day (counts are still kept).

Where the counts live. The checks run on the event loop and read memory only. Each
count there is "total in the database at the last merge" plus "recorded here since";
`record_message` adds to memory at once and hands the increment to the writer thread of
store/counters.py, which commits it (within 50 ms, batched) with an atomic
`total = total + n` and brings back the totals other processes have committed. The
database is therefore the source of truth, and every process converges on it.

Error bounds (documented promises, tested in tests/unit/test_limits.py):

- Restart: a crash forgets only counts recorded but not yet committed by the writer
  thread, i.e. the batch in flight (it starts 50 ms after its first count). A clean
  `close()` commits everything.
- Several processes (issue 5): a process sees another's counts at its next merge:
  after its own next batch, and at the latest `sync_interval` seconds (default 1 s).
  A user can exceed a limit by at most what they got committed through the OTHER
  processes since this process's last merge, i.e. in about one sync interval.
- Concurrency in one process: the check at MAIL (or RCPT) and the count at commit are
  apart by the length of a transaction, so a user with k transactions in flight at once
  can exceed a limit by at most k - 1 messages (their recipients likewise), as with any
  limit that does not reserve at MAIL and release on RSET.

Memory: one small entry per user and counter that has counted in the current windows;
entries of ended windows are dropped when the hour turns. Logins compare
case-insensitively (`str.lower`, as in store/users.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from submitd.config import PolicyConfig, UserPolicy
from submitd.policy.rejections import RejectionLog, printable
from submitd.smtp.replies import Reply, reply
from submitd.store.counters import CounterRow, CounterStore, Increment

__all__ = [  # RejectionLog too: callers may take both from here
    "EffectiveLimits",
    "RateLimiter",
    "RejectionLog",
    "effective_limits",
    "normalize_domain",
]

_T = TypeVar("_T")

HOUR = 3600
DAY = 86400
MESSAGES = "messages"  # counter kinds, as stored in rate_counters.kind
RECIPIENTS = "recipients"

# Rule names in the rejection log are the configuration keys, so a log line leads
# straight to the setting that caused it.
RULE_MESSAGES_PER_HOUR = "messages_per_hour"
RULE_RECIPIENTS_PER_MESSAGE = "recipients_per_message"
RULE_RECIPIENTS_PER_DAY = "recipients_per_day"
RULE_MAX_MESSAGE_SIZE = "max_message_size"
RULE_RECIPIENT_DOMAINS = "recipient_domains"


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """One user's limits after applying their overrides to the site defaults."""

    messages_per_hour: int
    recipients_per_message: int
    recipients_per_day: int
    max_message_size: int
    recipient_domains: tuple[str, ...] | None


def effective_limits(policy: PolicyConfig, login: str) -> EffectiveLimits:
    """The site defaults, overridden field by field by `policy.users[login]`.

    The login is matched case-insensitively. A None field inherits; a list of recipient
    domains replaces the site's list (an empty list allows no domain at all).
    """
    return _merge(policy, _find_override(policy, login) or UserPolicy())


def _merge(policy: PolicyConfig, override: UserPolicy) -> EffectiveLimits:
    domains = _pick(override.recipient_domains, policy.recipient_domains)
    return EffectiveLimits(
        messages_per_hour=_pick(override.messages_per_hour, policy.messages_per_hour),
        recipients_per_message=_pick(
            override.recipients_per_message, policy.recipients_per_message
        ),
        recipients_per_day=_pick(override.recipients_per_day, policy.recipients_per_day),
        max_message_size=_pick(override.max_message_size, policy.max_message_size),
        recipient_domains=None if domains is None else _normalized_domains(domains),
    )


def _pick(override: _T | None, default: _T) -> _T:
    return default if override is None else override


def _find_override(policy: PolicyConfig, login: str) -> UserPolicy | None:
    exact = policy.users.get(login)
    if exact is not None:
        return exact
    lowered = login.lower()
    return next((v for k, v in policy.users.items() if k.lower() == lowered), None)


def normalize_domain(domain: str) -> str:
    """Lower case, no trailing dot, A-labels for internationalized names (RFC 5890), so
    `Bücher.example.` in the configuration matches `xn--bcher-kva.example` in RCPT."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")  # IDNA 2003: close enough to match
    except UnicodeError:
        return domain


def _normalized_domains(domains: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalize_domain(domain) for domain in domains))


@dataclass(frozen=True, slots=True)
class _Rules:
    """EffectiveLimits plus a set for the per-RCPT domain lookup."""

    limits: EffectiveLimits
    domains: frozenset[str] | None

    @classmethod
    def of(cls, limits: EffectiveLimits) -> _Rules:
        domains = limits.recipient_domains
        return cls(limits, None if domains is None else frozenset(domains))


@dataclass(slots=True)
class _Window:
    """One counter of one user: the DB's total at the last merge plus local additions."""

    start: int
    end: int
    stored: int = 0
    pending: int = 0


class _Counts:
    """The in-memory counters; the lock is held for dictionary work only, since the
    writer thread merges while the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._horizon = 0  # windows ending at or before this are gone

    def current(self, login: str, kind: str, start: int) -> int:
        with self._lock:
            window = self._windows.get((login, kind))
            if window is None or window.start != start:
                return 0
            return window.stored + window.pending

    def add(self, increments: Sequence[Increment]) -> None:
        with self._lock:
            for item in increments:
                window = self._window_for(item.login, item.kind, item.start, item.end)
                if window is not None and window.start == item.start:
                    window.pending += item.amount

    def merge(self, flushed: Sequence[Increment], rows: Sequence[CounterRow]) -> None:
        """Writer thread: `flushed` are now inside the rows' totals, so they stop being
        pending; the totals (every process's) replace what we knew."""
        with self._lock:
            for item in flushed:
                window = self._windows.get((item.login, item.kind))
                if window is not None and window.start == item.start:
                    window.pending -= item.amount
            for row in rows:
                window = self._window_for(row.login, row.kind, row.start, row.end)
                if window is not None and window.start == row.start:
                    window.stored = row.total

    def prune(self, horizon: int) -> None:
        """Forget windows that ended at or before `horizon` (once an hour)."""
        with self._lock:
            self._horizon = max(self._horizon, horizon)
            ended = [key for key, window in self._windows.items() if window.end <= horizon]
            for key in ended:
                del self._windows[key]

    def _window_for(self, login: str, kind: str, start: int, end: int) -> _Window | None:
        """The entry for this window, replacing an older one; None for a past window."""
        if end <= self._horizon:
            return None
        window = self._windows.get((login, kind))
        if window is None or window.start < start:
            window = self._windows[(login, kind)] = _Window(start, end)
        return window


class RateLimiter:
    """Checks a user's limits in memory and records what they sent; see the module doc.

    `rejections`, when given, gets one line per rejection made here, with the rule
    (the configuration key) that caused it. `postmaster` is the server's own postmaster
    address: always allowed as a recipient (RFC 6409 6.4, RFC 5321 4.5.1), so a user
    limited to some domains can still report a problem.
    """

    def __init__(
        self,
        db_path: Path,
        policy: PolicyConfig,
        *,
        rejections: RejectionLog | None = None,
        postmaster: str | None = None,
        sync_interval: float = 1.0,
    ) -> None:
        self._default = _Rules.of(_merge(policy, UserPolicy()))
        self._rules = {
            login.lower(): _Rules.of(effective_limits(policy, login)) for login in policy.users
        }
        self._rejections = rejections
        self._postmaster = postmaster.lower() if postmaster else None
        self._counts = _Counts()
        self._hour = 0  # start of the latest hour seen, to prune once per hour
        self._store = CounterStore(db_path, self._counts.merge, sync_interval=sync_interval)

    def limits(self, login: str) -> EffectiveLimits:
        """The user's limits, e.g. for the SIZE the session should announce."""
        return self._rules_for(login).limits

    def check_message(self, login: str, now: float) -> Reply | None:
        """At MAIL: 452 4.7.0 once the user sent messages_per_hour in this UTC hour."""
        self._observe(now)
        limit = self._rules_for(login).limits.messages_per_hour
        start = _window_start(now, HOUR)
        if limit == 0 or self._counts.current(login.lower(), MESSAGES, start) < limit:
            return None
        text = (
            f"Message rate limit of {limit} per hour reached for {printable(login)}; "
            f"{_resets(start + HOUR, now)}"
        )
        return self._reject(login, RULE_MESSAGES_PER_HOUR, reply(452, "4.7.0", text), now)

    def check_recipient(
        self, login: str, address: str, count_in_message: int, now: float
    ) -> Reply | None:
        """At RCPT, with `count_in_message` recipients already accepted in this
        transaction: domain (550 5.7.1), then per message and per day (452 4.7.0)."""
        self._observe(now)
        rules = self._rules_for(login)
        domain = address.rpartition("@")[2]
        if not self._domain_allowed(rules, address, domain):
            text = f"Recipient domain not allowed for {printable(login)}: {printable(domain)}"
            return self._reject(login, RULE_RECIPIENT_DOMAINS, reply(550, "5.7.1", text), now)
        return self._check_counts(login, rules.limits, count_in_message, now)

    def check_size(self, login: str, size: int, now: float | None = None) -> Reply | None:
        """At MAIL SIZE= (RFC 1870) and at end of data: 552 5.3.4 above max_message_size.
        `now` only dates the rejection log line."""
        limit = self._rules_for(login).limits.max_message_size
        if size <= limit:
            return None
        text = f"Message exceeds the size limit of {limit} octets for {printable(login)}"
        when = time.time() if now is None else now
        return self._reject(login, RULE_MAX_MESSAGE_SIZE, reply(552, "5.3.4", text), when)

    async def record_message(self, login: str, recipients: int, now: float) -> None:
        """Count one committed message and its recipients. Returns at once: memory is
        updated now, the database within 50 ms by the writer thread."""
        self._observe(now)
        key = login.lower()
        hour, day = _window_start(now, HOUR), _window_start(now, DAY)
        increments = [Increment(key, MESSAGES, hour, hour + HOUR, 1)]
        if recipients > 0:
            increments.append(Increment(key, RECIPIENTS, day, day + DAY, recipients))
        self._counts.add(increments)
        self._store.add(increments)

    async def sync(self) -> None:
        """Commit what was recorded and merge the other processes' counts now."""
        await self._store.sync()

    async def close(self) -> None:
        """Commit what was recorded, then stop the writer thread."""
        await self._store.close()

    def _check_counts(
        self, login: str, limits: EffectiveLimits, count_in_message: int, now: float
    ) -> Reply | None:
        per_message = limits.recipients_per_message
        if count_in_message >= per_message:
            text = f"Recipient limit of {per_message} per message reached for {printable(login)}"
            return self._reject(login, RULE_RECIPIENTS_PER_MESSAGE, reply(452, "4.7.0", text), now)
        daily = limits.recipients_per_day
        start = _window_start(now, DAY)
        today = self._counts.current(login.lower(), RECIPIENTS, start)
        if daily == 0 or today + count_in_message < daily:
            return None
        text = (
            f"Daily recipient limit of {daily} reached for {printable(login)}; "
            f"{_resets(start + DAY, now)}"
        )
        return self._reject(login, RULE_RECIPIENTS_PER_DAY, reply(452, "4.7.0", text), now)

    def _domain_allowed(self, rules: _Rules, address: str, domain: str) -> bool:
        if rules.domains is None or address.lower() == self._postmaster:
            return True
        return normalize_domain(domain) in rules.domains

    def _rules_for(self, login: str) -> _Rules:
        return self._rules.get(login.lower(), self._default)

    def _observe(self, now: float) -> None:
        """When the hour turns (or first thing), forget ended windows, in memory and in
        the database (the writer thread deletes them in its next cycle)."""
        hour = _window_start(now, HOUR)
        if hour <= self._hour:
            return
        self._hour = hour
        self._counts.prune(hour)
        self._store.prune(hour)

    def _reject(self, login: str, rule: str, answer: Reply, now: float) -> Reply:
        if self._rejections is not None:
            self._rejections.log(login, rule, answer, now)
        return answer


def _window_start(now: float, length: int) -> int:
    """Fixed windows aligned to the epoch: UTC hours and days (POSIX days are 86400 s)."""
    return int(now // length) * length


def _resets(reset: int, now: float) -> str:
    """'resets at 15:00:00 UTC (in 23 minutes)': minutes rounded up, so a client that
    waits that long is never early."""
    clock = time.strftime("%H:%M:%S", time.gmtime(reset))
    minutes = max(1, math.ceil((reset - now) / 60))
    return f"resets at {clock} UTC (in {_duration(minutes)})"


def _duration(minutes: int) -> str:
    hours, rest = divmod(minutes, 60)
    parts = []
    if hours:
        parts.append(f"{hours} hour{'s' if hours != 1 else ''}")
    if rest or not hours:
        parts.append(f"{rest} minute{'s' if rest != 1 else ''}")
    return " ".join(parts)
