"""Per-user limits (RFC 6409 6.2, 6.3) with counters in real SQLite files.

Every check takes an explicit `now`, so window edges and reset times are exact. Two
RateLimiter objects on one database file stand for two server processes.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from submitd.config import PolicyConfig, UserPolicy
from submitd.policy import EffectiveLimits, RateLimiter, RejectionLog, effective_limits
from submitd.smtp.replies import Reply

T = TypeVar("T")

ALICE = "alice@example.org"
BOB = "bob@example.org"
# Tuesday 2024-03-05 14:37:30 UTC: the hour resets at 15:00:00 in 22.5 minutes, the day
# at 00:00:00 in 9 h 22.5 min; both are rounded up to whole minutes.
NOW = float(calendar.timegm((2024, 3, 5, 14, 37, 30)))
NEXT_HOUR = float(calendar.timegm((2024, 3, 5, 15, 0, 0)))
NEXT_DAY = float(calendar.timegm((2024, 3, 6, 0, 0, 0)))

POLICY = PolicyConfig(
    messages_per_hour=3,
    recipients_per_message=2,
    recipients_per_day=5,
    max_message_size=4096,
    rejection_log_per_minute=2,
    users={
        "Bob@Example.ORG": UserPolicy(
            messages_per_hour=1,
            max_message_size=2048,
            recipient_domains=["Example.NET.", "bücher.example"],
        ),
        "carol@example.org": UserPolicy(messages_per_hour=0, recipients_per_day=0),
        "dave@example.org": UserPolicy(recipient_domains=[]),
    },
)


def run(
    tmp_path: Path,
    work: Callable[[RateLimiter], Awaitable[T]],
    *,
    rejections: RejectionLog | None = None,
    postmaster: str | None = None,
) -> T:
    """Run `work` against a RateLimiter on tmp_path's database, closing it after."""

    async def main() -> T:
        path = tmp_path / "submitd.sqlite3"
        limiter = RateLimiter(path, POLICY, rejections=rejections, postmaster=postmaster)
        try:
            return await work(limiter)
        finally:
            await limiter.close()

    return asyncio.run(main())


def stored_total(tmp_path: Path, login: str, kind: str) -> int:
    with sqlite3.connect(tmp_path / "submitd.sqlite3") as conn:
        row = conn.execute(
            "SELECT sum(total) FROM rate_counters WHERE login = ? AND kind = ?", (login, kind)
        ).fetchone()
    return int(row[0] or 0)


# Effective limits


def test_overrides_inherit_field_by_field_and_match_login_case_insensitively() -> None:
    assert effective_limits(POLICY, "BOB@example.org") == EffectiveLimits(
        messages_per_hour=1,
        recipients_per_message=2,  # inherited
        recipients_per_day=5,  # inherited
        max_message_size=2048,
        recipient_domains=("example.net", "xn--bcher-kva.example"),
    )
    assert effective_limits(POLICY, "nobody@example.org") == EffectiveLimits(3, 2, 5, 4096, None)
    assert effective_limits(POLICY, "dave@example.org").recipient_domains == ()


def test_site_domains_apply_unless_overridden() -> None:
    policy = PolicyConfig(recipient_domains=["example.com"], users={BOB: UserPolicy()})
    assert effective_limits(policy, BOB).recipient_domains == ("example.com",)
    assert effective_limits(policy, ALICE).recipient_domains == ("example.com",)


# Messages per hour


def test_message_over_the_hourly_limit_is_452_with_the_reset_time(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> list[Reply | None]:
        results = []
        for _ in range(3):
            results.append(limiter.check_message(ALICE, NOW))
            await limiter.record_message(ALICE, 1, NOW)
        results.append(limiter.check_message("Alice@Example.org", NOW))
        results.append(limiter.check_message(ALICE, NEXT_HOUR - 1))
        return results

    *accepted, refused, last_second = run(tmp_path, work)
    assert accepted == [None, None, None]
    assert refused == Reply(
        452,
        "4.7.0",
        "Message rate limit of 3 per hour reached for Alice@Example.org; "
        "resets at 15:00:00 UTC (in 23 minutes)",
    )
    assert last_second is not None
    assert last_second.text == (
        f"Message rate limit of 3 per hour reached for {ALICE}; "
        "resets at 15:00:00 UTC (in 1 minute)"
    )


def test_the_count_resets_when_the_hour_turns(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> tuple[Reply | None, Reply | None, Reply | None]:
        for _ in range(3):
            await limiter.record_message(ALICE, 1, NOW)
        before = limiter.check_message(ALICE, NEXT_HOUR - 0.001)
        after = limiter.check_message(ALICE, NEXT_HOUR)
        await limiter.record_message(ALICE, 1, NEXT_HOUR)
        return before, after, limiter.check_message(ALICE, NEXT_HOUR + 1)

    before, after, next_one = run(tmp_path, work)
    assert before is not None and before.code == 452
    assert after is None
    assert next_one is None  # one of three in the new hour


def test_user_override_and_zero_means_no_limit(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> tuple[Reply | None, Reply | None]:
        await limiter.record_message(BOB, 1, NOW)
        for _ in range(50):
            await limiter.record_message("carol@example.org", 10, NOW)
        return limiter.check_message(BOB, NOW), limiter.check_message("carol@example.org", NOW)

    bob, carol = run(tmp_path, work)
    assert bob is not None and bob.lines[0].startswith("Message rate limit of 1 per hour")
    assert carol is None
    with_carol = run(
        tmp_path,
        lambda limiter: _ready(limiter.check_recipient("carol@example.org", "x@y.z", 0, NOW)),
    )
    assert with_carol is None  # 500 recipients today, recipients_per_day = 0


async def _ready(value: T) -> T:
    return value


# Recipients


def test_recipient_domain_not_allowed_is_550_5_7_1(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> list[Reply | None]:
        return [
            limiter.check_recipient(BOB, "friend@example.com", 0, NOW),
            limiter.check_recipient(BOB, "friend@EXAMPLE.net", 0, NOW),
            limiter.check_recipient(BOB, "shop@xn--bcher-kva.example", 0, NOW),
            limiter.check_recipient(BOB, "Postmaster@mail.example.org", 0, NOW),
            limiter.check_recipient("dave@example.org", "x@example.org", 0, NOW),
        ]

    results = run(tmp_path, work, postmaster="postmaster@mail.example.org")
    assert results[0] == Reply(550, "5.7.1", f"Recipient domain not allowed for {BOB}: example.com")
    assert results[1:4] == [None, None, None]
    assert results[4] == Reply(
        550, "5.7.1", "Recipient domain not allowed for dave@example.org: example.org"
    )


def test_recipients_per_message_is_452_naming_the_limit(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> tuple[Reply | None, Reply | None]:
        return (
            limiter.check_recipient(ALICE, "a@example.net", 1, NOW),
            limiter.check_recipient(ALICE, "b@example.net", 2, NOW),
        )

    second, third = run(tmp_path, work)
    assert second is None
    assert third == Reply(452, "4.7.0", f"Recipient limit of 2 per message reached for {ALICE}")


def test_daily_recipients_count_this_message_and_reset_at_midnight(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> list[Reply | None]:
        await limiter.record_message(ALICE, 2, NOW - 3 * 3600)
        await limiter.record_message(ALICE, 2, NOW)  # 4 of 5 today
        return [
            limiter.check_recipient(ALICE, "a@example.net", 0, NOW),
            limiter.check_recipient(ALICE, "b@example.net", 1, NOW),
            limiter.check_recipient(ALICE, "a@example.net", 1, NEXT_DAY),
        ]

    fifth, sixth, tomorrow = run(tmp_path, work)
    assert fifth is None
    assert sixth == Reply(
        452,
        "4.7.0",
        f"Daily recipient limit of 5 reached for {ALICE}; "
        "resets at 00:00:00 UTC (in 9 hours 23 minutes)",
    )
    assert tomorrow is None


# Size


def test_size_over_the_users_limit_is_552_5_3_4(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> list[Reply | None]:
        return [
            limiter.check_size(BOB, 2048),
            limiter.check_size(BOB, 2049),
            limiter.check_size(ALICE, 4096),
        ]

    at_limit, over, alice = run(tmp_path, work)
    assert at_limit is None and alice is None
    assert over == Reply(552, "5.3.4", f"Message exceeds the size limit of 2048 octets for {BOB}")


def test_control_characters_in_a_login_cannot_forge_reply_lines(tmp_path: Path) -> None:
    answer = run(tmp_path, lambda limiter: _ready(limiter.check_size("x\r\n250 ok", 10**6)))
    assert answer is not None
    assert answer.encode().count(b"\r\n") == 1
    assert "x\\x0d\\x0a250 ok" in answer.text


# Persistence


def test_counters_survive_a_restart(tmp_path: Path) -> None:
    async def send(limiter: RateLimiter) -> None:
        for _ in range(3):
            await limiter.record_message(ALICE, 1, NOW)
        # close() commits what the writer thread had not committed yet

    run(tmp_path, send)
    assert stored_total(tmp_path, ALICE, "messages") == 3
    after = run(tmp_path, lambda limiter: _ready(limiter.check_message(ALICE, NOW + 60)))
    assert after is not None and after.code == 452
    later = run(tmp_path, lambda limiter: _ready(limiter.check_message(ALICE, NEXT_HOUR)))
    assert later is None


def test_recorded_counts_reach_the_database_without_close(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> int:
        await limiter.record_message(ALICE, 2, NOW)
        await limiter.sync()
        return stored_total(tmp_path, ALICE, "recipients")

    assert run(tmp_path, work) == 2


def test_ended_windows_are_deleted(tmp_path: Path) -> None:
    async def work(limiter: RateLimiter) -> list[tuple[str, int]]:
        await limiter.record_message(ALICE, 1, NOW)
        await limiter.record_message(ALICE, 1, NEXT_DAY)  # the hour turns: prune
        await limiter.sync()
        with sqlite3.connect(tmp_path / "submitd.sqlite3") as conn:
            rows = conn.execute("SELECT kind, window_start FROM rate_counters ORDER BY kind")
            return [(str(kind), int(start)) for kind, start in rows]

    assert run(tmp_path, work) == [("messages", int(NEXT_DAY)), ("recipients", int(NEXT_DAY))]


# Several processes on one database


def _two(
    tmp_path: Path,
    work: Callable[[RateLimiter, RateLimiter], Awaitable[T]],
    sync_interval: float = 3600.0,
) -> T:
    """Two limiters on one file; a long sync_interval leaves merging to the test."""

    async def main() -> T:
        path = tmp_path / "submitd.sqlite3"
        first = RateLimiter(path, POLICY, sync_interval=sync_interval)
        second = RateLimiter(path, POLICY, sync_interval=sync_interval)
        try:
            return await work(first, second)
        finally:
            await first.close()
            await second.close()

    return asyncio.run(main())


def test_two_processes_merged_after_each_batch_enforce_the_exact_limit(tmp_path: Path) -> None:
    async def work(a: RateLimiter, b: RateLimiter) -> int:
        accepted = 0
        for step in range(12):
            this, other = (a, b) if step % 2 == 0 else (b, a)
            if this.check_message(ALICE, NOW) is None:
                await this.record_message(ALICE, 1, NOW)
                accepted += 1
            await this.sync()  # its batch, committed a few ms after the record
            await other.sync()  # the other's next merge
        return accepted

    assert _two(tmp_path, work) == 3
    assert stored_total(tmp_path, ALICE, "messages") == 3


def test_a_stale_process_overshoots_by_at_most_the_others_unmerged_commits(
    tmp_path: Path,
) -> None:
    async def work(a: RateLimiter, b: RateLimiter) -> tuple[int, int, Reply | None]:
        await a.record_message(ALICE, 1, NOW)
        await a.record_message(ALICE, 1, NOW)
        await a.sync()  # committed; b has not merged since it started
        unmerged_by_b = 2
        accepted_by_b = 0
        for _ in range(10):
            if b.check_message(ALICE, NOW) is None:
                await b.record_message(ALICE, 1, NOW)
                accepted_by_b += 1
        await b.sync()
        return unmerged_by_b, accepted_by_b, b.check_message(ALICE, NOW)

    unmerged, accepted_by_b, after_merge = _two(tmp_path, work)
    total = 2 + accepted_by_b
    assert total <= POLICY.messages_per_hour + unmerged  # the documented bound
    assert after_merge is not None and after_merge.code == 452
    assert stored_total(tmp_path, ALICE, "messages") == total  # no update was lost


def test_the_periodic_merge_shows_other_processes_counts(tmp_path: Path) -> None:
    async def work(a: RateLimiter, b: RateLimiter) -> Reply | None:
        for _ in range(3):
            await a.record_message(ALICE, 1, NOW)
        await asyncio.sleep(0.5)  # a commits at once; b merges every 0.05 s
        return b.check_message(ALICE, NOW)

    refused = _two(tmp_path, work, sync_interval=0.05)
    assert refused is not None and refused.code == 452


def test_concurrent_processes_lose_no_increment(tmp_path: Path) -> None:
    async def work(a: RateLimiter, b: RateLimiter) -> None:
        await asyncio.gather(*(limiter.record_message(BOB, 3, NOW) for limiter in [a, b] * 40))

    _two(tmp_path, work)
    assert stored_total(tmp_path, BOB, "messages") == 80
    assert stored_total(tmp_path, BOB, "recipients") == 240


# Rejection log


def test_rejection_log_writes_a_bounded_number_of_lines_then_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="submitd.policy")
    log = RejectionLog(POLICY.rejection_log_per_minute)  # 2 lines per user and minute
    refusal = Reply(452, "4.7.0", "Message rate limit reached")
    minute = NOW - NOW % 60
    for second in range(5):
        log.log(ALICE, "messages_per_hour", refusal, minute + second)
    log.log(BOB, "recipient_domains", Reply(550, "5.7.1", "no"), minute + 6)
    log.log(ALICE, "messages_per_hour", refusal, minute + 60)

    assert [record.getMessage() for record in caplog.records] == [
        f"rejected user={ALICE} rule=messages_per_hour code=452 enhanced=4.7.0 "
        "text=Message rate limit reached",
        f"rejected user={ALICE} rule=messages_per_hour code=452 enhanced=4.7.0 "
        "text=Message rate limit reached",
        f"rejected user={BOB} rule=recipient_domains code=550 enhanced=5.7.1 text=no",
        f"user={ALICE} 3 more rejections suppressed",
        f"rejected user={ALICE} rule=messages_per_hour code=452 enhanced=4.7.0 "
        "text=Message rate limit reached",
    ]
    assert {record.name for record in caplog.records} == {"submitd.policy"}


def test_rejection_log_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="submitd.policy")
    log = RejectionLog(POLICY.rejection_log_per_minute, max_users=2)
    refusal = Reply(552, "5.3.4", "too big")
    for index in range(5):
        log.log(f"user{index}@example.org", "max_message_size", refusal, NOW)
    log.flush(NOW + 60)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert messages[-1] == "3 more rejections of other users suppressed"
    log.flush(NOW + 120)
    assert len(caplog.records) == 3  # nothing left to summarise


def test_rate_limiter_logs_its_rejections_with_the_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="submitd.policy")

    async def work(limiter: RateLimiter) -> None:
        await limiter.record_message(BOB, 1, NOW)
        limiter.check_message(BOB, NOW)
        limiter.check_recipient(BOB, "x@example.com", 0, NOW)
        limiter.check_size(BOB, 10**6, NOW)

    run(tmp_path, work, rejections=RejectionLog(5))
    rules = [record.getMessage().split()[2] for record in caplog.records]
    assert rules == ["rule=messages_per_hour", "rule=recipient_domains", "rule=max_message_size"]
