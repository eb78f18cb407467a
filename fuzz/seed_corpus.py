"""Write the seed corpora, fuzz/corpus/<target>/, from the protocol tests.

The byte strings and commands of tests/unit/test_session.py, test_syntax.py,
test_cleanup.py and tests/integration/test_replies.py are collected from the test
modules themselves (module constants and ``pytest.mark.parametrize`` values, so computed
values such as base64 tokens are included), then laid out in each target's input format
(see README.md). Run it from anywhere: ``python fuzz/seed_corpus.py``. Files are named by
content hash, so running it again adds nothing twice; stale seeds are removed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import inspect
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
TEST_MODULES = (
    "tests.unit.test_session",
    "tests.unit.test_syntax",
    "tests.unit.test_cleanup",
    "tests.integration.test_replies",
)

PLAIN = base64.b64encode(b"\0alice@example.org\0secret")
LOGIN = b"EHLO client.example.org\r\nAUTH PLAIN " + PLAIN + b"\r\n"
ENVELOPE = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"


def _flatten(value: object, depth: int = 0) -> Iterator[str | bytes]:
    if isinstance(value, str | bytes):
        yield value
    elif depth < 4 and isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _flatten(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item, depth + 1)
    elif depth < 4 and hasattr(value, "values") and hasattr(value, "id"):  # pytest.param
        yield from _flatten(value.values, depth + 1)


def values_of(module: ModuleType) -> list[str | bytes]:
    """Module constants and parametrize values, in a stable order, without duplicates."""
    found: list[str | bytes] = []
    for name, value in vars(module).items():
        if not name.startswith("__"):
            found += _flatten(value)
        if inspect.isfunction(value):
            for mark in getattr(value, "pytestmark", []):
                if mark.name == "parametrize" and len(mark.args) >= 2:
                    found += _flatten(mark.args[1])
    return list(dict.fromkeys(found))


def load() -> dict[str, list[str | bytes]]:
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    return {
        name.rsplit(".", 1)[1]: values_of(importlib.import_module(name)) for name in TEST_MODULES
    }


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def commands(values: Iterable[str | bytes]) -> list[bytes]:
    """Values that look like SMTP command lines, CRLF-terminated."""
    verbs = (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"VRFY")
    verbs += (b"HELP", b"QUIT", b"AUTH", b"STARTTLS", b"ETRN", b"ATRN", b"FOO", b"NOSUCH")
    out = []
    for value in values:
        raw = as_bytes(value)
        if raw[:8].upper().startswith(verbs) or raw in (b"*",):
            out.append(raw if raw.endswith(b"\n") else raw + b"\r\n")
    return out


def bodies(values: Iterable[str | bytes]) -> list[bytes]:
    """Byte strings that look like message content (header, body, end marker)."""
    return [
        value
        for value in values
        if isinstance(value, bytes) and (b"\r\n" in value or b"\n" in value) and len(value) > 4
    ]


def session_seeds(tests: dict[str, list[str | bytes]]) -> Iterator[bytes]:
    everything = [value for values in tests.values() for value in values]
    lines = commands(everything)
    content = bodies(tests["test_session"] + tests["test_replies"])
    for index, line in enumerate(lines):
        yield bytes([0x00, 0, index % 256]) + b"EHLO c.example\r\n" + line
        yield bytes([0x08, 1, index % 256]) + line  # after login
        yield bytes([0x18, 2, index % 256]) + line  # after login and envelope
        yield bytes([0x1C, 3, index % 256]) + line  # the same, small limits
    for index, body in enumerate(content):
        end = b"" if body.endswith(b".\r\n") else b"\r\n.\r\n"
        yield bytes([0x18, 4, index % 256]) + b"DATA\r\n" + body + end + b"QUIT\r\n"
        chunk = b"BDAT %d LAST\r\n" % len(body) + body
        yield bytes([0x18, 5, index % 256]) + chunk + b"RSET\r\n"
    yield b"\x00\x00\x00" + b"EHLO c.example\r\nSTARTTLS\r\nEHLO c.example\r\nAUTH LOGIN\r\n"
    yield b"\x01\x00\x00" + LOGIN + ENVELOPE + b"DATA\r\nFrom: a@b.example\r\n\r\nx\r\n.\r\n"
    user = base64.b64encode(b"alice@example.org")
    yield b"\x01\x00\x07EHLO c\r\nAUTH LOGIN\r\n" + user + b"\r\n" + base64.b64encode(b"bad")


def sasl_seeds(tests: dict[str, list[str | bytes]]) -> Iterator[bytes]:
    """Decoded PLAIN/LOGIN responses found in the tests, as length-prefixed responses."""
    responses = {b"\0alice@example.org\0secret", b"alice@example.org", b"pw", b"", b"\0\0"}
    for values in tests.values():
        for value in values:
            raw = as_bytes(value)
            for word in raw.replace(b"\r\n", b" ").split(b" "):
                try:
                    decoded = base64.b64decode(word, validate=True)
                except ValueError:
                    continue
                if decoded and len(word) >= 4:
                    responses.add(decoded[:255])
    for response in sorted(responses):
        yield b"\x00" + bytes([len(response)]) + response  # PLAIN, initial response
        yield b"\x02" + bytes([len(response)]) + response  # PLAIN after a 334
    for first in sorted(responses):
        yield b"\x01" + bytes([len(first)]) + first + b"\x06secret"  # LOGIN, initial
        yield b"\x03" + bytes([len(first)]) + first + b"\x02pw"  # LOGIN after 334


def body_seeds(tests: dict[str, list[str | bytes]]) -> Iterator[bytes]:
    content = bodies(tests["test_session"] + tests["test_replies"] + tests["test_cleanup"])
    for index, body in enumerate(content):
        end = b"" if body.endswith(b".\r\n") else b"\r\n.\r\n"
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        yield bytes([0x00, 1, index % 256]) + stuffed + end + b"NOOP\r\n"  # DATA
        yield bytes([0x08, 2, index % 256]) + stuffed + end  # DATA, small limit
        yield bytes([0x02, 3, index % 256]) + body  # LineChecker
        yield bytes([0x06, 4, index % 256]) + body  # LineChecker, binary
        yield bytes([0x03, 5, index % 256]) + body  # BDAT
        yield bytes([0x07, 6, index % 256]) + body  # BDAT, BINARYMIME


def syntax_seeds(tests: dict[str, list[str | bytes]]) -> Iterator[bytes]:
    values = tests["test_syntax"] + tests["test_session"] + tests["test_replies"]
    for value in values:
        if not isinstance(value, str) or not value or len(value) > 600:
            continue
        raw = value.encode("utf-8", "surrogateescape")
        flags = 0x00 if raw.isascii() else 0x01
        if "\udc80" <= max(value) <= "\udcff":
            flags |= 0x02
        if raw.upper().startswith((b"MAIL ", b"RCPT ")):
            raw = raw[4:]  # the argument after the verb, as the session passes it
        yield bytes([flags]) + raw
        if raw.startswith(b"<"):
            yield bytes([flags]) + b" FROM:" + raw + b" SIZE=10 BODY=8BITMIME"
            yield bytes([flags]) + b" TO:" + raw + b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@c.d"


def cleanup_seeds(tests: dict[str, list[str | bytes]]) -> Iterator[bytes]:
    for value in tests["test_cleanup"]:
        raw = as_bytes(value)
        if not raw or len(raw) > 4000:
            continue
        if raw.endswith(b"\r\n"):  # a header
            for flags in (0x00, 0x03, 0x0C, 0x14):
                yield bytes([flags]) + raw
        else:  # an address list, a date, a rule: as a field value and for parse_addresses
            for grammar in range(4):
                yield bytes([grammar << 5]) + raw
            yield b"\x00From: alice@example.org\r\nTo: " + raw + b"\r\n"


TARGETS = {
    "session": session_seeds,
    "sasl": sasl_seeds,
    "body": body_seeds,
    "syntax": syntax_seeds,
    "cleanup": cleanup_seeds,
}


MAX_SEED = 4096  # octets; larger test values (multi-megabyte bodies) only slow the fuzzer


def write(target: str, seeds: Iterable[bytes]) -> int:
    folder = CORPUS / target
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    unique = {hashlib.sha1(seed).hexdigest(): seed for seed in seeds if len(seed) <= MAX_SEED}
    for name, seed in unique.items():
        (folder / name).write_bytes(seed)
    return len(unique)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    args = parser.parse_args()
    tests = load()
    for target, make in TARGETS.items():
        if args.target in (target, "all"):
            print(f"{target}: {write(target, make(tests))} seeds in {CORPUS / target}")


if __name__ == "__main__":
    main()
