"""argon2id hashing and the verifier's cache, against real database files.

The cache tests change a stored hash with a raw UPDATE that does not bump the
credentials generation: a login that still succeeds with the old password can only have
come from the cache, and one that fails shows the cache was bypassed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from submitd.auth import passwords
from submitd.auth.passwords import CredentialVerifier, PasswordHasher
from submitd.config import AuthConfig
from submitd.store.database import connect
from submitd.store.users import UserStore

CHEAP = AuthConfig(argon2_memory_kib=8192, argon2_time_cost=1)
ALICE = "alice@example.org"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "submitd.sqlite3"


@pytest.fixture
def admin(db_path: Path) -> Iterator[UserStore]:
    """The store as `submitd user ...` in another process would use it."""
    conn = connect(db_path)
    store = UserStore(conn)
    store.add(ALICE, PasswordHasher(CHEAP).hash("correct horse"))
    yield store
    conn.close()


def _verifier(db_path: Path, config: AuthConfig = CHEAP) -> CredentialVerifier:
    return CredentialVerifier(db_path, config)


def _replace_hash_silently(db_path: Path, login: str, password: str) -> None:
    """Change the stored hash without bumping the generation (see the module doc)."""
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "UPDATE users SET password_hash = ? WHERE login = ?",
            (PasswordHasher(CHEAP).hash(password), login),
        )
    conn.close()


def test_hash_is_argon2id_with_the_configured_costs() -> None:
    encoded = PasswordHasher(CHEAP).hash("secret")
    assert encoded.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    assert PasswordHasher(CHEAP).verify(encoded, "secret")
    assert not PasswordHasher(CHEAP).verify(encoded, "Secret")
    assert not PasswordHasher(CHEAP).verify("not a hash", "secret")


def test_right_password_gives_the_user(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path)
    user = asyncio.run(verifier.verify("Alice@Example.org", "correct horse"))
    verifier.close()
    assert user is not None and user.login == ALICE


def test_wrong_password_and_unknown_user_give_none(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path)

    async def attempts() -> list[object]:
        return [
            await verifier.verify(ALICE, "wrong"),
            await verifier.verify("nobody@example.org", "correct horse"),
            await verifier.verify(ALICE, ""),
        ]

    assert asyncio.run(attempts()) == [None, None, None]
    verifier.close()


def test_unknown_user_costs_about_as_much_as_a_wrong_password(
    db_path: Path, admin: UserStore
) -> None:
    verifier = _verifier(db_path)

    async def median_seconds(login: str) -> float:
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            await verifier.verify(login, "wrong")
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    async def both() -> tuple[float, float]:
        return await median_seconds(ALICE), await median_seconds("nobody@example.org")

    known, unknown = asyncio.run(both())
    verifier.close()
    assert 1 / 3 < unknown / known < 3


def test_second_login_is_served_from_the_cache(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path)

    async def scenario() -> tuple[object, object, float]:
        first = await verifier.verify(ALICE, "correct horse")
        _replace_hash_silently(db_path, ALICE, "something else")
        start = time.perf_counter()
        second = await verifier.verify(ALICE, "correct horse")
        return first, second, time.perf_counter() - start

    first, second, seconds = asyncio.run(scenario())
    verifier.close()
    assert first is not None and second == first
    assert seconds < 0.005


def test_wrong_password_is_not_cached_as_right(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path)

    async def scenario() -> list[object]:
        await verifier.verify(ALICE, "correct horse")
        return [await verifier.verify(ALICE, "correct horsE"), await verifier.verify(ALICE, "x")]

    assert asyncio.run(scenario()) == [None, None]
    verifier.close()


def test_password_change_in_another_process_empties_the_cache(
    db_path: Path, admin: UserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(passwords, "GENERATION_CHECK_SECONDS", 0.0)
    verifier = _verifier(db_path)

    async def scenario() -> tuple[object, object, object]:
        before = await verifier.verify(ALICE, "correct horse")
        admin.set_password(ALICE, PasswordHasher(CHEAP).hash("battery staple"))
        old = await verifier.verify(ALICE, "correct horse")
        new = await verifier.verify(ALICE, "battery staple")
        return before, old, new

    before, old, new = asyncio.run(scenario())
    verifier.close()
    assert before is not None and old is None and new is not None


def test_generation_is_read_at_most_once_a_second(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path)

    async def scenario() -> tuple[object, object]:
        await verifier.verify(ALICE, "correct horse")
        admin.set_password(ALICE, PasswordHasher(CHEAP).hash("battery staple"))
        within = await verifier.verify(ALICE, "correct horse")  # not yet noticed
        await asyncio.sleep(passwords.GENERATION_CHECK_SECONDS + 0.05)
        after = await verifier.verify(ALICE, "correct horse")
        return within, after

    within, after = asyncio.run(scenario())
    verifier.close()
    assert within is not None and after is None


def test_address_change_is_visible_after_the_next_check(
    db_path: Path, admin: UserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(passwords, "GENERATION_CHECK_SECONDS", 0.0)
    verifier = _verifier(db_path)

    async def scenario() -> object:
        await verifier.verify(ALICE, "correct horse")
        admin.add_address(ALICE, "@example.net")
        return await verifier.verify(ALICE, "correct horse")

    user = asyncio.run(scenario())
    verifier.close()
    assert user is not None and getattr(user, "addresses", None) == ("@example.net",)


def test_deleted_user_cannot_log_in_from_the_cache(
    db_path: Path, admin: UserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(passwords, "GENERATION_CHECK_SECONDS", 0.0)
    verifier = _verifier(db_path)

    async def scenario() -> object:
        await verifier.verify(ALICE, "correct horse")
        admin.delete(ALICE)
        return await verifier.verify(ALICE, "correct horse")

    assert asyncio.run(scenario()) is None
    verifier.close()


def test_cache_entries_expire(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path, CHEAP.model_copy(update={"cache_seconds": 0.05}))

    async def scenario() -> object:
        await verifier.verify(ALICE, "correct horse")
        _replace_hash_silently(db_path, ALICE, "something else")
        await asyncio.sleep(0.1)
        return await verifier.verify(ALICE, "correct horse")

    assert asyncio.run(scenario()) is None
    verifier.close()


def test_oldest_cache_entry_is_evicted(db_path: Path, admin: UserStore) -> None:
    admin.add("bob@example.org", PasswordHasher(CHEAP).hash("bob's"))
    verifier = _verifier(db_path, CHEAP.model_copy(update={"cache_entries": 1}))

    async def scenario() -> tuple[object, object]:
        await verifier.verify(ALICE, "correct horse")
        await verifier.verify("bob@example.org", "bob's")  # pushes alice out
        _replace_hash_silently(db_path, ALICE, "something else")
        _replace_hash_silently(db_path, "bob@example.org", "something else")
        return (
            await verifier.verify(ALICE, "correct horse"),
            await verifier.verify("bob@example.org", "bob's"),
        )

    alice, bob = asyncio.run(scenario())
    verifier.close()
    assert alice is None and bob is not None


def test_concurrent_verifications_do_not_block_the_loop(db_path: Path, admin: UserStore) -> None:
    verifier = _verifier(db_path)

    async def scenario() -> tuple[list[object], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(verifier.verify(ALICE, f"wrong {i}") for i in range(8)))
        task.cancel()
        return list(results), ticks

    results, ticks = asyncio.run(scenario())
    verifier.close()
    assert results == [None] * 8
    assert ticks > 3  # the loop kept running while argon2 worked in threads


def _stored_hash(db_path: Path) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return str(conn.execute("SELECT password_hash FROM users").fetchone()[0])
    finally:
        conn.close()


def test_login_rehashes_a_hash_made_with_older_costs(db_path: Path, admin: UserStore) -> None:
    """Raising the costs in the configuration reaches the account at its next login."""
    stronger = AuthConfig(argon2_memory_kib=8192, argon2_time_cost=2)
    generation = admin.credentials_generation()
    verifier = _verifier(db_path, stronger)
    assert asyncio.run(verifier.verify(ALICE, "wrong")) is None
    assert ",t=1," in _stored_hash(db_path)  # a failed login changes nothing
    assert asyncio.run(verifier.verify(ALICE, "correct horse")) is not None
    verifier.close()
    upgraded = _stored_hash(db_path)
    assert upgraded.startswith("$argon2id$v=19$m=8192,t=2,p=1$")
    assert PasswordHasher(stronger).verify(upgraded, "correct horse")
    assert admin.credentials_generation() == generation  # caches elsewhere stay valid
    again = _verifier(db_path, stronger)
    assert asyncio.run(again.verify(ALICE, "correct horse")) is not None
    again.close()
    assert _stored_hash(db_path) == upgraded  # once is enough


def test_rehash_never_overwrites_a_password_changed_meanwhile(
    db_path: Path, admin: UserStore
) -> None:
    old = _stored_hash(db_path)
    admin.set_password(ALICE, PasswordHasher(CHEAP).hash("new password"))
    assert not admin.replace_hash(ALICE, old, PasswordHasher(CHEAP).hash("correct horse"))
    assert PasswordHasher(CHEAP).verify(_stored_hash(db_path), "new password")
