"""Users, the addresses they may send as, and the settings the verifier needs.

RFC 6409 6.1 lets a submission server check that the envelope sender (and the From
field) belong to the authenticated user; DESIGN principle 3 makes that the default. An
administrator gives each user their login address plus further addresses, or a whole
domain written "@example.org".

Logins and addresses are stored as typed and compared case-insensitively: the columns
use SQLite's NOCASE collation (ASCII folding only), `may_send_as` uses `str.lower`.

`credentials_generation` is a counter bumped by every change that could make a cached
verification wrong (password, deletion, addresses, the relaxed From flag). The verifier
in another process reads it at most once a second; a change empties its cache without
any signal between processes.

Every write is one `BEGIN IMMEDIATE` transaction, so the change and its generation bump
land together or not at all.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass

from submitd.store.database import transaction

SECRET_BYTES = 32
_SECRET_KEY = "cache_secret"
_GENERATION_KEY = "credentials_generation"
_FORBIDDEN = frozenset("\0\r\n\t <>")

_SELECT_USERS = """
    SELECT u.id, u.login, u.password_hash, u.relaxed_header_from,
           group_concat(a.address, char(0))
    FROM users AS u LEFT JOIN user_addresses AS a ON a.user_id = u.id
"""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    login: str
    password_hash: str
    addresses: tuple[str, ...]
    relaxed_header_from: bool


class UserExists(Exception):
    """`add` of a login that is already there (in any letter case)."""


class UnknownUser(LookupError):
    """The login names no user."""


class UnknownAddress(LookupError):
    """`del_address` of an address the user does not have."""


class UserStore:
    """The users table behind one connection (opened by `database.connect`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def add(self, login: str, password_hash: str) -> User:
        """A new user whose login is their first address. ValueError if not an address."""
        check_address(login, allow_domain=False)
        try:
            with transaction(self._conn):
                self._conn.execute(
                    "INSERT INTO users (login, password_hash, created) VALUES (?, ?, ?)",
                    (login, password_hash, time.time()),
                )
        except sqlite3.IntegrityError:
            raise UserExists(login) from None
        user = self.get(login)
        assert user is not None
        return user

    def get(self, login: str) -> User | None:
        """The user, looked up case-insensitively; one statement, so one snapshot."""
        row = self._conn.execute(
            _SELECT_USERS + " WHERE u.login = ? GROUP BY u.id", (login,)
        ).fetchone()
        return None if row is None else _user_from_row(row)

    def list(self) -> list[User]:
        rows = self._conn.execute(_SELECT_USERS + " GROUP BY u.id ORDER BY u.login")
        return [_user_from_row(row) for row in rows]

    def set_password(self, login: str, password_hash: str) -> None:
        with transaction(self._conn):
            self._update_user(login, "password_hash = ?", (password_hash,))

    def replace_hash(self, login: str, old: str, new: str) -> bool:
        """Swap a password hash for a stronger one of the same password, only if it is
        still `old`; no generation bump (cached logins stay right). True if swapped."""
        with transaction(self._conn):
            cursor = self._conn.execute(
                "UPDATE users SET password_hash = ? WHERE login = ? AND password_hash = ?",
                (new, login, old),
            )
        return cursor.rowcount == 1

    def delete(self, login: str) -> None:
        with transaction(self._conn):
            cursor = self._conn.execute("DELETE FROM users WHERE login = ?", (login,))
            if cursor.rowcount == 0:
                raise UnknownUser(login)
            self._bump_generation()

    def add_address(self, login: str, address: str) -> None:
        """Allow `address` ("x@domain", or "@domain" for a whole domain); idempotent."""
        check_address(address, allow_domain=True)
        with transaction(self._conn):
            user_id = self._user_id(login)
            self._conn.execute(
                "INSERT OR IGNORE INTO user_addresses (user_id, address) VALUES (?, ?)",
                (user_id, address),
            )
            self._bump_generation()

    def del_address(self, login: str, address: str) -> None:
        with transaction(self._conn):
            user_id = self._user_id(login)
            cursor = self._conn.execute(
                "DELETE FROM user_addresses WHERE user_id = ? AND address = ?",
                (user_id, address),
            )
            if cursor.rowcount == 0:
                raise UnknownAddress(f"{login} has no address {address}")
            self._bump_generation()

    def set_relaxed_header_from(self, login: str, relaxed: bool) -> None:
        with transaction(self._conn):
            self._update_user(login, "relaxed_header_from = ?", (int(relaxed),))

    def credentials_generation(self) -> int:
        row = self._conn.execute(
            "SELECT value FROM settings WHERE key = ?", (_GENERATION_KEY,)
        ).fetchone()
        return int(row[0])

    def secret(self) -> bytes:
        """The installation's cache key: made once from the OS CSPRNG, then kept."""
        value = self._read_secret()
        if value is None:
            with transaction(self._conn):
                self._conn.execute(
                    "INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)",
                    (_SECRET_KEY, secrets.token_bytes(SECRET_BYTES)),
                )
            value = self._read_secret()
        assert value is not None
        return value

    def snapshot(self, login: str) -> tuple[User | None, int]:
        """The user and the generation read together, so a change between the two reads
        cannot be cached under the newer generation."""
        with transaction(self._conn, write=False):
            return self.get(login), self.credentials_generation()

    def _read_secret(self) -> bytes | None:
        row = self._conn.execute(
            "SELECT value FROM settings WHERE key = ?", (_SECRET_KEY,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _user_id(self, login: str) -> int:
        row = self._conn.execute("SELECT id FROM users WHERE login = ?", (login,)).fetchone()
        if row is None:
            raise UnknownUser(login)
        return int(row[0])

    def _update_user(self, login: str, assignment: str, values: tuple[object, ...]) -> None:
        cursor = self._conn.execute(
            f"UPDATE users SET {assignment} WHERE login = ?", (*values, login)
        )
        if cursor.rowcount == 0:
            raise UnknownUser(login)
        self._bump_generation()

    def _bump_generation(self) -> None:
        self._conn.execute(
            "UPDATE settings SET value = value + 1 WHERE key = ?", (_GENERATION_KEY,)
        )


def _user_from_row(row: tuple[int, str, str, int, str | None]) -> User:
    user_id, login, password_hash, relaxed, joined = row
    addresses = tuple(sorted(joined.split("\0"), key=str.lower)) if joined else ()
    return User(user_id, login, password_hash, addresses, bool(relaxed))


def check_address(address: str, *, allow_domain: bool) -> None:
    """ValueError unless `address` is local@domain (or "@domain" when allowed).

    Only a sanity check for what an administrator types: quoting and the full RFC 5321
    4.1.2 grammar belong to the SMTP syntax module. The domain must contain a dot
    because RFC 6409 wants fully-qualified domains in submitted addresses.
    """
    if any(char in _FORBIDDEN for char in address):
        raise ValueError(f"{address!r}: spaces, control characters and <> are not allowed")
    local, sep, domain = address.rpartition("@")
    if not sep or not domain or "." not in domain.strip("."):
        raise ValueError(f"{address!r}: expected local@domain.example")
    if not local and not (allow_domain and address.startswith("@")):
        kind = "local@domain or @domain" if allow_domain else "local@domain"
        raise ValueError(f"{address!r}: expected {kind}")


def may_send_as(user: User, address: str) -> bool:
    """Whether `user` may use `address` as envelope sender or From (RFC 6409 6.1).

    The null reverse-path <> (RFC 5321 4.5.5, "" here) names no one, so it is allowed:
    clients send delivery and read receipts with it.

    The local part is compared case-insensitively too, although RFC 5321 2.4 lets the
    receiving domain treat it as case-sensitive. Nearly every domain ignores case, and
    no administrator gives two people mailboxes that differ only in case, so refusing
    "Alice@" for the owner of "alice@" would only break clients that capitalise.
    """
    if address == "":
        return True
    folded = address.lower()
    _, sep, domain = folded.rpartition("@")
    if not sep:
        return False
    if folded == user.login.lower():
        return True
    return any(_entry_matches(entry.lower(), folded, domain) for entry in user.addresses)


def _entry_matches(entry: str, address: str, domain: str) -> bool:
    if entry.startswith("@"):
        return entry[1:] == domain
    return entry == address
