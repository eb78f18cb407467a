"""What every command shares: the --config option and turning it into a Config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from submitd.config import Config, ConfigError, load_config

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    """Adds `--config FILE` to a command; without it the documented defaults apply."""
    option = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="TOML configuration file (default: built-in defaults, data in ./submitd-data).",
    )
    return option(func)


def load_or_exit(config_path: Path | None) -> Config:
    """The validated configuration, or exit 2 with the message that names the bad key."""
    try:
        return load_config(config_path)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
