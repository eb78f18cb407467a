"""What the scheduler hands a route, and what a route answers, per recipient.

A route (smarthost, MX, LMTP) takes one message for one next hop and some of its
recipients, and says for each recipient what happened. It never touches the queue: the
scheduler records outcomes, decides retries and bounces (DESIGN principle 6).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from submitd.envelope import Envelope, Recipient


class Status(Enum):
    DELIVERED = "delivered"  # 2xx from the next hop
    DEFERRED = "deferred"  # 4xx, connection/TLS failure, DNS timeout: try again later
    FAILED = "failed"  # 5xx, or a permanent local reason (null MX, no SMTPUTF8, too big)


@dataclass(frozen=True, slots=True)
class Outcome:
    recipient: Recipient
    status: Status
    reply: str  # the next hop's reply ("250 2.0.0 Ok") or our own diagnosis
    enhanced: str  # RFC 3463 status code, "2.0.0", "4.4.1", "5.1.1", ...
    remote_mta: str | None = None  # the host that answered (name or [address])
    dsn_relayed: bool = False  # delivered to a hop that did not offer DSN (RFC 3461 "relayed")
    final: bool = False  # final delivery (LMTP): our "delivered" notice is the only one


class MessageSource(Protocol):
    """The stored message, read in pieces (a spooled body is never whole in memory)."""

    @property
    def size(self) -> int: ...

    @property
    def in_memory(self) -> bool:
        """True when `chunks` reads no file: iterate it on the event loop, no thread."""
        ...

    def chunks(self) -> Iterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class Job:
    """One message and the recipients of it that this route should deliver now."""

    queue_id: str
    envelope: Envelope  # sender, BODY, SMTPUTF8, RET, ENVID (recipients: see below)
    recipients: tuple[Recipient, ...]  # only the pending ones for this route
    message: MessageSource


class Route(Protocol):
    async def deliver(self, job: Job) -> list[Outcome]:
        """One outcome per recipient of the job, in the same order. Never raises for
        a delivery problem: a failure to connect is a DEFERRED outcome per recipient."""
        ...

    async def close(self) -> None: ...
