"""`submitd dkim ...`: make DKIM keys and print the DNS records that publish them.

A key is written where the server looks for it by default,
`<data_dir>/dkim/<domain>/<selector>.key`, as unencrypted PEM PKCS#8 with mode 0600: the
server must read it without a passphrase at start-up, and nobody else may. The file is
written to a temporary name, flushed and renamed, so a crash never leaves half a key, and
an existing key is never overwritten without --force: replacing a published key breaks
every signature made with it until DNS is updated (RFC 6376 3.6.2.1).

The record is printed on standard output as a master-file line, cut into strings of at
most 255 octets (RFC 1035 3.3.14; RFC 6376 3.6.2.2 joins them again).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from submitd.cli.common import config_option, load_or_exit
from submitd.message.dkim import (
    SigningKey,
    algorithm_of,
    dns_name,
    generate_key,
    load_signing_key,
    private_key_pem,
    zone_line,
)


def _names(domain: str, selector: str) -> tuple[str, str]:
    """Domain and selector in the A-label form used in d=, s= and the file path."""
    try:
        return dns_name(domain, "domain"), dns_name(selector, "selector")
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _key_path(out_dir: Path | None, config_path: Path | None, domain: str, selector: str) -> Path:
    """--out-dir/<selector>.key, or the default place under the configured data_dir."""
    if out_dir is None:
        out_dir = load_or_exit(config_path).data_dir / "dkim" / domain
    return out_dir / f"{selector}.key"


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """Write `data` to `path` with mode 0600 from creation on, atomically."""
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; use --force to replace the key")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@click.group()
def dkim() -> None:
    """DKIM signing keys (RFC 6376, RFC 8463)."""


@dkim.command()
@click.argument("domain")
@click.option(
    "--selector",
    "-s",
    required=True,
    help="Selector: the key is published at <selector>._domainkey.<domain>.",
)
@click.option(
    "--type",
    "key_type",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="rsa (2048 bits, verified everywhere) or ed25519 "
    "(RFC 8463; not every verifier knows it, so sign with both).",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Directory for <selector>.key (default: <data_dir>/dkim/<domain>).",
)
@click.option("--force", is_flag=True, help="Replace an existing key file.")
@config_option
def keygen(
    domain: str,
    selector: str,
    key_type: str,
    out_dir: Path | None,
    force: bool,
    config_path: Path | None,
) -> None:
    """Make a key for DOMAIN and print the TXT record to publish."""
    domain, selector = _names(domain, selector)
    path = _key_path(out_dir, config_path, domain, selector)
    private_key = generate_key(key_type)
    _write_private(path, private_key_pem(private_key), force=force)
    key = SigningKey(domain, selector, algorithm_of(private_key), private_key)
    click.echo(f"wrote {path}; publish this record:", err=True)
    click.echo(zone_line(key))


@dkim.command()
@click.argument("domain")
@click.option("--selector", "-s", required=True, help="Selector of the key.")
@click.option(
    "--key",
    "key_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Key file (default: <data_dir>/dkim/<domain>/<selector>.key).",
)
@config_option
def record(domain: str, selector: str, key_file: Path | None, config_path: Path | None) -> None:
    """Print the TXT record for an existing key again."""
    domain, selector = _names(domain, selector)
    path = key_file or _key_path(None, config_path, domain, selector)
    try:
        key = load_signing_key(path, domain, selector)
    except OSError as error:
        raise click.ClickException(f"{path}: {error.strerror}") from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(zone_line(key))


__all__ = ["dkim"]
