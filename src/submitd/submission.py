"""The seam between the protocol and everything else: one message, start to finish.

The SMTP session knows only SMTP; the storage knows only rows and files. This module is
the one place that knows the stages in order:

1. authenticate a login (argon2 in a thread, with a short cache);
2. judge the envelope sender (RFC 6409 6.1) through the `Principal` handed to the session;
3. stream the content to the spool, behind a Received field;
4. at the end, judge the From: header against the user's addresses (RFC 6409 6.1);
5. commit the message and envelope durably, and only then answer 250.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from submitd.auth.passwords import CredentialVerifier
from submitd.envelope import Envelope, SessionInfo
from submitd.message.headers import addresses, field_values, header_section
from submitd.message.received import received_field
from submitd.smtp import replies as R
from submitd.smtp.replies import Reply
from submitd.store.queue import Queue, SpoolWriter, StorageFull, new_queue_id
from submitd.store.users import User, may_send_as

log = logging.getLogger("submitd.submission")

_HEADER_FROM_NOT_OWNED = R.reply(
    550, "5.7.1", "From: header address not owned by the authenticated user"
)


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """The `Principal` of an authenticated session: judges addresses for the session."""

    user: User

    @property
    def login(self) -> str:
        return self.user.login

    def check_sender(self, address: str) -> Reply | None:
        return None if may_send_as(self.user, address) else R.SENDER_NOT_OWNED

    def check_recipient(self, address: str) -> Reply | None:
        return None


@dataclass(slots=True)
class Draft:
    """A message being received: its envelope, where its octets go, and who sent it."""

    envelope: Envelope
    writer: SpoolWriter

    @property
    def queue_id(self) -> str:
        return self.writer.queue_id


class Submission:
    def __init__(self, hostname: str, verifier: CredentialVerifier, queue: Queue) -> None:
        self.hostname = hostname
        self.verifier = verifier
        self.queue = queue

    async def authenticate(self, login: str, password: str) -> AuthenticatedUser | None:
        user = await self.verifier.verify(login, password)
        return None if user is None else AuthenticatedUser(user)

    def begin(self, envelope: Envelope, info: SessionInfo) -> Draft:
        queue_id = new_queue_id()
        writer = self.queue.open_message(queue_id)
        trace = received_field(
            info,
            hostname=self.hostname,
            queue_id=queue_id,
            smtputf8=envelope.smtputf8,
            now=time.time(),
        )
        writer.write(trace)
        return Draft(envelope, writer)

    async def finish(self, draft: Draft, principal: AuthenticatedUser, info: SessionInfo) -> Reply:
        """Judge the content, then commit; the reply is what the client is told."""
        refusal = self._check_header_from(draft, principal.user)
        if refusal is not None:
            draft.writer.abort()
            log.info("session=%s rejected: %s %s", info.session_id, refusal.code, refusal.text)
            return refusal
        try:
            await self.queue.commit(draft.writer, draft.envelope, info)
        except StorageFull:
            log.error("session=%s queue=%s: storage full", info.session_id, draft.queue_id)
            return R.NO_SPACE
        except Exception:
            log.exception("session=%s queue=%s: commit failed", info.session_id, draft.queue_id)
            return R.LOCAL_ERROR
        log.info(
            "session=%s queue=%s accepted from=<%s> rcpts=%d size=%d",
            info.session_id,
            draft.queue_id,
            draft.envelope.sender,
            len(draft.envelope.recipients),
            draft.writer.size,
        )
        return R.reply(250, "2.0.0", f"Ok: queued as {draft.queue_id}")

    def _check_header_from(self, draft: Draft, user: User) -> Reply | None:
        """RFC 6409 6.1: the From: header must name the user's own addresses."""
        if user.relaxed_header_from:
            return None
        header = header_section(draft.writer.head())
        for address in addresses(field_values(header, "From")):
            if not may_send_as(user, address):
                return _HEADER_FROM_NOT_OWNED
        return None
