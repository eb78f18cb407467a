"""Abuse defences (issue 6): password guessing and connection floods.

Two policy objects; the transport asks them and turns the answers into replies.

`AuthThrottle`, against password guessing, after Dovecot's auth penalty and Postfix's
anvil:

- Address groups. A failure counts for the client's address and for two wider
  networks (`address_groups`): IPv4 /32, /26, /21; IPv6 /64, /48, /32. One host gets
  `fail_per_minute[0]` tries; a botnet spread over a provider's block is caught by the
  wider limits. IPv6 starts at /64 because one host owns a whole /64 and can change
  address within it at will (Dovecot masks IPv6 to /48 for the same reason).
- Blocking. `blocked` is true while any group is at or over its failures-per-minute or
  failures-per-day limit; the transport then refuses the greeting (421 4.7.0) or AUTH
  (454 4.7.0). There are no bans: a block lifts by itself when the window moves on.
- Delay. `failure_delay` is Dovecot's penalty: 2 s after the first recent failure,
  doubling, at most 15 s (AUTH_PENALTY_INIT_SECS, AUTH_PENALTY_MAX_SECS), so the
  sequence is 2, 4, 8, 15, 15. "Recent" is the address group's sliding-minute count
  below, rounded up: a failure stops adding delay 60 to 120 s after it happened. The
  caller records the failure first, then sleeps the delay before answering 535.
- Misconfigured clients. A client with a stale password retries the SAME wrong
  password forever; counting each retry would block the whole network after ten.
  Like Dovecot's penalty checksum, a failure whose (/32 or /64 group, login, password
  fingerprint) was seen in the last day counts once. The caller passes a keyed hash
  (HMAC) of the password, never the password; the set is bounded and kept in memory
  only, so a password-derived value never reaches the disk.
- Per account. A distributed guess at one account from many networks stays under
  every per-group limit. More than `account_fail_per_hour` failures for a login make
  `account_delay` add 5 s for groups that never logged in to that account; a network
  that did (its /26 or /48 group: a home, an office NAT, a site) pays nothing extra,
  and the account is never locked, so an attacker cannot lock its owner out.
- Success. `record_success` clears the address's groups' failure counts (as Dovecot
  clears its penalty) and remembers the (/26 or /48 group, login) pair as known-good.
  The per-account count is not cleared: a login to another account must not let a
  guesser start afresh on the victim's.

Windows: a sliding-window estimate over fixed windows. Each count is kept per fixed
window aligned to the epoch (minute, hour, day), and the check uses
`current + previous * (time left in the current window / window length)`. A plain
fixed window (policy/limits.py) would let a guesser who knows the alignment make twice
the limit in two seconds around a window edge; a true sliding window needs a
timestamp per failure (up to 450 per /21 per day). The estimate closes the edge hole
with two integers per window length, and, because it is built from fixed windows, the
counts still add up across processes with the atomic `total = total + n` UPSERT of
store/counters.py's design. A limits.py-style exact reset time is not needed: nobody
is told when a block lifts. A block lifts as the estimate falls under the limit: at
most two window lengths after the last failure.

Persistence. Checks read memory only (they run on the event loop, DESIGN principle 8).
Counts are "stored total at the last merge + recorded here since", exactly as in
policy/limits.py; store/abuse_counters.py's writer thread commits the operations a few
milliseconds later and brings back every process's totals, so counts and known-good
pairs survive a restart and are shared between processes (within `sync_interval`).
What a crash forgets is the batch in flight; the misconfigured-client set restarts
empty (a stale password counts once more after a restart).

`ConnectionLimiter`, against connection floods, after Postfix's anvil
(smtpd_client_connection_count_limit, smtpd_client_connection_rate_limit): concurrent
sessions and new connections per minute per /32 or /64, and a global session cap.
As with anvil, a refused attempt still counts in the rate, so a client that keeps
hammering stays refused until it slows down. `busy` tells the transport to shorten
pre-authentication timeouts (to 10 s) when the server is near its cap, so idle
connections cannot hold every slot. In memory only: connections do not survive a
restart, and the rate window is a minute.

Memory is bounded everywhere: counters, fingerprints, known-good pairs and rate
entries live in insertion-ordered maps with a cap; the least recently updated entry
goes first, and entries whose windows stopped counting are dropped as time passes.
Evicting under a flood from more than `max_entries` keys forgets the quietest keys'
counts, the documented price of bounded memory. Logins compare case-insensitively
(`str.lower`, as in store/users.py); absurdly long ones are hashed to bound the key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from submitd.store.abuse_counters import (
    AbuseStore,
    CounterAdd,
    CounterReset,
    CounterRow,
    KnownGood,
    Operation,
    Prune,
)

__all__ = ["AbuseSettings", "AuthThrottle", "ConnectionLimiter", "address_groups"]

MINUTE = 60
HOUR = 3600
DAY = 86400

FAILURE_DELAY_INITIAL = 2.0  # Dovecot's AUTH_PENALTY_INIT_SECS
FAILURE_DELAY_MAX = 15.0  # Dovecot's AUTH_PENALTY_MAX_SECS
ACCOUNT_EXTRA_DELAY = 5.0  # per-account delay for networks never seen succeeding
FINGERPRINT_SECONDS = DAY  # a repeated wrong password counts once within this
KNOWN_GOOD_SECONDS = 180 * DAY  # a known-good pair unused this long is forgotten
KNOWN_GOOD_REFRESH = DAY  # re-save a known pair's last success at most this often

DEFAULT_MAX_ENTRIES = 100_000  # counter keys (networks and logins) in memory
DEFAULT_MAX_FINGERPRINTS = 10_000
DEFAULT_MAX_KNOWN_GOOD = 100_000
DEFAULT_MAX_RATE_ENTRIES = 100_000
_ROWS_PER_ENTRY = 4  # a network's minute and day windows, current and previous
_MAX_LOGIN_LENGTH = 320  # longer than any real address (RFC 5321 4.5.3.1)

_NET = "net:"
_ACCOUNT = "acct:"


def address_groups(ip: str) -> tuple[str, str, str]:
    """IPv4: /32, /26, /21; IPv6: /64, /48, /32 (as network strings).

    An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 client) is
    grouped as IPv4, and an IPv6 zone (`%eth0`) is ignored. A peer that is not an IP
    address (a UNIX socket) is its own group at every level, so it is still counted.
    """
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return (ip, ip, ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    small, middle, large = (32, 26, 21) if address.version == 4 else (64, 48, 32)
    return (
        str(ipaddress.ip_network((address, small), strict=False)),
        str(ipaddress.ip_network((address, middle), strict=False)),
        str(ipaddress.ip_network((address, large), strict=False)),
    )


@dataclass(frozen=True, slots=True)
class AbuseSettings:
    """The limits of issue 6. A limit of 0 disables that check (as in [policy])."""

    fail_per_minute: tuple[int, int, int] = (10, 30, 90)  # per group level
    fail_per_day: tuple[int, int, int] = (50, 150, 450)
    account_fail_per_hour: int = 20
    max_sessions_per_group: int = 20  # concurrent, /32 or /64
    max_connects_per_minute: int = 300  # new connections, /32 or /64
    max_sessions: int = 1000  # global
    busy_fraction: float = 0.8  # at 80% of max_sessions: pre-auth timeouts drop to 10 s


def _window(now: float, length: int) -> tuple[int, int]:
    """The fixed window of `length` seconds, aligned to the epoch, that holds `now`."""
    start = int(now // length) * length
    return start, start + length


def _sliding(current: float, previous: float, now: float, length: int) -> float:
    """The sliding-window estimate: the previous window weighted by its overlap with
    the last `length` seconds (see the module doc)."""
    _, end = _window(now, length)
    return current + previous * (end - now) / length


def _login_key(login: str) -> str:
    login = login.lower()
    if len(login) <= _MAX_LOGIN_LENGTH:
        return login
    return "sha256:" + hashlib.sha256(login.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class _Cell:
    """One fixed window of one key: the DB's total at the last merge + local additions."""

    stored: int = 0
    pending: int = 0


@dataclass(slots=True)
class _Entry:
    """The windows of one key. `epoch` changes at each reset: additions queued before
    it must not be subtracted from the cells made after it. While `unsynced_reset`
    holds the tag of a reset not yet committed, the DB's rows are older than our
    zeros and are ignored."""

    epoch: int
    cells: dict[tuple[int, int], _Cell] = field(default_factory=dict)
    unsynced_reset: int | None = None

    def count(self, start: int, end: int) -> int:
        cell = self.cells.get((start, end))
        return 0 if cell is None else max(0, cell.stored + cell.pending)

    def nonzero(self) -> bool:
        return any(cell.stored + cell.pending > 0 for cell in self.cells.values())

    def expired(self, now: float) -> bool:
        """No window counts any more: each ended more than its length ago (and no
        reset is waiting for the database, whose stale rows would bring them back)."""
        return self.unsynced_reset is None and all(
            2 * end - start <= now for start, end in self.cells
        )

    def trim(self) -> None:
        """Keep, per window length, only the latest window and the one before it."""
        latest: dict[int, int] = {}
        for start, end in self.cells:
            latest[end - start] = max(start, latest.get(end - start, start))
        for start, end in [key for key in self.cells if key[1] < latest[key[1] - key[0]]]:
            del self.cells[(start, end)]


class _Counters:
    """The in-memory counters; the lock is held for dictionary work only, since the
    writer thread merges while the event loop reads."""

    def __init__(self, max_entries: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._max = max(1, max_entries)
        self._epochs = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def estimate(self, key: str, length: int, now: float) -> float:
        start, end = _window(now, length)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return 0.0
            current, previous = entry.count(start, end), entry.count(start - length, start)
        return _sliding(current, previous, now, length)

    def add(self, key: str, length: int, now: float, amount: int = 1) -> CounterAdd:
        start, end = _window(now, length)
        with self._lock:
            entry = self._touch(key)
            cell = entry.cells.setdefault((start, end), _Cell())
            cell.pending += amount
            entry.trim()
            return CounterAdd(key, start, end, amount, entry.epoch)

    def reset(self, key: str) -> CounterReset | None:
        """Zero every window of `key`; None when there is nothing to clear here."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.nonzero():
                return None
            entry.epoch = next(self._epochs)
            entry.cells.clear()
            entry.unsynced_reset = entry.epoch
            return CounterReset(key, entry.epoch)

    def expire(self, now: float) -> None:
        """Drop the least recently updated entries while nothing of theirs counts."""
        with self._lock:
            while self._entries:
                key, entry = next(iter(self._entries.items()))
                if not entry.expired(now):
                    return
                del self._entries[key]

    def merge(self, flushed: Sequence[Operation], rows: Sequence[CounterRow]) -> None:
        """Writer thread: `flushed` are now inside the rows' totals, so they stop being
        pending; the totals (every process's) replace what we knew."""
        with self._lock:
            for op in flushed:
                if isinstance(op, KnownGood) or (entry := self._entries.get(op.key)) is None:
                    continue
                if isinstance(op, CounterAdd):
                    cell = entry.cells.get((op.start, op.end))
                    if cell is not None and entry.epoch == op.tag:
                        cell.pending -= op.amount
                elif entry.unsynced_reset == op.tag:
                    entry.unsynced_reset = None
            for row in rows:
                entry = self._entries.get(row.key)
                if entry is None:
                    if row.total == 0:
                        continue
                    entry = self._touch(row.key)
                if entry.unsynced_reset is not None:
                    continue
                entry.cells.setdefault((row.start, row.end), _Cell()).stored = row.total
                entry.trim()

    def _touch(self, key: str) -> _Entry:
        """The key's entry, made the most recent; the oldest goes beyond the cap."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(next(self._epochs))
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry


class _KnownGood:
    """(network, login) pairs that authenticated, with the time of the last success."""

    def __init__(self, max_pairs: int) -> None:
        self._lock = threading.Lock()
        self._pairs: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._max = max(1, max_pairs)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        with self._lock:
            return pair in self._pairs

    def remember(self, pair: tuple[str, str], when: int) -> bool:
        """Record a success; True when it is worth saving (new, or last saved long ago)."""
        with self._lock:
            last = self._pairs.get(pair)
            if last is not None and last > when:  # clock went back: keep the latest
                return False
            self._put(pair, when)
            return last is None or when - last >= KNOWN_GOOD_REFRESH

    def expire(self, now: float) -> None:
        with self._lock:
            while self._pairs:
                pair, last = next(iter(self._pairs.items()))
                if now - last < KNOWN_GOOD_SECONDS:
                    return
                del self._pairs[pair]

    def merge(self, rows: Sequence[KnownGood]) -> None:
        with self._lock:
            for row in rows:
                pair = (row.network, row.login)
                if row.last_success >= self._pairs.get(pair, row.last_success):
                    self._put(pair, row.last_success)

    def _put(self, pair: tuple[str, str], when: int) -> None:
        self._pairs[pair] = when
        self._pairs.move_to_end(pair)
        while len(self._pairs) > self._max:
            self._pairs.popitem(last=False)


class AuthThrottle:
    """Failure counting, blocking and delays for AUTH; see the module doc.

    Every method but `sync` and `close` is synchronous, reads or updates memory only
    and is safe to call on the event loop. `now` is wall-clock time (`time.time()`):
    the windows are shared with other processes and survive restarts.
    """

    def __init__(
        self,
        db_path: Path,
        settings: AbuseSettings,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS,
        max_known_good: int = DEFAULT_MAX_KNOWN_GOOD,
        sync_interval: float = 1.0,
    ) -> None:
        self._settings = settings
        self._max_entries = max_entries
        self._max_fingerprints = max(1, max_fingerprints)
        self._max_known_good = max_known_good
        self._counters = _Counters(max_entries)
        self._known = _KnownGood(max_known_good)
        # Event loop only: (/32 or /64 group, login, fingerprint) -> last seen.
        self._fingerprints: OrderedDict[tuple[str, str, bytes], float] = OrderedDict()
        self._minute = 0  # start of the latest minute seen, to prune once per minute
        self._store = AbuseStore(db_path, self._merge, sync_interval=sync_interval)

    def blocked(self, ip: str, now: float) -> bool:
        """True while any of the address's groups is at or over its failure limit for
        the (sliding) minute or day: refuse the greeting (421 4.7.0) or AUTH (454 4.7.0)."""
        self._observe(now)
        limits = zip(
            address_groups(ip),
            self._settings.fail_per_minute,
            self._settings.fail_per_day,
            strict=True,
        )
        for group, per_minute, per_day in limits:
            key = _NET + group
            if per_minute and self._counters.estimate(key, MINUTE, now) >= per_minute:
                return True
            if per_day and self._counters.estimate(key, DAY, now) >= per_day:
                return True
        return False

    def failure_delay(self, ip: str, now: float) -> float:
        """Seconds to wait before answering a failed AUTH: min(2 * 2**(k-1), 15) with k
        the /32 or /64 group's failures in the sliding minute, rounded up, counting the
        one just recorded (call `record_failure` first). 0 with no recent failure."""
        key = _NET + address_groups(ip)[0]
        recent = math.ceil(round(self._counters.estimate(key, MINUTE, now), 6))
        if recent <= 0:
            return 0.0
        return min(FAILURE_DELAY_INITIAL * 2.0 ** min(recent - 1, 8), FAILURE_DELAY_MAX)

    def account_delay(self, ip: str, login: str, now: float) -> float:
        """Extra seconds for a failed AUTH to an account under attack (more than
        account_fail_per_hour failures in the sliding hour), unless the address's /26
        or /48 group has logged in to it before. Never a refusal, only a delay."""
        limit = self._settings.account_fail_per_hour
        account = _login_key(login)
        if not limit or self._counters.estimate(_ACCOUNT + account, HOUR, now) <= limit:
            return 0.0
        if (address_groups(ip)[1], account) in self._known:
            return 0.0
        return ACCOUNT_EXTRA_DELAY

    def record_failure(self, ip: str, login: str, password_fingerprint: bytes, now: float) -> None:
        """Count a failed AUTH in every group's minute and day and in the account's
        hour, unless the same wrong password for this login came from the same /32 or
        /64 group within a day. `password_fingerprint` is a keyed hash (HMAC) of the
        password, never the password."""
        self._observe(now)
        groups = address_groups(ip)
        account = _login_key(login)
        if self._seen_before((groups[0], account, password_fingerprint), now):
            return
        operations: list[Operation] = []
        for group in groups:
            operations.append(self._counters.add(_NET + group, MINUTE, now))
            operations.append(self._counters.add(_NET + group, DAY, now))
        operations.append(self._counters.add(_ACCOUNT + account, HOUR, now))
        self._store.add(operations)

    def record_success(self, ip: str, login: str, now: float) -> None:
        """Clear the address's groups' failure counts and remember its /26 or /48
        group as known-good for `login`. Most logins follow no failure: then nothing
        is cleared and, for a pair saved in the last day, nothing is written. (Counts
        another process recorded within its last sync interval, not yet merged here,
        are not cleared.)"""
        self._observe(now)
        groups = address_groups(ip)
        operations: list[Operation] = []
        for group in groups:
            reset = self._counters.reset(_NET + group)
            if reset is not None:
                operations.append(reset)
        pair = (groups[1], _login_key(login))
        if self._known.remember(pair, int(now)):
            operations.append(KnownGood(*pair, int(now)))
        if operations:
            self._store.add(operations)

    async def sync(self) -> None:
        """Commit what was recorded and merge the other processes' counts now."""
        await self._store.sync()

    async def close(self) -> None:
        """Commit what was recorded, then stop the writer thread."""
        await self._store.close()

    def _seen_before(self, fingerprint: tuple[str, str, bytes], now: float) -> bool:
        """True for a repeat within FINGERPRINT_SECONDS; records the fingerprint."""
        seen = self._fingerprints
        while seen:
            oldest, when = next(iter(seen.items()))
            if now - when < FINGERPRINT_SECONDS:
                break
            del seen[oldest]
        repeated = fingerprint in seen
        seen[fingerprint] = now
        seen.move_to_end(fingerprint)
        while len(seen) > self._max_fingerprints:
            seen.popitem(last=False)
        return repeated

    def _merge(
        self, flushed: Sequence[Operation], rows: Sequence[CounterRow], known: Sequence[KnownGood]
    ) -> None:
        self._counters.merge(flushed, rows)
        self._known.merge(known)

    def _observe(self, now: float) -> None:
        """When the minute turns, forget what stopped counting, in memory and (in the
        writer thread's next cycle) in the database."""
        minute = _window(now, MINUTE)[0]
        if minute <= self._minute:
            return
        self._minute = minute
        self._counters.expire(now)
        self._known.expire(now)
        self._store.prune(
            Prune(
                now=int(now),
                known_before=int(now - KNOWN_GOOD_SECONDS),
                max_counter_rows=_ROWS_PER_ENTRY * self._max_entries,
                max_known_rows=self._max_known_good,
            )
        )


@dataclass(slots=True)
class _Rate:
    """New connections of one group in the current and the previous fixed minute."""

    start: int
    current: int = 0
    previous: int = 0


class ConnectionLimiter:
    """Concurrent sessions and connection rate per /32 or /64, and a global session
    cap; see the module doc. Memory only, event loop only (no locking)."""

    def __init__(
        self, settings: AbuseSettings, *, max_entries: int = DEFAULT_MAX_RATE_ENTRIES
    ) -> None:
        self._settings = settings
        self._max_entries = max(1, max_entries)
        self._sessions = 0
        self._per_group: dict[str, int] = {}  # only groups with open sessions
        self._rates: OrderedDict[str, _Rate] = OrderedDict()

    @property
    def sessions(self) -> int:
        """Sessions admitted and not yet released."""
        return self._sessions

    @property
    def busy(self) -> bool:
        """At busy_fraction of max_sessions or more: shorten pre-auth timeouts."""
        cap = self._settings.max_sessions
        return cap > 0 and self._sessions >= self._settings.busy_fraction * cap

    def admit(self, ip: str, now: float) -> str | None:
        """None when the connection is admitted (and counted; call `release` when the
        session ends); otherwise the refusal text for a 421 4.7.0 before closing."""
        settings = self._settings
        group = address_groups(ip)[0]
        rate = self._count_connect(group, now)  # refused attempts count too (anvil)
        if settings.max_sessions and self._sessions >= settings.max_sessions:
            return "Too many sessions, try again later"
        open_here = self._per_group.get(group, 0)
        if settings.max_sessions_per_group and open_here >= settings.max_sessions_per_group:
            return f"Too many connections from {_shown(group)}"
        if settings.max_connects_per_minute and rate > settings.max_connects_per_minute:
            return f"Too many connections per minute from {_shown(group)}"
        self._sessions += 1
        self._per_group[group] = open_here + 1
        return None

    def release(self, ip: str) -> None:
        """The session of an admitted connection ended. Releasing an address with no
        open session does nothing, so a double release cannot free a slot twice."""
        group = address_groups(ip)[0]
        open_here = self._per_group.get(group, 0)
        if open_here <= 0:
            return
        if open_here == 1:
            del self._per_group[group]
        else:
            self._per_group[group] = open_here - 1
        self._sessions -= 1

    def _count_connect(self, group: str, now: float) -> float:
        """Count one attempt; the group's sliding-minute estimate including it."""
        start, _ = _window(now, MINUTE)
        rates = self._rates
        while rates:  # forget groups whose last minute no longer counts
            oldest, entry = next(iter(rates.items()))
            if entry.start + 2 * MINUTE > now:
                break
            del rates[oldest]
        rate = rates.get(group)
        if rate is None:
            rate = rates[group] = _Rate(start)
            while len(rates) > self._max_entries:
                rates.popitem(last=False)
        else:
            rates.move_to_end(group)
        if rate.start < start:
            rate.previous = rate.current if rate.start == start - MINUTE else 0
            rate.current, rate.start = 0, start
        rate.current += 1
        return _sliding(rate.current, rate.previous, now, MINUTE)


def _shown(group: str) -> str:
    """192.0.2.1 rather than 192.0.2.1/32; an IPv6 group keeps its /64."""
    return group.removesuffix("/32")
