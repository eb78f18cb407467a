"""`submitd queue ...`: look at and manage what the server has accepted.

Safe while the server runs: the database is in WAL mode, readers neither wait for the
queue writer nor delay it, and every change (retry, hold, release, delete) is one short
transaction that the delivery loop sees at its next poll (a second at most). A message
being delivered at that moment finishes its attempt; its outcome is recorded only for
recipients still pending, and a deleted message's outcome is dropped. `queue show` prints the
message bytes exactly as stored (no decoding), so what an administrator sees is what
will be delivered; --json output is for scripts and monitoring.

A finished message (state `done`) has no content any more: it was dropped when the last
recipient was settled. Its envelope and outcomes stay listed (`list --all`, `show`) for
`[queue] keep_finished` seconds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from submitd.cli.common import config_option, load_or_exit
from submitd.delivery.bounce import bounce_message
from submitd.delivery.state import delete, finished_at, recipient_states, retry_now, set_state
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


def _recipients(conn: sqlite3.Connection, entry: QueueSummary) -> list[dict[str, Any]]:
    """Per-recipient delivery state; before the first attempt every one is pending."""
    states = recipient_states(conn, entry.id)
    if not states:
        return [
            {
                "address": a,
                "state": "pending",
                "attempts": 0,
                "next_attempt": None,
                "last_reply": None,
            }
            for a in entry.recipients
        ]
    return [
        {
            "address": item.address,
            "state": item.state,
            "attempts": item.attempts,
            "next_attempt": _iso(item.next_attempt) if item.state == "pending" else None,
            "last_reply": item.last_reply,
            "status": item.enhanced,
        }
        for item in states
    ]


def _finished_iso(conn: sqlite3.Connection, queue_id: str) -> str | None:
    finished = finished_at(conn, queue_id)
    return None if finished is None else _iso(finished)


def _summary_json(conn: sqlite3.Connection, entry: QueueSummary) -> dict[str, Any]:
    data = asdict(entry)
    data["created"] = _iso(entry.created)
    data["finished"] = _finished_iso(conn, entry.id) if entry.state == "done" else None
    data["recipients"] = _recipients(conn, entry)
    return data


def _summary_lines(conn: sqlite3.Connection, entry: QueueSummary) -> list[str]:
    sender = f"<{entry.sender}>"  # <> is the null sender (RFC 5321 4.5.5)
    columns = (entry.id, _iso(entry.created), f"{entry.size:>9}", f"{entry.state:<8}", sender)
    lines = ["  ".join(columns)]
    for item in _recipients(conn, entry):
        when = f" next {item['next_attempt']}" if item["next_attempt"] else ""
        reply = f"  {item['last_reply']}" if item["last_reply"] else ""
        lines.append(
            f"    {item['address']}  {item['state']}  attempts {item['attempts']}{when}{reply}"
        )
    return lines


@click.group()
def queue() -> None:
    """Inspect the queue of accepted messages."""


@queue.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@click.option("--all", "show_all", is_flag=True, help="Include messages already done.")
@config_option
def list_messages(as_json: bool, show_all: bool, config_path: Path | None) -> None:
    """Messages with their recipients: state, attempts, next attempt, last reply."""
    config = load_or_exit(config_path)
    with closing(connect(config.database_path)) as conn:
        entries = [e for e in list_queue(conn) if show_all or e.state != "done"]
        if as_json:
            click.echo(json.dumps([_summary_json(conn, e) for e in entries], indent=2))
            return
        for entry in entries:
            click.echo("\n".join(_summary_lines(conn, entry)))


@queue.command("retry")
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
@config_option
def retry(queue_id: str | None, every: bool, config_path: Path | None) -> None:
    """Try the pending recipients of a message (or of all) now."""
    if every == (queue_id is not None):
        raise click.UsageError("give a queue id or --all")
    config = load_or_exit(config_path)
    with closing(connect(config.database_path)) as conn:
        if queue_id is not None and get_message(conn, queue_id) is None:
            raise click.ClickException(f"no such message: {queue_id}")
        count = retry_now(conn, queue_id)
    click.echo(f"scheduled {count} message(s) for now")


def _change_state(queue_id: str, new_state: str, config_path: Path | None) -> None:
    config = load_or_exit(config_path)
    with closing(connect(config.database_path)) as conn:
        if not set_state(conn, queue_id, new_state):
            raise click.ClickException(f"no such queued or held message: {queue_id}")
    click.echo(f"{queue_id}: {new_state}")


@queue.command("hold")
@click.argument("queue_id")
@config_option
def hold(queue_id: str, config_path: Path | None) -> None:
    """Keep a message from being delivered until `release`."""
    _change_state(queue_id, "held", config_path)


@queue.command("release")
@click.argument("queue_id")
@config_option
def release(queue_id: str, config_path: Path | None) -> None:
    """Let a held message be delivered again."""
    _change_state(queue_id, "queued", config_path)


@queue.command("delete")
@click.argument("queue_id")
@click.option("--bounce", is_flag=True, help="Tell the sender (a DSN for pending recipients).")
@config_option
def delete_message(queue_id: str, bounce: bool, config_path: Path | None) -> None:
    """Remove a message from the queue, optionally bouncing it to its sender."""
    config = load_or_exit(config_path)
    bounced = bounce
    if bounce:
        try:
            asyncio.run(bounce_message(config, queue_id))
        except FileNotFoundError:
            # Its last recipient was settled meanwhile and its spool file removed: the
            # outcomes are recorded and the sender notified as NOTIFY asked.
            bounced = False
            click.echo(f"{queue_id}: finished meanwhile; no bounce sent", err=True)
    with closing(connect(config.database_path)) as conn:
        if not delete(conn, queue_id, config.database_path.parent):
            raise click.ClickException(f"no such message: {queue_id}")
    click.echo(f"{queue_id}: deleted" + (" and bounced" if bounced else ""))


def _message_json(message: QueuedMessage, finished: str | None) -> str:
    data = {
        "id": message.id,
        "created": _iso(message.created),
        "state": message.state,
        "finished": finished,
        "size": message.size,
        "envelope": message.envelope.to_json(),
        "session": asdict(message.session),
    }
    return json.dumps(data, indent=2)


@queue.command("show")
@click.argument("queue_id")
@config_option
def show_message(queue_id: str, config_path: Path | None) -> None:
    """Print the envelope and session as JSON, a blank line, then the message bytes
    (none for a finished message: its content was removed after delivery)."""
    config = load_or_exit(config_path)
    with closing(connect(config.database_path)) as conn:
        message, body = _message_and_bytes(conn, queue_id)
        finished = _finished_iso(conn, queue_id) if body is None else None
    click.echo(_message_json(message, finished) + "\n")
    if body is None:
        click.echo(f"{queue_id}: the content was removed after delivery", err=True)
        return
    click.echo(body, nl=False)


def _message_and_bytes(
    conn: sqlite3.Connection, queue_id: str
) -> tuple[QueuedMessage, bytes | None]:
    """The message and its bytes; None for the bytes of a finished message.

    A second look if the spool file vanished between reading the row and the file: the
    message finished in between (its file goes right after), or was deleted.
    """
    for _ in range(2):
        message = get_message(conn, queue_id)
        if message is None:
            raise click.ClickException(f"no such message: {queue_id}")
        if message.state == "done":
            return message, None
        try:
            return message, read_message_bytes(conn, queue_id)
        except FileNotFoundError:
            continue
    raise click.ClickException(f"{queue_id}: the stored content is missing")
