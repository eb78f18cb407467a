"""Reading the header section of a submitted message, without changing a byte of it.

Only what the acceptance path needs: where the header ends, the values of named fields
(unfolded, RFC 5322 2.2.3) and the addresses in an address-list field. The message
itself is never re-serialised: the email package would rewrite line endings and
folding, and break the client's own signatures (DESIGN principle 4).
"""

from __future__ import annotations

from email.utils import getaddresses

from submitd.message.addresses import AddressError, parse_addresses


def field_values(header: bytes, name: str) -> list[str]:
    """Unfolded values of every field called `name` (case-insensitive)."""
    wanted = name.lower().encode("ascii") + b":"
    values: list[str] = []
    current: list[bytes] | None = None
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        if current is not None:
            values.append(_unfold(current))
            current = None
        if line[: len(wanted)].lower() == wanted:
            current = [line[len(wanted) :]]
    if current is not None:
        values.append(_unfold(current))
    return values


def _unfold(parts: list[bytes]) -> str:
    return b"".join(parts).decode("utf-8", "replace").strip()


def addresses(values: list[str]) -> list[str]:
    """The addr-specs in address-list values; groups contribute their members.

    Values that the strict parser of the cleanup stage accepts (every From: that reached
    the commit did) are read with it, fast path included; anything else falls back to
    the lenient stdlib reader.
    """
    found: list[str] = []
    for value in values:
        try:
            parsed = parse_addresses(value, "optional-address-list", utf8=True)
        except AddressError:
            found += [address for _name, address in getaddresses([value]) if address]
            continue
        found += [mailbox.address for mailbox in parsed.mailboxes]
    return found
