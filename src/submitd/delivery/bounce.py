"""`submitd queue delete ID --bounce`: tell the sender before a message is removed."""

from __future__ import annotations

import time
from contextlib import closing

from submitd.config import Config
from submitd.delivery import state
from submitd.delivery.notify import Notifier
from submitd.delivery.types import Outcome, Status
from submitd.store.database import connect
from submitd.store.queue import Queue

DELETED = "deleted from the queue by the administrator"


async def bounce_message(config: Config, queue_id: str) -> None:
    with closing(connect(config.database_path)) as conn:
        message = state.load(conn, queue_id)
        if message is None:
            return
        source = state.stored_message(conn, queue_id, config.database_path.parent)
    queue = Queue(config.database_path, config.spool_dir, config.queue)
    try:
        notifier = Notifier.for_site(config, queue)
        items = [
            (pending, Outcome(pending.recipient, Status.FAILED, DELETED, "5.0.0"))
            for pending in message.pending
        ]
        await notifier.bounce(message, source, items, time.time())
    finally:
        await queue.close()
