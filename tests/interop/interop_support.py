"""Helpers shared by the interop tests: test messages, and finding them in the queue.

The module has a name no other test directory is likely to use: without __init__.py
files pytest imports every test-side module by its bare name, so a second `helpers.py`
elsewhere would shadow this one.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import sqlite3
import ssl
import sys
from contextlib import closing
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from submitd.envelope import Envelope
from submitd.store.queue import get_message

if TYPE_CHECKING:
    from conftest import RunningServer

SENDER = "alice@example.org"
RECIPIENTS = ("bob@example.com", "carol@example.net")
HOSTNAME = "localhost"  # the name in the server's self-signed certificate
LOOPBACK = "127.0.0.1"

_ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


def _root_conftest() -> ModuleType:
    """tests/conftest.py as a module.

    `from conftest import split_received` would be fragile: with pytest's default
    import mode and no __init__.py files, every conftest.py is imported as the module
    "conftest", so another directory's conftest.py can take the name first. The module
    pytest loaded is reused when it is still registered; otherwise the file is loaded
    by path under a name of its own (its fixtures are then not registered twice).
    """
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve() == _ROOT_CONFTEST:
            return module
    spec = importlib.util.spec_from_file_location("submitd_tests_root_conftest", _ROOT_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def split_received(message: bytes) -> tuple[bytes, bytes]:
    """tests/conftest.py's split_received: (our Received field, the client's bytes)."""
    result: tuple[bytes, bytes] = _root_conftest().split_received(message)
    return result


# --------------------------------------------------------------------------- messages


def make_message(tag: str, *, eight_bit: bool) -> bytes:
    """A message whose bytes must survive submission unchanged.

    CRLF line endings throughout; a folded header and a header with trailing spaces;
    body lines that begin with one and two dots and a line that is a lone dot (all
    dot-stuffed on the wire and unstuffed by the server); trailing spaces and a trailing
    tab; an empty line and a line with leading space; 8-bit UTF-8 text when the client
    can declare BODY=8BITMIME, else ASCII only. No backslashes and no '%': swaks reads
    those as escapes and tokens in its data.
    """
    text_line = (
        "8-bit: Grüße aus Köln, naïve café, Ελληνικά, 日本語 ✓"
        if eight_bit
        else "7-bit: plain ASCII only, this client cannot declare BODY=8BITMIME"
    )
    lines = [
        "From: Alice Example <alice@example.org>",
        "To: Bob <bob@example.com>, carol@example.net",
        f"Subject: submitd interop {tag}",
        "  (a folded continuation of the subject)",
        f"Message-ID: <{tag}@interop.submitd.test>",
        "Date: Sat, 28 Nov 2026 12:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "X-Trailing-Space: header value with trailing spaces   ",
        "",
        f"marker-begin {tag}",
        ".a line that begins with one dot",
        "..a line that begins with two dots",
        ".",
        "the line above is a lone dot, which must not end the data",
        "trailing spaces   ",
        "trailing tab\t",
        text_line,
        "",
        " a line with a leading space, after an empty line",
        "dots. in. the .middle. of a line.",
        f"marker-end {tag}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def has_8bit(message: bytes) -> bool:
    return any(byte > 0x7F for byte in message)


# ------------------------------------------------------------------------ the queue


@dataclass(frozen=True)
class Queued:
    queue_id: str
    received: bytes  # our Received field, folded as stored
    content: bytes  # everything after it: the client's bytes
    envelope: Envelope


_RECEIVED = re.compile(
    r"Received: from (?P<helo>\S+) \(\[127\.0\.0\.1\]\)"
    r" by localhost \(submitd\) with ESMTPSA id (?P<id>[0-9A-Z]{16})"
    r"(?: \((?P<tls>TLSv1\.[23]) cipher (?P<cipher>[A-Za-z0-9_-]+)\))?"
    r";\s*(?P<date>.+)"
)


def find_queued(server: RunningServer, tag: str) -> Queued:
    """The one queued message with the Message-ID of `tag`."""
    needle = f"\r\nMessage-ID: <{tag}@interop.submitd.test>\r\n".encode()
    found = [qid for qid in server.queue_ids() if needle in server.queued_message(qid)]
    assert len(found) == 1, f"expected one message tagged {tag}, found {found}"
    queue_id = found[0]
    received, content = split_received(server.queued_message(queue_id))
    with closing(sqlite3.connect(server.data_dir / "submitd.sqlite3")) as conn:
        stored = get_message(conn, queue_id)
    assert stored is not None
    return Queued(queue_id, received, content, stored.envelope)


def check_queued(
    server: RunningServer,
    tag: str,
    expected: bytes,
    *,
    helo: str | None = None,
    body: str | None = None,
    recipients: tuple[str, ...] = RECIPIENTS,
) -> Queued:
    """Find the message, check its Received field, its bytes and its envelope."""
    queued = find_queued(server, tag)
    unfolded = re.sub(r"\r\n[ \t]+", " ", queued.received.decode("utf-8")).rstrip("\r\n")
    match = _RECEIVED.fullmatch(unfolded)
    assert match is not None, f"unexpected Received field: {queued.received!r}"
    assert match["id"] == queued.queue_id
    assert match["tls"] is not None, "the Received field names no TLS version"
    parsedate_to_datetime(match["date"])  # raises if the date is not RFC 5322
    if helo is not None:
        assert match["helo"] == helo
    assert queued.content == expected, _diff(expected, queued.content)
    assert queued.envelope.sender == SENDER
    assert [r.address for r in queued.envelope.recipients] == list(recipients)
    if body is not None:
        assert queued.envelope.body == body
    return queued


def _diff(expected: bytes, actual: bytes) -> str:
    for index, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            start = max(0, index - 40)
            return (
                f"first difference at octet {index}:\n"
                f"  expected {expected[start : index + 40]!r}\n"
                f"  actual   {actual[start : index + 40]!r}"
            )
    return f"lengths differ: expected {len(expected)}, actual {len(actual)}"


QUEUED_AS = re.compile(r"250[ -]2\.0\.0 Ok: queued as (?P<id>[0-9A-Z]{16})")


def queue_id_in(transcript: str) -> str:
    """The id in the server's `250 2.0.0 Ok: queued as ID` within a client's output."""
    ids = QUEUED_AS.findall(transcript)
    assert len(ids) == 1, f"no single 'queued as' reply in:\n{transcript}"
    return str(ids[0])


# ----------------------------------------------------------------- raw connections


def client_context(cafile: Path) -> ssl.SSLContext:
    """Verifies the chain against `cafile` and the name "localhost"."""
    return ssl.create_default_context(cafile=str(cafile))


def connect_loopback(port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1 only: "localhost" may also resolve to ::1."""
    return socket.create_connection((LOOPBACK, port), timeout=timeout)
