"""The envelope of one submitted message, as the session hands it to the submission.

Plain data, shared by the protocol side and the storage side; neither owns it. Every
parameter the client gave with MAIL and RCPT is kept, because delivery (DSN, RFC 3461)
and bounces need them later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Recipient:
    address: str
    notify: tuple[str, ...] | None = None  # RFC 3461 4.1: NEVER, or SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # RFC 3461 4.2: "addr-type;address", xtext decoded


@dataclass(slots=True)
class Envelope:
    sender: str  # "" for the null reverse-path <>
    recipients: list[Recipient] = field(default_factory=list)
    body: str = "7BIT"  # RFC 6152 / RFC 3030: 7BIT, 8BITMIME or BINARYMIME
    smtputf8: bool = False  # RFC 6531
    size: int | None = None  # RFC 1870 declared size
    ret: str | None = None  # RFC 3461 4.3: FULL or HDRS
    envid: str | None = None  # RFC 3461 4.4, xtext decoded
    auth: str | None = None  # RFC 4954 5: MAIL AUTH=, xtext decoded ("<>" when given so)

    def to_json(self) -> dict[str, Any]:
        """Built by hand, like SessionInfo's: `asdict` deep-copies every field."""
        return {
            "sender": self.sender,
            "recipients": [
                {
                    "address": r.address,
                    "notify": None if r.notify is None else list(r.notify),
                    "orcpt": r.orcpt,
                }
                for r in self.recipients
            ],
            "body": self.body,
            "smtputf8": self.smtputf8,
            "size": self.size,
            "ret": self.ret,
            "envid": self.envid,
            "auth": self.auth,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        recipients = [
            Recipient(
                address=item["address"],
                notify=tuple(item["notify"]) if item.get("notify") is not None else None,
                orcpt=item.get("orcpt"),
            )
            for item in data.get("recipients", [])
        ]
        rest = {k: v for k, v in data.items() if k != "recipients"}
        return cls(recipients=recipients, **rest)


@dataclass(slots=True, frozen=True)
class SessionInfo:
    """What the transport knows about the client, for trace fields and logs."""

    session_id: str
    client_ip: str
    client_port: int
    ehlo_name: str = ""
    tls_version: str | None = None
    tls_cipher: str | None = None
    user: str | None = None  # the authenticated login

    def to_json(self) -> dict[str, Any]:
        """Built by hand: `dataclasses.asdict` costs more than the rest of a commit."""
        return {
            "session_id": self.session_id,
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "ehlo_name": self.ehlo_name,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "user": self.user,
        }
