"""The vectorised line scans (submitd.lines) against the bytes-method path they replace.

Content framing, the line checks and outgoing dot-stuffing each have two paths, chosen
by piece size. Each test here runs the same input through both (by moving the
threshold) and wants the same answer for every way of cutting the input into pieces,
with inputs made of the octets that matter: CR, LF, dots, and lines near the limit.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import submitd.delivery.content as outgoing
import submitd.smtp.body as body
from submitd.lines import crlf_mismatch, dots_after_lf, has_run_without_lf
from submitd.smtp.body import MAX_LINE, DataReader, LineChecker

# Lines of many lengths, with the awkward octets mixed in.
line_parts = st.one_of(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.\r\n", b"\r\n.", b"x"]),
    st.integers(0, 1100).map(lambda n: b"a" * n),
    st.binary(max_size=20),
)
contents = st.lists(line_parts, max_size=40).map(b"".join)
cut_lists = st.lists(st.integers(0, 6000), max_size=6)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.fixture(params=["bytes", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with every piece on the bytes path, once with all on numpy's."""
    threshold = 1 << 40 if request.param == "bytes" else 0
    monkeypatch.setattr(body, "LARGE", threshold)
    monkeypatch.setattr(outgoing, "LARGE", threshold)
    return str(request.param)


def _frame(data: bytes, cuts: list[int], large: bool) -> tuple[bytes, bytes | None, object]:
    body.LARGE = 0 if large else 1 << 40
    reader = DataReader(max_size=1 << 30)
    content, rest = b"", None
    for piece in cut(data, cuts):
        if reader.done:
            break
        got, rest = reader.feed(piece)
        content += got
    return content, rest, reader.checker.finish()


@settings(max_examples=400, deadline=None)
@given(data=contents, cuts=cut_lists)
def test_data_framing_agrees(data: bytes, cuts: list[int]) -> None:
    saved = body.LARGE
    try:
        assert _frame(data, cuts, large=True) == _frame(data, cuts, large=False)
    finally:
        body.LARGE = saved


def _check(data: bytes, cuts: list[int], large: bool) -> object:
    body.LARGE = 0 if large else 1 << 40
    checker = LineChecker(max_size=1 << 30)
    for piece in cut(data, cuts):
        checker.feed(piece)
    return checker.finish()


@settings(max_examples=400, deadline=None)
@given(data=contents, cuts=cut_lists)
def test_line_checks_agree(data: bytes, cuts: list[int]) -> None:
    saved = body.LARGE
    try:
        assert _check(data, cuts, large=True) == _check(data, cuts, large=False)
    finally:
        body.LARGE = saved


def _stuff(data: bytes, cuts: list[int], large: bool) -> bytes:
    outgoing.LARGE = 0 if large else 1 << 40
    stuffer = outgoing.DotStuffer()
    return b"".join(stuffer.feed(piece) for piece in cut(data, cuts))


@settings(max_examples=400, deadline=None)
@given(data=contents, cuts=cut_lists)
def test_dot_stuffing_agrees(data: bytes, cuts: list[int]) -> None:
    saved = outgoing.LARGE
    try:
        assert _stuff(data, cuts, large=True) == _stuff(data, cuts, large=False)
    finally:
        outgoing.LARGE = saved


@given(data=contents, start=st.integers(0, 50))
def test_run_without_lf_is_the_regex(data: bytes, start: int) -> None:
    start = min(start, len(data))
    expected = re.search(rb"\n[^\n]{1000}", data[start:]) is not None
    assert has_run_without_lf(data, start, MAX_LINE + 2) is expected


@given(data=contents)
def test_scans_match_their_definitions(data: bytes) -> None:
    pairs = itertools.pairwise(data)
    inner = any((a == 13) != (b == 10) for a, b in pairs)
    assert crlf_mismatch(data) is inner
    assert dots_after_lf(data) == [m.start() + 1 for m in re.finditer(rb"\n(?=\.)", data)]


def test_block_test_needs_a_long_enough_run() -> None:
    with pytest.raises(ValueError):
        has_run_without_lf(b"x", 0, 10)


def test_large_piece_round_trip(path: str) -> None:
    """A 1 MiB body with dots and a terminator, in 256 KiB reads: unstuffed exactly, the
    end found, and stuffing it again for the next hop gives the wire form back."""
    lines = [b".leading dot", b"..two", b"plain " * 12, b"."] * 8000
    original = b"\r\n".join(lines[:-1]) + b"\r\n"
    wire = original.replace(b"\r\n.", b"\r\n..")
    wire = (b"." + wire if wire.startswith(b".") else wire) + b".\r\nQUIT\r\n"
    reader = DataReader(max_size=1 << 30)
    content, rest = b"", None
    for offset in range(0, len(wire), 1 << 18):
        got, rest = reader.feed(wire[offset : offset + (1 << 18)])
        content += got
    assert (content, rest, reader.checker.finish()) == (original, b"QUIT\r\n", None)
    stuffer = outgoing.DotStuffer()
    pieces = [content[i : i + 65536] for i in range(0, len(content), 65536)]
    restuffed = b"".join(stuffer.feed(piece) for piece in pieces)
    assert restuffed + b".\r\nQUIT\r\n" == wire
