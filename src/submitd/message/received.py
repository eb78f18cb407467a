"""The Received trace field that submitd prepends (RFC 5321 4.4, RFC 3848).

It names the client as it introduced itself and as we saw it, ourselves, the protocol
(`ESMTPSA`: ESMTP with TLS and AUTH, RFC 3848; `UTF8SMTPSA` with SMTPUTF8, RFC 6531 3.7.3),
the queue id, the TLS parameters in a comment, and the time. The authenticated login is
left out on purpose: it is not needed for tracing and would be disclosed to every
recipient.
"""

from __future__ import annotations

from submitd.envelope import SessionInfo
from submitd.message.dates import date_text


def protocol_name(*, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def _literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def _comment_safe(text: str) -> str:
    """Keep client-supplied text from breaking out of the field or its comment."""
    kept = "".join(c for c in text if c.isprintable() and c not in "()\\")
    return kept[:255] or "unknown"


def received_field(
    info: SessionInfo,
    *,
    hostname: str,
    queue_id: str,
    smtputf8: bool,
    now: float,
    private: bool = False,
) -> bytes:
    """The field, CRLF-terminated. `private` withholds the client's EHLO name and address
    (a site choice, RFC 6409 8 leaves trace privacy to policy): the reserved `.invalid`
    name (RFC 2606) keeps the field's syntax while saying plainly that nothing is shown."""
    helo = _comment_safe(info.ehlo_name)
    proto = protocol_name(
        tls=info.tls_version is not None, authenticated=info.user is not None, smtputf8=smtputf8
    )
    source = "client.invalid (withheld)" if private else f"{helo} ({_literal(info.client_ip)})"
    lines = [
        f"Received: from {source}",
        f"\tby {hostname} (submitd) with {proto} id {queue_id}",
    ]
    if info.tls_version:
        lines.append(f"\t({info.tls_version} cipher {info.tls_cipher})")
    lines[-1] += ";"
    lines.append(f"\t{date_text(now)}")  # "+0000": UTC, known (RFC 5322 3.3)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
