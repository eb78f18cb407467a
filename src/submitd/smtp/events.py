"""What the sans-I/O session asks its transport to do.

The session never performs I/O; `Session.receive_data` and friends return a list of
these, in order, and the transport carries them out. Two of them (`Authenticate` and
`MessageEnd`) need an answer: the session stops reading input until the transport
calls back with `auth_result` or `message_result`.
"""

from __future__ import annotations

from dataclasses import dataclass

from submitd.envelope import Envelope


@dataclass(slots=True)
class Send:
    """Write these octets (one or more replies, already joined)."""

    data: bytes


@dataclass(slots=True)
class StartTLS:
    """Upgrade the connection now; no input read before the handshake is executed."""


@dataclass(slots=True)
class Close:
    """Close the connection after writing what was sent before."""


@dataclass(slots=True)
class Authenticate:
    """Check these credentials; answer with `Session.auth_result`."""

    login: str
    password: str
    mechanism: str


@dataclass(slots=True)
class MessageBegin:
    """The content of a message for this envelope starts now."""

    envelope: Envelope


@dataclass(slots=True)
class MessageChunk:
    """More content, dot-unstuffed, in order."""

    data: bytes


@dataclass(slots=True)
class MessageEnd:
    """The content is complete and sound; commit it and answer `message_result`."""


@dataclass(slots=True)
class MessageAbort:
    """Discard the content received so far (too big, malformed, or transaction reset)."""


Event = (
    Send | StartTLS | Close | Authenticate | MessageBegin | MessageChunk | MessageEnd | MessageAbort
)
