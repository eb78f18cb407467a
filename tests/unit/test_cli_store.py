"""`submitd user ...` and `submitd queue ...` through click's CliRunner, on real files."""

from __future__ import annotations

import asyncio
import json
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from submitd.auth.passwords import PasswordHasher
from submitd.cli.queue import queue
from submitd.cli.users import user
from submitd.config import AuthConfig, load_config
from submitd.delivery import state
from submitd.delivery.types import Outcome, Status
from submitd.envelope import Envelope, Recipient, SessionInfo
from submitd.store.database import connect
from submitd.store.queue import Queue, new_queue_id
from submitd.store.users import User, UserStore

CHEAP = AuthConfig(argon2_memory_kib=8192, argon2_time_cost=1)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "submitd.toml"
    path.write_text(
        f'hostname = "mail.example.org"\ndata_dir = "{tmp_path / "data"}"\n'
        "[auth]\nargon2_memory_kib = 8192\nargon2_time_cost = 1\n"
        "[queue]\ninline_max = 1024\n"
    )
    return path


def _user(config_file: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(user, [*args, "--config", str(config_file)], input=stdin)


def _queue(config_file: Path, *args: str) -> Result:
    return CliRunner().invoke(queue, [*args, "--config", str(config_file)])


def _get(config_file: Path, login: str) -> User | None:
    with closing(connect(load_config(config_file).database_path)) as conn:
        return UserStore(conn).get(login)


def _stored_hash(config_file: Path, login: str) -> str:
    account = _get(config_file, login)
    assert account is not None
    return account.password_hash


def test_add_with_password_on_stdin_then_list(config_file: Path) -> None:
    result = _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="pw 1\n")
    assert result.exit_code == 0, result.output
    assert PasswordHasher(CHEAP).verify(_stored_hash(config_file, "alice@example.org"), "pw 1")
    listing = _user(config_file, "list")
    assert listing.exit_code == 0
    assert listing.output == "alice@example.org\t-\n"


def test_add_prompts_twice_without_echo(config_file: Path) -> None:
    result = _user(config_file, "add", "alice@example.org", stdin="s3cret\ns3cret\n")
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert PasswordHasher(CHEAP).verify(_stored_hash(config_file, "alice@example.org"), "s3cret")


def test_duplicate_user_is_an_error(config_file: Path) -> None:
    _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="a\n")
    result = _user(config_file, "add", "ALICE@example.org", "--password-stdin", stdin="b\n")
    assert result.exit_code == 1
    assert "already exists" in result.output


def test_empty_password_is_refused(config_file: Path) -> None:
    result = _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="\n")
    assert result.exit_code == 1
    assert "empty password" in result.output
    assert _get(config_file, "alice@example.org") is None


def test_login_that_is_not_an_address_is_refused(config_file: Path) -> None:
    result = _user(config_file, "add", "alice", "--password-stdin", stdin="pw\n")
    assert result.exit_code == 1
    assert "local@domain" in result.output


def test_passwd_changes_the_hash(config_file: Path) -> None:
    _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="old\n")
    result = _user(config_file, "passwd", "alice@example.org", "--password-stdin", stdin="new\n")
    assert result.exit_code == 0, result.output
    assert PasswordHasher(CHEAP).verify(_stored_hash(config_file, "alice@example.org"), "new")


def test_passwd_and_del_of_unknown_user_fail(config_file: Path) -> None:
    passwd = _user(config_file, "passwd", "bob@example.org", "--password-stdin", stdin="x\n")
    delete = _user(config_file, "del", "bob@example.org")
    for result in (passwd, delete):
        assert result.exit_code == 1
        assert "no such user: bob@example.org" in result.output


def test_del_removes_the_user(config_file: Path) -> None:
    _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="pw\n")
    assert _user(config_file, "del", "alice@example.org").exit_code == 0
    assert _user(config_file, "list").output == ""


def test_addresses_and_relaxed_from(config_file: Path) -> None:
    _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="pw\n")
    for address in ("@example.net", "info@example.org"):
        result = _user(config_file, "address", "add", "alice@example.org", address)
        assert result.exit_code == 0, result.output
    assert _user(config_file, "relax-header-from", "alice@example.org", "--on").exit_code == 0
    listing = _user(config_file, "list").output
    assert listing == "alice@example.org\t@example.net, info@example.org  [relaxed header From]\n"
    result = _user(config_file, "address", "del", "alice@example.org", "@example.net")
    assert result.exit_code == 0
    assert _user(config_file, "relax-header-from", "alice@example.org", "--off").exit_code == 0
    assert _user(config_file, "list").output == "alice@example.org\tinfo@example.org\n"


def test_address_errors(config_file: Path) -> None:
    _user(config_file, "add", "alice@example.org", "--password-stdin", stdin="pw\n")
    cases = [
        (("address", "add", "alice@example.org", "not-an-address"), "expected"),
        (("address", "add", "bob@example.org", "x@example.org"), "no such user"),
        (("address", "del", "alice@example.org", "x@example.org"), "has no address"),
    ]
    for args, message in cases:
        result = _user(config_file, *args)
        assert result.exit_code == 1, args
        assert message in result.output


def test_relax_header_from_needs_on_or_off(config_file: Path) -> None:
    result = _user(config_file, "relax-header-from", "alice@example.org")
    assert result.exit_code == 2


def _queue_one(config_file: Path, body: bytes) -> str:
    config = load_config(config_file)

    async def main() -> str:
        store = Queue(config.database_path, config.spool_dir, config.queue)
        writer = store.open_message(new_queue_id())
        writer.write(body)
        envelope = Envelope("a@example.org", [Recipient("b@example.net")])
        await store.commit(writer, envelope, SessionInfo("s1", "192.0.2.1", 4000))
        await store.close()
        return writer.queue_id

    return asyncio.run(main())


def test_queue_list_and_json(config_file: Path) -> None:
    assert _queue(config_file, "list").output == ""
    queue_id = _queue_one(config_file, b"Subject: hi\r\n\r\nbody\r\n")
    first, second = _queue(config_file, "list").output.splitlines()
    assert first.startswith(queue_id) and first.rstrip().endswith("<a@example.org>")
    assert second.split() == ["b@example.net", "pending", "attempts", "0"]
    [entry] = json.loads(_queue(config_file, "list", "--json").output)
    assert entry["id"] == queue_id
    assert [r["address"] for r in entry["recipients"]] == ["b@example.net"]
    assert entry["recipients"][0]["state"] == "pending"
    assert entry["size"] == 21 and entry["state"] == "queued"
    assert entry["created"].endswith("+00:00")


@pytest.mark.parametrize("size", [100, 5000])  # inline and spooled (inline_max 1024)
def test_queue_show_prints_json_then_the_exact_bytes(config_file: Path, size: int) -> None:
    body = b"Subject: hi\r\n\r\n" + bytes(range(256)) * (size // 256)
    queue_id = _queue_one(config_file, body)
    result = _queue(config_file, "show", queue_id)
    assert result.exit_code == 0
    text, _, rest = result.stdout_bytes.partition(b"\n\n")
    assert rest == body
    shown = json.loads(text)
    assert shown["envelope"]["sender"] == "a@example.org"
    assert shown["session"]["client_ip"] == "192.0.2.1"


def test_queue_show_of_unknown_id_fails(config_file: Path) -> None:
    result = _queue(config_file, "show", "NOSUCHID")
    assert result.exit_code == 1
    assert "no such message" in result.output


def _finish(config_file: Path, queue_id: str) -> None:
    """Record every recipient as delivered, as the delivery loop does."""
    with closing(connect(load_config(config_file).database_path)) as conn:
        message = state.load(conn, queue_id)
        assert message is not None
        results = [
            (p, Outcome(p.recipient, Status.DELIVERED, "250 2.0.0 Ok", "2.0.0"))
            for p in message.pending
        ]
        assert state.record(conn, queue_id, results, 1_800_000_000.0, {}, 86400.0).done


@pytest.mark.parametrize("size", [100, 5000])  # inline and spooled (inline_max 1024)
def test_queue_show_and_list_of_a_finished_message(config_file: Path, size: int) -> None:
    queue_id = _queue_one(config_file, b"Subject: hi\r\n\r\n" + b"z" * size)
    _finish(config_file, queue_id)
    result = _queue(config_file, "show", queue_id)
    assert result.exit_code == 0, result.output
    text, _, rest = result.stdout_bytes.partition(b"\n\n")
    assert rest == b""
    shown = json.loads(text)
    assert shown["state"] == "done"
    assert shown["finished"] == "2027-01-15T08:00:00+00:00"
    assert shown["envelope"]["recipients"][0]["address"] == "b@example.net"
    assert "removed after delivery" in result.stderr
    assert json.loads(_queue(config_file, "list", "--json").output) == []
    [entry] = json.loads(_queue(config_file, "list", "--json", "--all").output)
    assert entry["state"] == "done" and entry["finished"] == shown["finished"]
    assert entry["recipients"][0]["state"] == "delivered"
    # Nothing to retry, hold or bounce; delete removes what is left.
    assert "scheduled 0 message(s)" in _queue(config_file, "retry", queue_id).output
    assert _queue(config_file, "hold", queue_id).exit_code == 1
    deleted = _queue(config_file, "delete", queue_id, "--bounce")
    assert deleted.exit_code == 0, deleted.output
    assert json.loads(_queue(config_file, "list", "--json", "--all").output) == []
