"""Line structure of large message pieces, found with whole-array numpy operations.

Why numpy: the body of a 1 MiB message must be checked for bare CR/LF, over-long lines
and dot-stuffing, and the obvious bytes methods are slow at it (measured on this
project's 2-core machine, per MiB: `count(b"\\r\\n")` 750 µs, `find(b"\\r\\n.\\r\\n")`
400 µs, `replace(b"\\r\\n.", ...)` 570 µs, the long-line regular expression 560 µs: about
3 ms per MiB before the message is even stored). The same facts come out of three or four
vectorised comparisons over a zero-copy view of the bytes in about 0.1 ms each. Below
`LARGE` octets the per-call overhead of numpy outweighs that, and callers keep using
bytes methods; `tests/unit/test_lines.py` checks that both paths agree.

Every function here looks at one piece; what spans piece borders (a CRLF split between
two reads, a line carried over) is the caller's state to keep.
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt

LARGE = 8 * 1024  # octets from which the numpy path is the faster one

CR, LF, DOT = 13, 10, 46

# Any run of at least 2B - 1 octets covers one whole B-octet block aligned on a multiple
# of B, so when every aligned block holds an LF no run of 2B - 1 octets lacks one.
_BLOCK = 500


def _view(piece: bytes | memoryview) -> npt.NDArray[np.uint8]:
    return np.frombuffer(piece, dtype=np.uint8)


def crlf_mismatch(piece: bytes | memoryview) -> bool:
    """Whether some CR is not followed by LF, or some LF (after the first octet) is not
    preceded by CR, inside `piece`. The octet before the piece and the one after it are
    not known here: a first-octet LF and a last-octet CR are the caller's to judge."""
    octets = _view(piece)
    return bool(((octets[:-1] == CR) ^ (octets[1:] == LF)).any())


def has_run_without_lf(piece: bytes | memoryview, start: int, run: int) -> bool:
    """Whether `piece[start:]` holds an LF followed by `run` octets that are not LF, the
    same question as `re.search(rb"\\n[^\\n]{run}", piece, start)`.

    An aligned-block test answers "no" for nearly every real message (lines of 78 octets
    leave an LF in every block); only a piece where some block lacks an LF is searched
    exactly.
    """
    if run < 2 * _BLOCK - 1:
        raise ValueError("run too short for the block test")
    octets = _view(piece)[start:]
    whole = len(octets) // _BLOCK * _BLOCK
    if bool((octets[:whole].reshape(-1, _BLOCK) == LF).any(axis=1).all()):
        # Every run without LF inside the whole blocks is under 2B - 1 octets; a run
        # reaching into the remainder (< B octets) began after the last block's LF,
        # so it too is under (B - 1) + (B - 1) octets.
        return False
    pattern = re.compile(rb"\n[^\n]{%d}" % run)
    return pattern.search(piece, start) is not None


def dots_after_lf(piece: bytes | memoryview) -> list[int]:
    """Offsets of every "." that directly follows an LF in `piece` (line starts that a
    receiver would unstuff or that may begin the end-of-data line)."""
    octets = _view(piece)
    found = np.flatnonzero((octets[:-1] == LF) & (octets[1:] == DOT))
    return [int(offset) + 1 for offset in found]
