"""Password hashing (argon2id) and verification with a short-lived cache.

Why argon2id through argon2-cffi (DESIGN principle 7): it is the memory-hard hash OWASP
recommends, and the C reference implementation is the fast way to run it from Python.
The default costs (auth.argon2_time_cost=2, auth.argon2_memory_kib=19456,
auth.argon2_parallelism=1) follow OWASP's minimum and cost one core about 20 ms.

Why a thread pool of its own (DESIGN principle 8): a hash would stall the event loop for
every connection, so it runs in threads. The pool has one thread per core, not asyncio's
default of up to 32: each running hash holds argon2_memory_kib of memory, and a flood of
wrong passwords should queue up, not take 32 x 19 MiB and every core.

Why a dummy hash: an unknown login is checked against a hash made with the configured
costs, so a wrong login and a wrong password take the same time and the reply timing
does not tell which logins exist.

Why a cache: clients such as msmtp or an application's SMTP library log in once per
message, and 20 ms of CPU per message would be most of the server's work. After a
successful check the verifier remembers HMAC-SHA256(installation secret, lowercased
login NUL password) -> (expiry, credentials generation, user) for auth.cache_seconds,
at most auth.cache_entries entries (oldest evicted). Only the keyed hash is kept, never
the password; without the secret (stored in the database, 0600) a memory dump does not
even allow a cheap offline guess. SASL (RFC 4616) logins cannot contain NUL, so the
separator is unambiguous.

Why a re-hash at login: a hash made with older costs is replaced after the next
successful login (the only moment the password is known), so raising the costs in the
configuration reaches every account.

Why the generation counter: `submitd user passwd` (or del, or an address change) runs
in another process. It bumps `credentials_generation` in the database; the verifier
reads it at most once a second and drops every entry made under an older value. A
changed password therefore stops working within a second, without signals.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from submitd.config import AuthConfig
from submitd.store.database import connect
from submitd.store.users import User, UserStore

GENERATION_CHECK_SECONDS = 1.0
log = logging.getLogger("submitd.auth")


class PasswordHasher:
    """argon2id with the costs from the configuration."""

    def __init__(self, config: AuthConfig) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=config.argon2_parallelism,
            type=argon2.Type.ID,
        )

    def hash(self, password: str) -> str:
        """A PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash) with a fresh salt."""
        return self._hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        """True on a match; False on a mismatch or a stored hash that cannot be parsed."""
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """Was the hash made with other costs (or another variant) than configured?"""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return False


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    expires: float  # time.monotonic()
    generation: int
    user: User


class CredentialVerifier:
    """Checks a login and password; safe to share by all sessions of one event loop."""

    def __init__(self, db_path: Path, config: AuthConfig) -> None:
        self._config = config
        self._hasher = PasswordHasher(config)
        # One connection used from several threads, so it is serialised by a lock; the
        # queries under it take microseconds and the hash runs outside it.
        self._conn = connect(db_path, check_same_thread=False)
        self._store = UserStore(self._conn)
        self._lock = threading.Lock()
        self._secret = self._store.secret()
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))
        self._executor = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix="submitd-argon2"
        )
        self._cache: OrderedDict[bytes, _CacheEntry] = OrderedDict()
        self._generation = self._store.credentials_generation()
        self._generation_checked = time.monotonic()

    async def verify(self, login: str, password: str) -> User | None:
        """The user when the password is theirs, else None (for any reason)."""
        key = self._cache_key(login, password)
        user = await self._cached(key)
        if user is not None:
            return user
        loop = asyncio.get_running_loop()
        user, generation = await loop.run_in_executor(self._executor, self._check, login, password)
        self._observe_generation(generation)
        if user is not None:
            self._remember(key, user, generation)
        return user

    def is_user(self, address: str) -> bool:
        """Is `address` the login of one of our users (RFC 6409 4.2 expansion check)?"""
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM users WHERE login = ? COLLATE NOCASE", (address,)
            ).fetchone()
        return row is not None

    def close(self) -> None:
        """Wait for running checks (milliseconds), then release the threads and database."""
        self._executor.shutdown(wait=True)
        with self._lock:
            self._conn.close()

    def _cache_key(self, login: str, password: str) -> bytes:
        message = f"{login.lower()}\0{password}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def _cached(self, key: bytes) -> User | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        generation = await self._current_generation()
        if entry.expires <= time.monotonic() or entry.generation != generation:
            self._cache.pop(key, None)
            return None
        return entry.user

    def _remember(self, key: bytes, user: User, generation: int) -> None:
        if self._config.cache_entries <= 0 or self._config.cache_seconds <= 0:
            return
        expires = time.monotonic() + self._config.cache_seconds
        self._cache[key] = _CacheEntry(expires, generation, user)
        self._cache.move_to_end(key)
        while len(self._cache) > self._config.cache_entries:
            self._cache.popitem(last=False)

    async def _current_generation(self) -> int:
        """The database's counter, read at most once per GENERATION_CHECK_SECONDS."""
        if time.monotonic() - self._generation_checked >= GENERATION_CHECK_SECONDS:
            self._observe_generation(await asyncio.to_thread(self._read_generation))
        return self._generation

    def _observe_generation(self, generation: int) -> None:
        """Take a freshly read counter; a higher value invalidates every entry. The
        counter only grows, so a slow check's older reading never moves it back."""
        self._generation_checked = time.monotonic()
        if generation > self._generation:
            self._generation = generation
            self._cache.clear()

    def _read_generation(self) -> int:
        with self._lock:
            return self._store.credentials_generation()

    def _check(self, login: str, password: str) -> tuple[User | None, int]:
        """In a pool thread: read the user, then run argon2 (against the dummy if absent)."""
        with self._lock:
            user, generation = self._store.snapshot(login)
        stored = user.password_hash if user is not None else self._dummy_hash
        matched = self._hasher.verify(stored, password)
        if matched and user is not None and self._hasher.needs_rehash(stored):
            self._upgrade(user, stored, password)
        return (user if matched else None), generation

    def _upgrade(self, user: User, stored: str, password: str) -> None:
        """Re-hash with the configured costs, the one moment the password is known.

        Raising `argon2_*` in the configuration thus reaches every account at its next
        login (OWASP's advice), not only new passwords. The stored hash is replaced only
        if it is still the one we checked (a `user passwd` meanwhile wins), and the
        credentials generation is not bumped: the password itself did not change.
        """
        upgraded = self._hasher.hash(password)
        with self._lock:
            if self._store.replace_hash(user.login, stored, upgraded):
                log.info("user=%s password re-hashed with the configured argon2 costs", user.login)
