"""Shared helpers for the atheris fuzz targets: invariant checks and input splitting.

Every target is a script in this folder (``fuzz_<name>.py``) that defines
``test_one_input(data: bytes) -> None`` and runs atheris when executed. An invariant that
does not hold raises :class:`Violation` (an AssertionError, so it is never mistaken for an
exception the code under test is allowed to raise); atheris then writes the input to the
``-artifact_prefix`` folder, ``fuzz/findings/`` when started by ``fuzz/run.py``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

# The RFC 5321 reply line length and textstring checks, once known findings
# (findings/README.md, all fixed now): on unless SUBMITD_FUZZ_STRICT=0.
STRICT = os.environ.get("SUBMITD_FUZZ_STRICT", "1") == "1"


class Violation(AssertionError):
    """An invariant of the code under test does not hold for this input."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


_SIZES = (1, 1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 100, 512, 1000, 1 << 30)


def splits(data: bytes, seed: int) -> Iterator[bytes]:
    """``data`` cut into pieces whose sizes are drawn from ``seed``; never an empty piece.

    The seed is part of the fuzz input, so the fuzzer explores cut points by mutating it
    and a crash file replays the same cuts.
    """
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rng.choice(_SIZES)
        if size < 1 << 30 and rng.random() < 0.5:
            size = rng.randint(1, size)
        yield data[pos : pos + size]
        pos += size


def seed_of(data: bytes) -> int:
    return int.from_bytes(data, "big")
