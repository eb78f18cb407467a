"""The `submitd` command line. Each command group lives in a module of its own."""

from __future__ import annotations

import os

from submitd.tls import OPENSSL_CONF_PATH

# First, before anything imports ssl: OpenSSL reads its configuration once (see submitd.tls).
os.environ.setdefault("OPENSSL_CONF", OPENSSL_CONF_PATH)

import click

from submitd.cli.common import config_option
from submitd.cli.dkim import dkim
from submitd.cli.queue import queue
from submitd.cli.serve import check_config, serve
from submitd.cli.users import user


@click.group()
@click.version_option(package_name="submitd")
def cli() -> None:
    """submitd: a mail submission server (RFC 6409)."""


cli.add_command(serve)
cli.add_command(check_config)
cli.add_command(user)
cli.add_command(queue)
cli.add_command(dkim)


def main() -> None:
    cli()


__all__ = ["cli", "config_option", "main"]
