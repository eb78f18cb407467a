"""`submitd serve` and `submitd check-config`."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import click

from submitd.auth.passwords import PasswordHasher
from submitd.cli.common import config_option, load_or_exit
from submitd.config import Config, dev_config
from submitd.observe.logging import configure_logging
from submitd.runtime import install_event_loop_policy, tune_allocator
from submitd.server import serve as run_server
from submitd.store.database import connect
from submitd.store.users import UserStore

DEV_USER = "dev@example.test"


@click.command()
@config_option
@click.option("--dev", is_flag=True, help="Zero set-up mode: loopback ports 2587/2465, a dev user.")
def serve(config_path: Path | None, dev: bool) -> None:
    """Accept submissions until SIGTERM."""
    if dev and config_path is not None:
        raise click.UsageError("--dev and --config exclude each other")
    config = dev_config() if dev else load_or_exit(config_path)
    configure_logging(config.log.level, config.log.per_client_lines_per_minute)
    if dev:
        ensure_dev_user(config)
    tune_allocator()
    install_event_loop_policy()
    asyncio.run(run_server(config, config_path=config_path))


def ensure_dev_user(config: Config) -> None:
    """Create dev@example.test with a random password, printed once and kept 0600."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    password_file = config.data_dir / "dev-password"
    conn = connect(config.database_path)
    try:
        users = UserStore(conn)
        if users.get(DEV_USER) is None:
            password = secrets.token_urlsafe(12)
            users.add(DEV_USER, PasswordHasher(config.auth).hash(password))
            descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(password + "\n")
            click.echo(f"dev user: {DEV_USER}  password: {password}")
        else:
            click.echo(f"dev user: {DEV_USER}  password: in {password_file}")
    finally:
        conn.close()
    click.echo("submission (STARTTLS) on 127.0.0.1:2587, submissions (TLS) on 127.0.0.1:2465")


@click.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration file and exit 0 if it would start."""
    config = load_or_exit(config_path)
    click.echo(f"configuration ok: hostname {config.hostname}, data in {config.data_dir}")
