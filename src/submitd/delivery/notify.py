"""Delivery status notifications to the sender (RFC 3461, RFC 3464), after an attempt.

Which ones: recipients that failed for good (NOTIFY absent or naming FAILURE), a
"delayed" notice once per message after `delay_notice` while recipients are still
pending (NOTIFY absent or naming DELAY: RFC 3461 4.1 lets an absent NOTIFY mean
FAILURE,DELAY, which is what a person waiting for an answer wants), and "delivered" (final
delivery over LMTP) or "relayed" (a next hop without DSN) for NOTIFY=SUCCESS; a next hop
that offers DSN is handed NOTIFY and reports success itself (RFC 3461 5.2.2). Never for
NOTIFY=NEVER, and never for a message from the null sender (RFC 5321 4.5.5: no
notification about a notification). Each notice is queued like any message, from <> to
the envelope sender.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from submitd.config import Config
from submitd.delivery.state import LeasedMessage, PendingRecipient, Recorded, StoredMessage
from submitd.delivery.types import Outcome
from submitd.envelope import Envelope, Recipient, SessionInfo
from submitd.message.dsn import RecipientReport, build_dsn
from submitd.store.queue import Queue, new_queue_id

log = logging.getLogger("submitd.delivery")

RETURN_FULL_MAX = 2 * 1024 * 1024  # larger originals come back as headers only


def _wants(recipient: Recipient, kind: str) -> bool:
    notify = recipient.notify
    if notify is None:
        return kind in ("FAILURE", "DELAY")
    return kind in notify


@dataclass(slots=True)
class Notifier:
    queue: Queue
    hostname: str
    delay_notice: float
    lifetime: float
    wake: Callable[[], None]

    @classmethod
    def for_site(cls, config: Config, queue: Queue) -> Notifier:
        """The site's notifier; `wake` is set by whoever delivers what it queues."""
        delivery = config.delivery
        return cls(queue, config.hostname, delivery.delay_notice, delivery.lifetime, lambda: None)

    async def after_attempt(
        self, message: LeasedMessage, recorded: Recorded, source: StoredMessage, now: float
    ) -> bool:
        """Queue the notices this attempt calls for; True if a delay notice was sent."""
        if message.envelope.sender == "":
            return False
        failed = [p for p in recorded.failed if _wants(p[0].recipient, "FAILURE")]
        # RFC 3461 5.2.2: a hop that offers DSN got NOTIFY passed on and reports success
        # itself; we report it for final delivery (LMTP) or a hop without DSN ("relayed").
        succeeded = [
            p
            for p in recorded.delivered
            if _wants(p[0].recipient, "SUCCESS") and (p[1].final or p[1].dsn_relayed)
        ]
        if failed:
            await self._send(message, source, failed, "failed", now)
        if succeeded:
            await self._send(message, source, succeeded, "delivered", now)
        delayed = [p for p in recorded.deferred if _wants(p[0].recipient, "DELAY")]
        late = now - message.created >= self.delay_notice
        if delayed and late and not message.delay_notified:
            await self._send(message, source, delayed, "delayed", now)
            return True
        return False

    async def bounce(
        self,
        message: LeasedMessage,
        source: StoredMessage,
        items: list[tuple[PendingRecipient, Outcome]],
        now: float,
    ) -> None:
        """A failure notice whatever NOTIFY says (the administrator asked for it)."""
        if message.envelope.sender != "" and items:
            await self._send(message, source, items, "failed", now)

    async def _send(
        self,
        message: LeasedMessage,
        source: StoredMessage,
        items: list[tuple[PendingRecipient, Outcome]],
        action: str,
        now: float,
    ) -> None:
        reports = [
            self._report(pending, outcome, action, now, message) for pending, outcome in items
        ]
        full = source.size <= RETURN_FULL_MAX and message.envelope.ret != "HDRS"
        dsn = build_dsn(
            reporting_mta=self.hostname,
            postmaster=f"postmaster@{self.hostname}",
            envelope=message.envelope,
            queue_id=message.queue_id,
            arrival=message.created,
            now=now,
            reports=reports,
            original_header=_header_of(source.chunks()),
            original=source.chunks() if full else None,
            message_id_domain=self.hostname,
        )
        queue_id = new_queue_id()
        writer = self.queue.open_message(queue_id)
        writer.write(dsn.message)
        envelope = Envelope(
            sender="",
            recipients=[Recipient(message.envelope.sender, ("NEVER",))],
            body="8BITMIME" if dsn.eight_bit else "7BIT",
            smtputf8=dsn.smtputf8,
        )
        info = SessionInfo(
            session_id=f"dsn.{message.queue_id}", client_ip="127.0.0.1", client_port=0
        )
        await self.queue.commit(writer, envelope, info)
        log.info(
            "queue=%s notice=%s to=<%s> as %s",
            message.queue_id,
            action,
            message.envelope.sender,
            queue_id,
        )
        self.wake()

    def _report(
        self,
        pending: PendingRecipient,
        outcome: Outcome,
        action: str,
        now: float,
        message: LeasedMessage,
    ) -> RecipientReport:
        if action == "delivered" and outcome.dsn_relayed:
            action = "relayed"  # RFC 3464 2.3.3: the next hop offers no DSN
        diagnostic = outcome.reply if outcome.remote_mta else None
        return RecipientReport(
            recipient=pending.recipient,
            action=action,
            status=outcome.enhanced,
            diagnostic=diagnostic,
            remote_mta=outcome.remote_mta,
            last_attempt=now,
            will_retry_until=message.created + self.lifetime if action == "delayed" else None,
        )


def _header_of(chunks: Iterable[bytes]) -> bytes:
    """The original's header section (up to the blank line), read only as far as needed."""
    seen = b""
    for chunk in chunks:
        seen += chunk
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            return seen[: end + 2]
        if len(seen) > 1 << 20:
            break
    return seen
