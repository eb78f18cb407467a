"""What every server process sets up before its event loop: the allocator and uvloop.

Used by `submitd serve` and by the delivery worker it starts.

The allocator: a message passes through the process as pieces of 256 KiB to 1 MiB (TLS
reads, file reads, joined lines). glibc serves blocks that large with mmap and gives
them back with munmap, or trims the top of its heap as soon as it is freed, so every
piece costs a round of page faults and zeroed pages: measured with perf on the 1 MiB
benchmark, about a seventh of the delivery worker's CPU. Raising the two thresholds
keeps those pages for the next piece. The cost is memory held after a peak, bounded by
TRIM_THRESHOLD. Elsewhere than glibc this does nothing.

The event loop: uvloop when installed, for less CPU per byte and far less memory per
TLS session.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("submitd")

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20  # blocks up to 8 MiB come from the heap and are reused
TRIM_THRESHOLD = 64 << 20  # free memory kept at the heap's top before giving it back


def tune_allocator() -> bool:
    """Set the thresholds; True if the C library took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def install_event_loop_policy() -> None:
    """uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop not installed; using the asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
