"""The SQLite database and the user store, on real database files."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from submitd.store import database
from submitd.store.database import SchemaError, connect
from submitd.store.users import (
    UnknownAddress,
    UnknownUser,
    User,
    UserExists,
    UserStore,
    may_send_as,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "submitd.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[UserStore]:
    conn = connect(db_path)
    yield UserStore(conn)
    conn.close()


def test_database_is_private_and_durable(db_path: Path) -> None:
    conn = connect(db_path)
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_migrations_run_once_and_reopen_is_cheap(db_path: Path) -> None:
    connect(db_path).close()
    conn = connect(db_path)
    versions = conn.execute("SELECT version FROM schema_version").fetchall()
    assert versions == [(v,) for v in range(1, len(database.MIGRATIONS) + 1)]


def test_database_from_a_newer_submitd_is_refused(db_path: Path) -> None:
    conn = connect(db_path)
    conn.execute("INSERT INTO schema_version VALUES (999)")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        connect(db_path)


def test_added_user_is_found_in_any_letter_case(store: UserStore) -> None:
    added = store.add("Alice@Example.org", "hash1")
    found = store.get("alice@EXAMPLE.ORG")
    assert found == added
    assert found == User(added.id, "Alice@Example.org", "hash1", (), False)


def test_duplicate_login_in_other_case_is_refused(store: UserStore) -> None:
    store.add("alice@example.org", "h")
    with pytest.raises(UserExists):
        store.add("ALICE@example.org", "h")


@pytest.mark.parametrize("login", ["alice", "@example.org", "alice@", "a b@example.org", "a@b"])
def test_login_must_be_an_address(store: UserStore, login: str) -> None:
    with pytest.raises(ValueError):
        store.add(login, "h")


def test_list_is_sorted_with_addresses(store: UserStore) -> None:
    store.add("bob@example.org", "h")
    store.add("alice@example.org", "h")
    store.add_address("alice@example.org", "@example.net")
    store.add_address("alice@example.org", "info@example.org")
    store.add_address("alice@example.org", "info@example.org")  # idempotent
    users = store.list()
    assert [u.login for u in users] == ["alice@example.org", "bob@example.org"]
    assert users[0].addresses == ("@example.net", "info@example.org")
    assert users[1].addresses == ()


def test_every_credential_change_bumps_the_generation(store: UserStore) -> None:
    store.add("alice@example.org", "h")
    seen = [store.credentials_generation()]
    store.set_password("alice@example.org", "h2")
    seen.append(store.credentials_generation())
    store.add_address("alice@example.org", "a@example.net")
    seen.append(store.credentials_generation())
    store.del_address("alice@example.org", "a@example.net")
    seen.append(store.credentials_generation())
    store.set_relaxed_header_from("alice@example.org", True)
    seen.append(store.credentials_generation())
    store.delete("alice@example.org")
    seen.append(store.credentials_generation())
    assert seen == sorted(set(seen)) and len(seen) == 6


def test_changes_to_unknown_users_fail_and_change_nothing(store: UserStore) -> None:
    before = store.credentials_generation()
    changes: list[Callable[[], None]] = [
        lambda: store.set_password("nobody@example.org", "h"),
        lambda: store.delete("nobody@example.org"),
        lambda: store.add_address("nobody@example.org", "x@example.org"),
        lambda: store.set_relaxed_header_from("nobody@example.org", True),
    ]
    for change in changes:
        with pytest.raises(UnknownUser):
            change()
    assert store.credentials_generation() == before


def test_deleting_a_missing_address_is_an_error(store: UserStore) -> None:
    store.add("alice@example.org", "h")
    with pytest.raises(UnknownAddress):
        store.del_address("alice@example.org", "other@example.org")


def test_deleting_a_user_deletes_their_addresses(db_path: Path, store: UserStore) -> None:
    store.add("alice@example.org", "h")
    store.add_address("alice@example.org", "@example.net")
    store.delete("ALICE@example.org")
    assert store.get("alice@example.org") is None
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM user_addresses").fetchone()[0] == 0


def test_relaxed_header_from_flag(store: UserStore) -> None:
    store.add("alice@example.org", "h")
    store.set_relaxed_header_from("alice@example.org", True)
    user = store.get("alice@example.org")
    assert user is not None and user.relaxed_header_from


def test_secret_is_made_once_and_shared(db_path: Path) -> None:
    first = UserStore(connect(db_path)).secret()
    second = UserStore(connect(db_path)).secret()
    assert first == second and len(first) == 32


def test_change_from_another_connection_is_seen(db_path: Path, store: UserStore) -> None:
    store.add("alice@example.org", "h")
    UserStore(connect(db_path)).set_password("alice@example.org", "h2")
    user = store.get("alice@example.org")
    assert user is not None and user.password_hash == "h2"


ALICE = User(1, "Alice@Example.org", "h", ("info@example.org", "@Example.NET"), False)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("alice@example.org", True),
        ("ALICE@EXAMPLE.ORG", True),  # local part compared without case, by choice
        ("info@example.org", True),
        ("Info@Example.Org", True),
        ("anyone@example.net", True),  # @domain entry
        ("anyone@EXAMPLE.net", True),
        ("anyone@sub.example.net", False),  # a domain entry does not cover subdomains
        ("bob@example.org", False),
        ("alice@example.com", False),
        ("example.net", False),
        ("", True),  # null reverse-path
    ],
)
def test_may_send_as(address: str, allowed: bool) -> None:
    assert may_send_as(ALICE, address) is allowed
