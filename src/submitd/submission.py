"""The seam between the protocol and everything else: one message, start to finish.

The SMTP session knows only SMTP; the storage knows only rows and files. This module is
the one place that knows the stages in order:

1. authenticate a login (argon2 in a thread, with a short cache);
2. judge MAIL and RCPT for that user: sender rights (RFC 6409 6.1), rate and recipient
   limits (6.2, 6.3), through the `Principal` handed to the session;
3. stream the content: the header is cleaned up (section 8) before it reaches the
   spool, the body passes through untouched;
4. at the end: From: rights, 8-bit rules, the per-user size, then DKIM signing;
5. commit message and envelope durably, with the trace and signatures on top, and
   only then answer 250.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from submitd.auth.passwords import CredentialVerifier
from submitd.config import Config
from submitd.envelope import Envelope, Recipient, SessionInfo
from submitd.message.cleanup import (
    CleanupContext,
    CleanupRejection,
    CleanupSettings,
    clean_header,
    rewrite_address,
)
from submitd.message.dkim import SigningKey, load_signing_key, sign
from submitd.message.draft import Draft, Rejection
from submitd.message.received import received_field
from submitd.message.repair import RepairImpossible, repair_8bit
from submitd.policy.limits import RateLimiter, RejectionLog
from submitd.smtp import replies as R
from submitd.smtp.replies import Reply
from submitd.store.queue import Queue, StorageFull, new_queue_id
from submitd.store.users import User, may_send_as

log = logging.getLogger("submitd.submission")

_INLINE_SIGNING_MAX = 64 * 1024  # sign smaller messages on the loop, larger in a thread


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """The `Principal` of an authenticated session: judges its MAIL and RCPT."""

    user: User
    limiter: RateLimiter
    rejections: RejectionLog

    @property
    def login(self) -> str:
        return self.user.login

    def check_mail(self, sender: str, declared_size: int | None) -> Reply | None:
        refusal = None if may_send_as(self.user, sender) else R.SENDER_NOT_OWNED
        now = time.time()
        if refusal is None and declared_size is not None:
            refusal = self.limiter.check_size(self.login, declared_size)
        if refusal is None:
            refusal = self.limiter.check_message(self.login, now)
        return self._logged("mail", refusal, now)

    def check_recipient(self, address: str, accepted: int) -> Reply | None:
        now = time.time()
        refusal = self.limiter.check_recipient(self.login, address, accepted, now)
        return self._logged("rcpt", refusal, now)

    def _logged(self, rule: str, refusal: Reply | None, now: float) -> Reply | None:
        if refusal is not None:
            self.rejections.log(self.login, rule, refusal, now)  # RFC 6409 5.2
        return refusal


class Submission:
    def __init__(
        self,
        config: Config,
        verifier: CredentialVerifier,
        queue: Queue,
        limiter: RateLimiter,
    ) -> None:
        self.config = config
        self.hostname = config.hostname
        self.verifier = verifier
        self.queue = queue
        self.limiter = limiter
        self.rejections = RejectionLog(config.policy.rejection_log_per_minute)
        self.cleanup = _cleanup_settings(config)
        self.keys = _signing_keys(config)
        self._unsigned_domains: set[str] = set()
        self.on_commit: Callable[[], None] = lambda: None  # wakes the delivery loop

    def reload(self, config: Config) -> None:
        """SIGHUP: new cleanup and DKIM settings (keys are loaded first: a bad key raises
        before anything changes)."""
        keys = _signing_keys(config)
        self.config = config
        self.cleanup = _cleanup_settings(config)
        self.keys = keys
        self._unsigned_domains.clear()

    async def authenticate(self, login: str, password: str) -> AuthenticatedUser | None:
        user = await self.verifier.verify(login, password)
        if user is None:
            return None
        return AuthenticatedUser(user, self.limiter, self.rejections)

    def begin(self, envelope: Envelope, principal: AuthenticatedUser) -> Draft:
        queue_id = new_queue_id()
        context = CleanupContext(
            login=principal.login,
            owns=lambda address: may_send_as(principal.user, address),
            is_local_user=self.verifier.is_user,
            smtputf8=envelope.smtputf8,
            now=time.time(),
            unique=queue_id,
        )

        def clean(header: bytes) -> bytes:
            try:
                return clean_header(header, context, self.cleanup).header
            except CleanupRejection as rejection:
                raise Rejection(rejection.reply) from None

        return Draft(
            envelope,
            self.queue.open_message(queue_id),
            clean,
            self.config.cleanup.max_header_size,
        )

    async def finish(self, draft: Draft, principal: AuthenticatedUser, info: SessionInfo) -> Reply:
        """Judge the content, sign it, commit it; the reply is what the client is told."""
        refusal = draft.finish() or await self._repair(draft)
        refusal = refusal or self._check_content(draft, principal)
        if refusal is not None:
            draft.abort()
            self.rejections.log(principal.login, "content", refusal, time.time())
            return refusal
        envelope = self._rewritten(draft.envelope)
        try:
            signatures = await self._signatures(draft)
            trace = received_field(
                info,
                hostname=self.hostname,
                queue_id=draft.queue_id,
                smtputf8=envelope.smtputf8,
                now=time.time(),
                private=self.config.cleanup.received_privacy,
            )
            await self.queue.commit(draft.writer, envelope, info, prefix=trace + signatures)
        except StorageFull:
            log.error("session=%s queue=%s: storage full", info.session_id, draft.queue_id)
            draft.abort()
            return R.NO_SPACE
        except Exception:
            log.exception("session=%s queue=%s: not accepted", info.session_id, draft.queue_id)
            draft.abort()
            return R.LOCAL_ERROR
        self.on_commit()
        await self.limiter.record_message(principal.login, len(envelope.recipients), time.time())
        log.info(
            "session=%s queue=%s accepted user=%s from=<%s> rcpts=%d size=%d",
            info.session_id,
            draft.queue_id,
            principal.login,
            envelope.sender,
            len(envelope.recipients),
            draft.writer.size,
        )
        return R.reply(250, "2.0.0", f"Ok: queued as {draft.queue_id}")

    async def _repair(self, draft: Draft) -> Reply | None:
        """RFC 6409 8.4: if the site allows, give 8-bit parts of a 7BIT message a
        transfer encoding instead of refusing it. Rare, so the body is read whole."""
        needed = draft.eight_bit and draft.envelope.body == "7BIT"
        if not (needed and self.config.cleanup.repair_8bit):
            return None
        header = draft.header
        assert header is not None

        def repaired() -> tuple[bytes, bytes]:
            return repair_8bit(header, b"".join(draft.body_chunks()))

        try:
            new_header, new_body = await asyncio.to_thread(repaired)
        except RepairImpossible as problem:
            return R.reply(554, "5.6.0", f"8-bit data cannot be repaired: {problem.reason}")
        draft.replace_content(self.queue.open_message, new_header, new_body)
        return None

    def _check_content(self, draft: Draft, principal: AuthenticatedUser) -> Reply | None:
        assert draft.header is not None
        # RFC 6152 / RFC 6409 8.4: 8-bit octets need BODY=8BITMIME (or BINARYMIME).
        if draft.eight_bit and draft.envelope.body == "7BIT":
            return R.NOT_8BIT_CLEAN
        refusal = self.limiter.check_size(principal.login, draft.writer.size)
        if refusal is not None:
            return refusal
        # RFC 6409 6.1: the From: header names the user's own addresses.
        if principal.user.relaxed_header_from:
            return None
        for address in draft.authors():
            if not may_send_as(principal.user, address):
                return R.HEADER_FROM_NOT_OWNED
        return None

    def _rewritten(self, envelope: Envelope) -> Envelope:
        """RFC 6409 8.8: the configured address maps apply to the envelope too."""
        rules = self.cleanup.rewrite
        if not rules:
            return envelope
        envelope.sender = rewrite_address(envelope.sender, rules) if envelope.sender else ""
        envelope.recipients = [
            Recipient(rewrite_address(r.address, rules), r.notify, r.orcpt)
            for r in envelope.recipients
        ]
        return envelope

    async def _signatures(self, draft: Draft) -> bytes:
        """DKIM-Signature fields for the From: domain (RFC 6376), after every fix-up."""
        assert draft.header is not None
        keys = self._keys_for(draft.authors())
        if not keys:
            return b""
        header = draft.header
        if not draft.writer.spilled and draft.writer.size <= _INLINE_SIGNING_MAX:
            return sign(header, draft.body_chunks(), keys)
        return await asyncio.to_thread(lambda: sign(header, draft.body_chunks(), keys))

    def _keys_for(self, senders: list[str]) -> Sequence[SigningKey]:
        if not self.keys or not senders:
            return ()
        domain = senders[0].rpartition("@")[2].lower()
        keys = self.keys.get(domain, ())
        if not keys and domain not in self._unsigned_domains:
            self._unsigned_domains.add(domain)
            log.info("no DKIM key for %s: its messages are sent unsigned", domain)
        return keys


def _cleanup_settings(config: Config) -> CleanupSettings:
    cleanup = config.cleanup
    return CleanupSettings(
        hostname=config.hostname,
        remove_bcc=cleanup.remove_bcc,
        keep_original_date=cleanup.keep_original_date,
        max_header_fields=cleanup.max_header_fields,
        forbidden_fields=tuple(cleanup.forbidden_fields),
        strip_fields=tuple(cleanup.strip_fields),
        rewrite=tuple(cleanup.rewrite),
        single_label_domain=cleanup.single_label_domain,
    )


def _signing_keys(config: Config) -> dict[str, tuple[SigningKey, ...]]:
    """Keys by signing domain, loaded once at start so a bad key stops the start."""
    keys: dict[str, list[SigningKey]] = {}
    for entry in config.dkim.keys:
        key = load_signing_key(entry.key, entry.domain, entry.selector)
        keys.setdefault(entry.domain.lower(), []).append(key)
    return {domain: tuple(found) for domain, found in keys.items()}
