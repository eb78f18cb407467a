"""`submitd user ...`: the administrator's view of users and their sender addresses.

DESIGN principle 3: a user may send only as the addresses given here (RFC 6409 6.1).
Passwords are never taken as command arguments, which would leave them in the shell
history and in `ps`: they are prompted for twice with echo off, or read from one line of
standard input with --password-stdin for scripts. The commands write the database
directly, and a running server notices within a second through the credentials
generation (see submitd.auth.passwords), so no restart or signal is needed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import click

from submitd.auth.passwords import PasswordHasher
from submitd.cli.common import config_option, load_or_exit
from submitd.config import Config
from submitd.store.database import connect
from submitd.store.users import (
    UnknownAddress,
    UnknownUser,
    UserExists,
    UserStore,
    check_address,
)


@contextmanager
def _open_store(config: Config) -> Iterator[UserStore]:
    """The user store, with the store's errors turned into one-line messages (exit 1)."""
    with closing(connect(config.database_path)) as conn:
        try:
            yield UserStore(conn)
        except UserExists as error:
            raise click.ClickException(f"user {error} already exists") from None
        except UnknownUser as error:
            raise click.ClickException(f"no such user: {error}") from None
        except (UnknownAddress, ValueError) as error:
            raise click.ClickException(str(error.args[0])) from None
        except sqlite3.Error as error:
            raise click.ClickException(f"{config.database_path}: {error}") from None


def _read_password(from_stdin: bool) -> str:
    """One line of stdin (only the line ending removed), or asked twice with echo off."""
    if from_stdin:
        line = click.get_text_stream("stdin").readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("empty password refused")
    return str(password)


_password_stdin = click.option(
    "--password-stdin", is_flag=True, help="Read the password from one line of standard input."
)


@click.group()
def user() -> None:
    """Manage users and the addresses they may send as."""


@user.command("add")
@click.argument("login")
@_password_stdin
@config_option
def add_user(login: str, password_stdin: bool, config_path: Path | None) -> None:
    """Add a user whose login is the email address LOGIN."""
    config = load_or_exit(config_path)
    with _open_store(config) as store:
        check_address(login, allow_domain=False)  # before asking for a password
        if store.get(login) is not None:
            raise UserExists(login)
        password_hash = PasswordHasher(config.auth).hash(_read_password(password_stdin))
        store.add(login, password_hash)
    click.echo(f"added {login}")


@user.command("list")
@config_option
def list_users(config_path: Path | None) -> None:
    """Show each login and the further addresses it may send as."""
    with _open_store(load_or_exit(config_path)) as store:
        for account in store.list():
            flags = "  [relaxed header From]" if account.relaxed_header_from else ""
            addresses = ", ".join(account.addresses) or "-"
            click.echo(f"{account.login}\t{addresses}{flags}")


@user.command("passwd")
@click.argument("login")
@_password_stdin
@config_option
def change_password(login: str, password_stdin: bool, config_path: Path | None) -> None:
    """Set a new password for LOGIN; cached logins with the old one stop working."""
    config = load_or_exit(config_path)
    with _open_store(config) as store:
        if store.get(login) is None:
            raise UnknownUser(login)  # before asking for a password that would be lost
        password_hash = PasswordHasher(config.auth).hash(_read_password(password_stdin))
        store.set_password(login, password_hash)
    click.echo(f"password changed for {login}")


@user.command("del")
@click.argument("login")
@config_option
def delete_user(login: str, config_path: Path | None) -> None:
    """Delete LOGIN and its addresses (queued mail stays queued)."""
    with _open_store(load_or_exit(config_path)) as store:
        store.delete(login)
    click.echo(f"deleted {login}")


@user.group("address")
def address() -> None:
    """Addresses a user may send as: x@example.org, or @example.org for a whole domain."""


@address.command("add")
@click.argument("login")
@click.argument("sender")
@config_option
def add_address(login: str, sender: str, config_path: Path | None) -> None:
    """Allow LOGIN to send as SENDER."""
    with _open_store(load_or_exit(config_path)) as store:
        store.add_address(login, sender)
    click.echo(f"{login} may send as {sender}")


@address.command("del")
@click.argument("login")
@click.argument("sender")
@config_option
def delete_address(login: str, sender: str, config_path: Path | None) -> None:
    """Stop LOGIN from sending as SENDER."""
    with _open_store(load_or_exit(config_path)) as store:
        store.del_address(login, sender)
    click.echo(f"{login} may no longer send as {sender}")


@user.command("relax-header-from")
@click.argument("login")
@click.option("--on/--off", "relaxed", default=None, help="Allow any header From, or not.")
@config_option
def relax_header_from(login: str, relaxed: bool | None, config_path: Path | None) -> None:
    """Let LOGIN put any address in the From header field (the envelope stays checked).

    For mailing-list software and forms that send on behalf of others.
    """
    if relaxed is None:
        raise click.UsageError("say --on or --off")
    with _open_store(load_or_exit(config_path)) as store:
        store.set_relaxed_header_from(login, relaxed)
    click.echo(f"{login}: relaxed header From {'on' if relaxed else 'off'}")
