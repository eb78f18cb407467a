"""`submitd queue ...`: look at what the server has accepted and not yet delivered.

Read-only, and safe while the server runs: the database is in WAL mode, so these
readers neither wait for the queue writer nor delay it. `queue show` prints the
message bytes exactly as stored (no decoding), so what an administrator sees is what
will be delivered; --json output is for scripts and monitoring.
"""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from submitd.cli.common import config_option, load_or_exit
from submitd.store.database import connect
from submitd.store.queue import (
    QueuedMessage,
    QueueSummary,
    get_message,
    list_queue,
    read_message_bytes,
)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _summary_json(entry: QueueSummary) -> dict[str, Any]:
    data = asdict(entry)
    data["created"] = _iso(entry.created)
    data["recipients"] = list(entry.recipients)
    return data


def _summary_line(entry: QueueSummary) -> str:
    sender = f"<{entry.sender}>"  # <> is the null sender (RFC 5321 4.5.5)
    columns = (entry.id, _iso(entry.created), f"{entry.size:>9}", f"{entry.state:<8}", sender)
    return "  ".join((*columns, ",".join(entry.recipients)))


@click.group()
def queue() -> None:
    """Inspect the queue of accepted messages."""


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@config_option
def list_messages(as_json: bool, config_path: Path | None) -> None:
    """List queued messages: id, created (UTC), size, state, sender, recipients."""
    config = load_or_exit(config_path)
    with closing(connect(config.database_path)) as conn:
        entries = list_queue(conn)
    if as_json:
        click.echo(json.dumps([_summary_json(entry) for entry in entries], indent=2))
        return
    for entry in entries:
        click.echo(_summary_line(entry))


def _message_json(message: QueuedMessage) -> str:
    data = {
        "id": message.id,
        "created": _iso(message.created),
        "state": message.state,
        "size": message.size,
        "envelope": message.envelope.to_json(),
        "session": asdict(message.session),
    }
    return json.dumps(data, indent=2)


@queue.command("show")
@click.argument("queue_id")
@config_option
def show_message(queue_id: str, config_path: Path | None) -> None:
    """Print the envelope and session as JSON, a blank line, then the message bytes."""
    config = load_or_exit(config_path)
    with closing(connect(config.database_path)) as conn:
        message = get_message(conn, queue_id)
        if message is None:
            raise click.ClickException(f"no such message: {queue_id}")
        body = read_message_bytes(conn, queue_id)
    click.echo(_message_json(message) + "\n")
    click.echo(body, nl=False)
