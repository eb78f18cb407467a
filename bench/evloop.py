"""Run a coroutine on uvloop when it is installed.

The load generator and the sink share the machine's two cores with the servers under
test; uvloop's event loop costs noticeably less CPU per socket operation than the
default one, which leaves more of those cores to the servers being measured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """asyncio.run, or uvloop.run when asked for and available."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
