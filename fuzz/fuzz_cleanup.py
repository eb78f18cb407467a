"""Fuzz target: header cleanup (`clean_header`) and the address parser (`parse_addresses`).

Input layout: byte 0 is a flag set, the rest a header section. Flag bits: 0 SMTPUTF8;
1 expand single-label domains under ``example.net``; 2 rewrite rules; 3 keep an invalid
Date as X-Original-Date; 4 keep Bcc; 5-6 the grammar for parse_addresses. The header is
cut at the first empty line and given a final CRLF, as `Draft` does, so it may still
contain bare CR or LF and long lines (BDAT BODY=BINARYMIME skips the line checks).

The context is permissive: the user (alice@example.org) owns every address; the local
users are every address at sales.example.net.

Invariants: only CleanupRejection escapes clean_header, and its reply encodes; with no
change noted the output is the input, byte for byte; the output cleans again with no
change (the fix-ups are idempotent); lines we write are at most 998 octets when the
input's were. parse_addresses raises only AddressError; the addr-spec spans are ordered
and in bounds; every address parses again as a bare addr-spec, unchanged.
"""

from __future__ import annotations

import sys
import traceback
from typing import get_args

import atheris

with atheris.instrument_imports(include=["submitd"]):
    from _common import STRICT, Violation, check

    from submitd.message.addresses import (
        AddressError,
        Grammar,
        parse_addr_spec,
        parse_addresses,
    )
    from submitd.message.cleanup import (
        CleanedHeader,
        CleanupContext,
        CleanupRejection,
        CleanupSettings,
        clean_header,
    )

UTF8 = 0x01
SINGLE_LABEL = 0x02
REWRITE = 0x04
KEEP_DATE = 0x08
KEEP_BCC = 0x10
GRAMMARS: tuple[Grammar, ...] = get_args(Grammar)
RULES = (
    ("@old.example", "@new.example"),
    ("jdoe@example.net", "john.doe@example.net"),
    ("@*.eng.example.org", "@example.org"),
)
CRLF = b"\r\n"


def _owns(address: str) -> bool:
    return True


def _is_local_user(address: str) -> bool:
    return address.lower().endswith("@sales.example.net")


def header_of(data: bytes) -> bytes:
    """The header section as `Draft` hands it over: up to the first empty line."""
    if data[:2] == CRLF:
        return b""
    found = data.find(b"\r\n\r\n")
    if found >= 0:
        return data[: found + 2]
    return data if data.endswith(CRLF) else data + CRLF


class KnownFinding(Exception):
    """A known bug (findings/README.md) hit; tolerated unless SUBMITD_FUZZ_STRICT=1."""


def _in_valid_date(error: BaseException) -> bool:
    trace = traceback.extract_tb(error.__traceback__)
    return any(frame.name == "_valid_calendar" for frame in trace)


def clean(header: bytes, context: CleanupContext, settings: CleanupSettings) -> CleanedHeader:
    try:
        return clean_header(header, context, settings)
    except CleanupRejection as rejection:
        rejection.reply.encode()  # must not raise
        raise
    except OverflowError as error:
        # Known finding cleanup-date-year-overflow: a Date year above 2**31-1.
        if STRICT or not _in_valid_date(error):
            raise
        raise KnownFinding from error


def fuzz_clean(header: bytes, flags: int) -> None:
    context = CleanupContext(
        login="alice@example.org",
        owns=_owns,
        is_local_user=_is_local_user,
        smtputf8=bool(flags & UTF8),
        now=1795883428.75,
        unique="Q1x2",
    )
    settings = CleanupSettings(
        hostname="mx.example.org",
        remove_bcc=not flags & KEEP_BCC,
        keep_original_date=bool(flags & KEEP_DATE),
        rewrite=RULES if flags & REWRITE else (),
        single_label_domain="example.net" if flags & SINGLE_LABEL else None,
    )
    try:
        cleaned = clean(header, context, settings)
    except (CleanupRejection, KnownFinding):
        return
    if not cleaned.changes:
        check(cleaned.header == header, "no change noted, but the header differs")
    output = cleaned.header
    check(output == b"" or output.endswith(CRLF), "the cleaned header does not end with CRLF")
    lines = header.split(CRLF)
    if all(len(line) <= 998 for line in lines):
        old = set(lines)
        for line in output.split(CRLF):
            check(line in old or len(line) <= 998, f"we wrote a line of {len(line)} octets")
    # Idempotence: what we queue needs nothing more (the field count limit aside).
    settings_again = CleanupSettings(
        hostname=settings.hostname,
        remove_bcc=settings.remove_bcc,
        keep_original_date=settings.keep_original_date,
        rewrite=settings.rewrite,
        single_label_domain=settings.single_label_domain,
        max_header_fields=10**9,
    )
    try:
        again = clean(output, context, settings_again)
    except CleanupRejection as rejection:
        raise Violation(f"cleaned header refused when cleaned again: {rejection}") from None
    check(again.changes == (), f"cleaning again changes {again.changes!r}")
    check(again.header == output, "cleaning again changed the header")


def fuzz_addresses(text: str, grammar: Grammar, utf8: bool) -> None:
    try:
        parsed = parse_addresses(text, grammar, utf8=utf8)
    except AddressError:
        return
    end = 0
    for mailbox in parsed.mailboxes:
        check(end <= mailbox.start < mailbox.end <= len(text), f"span of {mailbox!r}")
        end = mailbox.end
        try:
            again = parse_addr_spec(mailbox.address, utf8=utf8)
        except AddressError as error:
            raise Violation(f"{mailbox!r} from {text!r} does not parse: {error}") from None
        check(
            (again.local, again.domain) == (mailbox.local, mailbox.domain),
            f"{mailbox!r} parses again as {again!r}",
        )
    if grammar == "mailbox":
        check(len(parsed.mailboxes) == 1, "mailbox grammar gave several mailboxes")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags = data[0]
    header = header_of(data[1:])
    fuzz_clean(header, flags)
    text = data[1:].decode("utf-8", "surrogateescape")
    fuzz_addresses(text, GRAMMARS[(flags >> 5) & 3], bool(flags & UTF8))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
