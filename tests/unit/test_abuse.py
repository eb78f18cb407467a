"""Abuse defences (issue 6): address groups, AUTH throttle, connection limits.

Real SQLite files in tmp_path, explicit `now` values, no mocks. Two AuthThrottle
objects on one file stand for two server processes, a closed and re-opened one for a
restart.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from submitd.policy.abuse import (
    AbuseSettings,
    AuthThrottle,
    ConnectionLimiter,
    address_groups,
)

T = TypeVar("T")

SETTINGS = AbuseSettings()
ALICE = "alice@example.org"
BOB = "bob@example.org"
# Tuesday 2024-03-05 14:37:05 UTC: five seconds into a minute, so a test's failures a
# few seconds apart stay in one fixed minute.
NOW = float(calendar.timegm((2024, 3, 5, 14, 37, 5)))
MINUTE_START = NOW - 5


def fp(password: str) -> bytes:
    """Stands for the transport's HMAC of a password (here a plain hash is enough)."""
    return hashlib.sha256(password.encode()).digest()


def run(
    tmp_path: Path,
    work: Callable[[AuthThrottle], Awaitable[T]],
    *,
    settings: AbuseSettings = SETTINGS,
    **kwargs: int,
) -> T:
    """Run `work` against an AuthThrottle on tmp_path's database, closing it after."""

    async def main() -> T:
        throttle = AuthThrottle(tmp_path / "submitd.sqlite3", settings, **kwargs)
        try:
            return await work(throttle)
        finally:
            await throttle.close()

    return asyncio.run(main())


def fail(
    throttle: AuthThrottle, ip: str, now: float, *, login: str = ALICE, count: int = 1
) -> None:
    """`count` failures, each with a different wrong password."""
    for n in range(count):
        throttle.record_failure(ip, login, fp(f"guess {ip} {now} {n}"), now)


# Address groups


def test_ipv4_groups_are_32_26_21() -> None:
    assert address_groups("192.0.2.77") == ("192.0.2.77/32", "192.0.2.64/26", "192.0.0.0/21")


def test_ipv6_groups_are_64_48_32() -> None:
    assert address_groups("2001:db8:aaaa:bbbb:1:2:3:4") == (
        "2001:db8:aaaa:bbbb::/64",
        "2001:db8:aaaa::/48",
        "2001:db8::/32",
    )


def test_mapped_ipv4_and_zones_and_non_ip_peers() -> None:
    assert address_groups("::ffff:192.0.2.77") == address_groups("192.0.2.77")
    assert address_groups("fe80::1%eth0")[0] == "fe80::/64"
    assert address_groups("unix-socket") == ("unix-socket",) * 3


# Blocking


def test_blocked_after_10_failures_in_a_minute_from_one_address(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[bool]:
        seen = []
        for n in range(10):
            seen.append(throttle.blocked("192.0.2.1", NOW + n))
            fail(throttle, "192.0.2.1", NOW + n)
        seen.append(throttle.blocked("192.0.2.1", NOW + 10))
        seen.append(throttle.blocked("192.0.2.2", NOW + 10))  # another /32: its own count
        return seen

    *before, after, neighbour = run(tmp_path, work)
    assert before == [False] * 10
    assert after is True
    assert neighbour is False


def test_blocked_after_30_failures_from_a_26_spread_over_addresses(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> tuple[bool, bool, bool, bool]:
        for host in range(29):
            fail(throttle, f"192.0.2.{host}", NOW)  # one each: no /32 is near 10
        almost = throttle.blocked("192.0.2.40", NOW)
        fail(throttle, "192.0.2.29", NOW)
        return (
            almost,
            throttle.blocked("192.0.2.40", NOW),  # same /26, never failed itself
            throttle.blocked("192.0.2.64", NOW),  # next /26, same /21 (limit 90)
            throttle.blocked("192.0.2.40", NOW + 120),  # the window moved on
        )

    assert run(tmp_path, work) == (False, True, False, False)


def test_ipv6_addresses_of_one_64_count_together(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> bool:
        for host in range(10):
            fail(throttle, f"2001:db8:1:2::{host + 1:x}", NOW)
        return throttle.blocked("2001:db8:1:2:ffff::1", NOW)

    assert run(tmp_path, work) is True


def test_the_block_expires_with_the_window(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[bool]:
        fail(throttle, "192.0.2.1", NOW, count=10)
        return [
            throttle.blocked("192.0.2.1", MINUTE_START + 59),  # same fixed minute
            throttle.blocked("192.0.2.1", MINUTE_START + 60),  # previous minute, weight 1
            throttle.blocked("192.0.2.1", MINUTE_START + 90),  # weight 1/2: estimate 5
            throttle.blocked("192.0.2.1", NOW + 120),  # at most two windows after
        ]

    assert run(tmp_path, work) == [True, True, False, False]


def test_sliding_estimate_closes_the_window_edge(tmp_path: Path) -> None:
    """Five failures at the end of a minute and five at the start of the next are ten
    in two seconds: a plain fixed window would see five and five."""

    async def work(throttle: AuthThrottle) -> bool:
        fail(throttle, "192.0.2.1", MINUTE_START + 59, count=5)
        fail(throttle, "192.0.2.1", MINUTE_START + 60, count=5)
        return throttle.blocked("192.0.2.1", MINUTE_START + 60)

    assert run(tmp_path, work) is True


def test_daily_limit_catches_a_slow_guesser(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[bool]:
        for n in range(49):  # one every 10 minutes: never near 10 a minute
            fail(throttle, "192.0.2.1", NOW + 600 * n)
        last = NOW + 600 * 49
        almost = throttle.blocked("192.0.2.1", last)
        fail(throttle, "192.0.2.1", last)
        return [
            almost,
            throttle.blocked("192.0.2.1", last),
            throttle.blocked("192.0.2.1", last + 2 * 86400),
        ]

    assert run(tmp_path, work) == [False, True, False]


def test_a_limit_of_zero_disables_the_check(tmp_path: Path) -> None:
    settings = AbuseSettings(fail_per_minute=(0, 0, 0), fail_per_day=(0, 0, 0))

    async def work(throttle: AuthThrottle) -> bool:
        fail(throttle, "192.0.2.1", NOW, count=100)
        return throttle.blocked("192.0.2.1", NOW)

    assert run(tmp_path, work, settings=settings) is False


# Delays


def test_failure_delay_doubles_from_2_to_at_most_15_seconds(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[float]:
        delays = [throttle.failure_delay("192.0.2.1", NOW)]  # no failure yet
        for n in range(5):
            fail(throttle, "192.0.2.1", NOW + n)
            delays.append(throttle.failure_delay("192.0.2.1", NOW + n))
        delays.append(throttle.failure_delay("192.0.2.1", NOW + 120))  # no longer recent
        return delays

    assert run(tmp_path, work) == [0.0, 2.0, 4.0, 8.0, 15.0, 15.0, 0.0]


def test_the_same_wrong_password_repeated_counts_once(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[object]:
        for n in range(20):  # a client with a stale password, retrying
            throttle.record_failure("192.0.2.1", ALICE, fp("old password"), NOW + n)
        result: list[object] = [
            throttle.blocked("192.0.2.1", NOW + 20),
            throttle.failure_delay("192.0.2.1", NOW + 20),
        ]
        # The same password for another login, or from another address, is new.
        throttle.record_failure("192.0.2.1", BOB, fp("old password"), NOW + 21)
        throttle.record_failure("192.0.2.9", ALICE, fp("old password"), NOW + 21)
        throttle.record_failure("192.0.2.1", "ALICE@example.org", fp("old password"), NOW + 22)
        result.append(throttle.failure_delay("192.0.2.1", NOW + 22))
        result.append(throttle.failure_delay("192.0.2.9", NOW + 22))
        return result

    assert run(tmp_path, work) == [False, 2.0, 4.0, 2.0]


def test_a_success_resets_the_groups_counts(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[object]:
        fail(throttle, "192.0.2.1", NOW, count=9)
        for host in range(2, 23):  # the /26 near its limit of 30 too
            fail(throttle, f"192.0.2.{host}", NOW)
        assert throttle.failure_delay("192.0.2.1", NOW) == 15.0
        throttle.record_success("192.0.2.1", ALICE, NOW + 1)
        result: list[object] = [throttle.failure_delay("192.0.2.1", NOW + 1)]
        fail(throttle, "192.0.2.1", NOW + 2, count=9)
        result.append(throttle.blocked("192.0.2.1", NOW + 2))  # 9 since: not 30 in /26
        fail(throttle, "192.0.2.1", NOW + 3)
        result.append(throttle.blocked("192.0.2.1", NOW + 3))
        return result

    assert run(tmp_path, work) == [0.0, False, True]


def test_account_delay_only_for_groups_that_never_logged_in(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[float]:
        throttle.record_success("198.51.100.7", ALICE, NOW - 86400)  # Alice's home
        throttle.record_success("203.0.113.7", BOB, NOW - 86400)
        # A distributed guess: one failure from each of 21 networks, no group blocked.
        for net in range(20):
            fail(throttle, f"10.{net}.0.1", NOW + net)
        twenty = throttle.account_delay("10.200.0.1", ALICE, NOW + 20)
        fail(throttle, "10.20.0.1", NOW + 20)
        assert not any(throttle.blocked(f"10.{net}.0.1", NOW + 20) for net in range(21))
        return [
            twenty,  # "more than 20 an hour"
            throttle.account_delay("10.200.0.1", ALICE, NOW + 21),  # a stranger
            throttle.account_delay("10.200.0.1", "Alice@Example.ORG", NOW + 21),
            throttle.account_delay("198.51.100.7", ALICE, NOW + 21),  # Alice herself
            throttle.account_delay("198.51.100.33", ALICE, NOW + 21),  # same /26
            throttle.account_delay("198.51.100.99", ALICE, NOW + 21),  # next /26
            throttle.account_delay("203.0.113.7", ALICE, NOW + 21),  # knows Bob only
            throttle.account_delay("10.200.0.1", BOB, NOW + 21),  # Bob is not attacked
            throttle.account_delay("10.200.0.1", ALICE, NOW + 2 * 3600),  # hour passed
        ]

    assert run(tmp_path, work) == [0.0, 5.0, 5.0, 0.0, 0.0, 5.0, 5.0, 0.0, 0.0]


def test_a_success_on_another_account_does_not_clear_the_account_count(
    tmp_path: Path,
) -> None:
    async def work(throttle: AuthThrottle) -> float:
        for net in range(21):
            fail(throttle, f"10.{net}.0.1", NOW)
        throttle.record_success("10.0.0.1", BOB, NOW + 1)  # the guesser's own account
        return throttle.account_delay("10.0.0.1", ALICE, NOW + 1)

    assert run(tmp_path, work) == 5.0


# Persistence


def test_counters_survive_reopening(tmp_path: Path) -> None:
    async def before(throttle: AuthThrottle) -> None:
        fail(throttle, "192.0.2.1", NOW, count=10)
        throttle.record_success("198.51.100.7", ALICE, NOW)
        for net in range(21):
            fail(throttle, f"10.{net}.0.1", NOW)

    async def after(throttle: AuthThrottle) -> list[object]:
        return [
            throttle.blocked("192.0.2.1", NOW + 1),
            throttle.failure_delay("192.0.2.1", NOW + 1),
            throttle.account_delay("10.200.0.1", ALICE, NOW + 1),
            throttle.account_delay("198.51.100.7", ALICE, NOW + 1),
            throttle.blocked("192.0.2.1", NOW + 120),
        ]

    run(tmp_path, before)
    assert run(tmp_path, after) == [True, 15.0, 5.0, 0.0, False]


def test_a_reset_survives_reopening(tmp_path: Path) -> None:
    async def before(throttle: AuthThrottle) -> None:
        fail(throttle, "192.0.2.1", NOW, count=10)
        throttle.record_success("192.0.2.1", ALICE, NOW + 1)

    async def after(throttle: AuthThrottle) -> bool:
        return throttle.blocked("192.0.2.1", NOW + 2)

    run(tmp_path, before)
    assert run(tmp_path, after) is False


def test_two_processes_share_failures_and_resets(tmp_path: Path) -> None:
    path = tmp_path / "submitd.sqlite3"

    async def main() -> list[bool]:
        first = AuthThrottle(path, SETTINGS, sync_interval=3600.0)
        second = AuthThrottle(path, SETTINGS, sync_interval=3600.0)
        try:
            fail(first, "192.0.2.1", NOW, count=5)
            fail(second, "192.0.2.1", NOW, count=5)
            seen = [first.blocked("192.0.2.1", NOW), second.blocked("192.0.2.1", NOW)]
            await first.sync()
            await second.sync()
            await first.sync()
            seen += [first.blocked("192.0.2.1", NOW), second.blocked("192.0.2.1", NOW)]
            first.record_success("192.0.2.1", ALICE, NOW + 1)
            await first.sync()
            await second.sync()
            seen.append(second.blocked("192.0.2.1", NOW + 1))
            return seen
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(main()) == [False, False, True, True, False]


def test_windows_that_stopped_counting_are_deleted(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> None:
        fail(throttle, "192.0.2.1", NOW)
        await throttle.sync()
        throttle.blocked("192.0.2.1", NOW + 3 * 86400)  # a new minute: prune
        await throttle.sync()

    run(tmp_path, work)
    with sqlite3.connect(tmp_path / "submitd.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM abuse_counters").fetchone() == (0,)


# Bounded memory


def test_memory_is_bounded_by_evicting_the_oldest(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> list[object]:
        fail(throttle, "192.0.2.1", NOW, count=10)
        first = throttle.blocked("192.0.2.1", NOW)
        for net in range(50):  # a flood of other networks pushes the first one out
            fail(throttle, f"10.{net}.0.1", NOW)
        return [
            first,
            throttle.blocked("192.0.2.1", NOW),
            len(throttle._counters),
            len(throttle._fingerprints),
        ]

    assert run(tmp_path, work, max_entries=20, max_fingerprints=5) == [True, False, 20, 5]


def test_long_logins_are_hashed(tmp_path: Path) -> None:
    async def work(throttle: AuthThrottle) -> float:
        login = "x" * 100_000
        for net in range(21):
            fail(throttle, f"10.{net}.0.1", NOW, login=login)
        return throttle.account_delay("10.200.0.1", login.upper(), NOW)

    assert run(tmp_path, work) == 5.0


# Connections


def test_at_most_20_concurrent_sessions_per_address() -> None:
    limiter = ConnectionLimiter(SETTINGS)
    admitted = [limiter.admit("192.0.2.1", NOW) for _ in range(20)]
    assert admitted == [None] * 20
    assert limiter.admit("192.0.2.1", NOW) == "Too many connections from 192.0.2.1"
    assert limiter.admit("192.0.2.2", NOW) is None  # another /32
    limiter.release("192.0.2.1")
    assert limiter.admit("192.0.2.1", NOW) is None
    assert limiter.sessions == 21


def test_ipv6_concurrency_counts_the_64() -> None:
    limiter = ConnectionLimiter(AbuseSettings(max_sessions_per_group=2))
    assert limiter.admit("2001:db8::1", NOW) is None
    assert limiter.admit("2001:db8::2", NOW) is None
    assert limiter.admit("2001:db8::3", NOW) == "Too many connections from 2001:db8::/64"


def test_at_most_300_new_connections_a_minute_per_address() -> None:
    limiter = ConnectionLimiter(SETTINGS)
    for _ in range(300):
        assert limiter.admit("192.0.2.1", NOW) is None
        limiter.release("192.0.2.1")
    refused = limiter.admit("192.0.2.1", NOW)
    assert refused == "Too many connections per minute from 192.0.2.1"
    assert limiter.admit("192.0.2.2", NOW) is None
    assert limiter.admit("192.0.2.1", NOW + 120) is None  # the window moved on


def test_global_cap_and_busy_flag() -> None:
    limiter = ConnectionLimiter(AbuseSettings(max_sessions=5, busy_fraction=0.8))
    busy = []
    for host in range(5):
        busy.append(limiter.busy)
        assert limiter.admit(f"192.0.2.{host}", NOW) is None
    assert busy == [False, False, False, False, True]
    assert limiter.admit("198.51.100.1", NOW) == "Too many sessions, try again later"
    limiter.release("192.0.2.0")
    assert limiter.busy  # 4 of 5
    limiter.release("192.0.2.1")
    assert not limiter.busy
    assert limiter.admit("198.51.100.1", NOW) is None


def test_release_of_an_unknown_address_frees_nothing() -> None:
    limiter = ConnectionLimiter(AbuseSettings(max_sessions=1))
    assert limiter.admit("192.0.2.1", NOW) is None
    limiter.release("192.0.2.1")
    limiter.release("192.0.2.1")  # a double release
    limiter.release("192.0.2.9")  # never admitted
    assert limiter.sessions == 0
    assert limiter.admit("192.0.2.2", NOW) is None
    assert limiter.admit("192.0.2.3", NOW) == "Too many sessions, try again later"


@pytest.mark.parametrize("flood", [1_000])
def test_rate_memory_is_bounded(flood: int) -> None:
    limiter = ConnectionLimiter(SETTINGS, max_entries=100)
    for host in range(flood):
        address = f"10.{host // 256}.{host % 256}.1"
        assert limiter.admit(address, NOW) is None
        limiter.release(address)
    assert len(limiter._rates) == 100
    assert limiter.sessions == 0
